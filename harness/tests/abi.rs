//! ABI behaviour of the harness, exercised by small hand-written guests.

mod support;

use std::time::Duration;

use meshvm_harness::{
    Action, Harness, HarnessError, HttpRequest, LogEntry, LogLevel, Plugin, START_NANOS,
    encode_pairs, property,
};
use support::{Guest, messages};

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn header_maps_follow_envoy_semantics() {
    let mut g = Guest::new();
    let path = g.s(":path");
    let missing = g.s("missing");
    let added = g.s("x-added");
    let one = g.s("1");
    let two = g.s("2");
    let rep = g.s("X-Rep");
    let new = g.s("new");
    let del = g.s("x-del");
    let resp = g.s("x-resp");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $st (call $get_hv (i32.const 0) {path} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $add_hv (i32.const 0) {added} {one}))
    (drop (call $add_hv (i32.const 0) {added} {two}))
    (drop (call $rep_hv (i32.const 0) {rep} {new}))
    (drop (call $rem_hv (i32.const 0) {del}))
    (call $st (call $get_hv (i32.const 0) {missing} (i32.const 0x100) (i32.const 0x104)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    ;; the request headers went upstream: Envoy no longer hands them out
    (call $st (call $get_hv (i32.const 0) {path} (i32.const 0x100) (i32.const 0x104)))
    (call $st (call $add_hv (i32.const 2) {resp} {one}))
    (i32.const 0))
"#
    ));
    let mut plugin = harness.plugin().start().expect("starts");
    let exchange = plugin
        .http_request(
            HttpRequest::get("/hello")
                .header("x-rep", "a")
                .header("X-Rep", "b")
                .header("x-del", "gone")
                .header("x-keep", "k"),
        )
        .expect("no trap");
    assert_eq!(
        messages(&plugin),
        strs(&["st=00", "/hello", "st=00", "st=01", "st=02", "st=00"])
    );
    assert_eq!(exchange.request_action, Action::Continue);
    assert_eq!(exchange.response_action, Some(Action::Continue));
    assert_eq!(exchange.request_header_all("x-added"), vec!["1", "2"]);
    assert_eq!(exchange.request_header_all("x-rep"), vec!["new"]);
    assert_eq!(exchange.request_header("x-del"), None);
    assert_eq!(exchange.request_header("x-keep"), Some("k"));
    assert_eq!(exchange.request_header(":path"), Some("/hello"));
    assert_eq!(exchange.response_header("x-resp"), Some("1"));
    assert_eq!(exchange.response_header(":status"), Some("200"));
}

#[test]
fn bad_guest_pointers_get_invalid_memory_access() {
    let mut g = Guest::new();
    let root = g.s("plugin_root_id");
    let msg = g.s("hi");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (call $st (call $proxy_log (i32.const 2) (i32.const 0xFFFFFFF0) (i32.const 100)))
    (call $st (call $get_prop {root} (i32.const 0x7FFFFFF0) (i32.const 0x104)))
    (call $st (call $proxy_log (i32.const 9) {msg}))
    (i32.const 1))
"#
    ));
    let plugin = harness.plugin().root_id("r").start().expect("starts");
    assert_eq!(messages(&plugin), strs(&["st=06", "st=06", "st=02"]));
    assert!(!plugin.failed());
    assert!(plugin.vm_started());
    assert!(
        plugin.configured(),
        "a module without proxy_on_configure is configured"
    );
}

#[test]
fn properties_resolve_stream_then_root_then_vm() {
    let mut g = Guest::new();
    let vmk = g.s("vmk");
    let vmv = g.s("vmv");
    let ab = g.bytes(b"a\0b");
    let name = g.bytes(b"xds\0node\0metadata\0NAME");
    let nope = g.s("nope");
    let root_id = g.s("plugin_root_id");
    let san = g.bytes(b"connection\0uri_san_peer_certificate");
    let label = g.bytes(b"labels\0app");
    let req_path = g.bytes(b"request\0path");
    let k = g.s("k");
    let v1 = g.s("v1");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (call $st (call $set_prop {vmk} {vmv}))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $st (call $get_prop {ab} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $get_prop {name} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $get_prop {nope} (i32.const 0x100) (i32.const 0x104)))
    (call $st (call $get_prop {root_id} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $get_prop {san} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $get_prop {label} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $get_prop {req_path} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $set_prop {k} {v1}))
    (i32.const 0))
