//! Envoy's bootstrap, built as Istio's agent builds it for a VM (template
//! istio/istio: tools/packaging/common/envoy_bootstrap.json, rendered by
//! pkg/bootstrap/config.go), so that istiod, and the stand-in control plane,
//! see the same node as from a stock `pilot-agent`.
//!
//! - `node.id`: `sidecar~<first INSTANCE_IP>~<POD_NAME>.<ns>~<ns>.svc.<cluster domain>`
//!   (`cluster.local` unless configured; never the trust domain).
//! - `node.cluster`: the service cluster (`ISTIO_SERVICE`), or `<app>.<ns>`,
//!   `<workload>.<ns>`, `istio-proxy.<ns>` when it is `istio-proxy`.
//! - `node.locality`: from the `topology.istio.io/locality` (or
//!   `istio-locality`) label, `.` read as `/`.
//! - `node.metadata`: the keys and JSON types istiod decodes (reference §2.2):
//!   every `ISTIO_META_*` variable as a string, then the agent's own keys
//!   (`NAMESPACE`, `SERVICE_ACCOUNT`, `NAME`, `INSTANCE_IPS`, `LABELS`,
//!   `STATIC_LABELS`, `PROXY_CONFIG`, `ISTIO_VERSION`, `PILOT_SAN`,
//!   `ENVOY_STATUS_PORT`, `ENVOY_PROMETHEUS_PORT`, `METADATA_DISCOVERY`).
//!   istiod rejects the whole connection when a key has the wrong JSON type,
//!   so values of typed keys are normalised (`"True"` → `"true"`) and
//!   [`check_metadata`] refuses what Istio's agent would refuse.
//! - ADS over the agent's XDS socket (`DELTA_GRPC` unless `ISTIO_DELTA_XDS`
//!   is false), SDS over the agent's SDS socket, the `agent` cluster (the
//!   agent's status and health-report server) and `prometheus_stats` (the
//!   admin API), and the static listeners 15090 (`/stats/prometheus`) and
//!   15021 (`/healthz/ready`, answered by the agent).
//!
//! Left out on purpose: Istio's stats tags and inclusion list (they name
//! istio-proxy's telemetry filters, which a stock Envoy does not have),
//! tracing and metrics-service sinks, the secure metrics listeners, and
//! `application_log_config` (the supervisor passes `--log-format`, and Envoy
//! refuses both at once).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::address::{AddressError, INTERFACE_ENV, ProxyAddresses, short_hostname};
use crate::config::Config;
use crate::identity::{StoreError, write_atomic};
use crate::sds;

/// The bootstrap's file name in the run directory (Istio's name).
pub const BOOTSTRAP_FILE: &str = "envoy-rev.json";
/// The XDS socket's file name in the run directory (Istio's name).
pub const XDS_SOCKET_FILE: &str = "XDS";
/// Where Istio's VM agent keeps the bootstrap and the XDS socket
/// (`ProxyConfig.configPath`, `./etc/istio/proxy` with the agent in `/`).
pub const ISTIO_CONFIG_DIR: &str = "/etc/istio/proxy";

/// The Istio version the node claims (`ISTIO_VERSION`), unless
/// `ISTIO_META_ISTIO_VERSION` says otherwise. istiod gates generated
/// configuration on it: ≥ 1.24 selects the peer-metadata keys the filter
/// reads and writes; 1.28 enables upstream-Envoy features (Zipkin trace
/// context options) that Envoy 1.40 has; ≥ 1.29.2 would make istiod
/// reference `istio.hashable_string`, an istio-proxy extension a stock
/// Envoy lacks. istiod supports proxies up to two minor versions behind it,
/// so 1.28 pairs with istiod 1.28–1.30, and newer ones treat it as an older
/// proxy rather than an unknown one.
pub const DEFAULT_ISTIO_VERSION: &str = "1.28.0";

/// The Envoy port that forwards `/healthz/ready` to the agent.
pub const ENVOY_STATUS_PORT: u16 = 15021;
/// The Envoy port that serves `/stats/prometheus` from the admin API.
pub const ENVOY_PROMETHEUS_PORT: u16 = 15090;
/// Envoy's admin API (loopback only).
pub const ADMIN_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// The agent's status, metrics and health-report server.
pub const AGENT_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);

/// The ADS flavour Envoy uses on the xDS stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum XdsApi {
    /// Incremental xDS (`DeltaAggregatedResources`): Istio's default.
    #[default]
    Delta,
    /// State of the world (`StreamAggregatedResources`).
    Sotw,
}

impl XdsApi {
    /// From `ISTIO_DELTA_XDS` (Go boolean syntax); unset or empty means delta.
    pub fn from_istio_delta_xds(value: Option<&str>) -> Result<Self, BootstrapError> {
        match value.map(str::trim).filter(|v| !v.is_empty()) {
            None => Ok(Self::Delta),
            Some(v) => match parse_go_bool(v) {
                Some(true) => Ok(Self::Delta),
                Some(false) => Ok(Self::Sotw),
                None => Err(BootstrapError::DeltaXds(v.to_string())),
            },
        }
    }

    /// The `api_type` of Envoy's `ApiConfigSource`.
    pub fn api_type(self) -> &'static str {
        match self {
            Self::Delta => "DELTA_GRPC",
            Self::Sotw => "GRPC",
        }
    }
}

