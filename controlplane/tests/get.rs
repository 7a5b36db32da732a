//! `meshvm-controlplane get workloadentries`, the real binary, on a state
//! directory a registry wrote (a VM auto-registered) and the
//! testdata/controlplane/mesh/ config directory (a hand-made entry).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use meshvm_controlplane::ca::SpiffeId;
use meshvm_controlplane::config::load_dir;
use meshvm_controlplane::node::ProxyNode;
use meshvm_controlplane::registry::{Proxy, Registry, RegistryOptions};
use tokio::sync::watch;

const VM_ENTRY: &str = "ratings-vm-10.0.0.12-vm-network";

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/controlplane/mesh")
}

/// A state directory with the reference VM registered (still connected
/// when the registry stopped).
async fn registered_state() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let (_config, rx) = watch::channel(Arc::new(load_dir(&config_dir()).unwrap()));
    let registry = Registry::open(tmp.path(), rx, RegistryOptions::default()).unwrap();
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let fields: HashMap<String, Value> = [
        ("NAMESPACE", "vm-ns"),
        ("SERVICE_ACCOUNT", "ratings-sa"),
        ("AUTO_REGISTER_GROUP", "ratings-vm"),
        ("NETWORK", "vm-network"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), string(v)))
    .collect();
    let proxy = Proxy {
        node: ProxyNode::parse(&Node {
            id: "sidecar~10.0.0.12~ratings-vm-1.vm-ns~vm-ns.svc.cluster.local".into(),
            metadata: Some(Struct { fields }),
            ..Node::default()
        })
        .unwrap(),
        identities: vec![SpiffeId::new("cluster.local", "vm-ns", "ratings-sa").unwrap()],
    };
    let connection = registry.connect(&proxy).await.unwrap().unwrap();
    assert_eq!(connection.entry().name, VM_ENTRY);
    // The control plane stops with the VM connected.
    drop(connection);
    tmp
}

fn get(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshvm-controlplane"))
        .arg("get")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .arg("--config-dir")
        .arg(config_dir())
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run meshvm-controlplane")
}

fn ok(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "failed: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn tables_as_kubectl_prints_them() {
    let state = registered_state().await;
    for resource in ["workloadentries", "workloadentry", "we"] {
        let table = ok(get(state.path(), &[resource, "-n", "vm-ns"]));
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows.len(), 3, "{table}");
        assert_eq!(rows[0], ["NAME", "AGE", "ADDRESS"]);
        assert_eq!(rows[1], ["mysql-vm-1", "<unknown>", "10.0.0.40"]);
        assert_eq!((rows[2][0], rows[2][2]), (VM_ENTRY, "10.0.0.12"));
        assert!(rows[2][1].ends_with('s'), "an age in seconds: {table}");
        // Columns line up: AGE starts after the longest name and 3 spaces.
        assert_eq!(
            table.lines().next().unwrap().find("AGE"),
            Some(VM_ENTRY.len() + 3)
        );
    }

    let wide = ok(get(state.path(), &["we", "-A", "-o", "wide"]));
    let header: Vec<&str> = wide.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAMESPACE", "NAME", "AGE", "ADDRESS"]);
    assert_eq!(wide.lines().count(), 3);

    let empty = get(state.path(), &["we"]);
    assert!(empty.status.success());
    assert!(empty.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&empty.stderr),
        "No resources found in default namespace.\n"
    );
}

#[tokio::test]
async fn yaml_and_json() {
    let state = registered_state().await;
    let yaml = ok(get(state.path(), &["we", "-n", "vm-ns", "-o", "yaml"]));
    let list: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(list["kind"], "List");
    assert_eq!(list["apiVersion"], "v1");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[1]["metadata"]["name"], VM_ENTRY);
    assert_eq!(
        items[1]["metadata"]["annotations"]["istio.io/autoRegistrationGroup"],
        "ratings-vm"
    );
    assert_eq!(
        items[1]["metadata"]["ownerReferences"][0]["kind"],
        "WorkloadGroup"
    );
    assert_eq!(items[1]["spec"]["ports"]["http"], 9080);

    let json = ok(get(state.path(), &["we", "-n", "vm-ns", "-o", "json"]));
    assert!(
        json.starts_with("{\n    \"apiVersion\": \"v1\",\n"),
        "{json}"
    );
    let from_json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(from_json, list, "the same list in both formats");

    // One entry by name: the object itself, as stored.
    let one = ok(get(
        state.path(),
        &["we", VM_ENTRY, "-n", "vm-ns", "-o", "yaml"],
    ));
    let stored = std::fs::read_to_string(
        state
            .path()
            .join(format!("workloadentries/vm-ns/{VM_ENTRY}.yaml")),
    )
    .unwrap();
    assert_eq!(one, stored);
    assert!(one.starts_with("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"));
}

#[tokio::test]
async fn errors() {
    let state = registered_state().await;
    let missing = get(state.path(), &["we", "mysql-vm-1", "nope", "-n", "vm-ns"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stdout).contains("mysql-vm-1"));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        "Error from server (NotFound): workloadentries.networking.istio.io \"nope\" not found\n"
    );

    let pods = get(state.path(), &["pods"]);
    assert!(!pods.status.success());
    assert!(
        String::from_utf8_lossy(&pods.stderr)
            .contains("the server doesn't have a resource type \"pods\""),
        "{}",
        String::from_utf8_lossy(&pods.stderr)
    );

    let no_state = get(&state.path().join("nope"), &["we"]);
    assert!(!no_state.status.success());
    assert!(String::from_utf8_lossy(&no_state.stderr).contains("--state-dir"));

    // A malformed stored entry is a warning; the rest is printed.
    let ns = state.path().join("workloadentries/vm-ns");
    std::fs::write(ns.join("broken.yaml"), "kind: [\n").unwrap();
    let out = get(state.path(), &["we", "-n", "vm-ns"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning: "));
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.yaml"));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}
