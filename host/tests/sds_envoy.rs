//! The SDS server against a real Envoy (`envoy` 1.40 on PATH): Envoy gets
//! its listener certificate (`default`) and validation context (`ROOTCA`)
//! from the agent's Unix socket, presents our leaf, picks up a rotated one,
//! and keeps the previous one when it rejects (NACKs) a broken secret.

#[path = "common/test_ca.rs"]
mod test_ca;

use meshvm_agent::identity::{KeyAlgorithm, WorkloadKey};
use meshvm_agent::sds::{SdsServer, WorkloadSecret};
use meshvm_testing::envoy::{Envoy, sds_tls_bootstrap};
use meshvm_testing::pki::{pem_certs, presented_certs as presented};
use std::sync::Arc;
use std::time::{Duration, Instant};
use test_ca::TestCa;
use tokio::sync::watch;

/// Liveness bound for Envoy start-up and for each change to show up.
const LIMIT: Duration = Duration::from_secs(90);
const SPIFFE: &str = "spiffe://cluster.local/ns/vm-ns/sa/vm-sa";

fn leaf(secret: &WorkloadSecret) -> String {
    pem_certs(&secret.cert_chain_pem).remove(0)
}

/// A fresh key and a SPIFFE leaf for it from `ca`.
fn issue(ca: &TestCa) -> (WorkloadKey, WorkloadSecret) {
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
    let chain = ca.issue_now(&key.csr_pem(SPIFFE).expect("csr"), SPIFFE);
    let secret = WorkloadSecret {
        cert_chain_pem: chain,
        private_key_pem: key.private_key_pem(),
        root_pem: ca.pem(),
    };
    (key, secret)
}

fn wait_for(what: &str, envoy: &Envoy, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}:\n{}", envoy.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn envoy_serves_rotates_and_keeps_the_old_cert_on_nack() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("workload-spiffe-uds/socket");
    let (tx, rx) = watch::channel(None);
    let server = {
        let _guard = rt.enter();
        SdsServer::bind(&socket, rx).expect("bind")
    };
    let serving = rt.spawn(server.serve());

    let ca = TestCa::root("cluster.local", "meshvm test root");
    let (key_a, first) = issue(&ca);
    // Envoy starts before any certificate exists: its requests are held,
    // then answered when the first one is published.
    let starting = {
        let config = sds_tls_bootstrap(&socket);
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || Envoy::start(&dir, "envoy", &config))
    };
    tx.send(Some(Arc::new(first.clone()))).expect("publish");
    let envoy = starting.join().expect("envoy started");
    let port = envoy.listener_port("tls");

    let certs = presented(port);
    assert_eq!(
        certs.first(),
        Some(&leaf(&first)),
        "Envoy presents our leaf"
    );
    assert_eq!(
        certs.len(),
        1,
        "only the leaf (the test CA signs it directly)"
    );

    // Rotation.
    let (_key_b, second) = issue(&ca);
    tx.send(Some(Arc::new(second.clone()))).expect("publish");
    wait_for("Envoy presents the rotated leaf", &envoy, || {
        presented(port).first() == Some(&leaf(&second))
    });

    // A broken secret (the third leaf with the first key): Envoy NACKs it
    // and keeps the second leaf.
    let rejected_before = envoy.counter("sds.default.update_rejected").unwrap_or(0);
    let (_key_c, mut broken) = issue(&ca);
    broken.private_key_pem = key_a.private_key_pem();
    tx.send(Some(Arc::new(broken))).expect("publish");
    wait_for("Envoy rejects the broken secret", &envoy, || {
        envoy.counter("sds.default.update_rejected").unwrap_or(0) > rejected_before
    });
    assert_eq!(presented(port).first(), Some(&leaf(&second)));
    assert!(!serving.is_finished(), "the SDS server keeps running");

    // The server still serves the next good secret.
    let (_key_d, fourth) = issue(&ca);
    tx.send(Some(Arc::new(fourth.clone()))).expect("publish");
    wait_for("Envoy presents the leaf after the NACK", &envoy, || {
        presented(port).first() == Some(&leaf(&fourth))
    });
}
