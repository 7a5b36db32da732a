//! `meshvm-agent`: the meshvm VM agent.

use clap::Parser;

/// The meshvm VM agent: joins this VM to an Istio-compatible service mesh.
#[derive(Parser)]
#[command(name = "meshvm-agent", version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!(
        "meshvm-agent {} has no runnable mode yet; see --help",
        env!("CARGO_PKG_VERSION")
    )
}
