//! `meshvm-agent`: the meshvm VM agent.

use std::collections::BTreeMap;
use std::io::{ErrorKind, IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use meshvm_agent::agent::{self, AgentOptions};
use meshvm_agent::config::{Config, ConfigError, OnboardingPaths};
use meshvm_agent::envoy;
use meshvm_agent::identity::{self, KeyAlgorithm};
use meshvm_agent::sds;
use meshvm_agent::status;
use meshvm_agent::wasm::{CacheOptions, ModuleRequest, PullPolicy, Sha256, WasmCache};

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

// Parsed once at start: boxing `Run` would save nothing.
#[allow(clippy::large_enum_variant)]
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
    /// Join the mesh: obtain and renew the workload certificate, serve it to
    /// Envoy over SDS, proxy Envoy's xDS stream to the control plane, and
    /// write Envoy's bootstrap and run Envoy, until SIGTERM or SIGINT.
    Run {
        /// Where the key, certificate chain and root are kept (0600).
        #[arg(long, value_name = "DIR", default_value = identity::ISTIO_VM_CERT_DIR)]
        state_dir: PathBuf,
        /// Where Envoy's bootstrap (envoy-rev.json) and the xDS socket (XDS) go.
        #[arg(long, value_name = "DIR", default_value = envoy::bootstrap::ISTIO_CONFIG_DIR)]
        run_dir: PathBuf,
        /// The Unix socket Envoy's SDS cluster connects to.
        #[arg(long, value_name = "PATH", default_value = sds::DEFAULT_SOCKET_PATH)]
        sds_socket: PathBuf,
        /// Key algorithm for the workload key.
        #[arg(long, default_value_t = KeyAlgorithm::EcdsaP256)]
        key_algorithm: KeyAlgorithm,
        /// The network interface whose address is the VM's mesh address
        /// (env MESHVM_INTERFACE); default: ISTIO_SVC_IP, else the first
        /// non-loopback address.
        #[arg(long, value_name = "NAME")]
        interface: Option<String>,
        /// The Envoy binary to start and supervise.
        #[arg(long, value_name = "PATH", default_value = "envoy")]
        envoy: PathBuf,
        /// Do not start Envoy (it is run separately, with the bootstrap the
        /// agent writes).
        #[arg(long, conflicts_with = "envoy")]
        no_envoy: bool,
        /// The meshvm filter: a local `meshvm_filter.wasm`, or an image
        /// (`oci://REGISTRY/REPO:TAG`, `…@sha256:DIGEST`) or `https://` URL
        /// fetched into the Wasm cache. With a WorkloadGroup `httpGet`
        /// probe, Envoy runs it as a singleton service that probes the app
        /// and posts to /v1/health.
        #[arg(long, value_name = "FILE|URL")]
        filter_wasm: Option<String>,
        /// With --filter-wasm: do not judge health from real inbound
        /// traffic (on by default for a workload with a probe).
        #[arg(long, requires = "filter_wasm")]
        no_traffic_health: bool,
        #[command(flatten)]
        wasm: WasmArgs,
        /// Envoy's admin port on 127.0.0.1 (0: any free port).
        #[arg(long, default_value_t = 15000)]
        envoy_admin_port: u16,
        /// Envoy's /healthz/ready port (0: any free port).
        #[arg(long, default_value_t = 15021)]
        envoy_status_port: u16,
        /// Envoy's /stats/prometheus port (0: any free port).
        #[arg(long, default_value_t = 15090)]
        envoy_prometheus_port: u16,
        /// The agent's status server: /healthz/ready (also through Envoy's
        /// status port) and /metrics.
        #[arg(long, value_name = "ADDR", default_value_t = status::DEFAULT_STATUS_ADDRESS)]
        status_listen: std::net::SocketAddr,
        /// The DNS proxy's address, UDP and TCP (IPv4 or IPv6, e.g.
        /// `[::1]:15053`); it runs when cluster.env sets
        /// ISTIO_META_DNS_CAPTURE=true, or with --dns.
        #[arg(long, value_name = "ADDR", default_value = meshvm_agent::dns::DEFAULT_LISTEN)]
        dns_listen: std::net::SocketAddr,
        /// Run the DNS proxy even without ISTIO_META_DNS_CAPTURE.
        #[arg(long)]
        dns: bool,
        /// The Kubernetes cluster domain (overrides CLUSTER_DOMAIN; default
        /// cluster.local): `<name>.<ns>.svc.<domain>` services answer to
        /// their short names in DNS, and Envoy's node id ends in
        /// `<ns>.svc.<domain>`.
        #[arg(long, value_name = "DOMAIN", value_parser = meshvm_agent::config::parse_cluster_domain)]
        cluster_domain: Option<String>,
        /// An upstream nameserver of the DNS proxy (IP, IP:port or
        /// [IPv6]:port; repeat for several); default: the nameservers of
        /// /etc/resolv.conf.
        #[arg(long = "dns-upstream", value_name = "ADDR", value_parser = meshvm_agent::dns::forward::parse_server)]
        dns_upstreams: Vec<std::net::SocketAddr>,
        /// Ask every upstream nameserver at once, first answer wins
        /// (overrides DNS_FORWARD_PARALLEL; `=false` turns it off).
        #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        dns_forward_parallel: Option<bool>,
        /// How long the DNS proxy waits for an upstream nameserver, e.g.
        /// `2s` (overrides DNS_FORWARD_TIMEOUT; default 5s).
        #[arg(long, value_name = "DURATION", value_parser = meshvm_agent::config::parse_forward_timeout)]
        dns_forward_timeout: Option<std::time::Duration>,
    },
    /// Fetch a Wasm module into the cache, as the agent does for a
    /// WasmPlugin (to check an image, or to fill the cache of a VM that
    /// will start without the registry), and print where it is.
    PullWasm {
        /// `oci://REGISTRY/REPO:TAG`, `oci://REGISTRY/REPO@sha256:DIGEST`,
        /// or an `http(s)://` URL.
        url: String,
        /// The digest the module must have (a WasmPlugin's `sha256`: the
        /// image's manifest digest, or the file's for http(s)).
        #[arg(long, value_name = "DIGEST")]
        sha256: Option<String>,
        /// Ask the registry even when the cache has the module.
        #[arg(long)]
        always: bool,
        #[command(flatten)]
        wasm: WasmArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Yaml)]
        format: Format,
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

