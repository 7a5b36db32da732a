//! What an auto-registered WorkloadEntry looks like, as istiod builds it
//! (istio/istio `pilot/pkg/autoregistration/controller.go`): its name, the
//! group's template with the VM's address, labels and annotations merged in
//! istiod's order, the owner reference to the group, and the annotations
//! that record which control plane the VM is connected to and since when.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::config::meta::{ObjectMeta, OwnerReference, format_rfc3339_nano};
use crate::config::workload_entry::{self, WorkloadEntry};
use crate::config::{ISTIO_API_VERSION, WorkloadGroup, workload_group};
use crate::node::ProxyNode;

/// On an auto-registered entry: the WorkloadGroup it was made from.
pub const AUTO_REGISTRATION_GROUP: &str = "istio.io/autoRegistrationGroup";
/// The control plane the workload is (or was last) connected to.
pub const WORKLOAD_CONTROLLER: &str = "istio.io/workloadController";
/// When the workload connected (RFC 3339 with nanoseconds); absent while
/// it is disconnected.
pub const CONNECTED_AT: &str = "istio.io/connectedAt";
/// When the workload's last stream closed; the entry is deleted a grace
/// period later unless it reconnects.
pub const DISCONNECTED_AT: &str = "istio.io/disconnectedAt";
/// The workload reports health: its endpoint is ready only while its
/// `Healthy` condition is true.
pub const HEALTH_CHECKS_ENABLED: &str = "proxy.istio.io/health-checks-enabled";
/// The locality label the agent adds to its labels; the entry carries the
/// locality in `spec.locality` instead.
pub const LOCALITY_LABEL: &str = "istio-locality";
/// Set on entries of proxies that accept HBONE.
pub const TUNNEL_LABEL: &str = "networking.istio.io/tunnel";

/// Kubernetes' limit on object names.
const MAX_NAME_LEN: usize = 253;

/// `<group>-<first IP, ':' → '-'>[-<network>]`; of a longer name the last
/// 253 characters are kept (istiod does the same and logs it).
pub fn auto_registered_name(group: &str, first_ip: &str, network: Option<&str>) -> String {
    let mut name = format!("{group}-{}", first_ip.replace(':', "-"));
    if let Some(network) = network {
        name.push('-');
        name.push_str(network);
    }
    if name.len() > MAX_NAME_LEN {
        let mut start = name.len() - MAX_NAME_LEN;
        while !name.is_char_boundary(start) {
            start += 1;
        }
        let short = name[start..].to_string();
        tracing::warn!(
            %name,
            %short,
            "the WorkloadEntry name is too long; shortened from the start (a shorter WorkloadGroup name avoids this)"
        );
        name = short;
    }
    name
}

/// A new entry named `name` for `node` from `group` (the caller sets the
/// uid, creation time and connection annotations).
///
/// - spec: the group's template; the address is the node's first IP, the
///   network and locality the node's if set;
/// - labels (later wins): the template's, the group's `spec.metadata`
///   labels, the node's `LABELS` without `istio-locality`; plus
///   `networking.istio.io/tunnel: http` if the node accepts HBONE. The same
///   map is the object's and the spec's labels;
/// - annotations: `istio.io/autoRegistrationGroup`, then the group's
///   `spec.metadata` annotations, then `proxy.istio.io/health-checks-enabled:
///   "true"` if the node's ProxyConfig has a readiness probe;
/// - one owner reference: the group, as controller.
pub fn entry_from_group(name: &str, node: &ProxyNode, group: &WorkloadGroup) -> WorkloadEntry {
    let mut spec = group.spec.template.clone();
    spec.address = node.first_ip().to_string();
    let mut labels = spec.labels.clone();
    labels.extend(group.spec.metadata.labels.clone());
    labels.extend(node.metadata.labels.clone());
    labels.remove(LOCALITY_LABEL);
    if node.metadata.enable_hbone == Some(true) {
        labels.insert(TUNNEL_LABEL.into(), "http".into());
    }
    spec.labels = labels.clone();
    if let Some(network) = &node.metadata.network {
        spec.network = network.clone();
    }
    if let Some(locality) = &node.locality {
        spec.locality = locality.clone();
    }
    let mut annotations = BTreeMap::from([(
        AUTO_REGISTRATION_GROUP.to_string(),
        group.metadata.name.clone(),
    )]);
    annotations.extend(group.spec.metadata.annotations.clone());
    if node.metadata.has_readiness_probe() {
        annotations.insert(HEALTH_CHECKS_ENABLED.into(), "true".into());
    }
    WorkloadEntry {
        api_version: ISTIO_API_VERSION.into(),
        kind: workload_entry::KIND.into(),
        metadata: ObjectMeta {
            name: name.into(),
            namespace: Some(group.namespace().into()),
            uid: None,
            creation_timestamp: None,
            labels,
            annotations,
            owner_references: vec![OwnerReference {
                api_version: ISTIO_API_VERSION.into(),
                kind: workload_group::KIND.into(),
                name: group.metadata.name.clone(),
                uid: group.uid(),
                controller: Some(true),
                block_owner_deletion: None,
            }],
        },
        spec,
        status: None,
    }
}

