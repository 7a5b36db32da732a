//! The WorkloadGroup (`networking.istio.io/v1`, `v1beta1` or `v1alpha3`):
//! the template VMs of one kind are onboarded with (`onboard`) and
//! auto-registered from (`registry`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::meta::{ObjectMeta, is_dns_subdomain};
use super::workload_entry::WorkloadEntrySpec;
use super::{ISTIO_API_VERSIONS, ManifestProblem};
use crate::yaml::Node;

/// The kind's name.
pub const KIND: &str = "WorkloadGroup";

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

/// `spec`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadGroupSpec {
    /// Labels and annotations for the WorkloadEntries.
    #[serde(default)]
    pub metadata: EntryMeta,
    /// The WorkloadEntry template (a WorkloadEntry spec; its address is
    /// replaced by the VM's).
    #[serde(default)]
    pub template: WorkloadEntrySpec,
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

impl WorkloadGroup {
    /// Checks what the API server and Istio's validation would refuse.
    pub fn validate(&self) -> Result<(), ManifestProblem> {
        if self.kind != KIND {
            return Err(ManifestProblem::WrongKind {
                found: self.kind.clone(),
                expected: KIND,
            });
        }
        if !ISTIO_API_VERSIONS.contains(&self.api_version.as_str()) {
            return Err(ManifestProblem::ApiVersion {
                kind: KIND,
                found: self.api_version.clone(),
                expected: ISTIO_API_VERSIONS,
            });
        }
        super::check_object_name(&self.metadata, is_dns_subdomain)?;
        self.spec.template.validate("spec.template")?;
        if let Some(probe) = &self.spec.probe {
            let methods = [
                probe.http_get.as_ref().map(|h| ("httpGet", h.port)),
                probe.tcp_socket.as_ref().map(|t| ("tcpSocket", t.port)),
                probe.exec.as_ref().map(|_| ("exec", 1)),
                probe.grpc.as_ref().map(|g| ("grpc", g.port)),
            ];
            let set: Vec<_> = methods.iter().flatten().collect();
            if set.len() > 1 {
                return Err(ManifestProblem::field(
                    "spec.probe",
                    "set one of httpGet, tcpSocket, exec, grpc",
                ));
            }
            if let Some((method, port)) = set.first()
                && !(1..=65535).contains(port)
            {
                return Err(ManifestProblem::field(
                    format!("spec.probe.{method}.port"),
                    format!("{port} is not a port (1-65535)"),
                ));
            }
            if probe.exec.as_ref().is_some_and(|e| e.command.is_empty()) {
                return Err(ManifestProblem::field(
                    "spec.probe.exec.command",
                    "is empty",
                ));
            }
        }
        Ok(())
    }

    /// The namespace ([`super::DEFAULT_NAMESPACE`] if unset).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }

    /// The template's service account, `default` if unset (as istioctl).
    pub fn service_account(&self) -> &str {
        match self.spec.template.service_account.as_str() {
            "" => "default",
            sa => sa,
        }
    }

    /// The group's uid: `metadata.uid` if the manifest has one, else one
    /// derived from the namespace and name, so WorkloadEntries' owner
    /// references stay valid across restarts of the control plane.
    pub fn uid(&self) -> String {
        match self.metadata.uid.as_deref() {
            Some(uid) if !uid.is_empty() => uid.to_string(),
            _ => {
                let digest = ring::digest::digest(
                    &ring::digest::SHA256,
                    format!("{KIND}/{}/{}", self.namespace(), self.metadata.name).as_bytes(),
                );
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&digest.as_ref()[..16]);
                // An RFC 9562 name-based UUID layout (version 5 bits).
                bytes[6] = (bytes[6] & 0x0f) | 0x50;
                bytes[8] = (bytes[8] & 0x3f) | 0x80;
                super::meta::uuid_string(&bytes)
            }
        }
    }
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
