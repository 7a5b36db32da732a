//! `meshvm-controlplane onboard`, the real binary: its files equal istioctl's
//! (the fixtures in testdata/onboarding/ and goldens in testdata/controlplane/),
//! its root and token are the CA's, and the agent's own parser accepts them.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use meshvm_agent::config::{Config, OnboardingPaths};
use meshvm_controlplane::ca::MeshCa;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

fn onboard(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_meshvm-controlplane"))
        .arg("onboard")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run meshvm-controlplane");
    if !out.status.success() {
        eprintln!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    }
    out
}

/// Runs `onboard` for `manifest` into a fresh directory; returns (tempdir, out dir, CA dir).
fn onboard_ok(manifest: &str, flags: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let ca = tmp.path().join("ca");
    let manifest = testdata().join("controlplane").join(manifest);
    let mut args = vec![
        "-f",
        manifest.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--ca-dir",
        ca.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    let result = onboard(&args);
    assert!(result.status.success(), "onboard failed");
    assert!(String::from_utf8_lossy(&result.stdout).contains("was successful"));
    (tmp, out, ca)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assert_same(name: &str, got: &str, want: &str) {
    if got != want {
        panic!("{name} differs\n--- got\n{got}\n--- want\n{want}");
    }
}

/// Compares with a golden file; `UPDATE_GOLDEN=1` rewrites it.
fn golden(path: &Path, got: &str) {
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, got).unwrap();
    }
    assert_same(&path.display().to_string(), got, &read(path));
}

/// The agent's view of an onboarding directory, with an empty environment.
fn agent_config(dir: &Path) -> Config {
    Config::load(&OnboardingPaths::in_dir(dir), &BTreeMap::new())
        .unwrap_or_else(|e| panic!("the agent refuses {}: {e}", dir.display()))
}

#[test]
fn ratings_vm_matches_istioctl_and_the_agent_accepts_it() {
    let (_tmp, out, ca_dir) = onboard_ok(
        "workloadgroup-ratings.yaml",
        &[
            "--cluster-id",
            "cluster1",
            "--mesh-id",
            "mesh1",
            "--autoregister",
            "--ingress-ip",
            "34.120.10.7",
        ],
    );
    let fixture = testdata().join("onboarding/ratings-vm");
    for name in ["cluster.env", "mesh.yaml", "hosts"] {
        assert_same(name, &read(&out.join(name)), &read(&fixture.join(name)));
    }

    // root-cert.pem is the CA's root; the token is the CA's, for the group's SA.
    let ca = MeshCa::load_or_create(&ca_dir, None).unwrap();
    assert_eq!(read(&out.join("root-cert.pem")), ca.root_cert_pem());
    let token = read(&out.join("istio-token"));
    assert!(!token.ends_with('\n') && !token.contains(char::is_whitespace));
    assert_eq!(
        ca.tokens().verify(&token).unwrap().uri(),
        "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa"
    );
    let mode = |name: &str| {
        std::fs::metadata(out.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("istio-token"), 0o600);
    assert_eq!(mode("cluster.env"), 0o644);

    // The agent reads all five files.
    let config = agent_config(&out);
    assert_eq!(
        config.spiffe_id(),
        "spiffe://cluster.local/ns/vm-ns/sa/ratings-sa"
    );
    assert_eq!(config.cluster_id.as_deref(), Some("cluster1"));
    assert_eq!(config.mesh_id.as_deref(), Some("mesh1"));
    assert_eq!(config.network.as_deref(), Some("vm-network"));
    assert_eq!(config.workload_name.as_deref(), Some("ratings-vm"));
    assert_eq!(config.discovery_address, "istiod.istio-system.svc:15012");
    assert!(config.dns_capture);
    assert!(config.readiness_probe.is_some());
    assert_eq!(
        config.labels.get("app").map(String::as_str),
        Some("ratings")
    );
    assert_eq!(config.root_certs.certificates.len(), 1);
    assert_eq!(config.hosts.len(), 1);
    let claims = config
        .istio_token
        .as_ref()
        .and_then(|t| t.claims.clone())
        .expect("a JWT");
    assert_eq!(
        claims.subject.as_deref(),
        Some("system:serviceaccount:vm-ns:ratings-sa")
    );
    assert_eq!(claims.audiences, vec!["istio-ca".to_string()]);
    assert!(!config.istio_token.as_ref().unwrap().is_expired_at(now()));
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn billing_vm_matches_the_fixture_but_for_the_trust_domain() {
    let (_tmp, out, _ca) = onboard_ok(
        "workloadgroup-billing.yaml",
        &[
            "--revision",
            "canary",
            "--internal-ip",
            "10.0.0.12",
            "--capture-dns=false",
        ],
    );
    let fixture = testdata().join("onboarding/billing-vm");
    assert_same(
        "cluster.env",
        &read(&out.join("cluster.env")),
        &read(&fixture.join("cluster.env"))
            .replace("TRUST_DOMAIN=''", "TRUST_DOMAIN='cluster.local'"),
    );
    assert_same(
        "mesh.yaml",
        &read(&out.join("mesh.yaml")),
        &read(&fixture.join("mesh.yaml"))
            .replace("TRUST_DOMAIN: \"\"", "TRUST_DOMAIN: cluster.local"),
    );
    assert_same("hosts", &read(&out.join("hosts")), "");

    let config = agent_config(&out);
    assert_eq!(config.ca_address, "istiod-canary.istio-system.svc:15012");
    assert_eq!(
        config.instance_ip.map(|ip| ip.to_string()).as_deref(),
        Some("10.0.0.12")
    );
    assert!(!config.dns_capture);
    assert!(config.hosts.is_empty());
    assert_eq!(
        config.metadata.get("VM_NOTE").map(String::as_str),
        Some("payments team's batch VMs (ticket #4711)")
    );
}

#[test]
fn istioctl_style_golden() {
    let (_tmp, out, _ca) = onboard_ok(
        "workloadgroup-foo.yaml",
        &[
            "--revision",
            "rev-1",
            "--internal-ip",
            "10.10.10.10",
            "--ingress-ip",
            "10.10.10.11",
        ],
    );
    let goldens = testdata().join("controlplane/foo");
    for name in ["cluster.env", "mesh.yaml", "hosts"] {
        golden(&goldens.join(name), &read(&out.join(name)));
    }
    let config = agent_config(&out);
    assert_eq!(
        config.spiffe_id(),
        "spiffe://cluster.local/ns/bar/sa/vm-serviceaccount"
    );
}

#[test]
fn token_duration_and_ca_reuse() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let manifest = testdata().join("controlplane/workloadgroup-ratings.yaml");
    let mut roots = Vec::new();
    for (i, duration) in ["2h", "90"].into_iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        let status = onboard(&[
            "-f",
            manifest.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--ca-dir",
            ca_dir.to_str().unwrap(),
            "--token-duration",
            duration,
        ])
        .status;
        assert!(status.success());
        let claims = agent_config(&out).istio_token.unwrap().claims.unwrap();
        let lifetime = claims.expires.unwrap() - now();
        let want = if i == 0 { 7200 } else { 90 };
        assert!(
            (want - 5..=want).contains(&lifetime),
            "{duration}: {lifetime}"
        );
        roots.push(read(&out.join("root-cert.pem")));
    }
    assert_eq!(roots[0], roots[1], "the second run reuses the CA");
}

