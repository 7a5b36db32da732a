//! `meshvm-agent run` as a process: with onboarding files and the local
//! control plane's CA (in-process, over TLS), it obtains the workload
//! certificate, stores it 0600, serves it on the SDS socket, and stops
//! cleanly on SIGTERM.

#[path = "common/agent.rs"]
mod agent;

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use agent::{Agent, CaServer, SPIFFE_ID, onboarding_dir, wait_for};

#[test]
fn run_obtains_stores_and_serves_the_workload_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    let token = std::fs::read_to_string(onboarding.join("istio-token")).unwrap();
    let mut agent = Agent::spawn(&onboarding, dir.path(), &ca.address(), &[]);

    let state = agent.state_dir.clone();
    let files = ["key.pem", "cert-chain.pem", "root-cert.pem"];
    wait_for("the key, chain and root on disk", || {
        files.iter().all(|f| state.join(f).exists())
    });
    wait_for("the SDS socket", || agent.sds_socket.exists());
    for file in files {
        let mode = std::fs::metadata(state.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    meshvm_testing::pki::assert_openssl_verifies(
        &onboarding.join("root-cert.pem"),
        &state.join("cert-chain.pem"),
    );
    let san = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(state.join("cert-chain.pem"))
        .output()
        .unwrap();
    let san = String::from_utf8_lossy(&san.stdout);
    assert!(san.contains(&format!("URI:{SPIFFE_ID}")), "{san}");

    // `meshvm-agent secrets` reads what Envoy would get, without the key.
    let out = Command::new(env!("CARGO_BIN_EXE_meshvm-agent"))
        .arg("secrets")
        .arg("--sds-socket")
        .arg(&agent.sds_socket)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(shown.contains(SPIFFE_ID), "{shown}");
    assert!(shown.contains("kind: trusted-ca"), "{shown}");
    assert!(shown.contains("has-private-key: true"), "{shown}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert_eq!(
        agent.served_serial(),
        Some(agent::leaf_serial(&agent.chain().unwrap()))
    );

    // The onboarding files set ISTIO_META_DNS_CAPTURE: the DNS proxy runs
    // (on a free port, see `Agent::spawn_with_args`).
    agent.wait_for_log("DNS proxy listening", 1);

    // SIGTERM: the agent exits successfully and removes its socket.
    assert!(agent.terminate(), "agent failed:\n{}", agent.log());
    assert!(!agent.sds_socket.exists(), "the SDS socket was left behind");
    assert!(!agent.log().contains(&token), "the token was logged");
}

#[test]
fn secrets_without_an_agent_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nothing.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_meshvm-agent"))
        .arg("secrets")
        .arg("--sds-socket")
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "cannot connect to the SDS socket {}",
            socket.display()
        )),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_meshvm-agent"))
        .arg("secrets")
        .arg("--sds-socket")
        .arg(&socket)
        .args(["--wait", "300ms"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no secret served within 300ms"), "{stderr}");
}

/// With ISTIO_META_DNS_CAPTURE the agent runs the DNS proxy on
/// `--dns-listen`; the NameTable saved in the state directory answers at
/// once, before (and without) any control plane NameTable.
#[test]
fn run_serves_dns_from_the_saved_name_table() {
    use meshvm_proto::istio::networking::nds::v1::NameTable;
    use meshvm_proto::istio::networking::nds::v1::name_table::NameInfo;

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ca = CaServer::start(&rt, &dir.path().join("ca"));
    let onboarding = onboarding_dir(&ca.ca, &dir.path().join("onboarding"));
    let state = dir.path().join("certs");
    std::fs::create_dir_all(&state).unwrap();
    let mut table = NameTable::default();
    table.table.insert(
        "ratings.vm-ns.svc.cluster.local".into(),
        NameInfo {
            ips: vec!["10.96.0.10".into()],
            registry: "Kubernetes".into(),
            shortname: "ratings".into(),
            namespace: "vm-ns".into(),
            alt_hosts: Vec::new(),
        },
    );
    meshvm_agent::dns::save_table(&state.join(meshvm_agent::dns::SAVED_TABLE_FILE), &table);
    let port = meshvm_testing::process::free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let mut agent = Agent::spawn_with_args(
        &onboarding,
        dir.path(),
        &ca.address(),
        &[("ISTIO_META_DNS_CAPTURE", "true")],
        &["--no-envoy", "--dns-listen", &listen],
    );
    agent.wait_for_log("DNS proxy listening", 1);
    for tcp in ["+notcp", "+tcp"] {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port,
                "+short",
                "+tries=1",
                "+time=30",
                tcp,
            ])
            .args(["ratings.vm-ns", "A"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "10.96.0.10",
            "{}",
            agent.log()
        );
    }
    assert!(agent.terminate(), "agent failed:\n{}", agent.log());
}
