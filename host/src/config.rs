//! The agent's configuration: the onboarding files `istioctl x workload entry
//! configure` writes, merged with the process environment into one [`Config`].
//!
//! Sources, later wins (as Istio's agent sees them once `istio-start.sh` has
//! sourced `cluster.env`, except that here the process environment wins):
//!
//! 1. `mesh.yaml` `defaultConfig` (`discoveryAddress`, `meshId`,
//!    `readinessProbe`, and `proxyMetadata` as default environment variables);
//! 2. the `PROXY_CONFIG` environment variable, a ProxyConfig overlaid on it;
//! 3. `cluster.env`;
//! 4. the process environment.
//!
//! `root-cert.pem` must hold at least one certificate; `istio-token` and
//! `hosts` may be missing. Every malformed input is an error that names the
//! file, the line (and column where it helps) and the problem.

pub mod cluster_env;
pub mod duration;
pub mod hosts;
pub mod mesh;
pub mod root_cert;
pub mod secret;
pub(crate) mod time;
pub mod token;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Serialize, Serializer};

pub use hosts::HostsEntry;
pub use mesh::{
    ExecProbe, GrpcProbe, HttpGetProbe, ProbeMethod, ProxyConfig, ReadinessProbe, TcpSocketProbe,
};
pub use root_cert::{CertificateSummary, RootCerts};
pub use secret::Secret;
pub use token::{Claims, IstioToken};

/// Istio's default xDS (and CA) address when mesh.yaml names none.
pub const DEFAULT_DISCOVERY_ADDRESS: &str = "istiod.istio-system.svc:15012";
/// The trust domain used when `TRUST_DOMAIN` is unset or empty.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The Kubernetes cluster domain used when `CLUSTER_DOMAIN` is unset or
/// empty (Istio's `constants.DefaultClusterLocalDomain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
/// Envoy's node cluster when `ISTIO_SERVICE` is unset.
pub const DEFAULT_SERVICE_CLUSTER: &str = "istio-proxy";
/// The audience istiod's TokenReview expects by default.
pub const CA_TOKEN_AUDIENCE: &str = "istio-ca";
/// The workload certificate lifetime requested without `SECRET_TTL` (Istio's).
pub const DEFAULT_SECRET_TTL: Duration = Duration::from_secs(24 * 3600);

/// Where the five onboarding files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnboardingPaths {
    pub cluster_env: PathBuf,
    pub mesh_config: PathBuf,
    pub root_cert: PathBuf,
    pub token: PathBuf,
    pub hosts: PathBuf,
}

impl OnboardingPaths {
    /// Where Istio's VM packages install them: `cluster.env` under
    /// `/var/lib/istio/envoy`, mesh.yaml as `/etc/istio/config/mesh`, the root
    /// in `/etc/certs`, the token in `/var/run/secrets/tokens`, and `hosts`
    /// appended to `/etc/hosts`.
    pub fn istio_vm() -> Self {
        Self {
            cluster_env: "/var/lib/istio/envoy/cluster.env".into(),
            mesh_config: "/etc/istio/config/mesh".into(),
            root_cert: "/etc/certs/root-cert.pem".into(),
            token: "/var/run/secrets/tokens/istio-token".into(),
            hosts: "/etc/hosts".into(),
        }
    }

    /// All five in one directory, named as istioctl writes them (`-o DIR`).
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self {
            cluster_env: dir.join("cluster.env"),
            mesh_config: dir.join("mesh.yaml"),
            root_cert: dir.join("root-cert.pem"),
            token: dir.join("istio-token"),
            hosts: dir.join("hosts"),
        }
    }
}

/// Where a setting's value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A file, at a line when known.
    File { path: PathBuf, line: Option<usize> },
    /// The `PROXY_CONFIG` environment variable.
    ProxyConfigEnv,
    /// The process environment (the variable is the setting's key).
    Environment,
}

/// Why the configuration could not be loaded. Each message names the file
/// (and line) or the environment variable at fault; none contains the token.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("{}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    /// A file is malformed at a line (and column, when known).
    #[error("{}: {problem}", position(path, *line, *column))]
    Parse {
        path: PathBuf,
        line: usize,
        column: Option<usize>,
        problem: String,
    },
    /// A file is malformed as a whole.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    /// A setting has an invalid value.
    #[error("{}", value_message(origin, key, problem))]
    Value {
        origin: Origin,
        key: String,
        problem: String,
    },
    /// A required setting is set nowhere.
    #[error("{key} is not set in {} or the environment", path.display())]
    Missing { key: String, path: PathBuf },
}

fn position(path: &Path, line: usize, column: Option<usize>) -> String {
    match column {
        Some(column) => format!("{}:{line}:{column}", path.display()),
        None => format!("{}:{line}", path.display()),
    }
}

fn value_message(origin: &Origin, key: &str, problem: &str) -> String {
    match origin {
        Origin::File {
            path,
            line: Some(line),
        } => format!("{}:{line}: {key}: {problem}", path.display()),
        Origin::File { path, line: None } => format!("{}: {key}: {problem}", path.display()),
        Origin::ProxyConfigEnv => format!("environment variable PROXY_CONFIG: {key}: {problem}"),
        Origin::Environment => format!("environment variable {key}: {problem}"),
    }
}

/// Which inbound ports Envoy captures (`ISTIO_INBOUND_PORTS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundPorts {
    /// `*`: every port (istioctl's choice when the WorkloadGroup lists none).
    All,
    /// These ports; empty means none.
    Ports(Vec<u16>),
}

impl Serialize for InboundPorts {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::All => serializer.serialize_str("*"),
            Self::Ports(ports) => ports.serialize(serializer),
        }
    }
}