"#
    ));
    let mut plugin = harness
        .plugin()
        .root_id("my-root")
        .node_metadata("NAME", "vm-1")
        .property(&["labels"], property::map(&[("app", "ledger")]))
        .start()
        .expect("starts");
    let req = HttpRequest::get("/p")
        .property(&["a", "b"], "v-stream")
        .mtls_peer("spiffe://cluster.local/ns/a/sa/b");
    let exchange = plugin.http_request(req.clone()).expect("no trap");
    assert_eq!(
        messages(&plugin),
        strs(&[
            "st=00",
            "st=00",
            "v-stream",
            "st=00",
            "vm-1",
            "st=01",
            "st=00",
            "my-root",
            "st=00",
            "spiffe://cluster.local/ns/a/sa/b",
            "st=00",
            "ledger",
            "st=00",
            "/p",
            "st=00",
        ])
    );
    assert_eq!(exchange.property_set(&["k"]), Some(&b"v1"[..]));
    assert_eq!(
        exchange.properties_set,
        vec![(strs(&["k"]), b"v1".to_vec())]
    );
    // Set outside a stream: lands on the VM.
    assert_eq!(plugin.property(&["vmk"]), Some(b"vmv".to_vec()));
    assert_eq!(
        plugin.property(&["plugin_root_id"]),
        Some(b"my-root".to_vec())
    );
    assert_eq!(plugin.property(&["plugin_vm_id"]), Some(Vec::new()));
    assert_eq!(
        plugin.property(&["k"]),
        None,
        "stream properties stay on the stream"
    );
    plugin.set_property(&["late"], property::int(7));
    assert_eq!(
        plugin.property(&["late"]),
        Some(7i64.to_le_bytes().to_vec())
    );

    let stream = plugin.http_stream_for(&req).expect("stream");
    assert_eq!(stream.property(&["connection", "mtls"]), Some(vec![1]));
    assert_eq!(
        stream.property(&["source", "address"]),
        Some(b"127.0.0.1:52000".to_vec())
    );
    assert_eq!(stream.property(&["a", "b"]), Some(b"v-stream".to_vec()));
    stream.finish().expect("finishes");
    let plain = plugin.http_stream().expect("stream");
    assert_eq!(plain.property(&["connection", "mtls"]), Some(vec![0]));
    assert_eq!(
        plain.property(&["connection", "uri_san_peer_certificate"]),
        None
    );
}

#[test]
fn shared_data_cas_across_vms() {
    let mut g = Guest::new();
    let k = g.s("k");
    let a = g.s("a");
    let b = g.s("b");
    let c = g.s("c");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_vm_start") (param $root i32) (param $size i32) (result i32)
    (if (local.get $size) (then (call $st (call $set_sd {k} {a} (i32.const 0)))))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (call $st (call $get_sd {k} (i32.const 0x100) (i32.const 0x104) (i32.const 0x108)))
    (call $log_out)
    (call $st (call $set_sd {k} {b} (i32.load (i32.const 0x108))))
    (call $st (call $set_sd {k} {c} (i32.load (i32.const 0x108)))))
"#
    ));
    let writer = harness
        .plugin()
        .vm_configuration("w")
        .start()
        .expect("starts");
    assert_eq!(messages(&writer), strs(&["st=00"]));
    let (value, cas) = harness.shared_data("", "k").expect("written");
    assert_eq!(value, b"a");
    assert_ne!(cas, 0);

    let mut reader = harness.plugin().start().expect("starts");
    reader.tick().expect("ticks");
    assert_eq!(messages(&reader), strs(&["st=00", "a", "st=00", "st=08"]));
    let (value, new_cas) = harness.shared_data("", "k").expect("present");
    assert_eq!(value, b"b");
    assert_ne!(new_cas, cas);

    // Another vm_id is another namespace.
    let mut other = harness.plugin().vm_id("other").start().expect("starts");
    other.tick().expect("ticks");
    assert_eq!(messages(&other)[0], "st=01");
    assert_eq!(
        harness.shared_data("", "k").map(|(v, _)| v),
        Some(b"b".to_vec())
    );

    // An isolated Harness shares nothing.
    assert_eq!(harness.isolated().shared_data("", "k"), None);
    // Tests can write too.
    let cas = harness.set_shared_data("", "k", "from-test");
    assert_eq!(
        harness.shared_data("", "k"),
        Some((b"from-test".to_vec(), cas))
    );
}

