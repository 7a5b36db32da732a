//! The registry as the control plane runs it: a watched copy of the
//! testdata/controlplane/mesh/ config directory, a state directory, VMs
//! connecting with the node the stock agent sends. Edits of the config
//! directory reach the registry through the watcher; waits are for
//! published changes (with a generous timeout), never fixed sleeps.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use meshvm_controlplane::ca::SpiffeId;
use meshvm_controlplane::config::{ConfigWatcher, ObjectKey, WorkloadEntry};
use meshvm_controlplane::node::ProxyNode;
use meshvm_controlplane::registry::{Proxy, PublishedEntries, Registry, RegistryOptions};
use tokio::sync::watch;

const TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

fn mesh_copy() -> tempfile::TempDir {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/controlplane/mesh");
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("config")).unwrap();
    fs::create_dir(tmp.path().join("state")).unwrap();
    for file in fs::read_dir(source).unwrap() {
        let file = file.unwrap();
        fs::copy(
            file.path(),
            tmp.path().join("config").join(file.file_name()),
        )
        .unwrap();
    }
    tmp
}

fn s(text: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(text.into())),
    }
}

/// The node metadata the stock agent sends for a VM onboarded from
/// `group` (istio-vm-protocol §2.2), with `ip`.
fn vm(group: &str, service_account: &str, ip: &str) -> Proxy {
    let fields: HashMap<String, Value> = [
        ("NAMESPACE", s("vm-ns")),
        ("SERVICE_ACCOUNT", s(service_account)),
        ("AUTO_REGISTER_GROUP", s(group)),
        ("NETWORK", s("vm-network")),
        ("INSTANCE_IPS", s(ip)),
        ("ISTIO_VERSION", s("1.28.0")),
        ("DNS_CAPTURE", s("true")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Proxy {
        node: ProxyNode::parse(&Node {
            id: format!("sidecar~{ip}~{group}-1.vm-ns~vm-ns.svc.cluster.local"),
            metadata: Some(Struct { fields }),
            ..Node::default()
        })
        .unwrap(),
        identities: vec![SpiffeId::new("cluster.local", "vm-ns", service_account).unwrap()],
    }
}

/// Waits until the published entries satisfy `done`.
async fn wait_for(
    updates: &mut watch::Receiver<PublishedEntries>,
    what: &str,
    done: impl Fn(&[Arc<WorkloadEntry>]) -> bool,
) {
    tokio::time::timeout(TIMEOUT, updates.wait_for(|entries| done(entries)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap();
}

fn names<E: std::borrow::Borrow<WorkloadEntry>>(entries: &[E]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.borrow().metadata.key().to_string())
        .collect()
}

fn write(path: &PathBuf, text: &str) {
    // Atomically, as editors and `kubectl apply`-like tools do.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn vms_register_and_the_registry_follows_the_config_directory() {
    let tmp = mesh_copy();
    let config_dir = tmp.path().join("config");
    let state_dir = tmp.path().join("state");
    let watcher = ConfigWatcher::start(&config_dir, POLL).unwrap();
    let options = RegistryOptions {
        grace_period: Duration::from_millis(300),
        ..RegistryOptions::default()
    };
    let registry = Registry::open(&state_dir, watcher.subscribe(), options).unwrap();
    let mut updates = registry.subscribe();
    assert_eq!(names(&registry.workload_entries()), ["vm-ns/mysql-vm-1"]);

    // A VM of the ratings-vm group registers.
    let ratings = registry
        .connect(&vm("ratings-vm", "ratings-sa", "10.0.0.12"))
        .await
        .unwrap()
        .expect("auto-registered");
    assert_eq!(
        ratings.entry(),
        &ObjectKey::new("vm-ns", "ratings-vm-10.0.0.12-vm-network")
    );
    let stored = state_dir.join("workloadentries/vm-ns/ratings-vm-10.0.0.12-vm-network.yaml");
    let text = fs::read_to_string(&stored).unwrap();
    assert!(
        text.contains("istio.io/autoRegistrationGroup: ratings-vm"),
        "{text}"
    );

    // A group that does not exist yet refuses its VMs ...
    let billing = vm("billing-vm", "billing-sa", "10.0.0.13");
    let e = registry.connect(&billing).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    // ... until it is added to the config directory.
    let group_file = config_dir.join("billing-vm.yaml");
    write(
        &group_file,
        "apiVersion: networking.istio.io/v1beta1
kind: WorkloadGroup
metadata: {name: billing-vm, namespace: vm-ns}
spec:
  metadata: {labels: {app: billing}}
  template: {serviceAccount: billing-sa, ports: {grpc: 7070}}
",
    );
    let mut config = watcher.subscribe();
    tokio::time::timeout(
        TIMEOUT,
        config.wait_for(|c| c.workload_group("vm-ns", "billing-vm").is_some()),
    )
    .await
    .expect("the watcher picks up the new group")
    .unwrap();
    let billing_connection = registry.connect(&billing).await.unwrap().unwrap();
    let entry = registry.workload_entry(billing_connection.entry()).unwrap();
    assert_eq!(entry.spec.labels["app"], "billing");
    assert_eq!(entry.spec.ports["grpc"], 7070);

    // An edited WorkloadEntry manifest is published.
    let mysql_file = config_dir.join("workloadentry-mysql.yaml");
    let mysql = fs::read_to_string(&mysql_file).unwrap();
    write(&mysql_file, &mysql.replace("10.0.0.40", "10.0.0.41"));
    wait_for(&mut updates, "the edited mysql entry", |entries| {
        entries
            .iter()
            .any(|e| e.metadata.name == "mysql-vm-1" && e.spec.address == "10.0.0.41")
    })
    .await;

    // A manifest broken by an edit keeps serving its previous version.
    write(
        &group_file,
        "apiVersion: networking.istio.io/v1beta1\nkind: [\n",
    );
    tokio::time::timeout(TIMEOUT, config.wait_for(|c| !c.errors.is_empty()))
        .await
        .expect("the watcher reports the broken file")
        .unwrap();
    let snapshot = watcher.snapshot();
    assert!(snapshot.errors[0].to_string().contains("billing-vm.yaml"));
    assert!(snapshot.workload_group("vm-ns", "billing-vm").is_some());
    let again = registry
        .connect(&vm("billing-vm", "billing-sa", "10.0.0.14"))
        .await
        .unwrap()
        .unwrap();

    // Disconnected VMs are deleted after the grace period; the others stay.
    registry.disconnect(billing_connection);
    registry.disconnect(again);
    wait_for(&mut updates, "the billing entries' cleanup", |entries| {
        names(entries) == ["vm-ns/mysql-vm-1", "vm-ns/ratings-vm-10.0.0.12-vm-network"]
    })
    .await;
    assert_eq!(
        fs::read_dir(state_dir.join("workloadentries/vm-ns"))
            .unwrap()
            .count(),
        1
    );
    registry.disconnect(ratings);
    wait_for(&mut updates, "the ratings entry's cleanup", |entries| {
        names(entries) == ["vm-ns/mysql-vm-1"]
    })
    .await;
    assert!(!stored.exists());
}
