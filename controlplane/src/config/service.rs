//! The Kubernetes Service (`v1`): a name and virtual IP for the Pods and
//! WorkloadEntries its selector picks (see [`super::selector`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ManifestProblem;
use super::meta::{ObjectMeta, is_dns1035_label, is_port_name};

/// The kind's name.
pub const KIND: &str = "Service";
/// The core API's version.
pub const API_VERSION: &str = "v1";

/// A Service; other Kubernetes fields (type, sessionAffinity, ...) are
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

/// `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Labels a Pod or WorkloadEntry must all have to be selected; an empty
    /// selector selects nothing (the endpoints are managed by hand).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    /// The virtual IP; `None` in a manifest without one, `"None"` for a
    /// headless Service.
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
}

/// `spec.ports[]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// Required when the Service has several ports.
    #[serde(default)]
    pub name: String,
    pub port: u16,
    /// The port on the endpoints; unset means the same number as `port`.
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    /// `TCP` (default), `UDP` or `SCTP`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// e.g. `http`, `grpc`; Istio's protocol selection reads it.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

fn default_protocol() -> String {
    "TCP".into()
}

/// A port number or a port name (`targetPort`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(n) => write!(f, "{n}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntOrStringVisitor;
        impl Visitor<'_> for IntOrStringVisitor {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom(format!("{v} is not a port")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
        }
        deserializer.deserialize_any(IntOrStringVisitor)
    }
}

impl Serialize for IntOrString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrString::Int(n) => serializer.serialize_i64(*n),
            IntOrString::String(s) => serializer.serialize_str(s),
        }
    }
}

impl Service {
    /// Checks what the API server would refuse.
    pub fn validate(&self) -> Result<(), ManifestProblem> {
        if self.kind != KIND {
            return Err(ManifestProblem::WrongKind {
                found: self.kind.clone(),
                expected: KIND,
            });
        }
        if self.api_version != API_VERSION {
            return Err(ManifestProblem::ApiVersion {
                kind: KIND,
                found: self.api_version.clone(),
                expected: &[API_VERSION],
            });
        }
        super::check_object_name(&self.metadata, is_dns1035_label)?;
        let several = self.spec.ports.len() > 1;
        let mut names = std::collections::BTreeSet::new();
        for (i, port) in self.spec.ports.iter().enumerate() {
            let field = |f: &str| format!("spec.ports[{i}].{f}");
            if port.port == 0 {
                return Err(ManifestProblem::field(field("port"), "0 is not a port"));
            }
            if several && port.name.is_empty() {
                return Err(ManifestProblem::field(
                    field("name"),
                    "required when the Service has several ports",
                ));
            }
            if !port.name.is_empty() && !names.insert(port.name.as_str()) {
                return Err(ManifestProblem::field(
                    field("name"),
                    format!("`{}` is used by another port", port.name),
                ));
            }
            if !matches!(port.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
                return Err(ManifestProblem::field(
                    field("protocol"),
                    format!("`{}` is not TCP, UDP or SCTP", port.protocol),
                ));
            }
            match &port.target_port {
                Some(IntOrString::Int(n)) if !(1..=65535).contains(n) => {
                    return Err(ManifestProblem::field(
                        field("targetPort"),
                        format!("{n} is not a port (1-65535)"),
                    ));
                }
                Some(IntOrString::String(name)) if !is_port_name(name) => {
                    return Err(ManifestProblem::field(
                        field("targetPort"),
                        format!("`{name}` is neither a port number nor a port name"),
                    ));
                }
                _ => {}
            }
        }
        if let Some(ip) = self.spec.cluster_ip.as_deref()
            && !ip.is_empty()
            && ip != "None"
            && ip.parse::<IpAddr>().is_err()
        {
            return Err(ManifestProblem::field(
                "spec.clusterIP",
                format!("`{ip}` is not an IP address, `None` or empty"),
            ));
        }
        Ok(())
    }

    /// The virtual IP, if the Service has one (not headless, not unset).
    pub fn cluster_ip(&self) -> Option<IpAddr> {
        self.spec.cluster_ip.as_deref()?.parse().ok()
    }

    /// Whether the Service is headless (`clusterIP: None`).
    pub fn is_headless(&self) -> bool {
        self.spec.cluster_ip.as_deref() == Some("None")
    }
}

impl ServicePort {
    /// `targetPort`, `port` if unset.
    pub fn target_port(&self) -> IntOrString {
        self.target_port
            .clone()
            .unwrap_or(IntOrString::Int(self.port.into()))
    }
}