/// The resolved configuration. Serializing it (as `check-config` does) shows
/// everything except secrets: the token appears as `<redacted, N bytes, ...>`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    /// `POD_NAMESPACE`, else `ISTIO_NAMESPACE`: the workload's namespace.
    pub namespace: String,
    /// `SERVICE_ACCOUNT`: the workload's service account.
    pub service_account: String,
    /// `TRUST_DOMAIN`; unset or empty means `cluster.local`.
    pub trust_domain: String,
    /// `CLUSTER_DOMAIN`, else `cluster.local`: the Kubernetes cluster
    /// domain. Services are `<name>.<ns>.svc.<domain>` (the DNS proxy gives
    /// them their short names) and Envoy's node id ends in
    /// `<ns>.svc.<domain>` (Istio's agent `--domain`).
    pub cluster_domain: String,
    /// `ISTIO_META_WORKLOAD_NAME`: the WorkloadGroup's name.
    pub workload_name: Option<String>,
    /// `POD_NAME` (the start script defaults it to the short hostname).
    pub pod_name: Option<String>,
    /// `INSTANCE_IP`, else `ISTIO_SVC_IP` (istioctl `--internalIP`/`--externalIP`).
    pub instance_ip: Option<IpAddr>,
    /// `ISTIO_META_CLUSTER_ID`: the cluster, also sent as the `ClusterID` header.
    pub cluster_id: Option<String>,
    /// `ISTIO_META_MESH_ID`, else mesh.yaml `meshId`.
    pub mesh_id: Option<String>,
    /// `ISTIO_META_NETWORK`.
    pub network: Option<String>,
    /// `ISTIO_SERVICE`, else `istio-proxy`: Envoy's node cluster.
    pub service_cluster: String,
    /// `CANONICAL_SERVICE`.
    pub canonical_service: Option<String>,
    /// `CANONICAL_REVISION`.
    pub canonical_revision: Option<String>,
    /// `ISTIO_METAJSON_LABELS`: the workload's labels (node `LABELS`).
    pub labels: BTreeMap<String, String>,
    /// Every `ISTIO_META_*` variable, prefix stripped (node metadata).
    pub metadata: BTreeMap<String, String>,
    /// mesh.yaml `discoveryAddress` (`PROXY_CONFIG` may override), else
    /// `istiod.istio-system.svc:15012`.
    pub discovery_address: String,
    /// `CA_ADDR`, else the discovery address.
    pub ca_address: String,
    /// `ISTIOD_SAN`: the name to expect in istiod's certificate, if not the
    /// discovery address's host.
    pub istiod_san: Option<String>,
    /// `ISTIO_INBOUND_PORTS`: `*` or a list of ports.
    pub inbound_ports: InboundPorts,
    /// `ISTIO_META_DNS_CAPTURE`: run the DNS proxy and capture DNS.
    pub dns_capture: bool,
    /// `DNS_FORWARD_PARALLEL`: the DNS proxy asks every upstream nameserver
    /// at once, first answer wins (instead of one after the other).
    pub dns_forward_parallel: bool,
    /// `DNS_FORWARD_TIMEOUT` (Go duration, default 5s): how long the DNS
    /// proxy waits for an upstream nameserver.
    #[serde(serialize_with = "serialize_go_duration")]
    pub dns_forward_timeout: Duration,
    /// mesh.yaml `readinessProbe` (the WorkloadGroup's probe), if any.
    pub readiness_probe: Option<ReadinessProbe>,
    /// `SECRET_TTL` (Go duration, default 24h): the certificate lifetime the
    /// agent asks the CA for.
    #[serde(serialize_with = "serialize_go_duration")]
    pub secret_ttl: Duration,
    /// mesh.yaml `proxyMetadata` with `PROXY_CONFIG`'s overlaid, as Istio's
    /// agent reports it in node metadata `PROXY_CONFIG.proxyMetadata`. Not in
    /// the report: each entry already shows as the setting it makes.
    #[serde(skip)]
    pub proxy_metadata: BTreeMap<String, String>,
    /// Other variables the onboarding files set (e.g. `ISTIO_SERVICE_CIDR`,
    /// `ISTIO_LOCAL_EXCLUDE_PORTS`), with environment overrides applied.
    pub environment: BTreeMap<String, String>,
    pub cluster_env_path: PathBuf,
    pub mesh_config_path: PathBuf,
    pub root_cert_path: PathBuf,
    /// The trust anchors for the first connections to the CA and istiod.
    pub root_certs: RootCerts,
    pub token_path: PathBuf,
    /// The bootstrap token; `None` if the file does not exist.
    pub istio_token: Option<IstioToken>,
    pub hosts_path: PathBuf,
    /// Lines for `/etc/hosts` (istiod's name → the gateway address).
    pub hosts: Vec<HostsEntry>,
}

/// Keys [`Config`] has a field for; the others land in `environment`.
const CONSUMED: &[&str] = &[
    "POD_NAMESPACE",
    "ISTIO_NAMESPACE",
    "SERVICE_ACCOUNT",
    "TRUST_DOMAIN",
    "CLUSTER_DOMAIN",
    "POD_NAME",
    "INSTANCE_IP",
    "ISTIO_SVC_IP",
    "ISTIO_SERVICE",
    "CANONICAL_SERVICE",
    "CANONICAL_REVISION",
    "ISTIO_METAJSON_LABELS",
    "CA_ADDR",
    "ISTIOD_SAN",
    "ISTIO_INBOUND_PORTS",
    "SECRET_TTL",
    "DNS_FORWARD_PARALLEL",
    "DNS_FORWARD_TIMEOUT",
];

const META_PREFIX: &str = "ISTIO_META_";

fn serialize_go_duration<S: Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&duration::go_duration_string(*d))
}

