//! `meshvm-agent run` as a process: with onboarding files and the local
//! control plane's CA (in-process, over TLS), it obtains the workload
//! certificate, stores it 0600, serves it on the SDS socket, and stops
//! cleanly on SIGTERM.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshvm_controlplane::ca::MeshCa;
use meshvm_controlplane::ca::server::{ServeOptions, serve};

/// Generous liveness bound, not a performance expectation.
const PATIENCE: Duration = Duration::from_secs(60);

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_obtains_stores_and_serves_the_workload_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let ca = Arc::new(MeshCa::load_or_create(&dir.path().join("ca"), None).unwrap());
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop_ca, ca_stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions {
        cluster_id: "cluster1".into(),
        extra_dns_names: Vec::new(),
    };
    runtime.spawn(serve(ca.clone(), listener, options, async {
        let _ = ca_stopped.await;
    }));

    // Onboarding files as istioctl writes them, with this CA's root and token.
    let onboarding = dir.path().join("onboarding");
    std::fs::create_dir(&onboarding).unwrap();
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/onboarding/ratings-vm");
    for file in ["cluster.env", "mesh.yaml", "hosts"] {
        std::fs::copy(testdata.join(file), onboarding.join(file)).unwrap();
    }
    std::fs::write(onboarding.join("root-cert.pem"), ca.root_cert_pem()).unwrap();
    let token = ca
        .tokens()
        .mint("vm-ns", "ratings-sa", Duration::from_secs(3600))
        .unwrap();
    std::fs::write(onboarding.join("istio-token"), &token).unwrap();

    let state = dir.path().join("certs");
    let socket = dir.path().join("sds.sock");
    let agent = Command::new(env!("CARGO_BIN_EXE_meshvm-agent"))
        .arg("--onboarding-dir")
        .arg(&onboarding)
        .arg("run")
        .arg("--state-dir")
        .arg(&state)
        .arg("--sds-socket")
        .arg(&socket)
        .env("CA_ADDR", format!("localhost:{port}"))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let chain = state.join("cert-chain.pem");
    let files = ["key.pem", "cert-chain.pem", "root-cert.pem"];
    wait_for("the key, chain and root on disk", || {
        files.iter().all(|f| state.join(f).exists())
    });
    wait_for("the SDS socket", || socket.exists());
    for file in files {
        let mode = std::fs::metadata(state.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(onboarding.join("root-cert.pem"))
        .arg(&chain)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let san = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&chain)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&san.stdout)
            .contains("URI:spiffe://cluster.local/ns/vm-ns/sa/ratings-sa"),
        "{}",
        String::from_utf8_lossy(&san.stdout)
    );

    // SIGTERM: the agent exits successfully and removes its socket.
    let pid = agent.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let output = agent.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "agent failed:\n{logs}");
    assert!(!socket.exists(), "the SDS socket was left behind");
    assert!(!logs.contains(&token), "the token was logged");
    let _ = stop_ca.send(());
}
