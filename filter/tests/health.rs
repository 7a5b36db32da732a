//! The health service (the filter loaded under the root id `meshvm-health`)
//! through the wasmtime harness, on the harness's simulated clock: probe
//! timing, thresholds, only transitions reported to the agent.
#![cfg(not(target_arch = "wasm32"))]

mod support;

use support::harness;

use std::time::Duration;

use meshvm_harness::{HttpRequest, Plugin};

fn start(config: &str) -> Plugin {
    harness()
        .plugin()
        .vm_id("meshvm")
        .root_id("meshvm-health")
        .cluster("inbound-probe")
        .cluster("agent")
        .configuration(config)
        .start()
        .expect("start the health service")
}

const PROBE: &str = r#"{"probe": {"httpGet": {"path": "/health", "port": 9080},
    "initialDelaySeconds": 2, "periodSeconds": 5, "timeoutSeconds": 1,
    "failureThreshold": 2}}"#;

/// The probe requests and reports dispatched since the last call.
fn calls(plugin: &mut Plugin) -> (Vec<u32>, Vec<String>) {
    let mut probes = Vec::new();
    let mut reports = Vec::new();
    for call in plugin.take_http_calls() {
        match call.cluster.as_str() {
            "inbound-probe" => {
                let header = |n: &str| {
                    call.headers
                        .iter()
                        .find(|(k, _)| k == n)
                        .map(|(_, v)| v.clone())
                };
                assert_eq!(header(":method").as_deref(), Some("GET"));
                assert!(header(":path").is_some_and(|p| p.starts_with('/')));
                assert_eq!(header("user-agent").as_deref(), Some("istio-probe/1.0"));
                assert_eq!(call.timeout, Duration::from_secs(1));
                probes.push(call.token);
            }
            "agent" => {
                assert!(
                    call.headers
                        .iter()
                        .any(|(k, v)| k == ":path" && v == "/v1/health")
                );
                assert!(
                    call.headers
                        .iter()
                        .any(|(k, v)| k == ":method" && v == "POST")
                );
                reports.push(String::from_utf8(call.body).unwrap());
            }
            other => panic!("unexpected cluster {other}"),
        }
    }
    (probes, reports)
}

fn answer(plugin: &mut Plugin, token: u32, status: &str) {
    plugin
        .respond_to_http_call(token, &[(":status", status)], b"")
        .unwrap();
}