impl Config {
    /// The workload's SPIFFE identity, `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// Reads the onboarding files and merges them with `env` (the process
    /// environment, passed in so that callers and tests decide what it is).
    pub fn load(
        paths: &OnboardingPaths,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let cluster_env = read_cluster_env(&paths.cluster_env)?;
        let (mesh_text, mut proxy_config) = read_mesh_config(&paths.mesh_config)?;

        // Variables, lowest precedence first.
        let mut vars = Vars::default();
        let metadata_lines = mesh::proxy_metadata_lines(&mesh_text);
        let mut proxy_metadata = proxy_config.proxy_metadata.clone();
        for (key, value) in std::mem::take(&mut proxy_config.proxy_metadata) {
            let line = metadata_lines.get(&key).copied();
            vars.set(key, value, file_origin(&paths.mesh_config, line));
        }
        let mut discovery_origin = file_origin(
            &paths.mesh_config,
            mesh::key_line(&mesh_text, "discoveryAddress"),
        );
        if let Some(text) = env.get("PROXY_CONFIG").filter(|t| !t.trim().is_empty()) {
            let overlay = mesh::parse_proxy_config(text).map_err(|e| ConfigError::Value {
                origin: Origin::Environment,
                key: "PROXY_CONFIG".into(),
                problem: match e.line {
                    Some(line) => format!("line {line}: {}", e.problem),
                    None => e.problem,
                },
            })?;
            if overlay.discovery_address.is_some() {
                proxy_config.discovery_address = overlay.discovery_address;
                discovery_origin = Origin::ProxyConfigEnv;
            }
            if overlay.mesh_id.is_some() {
                proxy_config.mesh_id = overlay.mesh_id;
            }
            if overlay.readiness_probe.is_some() {
                proxy_config.readiness_probe = overlay.readiness_probe;
            }
            for (key, value) in overlay.proxy_metadata {
                proxy_metadata.insert(key.clone(), value.clone());
                vars.set(key, value, Origin::ProxyConfigEnv);
            }
        }
        for a in cluster_env {
            vars.set(
                a.key,
                a.value,
                file_origin(&paths.cluster_env, Some(a.line)),
            );
        }
        let file_keys: Vec<String> = vars.map.keys().cloned().collect();
        for (key, value) in env {
            vars.set(key.clone(), value.clone(), Origin::Environment);
        }

        let namespace = match vars.non_empty("POD_NAMESPACE") {
            Some(_) => vars.kube_name("POD_NAMESPACE")?,
            None if vars.non_empty("ISTIO_NAMESPACE").is_some() => {
                vars.kube_name("ISTIO_NAMESPACE")?
            }
            None => {
                return Err(ConfigError::Missing {
                    key: "POD_NAMESPACE".into(),
                    path: paths.cluster_env.clone(),
                });
            }
        };
        if vars.non_empty("SERVICE_ACCOUNT").is_none() {
            return Err(ConfigError::Missing {
                key: "SERVICE_ACCOUNT".into(),
                path: paths.cluster_env.clone(),
            });
        }
        let service_account = vars.kube_name("SERVICE_ACCOUNT")?;
        let trust_domain = match vars.non_empty("TRUST_DOMAIN") {
            None => DEFAULT_TRUST_DOMAIN.to_string(),
            Some(td) if td.contains(|c: char| c == '/' || c.is_whitespace()) => {
                return Err(vars.invalid("TRUST_DOMAIN", "a trust domain has no `/` or spaces"));
            }
            Some(td) => td.to_string(),
        };

        let cluster_domain = match vars.non_empty("CLUSTER_DOMAIN") {
            None => DEFAULT_CLUSTER_DOMAIN.to_string(),
            Some(text) => {
                parse_cluster_domain(text).map_err(|p| vars.invalid("CLUSTER_DOMAIN", p))?
            }
        };

        let instance_ip = ["INSTANCE_IP", "ISTIO_SVC_IP"]
            .into_iter()
            .find(|key| vars.non_empty(key).is_some())
            .map(|key| {
                let text = vars.non_empty(key).expect("found").trim();
                text.parse::<IpAddr>()
                    .map_err(|_| vars.invalid(key, format!("`{text}` is not an IP address")))
            })
            .transpose()?;

        let labels = match vars.non_empty("ISTIO_METAJSON_LABELS") {
            None => BTreeMap::new(),
            Some(json) => serde_json::from_str(json).map_err(|e| {
                vars.invalid(
                    "ISTIO_METAJSON_LABELS",
                    format!("not a JSON object of string labels: {e}"),
                )
            })?,
        };

        let metadata: BTreeMap<String, String> = vars
            .map
            .iter()
            .filter_map(|(key, var)| {
                let name = key.strip_prefix(META_PREFIX)?;
                (!name.is_empty()).then(|| (name.to_string(), var.value.clone()))
            })
            .collect();

        let discovery_address = proxy_config
            .discovery_address
            .take()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| DEFAULT_DISCOVERY_ADDRESS.to_string());
        check_address(&discovery_address).map_err(|problem| ConfigError::Value {
            origin: discovery_origin,
            key: "defaultConfig.discoveryAddress".into(),
            problem,
        })?;
        let ca_address = match vars.non_empty("CA_ADDR") {
            Some(addr) => {
                check_address(addr).map_err(|problem| vars.invalid("CA_ADDR", problem))?;
                addr.to_string()
            }
            None => discovery_address.clone(),
        };

