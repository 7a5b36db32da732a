//! The harness against a filter built with the real proxy-wasm Rust SDK 0.2.5
//! (tests/fixtures/sdk-probe): SDK-generated imports, exports, allocation and
//! panics.
//!
//! The probe is built for wasm32-wasip1 on first use (offline, a few seconds).
//! Set `MESHVM_SDK_PROBE_WASM` to a prebuilt probe to skip the build. When the
//! target or the SDK sources are not available the tests fail and say why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use meshvm_harness::{Action, Harness, HarnessError, HttpRequest, Plugin, START_NANOS};

fn build_probe() -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("MESHVM_SDK_PROBE_WASM") {
        let path = PathBuf::from(path);
        return if path.exists() {
            Ok(path)
        } else {
            Err(format!(
                "MESHVM_SDK_PROBE_WASM={} does not exist",
                path.display()
            ))
        };
    }
    let manifest =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdk-probe/Cargo.toml");
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-probe");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--offline",
            "--locked",
            "--target",
            "wasm32-wasip1",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the SDK probe failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(target_dir.join("wasm32-wasip1/release/meshvm_harness_sdk_probe.wasm"))
}

/// The compiled probe, built and compiled once per test process.
fn probe() -> Option<Harness> {
    static PROBE: OnceLock<Result<Harness, String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        let path = build_probe()?;
        Harness::load(&path).map_err(|e| e.to_string())
    });
    match probe {
        Ok(h) => Some(h.isolated()),
        // `make test` (and .ci/run) provide the target and the SDK sources;
        // a probe that cannot be built is a failure, not a skip.
        Err(why) => panic!("SDK probe unavailable: {why}"),
    }
}

fn start(harness: &Harness) -> Plugin {
    harness
        .plugin()
        .root_id("filter")
        .vm_configuration("vmcfg")
        .configuration("plugcfg")
        .node_metadata("NAME", "vm-1")
        .cluster("collector")
        .cluster("authz")
        .env("PROBE_ENV", "hello-env")
        .start()
        .expect("the probe starts")
}

#[test]
fn lifecycle_and_whole_requests() {
    let Some(harness) = probe() else { return };
    let mut plugin = start(&harness);
    assert!(plugin.vm_started() && plugin.configured());
    assert!(plugin.logged("vm_start config=vmcfg"));
    assert!(plugin.logged("env=hello-env"));
    assert!(plugin.logged("configure config=plugcfg root=filter"));
    assert_eq!(plugin.tick_period(), Some(Duration::from_secs(5)));

    let exchange = plugin
        .http_request(HttpRequest::get("/x").mtls_peer("spiffe://cluster.local/ns/a/sa/b"))
        .expect("no trap");
    assert_eq!(exchange.request_action, Action::Continue);
    assert_eq!(exchange.request_header("x-probe"), Some("1"));
    assert_eq!(exchange.response_header("x-resp"), Some("probe"));
    assert_eq!(exchange.property_set(&["probe_seen"]), Some(&b"yes"[..]));
    assert!(plugin.logged("path=/x san=spiffe://cluster.local/ns/a/sa/b name=vm-1"));
    assert!(plugin.logged(&format!("log ctx={} status=200", exchange.context_id)));

    let plain = plugin
        .http_request(HttpRequest::get("/plain"))
        .expect("no trap");
    assert!(plugin.logged(&format!(
        "ctx={} path=/plain san=- name=vm-1",
        plain.context_id
    )));

    let local = plugin
        .http_request(HttpRequest::get("/local"))
        .expect("no trap");
    assert_eq!(local.response_action, None);
    let reply = local.local_response.clone().expect("local response");
    assert_eq!(
        (reply.status, reply.body.as_slice()),
        (418, &b"short and stout"[..])
    );
    assert_eq!(local.response_header("x-teapot"), Some("1"));

    let post = plugin
        .http_request(HttpRequest::post("/upload").body("original"))
        .expect("no trap");
    assert!(plugin.logged("body=original"));
    assert_eq!(post.request_body, b"rewritten");

    assert!(!plugin.reconfigure("reject").expect("no trap"), "NACK");
    assert!(plugin.reconfigure("again").expect("no trap"));
}

#[test]
fn paused_request_resumed_or_denied_by_an_http_call() {
    let Some(harness) = probe() else { return };
    let mut plugin = start(&harness);
    let request = [
        (":method", "GET"),
        (":path", "/call"),
        (":authority", "app"),
    ];

    let mut stream = plugin.http_stream().expect("stream");
    assert_eq!(
        stream.request_headers(&request, true).expect("no trap"),
        Action::Pause
    );
    let call = stream.plugin().http_calls().pop().expect("a call");
    assert_eq!(call.cluster, "authz");
    assert_eq!(call.timeout, Duration::from_millis(500));
    stream
        .plugin()
        .respond_to_http_call(call.token, &[(":status", "200")], b"")
        .expect("no trap");
    assert!(stream.request_resumed());
    assert!(
        stream
            .request_headers_now()
            .contains(&("x-authz".to_string(), "allowed".to_string()))
    );
    stream.finish().expect("no trap");

    let mut stream = plugin.http_stream().expect("stream");
    stream.request_headers(&request, true).expect("no trap");
    let call = stream.plugin().take_http_calls().pop().expect("a call");
    stream.plugin().fail_http_call(call.token).expect("no trap");
    let reply = stream.local_response().expect("denied");
    assert_eq!(reply.status, 403);
    assert!(!stream.request_resumed());
}

#[test]
fn ticks_shared_data_queues_and_root_http_calls() {
    let Some(harness) = probe() else { return };
    let mut plugin = start(&harness);
    assert_eq!(
        plugin
            .advance_and_tick(Duration::from_secs(11))
            .expect("no trap"),
        2
    );
    assert_eq!(plugin.metric("probe_ticks"), Some(2));
    assert!(plugin.logged(&format!(
        "tick shared=- now={}",
        START_NANOS / 1_000_000_000 + 5
    )));
    assert!(plugin.logged("tick shared=ticked"));
    assert_eq!(
        harness.shared_data("", "k").map(|(v, _)| v),
        Some(b"ticked".to_vec())
    );
    assert_eq!(plugin.deliver_queue_notifications().expect("no trap"), 2);
    assert!(plugin.logged("dequeued item"));
    let calls = plugin.take_http_calls();
    assert_eq!(calls.len(), 2);
    assert!(
        calls
            .iter()
            .all(|c| c.cluster == "collector" && c.body == b"hi")
    );
    plugin
        .respond_to_http_call(calls[0].token, &[(":status", "204")], b"ok")
        .expect("no trap");
    assert!(plugin.logged(&format!(
        "call {} headers=[(\":status\", \"204\")] body=ok",
        calls[0].token
    )));
}

#[test]
fn a_panic_is_a_trap_with_its_message() {
    let Some(harness) = probe() else { return };
    let mut plugin = start(&harness);
    match plugin.http_request(HttpRequest::get("/panic")) {
        Err(HarnessError::Trap { context, message }) => {
            assert!(context.starts_with("proxy_on_request_headers"), "{context}");
            assert!(message.contains("probe panic on purpose"), "{message}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(plugin.failed());
    assert!(matches!(plugin.tick(), Err(HarnessError::VmFailed)));
}