/// Records that the workload connected to `controller` at `now`.
pub fn mark_connected(entry: &mut WorkloadEntry, controller: &str, now: SystemTime) {
    let annotations = &mut entry.metadata.annotations;
    annotations.insert(WORKLOAD_CONTROLLER.into(), controller.into());
    annotations.insert(CONNECTED_AT.into(), format_rfc3339_nano(now));
    annotations.remove(DISCONNECTED_AT);
}

/// Records that the workload's last stream closed at `now`.
pub fn mark_disconnected(entry: &mut WorkloadEntry, now: SystemTime) {
    let annotations = &mut entry.metadata.annotations;
    annotations.remove(CONNECTED_AT);
    annotations.insert(DISCONNECTED_AT.into(), format_rfc3339_nano(now));
}

/// Made by auto-registration: deleted when its workload is gone.
pub fn is_auto_registered(entry: &WorkloadEntry) -> bool {
    entry
        .metadata
        .annotations
        .get(AUTO_REGISTRATION_GROUP)
        .is_some_and(|g| !g.is_empty())
}

/// A pre-created entry a workload connected for (it reports health): it
/// loses its health condition when the workload is gone.
pub fn is_health_checked(entry: &WorkloadEntry) -> bool {
    !is_auto_registered(entry)
        && entry
            .metadata
            .annotations
            .get(WORKLOAD_CONTROLLER)
            .is_some_and(|c| !c.is_empty())
}

