//! The registry on a temporary state directory, with Tokio's clock paused so
//! grace periods pass instantly and exactly.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::sync::watch;

use super::entry::{
    AUTO_REGISTRATION_GROUP, CONNECTED_AT, DISCONNECTED_AT, HEALTH_CHECKS_ENABLED,
    WORKLOAD_CONTROLLER,
};
use super::*;
use crate::config::meta::format_rfc3339_nano;
use crate::config::parse_manifests;

const GROUP: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata:
  name: ratings-vm
  namespace: vm-ns
spec:
  metadata:
    labels: {app: ratings, version: v2}
    annotations: {team: ratings}
  template:
    serviceAccount: ratings-sa
    network: vm-network
    ports: {http: 9080}
  probe:
    periodSeconds: 5
    httpGet: {port: 9080, path: /health}
";

/// A pre-created entry that accepts health reports.
const BILLING_ENTRY: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: billing-vm-1
  namespace: vm-ns
  annotations: {proxy.istio.io/health-checks-enabled: \"true\"}
spec: {address: 10.0.0.20, serviceAccount: ratings-sa}
";

const GRACE: Duration = Duration::from_secs(10);

fn snapshot(text: &str) -> Arc<ConfigSnapshot> {
    let (objects, errors) = parse_manifests(Path::new("test.yaml"), text);
    assert_eq!(errors, []);
    let mut snapshot = ConfigSnapshot::default();
    for (object, source) in objects {
        snapshot.insert(object, source).unwrap();
    }
    Arc::new(snapshot)
}

fn options() -> RegistryOptions {
    RegistryOptions {
        grace_period: GRACE,
        ..RegistryOptions::default()
    }
}

fn string(text: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(text.into())),
    }
}

fn object(fields: Vec<(&str, Value)>) -> Value {
    Value {
        kind: Some(Kind::StructValue(Struct {
            fields: fields.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        })),
    }
}

/// The reference VM's proxy (istio-vm-protocol §1/§2) with `extra` metadata
/// (an empty string value removes a key), proving `identity`.
fn proxy(ip: &str, extra: &[(&str, &str)], identity: Option<(&str, &str)>) -> Proxy {
    let mut fields: HashMap<String, Value> = [
        ("NAMESPACE", "vm-ns"),
        ("SERVICE_ACCOUNT", "ratings-sa"),
        ("AUTO_REGISTER_GROUP", "ratings-vm"),
        ("NETWORK", "vm-network"),
        ("INSTANCE_IPS", ip),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), string(v)))
    .collect();
    fields.insert(
        "LABELS".into(),
        object(vec![
            ("app", string("ratings")),
            ("version", string("v2")),
            ("host", string("vm-1")),
            ("istio-locality", string("eu.eu-1")),
        ]),
    );
    fields.insert(
        "PROXY_CONFIG".into(),
        object(vec![(
            "readinessProbe",
            object(vec![("httpGet", object(vec![]))]),
        )]),
    );
    for (k, v) in extra {
        if v.is_empty() {
            fields.remove(*k);
        } else {
            fields.insert(k.to_string(), string(v));
        }
    }
    let node = ProxyNode::parse(&Node {
        id: format!("sidecar~{ip}~ratings-vm-1.vm-ns~vm-ns.svc.cluster.local"),
        metadata: Some(Struct { fields }),
        ..Node::default()
    })
    .unwrap();
    Proxy {
        node,
        identities: identity
            .map(|(ns, sa)| SpiffeId::new("cluster.local", ns, sa).unwrap())
            .into_iter()
            .collect(),
    }
}

fn vm(ip: &str) -> Proxy {
    proxy(ip, &[], Some(("vm-ns", "ratings-sa")))
}

fn key(name: &str) -> ObjectKey {
    ObjectKey::new("vm-ns", name)
}

const VM_ENTRY: &str = "ratings-vm-10.0.0.12-vm-network";

fn open(dir: &Path, config: Arc<ConfigSnapshot>) -> (Registry, watch::Sender<Arc<ConfigSnapshot>>) {
    let (tx, rx) = watch::channel(config);
    (Registry::open(dir, rx, options()).unwrap(), tx)
}

/// Lets timers that are due run.
async fn advance(by: Duration) {
    tokio::time::sleep(by).await;
    tokio::task::yield_now().await;
}