/// Where Wasm modules are kept and which registries are plain HTTP; the
/// rest comes from Istio's environment (`WASM_MODULE_EXPIRY`,
/// `WASM_PURGE_INTERVAL`, `WASM_HTTP_REQUEST_TIMEOUT`,
/// `ISTIO_WASM_MAX_BINARY_SIZE_BYTES`).
#[derive(clap::Args)]
struct WasmArgs {
    /// The Wasm module cache (modules by digest, kept across restarts).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_WASM_CACHE_DIR)]
    wasm_cache_dir: PathBuf,
    /// A registry (`host[:port]`, `*` for all) reached over plain HTTP;
    /// repeatable; added to WASM_INSECURE_REGISTRIES.
    #[arg(long = "wasm-insecure-registry", value_name = "HOST")]
    wasm_insecure_registries: Vec<String>,
}

/// Istio's agent keeps Wasm modules here (`ISTIO_DATA_DIR`).
const DEFAULT_WASM_CACHE_DIR: &str = "/var/lib/istio/data";

impl WasmArgs {
    fn cache_options(&self, env: &BTreeMap<String, String>) -> anyhow::Result<CacheOptions> {
        let mut options = CacheOptions::new(self.wasm_cache_dir.clone())
            .with_env(env)
            .map_err(anyhow::Error::msg)?;
        options
            .insecure_registries
            .extend(self.wasm_insecure_registries.iter().cloned());
        Ok(options)
    }
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
            run_dir,
            sds_socket,
            key_algorithm,
            interface,
            envoy,
            no_envoy,
            filter_wasm,
            no_traffic_health,
            wasm,
            envoy_admin_port,
            envoy_status_port,
            envoy_prometheus_port,
            status_listen,
            dns_listen,
            dns,
            cluster_domain,
            dns_upstreams,
            dns_forward_parallel,
            dns_forward_timeout,
        } => {
            let mut config = Config::load(&paths, &env)?;
            // Flags win over the environment and the onboarding files.
            if let Some(domain) = cluster_domain {
                config.cluster_domain = domain;
            }
            if let Some(parallel) = dns_forward_parallel {
                config.dns_forward_parallel = parallel;
            }
            if let Some(timeout) = dns_forward_timeout {
                config.dns_forward_timeout = timeout;
            }
            let options = AgentOptions {
                state_dir,
                run_dir,
                sds_socket,
                key_algorithm,
                interface,
                envoy: (!no_envoy).then_some(envoy),
                admin_port: envoy_admin_port,
                status_port: envoy_status_port,
                prometheus_port: envoy_prometheus_port,
                status_address: status_listen,
                dns_listen,
                force_dns: dns,
                dns_upstreams,
                filter_wasm,
                traffic_health: !no_traffic_health,
                wasm_cache: wasm.cache_options(&env)?,
            };
            tracing::info!(identity = %config.spiffe_id(), "starting");
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(agent::run(config, &env, options, termination()))?;
        }
        Command::PullWasm {
            url,
            sha256,
            always,
            wasm,
            format,
        } => {
            let checksum = sha256
                .map(|d| Sha256::parse(&d).map_err(anyhow::Error::msg))
                .transpose()
                .context("--sha256")?;
            let cache = WasmCache::new(wasm.cache_options(&env)?);
            let request = ModuleRequest {
                url: url.clone(),
                checksum,
                pull_policy: if always {
                    PullPolicy::Always
                } else {
                    PullPolicy::Unspecified
                },
                ..Default::default()
            };
            let module = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(cache.get(&request))?;
            #[derive(serde::Serialize)]
            struct Pulled {
                url: String,
                digest: String,
                path: PathBuf,
                bytes: u64,
                from_cache: bool,
            }
            let pulled = Pulled {
                url,
                digest: module.digest.to_string(),
                bytes: std::fs::metadata(&module.path)
                    .map(|m| m.len())
                    .unwrap_or(0),
                path: module.path,
                from_cache: !module.fetched,
            };
            let text = match format {
                Format::Yaml => serde_norway::to_string(&pulled)?,
                Format::Json => serde_json::to_string_pretty(&pulled)? + "\n",
            };
            std::io::stdout()
                .write_all(text.as_bytes())
                .context("writing to stdout")?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["meshvm-agent", "run"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| cli.command)
    }

    #[test]
    fn onboarding_dir_also_after_run() {
        // The systemd unit passes every flag after `run` ($MESHVM_ARGS).
        for argv in [
            &["meshvm-agent", "--onboarding-dir", "vm", "run"][..],
            &["meshvm-agent", "run", "--onboarding-dir", "vm"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            assert_eq!(cli.onboarding_dir, Some(PathBuf::from("vm")), "{argv:?}");
        }
    }

    #[test]
    fn version() {
        let e = Cli::try_parse_from(["meshvm-agent", "--version"])
            .err()
            .expect("--version exits");
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayVersion);
        assert_eq!(
            e.to_string(),
            format!("meshvm-agent {}\n", env!("CARGO_PKG_VERSION"))
        );
    }

    #[test]
    fn dns_flags() {
        let Ok(Command::Run {
            dns_upstreams,
            dns_forward_parallel,
            dns_forward_timeout,
            cluster_domain,
            ..
        }) = run_args(&[])
        else {
            panic!("run without flags");
        };
        assert!(dns_upstreams.is_empty());
        assert_eq!(
            (dns_forward_parallel, dns_forward_timeout, cluster_domain),
            (None, None, None)
        );
        let Ok(Command::Run {
            dns_upstreams,
            dns_forward_parallel,
            dns_forward_timeout,
            cluster_domain,
            ..
        }) = run_args(&[
            "--dns-upstream",
            "10.0.0.2",
            "--dns-forward-parallel",
            "--dns-upstream",
            "[fd00::2]:5353",
            "--dns-forward-timeout",
            "1500ms",
            "--cluster-domain",
            "corp.example",
        ])
        else {
            panic!("run with DNS flags");
        };
        assert_eq!(
            dns_upstreams,
            [
                "10.0.0.2:53".parse().unwrap(),
                "[fd00::2]:5353".parse().unwrap()
            ]
        );
        assert_eq!(dns_forward_parallel, Some(true));
        assert_eq!(
            dns_forward_timeout,
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(cluster_domain.as_deref(), Some("corp.example"));
        let Ok(Command::Run {
            dns_forward_parallel,
            ..
        }) = run_args(&["--dns-forward-parallel=false"])
        else {
            panic!("--dns-forward-parallel=false");
        };
        assert_eq!(dns_forward_parallel, Some(false));
        for bad in [
            &["--dns-forward-timeout", "0s"][..],
            &["--dns-upstream", "dns.example"],
            &["--cluster-domain", "Corp"],
            &["--dns-forward-parallel=maybe"],
        ] {
            assert!(run_args(bad).is_err(), "{bad:?}");
        }
    }
}
