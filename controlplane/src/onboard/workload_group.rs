//! The WorkloadGroup manifest (`networking.istio.io/v1`, `v1beta1` or
//! `v1alpha3`), as far as onboarding reads it.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::yaml::Node;

/// API versions a WorkloadGroup may have.
pub const API_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// A WorkloadGroup.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadGroup {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadGroupSpec,
}

/// The object's metadata (other Kubernetes fields are ignored).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadGroupSpec {
    /// Labels and annotations for the WorkloadEntries.
    #[serde(default)]
    pub metadata: EntryMeta,
    /// The WorkloadEntry template.
    #[serde(default)]
    pub template: Template,
    /// The readiness probe (mesh.yaml `readinessProbe`).
    #[serde(default)]
    pub probe: Option<Probe>,
}

/// `spec.metadata`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryMeta {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `spec.template`: a WorkloadEntry without its address.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Template {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub locality: Option<String>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: Option<String>,
}

/// `spec.probe` (istio.networking.v1alpha3.ReadinessProbe).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    #[serde(default)]
    pub initial_delay_seconds: i32,
    #[serde(default)]
    pub timeout_seconds: i32,
    #[serde(default)]
    pub period_seconds: i32,
    #[serde(default)]
    pub success_threshold: i32,
    #[serde(default)]
    pub failure_threshold: i32,
    #[serde(default)]
    pub http_get: Option<HttpGet>,
    #[serde(default)]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default)]
    pub exec: Option<Exec>,
    #[serde(default)]
    pub grpc: Option<Grpc>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    #[serde(default)]
    pub path: String,
    pub port: u32,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub scheme: String,
    #[serde(default)]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocket {
    #[serde(default)]
    pub host: String,
    pub port: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    pub port: u32,
    #[serde(default)]
    pub service: String,
}

/// Why a manifest is not a usable WorkloadGroup.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{0}")]
    Yaml(String),
    #[error("kind is `{0}`, expected WorkloadGroup")]
    Kind(String),
    #[error("apiVersion `{0}` is not one of {API_VERSIONS:?}")]
    ApiVersion(String),
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
}

impl WorkloadGroup {
    /// Parses and checks a manifest.
    pub fn from_yaml(text: &str) -> Result<Self, ManifestError> {
        let wg: WorkloadGroup = serde_norway::from_str(text).map_err(|e| {
            ManifestError::Yaml(match e.location() {
                Some(loc) => format!(
                    "line {} column {}: {}",
                    loc.line(),
                    loc.column(),
                    strip_location(&e.to_string())
                ),
                None => e.to_string(),
            })
        })?;
        if wg.kind != "WorkloadGroup" {
            return Err(ManifestError::Kind(wg.kind));
        }
        if !API_VERSIONS.contains(&wg.api_version.as_str()) {
            return Err(ManifestError::ApiVersion(wg.api_version));
        }
        wg.check()?;
        Ok(wg)
    }

    fn check(&self) -> Result<(), ManifestError> {
        let field = |field: &str, problem: String| ManifestError::Field {
            field: field.into(),
            problem,
        };
        if !crate::ca::spiffe::is_dns_subdomain(&self.metadata.name) {
            return Err(field(
                "metadata.name",
                format!("`{}` is not a Kubernetes name", self.metadata.name),
            ));
        }
        match self.metadata.namespace.as_deref() {
            None | Some("") => {
                return Err(field(
                    "metadata.namespace",
                    "not set; onboarding needs the namespace".into(),
                ));
            }
            Some(ns) if !crate::ca::spiffe::is_dns_label(ns) => {
                return Err(field(
                    "metadata.namespace",
                    format!("`{ns}` is not a Kubernetes namespace name"),
                ));
            }
            Some(_) => {}
        }
        if let Some(sa) = self.spec.template.service_account.as_deref()
            && !sa.is_empty()
            && !crate::ca::spiffe::is_dns_subdomain(sa)
        {
            return Err(field(
                "spec.template.serviceAccount",
                format!("`{sa}` is not a Kubernetes name"),
            ));
        }
        for (name, port) in &self.spec.template.ports {
            if !(1..=65535).contains(port) {
                return Err(field(
                    &format!("spec.template.ports.{name}"),
                    format!("{port} is not a port (1-65535)"),
                ));
            }
        }
        if let Some(probe) = &self.spec.probe {
            let methods = [
                probe.http_get.as_ref().map(|h| ("httpGet", h.port)),
                probe.tcp_socket.as_ref().map(|t| ("tcpSocket", t.port)),
                probe.exec.as_ref().map(|_| ("exec", 1)),
                probe.grpc.as_ref().map(|g| ("grpc", g.port)),
            ];
            let set: Vec<_> = methods.iter().flatten().collect();
            if set.len() > 1 {
                return Err(field(
                    "spec.probe",
                    "set one of httpGet, tcpSocket, exec, grpc".into(),
                ));
            }
            if let Some((method, port)) = set.first()
                && !(1..=65535).contains(port)
            {
                return Err(field(
                    &format!("spec.probe.{method}.port"),
                    format!("{port} is not a port (1-65535)"),
                ));
            }
            if probe.exec.as_ref().is_some_and(|e| e.command.is_empty()) {
                return Err(field("spec.probe.exec.command", "is empty".into()));
            }
        }
        Ok(())
    }

