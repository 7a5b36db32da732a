//! Smoke test of the project's filter: when `MESHVM_FILTER_WASM` names an
//! existing `.wasm`, load it, start it and run one request through it.
//! Otherwise the test prints why it skipped and passes.
//!
//! `MESHVM_FILTER_CONFIG` overrides the plugin configuration (default
//! `{"direction":"inbound"}`).

use meshvm_harness::{Harness, HttpRequest};

#[test]
fn filter_loads_and_serves_one_request() {
    let Some(path) = std::env::var_os("MESHVM_FILTER_WASM") else {
        eprintln!("SKIPPED: MESHVM_FILTER_WASM is not set");
        return;
    };
    let path = std::path::PathBuf::from(path);
    if !path.exists() {
        eprintln!(
            "SKIPPED: MESHVM_FILTER_WASM={} does not exist",
            path.display()
        );
        return;
    }
    let harness = Harness::load(&path).expect("the filter loads");
    let mut plugin = harness
        .plugin()
        .vm_id("meshvm")
        .root_id("meshvm")
        .plugin_name("meshvm")
        .node_metadata("NAME", "vm-1")
        .node_metadata("NAMESPACE", "default")
        .node_metadata("WORKLOAD_NAME", "vm")
        .node_metadata("CLUSTER_ID", "Kubernetes")
        .configuration(
            std::env::var("MESHVM_FILTER_CONFIG")
                .unwrap_or_else(|_| r#"{"direction":"inbound"}"#.to_string()),
        )
        .start()
        .expect("the filter starts without trapping");
    eprintln!(
        "vm_started={} configured={}",
        plugin.vm_started(),
        plugin.configured()
    );
    let exchange = plugin
        .http_request(
            HttpRequest::get("/").mtls_peer("spiffe://cluster.local/ns/default/sa/client"),
        )
        .expect("one request runs without trapping");
    eprintln!("{exchange:#?}");
    assert!(!plugin.failed());
}
