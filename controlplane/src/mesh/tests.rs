use super::*;
use crate::config::snapshot_of as snapshot;

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: product, namespace: default}
spec:
  selector: {app: product}
  clusterIP: 10.96.88.12
  ports:
  - {name: http, port: 9080, targetPort: http}
  - {name: grpc-api, port: 9090, targetPort: 7070}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {name: product-1, namespace: default, labels: {app: product}}
spec:
  serviceAccountName: product
  containers: [{name: app, ports: [{name: http, containerPort: 9081}]}]
status: {podIP: 127.0.0.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: product-pending, namespace: default, labels: {app: product}}
spec: {serviceAccountName: product}
status: {podIP: 127.0.0.12, phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: product-elsewhere, namespace: other, labels: {app: product}}
status: {podIP: 127.0.0.13}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-1, namespace: default}
spec:
  address: 127.0.0.21
  labels: {app: product}
  ports: {http: 9082}
  serviceAccount: product-vm
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm-unhealthy
  namespace: default
  annotations: {proxy.istio.io/health-checks-enabled: "true"}
spec:
  address: 127.0.0.22
  labels: {app: product}
  ports: {http: 9082}
"#;

#[test]
fn endpoints_are_the_ready_selected_workloads_at_their_resolved_ports() {
    let model = MeshModel::build(&snapshot(MESH), &[], "cluster.local");
    assert_eq!(model.services.len(), 1);
    let product = &model.services[0];
    assert_eq!(product.hostname, "product.default.svc.cluster.local");
    assert_eq!(
        product.cluster_name(9080),
        "outbound|9080||product.default.svc.cluster.local"
    );
    // UDP is left out.
    assert_eq!(product.ports.len(), 2);
    let http = &product.ports[0];
    assert_eq!(http.protocol, Protocol::Http);
    let endpoints: Vec<String> = http
        .endpoints
        .iter()
        .map(|e| format!("{}:{}", e.address, e.port))
        .collect();
    // The pending Pod, the other namespace's Pod and the entry whose health
    // checks have not said Healthy are no endpoints.
    assert_eq!(endpoints, ["127.0.0.11:9081", "127.0.0.21:9082"]);
    let grpc = &product.ports[1];
    assert_eq!(grpc.protocol, Protocol::Http2);
    assert_eq!(grpc.endpoints.len(), 2);
    assert!(grpc.endpoints.iter().all(|e| e.port == 7070));
    // Identities of every selected workload, ready or not.
    assert_eq!(
        product.identities.iter().cloned().collect::<Vec<_>>(),
        [
            "spiffe://cluster.local/ns/default/sa/default",
            "spiffe://cluster.local/ns/default/sa/product",
            "spiffe://cluster.local/ns/default/sa/product-vm",
        ]
    );
    let vm = model
        .workload_at("default", "127.0.0.21".parse().unwrap())
        .unwrap();
    assert_eq!(vm.kind, WorkloadKind::WorkloadEntry);
    assert_eq!(model.services_of(vm).count(), 1);
    assert!(
        model
            .workload_at("default", "127.0.0.13".parse().unwrap())
            .is_none()
    );
}

#[test]
fn a_health_checked_entry_counts_once_healthy_and_registered_entries_join() {
    let snapshot = snapshot(MESH);
    let mut healthy = snapshot
        .workload_entries
        .values()
        .find(|e| e.metadata.name == "vm-unhealthy")
        .unwrap()
        .clone();
    healthy.metadata.name = "vm-registered".into();
    healthy.status = Some(crate::config::workload_entry::WorkloadEntryStatus {
        conditions: vec![crate::config::workload_entry::Condition {
            type_: "Healthy".into(),
            status: "True".into(),
            ..Default::default()
        }],
    });
    healthy.spec.address = "127.0.0.23".into();
    let model = MeshModel::build(&snapshot, &[healthy.clone()], "cluster.local");
    let http = &model.services[0].ports[0];
    assert!(
        http.endpoints
            .iter()
            .any(|e| e.address.to_string() == "127.0.0.23")
    );
    healthy.status.as_mut().unwrap().conditions[0].status = "False".into();
    let model = MeshModel::build(&snapshot, &[healthy], "cluster.local");
    assert!(
        !model.services[0].ports[0]
            .endpoints
            .iter()
            .any(|e| e.address.to_string() == "127.0.0.23")
    );
}

#[test]
fn protocols_follow_istio_port_naming() {
    assert_eq!(Protocol::select("http", None), Protocol::Http);
    assert_eq!(Protocol::select("http-web", None), Protocol::Http);
    assert_eq!(Protocol::select("grpc", None), Protocol::Http2);
    assert_eq!(Protocol::select("tcp-db", None), Protocol::Tcp);
    assert_eq!(Protocol::select("mysql", None), Protocol::Tcp);
    assert_eq!(Protocol::select("web", Some("http2")), Protocol::Http2);
    assert_eq!(Protocol::select("", None), Protocol::Http);
}

#[test]
fn shared_builds_reuse_the_workloads_of_unchanged_entries() {
    let snapshot = snapshot(MESH);
    let entry = |name: &str, address: &str| {
        let mut e = snapshot.workload_entries.values().next().unwrap().clone();
        e.metadata.name = name.into();
        e.spec.address = address.into();
        Arc::new(e)
    };
    let (a, b) = (entry("vm-a", "127.0.0.31"), entry("vm-b", "127.0.0.32"));
    let bad = entry("vm-bad", "not an address");
    let mut cache = WorkloadCache::default();
    let first = MeshModel::build_shared(
        &snapshot,
        &[a.clone(), b.clone(), bad.clone()],
        "cluster.local",
        &mut cache,
    );
    let workload = |model: &MeshModel, address: &str| {
        model
            .workloads
            .iter()
            .find(|w| w.address.to_string() == address)
            .cloned()
            .unwrap()
    };
    // The same model as an unshared build; an entry without an address
    // is no workload either way.
    let unshared = MeshModel::build(
        &snapshot,
        &[(*a).clone(), (*b).clone(), (*bad).clone()],
        "cluster.local",
    );
    assert_eq!(first, unshared);

    // b changes (a new allocation, as the registry makes): only its
    // workload is new; a's is the same allocation.
    let b2 = entry("vm-b", "127.0.0.33");
    let second = MeshModel::build_shared(
        &snapshot,
        &[a.clone(), b2, bad],
        "cluster.local",
        &mut cache,
    );
    assert!(Arc::ptr_eq(
        &workload(&first, "127.0.0.31"),
        &workload(&second, "127.0.0.31")
    ));
    assert!(
        second
            .workloads
            .iter()
            .all(|w| w.address.to_string() != "127.0.0.32")
    );
    assert_eq!(workload(&second, "127.0.0.33").name, "vm-b");
    // a leaves.
    let third = MeshModel::build_shared(&snapshot, &[], "cluster.local", &mut cache);
    assert!(
        third
            .workloads
            .iter()
            .all(|w| w.kind == WorkloadKind::Pod || w.name == "vm-1" || w.name == "vm-unhealthy")
    );
}
