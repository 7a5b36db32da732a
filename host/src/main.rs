//! `meshvm-agent`: the meshvm VM agent.

use std::collections::BTreeMap;
use std::io::{ErrorKind, IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use meshvm_agent::config::{Config, ConfigError, OnboardingPaths};

/// The meshvm VM agent: joins this VM to an Istio-compatible service mesh.
#[derive(Parser)]
#[command(name = "meshvm-agent", version, about, long_about = None)]
struct Cli {
    /// Read cluster.env, mesh.yaml, root-cert.pem, istio-token and hosts from
    /// this directory (as `istioctl x workload entry configure -o DIR` writes
    /// them) instead of Istio's VM locations (/var/lib/istio/envoy/cluster.env,
    /// /etc/istio/config/mesh, /etc/certs/root-cert.pem,
    /// /var/run/secrets/tokens/istio-token, /etc/hosts).
    #[arg(long, global = true, value_name = "DIR")]
    onboarding_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the onboarding files and the environment, and print the resolved
    /// configuration (secrets redacted); fail, naming the file and line, if
    /// anything is malformed.
    CheckConfig {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Yaml)]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Yaml,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let default_locations = cli.onboarding_dir.is_none();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshvm-agent: error: {e:#}");
            if default_locations
                && matches!(e.downcast_ref(), Some(ConfigError::Read { error, .. }) if error.kind() == ErrorKind::NotFound)
            {
                eprintln!(
                    "meshvm-agent: hint: install the files `istioctl x workload entry configure` \
                     writes at Istio's VM locations, or pass --onboarding-dir DIR"
                );
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = match &cli.onboarding_dir {
        Some(dir) => OnboardingPaths::in_dir(dir),
        None => OnboardingPaths::istio_vm(),
    };
    // Variables that are not UTF-8 cannot be Istio settings; skip them.
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    match cli.command {
        Command::CheckConfig { format } => {
            let config = Config::load(&paths, &env)?;
            tracing::info!(identity = %config.spiffe_id(), "configuration is valid");
            let report = config.report();
            let text = match format {
                Format::Yaml => serde_norway::to_string(&report)?,
                Format::Json => serde_json::to_string_pretty(&report)? + "\n",
            };
            std::io::stdout()
                .write_all(text.as_bytes())
                .context("writing to stdout")?;
        }
    }
    Ok(())
}
