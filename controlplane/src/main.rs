//! `meshvm-controlplane`: the local stand-in for istiod used by meshvm's tests and demo.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use meshvm_controlplane::ca::server::ServeOptions;
use meshvm_controlplane::ca::{CertTtlPolicy, MeshCa};
use meshvm_controlplane::config::watcher::DEFAULT_POLL_INTERVAL;
use meshvm_controlplane::config::{ConfigSnapshot, ConfigWatcher};
use meshvm_controlplane::echo::EchoApp;
use meshvm_controlplane::get::{self, GetRequest, OutputFormat, Scope};
use meshvm_controlplane::onboard::{self, OnboardOptions};
use meshvm_controlplane::registry::{Registry, RegistryOptions};
use meshvm_controlplane::run_pod::{self, RunPodOptions, RunningPod};
use meshvm_controlplane::server;
use meshvm_controlplane::xds::XdsServer;
use meshvm_controlplane::xds::envoy::{EnvoyOptions, FilterSource};

#[derive(Parser)]
#[command(name = "meshvm-controlplane", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct CaArgs {
    /// Directory of the mesh CA (root, keys); created with a new root if
    /// empty. Default: $XDG_STATE_HOME/meshvm/ca (~/.local/state/meshvm/ca).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Trust domain of a new CA; an existing CA must have it.
    #[arg(long)]
    trust_domain: Option<String>,
}

