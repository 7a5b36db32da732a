//! The WorkloadEntry (`networking.istio.io/v1`, `v1beta1`, `v1alpha3`): a
//! non-Kubernetes workload (a VM) as a mesh endpoint. Its spec is also the
//! WorkloadGroup's `template`, so both share [`WorkloadEntrySpec`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::meta::{ObjectMeta, is_dns_subdomain};
use super::{ISTIO_API_VERSIONS, ManifestProblem};

/// The kind's name.
pub const KIND: &str = "WorkloadEntry";

/// A WorkloadEntry as `kubectl get workloadentry -o yaml` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntry {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadEntrySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WorkloadEntryStatus>,
}

/// `spec` (istio.networking.v1alpha3.WorkloadEntry). Protobuf semantics: an
/// empty string or a zero means unset and is not written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    /// IP address or DNS name of the workload.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Port name → port number on the workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// `region/zone/subzone`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `status` (istio.meta.v1alpha1.IstioStatus), as far as the control plane
/// uses it: the `Healthy` condition of health-checked entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntryStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One `status.conditions[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `"True"` or `"False"`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The condition type a health-checked entry's probe results go to.
pub const HEALTHY_CONDITION: &str = "Healthy";

impl WorkloadEntry {
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
        if self.spec.address.is_empty() && self.spec.network.is_empty() {
            return Err(ManifestProblem::field(
                "spec.address",
                "must be set (it may be empty only with spec.network)",
            ));
        }
        self.spec.validate("spec")
    }

    /// Whether the status has a `Healthy` condition.
    pub fn has_health_condition(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == HEALTHY_CONDITION))
    }
}

impl WorkloadEntrySpec {
    /// Checks the fields; `path` prefixes the field names in problems
    /// (`spec`, `spec.template`).
    pub fn validate(&self, path: &str) -> Result<(), ManifestProblem> {
        for (name, port) in &self.ports {
            if !(1..=65535).contains(port) {
                return Err(ManifestProblem::field(
                    format!("{path}.ports.{name}"),
                    format!("{port} is not a port (1-65535)"),
                ));
            }
        }
        if !self.service_account.is_empty() && !is_dns_subdomain(&self.service_account) {
            return Err(ManifestProblem::field(
                format!("{path}.serviceAccount"),
                format!("`{}` is not a Kubernetes name", self.service_account),
            ));
        }
        Ok(())
    }
}