#[test]
fn bad_manifests_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            "kind: Service\napiVersion: v1\nmetadata:\n  name: x\n  namespace: y\n",
            "kind is `Service`",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: x\n",
            "metadata.namespace: not set",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: x\n  namespace: y\nspec:\n  template:\n    ports:\n      http: web\n",
            "line 9",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: x\n  namespace: y\nspec:\n  probe:\n    httpGet:\n      port: 8080\n    tcpSocket:\n      port: 8080\n",
            "set one of httpGet",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: WorkloadGroup\nmetadata:\n  name: x\n  namespace: y\nspec:\n  tempalte: {}\n",
            "unknown field `tempalte`",
        ),
    ];
    for (i, (manifest, want)) in cases.into_iter().enumerate() {
        let path = tmp.path().join(format!("wg{i}.yaml"));
        std::fs::write(&path, manifest).unwrap();
        let out = onboard(&[
            "-f",
            path.to_str().unwrap(),
            "-o",
            tmp.path().join("out").to_str().unwrap(),
            "--ca-dir",
            tmp.path().join("ca").to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "case {i} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(want) && stderr.contains(&format!("wg{i}.yaml")),
            "case {i}: {stderr}"
        );
    }
    assert!(!tmp.path().join("out").exists(), "nothing written on error");
}

/// The agent's identity pipeline against this CA: for each key type, the
/// agent's CSR (for the identity its configuration names) is signed for the
/// identity the onboarding token proves, and the agent's own verification of
/// the answer against `root-cert.pem` accepts it.
#[test]
fn the_agent_verifies_certificates_for_its_onboarding_token() {
    use meshvm_agent::identity::{KeyAlgorithm, WorkloadKey, verify_issued};

    let (_tmp, out, ca_dir) = onboard_ok("workloadgroup-ratings.yaml", &[]);
    let config = agent_config(&out);
    let ca = MeshCa::load_or_create(&ca_dir, None).unwrap();
    let token = config
        .istio_token
        .as_ref()
        .unwrap()
        .secret()
        .expose()
        .clone();
    let caller = ca.tokens().verify(&token).unwrap();
    assert_eq!(caller.uri(), config.spiffe_id());
    for algorithm in KeyAlgorithm::ALL {
        let key = WorkloadKey::generate(algorithm).unwrap();
        let csr = key.csr_pem(&config.spiffe_id()).unwrap();
        let chain = ca.issue(&csr, &caller, None).unwrap();
        let issued = verify_issued(
            &chain,
            &key,
            &config.spiffe_id(),
            &config.root_certs,
            std::time::SystemTime::now(),
        )
        .unwrap_or_else(|e| panic!("{algorithm}: the agent refuses our chain: {e}"));
        assert_eq!(issued.spiffe_id(), config.spiffe_id());
        assert_eq!(
            issued.lifetime().as_secs(),
            24 * 3600 + 120,
            "24 h + 2 min backdating"
        );
    }
}
