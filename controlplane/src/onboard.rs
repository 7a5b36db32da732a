//! `meshvm-controlplane onboard`: the five files `istioctl x workload entry
//! configure -f workloadgroup.yaml -o DIR` writes for a VM, made with this
//! control plane's CA instead of a cluster's (istio/istio
//! `istioctl/pkg/workload/workload.go`):
//!
//! - `cluster.env`: the proxy metadata plus start-script settings, one
//!   `KEY=value` per line, sorted, values shell-quoted as istioctl quotes them;
//! - `mesh.yaml`: `defaultConfig` with `discoveryAddress`, `meshId`,
//!   `proxyMetadata` and `readinessProbe` (the WorkloadGroup's probe), plus
//!   any `proxy.istio.io/config` annotation, written as go-yaml writes it;
//! - `root-cert.pem`: the mesh root;
//! - `istio-token`: a bootstrap token for the group's service account,
//!   audience `istio-ca` (one line, no newline);
//! - `hosts`: `<ingress IP> istiod.istio-system.svc` with `--ingress-ip`,
//!   else empty.
//!
//! Differences from istioctl: the mesh settings (cluster id, mesh id,
//! discovery address, revision) come from options instead of the cluster's
//! config maps; the inbound ports are listed in port-name order (istioctl
//! iterates a Go map); `istio-token` is written 0600 and the other files 0644
//! (istioctl: 0744 for all). Every file is written atomically.

pub mod shell;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::ca::{MeshCa, TokenError};
use crate::config::manifest::{Object, parse_manifests};
use crate::config::{ManifestError, ManifestProblem};
use crate::files;
use crate::yaml::{self, Node};

pub use crate::config::WorkloadGroup;

/// `--clusterID` when the cluster does not name itself
/// (`global.multiCluster.clusterName` default).
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// The namespace istiod runs in.
pub const ISTIO_NAMESPACE: &str = "istio-system";
/// istiod's xDS/CA port.
pub const ISTIOD_PORT: u16 = 15012;
/// The annotation holding ProxyConfig overrides.
pub const PROXY_CONFIG_ANNOTATION: &str = "proxy.istio.io/config";

pub const CLUSTER_ENV_FILE: &str = "cluster.env";
pub const MESH_CONFIG_FILE: &str = "mesh.yaml";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const TOKEN_FILE: &str = "istio-token";
pub const HOSTS_FILE: &str = "hosts";

/// istioctl's flags that shape the files.
#[derive(Debug, Clone)]
pub struct OnboardOptions {
    /// `--clusterID`.
    pub cluster_id: String,
    /// The mesh config's `defaultConfig.meshId`.
    pub mesh_id: Option<String>,
    /// The mesh config's `defaultConfig.discoveryAddress`; default
    /// `istiod[-<rev>].istio-system.svc:15012`.
    pub discovery_address: Option<String>,
    /// `--revision`: a revisioned istiod (`CA_ADDR`, the hosts name).
    pub revision: Option<String>,
    /// `--ingressIP`: the gateway address for the `hosts` file.
    pub ingress_ip: Option<IpAddr>,
    /// `--internalIP`: the VM's address (`ISTIO_SVC_IP`).
    pub internal_ip: Option<IpAddr>,
    /// `--externalIP`: the VM's address seen from outside (`ISTIO_SVC_IP`,
    /// and probes rewritten to localhost).
    pub external_ip: Option<IpAddr>,
    /// `--tokenDuration`.
    pub token_duration: Duration,
    /// `--autoregister`: the VM's WorkloadEntry is created when it connects.
    pub autoregister: bool,
    /// `--capture-dns`.
    pub capture_dns: bool,
}

impl Default for OnboardOptions {
    fn default() -> Self {
        Self {
            cluster_id: DEFAULT_CLUSTER_ID.into(),
            mesh_id: None,
            discovery_address: None,
            revision: None,
            ingress_ip: None,
            internal_ip: None,
            external_ip: None,
            token_duration: crate::ca::token::DEFAULT_TOKEN_LIFETIME,
            autoregister: false,
            capture_dns: true,
        }
    }
}

impl OnboardOptions {
    fn revision(&self) -> Option<&str> {
        self.revision
            .as_deref()
            .filter(|r| !r.is_empty() && *r != "default")
    }