#[test]
fn shared_queues_notify_the_last_registrant() {
    let mut g = Guest::new();
    let q = g.s("q");
    let vm = g.s("");
    let hello = g.s("hello");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (if (local.get $size) (then (call $st (call $reg_q {q} (i32.const 0x108)))))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (call $st (call $res_q {vm} {q} (i32.const 0x108)))
    (call $st (call $enq (i32.load (i32.const 0x108)) {hello})))
  (func (export "proxy_on_queue_ready") (param $root i32) (param $id i32)
    (call $st (call $deq (local.get $id) (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $deq (local.get $id) (i32.const 0x100) (i32.const 0x104))))
"#
    ));
    // Nobody registered yet: resolve and enqueue fail.
    let mut lonely = harness.isolated().plugin().start().expect("starts");
    lonely.tick().expect("ticks");
    assert_eq!(messages(&lonely), strs(&["st=01", "st=01"]));

    let mut consumer = harness.plugin().configuration("c").start().expect("starts");
    assert_eq!(messages(&consumer), strs(&["st=00"]));
    let mut producer = harness.plugin().start().expect("starts");
    producer.tick().expect("ticks");
    assert_eq!(messages(&producer), strs(&["st=00", "st=00"]));
    assert_eq!(consumer.pending_queue_notifications(), 1);
    assert_eq!(producer.deliver_queue_notifications().expect("ok"), 0);
    assert_eq!(consumer.deliver_queue_notifications().expect("ok"), 1);
    assert_eq!(
        messages(&consumer),
        strs(&["st=00", "st=00", "hello", "st=07"])
    );

    // A second consumer registers the same name: it now owns the queue.
    let mut second = harness.plugin().configuration("c").start().expect("starts");
    producer.tick().expect("ticks");
    assert_eq!(consumer.deliver_queue_notifications().expect("ok"), 0);
    assert_eq!(second.deliver_queue_notifications().expect("ok"), 1);
    assert!(second.logged("hello"));

    // Tests can produce too.
    assert!(harness.enqueue_shared_queue("", "q", "from-test"));
    assert!(!harness.enqueue_shared_queue("", "nope", "x"));
    assert_eq!(harness.shared_queue_len("", "q"), Some(1));
    assert_eq!(second.deliver_queue_notifications().expect("ok"), 1);
    assert!(second.logged("from-test"));
    assert_eq!(harness.shared_queue_len("", "q"), Some(0));
}