#[tokio::test(start_paused = true)]
async fn auto_registers_from_the_group() {
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _config) = open(tmp.path(), snapshot(GROUP));
    let mut updates = registry.subscribe();
    let before = SystemTime::now();
    let connection = registry.connect(&vm("10.0.0.12")).await.unwrap().unwrap();
    assert_eq!(connection.entry(), &key(VM_ENTRY));
    assert!(connection.auto_registered());

    let entry = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    let annotations = &entry.metadata.annotations;
    assert_eq!(annotations[AUTO_REGISTRATION_GROUP], "ratings-vm");
    assert_eq!(annotations["team"], "ratings");
    assert_eq!(annotations[HEALTH_CHECKS_ENABLED], "true");
    assert_eq!(annotations[WORKLOAD_CONTROLLER], "meshvm-controlplane");
    let connected_at = parse_rfc3339(&annotations[CONNECTED_AT]).unwrap();
    assert!(connected_at >= before - Duration::from_secs(1));
    assert_eq!(entry.spec.address, "10.0.0.12");
    assert_eq!(entry.spec.network, "vm-network");
    assert_eq!(entry.spec.service_account, "ratings-sa");
    assert_eq!(entry.spec.ports["http"], 9080);
    let labels: Vec<&str> = entry.spec.labels.keys().map(String::as_str).collect();
    assert_eq!(labels, ["app", "host", "version"], "no istio-locality");
    assert_eq!(entry.metadata.labels, entry.spec.labels);
    assert!(entry.metadata.uid.is_some() && entry.metadata.creation_timestamp.is_some());
    let owner = entry.metadata.controller().unwrap();
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("WorkloadGroup", "ratings-vm")
    );

    // Stored as kubectl shows it, and published.
    let file = tmp
        .path()
        .join("workloadentries/vm-ns/ratings-vm-10.0.0.12-vm-network.yaml");
    assert_eq!(fs::read_to_string(&file).unwrap(), store::to_yaml(&entry));
    assert!(updates.has_changed().unwrap());
    assert_eq!(
        *updates.borrow_and_update().clone(),
        vec![Arc::new(entry.clone())]
    );
    assert_eq!(registry.workload_entries(), vec![entry]);
    registry.disconnect(connection);
}

#[tokio::test(start_paused = true)]
async fn deleted_after_the_grace_period_unless_reconnected() {
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _config) = open(tmp.path(), snapshot(GROUP));
    let file = tmp
        .path()
        .join("workloadentries/vm-ns/ratings-vm-10.0.0.12-vm-network.yaml");
    let connection = registry.connect(&vm("10.0.0.12")).await.unwrap().unwrap();
    let first = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    registry.disconnect(connection);
    let entry = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    assert!(!entry.metadata.annotations.contains_key(CONNECTED_AT));
    assert!(entry.metadata.annotations.contains_key(DISCONNECTED_AT));
    assert!(fs::read_to_string(&file).unwrap().contains(DISCONNECTED_AT));

    // Back within the grace period: the same entry, connected again.
    advance(GRACE - Duration::from_secs(1)).await;
    let connection = registry.connect(&vm("10.0.0.12")).await.unwrap().unwrap();
    let entry = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    assert_eq!(entry.metadata.uid, first.metadata.uid);
    assert!(entry.metadata.annotations.contains_key(CONNECTED_AT));
    assert!(!entry.metadata.annotations.contains_key(DISCONNECTED_AT));
    // The first disconnect's timer fires now and must not delete it.
    advance(Duration::from_secs(2)).await;
    assert!(registry.workload_entry(&key(VM_ENTRY)).is_some());

    // Gone for good: deleted once the grace period has passed.
    registry.disconnect(connection);
    advance(GRACE - Duration::from_secs(1)).await;
    assert!(registry.workload_entry(&key(VM_ENTRY)).is_some());
    advance(Duration::from_secs(2)).await;
    assert!(registry.workload_entry(&key(VM_ENTRY)).is_none());
    assert!(!file.exists());
    assert!(registry.subscribe().borrow().is_empty());
}

#[tokio::test(start_paused = true)]
async fn streams_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _config) = open(tmp.path(), snapshot(GROUP));
    let first = registry.connect(&vm("10.0.0.12")).await.unwrap().unwrap();
    let second = registry.connect(&vm("10.0.0.12")).await.unwrap().unwrap();
    registry.disconnect(first);
    advance(GRACE * 2).await;
    let entry = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    assert!(
        entry.metadata.annotations.contains_key(CONNECTED_AT),
        "one stream is left"
    );
    registry.disconnect(second);
    advance(GRACE + Duration::from_secs(1)).await;
    assert!(registry.workload_entry(&key(VM_ENTRY)).is_none());
}