    /// `istiod[-<rev>].istio-system.svc`.
    pub fn istiod_host(&self) -> String {
        match self.revision() {
            Some(rev) => format!("istiod-{rev}.{ISTIO_NAMESPACE}.svc"),
            None => format!("istiod.{ISTIO_NAMESPACE}.svc"),
        }
    }

    /// `istiod[-<rev>].istio-system.svc:15012`.
    pub fn istiod_address(&self) -> String {
        format!("{}:{ISTIOD_PORT}", self.istiod_host())
    }
}

/// Why onboarding failed.
#[derive(Debug, thiserror::Error)]
pub enum OnboardError {
    #[error("{}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("{0}")]
    Manifest(Box<ManifestError>),
    #[error("{}: expected one WorkloadGroup, found {count} objects", path.display())]
    NotOneObject { path: PathBuf, count: usize },
    #[error("annotation {PROXY_CONFIG_ANNOTATION}: {0}")]
    ProxyConfig(String),
    #[error("--internal-ip and --external-ip are mutually exclusive")]
    BothIps,
    #[error("istio-token: {0}")]
    Token(TokenError),
    #[error("{}: {error}", path.display())]
    Write { path: PathBuf, error: io::Error },
}

from_error!(TokenError => OnboardError::Token);

/// The five files' contents.
#[derive(Clone)]
pub struct OnboardingFiles {
    pub cluster_env: String,
    pub mesh_yaml: String,
    pub root_cert: String,
    pub istio_token: String,
    pub hosts: String,
}

impl fmt::Debug for OnboardingFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnboardingFiles")
            .field("cluster_env", &self.cluster_env)
            .field("mesh_yaml", &self.mesh_yaml)
            .field("root_cert", &self.root_cert)
            .field(
                "istio_token",
                &format_args!("<redacted, {} bytes>", self.istio_token.len()),
            )
            .field("hosts", &self.hosts)
            .finish()
    }
}

impl OnboardingFiles {
    /// Writes the files into `dir` (created if missing), each atomically.
    pub fn write_to(&self, dir: &Path) -> Result<(), OnboardError> {
        files::create_dir(dir, 0o755).map_err(|error| OnboardError::Write {
            path: dir.to_path_buf(),
            error,
        })?;
        for (name, contents, mode) in [
            (CLUSTER_ENV_FILE, &self.cluster_env, files::PUBLIC_MODE),
            (MESH_CONFIG_FILE, &self.mesh_yaml, files::PUBLIC_MODE),
            (ROOT_CERT_FILE, &self.root_cert, files::PUBLIC_MODE),
            (TOKEN_FILE, &self.istio_token, files::SECRET_MODE),
            (HOSTS_FILE, &self.hosts, files::PUBLIC_MODE),
        ] {
            let path = dir.join(name);
            files::write_atomic(&path, contents.as_bytes(), mode)
                .map_err(|error| OnboardError::Write { path, error })?;
        }
        Ok(())
    }
}

/// Reads a WorkloadGroup manifest file (one document, with a namespace:
/// onboarding has no default namespace to fall back on).
pub fn read_workload_group(path: &Path) -> Result<WorkloadGroup, OnboardError> {
    let text = std::fs::read_to_string(path).map_err(|error| OnboardError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let (mut objects, errors) = parse_manifests(path, &text);
    if let Some(error) = errors.into_iter().next() {
        return Err(OnboardError::Manifest(Box::new(error)));
    }
    if objects.len() != 1 {
        return Err(OnboardError::NotOneObject {
            path: path.to_path_buf(),
            count: objects.len(),
        });
    }
    match objects.remove(0) {
        (Object::WorkloadGroup(wg), source) => match wg.metadata.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => Ok(wg),
            _ => Err(OnboardError::Manifest(Box::new(ManifestError {
                file: path.to_path_buf(),
                document: Some(source.document),
                item: None,
                line: Some(source.line),
                problem: ManifestProblem::field(
                    "metadata.namespace",
                    "not set; onboarding needs the namespace",
                ),
            }))),
        },
        (other, source) => Err(OnboardError::Manifest(Box::new(ManifestError {
            file: path.to_path_buf(),
            document: Some(source.document),
            item: source.item,
            line: Some(source.line),
            problem: ManifestProblem::WrongKind {
                found: other.kind().to_string(),
                expected: crate::config::workload_group::KIND,
            },
        }))),
    }
}

/// One entry of `ISTIO_META_POD_PORTS` (istio `model.PodPort`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PodPort<'a> {
    name: &'a str,
    container_port: u32,
    protocol: &'a str,
}