#[test]
fn http_calls_are_validated_recorded_and_answered() {
    let mut g = Guest::new();
    let unknown = g.s("unknown");
    let upstream = g.s("upstream");
    let good = g.bytes(&encode_pairs(&[
        (":method", "POST"),
        (":path", "/report"),
        (":authority", "collector"),
    ]));
    let no_authority = g.bytes(&encode_pairs(&[(":method", "POST"), (":path", "/report")]));
    let ping = g.s("ping");
    let empty = g.bytes(&[]);
    let status = g.s(":status");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_tick") (param i32)
    (call $st (call $http_call {unknown} {good} {ping} {empty} (i32.const 1000) (i32.const 0x108)))
    (call $st (call $http_call {upstream} {no_authority} {ping} {empty} (i32.const 1000) (i32.const 0x108)))
    (call $st (call $http_call {upstream} {good} {ping} {empty} (i32.const 5000) (i32.const 0x108))))
  (func (export "proxy_on_http_call_response")
      (param $ctx i32) (param $token i32) (param $nh i32) (param $bs i32) (param $nt i32)
    (i32.store (i32.const 0x100) (i32.const 0))
    (i32.store (i32.const 0x104) (i32.const 0))
    (call $st (local.get $nh))
    (call $st (local.get $bs))
    (call $st (call $get_buf (i32.const 4) (i32.const 0) (local.get $bs) (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $get_hv (i32.const 6) {status} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out))
"#
    ));
    let mut plugin = harness
        .plugin()
        .cluster("upstream")
        .start()
        .expect("starts");
    plugin.tick().expect("ticks");
    assert_eq!(plugin.take_logs().len(), 3);
    let calls = plugin.http_calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.cluster, "upstream");
    assert_eq!(
        call.headers,
        vec![
            (":method".to_string(), "POST".to_string()),
            (":path".to_string(), "/report".to_string()),
            (":authority".to_string(), "collector".to_string()),
        ]
    );
    assert_eq!(call.body, b"ping");
    assert!(call.trailers.is_empty());
    assert_eq!(call.timeout, Duration::from_secs(5));
    assert_eq!(call.context_id, plugin.root_context_id());
    assert_eq!(plugin.pending_http_calls(), vec![call.token]);

    plugin
        .respond_to_http_call(call.token, &[(":status", "200"), ("x", "y")], b"pong")
        .expect("delivered");
    assert_eq!(
        messages(&plugin),
        strs(&["st=02", "st=04", "st=00", "pong", "st=00", "200"])
    );
    assert!(matches!(
        plugin.respond_to_http_call(call.token, &[], b""),
        Err(HarnessError::UnknownHttpCall(t)) if t == call.token
    ));

    plugin.take_logs();
    plugin.tick().expect("ticks");
    let second = plugin.take_http_calls();
    assert_eq!(second.len(), 2, "take returns everything so far");
    let token = second[1].token;
    assert_ne!(token, call.token);
    plugin.take_logs();
    plugin.fail_http_call(token).expect("delivered");
    // Envoy's failure callback: no headers, no body, no response maps.
    assert_eq!(
        messages(&plugin),
        strs(&["st=00", "st=00", "st=01", "", "st=02", ""])
    );
    assert!(plugin.http_calls().is_empty());
    assert!(plugin.pending_http_calls().is_empty());
}

#[test]
fn tick_period_drives_ticks_on_the_fake_clock() {
    let mut g = Guest::new();
    let ticks = g.s("ticks");
    let now = g.s("now");
    let hist = g.s("hist");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (call $st (call $set_tick (i32.const 1000)))
    (call $st (call $def_metric (i32.const 0) {ticks} (i32.const 0x120)))
    (call $st (call $def_metric (i32.const 1) {now} (i32.const 0x124)))
    (call $st (call $def_metric (i32.const 2) {hist} (i32.const 0x128)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $now (i32.const 0x110)))
    (drop (call $rec_metric (i32.load (i32.const 0x124)) (i64.load (i32.const 0x110))))
    (drop (call $inc_metric (i32.load (i32.const 0x120)) (i64.const 1)))
    (drop (call $rec_metric (i32.load (i32.const 0x128)) (i64.const 7))))
"#
    ));
    let mut plugin = harness.plugin().start().expect("starts");
    assert_eq!(
        messages(&plugin),
        strs(&["st=00", "st=00", "st=00", "st=00"])
    );
    assert_eq!(plugin.tick_period(), Some(Duration::from_secs(1)));
    assert_eq!(
        plugin.metric("ticks"),
        Some(0),
        "defined metrics start at 0"
    );

    assert_eq!(
        plugin
            .advance_and_tick(Duration::from_millis(3500))
            .expect("ok"),
        3
    );
    assert_eq!(plugin.metric("ticks"), Some(3));
    assert_eq!(
        plugin.metric("now"),
        Some((START_NANOS + 3_000_000_000) as i64)
    );
    assert_eq!(harness.clock().now_nanos(), START_NANOS + 3_500_000_000);

    assert_eq!(
        plugin
            .advance_and_tick(Duration::from_millis(600))
            .expect("ok"),
        1
    );
    assert_eq!(
        plugin.metric("now"),
        Some((START_NANOS + 4_000_000_000) as i64)
    );
    assert_eq!(
        plugin
            .advance_and_tick(Duration::from_millis(100))
            .expect("ok"),
        0
    );

    plugin.tick().expect("ticks");
    assert_eq!(plugin.metric("ticks"), Some(5));
    assert_eq!(plugin.metric_records("hist"), Some(vec![7; 5]));
    assert_eq!(plugin.metric("hist"), None);
    let all = plugin.metrics();
    assert_eq!(all.get("ticks"), Some(&5));
    assert!(all.contains_key("now"));
}

