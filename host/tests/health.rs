//! `meshvm-agent run` and workload health: the status server's
//! `/v1/health` refuses malformed updates without changing anything,
//! records valid ones, and `/metrics` shows the result; the WorkloadGroup's
//! `tcpSocket` probe runs against a real listener.

#[path = "common/agent.rs"]
mod agent;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use agent::{Agent, CaServer, onboarding_dir, wait_for};

/// `POST /v1/health` with `body`: the status code and the response body.
fn post_health(addr: SocketAddr, body: &str) -> (u16, String) {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "POST /v1/health HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

fn metrics(addr: SocketAddr) -> String {
    let (code, text) = meshvm_testing::envoy::http_get(addr, "/metrics").unwrap();
    assert_eq!(code, 200, "{text}");
    text
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// The status server's address, from the agent's log.
fn status_address(agent: &Agent) -> SocketAddr {
    agent.wait_for_log("status server", 1);
    let log = agent.log();
    log.split("status_address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no status address in:\n{log}"))
}

#[test]
fn posted_health_is_checked_recorded_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    let mut agent = Agent::spawn(&onboarding, dir.path(), &ca.address(), &[]);
    let status = status_address(&agent);
    // The onboarding files' probe is httpGet: the filter's to run.
    agent.wait_for_log("readiness probe httpGet: run by the filter", 1);

    let (code, text) = post_health(status, "{\"healthy\": tru");
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("invalid health update"), "{text}");
    let (code, text) = post_health(status, r#"{"healthy":"no"}"#);
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("expected a boolean"), "{text}");
    let shown = metrics(status);
    assert!(
        !shown.contains("meshvm_agent_workload_healthy")
            && !shown.contains("meshvm_agent_health_source_healthy"),
        "health changed after refused updates:\n{shown}"
    );

    let (code, text) = post_health(status, r#"{"healthy":false,"message":"db down"}"#);
    assert_eq!(code, 204, "{text}");
    let shown = metrics(status);
    for line in [
        "meshvm_agent_workload_healthy 0",
        "meshvm_agent_health_source_healthy{source=\"filter\"} 0",
    ] {
        assert!(has_line(&shown, line), "no {line} in:\n{shown}");
    }
    assert!(agent.log().contains("filter: db down"), "{}", agent.log());

    let (code, text) = post_health(status, r#"{"healthy":true}"#);
    assert_eq!(code, 204, "{text}");
    assert!(has_line(
        &metrics(status),
        "meshvm_agent_workload_healthy 1"
    ));

    assert!(agent.terminate(), "agent failed:\n{}", agent.log());
}

#[test]
fn the_tcp_socket_probe_follows_the_application() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = app.local_addr().unwrap().port();
    let mesh = std::fs::read_to_string(onboarding.join("mesh.yaml")).unwrap();
    let http = "    httpGet:\n      path: /health\n      port: 9080\n";
    assert!(mesh.contains(http), "{mesh}");
    let mesh = mesh
        .replace(http, &format!("    tcpSocket:\n      port: {port}\n"))
        .replace("initialDelaySeconds: 1", "initialDelaySeconds: 0")
        .replace("periodSeconds: 5", "periodSeconds: 1");
    std::fs::write(onboarding.join("mesh.yaml"), mesh).unwrap();

    let mut agent = Agent::spawn(&onboarding, dir.path(), &ca.address(), &[]);
    let status = status_address(&agent);
    agent.wait_for_log("readiness probe: running", 1);
    let healthy = "meshvm_agent_health_source_healthy{source=\"agent-probe\"} 1";
    wait_for("the probe's healthy verdict", || {
        has_line(&metrics(status), healthy)
    });
    assert!(has_line(
        &metrics(status),
        "meshvm_agent_workload_healthy 1"
    ));

    // The application goes away: refused, unhealthy after one period
    // (Istio's default failure threshold is 1).
    drop(app);
    wait_for("the probe's unhealthy verdict", || {
        has_line(&metrics(status), "meshvm_agent_workload_healthy 0")
    });
    let shown = metrics(status);
    assert!(
        has_line(
            &shown,
            "meshvm_agent_health_source_healthy{source=\"agent-probe\"} 0"
        ),
        "{shown}"
    );
    assert!(
        !has_line(
            &shown,
            "meshvm_agent_health_probes_total{result=\"failure\"} 0"
        ),
        "{shown}"
    );
    agent.wait_for_log("readiness probe: unhealthy", 1);

    assert!(agent.terminate(), "agent failed:\n{}", agent.log());
}
