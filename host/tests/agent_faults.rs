//! `meshvm-agent run` as a process against a CA that misbehaves: each fault
//! gets a log line that names it, the agent keeps running and retrying, and
//! nothing it had is lost (the stored and served certificate stay until a
//! good one replaces them, or until they expire).

#[path = "common/agent.rs"]
mod agent;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agent::{Agent, CaServer, Fault, SPIFFE_ID, onboarding_dir};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The CA answers with `fault` first: the agent logs `expected`, stores and
/// serves nothing, and retries; once the CA answers correctly the agent has
/// a certificate that openssl accepts.
fn rejected_then_accepted(fault: Fault, expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    ca.set_fault(fault);
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    let mut agent = Agent::spawn(&onboarding, dir.path(), &ca.address(), &[]);

    agent.wait_for_log(expected, 1);
    let line = agent
        .log()
        .lines()
        .find(|l| l.contains(expected))
        .unwrap()
        .to_string();
    assert!(
        line.contains("could not obtain a workload certificate")
            && line.contains("the CA's answer was rejected"),
        "{line}"
    );
    assert!(agent.is_running(), "the agent exited:\n{}", agent.log());
    assert_eq!(agent.chain(), None, "a rejected answer was stored");
    assert_eq!(agent.served_serial(), None, "a rejected answer was served");

    ca.set_fault(Fault::None);
    let chain = agent.wait_for_chain();
    meshvm_testing::pki::assert_openssl_verifies(
        &onboarding.join("root-cert.pem"),
        &agent.state_dir.join("cert-chain.pem"),
    );
    agent::wait_for("the certificate over SDS", || {
        agent.served_serial() == Some(agent::leaf_serial(&chain))
    });
    assert!(agent.terminate(), "{}", agent.log());
}

#[test]
fn an_empty_chain_is_rejected() {
    rejected_then_accepted(
        Fault::EmptyChain,
        "the CA returned an empty certificate chain",
    );
}

#[test]
fn a_certificate_for_another_key_is_rejected() {
    rejected_then_accepted(Fault::OtherKey, "the issued certificate is for another key");
}

#[test]
fn a_certificate_for_another_identity_is_rejected() {
    rejected_then_accepted(
        Fault::OtherIdentity,
        &format!("spiffe://cluster.local/ns/vm-ns/sa/intruder, not {SPIFFE_ID}"),
    );
}

#[test]
fn an_expired_certificate_is_rejected() {
    rejected_then_accepted(Fault::Expired, "the issued certificate expired at");
}

#[test]
fn a_wrong_root_fails_the_tls_handshake_and_the_agent_keeps_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    // The root of another mesh.
    let other =
        meshvm_controlplane::ca::MeshCa::load_or_create(&dir.path().join("other"), None).unwrap();
    std::fs::write(onboarding.join("root-cert.pem"), other.root_cert_pem()).unwrap();
    let mut agent = Agent::spawn(&onboarding, dir.path(), &ca.address(), &[]);
    agent.wait_for_log("TLS handshake with the CA", 2);
    let line = agent
        .log()
        .lines()
        .find(|l| l.contains("TLS handshake with the CA"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("expecting server name `istiod.istio-system.svc`"),
        "{line}"
    );
    assert!(agent.is_running());
    assert_eq!(agent.chain(), None);
}

#[test]
fn the_ca_down_at_start_is_retried_until_it_comes_up() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    ca.stop();
    let agent = Agent::spawn(&onboarding, dir.path(), &ca.address(), &[]);
    agent.wait_for_log("cannot connect to the CA", 2);
    assert_eq!(agent.chain(), None);
    ca.resume();
    agent.wait_for_chain();
    agent.wait_for_log("obtained a workload certificate", 1);
}

#[test]
fn a_missing_token_is_refused_by_the_ca_and_the_agent_keeps_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    let token = std::fs::read_to_string(onboarding.join("istio-token")).unwrap();
    std::fs::remove_file(onboarding.join("istio-token")).unwrap();
    let agent = Agent::spawn(&onboarding, dir.path(), &ca.address(), &[]);
    agent.wait_for_log("refused the request: Unauthenticated", 2);
    assert_eq!(agent.chain(), None);
    // The token file is read at each request: installing it is enough.
    std::fs::write(onboarding.join("istio-token"), &token).unwrap();
    agent.wait_for_chain();
    assert!(!agent.log().contains(&token), "the token was logged");
}

