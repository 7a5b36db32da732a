//! `meshvm-agent check-config` run as a process on the onboarding files in
//! `testdata/onboarding/`.
//!
//! The golden outputs live in `testdata/check-config/`; regenerate them with
//! `UPDATE_GOLDEN=1 cargo test -p meshvm-agent --test check_config`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_meshvm-agent");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Runs the agent in the repository root with only `env` in its environment.
fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(repo())
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run meshvm-agent")
}

fn check_config(dir: &str, format: &str, env: &[(&str, &str)]) -> Output {
    agent(
        &["check-config", "--format", format, "--onboarding-dir", dir],
        env,
    )
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("UTF-8 stderr")
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

fn token(dir: &str) -> String {
    std::fs::read_to_string(repo().join(dir).join("istio-token")).expect("token")
}

/// Neither the token nor any sizeable piece of it appears in the output.
fn assert_token_hidden(o: &Output, token: &str) {
    for text in [stdout(o), stderr(o)] {
        for piece in token.as_bytes().chunks(32) {
            let piece = std::str::from_utf8(piece).unwrap();
            assert!(
                !text.contains(piece),
                "token piece {piece:?} leaked:\n{text}"
            );
        }
    }
}

fn golden(name: &str, actual: &str) {
    let path = repo().join("testdata/check-config").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (set UPDATE_GOLDEN=1 to create it)", path.display()));
    assert_eq!(actual, expected, "{} differs", path.display());
}

#[test]
fn ratings_vm_yaml_matches_golden() {
    let dir = "testdata/onboarding/ratings-vm";
    let out = check_config(dir, "yaml", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    golden("ratings-vm.yaml", &text);
    assert!(text.starts_with("spiffe-id: spiffe://cluster.local/ns/vm-ns/sa/ratings-sa\n"));
    assert!(text.contains(
        "\nistio-token: <redacted, 885 bytes, expires 2026-11-25T21:00:00Z (expired), \
         aud istio-ca, sub system:serviceaccount:vm-ns:ratings-sa>\n"
    ));
    assert_token_hidden(&out, &token(dir));
    // The fixture's token is an hour-long one from 2026-11-25: the agent warns.
    assert!(
        stderr(&out).contains("the istio-token has expired"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn billing_vm_json_matches_golden() {
    let dir = "testdata/onboarding/billing-vm";
    let out = check_config(dir, "json", &[]);
    let v = json(&out);
    golden("billing-vm.json", &stdout(&out));
    assert_eq!(
        v["spiffe-id"],
        "spiffe://cluster.local/ns/payments/sa/billing-sa"
    );
    assert_eq!(v["trust-domain"], "cluster.local");
    assert_eq!(v["ca-address"], "istiod-canary.istio-system.svc:15012");
    assert_eq!(v["instance-ip"], "10.0.0.12");
    assert_eq!(v["inbound-ports"], serde_json::json!([7070, 8080]));
    assert_eq!(
        v["metadata"]["VM_NOTE"],
        "payments team's batch VMs (ticket #4711)"
    );
    assert_eq!(v["readiness-probe"]["tcpSocket"]["port"], 7070);
    assert_eq!(v["root-certs"].as_array().unwrap().len(), 2);
    assert_eq!(v["hosts"], serde_json::json!([]));
    assert_token_hidden(&out, &token(dir));
}

#[test]
fn ratings_vm_json_fields() {
    let v = json(&check_config("testdata/onboarding/ratings-vm", "json", &[]));
    assert_eq!(v["namespace"], "vm-ns");
    assert_eq!(v["service-account"], "ratings-sa");
    assert_eq!(v["workload-name"], "ratings-vm");
    assert_eq!(v["cluster-id"], "cluster1");
    assert_eq!(v["mesh-id"], "mesh1");
    assert_eq!(v["network"], "vm-network");
    assert_eq!(v["labels"]["version"], "v2");
    assert_eq!(v["metadata"]["AUTO_REGISTER_GROUP"], "ratings-vm");
    assert_eq!(v["metadata"]["DNS_CAPTURE"], "true");
    assert_eq!(v["discovery-address"], "istiod.istio-system.svc:15012");
    assert_eq!(v["ca-address"], "istiod.istio-system.svc:15012");
    assert_eq!(v["inbound-ports"], serde_json::json!([9080]));
    assert_eq!(v["dns-capture"], true);
    assert_eq!(
        v["readiness-probe"],
        serde_json::json!({
            "httpGet": {"path": "/health", "port": 9080},
            "initialDelaySeconds": 1,
            "periodSeconds": 5
        })
    );
    assert_eq!(
        v["hosts"],
        serde_json::json!([{"ip": "34.120.10.7", "names": ["istiod.istio-system.svc"]}])
    );
    assert_eq!(v["root-certs"][0]["subject"], "O=cluster.local");
    assert_eq!(v["root-certs"][0]["ca"], true);
}

#[test]
fn environment_overrides_the_files() {
    let dir = "testdata/onboarding/ratings-vm";
    let out = check_config(
        dir,
        "json",
        &[
            ("POD_NAMESPACE", "prod"),
            ("SERVICE_ACCOUNT", "ratings-prod"),
            ("TRUST_DOMAIN", "corp.example"),
            ("CA_ADDR", "ca.corp.example:15012"),
            ("ISTIO_META_NETWORK", "dc2"),
            ("ISTIO_META_CERT_SIGNER", "corp-ca"),
            (
                "ISTIO_METAJSON_LABELS",
                r#"{"app":"ratings","version":"v3"}"#,
            ),
            ("ISTIO_INBOUND_PORTS", "*"),
            ("POD_NAME", "ratings-vm-1"),
            ("INSTANCE_IP", "10.0.0.12"),
            ("SECRET_TTL", "1h30m"),
            (
                "PROXY_CONFIG",
                r#"{"discoveryAddress":"istiod.corp.example:15012","serviceCluster":"x"}"#,
            ),
        ],
    );
    let v = json(&out);
    assert_eq!(
        v["spiffe-id"],
        "spiffe://corp.example/ns/prod/sa/ratings-prod"
    );
    assert_eq!(v["ca-address"], "ca.corp.example:15012");
    assert_eq!(v["discovery-address"], "istiod.corp.example:15012");
    assert_eq!(v["network"], "dc2");
    assert_eq!(v["metadata"]["NETWORK"], "dc2");
    assert_eq!(v["metadata"]["CERT_SIGNER"], "corp-ca");
    assert_eq!(
        v["labels"],
        serde_json::json!({"app": "ratings", "version": "v3"})
    );
    assert_eq!(v["inbound-ports"], "*");
    assert_eq!(v["pod-name"], "ratings-vm-1");
    assert_eq!(v["instance-ip"], "10.0.0.12");
    assert_eq!(v["secret-ttl"], "1h30m0s");
    // The token is for vm-ns/ratings-sa; the agent says so.
    assert!(
        stderr(&out).contains("the istio-token is for another service account"),
        "{}",
        stderr(&out)
    );
    assert_token_hidden(&out, &token(dir));
}

#[test]
fn empty_trust_domain_means_cluster_local() {
    let v = json(&check_config(
        "testdata/onboarding/ratings-vm",
        "json",
        &[("TRUST_DOMAIN", "")],
    ));
    assert_eq!(v["trust-domain"], "cluster.local");
}

#[test]
fn missing_token_and_hosts_are_not_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for f in ["cluster.env", "mesh.yaml", "root-cert.pem"] {
        std::fs::copy(
            repo().join("testdata/onboarding/ratings-vm").join(f),
            tmp.path().join(f),
        )
        .unwrap();
    }
    let out = check_config(tmp.path().to_str().unwrap(), "json", &[]);
    let v = json(&out);
    assert_eq!(v["istio-token"], serde_json::Value::Null);
    assert_eq!(v["hosts"], serde_json::json!([]));
    assert!(stderr(&out).contains("no istio-token"), "{}", stderr(&out));
}

/// Each malformed fixture: exit status 1, nothing on stdout, and one error
/// line naming the file, the line (and column) and the problem.
#[test]
fn malformed_files_are_reported_with_file_and_line() {
    let cases = [
        (
            "cluster-env-unterminated-quote",
            "cluster.env:11:20: unterminated single quote: the value runs on into line 12, \
             which looks like the next KEY=value",
        ),
        (
            "cluster-env-not-assignment",
            "cluster.env:10:19: expected `=` after `ISTIO_META_NETWORK`, found `:`",
        ),
        (
            "cluster-env-bad-labels",
            "cluster.env:5: ISTIO_METAJSON_LABELS: not a JSON object of string labels: \
             expected value at line 1 column 115",
        ),
        (
            "mesh-yaml-named-port",
            "mesh.yaml:21:13: defaultConfig.readinessProbe.httpGet.port: invalid type: \
             string \"http\", expected u32",
        ),
        (
            "mesh-yaml-bad-indent",
            "mesh.yaml:11:4: did not find expected key, while parsing a block mapping at line 2 column 3",
        ),
        (
            "root-cert-truncated",
            "root-cert.pem:1: the CERTIFICATE block has no END line (is the file truncated?)",
        ),
        (
            "root-cert-configmap-json",
            "root-cert.pem: no PEM CERTIFICATE block on lines of its own",
        ),
        (
            "hosts-reversed",
            "hosts:1:1: `istiod.istio-system.svc` is not an IP address",
        ),
        (
            "token-bearer-prefix",
            "istio-token:1:7: unexpected space: the file must hold only the token, without a \
             `Bearer ` prefix or quotes",
        ),
    ];
    let fixtures = std::fs::read_dir(repo().join("testdata/onboarding/bad"))
        .unwrap()
        .count();
    assert_eq!(fixtures, cases.len(), "every bad fixture has a case here");
    let token = token("testdata/onboarding/ratings-vm");
    for (case, message) in cases {
        let dir = format!("testdata/onboarding/bad/{case}");
        for format in ["yaml", "json"] {
            let out = check_config(&dir, format, &[]);
            assert_eq!(out.status.code(), Some(1), "{case}: {}", stderr(&out));
            assert_eq!(stdout(&out), "", "{case}");
            let expected = format!("meshvm-agent: error: {dir}/{message}");
            assert!(
                stderr(&out).lines().any(|l| l.starts_with(&expected)),
                "{case}: expected a line starting with\n{expected}\ngot\n{}",
                stderr(&out)
            );
            assert_token_hidden(&out, &token);
        }
    }
}

#[test]
fn bad_environment_values_are_reported() {
    let out = check_config(
        "testdata/onboarding/ratings-vm",
        "yaml",
        &[("ISTIO_META_DNS_CAPTURE", "enabled")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "meshvm-agent: error: environment variable ISTIO_META_DNS_CAPTURE: `enabled` is not \
         true or false"
    );
    let out = check_config(
        "testdata/onboarding/ratings-vm",
        "yaml",
        &[("SECRET_TTL", "1d")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out).trim_end(),
        "meshvm-agent: error: environment variable SECRET_TTL: `1d`: unknown unit `d`"
    );
}

#[test]
fn missing_directory() {
    let out = check_config("testdata/onboarding/no-such-vm", "yaml", &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with(
            "meshvm-agent: error: testdata/onboarding/no-such-vm/cluster.env: No such file"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn version_and_help() {
    let out = agent(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        format!("meshvm-agent {}", env!("CARGO_PKG_VERSION"))
    );
    let out = agent(&["--help"], &[]);
    assert!(out.status.success());
    assert!(stdout(&out).contains("check-config"));
    assert!(stdout(&out).contains("--onboarding-dir <DIR>"));
    let out = agent(&["check-config", "--help"], &[]);
    assert!(stdout(&out).contains("--format <FORMAT>"));
}