#[tokio::test(start_paused = true)]
async fn names_with_ipv6_and_without_network() {
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _config) = open(tmp.path(), snapshot(GROUP));
    let v6 = registry.connect(&vm("fd00:10::12")).await.unwrap().unwrap();
    assert_eq!(v6.entry(), &key("ratings-vm-fd00-10--12-vm-network"));
    let entry = registry.workload_entry(v6.entry()).unwrap();
    assert_eq!(entry.spec.address, "fd00:10::12");
    let no_network = proxy(
        "10.0.0.13",
        &[("NETWORK", "")],
        Some(("vm-ns", "ratings-sa")),
    );
    let plain = registry.connect(&no_network).await.unwrap().unwrap();
    assert_eq!(plain.entry(), &key("ratings-vm-10.0.0.13"));
    assert_eq!(
        registry.workload_entry(plain.entry()).unwrap().spec.network,
        "vm-network",
        "the template's network"
    );
    registry.disconnect(v6);
    registry.disconnect(plain);
}

#[tokio::test(start_paused = true)]
async fn refusals_name_the_cause() {
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _config) = open(tmp.path(), snapshot(GROUP));
    let refuse = async |p: Proxy| registry.connect(&p).await.unwrap_err();

    let e = refuse(proxy("10.0.0.12", &[], None)).await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.to_string().contains("no verified identity"), "{e}");

    let e = refuse(proxy("10.0.0.12", &[], Some(("other-ns", "ratings-sa")))).await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        e.to_string(),
        "authorization failed: no identities (spiffe://cluster.local/ns/other-ns/sa/ratings-sa) matched vm-ns/ratings-sa"
    );

    let e = refuse(proxy("10.0.0.12", &[], Some(("vm-ns", "default")))).await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);

    // No SERVICE_ACCOUNT in the metadata: any identity of the namespace
    // passes the stream check, but not the template's service account.
    let e = refuse(proxy(
        "10.0.0.12",
        &[("SERVICE_ACCOUNT", "")],
        Some(("vm-ns", "default")),
    ))
    .await;
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.to_string()
            .contains("\"default\", the entry \"ratings-sa\""),
        "{e}"
    );

    let e = refuse(proxy(
        "10.0.0.12",
        &[("AUTO_REGISTER_GROUP", "nope")],
        Some(("vm-ns", "ratings-sa")),
    ))
    .await;
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.to_string()
            .ends_with("cannot find WorkloadGroup vm-ns/nope"),
        "{e}"
    );

    let e = refuse(proxy(
        "10.0.0.12",
        &[("NETWORK", "Bad Network")],
        Some(("vm-ns", "ratings-sa")),
    ))
    .await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(
        e.to_string().contains("`ratings-vm-10.0.0.12-Bad Network`"),
        "{e}"
    );

    // Not auto-registering: nothing to do.
    let plain = proxy(
        "10.0.0.12",
        &[("AUTO_REGISTER_GROUP", "")],
        Some(("vm-ns", "ratings-sa")),
    );
    assert_eq!(registry.connect(&plain).await.unwrap(), None);
    assert!(registry.workload_entries().is_empty());
    assert_eq!(
        fs::read_dir(tmp.path().join("workloadentries"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn pre_created_entries_with_health_checks() {
    let config = format!(
        "{GROUP}---
{BILLING_ENTRY}status:
  conditions:
  - {{type: Healthy, status: \"True\"}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: static-vm, namespace: vm-ns}}
spec: {{address: 10.0.0.21}}
"
    );
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _config) = open(tmp.path(), snapshot(&config));
    let named = |name: &str| {
        proxy(
            "10.0.0.20",
            &[("AUTO_REGISTER_GROUP", ""), ("WORKLOAD_ENTRY", name)],
            Some(("vm-ns", "ratings-sa")),
        )
    };
    let connection = registry
        .connect(&named("billing-vm-1"))
        .await
        .unwrap()
        .unwrap();
    assert!(!connection.auto_registered());
    let entry = registry.workload_entry(&key("billing-vm-1")).unwrap();
    assert!(entry.metadata.annotations.contains_key(CONNECTED_AT));
    assert!(entry.has_health_condition());

    registry.disconnect(connection);
    advance(GRACE + Duration::from_secs(1)).await;
    let entry = registry.workload_entry(&key("billing-vm-1")).unwrap();
    assert!(
        entry.metadata.annotations.contains_key(DISCONNECTED_AT),
        "kept"
    );
    assert!(!entry.has_health_condition(), "its health is unknown now");
    assert_eq!(registry.workload_entries().len(), 2);
    assert_eq!(
        fs::read_dir(tmp.path().join("workloadentries"))
            .unwrap()
            .count(),
        0,
        "config directory entries are never written"
    );

    assert_eq!(registry.connect(&named("static-vm")).await.unwrap(), None);
    let e = registry.connect(&named("missing")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.to_string()
            .contains("WorkloadEntry vm-ns/missing is not found"),
        "{e}"
    );
}

fn stored_entry(name: &str, annotations: &[(&str, String)]) -> String {
    let annotations: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  annotations:
    istio.io/autoRegistrationGroup: ratings-vm
{annotations}  name: {name}
  namespace: vm-ns
spec:
  address: 10.0.0.12
"
    )
}

#[tokio::test(start_paused = true)]
async fn a_restart_sweeps_what_the_previous_run_left() {
    let tmp = tempfile::tempdir().unwrap();
    let ns = tmp.path().join("workloadentries/vm-ns");
    fs::create_dir_all(&ns).unwrap();
    let now = SystemTime::now();
    let ago = |secs| format_rfc3339_nano(now - Duration::from_secs(secs));
    let ours = "meshvm-controlplane".to_string();
    let files = [
        // Connected when the previous run stopped: disconnected now.
        (
            "crashed",
            vec![(CONNECTED_AT, ago(60)), (WORKLOAD_CONTROLLER, ours.clone())],
        ),
        // Another controller's connected entry: not ours to touch.
        (
            "elsewhere",
            vec![
                (CONNECTED_AT, ago(60)),
                (WORKLOAD_CONTROLLER, "istiod-1".into()),
            ],
        ),
        // Disconnected long ago: deleted at once.
        (
            "stale",
            vec![
                (DISCONNECTED_AT, ago(3600)),
                (WORKLOAD_CONTROLLER, ours.clone()),
            ],
        ),
        // Disconnected 4 s ago: deleted after the 6 s left of its grace period.
        (
            "recent",
            vec![
                (DISCONNECTED_AT, ago(4)),
                (WORKLOAD_CONTROLLER, ours.clone()),
            ],
        ),
        // An unreadable time counts as expired.
        ("garbled", vec![(DISCONNECTED_AT, "yesterday".into())]),
    ];
    for (name, annotations) in &files {
        fs::write(
            ns.join(format!("{name}.yaml")),
            stored_entry(name, annotations),
        )
        .unwrap();
    }
    let (registry, _config) = open(tmp.path(), snapshot(GROUP));
    let names = |r: &Registry| -> Vec<String> {
        r.workload_entries()
            .into_iter()
            .map(|e| e.metadata.name)
            .collect()
    };
    assert_eq!(names(&registry), ["crashed", "elsewhere", "recent"]);
    assert!(!ns.join("stale.yaml").exists() && !ns.join("garbled.yaml").exists());
    let crashed = registry.workload_entry(&key("crashed")).unwrap();
    assert!(crashed.metadata.annotations.contains_key(DISCONNECTED_AT));
    assert!(!crashed.metadata.annotations.contains_key(CONNECTED_AT));
    assert!(
        fs::read_to_string(ns.join("crashed.yaml"))
            .unwrap()
            .contains(DISCONNECTED_AT)
    );

    // Margins of a few seconds for the time the test itself takes.
    advance(Duration::from_secs(3)).await;
    assert_eq!(names(&registry), ["crashed", "elsewhere", "recent"]);
    advance(Duration::from_secs(5)).await;
    assert_eq!(names(&registry), ["crashed", "elsewhere"]);
    advance(GRACE).await;
    assert_eq!(names(&registry), ["elsewhere"]);
    assert!(!ns.join("crashed.yaml").exists());
    assert!(ns.join("elsewhere.yaml").exists());
}

#[tokio::test(start_paused = true)]
async fn a_vm_reconnecting_after_a_restart_keeps_its_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _config) = open(tmp.path(), snapshot(GROUP));
    let connection = registry.connect(&vm("10.0.0.12")).await.unwrap().unwrap();
    let before = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    // The control plane stops without the stream ending cleanly.
    drop(connection);
    drop(registry);

    let (registry, _config) = open(tmp.path(), snapshot(GROUP));
    let after = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    assert!(after.metadata.annotations.contains_key(DISCONNECTED_AT));
    advance(GRACE / 2).await;
    let connection = registry.connect(&vm("10.0.0.12")).await.unwrap().unwrap();
    advance(GRACE * 2).await;
    let entry = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    assert_eq!(entry.metadata.uid, before.metadata.uid);
    assert_eq!(
        entry.metadata.creation_timestamp,
        before.metadata.creation_timestamp
    );
    assert!(entry.metadata.annotations.contains_key(CONNECTED_AT));
    registry.disconnect(connection);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_stored_entry_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let ns = tmp.path().join("workloadentries/vm-ns");
    fs::create_dir_all(&ns).unwrap();
    let file = ns.join(format!("{VM_ENTRY}.yaml"));
    fs::write(
        &file,
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nspec: [\n",
    )
    .unwrap();
    let (registry, _config) = open(tmp.path(), snapshot(GROUP));
    let errors = registry.store_errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].path, file);
    let e = registry.connect(&vm("10.0.0.12")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.to_string().contains("is malformed"), "{e}");
    advance(GRACE * 20).await;
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nspec: [\n",
        "untouched"
    );
    assert!(registry.workload_entries().is_empty());
}