impl CaArgs {
    fn load(&self) -> anyhow::Result<MeshCa> {
        let dir = match &self.ca_dir {
            Some(dir) => dir.clone(),
            None => default_ca_dir()?,
        };
        MeshCa::load_or_create(&dir, self.trust_domain.as_deref())
            .with_context(|| format!("loading the mesh CA from {}", dir.display()))
    }
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
    /// Write a VM's onboarding files for a WorkloadGroup, as
    /// `istioctl x workload entry configure` does.
    Onboard {
        /// The WorkloadGroup manifest.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Output directory (created if missing).
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        #[command(flatten)]
        ca: CaArgs,
        /// The cluster's id (ISTIO_META_CLUSTER_ID, the `ClusterID` header).
        #[arg(long, default_value = onboard::DEFAULT_CLUSTER_ID)]
        cluster_id: String,
        /// The mesh id (mesh.yaml meshId, ISTIO_META_MESH_ID).
        #[arg(long)]
        mesh_id: Option<String>,
        /// Lifetime of the bootstrap token: seconds, or with s/m/h.
        #[arg(long, default_value = "3600s", value_parser = parse_duration)]
        token_duration: Duration,
        /// mesh.yaml discoveryAddress [default: istiod[-REV].istio-system.svc:15012].
        #[arg(long)]
        discovery_address: Option<String>,
        /// A revisioned control plane (istiod-REV): CA_ADDR and the hosts name.
        #[arg(long)]
        revision: Option<String>,
        /// The gateway address istiod is reached at (the `hosts` file).
        #[arg(long)]
        ingress_ip: Option<IpAddr>,
        /// The VM's address (ISTIO_SVC_IP).
        #[arg(long, conflicts_with = "external_ip")]
        internal_ip: Option<IpAddr>,
        /// The VM's address seen from outside (ISTIO_SVC_IP; probes go to localhost).
        #[arg(long)]
        external_ip: Option<IpAddr>,
        /// Let the control plane create the VM's WorkloadEntry when it connects.
        #[arg(long)]
        autoregister: bool,
        /// Capture the VM's DNS (ISTIO_META_DNS_CAPTURE).
        #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
              action = clap::ArgAction::Set)]
        capture_dns: bool,
    },
    /// Print WorkloadEntries as `kubectl get workloadentries` does: the ones
    /// the control plane registered (--state-dir) and the config
    /// directory's.
    Get {
        /// The resource: workloadentries (workloadentry, we).
        resource: String,
        /// Entries to print by name [default: all in the namespace].
        names: Vec<String>,
        /// The namespace.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// List entries in all namespaces.
        #[arg(short = 'A', long, conflicts_with = "namespace")]
        all_namespaces: bool,
        /// Output format: yaml, json or wide [default: a table].
        #[arg(short = 'o', long)]
        output: Option<OutputFormat>,
        /// The control plane's state directory [default:
        /// $XDG_STATE_HOME/meshvm/controlplane].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The control plane's config directory.
        #[arg(long)]
        config_dir: Option<PathBuf>,
    },
    /// Serve the CA (istio.v1.auth.IstioCertificateService) and ADS (VM
    /// registration, the NameTable) over TLS, as istiod on port 15012.
    Serve {
        /// Kubernetes-style manifests (WorkloadGroup, WorkloadEntry, Service,
        /// Pod), reloaded on change.
        #[arg(long, value_name = "DIR")]
        config_dir: Option<PathBuf>,
        /// Where auto-registered WorkloadEntries are kept [default:
        /// $XDG_STATE_HOME/meshvm/controlplane].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// How long a disconnected VM's WorkloadEntry is kept for it to
        /// reconnect (PILOT_WORKLOAD_ENTRY_GRACE_PERIOD).
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        grace_period: Duration,
        #[command(flatten)]
        ca: CaArgs,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:15012")]
        listen: SocketAddr,
        /// This cluster's id: `clusterid` headers must name it (or be empty).
        #[arg(long, default_value = onboard::DEFAULT_CLUSTER_ID)]
        cluster_id: String,
        /// More DNS names for the serving certificate (e.g. istiod-canary.istio-system.svc).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        /// Workload certificate lifetime when a request asks for none
        /// (istiod's DEFAULT_WORKLOAD_CERT_TTL): seconds, or with s/m/h.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        default_cert_ttl: Duration,
        /// Longest workload certificate lifetime; longer requests are refused
        /// (istiod's MAX_WORKLOAD_CERT_TTL).
        #[arg(long, default_value = "2160h", value_parser = parse_duration)]
        max_cert_ttl: Duration,
        /// The meshvm filter for the proxies' inbound and outbound HTTP
        /// listeners: a path on the proxies' hosts (inline in the
        /// listeners), or an image / http(s) URL (`oci://REGISTRY/REPO:TAG`,
        /// `…@sha256:…`) sent over ECDS as istiod sends a WasmPlugin, for
        /// the proxies' agents to fetch. Without it, plain mTLS.
        #[arg(long, value_name = "FILE|URL")]
        filter_wasm: Option<String>,
        /// With an image URL: the digest the agents must verify (a
        /// WasmPlugin's `sha256`, the image's manifest digest).
        #[arg(long, value_name = "DIGEST", requires = "filter_wasm")]
        filter_sha256: Option<String>,
        /// With an image URL: `IfNotPresent` or `Always` (a WasmPlugin's
        /// `imagePullPolicy`; default: IfNotPresent, Always for `:latest`).
        #[arg(long, value_name = "POLICY", requires = "filter_wasm", value_parser = ["IfNotPresent", "Always"])]
        filter_pull_policy: Option<String>,
    },
    /// Plays a Pod of the config directory on this host: its onboarding
    /// files, its app (the echo app on each container port) and its sidecar
    /// (`meshvm-agent run` with Envoy), until SIGTERM or SIGINT.
    RunPod {
        /// The Pod's name.
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// The control plane's config directory (where the Pod is defined).
        #[arg(long)]
        config_dir: PathBuf,
        #[command(flatten)]
        ca: CaArgs,
        /// The control plane's CA and xDS address (`host:port`).
        #[arg(long)]
        discovery_address: String,
        /// Where the Pod's files go (onboarding, certificates, Envoy's).
        #[arg(long)]
        work_dir: PathBuf,
        /// Where the Pod's app listens; its Envoy forwards inbound requests
        /// there.
        #[arg(long, default_value = "127.0.0.1")]
        app_address: IpAddr,
        /// The loopback block for the Pod's outbound listeners (e.g.
        /// 127.11.0.0/16), so it does not share the VM's.
        #[arg(long)]
        outbound_addresses: Option<String>,
        /// The `meshvm-agent` binary (default: next to this one, else PATH).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Arguments for `meshvm-agent run`, after `--` (ports, `--envoy`).
        #[arg(last = true)]
        agent_args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::RunPod {
            name,
            namespace,
            config_dir,
            ca,
            discovery_address,
            work_dir,
            app_address,
            outbound_addresses,
            agent,
            agent_args,
        } => {
            let ca = ca.load()?;
            let options = RunPodOptions {
                name,
                namespace,
                config_dir,
                work_dir,
                discovery_address,
                app_address,
                outbound_addresses,
                agent: agent.unwrap_or_else(run_pod::default_agent),
                agent_args,
            };
            let mut pod = RunningPod::start(&ca, &options)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let exited = runtime.block_on(async {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                let stop = termination();
                tokio::pin!(stop);
                loop {
                    tokio::select! {
                        () = &mut stop => return None,
                        _ = tick.tick() => {
                            if let Ok(Some(status)) = pod.try_wait() {
                                return Some(status);
                            }
                        }
                    }
                }
            });
            match exited {
                Some(status) => anyhow::bail!("the Pod's agent exited: {status}"),
                None => {
                    let status = pod.stop().context("stopping the Pod's agent")?;
                    tracing::info!(%status, "Pod stopped");
                    Ok(())
                }
            }
        }
        Command::Echo { listen, name } => {
            let app = EchoApp::spawn(&listen, &name).context("starting the echo app")?;
            tracing::info!(addr = %app.addr(), %name, "echo app listening");
            loop {
                std::thread::park();
            }
        }
        Command::Onboard {
            file,
            output,
            ca,
            cluster_id,
            mesh_id,
            token_duration,
            discovery_address,
            revision,
            ingress_ip,
            internal_ip,
            external_ip,
            autoregister,
            capture_dns,
        } => {
            let ca = ca.load()?;
            let wg = onboard::read_workload_group(&file)?;
            let options = OnboardOptions {
                cluster_id,
                mesh_id,
                discovery_address,
                revision,
                ingress_ip,
                internal_ip,
                external_ip,
                token_duration,
                autoregister,
                capture_dns,
            };
            let files = onboard::render(&wg, &options, &ca)?;
            files.write_to(&output)?;
            tracing::warn!(
                namespace = wg.namespace(),
                service_account = wg.service_account(),
                path = %output.join(onboard::TOKEN_FILE).display(),
                "a security token has been generated and stored"
            );
            println!(
                "Configuration generation into directory {} was successful",
                output.display()
            );
            Ok(())
        }
        Command::Get {
            resource,
            names,
            namespace,
            all_namespaces,
            output,
            state_dir,
            config_dir,
        } => {
            let request = GetRequest {
                resource,
                names,
                scope: if all_namespaces {
                    Scope::AllNamespaces
                } else {
                    Scope::Namespace(namespace)
                },
                format: output.unwrap_or_default(),
                state_dir: match state_dir {
                    Some(dir) => dir,
                    None => default_state_dir()?.join("controlplane"),
                },
                config_dir,
            };
            let printed = get::get(&request, std::time::SystemTime::now())?;
            print!("{}", printed.stdout);
            eprint!("{}", printed.stderr);
            if !printed.success {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Serve {
            config_dir,
            state_dir,
            grace_period,
            ca,
            listen,
            cluster_id,
            dns_names,
            default_cert_ttl,
            max_cert_ttl,
            filter_wasm,
            filter_sha256,
            filter_pull_policy,
        } => {
            let envoy_options = EnvoyOptions {
                filter: filter_wasm
                    .map(|f| filter_source(f, filter_sha256, filter_pull_policy))
                    .transpose()?,
            };
            anyhow::ensure!(
                default_cert_ttl <= max_cert_ttl,
                "--default-cert-ttl must not exceed --max-cert-ttl"
            );
            let policy = CertTtlPolicy {
                default: default_cert_ttl,
                max: max_cert_ttl,
            };
            let ca = Arc::new(ca.load()?.with_ttl_policy(policy));
            let state_dir = match state_dir {
                Some(dir) => dir,
                None => default_state_dir()?.join("controlplane"),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(async move {
                // The config directory, watched; without one, an empty mesh.
                let (watcher, config) = match &config_dir {
                    Some(dir) => {
                        let watcher = ConfigWatcher::start(dir, DEFAULT_POLL_INTERVAL)
                            .with_context(|| {
                                format!("reading the config directory {}", dir.display())
                            })?;
                        let config = watcher.subscribe();
                        (Some(watcher), config)
                    }
                    None => {
                        tracing::warn!("no --config-dir: no WorkloadGroups, VMs cannot register");
                        (
                            None,
                            tokio::sync::watch::channel(Arc::new(ConfigSnapshot::default())).1,
                        )
                    }
                };
                let options = RegistryOptions {
                    grace_period,
                    ..RegistryOptions::default()
                };
                let registry = Arc::new(
                    Registry::open(&state_dir, config.clone(), options).with_context(|| {
                        format!("opening the state directory {}", state_dir.display())
                    })?,
                );
                let xds = XdsServer::new(ca.clone(), registry.clone(), config, envoy_options);
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                let options = ServeOptions {
                    cluster_id,
                    extra_dns_names: dns_names,
                };
                server::serve(ca, Some(xds), listener, options, termination()).await?;
                tracing::info!("shutting down");
                drop(watcher);
                Ok(())
            })
        }
    }
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

/// `$XDG_STATE_HOME/meshvm`, else `~/.local/state/meshvm`.
fn default_state_dir() -> anyhow::Result<PathBuf> {
    let state = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME").context("HOME is not set; pass --state-dir/--ca-dir")?,
        )
        .join(".local/state"),
    };
    Ok(state.join("meshvm"))
}

fn default_ca_dir() -> anyhow::Result<PathBuf> {
    Ok(default_state_dir()?.join("ca"))
}

/// `3600`, `3600s`, `60m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 3600s, 60m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("`{text}`: the unit is s, m or h")),
    };
    if secs == 0 {
        return Err("the duration must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

/// `--filter-wasm`: a URL is sent as is (the agents fetch it; the digest,
/// when given, must be one); a file must be a WebAssembly module.
fn filter_source(
    filter: String,
    sha256: Option<String>,
    pull_policy: Option<String>,
) -> anyhow::Result<FilterSource> {
    let is_url = ["oci://", "http://", "https://"]
        .iter()
        .any(|s| filter.starts_with(s));
    if is_url {
        if let Some(digest) = &sha256 {
            let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
            anyhow::ensure!(
                hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                "--filter-sha256 {digest}: not a SHA-256 digest (64 hex digits)"
            );
        }
        return Ok(FilterSource::Remote {
            url: filter,
            sha256,
            pull_policy,
        });
    }
    anyhow::ensure!(
        sha256.is_none() && pull_policy.is_none(),
        "--filter-sha256 and --filter-pull-policy are for an image URL, not a file"
    );
    let path = PathBuf::from(&filter);
    let magic = std::fs::read(&path).with_context(|| format!("--filter-wasm {filter}"))?;
    anyhow::ensure!(
        magic.starts_with(b"\0asm"),
        "--filter-wasm {filter}: not a WebAssembly module (no \\0asm magic)"
    );
    Ok(FilterSource::File(
        std::path::absolute(&path).unwrap_or(path),
    ))
}