        let inbound_ports = match vars.non_empty("ISTIO_INBOUND_PORTS").map(str::trim) {
            None | Some("") => InboundPorts::Ports(Vec::new()),
            Some("*") => InboundPorts::All,
            Some(list) => InboundPorts::Ports(
                list.split(',')
                    .map(|p| match p.trim().parse::<u16>() {
                        Ok(port) if port > 0 => Ok(port),
                        _ => Err(vars.invalid(
                            "ISTIO_INBOUND_PORTS",
                            format!(
                                "`{}` is not a port; expected `*` or ports like `9080,9443`",
                                p.trim()
                            ),
                        )),
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };

        let dns_capture = vars.bool("ISTIO_META_DNS_CAPTURE")?;
        let dns_forward_parallel = vars.bool("DNS_FORWARD_PARALLEL")?;
        let dns_forward_timeout = match vars.non_empty("DNS_FORWARD_TIMEOUT") {
            None => crate::dns::DEFAULT_FORWARD_TIMEOUT,
            Some(text) => parse_forward_timeout(text)
                .map_err(|problem| vars.invalid("DNS_FORWARD_TIMEOUT", problem))?,
        };

        let secret_ttl = match vars.non_empty("SECRET_TTL") {
            None => DEFAULT_SECRET_TTL,
            Some(text) => match duration::parse_go_duration(text) {
                Ok(ttl) if ttl >= Duration::from_secs(1) => ttl,
                Ok(_) => {
                    return Err(vars.invalid("SECRET_TTL", "a certificate lifetime of at least 1s"));
                }
                Err(problem) => return Err(vars.invalid("SECRET_TTL", problem)),
            },
        };

        let environment = file_keys
            .into_iter()
            .filter(|k| !CONSUMED.contains(&k.as_str()) && !k.starts_with(META_PREFIX))
            .filter(|k| k != "PROXY_CONFIG")
            .map(|k| {
                let value = vars.map[&k].value.clone();
                (k, value)
            })
            .collect();

        let root_certs = read_root_certs(&paths.root_cert)?;
        let istio_token = read_token(&paths.token)?;
        let hosts = read_hosts(&paths.hosts)?;

        let config = Self {
            namespace,
            service_account,
            trust_domain,
            cluster_domain,
            workload_name: vars.non_empty("ISTIO_META_WORKLOAD_NAME").map(String::from),
            pod_name: vars.non_empty("POD_NAME").map(String::from),
            instance_ip,
            cluster_id: vars.non_empty("ISTIO_META_CLUSTER_ID").map(String::from),
            mesh_id: vars
                .non_empty("ISTIO_META_MESH_ID")
                .map(String::from)
                .or(proxy_config.mesh_id.take().filter(|m| !m.is_empty())),
            network: vars.non_empty("ISTIO_META_NETWORK").map(String::from),
            service_cluster: vars
                .non_empty("ISTIO_SERVICE")
                .unwrap_or(DEFAULT_SERVICE_CLUSTER)
                .to_string(),
            canonical_service: vars.non_empty("CANONICAL_SERVICE").map(String::from),
            canonical_revision: vars.non_empty("CANONICAL_REVISION").map(String::from),
            labels,
            metadata,
            discovery_address,
            ca_address,
            istiod_san: vars.non_empty("ISTIOD_SAN").map(String::from),
            inbound_ports,
            dns_capture,
            dns_forward_parallel,
            dns_forward_timeout,
            readiness_probe: proxy_config.readiness_probe.take(),
            secret_ttl,
            proxy_metadata,
            environment,
            cluster_env_path: paths.cluster_env.clone(),
            mesh_config_path: paths.mesh_config.clone(),
            root_cert_path: paths.root_cert.clone(),
            root_certs,
            token_path: paths.token.clone(),
            istio_token,
            hosts_path: paths.hosts.clone(),
            hosts,
        };
        config.warn_about_surprises(time::now_unix());
        Ok(config)
    }

    /// Logs what is valid but likely to fail later.
    fn warn_about_surprises(&self, now: i64) {
        match &self.istio_token {
            None => tracing::warn!(
                path = %self.token_path.display(),
                "no istio-token: the CA will accept this VM only once it holds a certificate"
            ),
            Some(token) => {
                if let Some(exp) = token.expires().filter(|&exp| exp <= now) {
                    tracing::warn!(
                        path = %self.token_path.display(),
                        expired = %time::rfc3339(exp),
                        "the istio-token has expired: a first certificate needs a fresh token \
                         (istioctl x workload entry configure)"
                    );
                }
                if let Some(claims) = &token.claims {
                    if !claims.audiences.is_empty()
                        && !claims.audiences.iter().any(|a| a == CA_TOKEN_AUDIENCE)
                    {
                        tracing::warn!(
                            audiences = %claims.audiences.join(","),
                            "the istio-token's audience is not {CA_TOKEN_AUDIENCE}"
                        );
                    }
                    let expected = format!(
                        "system:serviceaccount:{}:{}",
                        self.namespace, self.service_account
                    );
                    if let Some(sub) = claims.subject.as_ref().filter(|s| **s != expected) {
                        tracing::warn!(
                            token_subject = %sub,
                            expected = %expected,
                            "the istio-token is for another service account than the configuration's"
                        );
                    }
                }
            }
        }
        for cert in &self.root_certs.certificates {
            if cert.not_after_unix <= now {
                tracing::warn!(
                    path = %self.root_cert_path.display(),
                    subject = %cert.subject,
                    not_after = %cert.not_after,
                    "a root certificate has expired"
                );
            }
        }
    }

    /// The `check-config` report: `spiffe-id` followed by every field.
    pub fn report(&self) -> impl Serialize + '_ {
        #[derive(Serialize)]
        struct Report<'a> {
            #[serde(rename = "spiffe-id")]
            spiffe_id: String,
            #[serde(flatten)]
            config: &'a Config,
        }
        Report {
            spiffe_id: self.spiffe_id(),
            config: self,
        }
    }
}

/// A variable's value and where it was set.
#[derive(Debug, Clone)]
struct Var {
    value: String,
    origin: Origin,
}

#[derive(Debug, Default)]
struct Vars {
    map: BTreeMap<String, Var>,
}

impl Vars {
    fn set(&mut self, key: String, value: String, origin: Origin) {
        self.map.insert(key, Var { value, origin });
    }

    /// The value, treating empty as unset (as Istio's agent does).
    fn non_empty(&self, key: &str) -> Option<&str> {
        self.map
            .get(key)
            .map(|v| v.value.as_str())
            .filter(|v| !v.is_empty())
    }