    /// The namespace (checked to be set).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or_default()
    }

    /// The template's service account, `default` if unset (as istioctl).
    pub fn service_account(&self) -> &str {
        match self.spec.template.service_account.as_deref() {
            None | Some("") => "default",
            Some(sa) => sa,
        }
    }
}

fn strip_location(message: &str) -> &str {
    // serde_norway appends " at line L column C"; the caller prefixes it.
    message
        .rfind(" at line ")
        .map_or(message, |i| &message[..i])
}

impl Probe {
    /// The probe as protojson writes it (camelCase, zero values omitted).
    pub fn to_node(&self) -> Node {
        let mut m = BTreeMap::new();
        let mut int = |key: &str, v: i32| {
            if v != 0 {
                m.insert(key.to_string(), Node::Int(v.into()));
            }
        };
        int("initialDelaySeconds", self.initial_delay_seconds);
        int("timeoutSeconds", self.timeout_seconds);
        int("periodSeconds", self.period_seconds);
        int("successThreshold", self.success_threshold);
        int("failureThreshold", self.failure_threshold);
        if let Some(h) = &self.http_get {
            let mut hm = BTreeMap::new();
            put_str(&mut hm, "path", &h.path);
            put_port(&mut hm, h.port);
            put_str(&mut hm, "host", &h.host);
            put_str(&mut hm, "scheme", &h.scheme);
            if !h.http_headers.is_empty() {
                let headers = h
                    .http_headers
                    .iter()
                    .map(|hd| {
                        let mut x = BTreeMap::new();
                        put_str(&mut x, "name", &hd.name);
                        put_str(&mut x, "value", &hd.value);
                        Node::Map(x)
                    })
                    .collect();
                hm.insert("httpHeaders".into(), Node::Seq(headers));
            }
            m.insert("httpGet".into(), Node::Map(hm));
        }
        if let Some(t) = &self.tcp_socket {
            let mut tm = BTreeMap::new();
            put_str(&mut tm, "host", &t.host);
            put_port(&mut tm, t.port);
            m.insert("tcpSocket".into(), Node::Map(tm));
        }
        if let Some(e) = &self.exec {
            let command = e.command.iter().map(Node::str).collect();
            m.insert(
                "exec".into(),
                Node::Map(BTreeMap::from([("command".into(), Node::Seq(command))])),
            );
        }
        if let Some(g) = &self.grpc {
            let mut gm = BTreeMap::new();
            put_port(&mut gm, g.port);
            put_str(&mut gm, "service", &g.service);
            m.insert("grpc".into(), Node::Map(gm));
        }
        Node::Map(m)
    }
}

fn put_str(m: &mut BTreeMap<String, Node>, key: &str, value: &str) {
    if !value.is_empty() {
        m.insert(key.into(), Node::str(value));
    }
}

fn put_port(m: &mut BTreeMap<String, Node>, port: u32) {
    if port != 0 {
        m.insert("port".into(), Node::Int(port.into()));
    }
}
