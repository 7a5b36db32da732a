//! The NameTable the control plane sends to a VM's DNS proxy (reference
//! §5.2; istiod's pkg/dns/server/name_table.go): every Service as
//! `<name>.<namespace>.svc.cluster.local` with its addresses, marked as
//! Kubernetes-registry names (`registry`, `shortname`, `namespace`) so the
//! agent also answers the short forms.

use std::net::IpAddr;

use meshvm_proto::istio::networking::nds::v1::NameTable;
use meshvm_proto::istio::networking::nds::v1::name_table::NameInfo;

use crate::config::ConfigSnapshot;
use crate::config::selector::{select_pods, select_workload_entries};

/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// The registry of Services and Pods.
pub const KUBERNETES_REGISTRY: &str = "Kubernetes";

/// The name table for `snapshot`'s Services, plus the `extra` WorkloadEntries
/// the registry created (they count as endpoints of headless Services).
///
/// A Service with a cluster IP resolves to it. A headless Service
/// (`clusterIP: None`) resolves to the addresses of the Pods and
/// WorkloadEntries it selects, as istiod lists ready endpoints of headless
/// Services. A Service with neither is left out (nothing to answer).
pub fn build(snapshot: &ConfigSnapshot, registered: &[crate::config::WorkloadEntry]) -> NameTable {
    let mut table = NameTable::default();
    for service in snapshot.services.values() {
        let namespace = service.metadata.namespace().to_string();
        let name = service.metadata.name.clone();
        let ips: Vec<String> = match service.cluster_ip() {
            Some(ip) => vec![ip.to_string()],
            None => headless_ips(snapshot, registered, service),
        };
        if ips.is_empty() {
            continue;
        }
        table.table.insert(
            format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
            NameInfo {
                ips,
                registry: KUBERNETES_REGISTRY.into(),
                shortname: name,
                namespace,
                alt_hosts: Vec::new(),
            },
        );
    }
    table
}

/// Whether any Service is headless (its name resolves to the addresses of
/// the Pods and WorkloadEntries it selects).
pub fn has_headless_service(snapshot: &ConfigSnapshot) -> bool {
    snapshot.services.values().any(|s| s.cluster_ip().is_none())
}

fn headless_ips(
    snapshot: &ConfigSnapshot,
    registered: &[crate::config::WorkloadEntry],
    service: &crate::config::Service,
) -> Vec<String> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for pod in select_pods(service, snapshot.pods.values()) {
        if let Some(ip) = pod.status.pod_ip.as_deref().and_then(|t| t.parse().ok()) {
            ips.push(ip);
        }
    }
    let entries = snapshot.workload_entries.values().chain(registered.iter());
    for entry in select_workload_entries(service, entries) {
        if let Ok(ip) = entry.spec.address.parse::<IpAddr>() {
            ips.push(ip);
        }
    }
    ips.sort();
    ips.dedup();
    ips.into_iter().map(|ip| ip.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_manifests;
    use std::path::Path;

    fn snapshot(yaml: &str) -> ConfigSnapshot {
        let (objects, errors) = parse_manifests(Path::new("test.yaml"), yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let mut snapshot = ConfigSnapshot::default();
        for (object, source) in objects {
            snapshot.insert(object, source).unwrap();
        }
        snapshot
    }

    #[test]
    fn services_with_cluster_ips_and_headless_ones() {
        let s = snapshot(
            r#"
apiVersion: v1
kind: Service
metadata: {name: product, namespace: default}
spec:
  selector: {app: product}
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec:
  selector: {app: db}
  clusterIP: None
  ports: [{name: tcp, port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: data, labels: {app: db}}
spec: {serviceAccountName: db}
status: {podIP: 10.244.0.7}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: data}
spec:
  selector: {app: nothing}
  clusterIP: None
  ports: [{name: tcp, port: 1}]
"#,
        );
        let table = build(&s, &[]);
        let product = &table.table["product.default.svc.cluster.local"];
        assert_eq!(product.ips, vec!["10.96.0.20"]);
        assert_eq!(product.registry, "Kubernetes");
        assert_eq!(product.shortname, "product");
        assert_eq!(product.namespace, "default");
        assert_eq!(
            table.table["db.data.svc.cluster.local"].ips,
            vec!["10.244.0.7"]
        );
        assert!(!table.table.contains_key("empty.data.svc.cluster.local"));
        assert!(has_headless_service(&s));
    }
}
