//! `meshvm-agent run`: everything the agent does on a VM, started in order
//! and stopped in reverse.
//!
//! 1. The identity manager obtains and renews the workload certificate.
//! 2. The SDS server hands it to Envoy; the xDS proxy dials the control
//!    plane with it and carries Envoy's ADS stream.
//! 3. The DNS proxy answers the mesh's names from the xDS proxy's
//!    NameTable (when `ISTIO_META_DNS_CAPTURE` is on, or forced).
//! 4. Envoy's bootstrap is written and Envoy is started and supervised
//!    (unless Envoy is run by someone else).
//! 5. The readiness probe (`tcpSocket`, `exec`, `grpc`) runs, and with what
//!    is posted to `/v1/health` makes the health the xDS proxy reports.
//!
//! On shutdown Envoy drains and stops first, then the servers close and
//! their sockets are removed.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::ca_client::{CaClient, CaClientOptions};
use crate::config::Config;
use crate::dns::{DnsOptions, DnsServer};
use crate::envoy::{Bootstrap, BootstrapOptions, HealthService, Supervisor, SupervisorOptions};
use crate::health::Health;
use crate::health::probe::{self, Checker, Schedule};
use crate::identity::{CertStore, KeyAlgorithm};
use crate::identity_manager::{IdentityManager, IdentityOptions};
use crate::sds::{SdsServer, WorkloadSecret};
use crate::status::{self, StatusSources};
use crate::wasm::{CacheOptions, ModuleRequest, WasmCache, WasmRewriter};
use crate::xds::{XdsProxy, XdsProxyOptions};

/// Where things are and what to run.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Key, chain and root (Istio: `/etc/certs`).
    pub state_dir: PathBuf,
    /// Bootstrap and the xDS socket (Istio: `/etc/istio/proxy`).
    pub run_dir: PathBuf,
    /// The SDS socket.
    pub sds_socket: PathBuf,
    pub key_algorithm: KeyAlgorithm,
    /// The network interface whose address is the VM's mesh address.
    pub interface: Option<String>,
    /// Start and supervise this Envoy binary; `None`: Envoy is run by
    /// someone else (it must use the bootstrap the agent writes).
    pub envoy: Option<PathBuf>,
    /// Envoy's admin, status (`/healthz/ready`) and Prometheus ports
    /// (0: any free port, for several agents on one host).
    pub admin_port: u16,
    pub status_port: u16,
    pub prometheus_port: u16,
    /// The agent's status server (`/healthz/ready`, `/metrics`), which
    /// Envoy's status listener forwards to (port 0: any free port).
    pub status_address: std::net::SocketAddr,
    /// The DNS proxy's UDP and TCP address (Istio: `127.0.0.1:15053`).
    pub dns_listen: SocketAddr,
    /// Run the DNS proxy even without `ISTIO_META_DNS_CAPTURE` (Istio's
    /// `ISTIO_META_ENABLE_DNS_SERVER`).
    pub force_dns: bool,
    /// The DNS proxy's upstream nameservers (empty: those of resolv.conf).
    pub dns_upstreams: Vec<SocketAddr>,
    /// The meshvm filter, for the health singleton in Envoy (`httpGet`
    /// probes): a local file, or an `oci://` / `http(s)://` URL fetched
    /// through the Wasm cache.
    pub filter_wasm: Option<String>,
    /// Where and how Wasm modules are fetched and kept (the filter above,
    /// and every Wasm filter the control plane sends with remote code).
    pub wasm_cache: CacheOptions,
    /// With the filter: health from real inbound traffic too.
    pub traffic_health: bool,
}

