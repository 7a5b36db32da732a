//! Rotation under load, through real processes: `meshvm-agent run` gets a
//! short-lived certificate from the local control plane's CA and serves it
//! to a real Envoy over SDS; `wrk` opens a new TLS connection for every
//! request (`Connection: close`) while the agent renews several times.
//! Not one request may fail, and Envoy ends up presenting the agent's
//! newest certificate.

#[path = "common/agent.rs"]
mod agent;

use std::process::Command;

use agent::{Agent, CaServer, onboarding_dir, wait_for};
use meshvm_testing::envoy::{Envoy, sds_tls_bootstrap};
use meshvm_testing::pki::{pem_certs, presented_certs};

/// wrk's summary: requests completed, and every error line it printed.
struct WrkReport {
    requests: u64,
    errors: Vec<String>,
}

fn parse_wrk(text: &str) -> WrkReport {
    let requests = text
        .lines()
        .find_map(|l| {
            let (count, rest) = l.trim().split_once(' ')?;
            rest.starts_with("requests in")
                .then(|| count.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no request count in wrk's output:\n{text}"));
    let errors = text
        .lines()
        .filter(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
        .map(|l| l.trim().to_string())
        .collect();
    WrkReport { requests, errors }
}

#[test]
fn wrk_parsing() {
    let ok = "Running 1s test @ https://127.0.0.1:1/\n  2 threads and 4 connections\n\
              \x20 1234 requests in 1.00s, 56.00KB read\nRequests/sec: 1234.00\n";
    let r = parse_wrk(ok);
    assert_eq!(r.requests, 1234);
    assert!(r.errors.is_empty());
    let bad = format!("{ok}  Socket errors: connect 0, read 3, write 0, timeout 0\n");
    assert_eq!(parse_wrk(&bad).errors.len(), 1);
}

#[test]
fn rotation_under_continuous_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    // A 10 s certificate is renewed about every 5 s.
    let agent = Agent::spawn(
        &onboarding,
        dir.path(),
        &ca.address(),
        &[("SECRET_TTL", "10s")],
    );
    let first = agent.wait_for_chain();
    let envoy = Envoy::start(dir.path(), "envoy", &sds_tls_bootstrap(&agent.sds_socket));
    let port = envoy.listener_port("tls");
    wait_for("Envoy presenting the agent's certificate", || {
        let presented = presented_certs(port);
        !presented.is_empty() && presented.first() == pem_certs(&agent.chain().unwrap()).first()
    });
    let presented_at_start = presented_certs(port).remove(0);
    let renewals_before = agent.count("obtained a workload certificate");

    let out = Command::new("wrk")
        .args(["-t", "2", "-c", "8", "-d", "22s", "-H", "Connection: close"])
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .expect("wrk is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = parse_wrk(&text);
    let renewals = agent.count("obtained a workload certificate") - renewals_before;

    assert!(report.requests > 0, "{text}");
    assert!(
        report.errors.is_empty(),
        "failed requests during rotation:\n{text}"
    );
    assert!(
        renewals >= 2,
        "expected at least two rotations under load, saw {renewals}:\n{}",
        agent.log()
    );
    // Envoy took every new certificate without dropping the listener.
    assert!(
        envoy.counter("sds.default.update_success").unwrap_or(0) >= 3,
        "{}",
        envoy.logs()
    );
    assert_eq!(envoy.counter("sds.default.update_rejected").unwrap_or(0), 0);
    // Envoy now presents the agent's newest certificate, not the first one.
    wait_for("Envoy presenting the newest certificate", || {
        let newest = pem_certs(&agent.chain().unwrap()).remove(0);
        presented_certs(port).first() == Some(&newest)
    });
    assert_ne!(presented_certs(port).remove(0), presented_at_start);
    assert_ne!(pem_certs(&agent.chain().unwrap())[0], pem_certs(&first)[0]);
    eprintln!(
        "{} requests over new TLS connections, {renewals} rotations, 0 errors",
        report.requests
    );
}