/// Whether a workload may become this entry's controller for health
/// reports (istiod: any value of the annotation).
pub fn accepts_health_reports(entry: &WorkloadEntry) -> bool {
    entry
        .metadata
        .annotations
        .contains_key(HEALTH_CHECKS_ENABLED)
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            auto_registered_name("ratings-vm", "10.0.0.12", Some("vm-network")),
            "ratings-vm-10.0.0.12-vm-network"
        );
        assert_eq!(
            auto_registered_name("ratings-vm", "fd00:1::12", None),
            "ratings-vm-fd00-1--12"
        );
        assert_eq!(
            auto_registered_name("ratings-vm", "2001:db8::1", Some("net2")),
            "ratings-vm-2001-db8--1-net2"
        );
        let group = "g".repeat(250);
        let name = auto_registered_name(&group, "10.0.0.12", Some("net"));
        assert_eq!(name.len(), 253);
        assert!(name.ends_with("g-10.0.0.12-net"), "the end is kept");
    }

    fn node(labels: &[(&str, &str)], extra: &[(&str, Value)]) -> ProxyNode {
        let s = |text: &str| Value {
            kind: Some(Kind::StringValue(text.into())),
        };
        let mut fields: std::collections::HashMap<String, Value> = [
            ("NAMESPACE", s("vm-ns")),
            ("NETWORK", s("vm-network")),
            ("INSTANCE_IPS", s("10.0.0.12")),
            (
                "LABELS",
                Value {
                    kind: Some(Kind::StructValue(Struct {
                        fields: labels.iter().map(|(k, v)| (k.to_string(), s(v))).collect(),
                    })),
                },
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        fields.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        ProxyNode::parse(&Node {
            id: "sidecar~10.0.0.12~vm-1.vm-ns~vm-ns.svc.cluster.local".into(),
            metadata: Some(Struct { fields }),
            locality: Some(Locality {
                region: "eu".into(),
                zone: "eu-1".into(),
                sub_zone: String::new(),
            }),
            ..Node::default()
        })
        .unwrap()
    }

    fn group() -> WorkloadGroup {
        serde_norway::from_str(
            "apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: ratings-vm, namespace: vm-ns}
spec:
  metadata:
    labels: {app: ratings, version: v2, tier: group}
    annotations: {team: ratings, istio.io/autoRegistrationGroup: overridden}
  template:
    serviceAccount: ratings-sa
    network: template-network
    ports: {http: 9080}
    labels: {version: v1, tier: template, only-template: x}
",
        )
        .unwrap()
    }

    #[test]
    fn labels_and_annotations_in_istiod_order() {
        let node = node(
            &[
                ("tier", "node"),
                ("istio-locality", "eu.eu-1"),
                ("extra", "y"),
            ],
            &[],
        );
        let entry = entry_from_group("ratings-vm-10.0.0.12-vm-network", &node, &group());
        let labels: Vec<(&str, &str)> = entry
            .spec
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            labels,
            [
                ("app", "ratings"),
                ("extra", "y"),
                ("only-template", "x"),
                ("tier", "node"),
                ("version", "v2"),
            ]
        );
        assert_eq!(entry.metadata.labels, entry.spec.labels);
        assert_eq!(entry.spec.address, "10.0.0.12");
        assert_eq!(entry.spec.network, "vm-network", "the node's network wins");
        assert_eq!(entry.spec.locality, "eu/eu-1");
        assert_eq!(entry.spec.service_account, "ratings-sa");
        assert_eq!(entry.spec.ports["http"], 9080);
        assert_eq!(
            entry.metadata.annotations[AUTO_REGISTRATION_GROUP], "overridden",
            "the group's annotations come after"
        );
        assert_eq!(entry.metadata.annotations["team"], "ratings");
        assert!(
            !entry
                .metadata
                .annotations
                .contains_key(HEALTH_CHECKS_ENABLED)
        );
        let owner = entry.metadata.controller().unwrap();
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("WorkloadGroup", "ratings-vm")
        );
        assert_eq!(owner.uid, group().uid(), "a stable uid");
        assert_eq!(entry.metadata.namespace.as_deref(), Some("vm-ns"));
    }

    #[test]
    fn probes_and_hbone() {
        let obj = |fields: Vec<(&str, Value)>| Value {
            kind: Some(Kind::StructValue(Struct {
                fields: fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            })),
        };
        let node = node(
            &[],
            &[
                (
                    "PROXY_CONFIG",
                    obj(vec![(
                        "readinessProbe",
                        obj(vec![("tcpSocket", obj(vec![]))]),
                    )]),
                ),
                (
                    "ENABLE_HBONE",
                    Value {
                        kind: Some(Kind::StringValue("true".into())),
                    },
                ),
            ],
        );
        let entry = entry_from_group("x", &node, &group());
        assert_eq!(entry.metadata.annotations[HEALTH_CHECKS_ENABLED], "true");
        assert_eq!(entry.spec.labels[TUNNEL_LABEL], "http");
    }

    #[test]
    fn connection_annotations() {
        let mut entry = entry_from_group("x", &node(&[], &[]), &group());
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_714_557_600, 5);
        mark_connected(&mut entry, "meshvm-controlplane", t);
        assert_eq!(
            entry.metadata.annotations[CONNECTED_AT],
            "2024-05-01T10:00:00.000000005Z"
        );
        assert_eq!(
            entry.metadata.annotations[WORKLOAD_CONTROLLER],
            "meshvm-controlplane"
        );
        mark_disconnected(&mut entry, t);
        assert!(!entry.metadata.annotations.contains_key(CONNECTED_AT));
        assert!(entry.metadata.annotations.contains_key(DISCONNECTED_AT));
        mark_connected(&mut entry, "meshvm-controlplane", t);
        assert!(!entry.metadata.annotations.contains_key(DISCONNECTED_AT));
        assert!(is_auto_registered(&entry) && !is_health_checked(&entry));
    }
}