#[test]
fn a_trap_is_an_error_and_fails_the_vm() {
    let mut g = Guest::new();
    let (msg, msg_len) = g.place(b"panicked at src/lib.rs:1:1:\nboom\n");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (i32.store (i32.const 0x300) (i32.const {msg}))
    (i32.store (i32.const 0x304) (i32.const {msg_len}))
    (drop (call $fd_write (i32.const 2) (i32.const 0x300) (i32.const 1) (i32.const 0x308)))
    unreachable)
  (func (export "proxy_on_tick") (param i32)
    (call $proc_exit (i32.const 3)))
"#
    ));
    let mut plugin = harness.plugin().start().expect("starts");
    match plugin.http_request(HttpRequest::get("/")) {
        Err(HarnessError::Trap { context, message }) => {
            assert!(context.contains("proxy_on_request_headers"), "{context}");
            assert!(message.contains("unreachable"), "{message}");
            assert!(message.contains("boom"), "{message}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(plugin.failed());
    assert!(plugin.stderr().contains("boom"));
    assert!(
        plugin
            .logs()
            .iter()
            .any(|l| l.level == LogLevel::Error && l.message.contains("boom"))
    );
    assert!(matches!(plugin.tick(), Err(HarnessError::VmFailed)));
    assert!(matches!(
        plugin.http_request(HttpRequest::get("/")),
        Err(HarnessError::VmFailed)
    ));

    let mut other = harness.plugin().start().expect("a new VM is fine");
    match other.tick() {
        Err(HarnessError::Trap { message, .. }) => {
            assert!(message.contains("proc_exit(3)"), "{message}")
        }
        res => panic!("expected a trap, got {res:?}"),
    }
    assert!(other.failed());
}

#[test]
fn local_response_stops_the_exchange() {
    let mut g = Guest::new();
    let details = g.s("denied");
    let body = g.s("no");
    let headers = g.bytes(&encode_pairs(&[("X-Why", "policy")]));
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $send_local (i32.const 403) {details} {body} {headers} (i32.const -1)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    unreachable)
"#
    ));
    let mut plugin = harness.plugin().start().expect("starts");
    let exchange = plugin
        .http_request(HttpRequest::get("/x"))
        .expect("no trap");
    assert_eq!(
        exchange.request_action,
        Action::Pause,
        "Envoy stops after a local reply"
    );
    assert_eq!(exchange.response_action, None);
    let local = exchange.local_response.clone().expect("local response");
    assert_eq!(local.status, 403);
    assert_eq!(local.details, "denied");
    assert_eq!(local.body, b"no");
    assert_eq!(local.header("x-why"), Some("policy"));
    assert_eq!(local.grpc_status, -1);
    assert_eq!(exchange.response_header(":status"), Some("403"));
    assert_eq!(exchange.response_header("x-why"), Some("policy"));
    assert_eq!(exchange.response_body, b"no");
}