/// The one-hour bootstrap token expires (Istio's most reported VM failure):
/// renewals authenticate with the current certificate and keep working, and
/// so does a restart that finds a valid certificate on disk.
#[test]
fn renewals_use_mtls_after_the_token_expired_or_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    let env = [("SECRET_TTL", "10s")];
    let mut agent = Agent::spawn(&onboarding, dir.path(), &ca.address(), &env);
    let first = agent.wait_for_chain();
    // An expired token in place of the good one.
    let expired = ca
        .ca
        .tokens()
        .mint("vm-ns", "ratings-sa", Duration::from_secs(1))
        .unwrap();
    std::fs::write(onboarding.join("istio-token"), &expired).unwrap();
    agent.wait_for_log("obtained a workload certificate", 2);
    let renewed = agent.chain().unwrap();
    assert_ne!(agent::leaf_serial(&first), agent::leaf_serial(&renewed));
    assert!(
        agent
            .log()
            .lines()
            .filter(|l| l.contains("obtained a workload certificate"))
            .nth(1)
            .unwrap()
            .contains("renewal=true")
    );
    assert!(agent.terminate());

    // No token at all, and a restart: the stored certificate is reused and
    // renewed over mTLS.
    std::fs::remove_file(onboarding.join("istio-token")).unwrap();
    let agent = Agent::spawn(&onboarding, dir.path(), &ca.address(), &env);
    agent.wait_for_log("obtained a workload certificate", 1);
    assert_eq!(agent.count("refused the request"), 0, "{}", agent.log());
    assert!(!agent.log().contains(&expired), "the token was logged");
}

/// Faults at renewal time lose nothing: the current certificate stays on
/// disk and over SDS while the CA answers badly or not at all, and a good
/// answer replaces it.
#[test]
fn renewal_faults_keep_the_current_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    // Renewal at about half of 30 s; the retries (1 s, 2 s, 4 s) fit well
    // before expiry.
    let agent = Agent::spawn(
        &onboarding,
        dir.path(),
        &ca.address(),
        &[("SECRET_TTL", "30s")],
    );
    let first = agent.wait_for_chain();
    let serial = agent::leaf_serial(&first);
    agent::wait_for("the first certificate over SDS", || {
        agent.served_serial().as_deref() == Some(serial.as_str())
    });

    ca.set_fault(Fault::OtherIdentity);
    agent.wait_for_log("sa/intruder", 1);
    assert!(
        agent
            .log()
            .lines()
            .any(|l| l.contains("sa/intruder") && l.contains("renewal=true"))
    );
    assert_eq!(agent.chain().as_deref(), Some(first.as_str()));
    assert_eq!(agent.served_serial().as_deref(), Some(serial.as_str()));

    ca.stop();
    agent.wait_for_log("cannot connect to the CA", 1);
    assert_eq!(agent.chain().as_deref(), Some(first.as_str()));
    assert_eq!(agent.served_serial().as_deref(), Some(serial.as_str()));

    ca.set_fault(Fault::None);
    ca.resume();
    agent.wait_for_log("obtained a workload certificate", 2);
    let renewed = agent.chain().unwrap();
    let new_serial = agent::leaf_serial(&renewed);
    assert_ne!(new_serial, serial);
    agent::wait_for("the renewed certificate over SDS", || {
        agent.served_serial().as_deref() == Some(new_serial.as_str())
    });
}

/// With the CA gone for longer than the certificate lives, the certificate
/// is served until it expires, then withdrawn; the CA's return brings a new
/// one (requested with the token, since the expired one cannot authenticate).
#[test]
fn a_certificate_is_withdrawn_when_it_expires_unrenewed() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    let agent = Agent::spawn(
        &onboarding,
        dir.path(),
        &ca.address(),
        &[("SECRET_TTL", "4s")],
    );
    agent.wait_for_chain();
    ca.stop();
    agent.wait_for_log("expired before it could be renewed; withdrawing it", 1);
    assert_eq!(agent.served_serial(), None);
    ca.resume();
    agent.wait_for_log("obtained a workload certificate", 2);
    assert!(agent.served_serial().is_some());
}

#[test]
fn run_refuses_malformed_onboarding_files_naming_file_and_line() {
    let bad = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/onboarding/bad/cluster-env-not-assignment");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshvm-agent"))
        .arg("--onboarding-dir")
        .arg(&bad)
        .arg("run")
        .arg("--state-dir")
        .arg(dir.path().join("certs"))
        .arg("--sds-socket")
        .arg(dir.path().join("sds.sock"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cluster.env:10:19: expected `=` after `ISTIO_META_NETWORK`, found `:`"),
        "{stderr}"
    );
    assert!(!dir.path().join("certs").exists());
    assert!(!dir.path().join("sds.sock").exists());
    assert!(!dir.path().join("run").exists());
}
