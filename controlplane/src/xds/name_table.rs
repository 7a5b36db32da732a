//! The NameTable the control plane sends to a VM's DNS proxy (reference
//! §5.2; istiod's pkg/dns/server/name_table.go): every Service as
//! `<name>.<namespace>.svc.cluster.local` with its address, marked as
//! Kubernetes-registry names (`registry`, `shortname`, `namespace`) so the
//! agent also answers the short forms.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use meshvm_proto::istio::networking::nds::v1::NameTable;
use meshvm_proto::istio::networking::nds::v1::name_table::NameInfo;

use crate::mesh::MeshModel;

/// The registry of Services and Pods.
pub const KUBERNETES_REGISTRY: &str = "Kubernetes";

/// The name table of `model`'s Services for a proxy whose outbound
/// listeners are at `outbound` (hostname → the Service's loopback address,
/// [`crate::mesh::vip`]).
///
/// A Service with a cluster IP resolves to its outbound address, where the
/// proxy's Envoy listens for it (the cluster IP itself is only reachable
/// with traffic capture). A headless Service (`clusterIP: None`) resolves
/// to the addresses of the ready Pods and WorkloadEntries it selects, as
/// istiod lists ready endpoints of headless Services. A Service with
/// neither is left out (nothing to answer).
pub fn build(model: &MeshModel, outbound: &BTreeMap<String, Ipv4Addr>) -> NameTable {
    let mut table = NameTable::default();
    for service in &model.services {
        let ips: Vec<String> = match service.cluster_ip {
            Some(_) => outbound
                .get(&service.hostname)
                .map(|vip| vec![vip.to_string()])
                .unwrap_or_default(),
            None => {
                let mut ips: Vec<_> = model
                    .workloads
                    .iter()
                    .filter(|w| w.ready && service.selects(w))
                    .map(|w| w.address)
                    .collect();
                ips.sort();
                ips.dedup();
                ips.into_iter().map(|ip| ip.to_string()).collect()
            }
        };
        if ips.is_empty() {
            continue;
        }
        table.table.insert(
            service.hostname.clone(),
            NameInfo {
                ips,
                registry: KUBERNETES_REGISTRY.into(),
                shortname: service.name.clone(),
                namespace: service.namespace.clone(),
                alt_hosts: Vec::new(),
            },
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::snapshot_of as snapshot;

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
        let model = MeshModel::build(&s, &[], "cluster.local");
        let block = crate::mesh::vip::AddressBlock::default();
        let table = build(&model, &block.assign(&model.services));
        let product = &table.table["product.default.svc.cluster.local"];
        assert_eq!(product.ips, vec!["127.240.0.20"]);
        assert_eq!(product.registry, "Kubernetes");
        assert_eq!(product.shortname, "product");
        assert_eq!(product.namespace, "default");
        assert_eq!(
            table.table["db.data.svc.cluster.local"].ips,
            vec!["10.244.0.7"]
        );
        assert!(!table.table.contains_key("empty.data.svc.cluster.local"));
    }
}
