//! Every filter behaviour through the wasmtime harness: the real
//! `meshvm_filter.wasm`, called the way Envoy calls it.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use support::harness;

use meshvm_harness::{Harness, HttpRequest, Plugin, property};

const CALLER: &str = "spiffe://cluster.local/ns/payments/sa/ledger";

fn start(config: &str) -> Plugin {
    let plugin = harness()
        .plugin()
        .vm_id("meshvm")
        .root_id("meshvm")
        .configuration(config)
        .start()
        .expect("start the filter");
    assert!(
        plugin.configured(),
        "configuration refused: {:?}",
        plugin.logs()
    );
    plugin
}

fn inbound() -> Plugin {
    start(r#"{"direction":"inbound"}"#)
}

fn metric(plugin: &Plugin, name: &str) -> i64 {
    plugin
        .metric(&format!("meshvm.{name}"))
        .unwrap_or_else(|| panic!("metric {name} undefined"))
}

fn ledger_metadata() -> String {
    support::istio_peer_metadata(
        &[
            ("NAME", "ledger-v3-abc"),
            ("NAMESPACE", "payments"),
            ("WORKLOAD_NAME", "ledger-v3"),
            ("CLUSTER_ID", "Kubernetes"),
        ],
        &[("app", "ledger"), ("version", "v3")],
    )
}

#[test]
fn inbound_mtls_caller_is_labeled_from_its_certificate() {
    let mut plugin = inbound();
    let md = ledger_metadata();
    let ex = plugin
        .http_request(
            HttpRequest::get("/orders")
                .mtls_peer(CALLER)
                .header("x-envoy-peer-metadata", &md)
                .header(
                    "x-envoy-peer-metadata-id",
                    "sidecar~10.0.0.9~ledger-v3-abc.payments~payments.svc.cluster.local",
                )
                .header("user-agent", "curl"),
        )
        .unwrap();
    assert_eq!(ex.request_header_all("x-mesh-peer-identity"), [CALLER]);
    assert_eq!(ex.request_header("x-mesh-peer-namespace"), Some("payments"));
    assert_eq!(
        ex.request_header("x-mesh-peer-service-account"),
        Some("ledger")
    );
    assert_eq!(ex.request_header("x-mesh-peer-workload"), Some("ledger-v3"));
    assert_eq!(ex.request_header("x-mesh-peer-app"), Some("ledger"));
    assert_eq!(ex.request_header("x-mesh-peer-version"), Some("v3"));
    assert_eq!(ex.request_header("x-mesh-peer-cluster"), Some("Kubernetes"));
    assert_eq!(ex.request_header("x-envoy-peer-metadata"), None);
    assert_eq!(ex.request_header("x-envoy-peer-metadata-id"), None);
    assert_eq!(ex.request_header("user-agent"), Some("curl"));
    assert_eq!(ex.local_response, None);
    assert_eq!(metric(&plugin, "inbound.requests_labeled"), 1);
    assert_eq!(metric(&plugin, "inbound.peer_identity_missing"), 0);
    assert!(!plugin.failed());
}

#[test]
fn forged_identity_headers_never_reach_the_app() {
    let mut plugin = inbound();
    let ex = plugin
        .http_request(
            HttpRequest::get("/")
                .mtls_peer(CALLER)
                .header(
                    "x-mesh-peer-identity",
                    "spiffe://cluster.local/ns/kube-system/sa/admin",
                )
                .header("x-mesh-peer-identity", "second-copy")
                .header("x-mesh-peer-workload", "forged")
                .header("x-mesh-peer-anything", "forged"),
        )
        .unwrap();
    assert_eq!(ex.request_header_all("x-mesh-peer-identity"), [CALLER]);
    // The caller sent no peer metadata, so no workload label at all.
    assert_eq!(ex.request_header("x-mesh-peer-workload"), None);
    assert_eq!(ex.request_header("x-mesh-peer-anything"), None);
    assert_eq!(metric(&plugin, "inbound.spoofed_headers_removed"), 4);
}

#[test]
fn plaintext_callers_get_no_identity_and_their_metadata_is_dropped() {
    let mut plugin = inbound();
    let md = ledger_metadata();
    let ex = plugin
        .http_request(
            HttpRequest::get("/")
                .header("x-mesh-peer-identity", CALLER)
                .header("x-envoy-peer-metadata", &md),
        )
        .unwrap();
    for h in [
        "x-mesh-peer-identity",
        "x-mesh-peer-workload",
        "x-mesh-peer-app",
        "x-envoy-peer-metadata",
    ] {
        assert_eq!(ex.request_header(h), None, "{h}");
    }
    assert_eq!(metric(&plugin, "inbound.peer_identity_missing"), 1);
    assert_eq!(metric(&plugin, "inbound.requests_labeled"), 0);
    // Metadata of an unauthenticated caller is not even parsed.
    assert_eq!(metric(&plugin, "inbound.peer_metadata_malformed"), 0);
}

#[test]
fn an_mtls_caller_without_a_uri_san_has_no_identity() {
    let mut plugin = inbound();
    let ex = plugin
        .http_request(HttpRequest::get("/").property(&["connection", "mtls"], property::bool(true)))
        .unwrap();
    assert_eq!(ex.request_header("x-mesh-peer-identity"), None);
    assert_eq!(metric(&plugin, "inbound.peer_identity_missing"), 1);
}

#[test]
fn the_peer_certificate_is_read_once_per_connection() {
    let mut plugin = inbound();
    let on = |conn: u64, san: &str| {
        HttpRequest::get("/")
            .property(&["connection", "id"], property::uint(conn))
            .mtls_peer(san)
    };
    let other = "spiffe://cluster.local/ns/other/sa/other";
    let first = plugin.http_request(on(7, CALLER)).unwrap();
    assert_eq!(first.request_header("x-mesh-peer-identity"), Some(CALLER));
    // A connection's certificate cannot change; the filter does not ask again.
    let again = plugin.http_request(on(7, other)).unwrap();
    assert_eq!(again.request_header("x-mesh-peer-identity"), Some(CALLER));
    // Another connection (even one sharing the cache slot) is read afresh.
    for conn in [8, 7 + 256] {
        let ex = plugin.http_request(on(conn, other)).unwrap();
        assert_eq!(
            ex.request_header("x-mesh-peer-identity"),
            Some(other),
            "connection {conn}"
        );
    }
    // A plaintext connection is remembered as having no identity.
    let plain = plugin
        .http_request(HttpRequest::get("/").property(&["connection", "id"], property::uint(9)))
        .unwrap();
    assert_eq!(plain.request_header("x-mesh-peer-identity"), None);
}

#[test]
fn malformed_spiffe_ids_are_not_identities() {
    let mut plugin = inbound();
    let bad = [
        "",
        "spiffe://cluster.local",
        "spiffe://cluster.local/ns/a",
        "spiffe://cluster.local/ns/a/sa/",
        "spiffe://cluster.local/ns/a/sa/b/extra",
        "spiffe://Cluster.Local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b?x=y",
        "spiffe://cluster.local/sa/b/ns/a",
        "https://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a%20b/sa/c",
        "spiffe://cluster.local/ns/../sa/c",
    ];
    for san in bad {
        let ex = plugin
            .http_request(
                HttpRequest::get("/")
                    .mtls_peer(san)
                    .header("x-envoy-peer-metadata", &ledger_metadata()),
            )
            .unwrap();
        assert_eq!(ex.request_header("x-mesh-peer-identity"), None, "{san:?}");
        assert_eq!(ex.request_header("x-mesh-peer-workload"), None, "{san:?}");
        assert_eq!(ex.request_header("x-envoy-peer-metadata"), None, "{san:?}");
    }
    let long = format!("spiffe://cluster.local/ns/{}/sa/b", "n".repeat(3000));
    let ex = plugin
        .http_request(HttpRequest::get("/").mtls_peer(&long))
        .unwrap();
    assert_eq!(ex.request_header("x-mesh-peer-identity"), None);
    assert_eq!(
        metric(&plugin, "inbound.peer_identity_missing"),
        bad.len() as i64 + 1
    );
    assert!(!plugin.failed());
}

#[test]
fn malformed_peer_metadata_is_ignored_but_the_identity_stays() {
    let mut plugin = inbound();
    let oversized = support::istio_peer_metadata(&[("WORKLOAD_NAME", &"w".repeat(9000))], &[]);
    let crlf = support::istio_peer_metadata(
        &[("WORKLOAD_NAME", "evil\r\nx-mesh-peer-identity: forged")],
        &[],
    );
    let wrong_namespace = support::istio_peer_metadata(
        &[("NAMESPACE", "kube-system"), ("WORKLOAD_NAME", "admin")],
        &[],
    );
    let truncated = {
        let good = ledger_metadata();
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        let bytes = engine.decode(&good).unwrap();
        engine.encode(&bytes[..bytes.len() - 3])
    };
    let cases = [
        "%%% not base64 %%%".to_string(),
        "-_-_".to_string(),
        "Zg=".to_string(),
        oversized,
        crlf,
        wrong_namespace,
        truncated,
        "//////////8=".to_string(),
    ];
    for md in &cases {
        let ex = plugin
            .http_request(
                HttpRequest::get("/")
                    .mtls_peer(CALLER)
                    .header("x-envoy-peer-metadata", md),
            )
            .unwrap();
        assert_eq!(
            ex.request_header("x-mesh-peer-identity"),
            Some(CALLER),
            "{md:.40}"
        );
        for h in [
            "x-mesh-peer-workload",
            "x-mesh-peer-app",
            "x-mesh-peer-version",
            "x-mesh-peer-cluster",
        ] {
            assert_eq!(ex.request_header(h), None, "{h} from {md:.40}");
        }
        assert_eq!(ex.request_header("x-envoy-peer-metadata"), None);
    }
    assert_eq!(
        metric(&plugin, "inbound.peer_metadata_malformed"),
        cases.len() as i64
    );
    assert!(!plugin.failed());
}

#[test]
fn peer_metadata_size_limit_and_header_removal_are_configurable() {
    let mut plugin = start(
        r#"{"direction":"inbound","max_peer_metadata_bytes":16,"remove_peer_metadata_headers":false}"#,
    );
    let md = ledger_metadata();
    let ex = plugin
        .http_request(
            HttpRequest::get("/")
                .mtls_peer(CALLER)
                .header("x-envoy-peer-metadata", &md),
        )
        .unwrap();
    assert_eq!(ex.request_header("x-mesh-peer-workload"), None);
    assert_eq!(
        ex.request_header("x-envoy-peer-metadata"),
        Some(md.as_str())
    );
    assert_eq!(metric(&plugin, "inbound.peer_metadata_malformed"), 1);
}

#[test]
fn header_names_are_configurable() {
    let mut plugin = start(
        r#"{"direction":"inbound","headers":{"identity_prefix":"x-caller-","identity":"x-caller-id","workload":"x-caller-workload","peer_metadata":"x-peer-md"}}"#,
    );
    let md = ledger_metadata();
    let ex = plugin
        .http_request(
            HttpRequest::get("/")
                .mtls_peer(CALLER)
                .header("x-caller-id", "forged")
                .header("x-caller-other", "forged")
                .header("x-peer-md", &md),
        )
        .unwrap();
    assert_eq!(ex.request_header_all("x-caller-id"), [CALLER]);
    assert_eq!(ex.request_header("x-caller-other"), None);
    assert_eq!(ex.request_header("x-caller-workload"), Some("ledger-v3"));
    assert_eq!(ex.request_header("x-mesh-peer-namespace"), Some("payments"));
    assert_eq!(ex.request_header("x-peer-md"), None);
}

#[test]
fn invalid_configurations_are_refused_with_the_field_named() {
    let cases = [
        ("", "empty"),
        ("not json", "expected"),
        ("{}", "missing field `direction`"),
        (r#"{"direction":"up"}"#, "unknown variant `up`"),
        (
            r#"{"direction":"inbound","extra":true}"#,
            "unknown field `extra`",
        ),
        (
            r#"{"direction":"inbound","headers":{"identity":"UPPER"}}"#,
            "`headers.identity`",
        ),
        (
            r#"{"direction":"inbound","headers":{"identity_prefix":""}}"#,
            "`headers.identity_prefix`",
        ),
        (
            r#"{"direction":"inbound","max_peer_metadata_bytes":1000000}"#,
            "`max_peer_metadata_bytes`",
        ),
    ];
    for (config, expected) in cases {
        let plugin = harness()
            .plugin()
            .root_id("meshvm")
            .configuration(config)
            .start()
            .expect("start");
        assert!(!plugin.configured(), "accepted {config:?}");
        assert!(
            plugin.logged(expected),
            "no log naming {expected:?} for {config:?}: {:?}",
            plugin.logs()
        );
        assert!(!plugin.failed());
    }
}

#[test]
fn a_rejected_reconfiguration_keeps_the_plugin_alive() {
    let mut plugin = inbound();
    assert!(!plugin.reconfigure(r#"{"direction":1}"#).unwrap());
    assert!(plugin.reconfigure(r#"{"direction":"outbound"}"#).unwrap());
    let ex = plugin.http_request(HttpRequest::get("/")).unwrap();
    assert!(ex.request_header("x-envoy-peer-metadata").is_some());
}

fn outbound_plugin(harness: &Harness) -> Plugin {
    let plugin = harness
        .plugin()
        .root_id("meshvm")
        .configuration(r#"{"direction":"outbound"}"#)
        .property(
            &["xds", "node", "id"],
            "sidecar~10.0.0.5~product-vm-1.default~default.svc.cluster.local",
        )
        .node_metadata("NAME", "product-vm-1")
        .node_metadata("NAMESPACE", "default")
        .node_metadata("WORKLOAD_NAME", "product-vm")
        .node_metadata("CLUSTER_ID", "vm-cluster")
        .node_metadata(
            "OWNER",
            "kubernetes://apis/networking.istio.io/v1/namespaces/default/workloadgroups/product-vm",
        )
        .node_metadata("ISTIO_VERSION", "1.24.0")
        .node_metadata(
            "LABELS",
            property::map(&[("app", "product"), ("version", "v1"), ("private", "x")]),
        )
        .start()
        .unwrap();
    assert!(plugin.configured(), "{:?}", plugin.logs());
    plugin
}

#[test]
fn outbound_requests_carry_our_peer_metadata() {
    let mut plugin = outbound_plugin(&harness());
    let ex = plugin
        .http_request(HttpRequest::get("/").header("x-envoy-peer-metadata", "Zm9yZ2Vk"))
        .unwrap();
    assert_eq!(
        ex.request_header_all("x-envoy-peer-metadata-id"),
        ["sidecar~10.0.0.5~product-vm-1.default~default.svc.cluster.local"]
    );
    let values = ex.request_header_all("x-envoy-peer-metadata");
    assert_eq!(values.len(), 1);
    let md = support::decode_istio_peer_metadata(values[0]);
    let (fields, labels) = support::peer_metadata_maps(&md);
    assert_eq!(
        fields,
        support::map(&[
            ("CLUSTER_ID", "vm-cluster"),
            ("NAME", "product-vm-1"),
            ("NAMESPACE", "default"),
            (
                "OWNER",
                "kubernetes://apis/networking.istio.io/v1/namespaces/default/workloadgroups/product-vm"
            ),
            ("WORKLOAD_NAME", "product-vm"),
        ])
    );
    assert_eq!(
        labels,
        support::map(&[("app", "product"), ("version", "v1")])
    );
    assert_eq!(metric(&plugin, "outbound.requests_labeled"), 1);
}

#[test]
fn outbound_metadata_is_encoded_once_per_configuration() {
    let mut plugin = outbound_plugin(&harness());
    let first = plugin.http_request(HttpRequest::get("/")).unwrap();
    // Node metadata cannot change under a running Envoy; if the filter read it
    // per request, this change would show.
    plugin.set_property(&["xds", "node", "metadata", "NAME"], "changed");
    let second = plugin.http_request(HttpRequest::get("/")).unwrap();
    assert_eq!(
        first.request_header("x-envoy-peer-metadata"),
        second.request_header("x-envoy-peer-metadata")
    );
    assert!(plugin.reconfigure(r#"{"direction":"outbound"}"#).unwrap());
    let third = plugin.http_request(HttpRequest::get("/")).unwrap();
    let md =
        support::decode_istio_peer_metadata(third.request_header("x-envoy-peer-metadata").unwrap());
    assert_eq!(
        md.fields["NAME"].kind,
        Some(prost_types::value::Kind::StringValue("changed".into()))
    );
}

#[test]
fn outbound_falls_back_to_the_pre_1_33_node_attributes() {
    let mut plugin = harness()
        .plugin()
        .root_id("meshvm")
        .configuration(r#"{"direction":"outbound"}"#)
        .property(
            &["node", "id"],
            "sidecar~10.0.0.5~old.default~default.svc.cluster.local",
        )
        .property(&["node", "metadata", "NAME"], "old")
        .start()
        .unwrap();
    let ex = plugin.http_request(HttpRequest::get("/")).unwrap();
    assert_eq!(
        ex.request_header("x-envoy-peer-metadata-id"),
        Some("sidecar~10.0.0.5~old.default~default.svc.cluster.local")
    );
    let md =
        support::decode_istio_peer_metadata(ex.request_header("x-envoy-peer-metadata").unwrap());
    assert_eq!(md.fields.len(), 1);
}

#[test]
fn outbound_never_sends_an_unsafe_node_id() {
    let mut plugin = harness()
        .plugin()
        .root_id("meshvm")
        .configuration(r#"{"direction":"outbound"}"#)
        .property(&["xds", "node", "id"], "bad\r\nid")
        .start()
        .unwrap();
    let ex = plugin
        .http_request(HttpRequest::get("/").header("x-envoy-peer-metadata-id", "from-app"))
        .unwrap();
    assert_eq!(ex.request_header("x-envoy-peer-metadata-id"), None);
    assert!(plugin.logged("node id"));
    assert!(plugin.logged("node metadata has none"));
}

/// A small deterministic generator, so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.next() as usize) % (max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    fn printable(&mut self, max: usize) -> String {
        self.bytes(max)
            .into_iter()
            .map(|b| char::from(0x21 + b % 94))
            .collect()
    }
}

#[test]
fn random_input_never_breaks_the_filter() {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let mut plugin = inbound();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let valid = engine.decode(ledger_metadata()).unwrap();
    for i in 0..2000 {
        let metadata = match i % 3 {
            // Random bytes.
            0 => engine.encode(rng.bytes(300)),
            // Valid metadata with random bytes flipped.
            1 => {
                let mut m = valid.clone();
                for _ in 0..(1 + rng.next() % 4) {
                    let at = (rng.next() as usize) % m.len();
                    m[at] = rng.next() as u8;
                }
                engine.encode(m)
            }
            // Random printable text.
            _ => rng.printable(200),
        };
        let san = if i % 2 == 0 {
            format!("spiffe://cluster.local/ns/{}/sa/x", rng.printable(20))
        } else {
            rng.printable(60)
        };
        let ex = plugin
            .http_request(
                HttpRequest::get("/")
                    .mtls_peer(&san)
                    .header("x-envoy-peer-metadata", &metadata)
                    .header(
                        &format!("x-mesh-peer-{}", rng.next() % 5),
                        &rng.printable(30),
                    ),
            )
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert_eq!(ex.request_header("x-envoy-peer-metadata"), None);
        if let Some(id) = ex.request_header("x-mesh-peer-identity") {
            assert_eq!(id, san);
        }
    }
    assert!(!plugin.failed());
}