/// What the bootstrap needs besides the onboarding configuration: where
/// things are on this VM, and the ports (tests use port 0).
#[derive(Debug, Clone, PartialEq)]
pub struct BootstrapOptions {
    /// Where [`Bootstrap::write`] puts `envoy-rev.json` (Istio: `/etc/istio/proxy`).
    pub run_dir: PathBuf,
    /// The agent's xDS socket, Envoy's `xds-grpc` cluster.
    pub xds_socket: PathBuf,
    /// The agent's SDS socket, Envoy's `sds-grpc` cluster.
    pub sds_socket: PathBuf,
    /// The VM's addresses (node id and `INSTANCE_IPS`).
    pub addresses: ProxyAddresses,
    /// `POD_NAME` when the configuration has none: the short host name, as
    /// Istio's start script sets it.
    pub hostname: String,
    pub xds_api: XdsApi,
    /// Envoy's admin API; also the `prometheus_stats` cluster.
    pub admin: SocketAddr,
    /// The agent's HTTP server: the `agent` cluster.
    pub agent: SocketAddr,
    /// The meshvm filter as Envoy's health singleton, when the probe is
    /// `httpGet` (the agent runs the other kinds itself).
    pub health_service: Option<HealthService>,
    /// Where the static listeners bind: the wildcard address of the VM's
    /// address family.
    pub listen_ip: IpAddr,
    /// `/healthz/ready` listener port; 0 picks a free port.
    pub status_port: u16,
    /// `/stats/prometheus` listener port; 0 picks a free port.
    pub prometheus_port: u16,
    /// `ISTIO_VERSION`, unless `ISTIO_META_ISTIO_VERSION` is set.
    pub istio_version: String,
    /// Envoy's `--drain-time-s` (`PROXY_CONFIG.drainDuration`).
    pub drain_duration: Duration,
    /// How long the agent lets Envoy drain before stopping it
    /// (`PROXY_CONFIG.terminationDrainDuration`).
    pub termination_drain_duration: Duration,
}

impl BootstrapOptions {
    /// Istio's defaults: the XDS socket in `run_dir`, the SDS socket at
    /// Istio's path, admin on 127.0.0.1:15000, the agent on
    /// 127.0.0.1:15020, listeners 15021 and 15090 on the wildcard address
    /// (`::` when the VM has only IPv6 addresses), delta xDS, drain 45 s,
    /// termination drain 5 s.
    pub fn new(run_dir: impl Into<PathBuf>, addresses: ProxyAddresses, hostname: String) -> Self {
        let run_dir = run_dir.into();
        let listen_ip = if addresses.all_ipv6() {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        Self {
            xds_socket: run_dir.join(XDS_SOCKET_FILE),
            sds_socket: PathBuf::from(sds::DEFAULT_SOCKET_PATH),
            run_dir,
            addresses,
            hostname,
            xds_api: XdsApi::Delta,
            admin: ADMIN_ADDRESS,
            agent: AGENT_ADDRESS,
            health_service: None,
            listen_ip,
            status_port: ENVOY_STATUS_PORT,
            prometheus_port: ENVOY_PROMETHEUS_PORT,
            istio_version: DEFAULT_ISTIO_VERSION.to_string(),
            drain_duration: Duration::from_secs(45),
            termination_drain_duration: Duration::from_secs(5),
        }
    }

    /// [`BootstrapOptions::new`] for this host: its addresses
    /// ([`ProxyAddresses::detect`], with `interface` or else the
    /// [`INTERFACE_ENV`] variable), its short host name, and
    /// `ISTIO_DELTA_XDS` from `env` (the process environment) or the
    /// onboarding files.
    pub fn for_host(
        config: &Config,
        env: &BTreeMap<String, String>,
        run_dir: impl Into<PathBuf>,
        interface: Option<&str>,
    ) -> Result<Self, BootstrapError> {
        let interface = interface
            .or_else(|| env.get(INTERFACE_ENV).map(String::as_str))
            .filter(|name| !name.is_empty());
        let addresses = ProxyAddresses::detect(config, interface)?;
        let hostname = short_hostname().map_err(BootstrapError::Hostname)?;
        let delta = env
            .get("ISTIO_DELTA_XDS")
            .or_else(|| config.environment.get("ISTIO_DELTA_XDS"));
        let mut options = Self::new(run_dir, addresses, hostname);
        options.xds_api = XdsApi::from_istio_delta_xds(delta.map(String::as_str))?;
        Ok(options)
    }

    /// `<run_dir>/envoy-rev.json`.
    pub fn bootstrap_path(&self) -> PathBuf {
        self.run_dir.join(BOOTSTRAP_FILE)
    }
}

/// Why the bootstrap could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// An `ISTIO_META_*` value that istiod (or Istio's agent) would refuse.
    #[error("ISTIO_META_{key}: {problem}")]
    Metadata { key: String, problem: String },
    /// The VM's address could not be chosen.
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The host name (the default `POD_NAME`) could not be read.
    #[error("reading the host name: {0}")]
    Hostname(#[source] std::io::Error),
    /// `ISTIO_DELTA_XDS` is not a boolean.
    #[error("ISTIO_DELTA_XDS: `{0}` is not true or false")]
    DeltaXds(String),
    /// A socket path longer than a Unix socket address holds.
    #[error(
        "{}: a Unix socket path has at most {max} bytes, this one has {len}; \
         choose a shorter run directory",
        path.display(),
        max = MAX_SOCKET_PATH
    )]
    SocketPath { path: PathBuf, len: usize },
    /// The run directory could not be created.
    #[error("cannot create {}: {error}", path.display())]
    RunDir {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file could not be written.
    #[error(transparent)]
    Write(#[from] StoreError),
}

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Go's `strconv.ParseBool`, which Istio uses for every boolean setting.
fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// How istiod decodes a node metadata key (istio/istio: pkg/model/proxy.go
/// `NodeMetadata`, `BootstrapNodeMetadata`).
enum Kind {
    /// A string: passed through.
    Text,
    /// A string the agent sets itself (an `ISTIO_META_` copy is ignored, as
    /// Istio's agent overwrites it too).
    AgentText,
    /// `StringBool`: `"true"` or `"false"`.
    Flag,
    /// A string holding a JSON array of ports.
    PodPorts,
    /// Not a string: an `ISTIO_META_` variable cannot set it.
    NotText(&'static str),
}

fn kind(key: &str) -> Kind {
    match key {
        "NAME" | "NAMESPACE" | "SERVICE_ACCOUNT" | "INSTANCE_IPS" => Kind::AgentText,
        "LABELS" | "STATIC_LABELS" | "ANNOTATIONS" | "PLATFORM_METADATA" | "PROXY_CONFIG" => {
            Kind::NotText("an object")
        }
        "ENVOY_STATUS_PORT"
        | "ENVOY_PROMETHEUS_PORT"
        | "ENVOY_SECURE_METRICS_PORT"
        | "ENVOY_SECURE_MERGED_METRICS_PORT" => Kind::NotText("a number"),
        "PILOT_SAN" => Kind::NotText("a list"),
        "ENABLE_SELF_DISCOVERY"
        | "DNS_CAPTURE"
        | "DNS_AUTO_ALLOCATE"
        | "ENABLE_HBONE"
        | "DISABLE_HBONE_SEND"
        | "EXIT_ON_ZERO_ACTIVE_CONNECTIONS"
        | "INBOUND_LISTENER_EXACT_BALANCE"
        | "OUTBOUND_LISTENER_EXACT_BALANCE"
        | "METADATA_DISCOVERY"
        | "ENVOY_SKIP_DEPRECATED_LOGS" => Kind::Flag,
        "POD_PORTS" => Kind::PodPorts,
        _ => Kind::Text,
    }
}

/// One named port of `POD_PORTS`, re-encoded as Istio's agent re-encodes it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodPort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(default)]
    container_port: i64,
    #[serde(default)]
    protocol: String,
}

fn pod_ports(value: &str) -> Result<String, String> {
    let ports: Vec<PodPort> =
        serde_json::from_str(value).map_err(|e| format!("not a JSON list of ports ({e})"))?;
    Ok(serde_json::to_string(&ports).expect("ports serialize"))
}

/// Checks every `ISTIO_META_*` value whose key istiod decodes as something
/// other than free text; Istio's agent refuses to start on the same values.
pub fn check_metadata(config: &Config) -> Result<(), BootstrapError> {
    for (key, value) in &config.metadata {
        let problem = match kind(key) {
            Kind::Text | Kind::AgentText => None,
            Kind::Flag if value.is_empty() || parse_go_bool(value).is_some() => None,
            Kind::Flag => Some(format!("`{value}` is not true or false")),
            Kind::PodPorts => pod_ports(value).err(),
            Kind::NotText(what) => Some(format!(
                "cannot be set through the environment: istiod expects {what}"
            )),
        };
        if let Some(problem) = problem {
            return Err(BootstrapError::Metadata {
                key: key.clone(),
                problem,
            });
        }
    }
    Ok(())
}

/// Envoy's node locality.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub sub_zone: String,
}

