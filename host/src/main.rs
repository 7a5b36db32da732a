//! `meshvm-agent`: the meshvm VM agent.

use std::collections::BTreeMap;
use std::io::{ErrorKind, IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use meshvm_agent::ca_client::{CaClient, CaClientOptions};
use meshvm_agent::config::{Config, ConfigError, OnboardingPaths};
use meshvm_agent::identity::{CertStore, KeyAlgorithm};
use meshvm_agent::identity_manager::{IdentityManager, IdentityOptions};
use meshvm_agent::sds::{self, SdsServer, WorkloadSecret};
use std::sync::Arc;

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
    /// Obtain the workload certificate from the mesh CA, keep it renewed, and
    /// serve it to Envoy over SDS until SIGTERM or SIGINT.
    Run {
        /// Where the key, certificate chain and root are kept (0600).
        /// Default: Istio's /etc/certs.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// The Unix socket Envoy's SDS cluster connects to.
        #[arg(long, value_name = "PATH", default_value = sds::DEFAULT_SOCKET_PATH)]
        sds_socket: PathBuf,
        /// Key algorithm for the workload key.
        #[arg(long, default_value_t = KeyAlgorithm::EcdsaP256)]
        key_algorithm: KeyAlgorithm,
    },
    /// Ask the agent's SDS socket for `default` and `ROOTCA`, as Envoy does,
    /// and print what is served (identity, validity, serials; never the key).
    Secrets {
        /// The agent's SDS socket.
        #[arg(long, value_name = "PATH", default_value = sds::DEFAULT_SOCKET_PATH)]
        sds_socket: PathBuf,
        /// Wait up to this long for the socket to appear and a certificate to
        /// be served (e.g. `30s`); without it, fail at once if none is.
        #[arg(long, value_name = "DURATION", value_parser = parse_wait)]
        wait: Option<std::time::Duration>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Yaml)]
        format: Format,
    },
}

fn parse_wait(text: &str) -> Result<std::time::Duration, String> {
    meshvm_agent::config::duration::parse_go_duration(text)
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
        Command::Run {
            state_dir,
            sds_socket,
            key_algorithm,
        } => {
            let config = Config::load(&paths, &env)?;
            let store = state_dir.map_or_else(CertStore::istio_vm, CertStore::new);
            let mut options = IdentityOptions::from_config(&config, store);
            options.key_algorithm = key_algorithm;
            let client = CaClient::new(CaClientOptions::from_config(&config))?;
            tracing::info!(identity = %config.spiffe_id(), "starting");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(serve_identity(client, options, &sds_socket))?;
        }
        Command::Secrets {
            sds_socket,
            wait,
            format,
        } => {
            // Without --wait: long enough for a served certificate to arrive,
            // short enough to say quickly that none is.
            let (limit, retry_connect) = match wait {
                Some(wait) => (wait, true),
                None => (std::time::Duration::from_secs(2), false),
            };
            let served = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(sds::client::fetch_secrets(
                    &sds_socket,
                    limit,
                    retry_connect,
                ))?;
            let text = match format {
                Format::Yaml => serde_norway::to_string(&served)?,
                Format::Json => serde_json::to_string_pretty(&served)? + "\n",
            };
            std::io::stdout()
                .write_all(text.as_bytes())
                .context("writing to stdout")?;
        }
    }
    Ok(())
}

/// Keeps the workload certificate current and serves it over SDS until a
/// termination signal.
async fn serve_identity(
    client: CaClient,
    options: IdentityOptions,
    sds_socket: &std::path::Path,
) -> anyhow::Result<()> {
    let manager = IdentityManager::start(client, options);
    let mut identities = manager.subscribe();
    let (secrets, secrets_rx) = tokio::sync::watch::channel(None);
    // Every identity the manager publishes becomes the SDS secrets.
    let bridge = tokio::spawn(async move {
        loop {
            let current = identities.borrow_and_update().clone();
            secrets
                .send_replace(current.map(|id| Arc::new(WorkloadSecret::new(&id.key, &id.cert))));
            if identities.changed().await.is_err() {
                break;
            }
        }
    });
    let server = SdsServer::bind(sds_socket, secrets_rx)
        .with_context(|| format!("binding the SDS socket {}", sds_socket.display()))?;
    server
        .serve_with_shutdown(termination())
        .await
        .context("SDS server")?;
    tracing::info!("shutting down");
    bridge.abort();
    manager.stop().await;
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn termination() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