/// Where the app listens: node metadata `MESHVM_APP_ADDRESS` (as the
/// control plane reads it for the inbound clusters), else 127.0.0.1.
fn app_address(env: &BTreeMap<String, String>) -> IpAddr {
    env.get("ISTIO_META_MESHVM_APP_ADDRESS")
        .and_then(|a| a.parse().ok())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    config: Config,
    env: &BTreeMap<String, String>,
    options: AgentOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // 1. Identity.
    let mut identity_options =
        IdentityOptions::from_config(&config, CertStore::new(&options.state_dir));
    identity_options.key_algorithm = options.key_algorithm;
    let client = CaClient::new(CaClientOptions::from_config(&config))?;
    let manager = IdentityManager::start(client, identity_options);

    // 2. SDS and xDS.
    let mut identities = manager.subscribe();
    let (secrets, secrets_rx) = watch::channel(None);
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
    let (stop_servers, servers_stopped) = watch::channel(false);
    let stopped = |rx: &watch::Receiver<bool>| {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let sds = SdsServer::bind(&options.sds_socket, secrets_rx)
        .with_context(|| format!("binding the SDS socket {}", options.sds_socket.display()))?;
    let sds_task = tokio::spawn(sds.serve_with_shutdown(stopped(&servers_stopped)));
    let dns_on = config.dns_capture || options.force_dns;
    let wasm_cache = Arc::new(WasmCache::new(options.wasm_cache.clone()));
    let purge_task = tokio::spawn(wasm_cache.clone().run_purge());
    let mut xds_options = XdsProxyOptions::from_config(&config);
    xds_options.name_table = dns_on;
    xds_options.wasm = Some(Arc::new(WasmRewriter::new(wasm_cache.clone())));
    let proxy = XdsProxy::new(xds_options, manager.subscribe());
    let xds_socket = options
        .run_dir
        .join(crate::envoy::bootstrap::XDS_SOCKET_FILE);
    let xds_task = {
        let proxy = proxy.clone();
        let socket = xds_socket.clone();
        let stop = stopped(&servers_stopped);
        tokio::spawn(async move { proxy.serve(&socket, stop).await })
    };

    // The status server's address goes into Envoy's bootstrap.
    let status_listener = tokio::net::TcpListener::bind(options.status_address)
        .await
        .with_context(|| format!("binding the status server on {}", options.status_address))?;
    let status_address = status_listener.local_addr()?;

    // 3. DNS.
    let mut dns_metrics = None;
    let dns_task = if dns_on {
        let mut dns = DnsOptions::new(config.namespace.clone());
        dns.domain = config.cluster_domain.clone();
        dns.upstreams = options.dns_upstreams.clone();
        dns.forward_parallel = config.dns_forward_parallel;
        dns.forward_timeout = config.dns_forward_timeout;
        dns.listen = options.dns_listen;
        dns.saved_table = Some(options.state_dir.join(crate::dns::SAVED_TABLE_FILE));
        // Without DNS the VM still has its identity and its mesh traffic:
        // a port already taken is an error in the log, not the end of the
        // agent.
        match DnsServer::bind(dns, proxy.name_tables()).await {
            Ok(server) => {
                dns_metrics = Some(server.metrics());
                Some(tokio::spawn(server.serve(stopped(&servers_stopped))))
            }
            Err(error) => {
                tracing::error!(%error, "DNS proxy not started; mesh names will not resolve");
                None
            }
        }
    } else {
        None
    };

    // 4. Envoy.
    let mut bootstrap =
        BootstrapOptions::for_host(&config, env, &options.run_dir, options.interface.as_deref())?;
    bootstrap.sds_socket = options.sds_socket.clone();
    bootstrap.xds_socket = xds_socket;
    bootstrap.admin.set_port(options.admin_port);
    bootstrap.status_port = options.status_port;
    bootstrap.prometheus_port = options.prometheus_port;
    bootstrap.agent = status_address;
    if let Some(filter) = &options.filter_wasm {
        let wasm = filter_module(&wasm_cache, filter).await?;
        bootstrap.health_service = Some(HealthService {
            wasm,
            app_address: app_address(env),
            traffic: options.traffic_health,
        });
    }
    let path = Bootstrap::write(&config, &bootstrap)?;
    tracing::info!(
        path = %path.display(),
        address = %bootstrap.addresses.primary,
        xds = bootstrap.xds_api.api_type(),
        "wrote Envoy's bootstrap"
    );
    let supervisor = options.envoy.as_ref().map(|binary| {
        let mut envoy = SupervisorOptions::for_bootstrap(&bootstrap);
        envoy.binary = binary.clone();
        Supervisor::start(envoy)
    });

    // 5. Health.
    let health = {
        let proxy = proxy.clone();
        Arc::new(Health::new(move |report| proxy.report_health(report)))
    };
    let probe_task = start_probe(&config, &health);

    let sources = StatusSources {
        identity: manager.subscribe(),
        xds: proxy.status(),
        name_table: proxy.name_tables(),
        envoy: supervisor.as_ref().map(Supervisor::subscribe),
        dns: config.dns_capture,
        dns_metrics,
        health,
    };
    let status_task = tokio::spawn(status::serve(
        status_listener,
        sources,
        stopped(&servers_stopped),
    ));
    tracing::info!(
        %status_address,
        "status server: /healthz/ready, /metrics, POST /v1/health"
    );

    tracing::info!(identity = %config.spiffe_id(), "running");
    shutdown.await;
    tracing::info!("shutting down");
    if let Some(task) = probe_task {
        task.abort();
    }
    if let Some(supervisor) = supervisor {
        supervisor.shutdown().await;
    }
    let _ = stop_servers.send(true);
    let _ = sds_task.await;
    let _ = xds_task.await;
    let _ = status_task.await;
    if let Some(dns_task) = dns_task {
        let _ = dns_task.await;
    }
    bridge.abort();
    purge_task.abort();
    manager.stop().await;
    Ok(())
}

/// The filter's local file: `filter` itself, or the module it names
/// (`oci://…`, `http(s)://…`) from the cache, fetched if need be.
async fn filter_module(cache: &WasmCache, filter: &str) -> anyhow::Result<PathBuf> {
    if !crate::wasm::is_url(filter) {
        let path = PathBuf::from(filter);
        return Ok(std::path::absolute(&path).unwrap_or(path));
    }
    let module = cache
        .get(&ModuleRequest {
            url: filter.to_string(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("--filter-wasm {filter}"))?;
    tracing::info!(
        url = filter,
        digest = %module.digest,
        path = %module.path.display(),
        cached = !module.fetched,
        "the meshvm filter"
    );
    Ok(module.path)
}

/// Runs the WorkloadGroup's probe if the agent can: `httpGet` is run by the
/// filter inside Envoy, which posts the results to `/v1/health`.
fn start_probe(config: &Config, health: &Arc<Health>) -> Option<tokio::task::JoinHandle<()>> {
    let readiness = config.readiness_probe.as_ref()?;
    let Some(checker) = Checker::for_method(&readiness.method) else {
        tracing::info!("readiness probe httpGet: run by the filter, which posts to /v1/health");
        return None;
    };
    let schedule = Schedule::from_probe(readiness);
    tracing::info!(
        probe = ?readiness.method,
        period = ?schedule.period,
        timeout = ?schedule.timeout,
        initial_delay = ?schedule.initial_delay,
        success_threshold = schedule.success_threshold,
        failure_threshold = schedule.failure_threshold,
        "readiness probe: running"
    );
    Some(tokio::spawn(probe::run(checker, schedule, health.clone())))
}