impl Locality {
    /// `region/zone/sub_zone` (missing parts empty, extra parts ignored).
    fn parse(text: &str) -> Self {
        let mut parts = text.split('/');
        let mut next = || parts.next().unwrap_or_default().to_string();
        Self {
            region: next(),
            zone: next(),
            sub_zone: next(),
        }
    }

    fn to_json(&self) -> Value {
        let mut out = Map::new();
        for (key, value) in [
            ("region", &self.region),
            ("zone", &self.zone),
            ("sub_zone", &self.sub_zone),
        ] {
            if !value.is_empty() {
                out.insert(key.into(), value.as_str().into());
            }
        }
        Value::Object(out)
    }
}

/// The workload's locality label value, `.` read as `/` (Kubernetes label
/// values cannot hold `/`), as istio/istio: pkg/model/proxy.go does.
fn locality_label(labels: &BTreeMap<String, String>) -> Option<String> {
    let raw = labels
        .get("topology.istio.io/locality")
        .or_else(|| labels.get("istio-locality"))?;
    if raw.is_empty() {
        return None;
    }
    Some(if raw.contains('/') {
        raw.clone()
    } else {
        raw.replace('.', "/")
    })
}

/// Envoy's node: who this proxy is to the control plane.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// `sidecar~<ip>~<pod>.<ns>~<ns>.svc.<cluster domain>`: istiod takes
    /// the last part as the proxy's DNS domain (short-name virtual hosts).
    pub id: String,
    pub cluster: String,
    pub locality: Locality,
    pub metadata: Map<String, Value>,
}

impl Node {
    /// The node Istio's agent would send for this configuration.
    pub fn new(config: &Config, options: &BootstrapOptions) -> Self {
        let pod_name = config
            .pod_name
            .clone()
            .unwrap_or_else(|| options.hostname.clone());
        let ns = &config.namespace;
        let id = format!(
            "sidecar~{}~{pod_name}.{ns}~{ns}.svc.{}",
            options.addresses.primary, config.cluster_domain
        );

        let mut labels = config.labels.clone();
        let locality = match locality_label(&labels) {
            Some(text) => {
                let locality = Locality::parse(&text);
                labels.insert("istio-locality".into(), text);
                locality
            }
            None => Locality::default(),
        };

        let mut metadata = Map::new();
        for (key, value) in &config.metadata {
            let value = match kind(key) {
                Kind::Text => value.clone(),
                Kind::Flag => match parse_go_bool(value) {
                    Some(b) => b.to_string(),
                    None => continue,
                },
                Kind::PodPorts => match pod_ports(value) {
                    Ok(ports) => ports,
                    Err(_) => continue,
                },
                Kind::AgentText | Kind::NotText(_) => continue,
            };
            metadata.insert(key.clone(), Value::String(value));
        }
        let mut set = |key: &str, value: Value| {
            metadata.insert(key.to_string(), value);
        };
        set("NAME", pod_name.into());
        set("NAMESPACE", ns.as_str().into());
        set("SERVICE_ACCOUNT", config.service_account.as_str().into());
        let ips: Vec<String> = options
            .addresses
            .instance_ips
            .iter()
            .map(ToString::to_string)
            .collect();
        set("INSTANCE_IPS", ips.join(",").into());
        if !labels.is_empty() {
            let labels = json!(labels);
            set("LABELS", labels.clone());
            set("STATIC_LABELS", labels);
        }
        set("PROXY_CONFIG", proxy_config(config, options));
        set("PILOT_SAN", json!([pilot_san(&config.discovery_address)]));
        if options.status_port != 0 {
            set("ENVOY_STATUS_PORT", options.status_port.into());
        }
        if options.prometheus_port != 0 {
            set("ENVOY_PROMETHEUS_PORT", options.prometheus_port.into());
        }
        // Istio's agent sets metadata discovery to whether HBONE is enabled.
        let hbone = config
            .metadata
            .get("ENABLE_HBONE")
            .and_then(|v| parse_go_bool(v))
            .unwrap_or(false);
        set("METADATA_DISCOVERY", hbone.to_string().into());
        let has_version = metadata
            .get("ISTIO_VERSION")
            .and_then(Value::as_str)
            .is_some_and(|v| !v.is_empty());
        if !has_version {
            metadata.insert(
                "ISTIO_VERSION".into(),
                options.istio_version.as_str().into(),
            );
        }

        Self {
            id,
            cluster: service_cluster(config),
            locality,
            metadata,
        }
    }

