//! `meshvm-controlplane`: the local stand-in for istiod used by meshvm's tests and demo.

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshvm_controlplane::echo::EchoApp;

#[derive(Parser)]
#[command(name = "meshvm-controlplane", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an HTTP echo app that answers with the request it received, as JSON.
    Echo {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Name the app reports in its answers.
        #[arg(long, default_value = "echo")]
        name: String,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Echo { listen, name } => {
            let app = EchoApp::spawn(&listen, &name).context("starting the echo app")?;
            tracing::info!(addr = %app.addr(), %name, "echo app listening");
            loop {
                std::thread::park();
            }
        }
    }
}