    fn invalid(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::Value {
            origin: self
                .map
                .get(key)
                .map_or(Origin::Environment, |v| v.origin.clone()),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    /// A Kubernetes object name (namespace, service account): it becomes part
    /// of the SPIFFE identity, so it must be lower-case alphanumerics, `-`, `.`.
    fn kube_name(&self, key: &str) -> Result<String, ConfigError> {
        let value = self.non_empty(key).unwrap_or_default();
        let valid = value.len() <= 253
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
        if !valid {
            return Err(self.invalid(
                key,
                format!(
                    "`{value}` is not a Kubernetes name (lower-case letters, digits, `-`, `.`)"
                ),
            ));
        }
        Ok(value.to_string())
    }

    /// A Go `strconv.ParseBool` value; unset or empty is false.
    fn bool(&self, key: &str) -> Result<bool, ConfigError> {
        match self.non_empty(key) {
            None => Ok(false),
            Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
            Some(other) => Err(self.invalid(key, format!("`{other}` is not true or false"))),
        }
    }
}

fn file_origin(path: &Path, line: Option<usize>) -> Origin {
    Origin::File {
        path: path.to_path_buf(),
        line,
    }
}

/// A cluster domain (`cluster.local`, `corp.example`): DNS labels of
/// lower-case letters, digits and `-`; a final dot is dropped.
pub fn parse_cluster_domain(text: &str) -> Result<String, String> {
    let domain = text.trim().strip_suffix('.').unwrap_or(text.trim());
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if domain.len() > 253 || !domain.split('.').all(label_ok) {
        return Err(format!(
            "`{text}` is not a domain (labels of lower-case letters, digits and `-`, \
             separated by dots, like `cluster.local`)"
        ));
    }
    Ok(domain.to_string())
}

/// The DNS proxy's upstream timeout: a Go duration above zero.
pub fn parse_forward_timeout(text: &str) -> Result<Duration, String> {
    match duration::parse_go_duration(text)? {
        Duration::ZERO => Err(format!("`{text}`: the timeout must be above 0")),
        timeout => Ok(timeout),
    }
}

/// `host:port` or `[v6]:port`, port 1–65535.
fn check_address(address: &str) -> Result<(), String> {
    let bad = || format!("`{address}` is not host:port");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty() && !host.contains(|c: char| c == ':' || c == '/' || c.is_whitespace())
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Reads a file that may legitimately be absent.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, ConfigError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            error,
        }),
    }
}

fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String, ConfigError> {
    String::from_utf8(bytes).map_err(|e| {
        let before = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        ConfigError::Parse {
            path: path.to_path_buf(),
            line: before.iter().filter(|&&b| b == b'\n').count() + 1,
            column: None,
            problem: "not UTF-8 text".into(),
        }
    })
}

fn read_cluster_env(path: &Path) -> Result<Vec<cluster_env::Assignment>, ConfigError> {
    let text = utf8(path, read(path)?)?;
    cluster_env::parse(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        line: e.line,
        column: Some(e.column),
        problem: e.problem,
    })
}

/// The file's text and its `defaultConfig`; a missing file is Istio's defaults.
fn read_mesh_config(path: &Path) -> Result<(String, ProxyConfig), ConfigError> {
    let Some(bytes) = read_optional(path)? else {
        tracing::warn!(path = %path.display(), "no mesh config: using Istio's defaults and no readiness probe");
        return Ok((String::new(), ProxyConfig::default()));
    };
    let text = utf8(path, bytes)?;
    let pc = mesh::parse_mesh_config(&text).map_err(|e| match e.line {
        Some(line) => ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column: e.column,
            problem: e.problem,
        },
        None => ConfigError::File {
            path: path.to_path_buf(),
            problem: e.problem,
        },
    })?;
    Ok((text, pc))
}

fn read_root_certs(path: &Path) -> Result<RootCerts, ConfigError> {
    let text = utf8(path, read(path)?)?;
    RootCerts::parse(&text).map_err(|e| match e.line {
        Some(line) => ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column: None,
            problem: e.problem,
        },
        None => ConfigError::File {
            path: path.to_path_buf(),
            problem: e.problem,
        },
    })
}

fn read_token(path: &Path) -> Result<Option<IstioToken>, ConfigError> {
    let Some(bytes) = read_optional(path)? else {
        return Ok(None);
    };
    IstioToken::parse(&bytes)
        .map(Some)
        .map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            line: e.line,
            column: e.column,
            problem: e.problem,
        })
}

fn read_hosts(path: &Path) -> Result<Vec<HostsEntry>, ConfigError> {
    let Some(bytes) = read_optional(path)? else {
        tracing::info!(path = %path.display(), "no hosts file");
        return Ok(Vec::new());
    };
    let text = utf8(path, bytes)?;
    hosts::parse(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        line: e.line,
        column: Some(e.column),
        problem: e.problem,
    })
}