    /// The bootstrap's `node` object.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "cluster": self.cluster,
            "locality": self.locality.to_json(),
            "metadata": self.metadata,
        })
    }
}

/// Envoy's node cluster: the service cluster, unless it is Istio's default
/// `istio-proxy`, which gives way to `<app>.<ns>`, `<workload>.<ns>` or
/// `istio-proxy.<ns>` (istio/istio: pkg/bootstrap/config.go
/// `serviceClusterOrDefault`).
fn service_cluster(config: &Config) -> String {
    let name = &config.service_cluster;
    if !name.is_empty() && name != crate::config::DEFAULT_SERVICE_CLUSTER {
        return name.clone();
    }
    let ns = &config.namespace;
    let app = [
        "app",
        "app.kubernetes.io/name",
        "service.istio.io/canonical-name",
    ]
    .iter()
    .find_map(|key| config.labels.get(*key));
    if let Some(app) = app {
        return format!("{app}.{ns}");
    }
    if let Some(workload) = config
        .metadata
        .get("WORKLOAD_NAME")
        .filter(|w| !w.is_empty())
    {
        return format!("{workload}.{ns}");
    }
    format!("istio-proxy.{ns}")
}

/// The name istiod's certificate must carry: the discovery address's host,
/// `localhost` meaning istiod's usual name (istio/istio:
/// pilot/cmd/pilot-agent/config/config.go `GetPilotSan`).
fn pilot_san(discovery_address: &str) -> String {
    let host = discovery_address
        .rsplit_once(':')
        .map_or(discovery_address, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "localhost" {
        "istiod.istio-system.svc".into()
    } else {
        host.into()
    }
}

/// A protobuf JSON duration: `45s`, `0.250s`.
fn proto_duration(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if nanos == 0 {
        format!("{secs}s")
    } else if nanos % 1_000_000 == 0 {
        format!("{secs}.{:03}s", nanos / 1_000_000)
    } else if nanos % 1_000 == 0 {
        format!("{secs}.{:06}s", nanos / 1_000)
    } else {
        format!("{secs}.{nanos:09}s")
    }
}

/// `PROXY_CONFIG`: the ProxyConfig Istio's agent runs with, in its camelCase
/// JSON form: the mesh defaults it keeps, `serviceCluster` (istio-start.sh's
/// `PROXY_CONFIG`), then mesh.yaml's `defaultConfig` (`discoveryAddress`,
/// `meshId`, `proxyMetadata`, `readinessProbe`). istiod turns on health
/// checks for the WorkloadEntry when `readinessProbe` is present.
fn proxy_config(config: &Config, options: &BootstrapOptions) -> Value {
    let mut pc = json!({
        "configPath": options.run_dir,
        "controlPlaneAuthPolicy": "MUTUAL_TLS",
        "discoveryAddress": config.discovery_address,
        "drainDuration": proto_duration(options.drain_duration),
        "proxyAdminPort": options.admin.port(),
        "serviceCluster": config.service_cluster,
        "statNameLength": 189,
        "statusPort": options.agent.port(),
        "terminationDrainDuration": proto_duration(options.termination_drain_duration),
    });
    if let Some(mesh_id) = &config.mesh_id {
        pc["meshId"] = mesh_id.as_str().into();
    }
    if !config.proxy_metadata.is_empty() {
        pc["proxyMetadata"] = json!(config.proxy_metadata);
    }
    if let Some(probe) = &config.readiness_probe {
        pc["readinessProbe"] = serde_json::to_value(probe).expect("probe serializes");
    }
    pc
}

fn socket_address(addr: SocketAddr) -> Value {
    json!({ "socket_address": {
        "protocol": "TCP",
        "address": addr.ip().to_string(),
        "port_value": addr.port(),
    }})
}

fn load_assignment(name: &str, address: Value) -> Value {
    json!({
        "cluster_name": name,
        "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": address } }] }]
    })
}

/// HTTP/2 to the upstream (gRPC), with `extra` common HTTP options.
fn http2_options(common: Option<Value>) -> Value {
    let mut options = json!({
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": { "http2_protocol_options": {} }
    });
    if let Some(common) = common {
        options["common_http_protocol_options"] = common;
    }
    json!({ "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options })
}

/// A gRPC cluster to one of the agent's Unix sockets.
fn pipe_cluster(name: &str, path: &Path) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": http2_options(None),
        "load_assignment": load_assignment(name, json!({ "pipe": { "path": path } })),
    })
}

/// A cluster to a TCP address on this host.
fn local_cluster(name: &str, addr: SocketAddr) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.250s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": load_assignment(name, socket_address(addr)),
    })
}

fn clusters(options: &BootstrapOptions) -> Vec<Value> {
    let breakers = json!({
        "max_connections": 100000,
        "max_pending_requests": 100000,
        "max_requests": 100000,
    });
    let mut default = breakers.clone();
    default["priority"] = "DEFAULT".into();
    let mut high = breakers;
    high["priority"] = "HIGH".into();
    let mut xds = pipe_cluster("xds-grpc", &options.xds_socket);
    xds["circuit_breakers"] = json!({ "thresholds": [default, high] });
    xds["upstream_connection_options"] = json!({ "tcp_keepalive": { "keepalive_time": 300 } });
    // One stream per connection: a new ADS stream after an error gets a
    // fresh connection to the agent (and so a fresh upstream connection).
    xds["typed_extension_protocol_options"] =
        http2_options(Some(json!({ "max_requests_per_connection": 1 })));
    vec![
        local_cluster("prometheus_stats", options.admin),
        local_cluster("agent", options.agent),
        pipe_cluster("sds-grpc", &options.sds_socket),
        xds,
    ]
}