#[tokio::test(start_paused = true)]
async fn config_changes_are_published() {
    let tmp = tempfile::tempdir().unwrap();
    let (registry, config) = open(tmp.path(), snapshot(GROUP));
    let mut updates = registry.subscribe();
    let connection = registry.connect(&vm("10.0.0.12")).await.unwrap().unwrap();
    updates.borrow_and_update();
    config.send_replace(snapshot(&format!(
        "{GROUP}---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: static-vm, namespace: vm-ns}}
spec: {{address: 10.0.0.21}}
"
    )));
    tokio::time::timeout(Duration::from_secs(5), updates.changed())
        .await
        .unwrap()
        .unwrap();
    let names: Vec<String> = updates
        .borrow()
        .iter()
        .map(|e| e.metadata.name.clone())
        .collect();
    assert_eq!(names, [VM_ENTRY, "static-vm"]);
    // A WorkloadGroup that is gone refuses new VMs; a connected one keeps
    // its entry.
    config.send_replace(snapshot(""));
    tokio::task::yield_now().await;
    let e = registry.connect(&vm("10.0.0.30")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(registry.workload_entry(&key(VM_ENTRY)).is_some());
    registry.disconnect(connection);
}

#[tokio::test(start_paused = true)]
async fn the_periodic_sweep_covers_entries_that_appear_later() {
    let tmp = tempfile::tempdir().unwrap();
    let (registry, config) = open(tmp.path(), snapshot(GROUP));
    assert_eq!(registry.options().sweep_interval(), GRACE * 10);
    let an_hour_ago = format_rfc3339_nano(SystemTime::now() - Duration::from_secs(3600));
    config.send_replace(snapshot(&format!(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: billing-vm-1
  namespace: vm-ns
  annotations:
    proxy.istio.io/health-checks-enabled: \"true\"
    istio.io/workloadController: istiod-1
    istio.io/disconnectedAt: \"{an_hour_ago}\"
spec: {{address: 10.0.0.20}}
status:
  conditions:
  - {{type: Healthy, status: \"True\"}}
"
    )));
    tokio::task::yield_now().await;
    let entry = || registry.workload_entry(&key("billing-vm-1")).unwrap();
    assert!(entry().has_health_condition());
    advance(GRACE * 10 - Duration::from_secs(1)).await;
    assert!(entry().has_health_condition());
    advance(Duration::from_secs(2)).await;
    assert!(!entry().has_health_condition(), "swept");
}

#[test]
fn needs_a_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    let (_tx, rx) = watch::channel(Arc::new(ConfigSnapshot::default()));
    let e = Registry::open(tmp.path(), rx, options()).unwrap_err();
    assert!(matches!(e, RegistryError::NoRuntime));
}

#[test]
fn shareable_across_streams() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let tmp = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let (_tx, rx) = watch::channel(Arc::new(ConfigSnapshot::default()));
    let registry = Registry::open(tmp.path(), rx, options()).unwrap();
    send_sync(&registry);
    let proxy = vm("10.0.0.12");
    // The xDS server awaits `connect` in its stream tasks.
    send(registry.connect(&proxy));
}

#[tokio::test(start_paused = true)]
async fn health_reports_set_the_healthy_condition_of_health_checked_entries() {
    let config = format!("{GROUP}---\n{BILLING_ENTRY}");
    let tmp = tempfile::tempdir().unwrap();
    let (registry, _config) = open(tmp.path(), snapshot(&config));
    let condition = |name: &str| {
        registry
            .workload_entry(&key(name))
            .and_then(|e| health_condition(&e).cloned())
    };

    // Auto-registered from a group with a probe: no condition until the
    // first report, so not yet an endpoint (istiod's rule).
    let connection = registry.connect(&vm("10.0.0.12")).await.unwrap().unwrap();
    assert_eq!(condition(VM_ENTRY), None);
    let entry = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    assert!(!crate::mesh::entry_is_healthy(&entry));

    assert!(
        registry
            .report_health(&connection, false, Some("connection refused"))
            .unwrap()
    );
    let unhealthy = condition(VM_ENTRY).unwrap();
    assert_eq!(unhealthy.status, "False");
    assert_eq!(unhealthy.message.as_deref(), Some("connection refused"));
    assert!(unhealthy.last_probe_time.is_some());
    assert_eq!(unhealthy.last_transition_time, unhealthy.last_probe_time);
    // Stored, as kubectl would show the status.
    let stored = fs::read_to_string(
        tmp.path()
            .join("workloadentries/vm-ns/ratings-vm-10.0.0.12-vm-network.yaml"),
    )
    .unwrap();
    assert!(stored.contains("message: connection refused"), "{stored}");

    advance(Duration::from_secs(5)).await;
    assert!(registry.report_health(&connection, true, None).unwrap());
    let healthy = condition(VM_ENTRY).unwrap();
    assert_eq!(
        (healthy.status.as_str(), healthy.message.as_deref()),
        ("True", None)
    );
    assert_ne!(healthy.last_transition_time, unhealthy.last_transition_time);
    let entry = registry.workload_entry(&key(VM_ENTRY)).unwrap();
    assert!(crate::mesh::entry_is_healthy(&entry));

    // The same again: the probe time moves, the transition does not.
    advance(Duration::from_secs(5)).await;
    assert!(!registry.report_health(&connection, true, None).unwrap());
    let again = condition(VM_ENTRY).unwrap();
    assert_eq!(again.last_transition_time, healthy.last_transition_time);
    registry.disconnect(connection);

    // A config directory entry: the condition is an overlay, the file is
    // never written.
    let named = proxy(
        "10.0.0.20",
        &[
            ("AUTO_REGISTER_GROUP", ""),
            ("WORKLOAD_ENTRY", "billing-vm-1"),
        ],
        Some(("vm-ns", "ratings-sa")),
    );
    let connection = registry.connect(&named).await.unwrap().unwrap();
    registry
        .report_health(&connection, false, Some("db down"))
        .unwrap();
    assert_eq!(condition("billing-vm-1").unwrap().status, "False");
    registry.report_health(&connection, true, None).unwrap();
    assert_eq!(condition("billing-vm-1").unwrap().status, "True");
    assert!(
        !tmp.path()
            .join("workloadentries/vm-ns/billing-vm-1.yaml")
            .exists()
    );
    registry.disconnect(connection);
}

#[test]
fn merged_entries_are_sorted_and_the_config_directory_wins() {
    let config = snapshot(
        "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: b-config, namespace: vm-ns}
spec: {address: 10.0.0.2}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: d-both, namespace: vm-ns}
spec: {address: 10.0.0.4}
",
    );
    let stored_entry = |name: &str, address: &str| {
        let mut e = config.workload_entries.values().next().unwrap().clone();
        e.metadata.name = name.into();
        e.spec.address = address.into();
        (e.metadata.key(), Arc::new(e))
    };
    let stored: BTreeMap<ObjectKey, Arc<WorkloadEntry>> = [
        stored_entry("a-stored", "10.0.0.1"),
        stored_entry("c-stored", "10.0.0.3"),
        stored_entry("d-both", "10.0.0.99"),
        stored_entry("e-stored", "10.0.0.5"),
    ]
    .into_iter()
    .collect();
    let merged = merged_entries(&config, &stored, &BTreeMap::new());
    let seen: Vec<(&str, &str)> = merged
        .iter()
        .map(|e| (e.metadata.name.as_str(), e.spec.address.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("a-stored", "10.0.0.1"),
            ("b-config", "10.0.0.2"),
            ("c-stored", "10.0.0.3"),
            ("d-both", "10.0.0.4"),
            ("e-stored", "10.0.0.5"),
        ]
    );
    // Stored entries are shared, not copied.
    assert!(Arc::ptr_eq(&merged[0], &stored[&key("a-stored")]));
}