impl fmt::Display for InboundPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::Ports(ports) => {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                f.write_str(&list.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/onboarding")
            .join(rel)
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(dir: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::load(&OnboardingPaths::in_dir(testdata(dir)), &env(pairs))
    }

    #[test]
    fn ratings_vm() {
        let c = load("ratings-vm", &[]).unwrap();
        assert_eq!(
            c.spiffe_id(),
            "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa"
        );
        assert_eq!(c.namespace, "vm-ns");
        assert_eq!(c.service_account, "ratings-sa");
        assert_eq!(c.workload_name.as_deref(), Some("ratings-vm"));
        assert_eq!(c.cluster_id.as_deref(), Some("cluster1"));
        assert_eq!(c.mesh_id.as_deref(), Some("mesh1"));
        assert_eq!(c.network.as_deref(), Some("vm-network"));
        assert_eq!(c.service_cluster, "ratings-vm.vm-ns");
        assert_eq!(c.canonical_service.as_deref(), Some("ratings"));
        assert_eq!(c.canonical_revision.as_deref(), Some("v2"));
        assert_eq!(c.labels["app"], "ratings");
        assert_eq!(c.labels["service.istio.io/canonical-revision"], "v2");
        assert_eq!(c.labels.len(), 4);
        assert_eq!(
            c.metadata.keys().collect::<Vec<_>>(),
            [
                "AUTO_REGISTER_GROUP",
                "CLUSTER_ID",
                "DNS_CAPTURE",
                "MESH_ID",
                "NETWORK",
                "POD_PORTS",
                "WORKLOAD_NAME"
            ]
        );
        assert_eq!(c.metadata["AUTO_REGISTER_GROUP"], "ratings-vm");
        assert_eq!(c.discovery_address, "istiod.istio-system.svc:15012");
        assert_eq!(c.ca_address, "istiod.istio-system.svc:15012");
        assert_eq!(c.inbound_ports, InboundPorts::Ports(vec![9080]));
        assert!(c.dns_capture);
        assert!(matches!(
            c.readiness_probe.as_ref().unwrap().method,
            ProbeMethod::HttpGet(_)
        ));
        assert_eq!(
            c.environment,
            env(&[
                ("ISTIO_LOCAL_EXCLUDE_PORTS", "22,15090,15021,15020"),
                ("ISTIO_SERVICE_CIDR", "*"),
            ])
        );
        assert_eq!(c.root_certs.certificates.len(), 1);
        assert_eq!(
            c.hosts[0].to_string(),
            "34.120.10.7 istiod.istio-system.svc"
        );
        let token = c.istio_token.as_ref().unwrap();
        assert_eq!(token.claims.as_ref().unwrap().audiences, ["istio-ca"]);
        assert_eq!(c.instance_ip, None);
        assert_eq!(c.pod_name, None);
    }

    #[test]
    fn billing_vm_revisioned_empty_trust_domain() {
        let c = load("billing-vm", &[]).unwrap();
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(
            c.spiffe_id(),
            "spiffe://cluster.local/ns/payments/sa/billing-sa"
        );
        assert_eq!(c.discovery_address, "istiod-canary.istio-system.svc:15012");
        assert_eq!(c.ca_address, "istiod-canary.istio-system.svc:15012");
        assert_eq!(c.mesh_id, None);
        assert_eq!(c.network, None);
        assert_eq!(c.metadata["MESH_ID"], "");
        assert_eq!(
            c.metadata["VM_NOTE"],
            "payments team's batch VMs (ticket #4711)"
        );
        assert_eq!(c.instance_ip, Some("10.0.0.12".parse().unwrap()));
        assert_eq!(c.inbound_ports, InboundPorts::Ports(vec![7070, 8080]));
        assert!(!c.dns_capture);
        assert!(c.hosts.is_empty());
        assert_eq!(c.root_certs.certificates.len(), 2);
    }

    #[test]
    fn environment_overrides_files() {
        let c = load(
            "ratings-vm",
            &[
                ("POD_NAMESPACE", "other-ns"),
                ("SERVICE_ACCOUNT", "other-sa"),
                ("TRUST_DOMAIN", "example.org"),
                ("CA_ADDR", "10.1.2.3:15012"),
                ("ISTIO_META_NETWORK", "net2"),
                ("ISTIO_META_EXTRA", "x"),
                ("ISTIO_METAJSON_LABELS", r#"{"app":"env"}"#),
                ("ISTIO_SERVICE_CIDR", "10.0.0.0/8"),
                ("ISTIO_META_DNS_CAPTURE", "false"),
                ("INSTANCE_IP", "192.168.1.5"),
                ("POD_NAME", "vm-1"),
                ("PATH", "/usr/bin"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.spiffe_id(),
            "spiffe://example.org/ns/other-ns/sa/other-sa"
        );
        assert_eq!(c.ca_address, "10.1.2.3:15012");
        assert_eq!(c.discovery_address, "istiod.istio-system.svc:15012");
        assert_eq!(c.network.as_deref(), Some("net2"));
        assert_eq!(c.metadata["NETWORK"], "net2");
        assert_eq!(c.metadata["EXTRA"], "x");
        assert_eq!(c.labels, env(&[("app", "env")]));
        assert_eq!(c.environment["ISTIO_SERVICE_CIDR"], "10.0.0.0/8");
        assert!(!c.environment.contains_key("PATH"));
        assert!(!c.dns_capture);
        assert_eq!(c.instance_ip, Some("192.168.1.5".parse().unwrap()));
        assert_eq!(c.pod_name.as_deref(), Some("vm-1"));
    }

    #[test]
    fn precedence_mesh_then_cluster_env_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["root-cert.pem", "istio-token", "hosts"] {
            std::fs::copy(testdata("ratings-vm").join(f), dir.path().join(f)).unwrap();
        }
        std::fs::write(
            dir.path().join("mesh.yaml"),
            "defaultConfig:\n  meshId: from-mesh-id\n  proxyMetadata:\n    POD_NAMESPACE: mesh-ns\n    \
             SERVICE_ACCOUNT: mesh-sa\n    ISTIO_META_A: mesh\n    ISTIO_META_B: mesh\n    \
             ISTIO_META_C: mesh\n    ISTIO_META_D: mesh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("cluster.env"),
            "SERVICE_ACCOUNT='env-sa'\nISTIO_META_B='cluster.env'\nISTIO_META_C='cluster.env'\n",
        )
        .unwrap();
        let paths = OnboardingPaths::in_dir(dir.path());
        let c = Config::load(&paths, &env(&[("ISTIO_META_C", "process")])).unwrap();
        assert_eq!(c.namespace, "mesh-ns");
        assert_eq!(c.service_account, "env-sa");
        assert_eq!(c.mesh_id.as_deref(), Some("from-mesh-id"));
        assert_eq!(
            c.metadata,
            env(&[
                ("A", "mesh"),
                ("B", "cluster.env"),
                ("C", "process"),
                ("D", "mesh")
            ])
        );

        // PROXY_CONFIG sits between mesh.yaml and cluster.env.
        let c = Config::load(
            &paths,
            &env(&[(
                "PROXY_CONFIG",
                "discoveryAddress: 10.9.9.9:15012\nproxyMetadata:\n  ISTIO_META_A: pc\n  ISTIO_META_B: pc\n\
                 readinessProbe:\n  tcpSocket:\n    port: 22\nserviceCluster: ignored\n",
            )]),
        )
        .unwrap();
        assert_eq!(c.discovery_address, "10.9.9.9:15012");
        assert_eq!(c.ca_address, "10.9.9.9:15012");
        assert_eq!(c.metadata["A"], "pc");
        assert_eq!(c.metadata["B"], "cluster.env");
        assert!(matches!(
            c.readiness_probe.unwrap().method,
            ProbeMethod::TcpSocket(_)
        ));

        // No mesh.yaml: Istio's defaults.
        std::fs::remove_file(dir.path().join("mesh.yaml")).unwrap();
        std::fs::remove_file(dir.path().join("istio-token")).unwrap();
        std::fs::remove_file(dir.path().join("hosts")).unwrap();
        let c = Config::load(&paths, &env(&[("POD_NAMESPACE", "ns")])).unwrap();
        assert_eq!(c.discovery_address, DEFAULT_DISCOVERY_ADDRESS);
        assert_eq!(c.readiness_probe, None);
        assert_eq!(c.istio_token, None);
        assert!(c.hosts.is_empty());
        assert_eq!(c.inbound_ports, InboundPorts::Ports(vec![]));
        assert_eq!(c.service_cluster, "istio-proxy");
    }

    fn message(dir: &str, pairs: &[(&str, &str)]) -> String {
        let e = load(dir, pairs).unwrap_err().to_string();
        let prefix = testdata("").display().to_string();
        e.replace(&prefix, "")
    }

    #[test]
    fn bad_fixtures_name_file_line_and_problem() {
        assert_eq!(
            message("bad/cluster-env-unterminated-quote", &[]),
            "bad/cluster-env-unterminated-quote/cluster.env:11:20: unterminated single quote: \
             the value runs on into line 12, which looks like the next KEY=value"
        );
        assert_eq!(
            message("bad/cluster-env-not-assignment", &[]),
            "bad/cluster-env-not-assignment/cluster.env:10:19: expected `=` after \
             `ISTIO_META_NETWORK`, found `:`: each line must be KEY=value (no spaces around `=`)"
        );
        let m = message("bad/cluster-env-bad-labels", &[]);
        assert!(
            m.starts_with(
                "bad/cluster-env-bad-labels/cluster.env:5: ISTIO_METAJSON_LABELS: not a JSON \
                 object of string labels: expected value at line 1 column"
            ),
            "{m}"
        );
        let m = message("bad/mesh-yaml-named-port", &[]);
        assert!(
            m.starts_with(
                "bad/mesh-yaml-named-port/mesh.yaml:21:13: defaultConfig.readinessProbe.httpGet.port: \
                 invalid type: string \"http\""
            ),
            "{m}"
        );
        let m = message("bad/mesh-yaml-bad-indent", &[]);
        assert!(
            m.starts_with("bad/mesh-yaml-bad-indent/mesh.yaml:11:"),
            "{m}"
        );
        assert_eq!(
            message("bad/root-cert-truncated", &[]),
            "bad/root-cert-truncated/root-cert.pem:1: the CERTIFICATE block has no END line \
             (is the file truncated?)"
        );
        let m = message("bad/root-cert-configmap-json", &[]);
        assert!(m.starts_with("bad/root-cert-configmap-json/root-cert.pem: no PEM CERTIFICATE block on lines of its own"), "{m}");
        assert_eq!(
            message("bad/hosts-reversed", &[]),
            "bad/hosts-reversed/hosts:1:1: `istiod.istio-system.svc` is not an IP address \
             (a line is `IP name [alias...]`)"
        );
        assert_eq!(
            message("bad/token-bearer-prefix", &[]),
            "bad/token-bearer-prefix/istio-token:1:7: unexpected space: the file must hold only \
             the token, without a `Bearer ` prefix or quotes"
        );
    }

    #[test]
    fn bad_values_name_their_origin() {
        let m = message("ratings-vm", &[("ISTIO_INBOUND_PORTS", "9080,http")]);
        assert_eq!(
            m,
            "environment variable ISTIO_INBOUND_PORTS: `http` is not a port; expected `*` or \
             ports like `9080,9443`"
        );
        let m = message("ratings-vm", &[("ISTIO_META_DNS_CAPTURE", "yes")]);
        assert_eq!(
            m,
            "environment variable ISTIO_META_DNS_CAPTURE: `yes` is not true or false"
        );
        let m = message("ratings-vm", &[("CA_ADDR", "istiod.istio-system.svc")]);
        assert!(
            m.contains("CA_ADDR: `istiod.istio-system.svc` is not host:port"),
            "{m}"
        );
        let m = message("ratings-vm", &[("SERVICE_ACCOUNT", "Ratings SA")]);
        assert!(
            m.contains("SERVICE_ACCOUNT: `Ratings SA` is not a Kubernetes name"),
            "{m}"
        );
        let m = message("billing-vm", &[("ISTIO_SVC_IP", "vm.example")]);
        assert_eq!(
            m,
            "environment variable ISTIO_SVC_IP: `vm.example` is not an IP address"
        );
        let m = message("ratings-vm", &[("PROXY_CONFIG", "discoveryAddress: [x")]);
        assert!(
            m.starts_with("environment variable PROXY_CONFIG: line 1:"),
            "{m}"
        );
        let m = message("ratings-vm", &[("PROXY_CONFIG", "discoveryAddress: nope")]);
        assert_eq!(
            m,
            "environment variable PROXY_CONFIG: defaultConfig.discoveryAddress: `nope` is not host:port"
        );
        let m = message("ratings-vm", &[("TRUST_DOMAIN", "a/b")]);
        assert_eq!(
            m,
            "environment variable TRUST_DOMAIN: a trust domain has no `/` or spaces"
        );
    }

    #[test]
    fn bad_values_in_files_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["root-cert.pem", "mesh.yaml"] {
            std::fs::copy(testdata("ratings-vm").join(f), dir.path().join(f)).unwrap();
        }
        let paths = OnboardingPaths::in_dir(dir.path());
        let shown = |e: ConfigError| e.to_string().replace(&dir.path().display().to_string(), "");
        std::fs::write(
            dir.path().join("cluster.env"),
            "# x\nISTIO_SVC_IP='10.0.0.300'\n",
        )
        .unwrap();
        assert_eq!(
            shown(Config::load(&paths, &BTreeMap::new()).unwrap_err()),
            "/cluster.env:2: ISTIO_SVC_IP: `10.0.0.300` is not an IP address"
        );
        // A bad value from mesh.yaml's proxyMetadata names mesh.yaml's line.
        std::fs::write(dir.path().join("cluster.env"), "").unwrap();
        let mesh = std::fs::read_to_string(dir.path().join("mesh.yaml"))
            .unwrap()
            .replace(
                "ISTIO_META_DNS_CAPTURE: \"true\"",
                "ISTIO_META_DNS_CAPTURE: \"on\"",
            );
        std::fs::write(dir.path().join("mesh.yaml"), mesh).unwrap();
        assert_eq!(
            shown(Config::load(&paths, &BTreeMap::new()).unwrap_err()),
            "/mesh.yaml:9: ISTIO_META_DNS_CAPTURE: `on` is not true or false"
        );
        std::fs::write(
            dir.path().join("mesh.yaml"),
            "defaultConfig:\n  discoveryAddress: istiod\n",
        )
        .unwrap();
        assert_eq!(
            shown(
                Config::load(
                    &paths,
                    &env(&[("POD_NAMESPACE", "a"), ("SERVICE_ACCOUNT", "b")])
                )
                .unwrap_err()
            ),
            "/mesh.yaml:2: defaultConfig.discoveryAddress: `istiod` is not host:port"
        );
        // Missing required settings and files.
        assert_eq!(
            shown(Config::load(&paths, &BTreeMap::new()).unwrap_err()),
            "POD_NAMESPACE is not set in /cluster.env or the environment"
        );
        std::fs::write(dir.path().join("mesh.yaml"), "").unwrap();
        std::fs::remove_file(dir.path().join("root-cert.pem")).unwrap();
        let e = Config::load(
            &paths,
            &env(&[("POD_NAMESPACE", "a"), ("SERVICE_ACCOUNT", "b")]),
        )
        .unwrap_err();
        assert!(
            matches!(&e, ConfigError::Read { error, .. } if error.kind() == io::ErrorKind::NotFound)
        );
        assert!(shown(e).starts_with("/root-cert.pem: No such file or directory"));
        std::fs::write(dir.path().join("cluster.env"), b"A='\xff'\n").unwrap();
        assert_eq!(
            shown(Config::load(&paths, &BTreeMap::new()).unwrap_err()),
            "/cluster.env:1: not UTF-8 text"
        );
    }

    #[test]
    fn cluster_domain_from_the_environment() {
        assert_eq!(
            load("ratings-vm", &[]).unwrap().cluster_domain,
            "cluster.local"
        );
        let c = load("ratings-vm", &[("CLUSTER_DOMAIN", "corp.example.")]).unwrap();
        assert_eq!(c.cluster_domain, "corp.example");
        assert!(!c.environment.contains_key("CLUSTER_DOMAIN"));
        for bad in [
            "Corp.example",
            "corp..example",
            "-corp.example",
            "corp example",
            ".",
        ] {
            let m = message("ratings-vm", &[("CLUSTER_DOMAIN", bad)]);
            assert!(
                m.starts_with(&format!(
                    "environment variable CLUSTER_DOMAIN: `{bad}` is not a domain"
                )),
                "{m}"
            );
        }
        assert_eq!(parse_cluster_domain("a-1.b"), Ok("a-1.b".into()));
    }

    #[test]
    fn dns_forwarding_from_the_environment() {
        let c = load("ratings-vm", &[]).unwrap();
        assert!(!c.dns_forward_parallel);
        assert_eq!(c.dns_forward_timeout, Duration::from_secs(5));
        let c = load(
            "ratings-vm",
            &[
                ("DNS_FORWARD_PARALLEL", "true"),
                ("DNS_FORWARD_TIMEOUT", "1.5s"),
            ],
        )
        .unwrap();
        assert!(c.dns_forward_parallel);
        assert_eq!(c.dns_forward_timeout, Duration::from_millis(1500));
        assert!(!c.environment.contains_key("DNS_FORWARD_TIMEOUT"));
        assert_eq!(
            message("ratings-vm", &[("DNS_FORWARD_TIMEOUT", "0s")]),
            "environment variable DNS_FORWARD_TIMEOUT: `0s`: the timeout must be above 0"
        );
        assert_eq!(
            message("ratings-vm", &[("DNS_FORWARD_TIMEOUT", "5")]),
            "environment variable DNS_FORWARD_TIMEOUT: `5` has a number without a unit (ns, ms, s, m, h)"
        );
        assert_eq!(
            message("ratings-vm", &[("DNS_FORWARD_PARALLEL", "yes")]),
            "environment variable DNS_FORWARD_PARALLEL: `yes` is not true or false"
        );
    }

    #[test]
    fn addresses() {
        for ok in [
            "istiod.istio-system.svc:15012",
            "10.0.0.1:15012",
            "[fd00::1]:15012",
            "localhost:1",
        ] {
            assert_eq!(check_address(ok), Ok(()), "{ok}");
        }
        for bad in [
            "istiod",
            ":15012",
            "istiod:0",
            "istiod:http",
            "fd00::1:15012",
            "[x]:1",
            "a b:1",
        ] {
            assert!(check_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_and_report_hide_the_token() {
        let c = load("ratings-vm", &[]).unwrap();
        let token = std::fs::read_to_string(testdata("ratings-vm/istio-token")).unwrap();
        let debug = format!("{c:?}");
        let json = serde_json::to_string(&c.report()).unwrap();
        let yaml = serde_norway::to_string(&c.report()).unwrap();
        for shown in [&debug, &json, &yaml] {
            assert!(!shown.contains(&token));
            assert!(!shown.contains(&token[token.len() - 40..]));
            assert!(shown.contains("<redacted, 885 bytes"), "{shown}");
        }
        assert!(
            yaml.starts_with("spiffe-id: spiffe://cluster.local/ns/vm-ns/sa/ratings-sa\n"),
            "{yaml}"
        );
    }
}