/// A static listener that routes one path prefix to one cluster.
fn route_listener(
    ip: IpAddr,
    port: u16,
    purpose: &str,
    stat_prefix: &str,
    prefix: &str,
    cluster: &str,
) -> Value {
    // Istio's name is `<ip>_<port>`; with port 0 (tests) two listeners would
    // share it, so the purpose stands in for the port.
    let name = if port == 0 {
        format!("{ip}_{purpose}")
    } else {
        format!("{ip}_{port}")
    };
    json!({
        "name": name,
        "address": socket_address(SocketAddr::new(ip, port)),
        "ignore_global_conn_limit": true,
        "bypass_overload_manager": true,
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "codec_type": "AUTO",
                "stat_prefix": stat_prefix,
                "route_config": { "virtual_hosts": [{
                    "name": "backend",
                    "domains": ["*"],
                    "routes": [{ "match": { "prefix": prefix }, "route": { "cluster": cluster } }]
                }]},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
                }]
            }
        }]}]
    })
}

fn ads_source() -> Value {
    json!({ "ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3" })
}

/// The filter run as a singleton Wasm service (root id `meshvm-health`):
/// it probes the app with the WorkloadGroup's `httpGet` and posts verdicts
/// to the agent's `/v1/health` through the `agent` cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthService {
    pub wasm: PathBuf,
    /// Where the app listens; the probe's port there is the
    /// [`PROBE_CLUSTER`].
    pub app_address: IpAddr,
    /// Also judge health from the outcomes of real inbound requests (the
    /// filter's defaults: unhealthy when half of at least 20 requests in
    /// 30 s failed).
    pub traffic: bool,
}

/// The cluster the health singleton probes the app through.
pub const PROBE_CLUSTER: &str = "inbound-probe";
/// The health singleton's root id (the filter's `health::HEALTH_ROOT_ID`).
pub const HEALTH_ROOT_ID: &str = "meshvm-health";

/// The singleton and, for an `httpGet` probe, its probe cluster. Only for a
/// workload with a probe (health checks matter only then): the singleton
/// runs an `httpGet` one, and judges real traffic when that is on.
fn health_service(config: &Config, options: &BootstrapOptions) -> Option<(Value, Option<Value>)> {
    let service = options.health_service.as_ref()?;
    let probe = config.readiness_probe.as_ref()?;
    let http_get = match &probe.method {
        crate::config::ProbeMethod::HttpGet(get) => Some(get),
        _ => None,
    };
    if http_get.is_none() && !service.traffic {
        return None;
    }
    let mut configuration = json!({ "app_cluster": PROBE_CLUSTER, "agent_cluster": "agent" });
    let mut cluster = None;
    if let Some(get) = http_get {
        // The probe connects to its host when that is an address, else to
        // the app's address; `host` still goes in the request's authority.
        let ip = get.host.parse().unwrap_or(service.app_address);
        let port = u16::try_from(get.port).ok()?;
        configuration["probe"] = json!(probe);
        let mut probe_cluster = local_cluster(PROBE_CLUSTER, SocketAddr::new(ip, port));
        probe_cluster["connect_timeout"] = "1s".into();
        cluster = Some(probe_cluster);
    }
    if service.traffic {
        configuration["traffic"] = json!({});
    }
    let extension = json!({
        "name": "envoy.bootstrap.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.wasm.v3.WasmService",
            "singleton": true,
            "config": {
                "name": HEALTH_ROOT_ID,
                "root_id": HEALTH_ROOT_ID,
                "vm_config": {
                    "vm_id": "meshvm",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": service.wasm } }
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration.to_string()
                }
            }
        }
    });
    Some((extension, cluster))
}

/// Envoy's bootstrap: rendered from the configuration (pure, for tests and
/// previews) or written to the run directory for the supervisor to start
/// Envoy with.
#[derive(Debug, Clone, Copy)]
pub struct Bootstrap;

impl Bootstrap {
    /// Renders the bootstrap. Pure: the same configuration and options give
    /// the same JSON.
    pub fn render(config: &Config, options: &BootstrapOptions) -> Value {
        render(config, options)
    }

    /// Checks the configuration and options, renders the bootstrap and
    /// replaces `<run_dir>/envoy-rev.json` atomically (a restarting Envoy
    /// never reads a half-written file). Returns the file's path.
    pub fn write(config: &Config, options: &BootstrapOptions) -> Result<PathBuf, BootstrapError> {
        check_metadata(config)?;
        for path in [&options.xds_socket, &options.sds_socket] {
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH {
                return Err(BootstrapError::SocketPath {
                    path: path.clone(),
                    len,
                });
            }
        }
        std::fs::create_dir_all(&options.run_dir).map_err(|error| BootstrapError::RunDir {
            path: options.run_dir.clone(),
            error,
        })?;
        let path = options.bootstrap_path();
        let mut text = serde_json::to_vec_pretty(&render(config, options)).expect("JSON");
        text.push(b'\n');
        write_atomic(&path, &text)?;
        tracing::info!(path = %path.display(), "wrote Envoy's bootstrap");
        Ok(path)
    }
}