/// Makes the onboarding files for `wg` with `ca`'s root and a fresh token.
pub fn render(
    wg: &WorkloadGroup,
    options: &OnboardOptions,
    ca: &MeshCa,
) -> Result<OnboardingFiles, OnboardError> {
    if options.internal_ip.is_some() && options.external_ip.is_some() {
        return Err(OnboardError::BothIps);
    }
    let name = wg.metadata.name.as_str();
    let namespace = wg.namespace();
    let service_account = wg.service_account();
    let template = &wg.spec.template;

    // mesh.yaml defaultConfig: the mesh's settings, then the annotations.
    let mut config: BTreeMap<String, Node> = BTreeMap::new();
    config.insert(
        "discoveryAddress".into(),
        Node::str(
            options
                .discovery_address
                .clone()
                .unwrap_or_else(|| options.istiod_address()),
        ),
    );
    if let Some(mesh_id) = options.mesh_id.as_deref().filter(|m| !m.is_empty()) {
        config.insert("meshId".into(), Node::str(mesh_id));
    }
    let mut metadata: BTreeMap<String, String> = BTreeMap::new();
    for annotations in [&wg.metadata.annotations, &wg.spec.metadata.annotations] {
        if let Some(text) = annotations.get(PROXY_CONFIG_ANNOTATION) {
            apply_proxy_config(&mut config, &mut metadata, text)?;
        }
    }
    // As istioctl: the group's probe replaces any from the annotations.
    config.remove("readinessProbe");
    if let Some(probe) = &wg.spec.probe {
        config.insert("readinessProbe".into(), probe.to_node());
    }

    let mut labels = wg.spec.metadata.labels.clone();
    labels.extend(template.labels.clone());
    let (canonical_service, canonical_revision) = canonical_service(&labels, name);
    let mesh_id = match config.get("meshId") {
        Some(Node::Str(s)) => s.clone(),
        _ => String::new(),
    };
    metadata.insert("CANONICAL_SERVICE".into(), canonical_service.clone());
    metadata.insert("CANONICAL_REVISION".into(), canonical_revision.clone());
    metadata.insert("POD_NAMESPACE".into(), namespace.into());
    metadata.insert("SERVICE_ACCOUNT".into(), service_account.into());
    metadata.insert("TRUST_DOMAIN".into(), ca.trust_domain().into());
    metadata.insert("ISTIO_META_CLUSTER_ID".into(), options.cluster_id.clone());
    metadata.insert("ISTIO_META_MESH_ID".into(), mesh_id);
    metadata.insert("ISTIO_META_NETWORK".into(), template.network.clone());
    if !template.ports.is_empty() {
        let ports: Vec<PodPort<'_>> = template
            .ports
            .iter()
            .map(|(name, port)| PodPort {
                name,
                container_port: *port,
                protocol: "",
            })
            .collect();
        metadata.insert(
            "ISTIO_META_POD_PORTS".into(),
            serde_json::to_string(&ports).expect("serializable"),
        );
    }
    metadata.insert("ISTIO_META_WORKLOAD_NAME".into(), name.into());
    labels.insert("service.istio.io/canonical-name".into(), canonical_service);
    labels.insert(
        "service.istio.io/canonical-revision".into(),
        canonical_revision,
    );
    metadata.insert(
        "ISTIO_METAJSON_LABELS".into(),
        serde_json::to_string(&labels).expect("serializable"),
    );
    if options.capture_dns {
        metadata.insert("ISTIO_META_DNS_CAPTURE".into(), "true".into());
    }
    if options.autoregister {
        metadata.insert("ISTIO_META_AUTO_REGISTER_GROUP".into(), name.into());
    }
    config.insert(
        "proxyMetadata".into(),
        Node::Map(
            metadata
                .iter()
                .map(|(k, v)| (k.clone(), Node::str(v)))
                .collect(),
        ),
    );
    let status_port = match config.get("statusPort") {
        Some(Node::Int(p)) => *p,
        Some(Node::Str(s)) => s.parse().unwrap_or(0),
        _ => 0,
    };
    let mesh_yaml = yaml::to_string(&BTreeMap::from([(
        "defaultConfig".to_string(),
        Node::Map(config),
    )]));

    // cluster.env: the proxy metadata, then the start script's settings.
    let mut env = metadata;
    let inbound_ports = if template.ports.is_empty() {
        "*".to_string()
    } else {
        template
            .ports
            .values()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut exclude_ports = "22,15090,15021".to_string();
    match status_port {
        15090 | 15021 => {}
        0 => exclude_ports.push_str(",15020"),
        port => exclude_ports.push_str(&format!(",{port}")),
    }
    env.insert("ISTIO_INBOUND_PORTS".into(), inbound_ports);
    env.insert("ISTIO_NAMESPACE".into(), namespace.into());
    env.insert("ISTIO_SERVICE".into(), format!("{name}.{namespace}"));
    env.insert("ISTIO_SERVICE_CIDR".into(), "*".into());
    env.insert("ISTIO_LOCAL_EXCLUDE_PORTS".into(), exclude_ports);
    env.insert("SERVICE_ACCOUNT".into(), service_account.into());
    if options.revision().is_some() {
        env.insert("CA_ADDR".into(), options.istiod_address());
    }
    if let Some(ip) = options.internal_ip {
        env.insert("ISTIO_SVC_IP".into(), ip.to_string());
    } else if let Some(ip) = options.external_ip {
        env.insert("ISTIO_SVC_IP".into(), ip.to_string());
        env.insert(
            "REWRITE_PROBE_LEGACY_LOCALHOST_DESTINATION".into(),
            "true".into(),
        );
    }
    let cluster_env = shell::env_file(&env);

    let istio_token = ca
        .tokens()
        .mint(namespace, service_account, options.token_duration)?;

    let hosts = match options.ingress_ip {
        Some(ip) => format!("{ip} {}\n", options.istiod_host()),
        None => {
            tracing::warn!(
                "no --ingress-ip: `hosts` is empty; the VM must resolve {} itself",
                options.istiod_host()
            );
            String::new()
        }
    };

    Ok(OnboardingFiles {
        cluster_env,
        mesh_yaml,
        root_cert: ca.root_cert_pem().to_string(),
        istio_token,
        hosts,
    })
}

/// Applies a `proxy.istio.io/config` annotation (a ProxyConfig in YAML) to
/// `config`: its fields replace the mesh's, its `proxyMetadata` entries are
/// merged into `metadata`.
fn apply_proxy_config(
    config: &mut BTreeMap<String, Node>,
    metadata: &mut BTreeMap<String, String>,
    text: &str,
) -> Result<(), OnboardError> {
    let value: serde_norway::Value =
        serde_norway::from_str(text).map_err(|e| OnboardError::ProxyConfig(e.to_string()))?;
    let map = match value {
        serde_norway::Value::Null => return Ok(()),
        serde_norway::Value::Mapping(map) => map,
        _ => return Err(OnboardError::ProxyConfig("not a YAML mapping".into())),
    };
    for (key, value) in &map {
        let Some(key) = key.as_str() else {
            return Err(OnboardError::ProxyConfig(format!(
                "key {key:?} is not a string"
            )));
        };
        // protojson accepts the proto field name too.
        let key = camel_case(key);
        if key == "proxyMetadata" {
            let entries: BTreeMap<String, String> = serde_norway::from_value(value.clone())
                .map_err(|e| {
                    OnboardError::ProxyConfig(format!("proxyMetadata: {e} (values are strings)"))
                })?;
            metadata.extend(entries);
        } else {
            config.insert(key, Node::from_yaml(value));
        }
    }
    Ok(())
}

fn camel_case(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// istio `labels.CanonicalService`: the canonical service name and revision.
pub fn canonical_service(
    labels: &BTreeMap<String, String>,
    workload_name: &str,
) -> (String, String) {
    let first = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()).cloned())
    };
    let service = first(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .unwrap_or_else(|| workload_name.to_string());
    let revision = first(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".to_string());
    (service, revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        let labels = BTreeMap::from([
            ("app".to_string(), "ratings".to_string()),
            ("version".to_string(), "v2".to_string()),
        ]);
        assert_eq!(
            canonical_service(&labels, "wg"),
            ("ratings".into(), "v2".into())
        );
        assert_eq!(
            canonical_service(&BTreeMap::new(), "wg"),
            ("wg".into(), "latest".into())
        );
    }

    #[test]
    fn snake_case_proxy_config_keys() {
        assert_eq!(camel_case("proxy_metadata"), "proxyMetadata");
        assert_eq!(camel_case("statusPort"), "statusPort");
    }
}