#[test]
fn a_paused_request_resumes_from_an_http_call_response() {
    let mut g = Guest::new();
    let upstream = g.s("authz");
    let good = g.bytes(&encode_pairs(&[
        (":method", "GET"),
        (":path", "/check"),
        (":authority", "authz"),
    ]));
    let empty = g.bytes(&[]);
    let hdr = g.s("x-authz");
    let val = g.s("ok");
    let harness = g.harness(&format!(
        r#"
  (global $stream (mut i32) (i32.const 0))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (global.set $stream (local.get $ctx))
    (call $st (call $http_call {upstream} {good} {empty} {empty} (i32.const 0) (i32.const 0x108)))
    (i32.const 1))
  (func (export "proxy_on_http_call_response")
      (param $root i32) (param $token i32) (param $nh i32) (param $bs i32) (param $nt i32)
    (call $st (call $set_effective (global.get $stream)))
    (call $st (call $add_hv (i32.const 0) {hdr} {val}))
    (call $st (call $continue (i32.const 0)))
    (call $st (call $add_hv (i32.const 0) {hdr} {val}))
    (call $st (call $set_effective (i32.const 999))))
"#
    ));
    let mut plugin = harness.plugin().cluster("authz").start().expect("starts");
    let mut stream = plugin.http_stream().expect("stream");
    let action = stream
        .request_headers(
            &[(":method", "GET"), (":path", "/"), (":authority", "app")],
            true,
        )
        .expect("no trap");
    assert_eq!(action, Action::Pause);
    assert!(!stream.request_resumed());
    let token = stream.plugin().http_calls()[0].token;
    stream
        .plugin()
        .respond_to_http_call(token, &[(":status", "200")], b"")
        .expect("delivered");
    assert!(stream.request_resumed());
    let added: Vec<_> = stream
        .request_headers_now()
        .into_iter()
        .filter(|(k, _)| k == "x-authz")
        .collect();
    assert_eq!(added, vec![("x-authz".to_string(), "ok".to_string())]);
    let action = stream
        .response_headers(&[(":status", "200")], true)
        .expect("no trap");
    assert_eq!(action, Action::Continue, "a missing callback continues");
    stream.finish().expect("finishes");
    assert_eq!(
        messages(&plugin),
        strs(&["st=00", "st=00", "st=00", "st=00", "st=02", "st=02"])
    );

    // As a whole exchange, the paused request never reaches the upstream.
    let exchange = plugin.http_request(HttpRequest::get("/")).expect("no trap");
    assert_eq!(exchange.request_action, Action::Pause);
    assert_eq!(exchange.response_action, None);
    assert!(!exchange.resumed);
    assert_eq!(plugin.pending_http_calls().len(), 1);
}

#[test]
fn several_root_contexts_in_one_vm() {
    let mut g = Guest::new();
    let root_id = g.s("plugin_root_id");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (call $st (call $get_prop {root_id} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $get_prop {root_id} (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (i32.const 0))
"#
    ));
    let mut plugin = harness.plugin().root_id("filter").start().expect("starts");
    let singleton = plugin
        .add_root_context("singleton", "")
        .expect("second root");
    assert_eq!(plugin.root_context_id(), 1);
    assert_eq!(singleton, 2);
    assert_eq!(plugin.root_status(singleton), Some((true, true)));
    assert_eq!(
        messages(&plugin),
        strs(&["st=00", "filter", "st=00", "singleton"])
    );
    plugin.take_logs();
    let on_singleton = plugin
        .http_request(HttpRequest::get("/").root_context(singleton))
        .expect("no trap");
    let on_filter = plugin.http_request(HttpRequest::get("/")).expect("no trap");
    assert_eq!(messages(&plugin), strs(&["singleton", "filter"]));
    assert_eq!(on_singleton.context_id, 3);
    assert_eq!(on_filter.context_id, 4);
    assert!(matches!(
        plugin.http_request(HttpRequest::get("/").root_context(42)),
        Err(HarnessError::UnknownContext { id: 42, .. })
    ));
}

#[test]
fn wasi_environment_and_stdout() {
    let mut g = Guest::new();
    let (hello, hello_len) = g.place(b"hello\n");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (call $st (call $environ_sizes_get (i32.const 0x100) (i32.const 0x104)))
    (call $st (call $environ_get (i32.const 0x300) (i32.const 0x400)))
    (call $log (i32.load (i32.const 0x300)) (i32.load (i32.const 0x104)))
    (i32.store (i32.const 0x500) (i32.const {hello}))
    (i32.store (i32.const 0x504) (i32.const {hello_len}))
    (call $st (call $fd_write (i32.const 1) (i32.const 0x500) (i32.const 1) (i32.const 0x508)))
    (i32.const 1))
"#
    ));
    let plugin = harness
        .plugin()
        .env("A", "B")
        .env("C", "D")
        .start()
        .expect("starts");
    assert_eq!(
        messages(&plugin),
        strs(&["st=00", "st=00", "A=B\0C=D\0", "hello", "st=00"])
    );
    assert_eq!(plugin.stdout(), "hello\n");
    assert!(plugin.logs().contains(&LogEntry {
        level: LogLevel::Info,
        message: "hello".into()
    }));
}

#[test]
fn request_body_can_be_read_and_replaced() {
    let mut g = Guest::new();
    let replaced = g.s("REPLACED");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (call $st (call $get_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 0x100) (i32.const 0x104)))
    (call $log_out)
    (call $st (call $set_buf (i32.const 0) (i32.const 0) (local.get $size) {replaced}))
    (i32.const 0))