fn render(config: &Config, options: &BootstrapOptions) -> Value {
    let node = Node::new(config, options);
    let mut bootstrap = json!({
        "node": node.to_json(),
        "layered_runtime": { "layers": [
            {
                "name": "global config",
                // Istio's defaults: regexes from VirtualServices may be large;
                // fragments are stripped rather than rejected, as on every
                // Istio sidecar.
                "static_layer": {
                    "re2.max_program_size.error_level": "32768",
                    "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst": true,
                    "envoy.reloadable_features.http_reject_path_with_fragment": false,
                    "envoy.reloadable_features.fixed_heap_use_allocated": true,
                    "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update": false
                }
            },
            { "name": "admin", "admin_layer": {} }
        ]},
        "bootstrap_extensions": [{
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
                "value": { "buffer_size_kb": 64 }
            }
        }],
        "admin": {
            "access_log": [{
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                    "path": "/dev/null"
                }
            }],
            "profile_path": options.run_dir.join("envoy.prof"),
            "address": socket_address(options.admin),
        },
        "dynamic_resources": {
            "lds_config": ads_source(),
            "cds_config": ads_source(),
            "ads_config": {
                "api_type": options.xds_api.api_type(),
                "set_node_on_first_message_only": true,
                "transport_api_version": "V3",
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "xds-grpc" } }]
            }
        },
        "static_resources": {
            "clusters": clusters(options),
            "listeners": [
                route_listener(options.listen_ip, options.prometheus_port, "prometheus", "stats",
                    "/stats/prometheus", "prometheus_stats"),
                route_listener(options.listen_ip, options.status_port, "status", "agent",
                    "/healthz/ready", "agent"),
            ]
        },
        "overload_manager": { "resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": i32::MAX
            }
        }]},
        "deferred_stat_options": { "enable_deferred_creation_stats": true }
    });
    if let Some((extension, cluster)) = health_service(config, options) {
        bootstrap["bootstrap_extensions"] = json!([extension]);
        if let Some(cluster) = cluster
            && let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut()
        {
            clusters.push(cluster);
        }
    }
    bootstrap
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::AddressSource;
    use crate::config::OnboardingPaths;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    fn load(dir: &str, pairs: &[(&str, &str)]) -> Config {
        let env = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dir = repo().join("testdata/onboarding").join(dir);
        Config::load(&OnboardingPaths::in_dir(dir), &env).unwrap()
    }

    /// The environment Istio's start script gives the agent on the VM.
    fn ratings() -> Config {
        load(
            "ratings-vm",
            &[("INSTANCE_IP", "10.0.0.12"), ("POD_NAME", "ratings-vm-1")],
        )
    }

    fn addresses(ips: &[&str]) -> ProxyAddresses {
        let ips: Vec<IpAddr> = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        ProxyAddresses {
            primary: ips[0],
            source: AddressSource::Configured,
            instance_ips: ips,
        }
    }

    fn options() -> BootstrapOptions {
        BootstrapOptions::new(
            ISTIO_CONFIG_DIR,
            addresses(&["10.0.0.12", "192.168.100.4"]),
            "vm-host".into(),
        )
    }

    fn metadata(config: &Config, options: &BootstrapOptions) -> Map<String, Value> {
        Node::new(config, options).metadata
    }

    #[test]
    fn ratings_vm_matches_golden() {
        let mut text =
            serde_json::to_string_pretty(&Bootstrap::render(&ratings(), &options())).unwrap();
        text.push('\n');
        let path = repo().join("testdata/envoy/ratings-vm-bootstrap.json");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e} (set UPDATE_GOLDEN=1 to create it)", path.display())
        });
        assert_eq!(text, expected, "{} differs", path.display());
    }

    #[test]
    fn node_id_cluster_and_metadata_types() {
        let node = Node::new(&ratings(), &options());
        assert_eq!(
            node.id,
            "sidecar~10.0.0.12~ratings-vm-1.vm-ns~vm-ns.svc.cluster.local"
        );
        assert_eq!(node.cluster, "ratings-vm.vm-ns");
        assert_eq!(node.locality, Locality::default());
        assert_eq!(node.to_json()["locality"], json!({}));
        let m = node.metadata;
        for (key, value) in [
            ("NAMESPACE", "vm-ns"),
            ("SERVICE_ACCOUNT", "ratings-sa"),
            ("NAME", "ratings-vm-1"),
            ("INSTANCE_IPS", "10.0.0.12,192.168.100.4"),
            ("AUTO_REGISTER_GROUP", "ratings-vm"),
            ("WORKLOAD_NAME", "ratings-vm"),
            ("NETWORK", "vm-network"),
            ("CLUSTER_ID", "cluster1"),
            ("MESH_ID", "mesh1"),
            ("DNS_CAPTURE", "true"),
            ("ISTIO_VERSION", DEFAULT_ISTIO_VERSION),
            ("METADATA_DISCOVERY", "false"),
            (
                "POD_PORTS",
                r#"[{"name":"http","containerPort":9080,"protocol":""}]"#,
            ),
        ] {
            assert_eq!(m[key], Value::String(value.into()), "{key}");
        }
        assert_eq!(m["ENVOY_STATUS_PORT"], json!(15021));
        assert_eq!(m["ENVOY_PROMETHEUS_PORT"], json!(15090));
        assert_eq!(m["PILOT_SAN"], json!(["istiod.istio-system.svc"]));
        let labels = json!({
            "app": "ratings",
            "service.istio.io/canonical-name": "ratings",
            "service.istio.io/canonical-revision": "v2",
            "version": "v2"
        });
        assert_eq!(m["LABELS"], labels);
        assert_eq!(m["STATIC_LABELS"], labels);
        let pc = &m["PROXY_CONFIG"];
        assert_eq!(pc["discoveryAddress"], "istiod.istio-system.svc:15012");
        assert_eq!(pc["serviceCluster"], "ratings-vm.vm-ns");
        assert_eq!(pc["meshId"], "mesh1");
        assert_eq!(pc["proxyAdminPort"], 15000);
        assert_eq!(pc["statusPort"], 15020);
        assert_eq!(pc["drainDuration"], "45s");
        assert_eq!(pc["terminationDrainDuration"], "5s");
        assert_eq!(
            pc["readinessProbe"],
            json!({ "httpGet": { "path": "/health", "port": 9080 },
                    "initialDelaySeconds": 1, "periodSeconds": 5 })
        );
        assert_eq!(pc["proxyMetadata"]["ISTIO_META_DNS_CAPTURE"], "true");
        assert_eq!(pc["proxyMetadata"]["POD_NAMESPACE"], "vm-ns");
        assert_eq!(pc["proxyMetadata"].as_object().unwrap().len(), 13);
    }

    #[test]
    fn pod_name_defaults_to_the_host_name_and_ips_follow_the_options() {
        let c = load("ratings-vm", &[]);
        let o = BootstrapOptions::new(
            "/run/meshvm",
            addresses(&["2001:db8::12", "10.0.0.12"]),
            "vm-host".into(),
        );
        let node = Node::new(&c, &o);
        assert_eq!(
            node.id,
            "sidecar~2001:db8::12~vm-host.vm-ns~vm-ns.svc.cluster.local"
        );
        let other = load("ratings-vm", &[("CLUSTER_DOMAIN", "corp.example")]);
        assert_eq!(
            Node::new(&other, &o).id,
            "sidecar~2001:db8::12~vm-host.vm-ns~vm-ns.svc.corp.example"
        );
        assert_eq!(node.metadata["NAME"], "vm-host");
        assert_eq!(node.metadata["INSTANCE_IPS"], "2001:db8::12,10.0.0.12");
        // Mixed families listen on IPv4 as Istio does; IPv6-only on `::`.
        assert_eq!(o.listen_ip, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let v6 = BootstrapOptions::new("/run/meshvm", addresses(&["2001:db8::12"]), "h".into());
        assert_eq!(v6.listen_ip, IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        let json = Bootstrap::render(&c, &v6);
        assert_eq!(json["static_resources"]["listeners"][1]["name"], "::_15021");
        assert_eq!(
            json["static_resources"]["clusters"][3]["load_assignment"]["endpoints"][0]["lb_endpoints"]
                [0]["endpoint"]["address"]["pipe"]["path"],
            "/run/meshvm/XDS"
        );
    }

    #[test]
    fn node_cluster_falls_back_like_istio() {
        let c = load("ratings-vm", &[("ISTIO_SERVICE", "")]);
        assert_eq!(service_cluster(&c), "ratings.vm-ns");
        let c = load(
            "ratings-vm",
            &[
                ("ISTIO_SERVICE", "istio-proxy"),
                ("ISTIO_METAJSON_LABELS", "{}"),
            ],
        );
        assert_eq!(service_cluster(&c), "ratings-vm.vm-ns");
        let c = load(
            "ratings-vm",
            &[
                ("ISTIO_SERVICE", ""),
                ("ISTIO_METAJSON_LABELS", "{}"),
                ("ISTIO_META_WORKLOAD_NAME", ""),
            ],
        );
        assert_eq!(service_cluster(&c), "istio-proxy.vm-ns");
        // Without labels there is no LABELS key, as with Istio's agent.
        assert!(!metadata(&c, &options()).contains_key("LABELS"));
    }

    #[test]
    fn locality_from_labels() {
        let c = load(
            "ratings-vm",
            &[(
                "ISTIO_METAJSON_LABELS",
                r#"{"app":"ratings","topology.istio.io/locality":"us-east1.us-east1-b.rack7.x"}"#,
            )],
        );
        let node = Node::new(&c, &options());
        assert_eq!(
            node.to_json()["locality"],
            json!({ "region": "us-east1", "zone": "us-east1-b", "sub_zone": "rack7" })
        );
        assert_eq!(
            node.metadata["LABELS"]["istio-locality"],
            "us-east1/us-east1-b/rack7/x"
        );
        assert_eq!(
            node.metadata["STATIC_LABELS"]["istio-locality"],
            "us-east1/us-east1-b/rack7/x"
        );
        let c = load(
            "ratings-vm",
            &[("ISTIO_METAJSON_LABELS", r#"{"istio-locality":"eu/west"}"#)],
        );
        let node = Node::new(&c, &options());
        assert_eq!(
            node.to_json()["locality"],
            json!({ "region": "eu", "zone": "west" })
        );
        assert_eq!(
            node.metadata["LABELS"],
            json!({ "istio-locality": "eu/west" })
        );
    }

    #[test]
    fn istio_meta_values_pass_through_as_strings_and_typed_ones_are_normalised() {
        let c = load(
            "ratings-vm",
            &[
                ("ISTIO_META_DNS_CAPTURE", "True"),
                ("ISTIO_META_ENABLE_HBONE", "1"),
                ("ISTIO_META_ISTIO_VERSION", "1.27.3"),
                ("ISTIO_META_INTERCEPTION_MODE", "NONE"),
                ("ISTIO_META_NAMESPACE", "spoofed"),
                ("ISTIO_META_INSTANCE_IPS", "1.2.3.4"),
                ("ISTIO_META_POD_PORTS", r#"[{"containerPort":80}]"#),
                ("ISTIO_META_MESH_ID", ""),
            ],
        );
        check_metadata(&c).unwrap();
        let m = metadata(&c, &options());
        assert_eq!(m["DNS_CAPTURE"], "true");
        assert_eq!(m["ENABLE_HBONE"], "true");
        assert_eq!(m["METADATA_DISCOVERY"], "true");
        assert_eq!(m["ISTIO_VERSION"], "1.27.3");
        assert_eq!(m["INTERCEPTION_MODE"], "NONE");
        assert_eq!(m["NAMESPACE"], "vm-ns");
        assert_eq!(m["INSTANCE_IPS"], "10.0.0.12,192.168.100.4");
        assert_eq!(m["POD_PORTS"], r#"[{"containerPort":80,"protocol":""}]"#);
        // An empty value stays an empty string, as Istio's agent sends it.
        assert_eq!(m["MESH_ID"], "");
        assert!(m.values().all(|v| !v.is_null()));
    }

    #[test]
    fn values_istio_would_refuse_are_errors() {
        for (key, value, problem) in [
            (
                "ISTIO_META_LABELS",
                "app=x",
                "ISTIO_META_LABELS: cannot be set through the environment: istiod expects an object",
            ),
            (
                "ISTIO_META_ENVOY_STATUS_PORT",
                "15021",
                "ISTIO_META_ENVOY_STATUS_PORT: cannot be set through the environment: istiod \
                 expects a number",
            ),
            (
                "ISTIO_META_ENABLE_HBONE",
                "yes",
                "ISTIO_META_ENABLE_HBONE: `yes` is not true or false",
            ),
        ] {
            let c = load("ratings-vm", &[(key, value)]);
            assert_eq!(check_metadata(&c).unwrap_err().to_string(), problem);
            // Rendering leaves the value out rather than send a wrong type.
            let m = metadata(&c, &options());
            let name = key.strip_prefix("ISTIO_META_").unwrap();
            assert!(
                m.get(name)
                    .is_none_or(|v| !v.is_string() || name == "LABELS")
            );
        }
        let c = load("ratings-vm", &[("ISTIO_META_POD_PORTS", "http:9080")]);
        let e = check_metadata(&c).unwrap_err().to_string();
        assert!(
            e.starts_with("ISTIO_META_POD_PORTS: not a JSON list of ports"),
            "{e}"
        );
        assert!(!metadata(&c, &options()).contains_key("POD_PORTS"));
    }

    #[test]
    fn proxy_config_env_overlays_proxy_metadata() {
        let c = load(
            "ratings-vm",
            &[(
                "PROXY_CONFIG",
                "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"false\"\n  EXTRA: x\n",
            )],
        );
        let pc = &metadata(&c, &options())["PROXY_CONFIG"];
        assert_eq!(pc["proxyMetadata"]["ISTIO_META_DNS_CAPTURE"], "false");
        assert_eq!(pc["proxyMetadata"]["EXTRA"], "x");
        assert_eq!(pc["proxyMetadata"]["ISTIO_META_MESH_ID"], "mesh1");
        // cluster.env, read later, still sets DNS capture.
        assert_eq!(metadata(&c, &options())["DNS_CAPTURE"], "true");
        // billing-vm: no meshId, no readinessProbe in mesh.yaml? It has a probe.
        let c = load("billing-vm", &[]);
        let pc = &metadata(&c, &options())["PROXY_CONFIG"];
        assert!(pc.get("meshId").is_none());
        assert_eq!(
            pc["discoveryAddress"],
            "istiod-canary.istio-system.svc:15012"
        );
        assert_eq!(pc["readinessProbe"]["tcpSocket"]["port"], 7070);
    }

    #[test]
    fn xds_api_from_istio_delta_xds() {
        assert_eq!(XdsApi::from_istio_delta_xds(None).unwrap(), XdsApi::Delta);
        assert_eq!(
            XdsApi::from_istio_delta_xds(Some("")).unwrap(),
            XdsApi::Delta
        );
        assert_eq!(
            XdsApi::from_istio_delta_xds(Some("true")).unwrap(),
            XdsApi::Delta
        );
        assert_eq!(
            XdsApi::from_istio_delta_xds(Some("false")).unwrap(),
            XdsApi::Sotw
        );
        assert_eq!(
            XdsApi::from_istio_delta_xds(Some("no"))
                .unwrap_err()
                .to_string(),
            "ISTIO_DELTA_XDS: `no` is not true or false"
        );
        let mut o = options();
        o.xds_api = XdsApi::Sotw;
        let json = Bootstrap::render(&ratings(), &o);
        assert_eq!(json["dynamic_resources"]["ads_config"]["api_type"], "GRPC");
    }

    #[test]
    fn for_host_reads_this_host_and_the_environment() {
        let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c = ratings();
        let o = BootstrapOptions::for_host(&c, &env(&[]), "/run/meshvm", None).unwrap();
        assert_eq!(o.addresses.primary, "10.0.0.12".parse::<IpAddr>().unwrap());
        assert_eq!(o.addresses.source, AddressSource::Configured);
        assert_eq!(o.xds_api, XdsApi::Delta);
        assert!(!o.hostname.is_empty());
        assert_eq!(o.xds_socket, Path::new("/run/meshvm/XDS"));
        let o = BootstrapOptions::for_host(
            &c,
            &env(&[("ISTIO_DELTA_XDS", "false"), (INTERFACE_ENV, "")]),
            "/run/meshvm",
            None,
        )
        .unwrap();
        assert_eq!(o.xds_api, XdsApi::Sotw);
        // The variable names an interface when the option does not.
        let e = BootstrapOptions::for_host(
            &load("ratings-vm", &[]),
            &env(&[(INTERFACE_ENV, "no-such-if0")]),
            "/run/meshvm",
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("no network interface named `no-such-if0`; the host has: "),
            "{e}"
        );
        let e = BootstrapOptions::for_host(
            &c,
            &env(&[("ISTIO_DELTA_XDS", "maybe")]),
            "/run/meshvm",
            None,
        )
        .unwrap_err();
        assert!(matches!(e, BootstrapError::DeltaXds(_)), "{e}");
    }

    #[test]
    fn small_pieces() {
        assert_eq!(
            pilot_san("istiod.istio-system.svc:15012"),
            "istiod.istio-system.svc"
        );
        assert_eq!(pilot_san("localhost:15012"), "istiod.istio-system.svc");
        assert_eq!(pilot_san("[fd00::1]:15012"), "fd00::1");
        assert_eq!(proto_duration(Duration::from_secs(45)), "45s");
        assert_eq!(proto_duration(Duration::from_millis(250)), "0.250s");
        assert_eq!(
            proto_duration(Duration::from_micros(1_500_001)),
            "1.500001s"
        );
        assert_eq!(proto_duration(Duration::from_nanos(7)), "0.000000007s");
        // Port 0 (tests) keeps listener names apart.
        let mut o = options();
        o.status_port = 0;
        o.prometheus_port = 0;
        let json = Bootstrap::render(&ratings(), &o);
        let listeners = &json["static_resources"]["listeners"];
        assert_eq!(listeners[0]["name"], "0.0.0.0_prometheus");
        assert_eq!(listeners[1]["name"], "0.0.0.0_status");
        assert!(json["node"]["metadata"].get("ENVOY_STATUS_PORT").is_none());
    }

    #[test]
    fn write_replaces_the_file_and_checks_socket_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = options();
        o.run_dir = dir.path().join("run");
        let path = Bootstrap::write(&ratings(), &o).unwrap();
        assert_eq!(path, dir.path().join("run/envoy-rev.json"));
        let written: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(written, Bootstrap::render(&ratings(), &o));
        // Written again in place; no temporary file is left behind.
        Bootstrap::write(&ratings(), &o).unwrap();
        let names: Vec<_> = std::fs::read_dir(&o.run_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["envoy-rev.json"]);

        o.xds_socket = PathBuf::from(format!("/{}/XDS", "d".repeat(110)));
        let e = Bootstrap::write(&ratings(), &o).unwrap_err();
        assert!(
            matches!(e, BootstrapError::SocketPath { len: 115, .. }),
            "{e}"
        );
        let c = load("ratings-vm", &[("ISTIO_META_PILOT_SAN", "x")]);
        assert!(matches!(
            Bootstrap::write(&c, &options()).unwrap_err(),
            BootstrapError::Metadata { .. }
        ));
    }
}
