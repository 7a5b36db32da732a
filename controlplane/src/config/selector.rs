//! Which workloads a Service selects, as Kubernetes decides it: every label
//! of the selector present with the same value, in the Service's namespace;
//! an empty selector selects nothing (its endpoints are managed by hand).
//!
//! Pods are matched on `metadata.labels`; WorkloadEntries on `spec.labels`,
//! the workload's labels Istio matches Services against (the two are the
//! same for auto-registered entries).

use std::collections::BTreeMap;

use super::{Pod, Service, WorkloadEntry};

/// Whether `selector` selects an object with `labels`.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty()
        && selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
}

/// The Pods `service` selects, in the order given.
pub fn select_pods<'a>(service: &Service, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<&'a Pod> {
    let namespace = service.metadata.namespace();
    pods.into_iter()
        .filter(|pod| {
            pod.metadata.namespace() == namespace
                && selector_matches(&service.spec.selector, &pod.metadata.labels)
        })
        .collect()
}

/// The WorkloadEntries `service` selects, in the order given.
pub fn select_workload_entries<'a>(
    service: &Service,
    entries: impl IntoIterator<Item = &'a WorkloadEntry>,
) -> Vec<&'a WorkloadEntry> {
    let namespace = service.metadata.namespace();
    entries
        .into_iter()
        .filter(|entry| {
            entry.metadata.namespace() == namespace
                && selector_matches(&service.spec.selector, &entry.spec.labels)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{ConfigSnapshot, parse_manifests};

    fn snapshot(text: &str) -> ConfigSnapshot {
        let (objects, errors) = parse_manifests(Path::new("t.yaml"), text);
        assert_eq!(errors, []);
        let mut snapshot = ConfigSnapshot::default();
        for (object, source) in objects {
            snapshot.insert(object, source).unwrap();
        }
        snapshot
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn all_selector_labels_must_match() {
        let selector = labels(&[("app", "ratings"), ("version", "v2")]);
        assert!(selector_matches(
            &selector,
            &labels(&[("app", "ratings"), ("version", "v2"), ("extra", "x")])
        ));
        assert!(!selector_matches(&selector, &labels(&[("app", "ratings")])));
        assert!(!selector_matches(
            &selector,
            &labels(&[("app", "ratings"), ("version", "v1")])
        ));
        assert!(
            !selector_matches(&BTreeMap::new(), &labels(&[("app", "ratings")])),
            "an empty selector selects nothing"
        );
    }

    #[test]
    fn selects_in_the_service_namespace() {
        let s = snapshot(
            "apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: vm-ns}
spec: {selector: {app: ratings}}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-1, namespace: vm-ns, labels: {app: ratings}}
---
apiVersion: v1
kind: Pod
metadata: {name: ratings-2, namespace: other, labels: {app: ratings}}
---
apiVersion: v1
kind: Pod
metadata: {name: product, namespace: vm-ns, labels: {app: product}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: vm-ns}
spec: {address: 10.0.0.12, labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-meta-only, namespace: vm-ns, labels: {app: ratings}}
spec: {address: 10.0.0.13}
",
        );
        let service = s.services.values().next().unwrap();
        let pods: Vec<_> = select_pods(service, s.pods.values())
            .iter()
            .map(|p| p.metadata.name.as_str())
            .collect();
        assert_eq!(pods, ["ratings-1"]);
        let entries: Vec<_> = select_workload_entries(service, s.workload_entries.values())
            .iter()
            .map(|e| e.metadata.name.as_str())
            .collect();
        assert_eq!(entries, ["vm"]);
    }
}
