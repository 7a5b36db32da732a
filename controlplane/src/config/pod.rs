//! The Kubernetes Pod (`v1`), as far as the mesh needs it: its labels (for
//! Service selectors), its service account (its identity) and its IP (the
//! endpoint address).

use std::net::IpAddr;

use serde::Deserialize;

use super::ManifestProblem;
use super::meta::{ObjectMeta, is_dns_subdomain};

/// The kind's name.
pub const KIND: &str = "Pod";
/// The core API's version.
pub const API_VERSION: &str = "v1";

/// A Pod: its identity, labels, address and named container ports (the
/// rest of the spec is ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

/// `spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Deprecated alias of `serviceAccountName`, still honoured.
    #[serde(default)]
    pub service_account: Option<String>,
    /// Only the ports matter: a Service's named `targetPort` resolves to a
    /// container port of that name.
    #[serde(default)]
    pub containers: Vec<Container>,
}

/// `spec.containers[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

/// `spec.containers[].ports[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: String,
    pub container_port: u32,
}

/// `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct PodStatus {
    /// `Pending`, `Running`, ...; a Pod that says it is not running is no
    /// Service endpoint.
    #[serde(default)]
    pub phase: Option<String>,
    /// Unset until the Pod is scheduled and has a network.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
}

impl Pod {
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
        super::check_object_name(&self.metadata, is_dns_subdomain)?;
        if let Some(sa) = self.spec.service_account_name.as_deref()
            && !sa.is_empty()
            && !is_dns_subdomain(sa)
        {
            return Err(ManifestProblem::field(
                "spec.serviceAccountName",
                format!("`{sa}` is not a Kubernetes name"),
            ));
        }
        if let Some(ip) = self.status.pod_ip.as_deref()
            && !ip.is_empty()
            && ip.parse::<IpAddr>().is_err()
        {
            return Err(ManifestProblem::field(
                "status.podIP",
                format!("`{ip}` is not an IP address"),
            ));
        }
        for (c, container) in self.spec.containers.iter().enumerate() {
            for (p, port) in container.ports.iter().enumerate() {
                if !(1..=65535).contains(&port.container_port) {
                    return Err(ManifestProblem::field(
                        format!("spec.containers[{c}].ports[{p}].containerPort"),
                        format!("{} is not a port (1-65535)", port.container_port),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The named container ports (name → port), as a named `targetPort`
    /// resolves them.
    pub fn named_ports(&self) -> std::collections::BTreeMap<String, u16> {
        self.spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter(|p| !p.name.is_empty())
            .map(|p| (p.name.clone(), p.container_port as u16))
            .collect()
    }

    /// Whether the Pod can serve: not in a phase other than `Running`.
    pub fn is_running(&self) -> bool {
        self.status.phase.as_deref().is_none_or(|p| p == "Running")
    }

    /// The service account the Pod runs as: `serviceAccountName`, else the
    /// deprecated `serviceAccount`, else `default`.
    pub fn service_account(&self) -> &str {
        [&self.spec.service_account_name, &self.spec.service_account]
            .into_iter()
            .flatten()
            .map(String::as_str)
            .find(|sa| !sa.is_empty())
            .unwrap_or("default")
    }

    /// The Pod's IP, if it has one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.status.pod_ip.as_deref()?.parse().ok()
    }
}