#[test]
fn probes_after_the_initial_delay_then_every_period_and_reports_transitions() {
    let mut plugin = start(PROBE);
    assert!(plugin.configured(), "{:?}", plugin.logs());

    // Nothing before the initial delay; the first round at 2 s.
    plugin
        .advance_and_tick(Duration::from_millis(1900))
        .unwrap();
    assert_eq!(calls(&mut plugin), (vec![], vec![]));
    plugin.advance_and_tick(Duration::from_millis(100)).unwrap();
    let first = plugin.http_calls();
    assert!(
        first[0]
            .headers
            .contains(&(":path".into(), "/health".into()))
    );
    assert!(
        first[0]
            .headers
            .contains(&(":authority".into(), "127.0.0.1:9080".into()))
    );
    let (probes, _) = calls(&mut plugin);
    assert_eq!(probes.len(), 1);
    // Healthy: the first verdict is always reported.
    answer(&mut plugin, probes[0], "200");
    let (_, reports) = calls(&mut plugin);
    assert_eq!(reports, [r#"{"healthy":true,"source":"filter"}"#]);
    ack_report(&mut plugin);

    // Then every 5 s; still healthy: nothing reported.
    plugin.advance_and_tick(Duration::from_secs(5)).unwrap();
    let (probes, _) = calls(&mut plugin);
    assert_eq!(probes.len(), 1);
    answer(&mut plugin, probes[0], "302");
    assert_eq!(calls(&mut plugin).1, Vec::<String>::new());

    // One failure is below the threshold of 2; the second reports.
    plugin.advance_and_tick(Duration::from_secs(5)).unwrap();
    let (probes, _) = calls(&mut plugin);
    answer(&mut plugin, probes[0], "500");
    assert_eq!(calls(&mut plugin).1, Vec::<String>::new());
    plugin.advance_and_tick(Duration::from_secs(5)).unwrap();
    let (probes, _) = calls(&mut plugin);
    // No response at all (timeout, refused) is a failure too.
    plugin.fail_http_call(probes[0]).unwrap();
    let (_, reports) = calls(&mut plugin);
    assert_eq!(
        reports,
        [
            r#"{"healthy":false,"message":"HTTP probe failed: no response (timeout or connection failure)","source":"filter"}"#
        ]
    );
    ack_report(&mut plugin);

    // Back: one success is enough (successThreshold 1).
    plugin.advance_and_tick(Duration::from_secs(5)).unwrap();
    let (probes, _) = calls(&mut plugin);
    answer(&mut plugin, probes[0], "200");
    assert_eq!(
        calls(&mut plugin).1,
        [r#"{"healthy":true,"source":"filter"}"#]
    );
}

#[test]
fn a_report_the_agent_did_not_take_is_sent_again() {
    let mut plugin = start(r#"{"probe": {"httpGet": {"port": 8080}, "periodSeconds": 1}}"#);
    plugin.advance_and_tick(Duration::from_millis(1)).unwrap();
    let (probes, _) = calls(&mut plugin);
    answer(&mut plugin, probes[0], "500");
    let (_, reports) = calls(&mut plugin);
    assert_eq!(reports.len(), 1);
    // The agent is down: the report fails.
    let report_token = plugin.pending_http_calls()[0];
    plugin.fail_http_call(report_token).unwrap();
    plugin.advance_and_tick(Duration::from_secs(1)).unwrap();
    let (probes, _) = calls(&mut plugin);
    answer(&mut plugin, probes[0], "500");
    let (_, reports) = calls(&mut plugin);
    assert_eq!(
        reports,
        [r#"{"healthy":false,"message":"HTTP probe failed with status 500","source":"filter"}"#]
    );
}

#[test]
fn a_round_in_flight_is_not_doubled_and_bad_configurations_are_refused() {
    let mut plugin = start(r#"{"probe": {"httpGet": {"port": 8080}, "periodSeconds": 1}}"#);
    plugin.advance_and_tick(Duration::from_millis(1)).unwrap();
    plugin.advance_and_tick(Duration::from_secs(3)).unwrap();
    let (probes, _) = calls(&mut plugin);
    assert_eq!(probes.len(), 1, "one probe in flight at a time");

    for bad in [
        r#"{"probe": {"tcpSocket": {"port": 1}}}"#,
        r#"{"probe": {}}"#,
        r#"{"probe": {"httpGet": {"port": 0}}}"#,
        "not json",
    ] {
        let plugin = start(bad);
        assert!(!plugin.configured(), "{bad} was accepted");
        assert!(
            plugin.logged("meshvm: invalid health"),
            "{bad}: {:?}",
            plugin.logs()
        );
    }
}

/// A worker's inbound filter in the VM of harness `h`.
fn inbound_filter(h: &meshvm_harness::Harness) -> Plugin {
    h.plugin()
        .vm_id("meshvm")
        .root_id("meshvm")
        .configuration(r#"{"direction": "inbound"}"#)
        .start()
        .unwrap()
}

/// The agent takes the report in flight.
fn ack_report(plugin: &mut Plugin) {
    let token = plugin.pending_http_calls()[0];
    answer(plugin, token, "204");
}

fn post_bodies(plugin: &mut Plugin) -> Vec<String> {
    plugin
        .take_http_calls()
        .into_iter()
        .filter(|c| c.cluster == "agent")
        .map(|c| String::from_utf8(c.body).unwrap())
        .collect()
}

#[test]
fn inbound_filters_count_outcomes_and_the_service_judges_the_window() {
    // One harness: the health service and a worker's inbound filter share
    // the VM's queues, as in Envoy.
    let h = harness();
    let mut service = h
        .plugin()
        .vm_id("meshvm")
        .root_id("meshvm-health")
        .cluster("agent")
        .configuration(r#"{"traffic": {"window_seconds": 10, "min_requests": 10}}"#)
        .start()
        .unwrap();
    assert!(service.configured(), "{:?}", service.logs());
    let mut filter = inbound_filter(&h);
    assert_eq!(filter.tick_period(), Some(Duration::from_secs(1)));
    // The first tick finds the service's queue; from then on outcomes count.
    filter.advance_and_tick(Duration::from_secs(1)).unwrap();
    let answer = |filter: &mut Plugin, status: &str| {
        filter
            .http_request(HttpRequest::get("/").response_header(":status", status))
            .unwrap();
    };
    for _ in 0..6 {
        answer(&mut filter, "200");
    }
    for _ in 0..6 {
        answer(&mut filter, "503");
    }
    filter.advance_and_tick(Duration::from_secs(1)).unwrap();
    assert_eq!(h.shared_queue_len("meshvm", "meshvm-traffic"), Some(1));
    service.deliver_queue_notifications().unwrap();
    assert_eq!(
        post_bodies(&mut service),
        [
            r#"{"healthy":false,"message":"6 of the last 12 requests failed (5xx or no response) in 10 s","source":"traffic"}"#
        ]
    );
    ack_report(&mut service);

    // Healthy traffic: 6 of 32 failed, below the threshold: healthy again.
    for _ in 0..20 {
        answer(&mut filter, "200");
    }
    filter.advance_and_tick(Duration::from_secs(1)).unwrap();
    service.deliver_queue_notifications().unwrap();
    assert_eq!(
        post_bodies(&mut service),
        [r#"{"healthy":true,"source":"traffic"}"#]
    );
    ack_report(&mut service);

    // Failures again, then the window passes with no traffic (the VM is out
    // of the endpoints): too thin to judge, so it is tried again.
    // 36 of 62 in the window now.
    for _ in 0..30 {
        answer(&mut filter, "500");
    }
    filter.advance_and_tick(Duration::from_secs(1)).unwrap();
    service.deliver_queue_notifications().unwrap();
    assert_eq!(post_bodies(&mut service).len(), 1);
    ack_report(&mut service);
    service.advance_and_tick(Duration::from_secs(11)).unwrap();
    assert_eq!(
        post_bodies(&mut service),
        [r#"{"healthy":true,"source":"traffic"}"#]
    );
}

#[test]
fn without_the_service_inbound_filters_count_nothing() {
    let h = harness();
    let mut filter = inbound_filter(&h);
    filter.advance_and_tick(Duration::from_secs(1)).unwrap();
    filter
        .http_request(HttpRequest::get("/").response_header(":status", "503"))
        .unwrap();
    filter.advance_and_tick(Duration::from_secs(1)).unwrap();
    assert_eq!(h.shared_queue_len("meshvm", "meshvm-traffic"), None);
}