"#
    ));
    let mut plugin = harness.plugin().start().expect("starts");
    let exchange = plugin
        .http_request(HttpRequest::post("/").body("original"))
        .expect("no trap");
    assert_eq!(messages(&plugin), strs(&["st=00", "original", "st=00"]));
    assert_eq!(exchange.request_body, b"REPLACED");
}

#[test]
fn unknown_imports_trap_only_when_called() {
    let wasm = wat::parse_str(
        r#"(module
          (import "env" "proxy_not_in_the_abi" (func $x (result i32)))
          (memory (export "memory") 1)
          (func (export "proxy_abi_version_0_2_1"))
          (func (export "proxy_on_tick") (param i32) (drop (call $x))))"#,
    )
    .expect("valid WAT");
    let harness = Harness::from_bytes(&wasm).expect("loads");
    let mut plugin = harness.plugin().start().expect("starts");
    assert!(matches!(plugin.tick(), Err(HarnessError::Trap { .. })));
    assert!(plugin.failed());
}

#[test]
fn modules_without_required_exports_do_not_load() {
    let no_abi = wat::parse_str(r#"(module (memory (export "memory") 1))"#).expect("valid");
    assert!(matches!(
        Harness::from_bytes(&no_abi),
        Err(HarnessError::MissingExport(name)) if name == "proxy_abi_version_0_2_1"
    ));
    let no_memory =
        wat::parse_str(r#"(module (func (export "proxy_abi_version_0_2_1")))"#).expect("valid");
    assert!(matches!(
        Harness::from_bytes(&no_memory),
        Err(HarnessError::MissingExport(name)) if name == "memory"
    ));
    assert!(matches!(
        Harness::from_bytes(b"not wasm"),
        Err(HarnessError::Load(_))
    ));
    assert!(matches!(
        Harness::load("/nonexistent/filter.wasm"),
        Err(HarnessError::Read { .. })
    ));
}

#[test]
fn plugins_run_in_parallel_threads() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<Plugin>();
    assert_send_sync::<Harness>();

    let mut g = Guest::new();
    let name = g.s("x-thread");
    let one = g.s("1");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $add_hv (i32.const 0) {name} {one}))
    (i32.const 0))
"#
    ));
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let harness = harness.clone();
            scope.spawn(move || {
                let mut plugin = harness.plugin().echo_logs(false).start().expect("starts");
                for _ in 0..20 {
                    let exchange = plugin.http_request(HttpRequest::get("/")).expect("no trap");
                    assert_eq!(exchange.request_header("x-thread"), Some("1"));
                }
            });
        }
    });
}

#[test]
fn response_body_buffers_while_paused_and_trailers_appear_at_the_end() {
    let mut g = Guest::new();
    let name = g.s("x-trailer");
    let value = g.s("t");
    let bang = g.s("!");
    let harness = g.harness(&format!(
        r#"
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (call $st (local.get $size))
    (call $st (call $add_hv (i32.const 3) {name} {value}))
    (call $st (call $set_buf (i32.const 1) (local.get $size) (i32.const 0) {bang}))
    (i32.const 0))
"#
    ));
    let mut plugin = harness.plugin().start().expect("starts");
    let mut stream = plugin.http_stream().expect("stream");
    let headers = [(":method", "GET"), (":path", "/"), (":authority", "a")];
    assert_eq!(
        stream.request_headers(&headers, true).expect("ok"),
        Action::Continue
    );
    assert_eq!(
        stream
            .response_headers(&[(":status", "200")], false)
            .expect("ok"),
        Action::Continue
    );
    assert_eq!(
        stream.response_body(b"ab", false).expect("ok"),
        Action::Pause
    );
    assert_eq!(
        stream.response_body(b"cd", true).expect("ok"),
        Action::Continue
    );
    assert_eq!(stream.response_body_now(), b"abcd!");
    assert_eq!(
        stream.response_trailers_now(),
        vec![("x-trailer".to_string(), "t".to_string())]
    );
    stream.set_property(&["late"], "v");
    assert_eq!(stream.property(&["late"]), Some(b"v".to_vec()));
    drop(stream);
    assert_eq!(messages(&plugin), strs(&["st=04", "st=00", "st=00"]));
}
