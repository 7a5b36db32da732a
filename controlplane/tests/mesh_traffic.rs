//! Mesh traffic through real processes: `meshvm-controlplane serve` with
//! the meshvm filter, the Pod `product-v1` played by `run-pod` (its own
//! agent, Envoy and app), and VMs of the `product-vm` group (agent, Envoy,
//! an echo app in this process). The mesh is testdata/demo with the apps'
//! ports made free for this run.
//!
//! An app on a VM resolves `product.default.svc.cluster.local` through the
//! agent's DNS proxy (with `dig`), sends requests there with curl, and they
//! are balanced over the Pod and the VM itself through both Envoys over
//! mTLS; each app sees the caller's identity. Endpoints follow the mesh
//! without restarts: a second VM joins and, after its agent stops and the
//! grace period ends, leaves; a Pod added to the config joins and leaves.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use meshvm_controlplane::echo::EchoApp;
mod common;

use common::{controlplane, copy_testdata_config, onboard_autoregistered, serve};
use meshvm_testing::envoy::{filter_wasm, http_get};
use meshvm_testing::pki::TestCa;
use meshvm_testing::process::{Process, cargo_bin, free_port, wait_until};
use meshvm_testing::registry::{
    Registry, build_filter_images, sha256, skip_without_tools, tagged_manifest,
};
use serde_json::Value;

const GRACE: Duration = Duration::from_secs(3);
const PRODUCT: &str = "product.default.svc.cluster.local";
const POD_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/product";
const VM_IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/product-vm";
/// Offsets of the outbound blocks from the run's network.
const VM1_BLOCK: u8 = 100;
const POD_BLOCK: u8 = 120;
const VM2_BLOCK: u8 = 140;

/// The demo mesh in a temporary config dir, with free app ports and
/// addresses of this run's own (`127.<net>.x.y`), so a run never meets the
/// Envoys of another.
struct Mesh {
    dir: tempfile::TempDir,
    port: u16,
    pod_port: u16,
    vm_port: u16,
    net: u8,
}

impl Mesh {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (pod_port, vm_port) = (free_port(), free_port());
        let net = (free_port() % 90 + 1) as u8;
        copy_testdata_config("demo", dir.path(), |text| {
            text.replace("9081", &pod_port.to_string())
                .replace("9082", &vm_port.to_string())
                .replace("127.0.10.", &format!("127.{net}.10."))
        });
        Self {
            dir,
            port: free_port(),
            pod_port,
            vm_port,
            net,
        }
    }

    /// `127.<net>.<x>.<y>`.
    fn ip(&self, x: u8, y: u8) -> IpAddr {
        IpAddr::from([127, self.net, x, y])
    }

    /// An outbound block `127.<net + offset>.0.0/16`.
    fn block(&self, offset: u8) -> String {
        format!("127.{}.0.0/16", self.net + offset)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn discovery_address(&self) -> String {
        format!("localhost:{}", self.port)
    }

    fn start_controlplane(&self) -> Process {
        self.start_controlplane_with(&[OsStr::new("--filter-wasm"), filter_wasm().as_os_str()])
    }

    fn start_controlplane_with(&self, args: &[&OsStr]) -> Process {
        serve(self.dir.path(), self.port, GRACE, args)
    }

    /// `run-pod product-v1` with its outbound listeners in its own block.
    fn start_pod(&self, ports: &Ports) -> Process {
        let mut command = controlplane();
        command
            .args(["run-pod", "product-v1", "--config-dir"])
            .arg(self.path("config"))
            .arg("--ca-dir")
            .arg(self.path("ca"))
            .args(["--discovery-address", &self.discovery_address()])
            .arg("--work-dir")
            .arg(self.path("pod"))
            .args(["--outbound-addresses", &self.block(POD_BLOCK)])
            .arg("--agent")
            .arg(cargo_bin("meshvm-agent"))
            .arg("--")
            .args(ports.agent_args())
            .env("RUST_LOG", "info");
        Process::spawn("run-pod", command)
    }

    /// A VM of the product-vm group at `ip`, its app at `app` on the
    /// group's port, its outbound listeners in `block`.
    fn start_vm(&self, name: &str, ip: IpAddr, app: IpAddr, block: u8, ports: &Ports) -> Vm {
        self.start_vm_with(name, ip, app, block, ports, &[])
    }

    fn start_vm_with(
        &self,
        name: &str,
        ip: IpAddr,
        app: IpAddr,
        block: u8,
        ports: &Ports,
        extra: &[&OsStr],
    ) -> Vm {
        onboard_autoregistered(
            &self.path("config/product-vm.yaml"),
            &self.path(&format!("{name}/onboarding")),
            &self.path("ca"),
            &ip.to_string(),
            &self.discovery_address(),
        );
        let app = EchoApp::spawn(&SocketAddr::new(app, self.vm_port).to_string(), name).unwrap();
        Vm {
            agent: self.start_vm_agent(name, app.addr().ip(), block, ports, extra),
            app,
            ports: ports.clone(),
        }
    }

    /// The agent (and Envoy) of the onboarded VM `name`, its app at `app`.
    fn start_vm_agent(
        &self,
        name: &str,
        app: IpAddr,
        block: u8,
        ports: &Ports,
        extra: &[&OsStr],
    ) -> Process {
        let onboarding = self.path(&format!("{name}/onboarding"));
        let mut command = Command::new(cargo_bin("meshvm-agent"));
        command
            .arg("--onboarding-dir")
            .arg(&onboarding)
            .arg("run")
            .arg("--state-dir")
            .arg(self.path(&format!("{name}/certs")))
            .arg("--run-dir")
            .arg(self.path(&format!("{name}/run")))
            .arg("--sds-socket")
            .arg(self.path(&format!("{name}/run/sds.sock")))
            .args(ports.agent_args())
            .args(extra)
            .env("ISTIO_META_MESHVM_APP_ADDRESS", app.to_string())
            .env("ISTIO_META_MESHVM_OUTBOUND_ADDRESSES", self.block(block))
            .env("RUST_LOG", "info");
        Process::spawn(name, command)
    }
}

/// The ports a sidecar's agent is given: admin and DNS fixed (the test
/// talks to them), the rest ephemeral.
#[derive(Clone)]
struct Ports {
    admin: u16,
    dns: u16,
    status: u16,
}

impl Ports {
    fn new() -> Self {
        Self {
            admin: free_port(),
            dns: free_port(),
            status: free_port(),
        }
    }

    fn agent_args(&self) -> Vec<String> {
        [
            "--envoy-admin-port",
            &self.admin.to_string(),
            "--envoy-status-port",
            "0",
            "--envoy-prometheus-port",
            "0",
            "--status-listen",
            &format!("127.0.0.1:{}", self.status),
            "--dns-listen",
            &format!("127.0.0.1:{}", self.dns),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The healthy endpoints of `cluster` in this sidecar's Envoy.
    fn endpoints(&self, cluster: &str) -> Vec<String> {
        let admin = SocketAddr::from(([127, 0, 0, 1], self.admin));
        let Ok((200, body)) = http_get(admin, "/clusters") else {
            return Vec::new();
        };
        let mut endpoints: Vec<String> = body
            .lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(cluster)?.strip_prefix("::")?;
                let (addr, flag) = rest.split_once("::health_flags::")?;
                (flag == "healthy").then(|| addr.to_string())
            })
            .collect();
        endpoints.sort();
        endpoints
    }
}

struct Vm {
    agent: Process,
    app: EchoApp,
    ports: Ports,
}

/// `dig +short` against a sidecar's DNS proxy.
fn dig(ports: &Ports, name: &str) -> Vec<String> {
    let out = Command::new("dig")
        .args([
            "+short",
            "+time=2",
            "+tries=1",
            "-p",
            &ports.dns.to_string(),
        ])
        .arg("@127.0.0.1")
        .arg(name)
        .output()
        .expect("dig must be installed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// What an echo app answered: its name and the headers it saw.
struct Answer {
    app: String,
    headers: BTreeMap<String, String>,
}

/// curl `http://<host>:<port><path>` with the name resolved to `addr`
/// (`--resolve`, as the app's resolver would), extra `headers`.
fn get(host: &str, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    try_get(host, addr, path, headers).unwrap_or_else(|error| panic!("{error}"))
}

fn try_get(
    host: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--fail", "--max-time", "10", "--resolve"])
        .arg(format!("{host}:{}:{}", addr.port(), addr.ip()));
    for (k, v) in headers {
        command.arg("-H").arg(format!("{k}: {v}"));
    }
    let out = command
        .arg(format!("http://{host}:{}{path}", addr.port()))
        .output()
        .expect("curl must be installed");
    if !out.status.success() {
        return Err(format!(
            "curl {host} via {addr}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    let headers = body["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_string(),
                pair[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    Ok(Answer {
        app: body["app"].as_str().unwrap().to_string(),
        headers,
    })
}

/// How many of `n` requests each app answered.
fn spread(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let answer = get(PRODUCT, addr, &format!("/spread/{i}"), &[]);
        *seen.entry(answer.app).or_default() += 1;
    }
    seen
}

fn logs(processes: &[&Process]) -> String {
    processes
        .iter()
        .map(|p| p.log())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

#[test]
fn services_balance_over_pods_and_vms_with_mtls_identities_and_follow_the_mesh() {
    let mesh = Mesh::new();
    let mut cp = mesh.start_controlplane();
    let pod_ports = Ports::new();
    let mut pod = mesh.start_pod(&pod_ports);
    let mut vm1 = mesh.start_vm(
        "vm-1",
        mesh.ip(20, 1),
        mesh.ip(21, 1),
        VM1_BLOCK,
        &Ports::new(),
    );

    let pod_endpoint = format!("{}:{}", mesh.ip(10, 1), mesh.pod_port);
    let vm1_endpoint = format!("{}:{}", mesh.ip(20, 1), mesh.vm_port);
    let product_cluster = format!("outbound|9080||{PRODUCT}");
    let vm_cluster = "outbound|9080||product-vm.default.svc.cluster.local";
    let context = || logs(&[&cp, &pod, &vm1.agent]);
    wait_until("the VM's Envoy has both product endpoints", context, || {
        vm1.ports.endpoints(&product_cluster) == [pod_endpoint.clone(), vm1_endpoint.clone()]
    });
    wait_until("the Pod's Envoy has the VM's Service", context, || {
        pod_ports.endpoints(vm_cluster) == [vm1_endpoint.clone()]
    });

    // The app on the VM resolves the Service through the agent's DNS proxy:
    // the Service's loopback address, where its Envoy listens.
    let vm1_block = mesh.net + VM1_BLOCK;
    let resolved = dig(&vm1.ports, PRODUCT);
    assert_eq!(
        resolved,
        [format!("127.{vm1_block}.88.12")],
        "{}",
        context()
    );
    let product: SocketAddr = format!("{}:9080", resolved[0]).parse().unwrap();
    assert_eq!(
        dig(&vm1.ports, "product-vm.default.svc.cluster.local"),
        [format!("127.{vm1_block}.88.20")]
    );

    // Both sidecars serve once their inbound listeners have their
    // certificates (an endpoint can be pushed before its Envoy is ready).
    wait_until("both backends answer", context, || {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            if let Ok(answer) = try_get(PRODUCT, product, "/", &[]) {
                seen.insert(answer.app);
            }
        }
        seen.len() == 2
    });

    // Balanced over the Pod and the VM itself, each seeing the VM's identity
    // (the filter on the VM's outbound side sends its metadata, the one on
    // the receiving side checks the mTLS peer and labels the request).
    let seen = spread(product, 20);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen["product-v1"] >= 3 && seen["vm-1"] >= 3, "{seen:?}");
    let spoofed = [(
        "x-mesh-peer-identity",
        "spiffe://cluster.local/ns/default/sa/admin",
    )];
    for _ in 0..4 {
        let answer = get(PRODUCT, product, "/whoami", &spoofed);
        assert_eq!(
            answer.headers["x-mesh-peer-identity"], VM_IDENTITY,
            "{}",
            answer.app
        );
        assert_eq!(answer.headers["x-mesh-peer-workload"], "product-vm");
        assert_eq!(answer.headers["x-mesh-peer-service-account"], "product-vm");
        assert_eq!(answer.headers["x-mesh-peer-version"], "v2");
    }

    // The Pod calls the VM's Service through its own Envoy and reaches the
    // VM's app with the Pod's identity.
    let answer = get(
        "product-vm.default.svc.cluster.local",
        format!("127.{}.88.20:9080", mesh.net + POD_BLOCK)
            .parse()
            .unwrap(),
        "/from-the-pod",
        &spoofed,
    );
    assert_eq!(answer.app, "vm-1");
    let seen_by_vm = vm1.app.last_request().unwrap();
    assert_eq!(seen_by_vm.path, "/from-the-pod");
    assert_eq!(
        seen_by_vm.header_all("x-mesh-peer-identity"),
        [POD_IDENTITY]
    );
    assert_eq!(
        seen_by_vm.header("x-mesh-peer-workload"),
        Some("product-v1")
    );
    assert_eq!(seen_by_vm.header("x-mesh-peer-version"), Some("v1"));

    // Callers without a mesh certificate are refused at the VM's inbound
    // listener: none, or one from another CA.
    let requests_before = vm1.app.requests().len();
    let inbound = format!("https://{vm1_endpoint}/");
    let plain = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "10", &inbound])
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "no client certificate was accepted"
    );
    std::fs::create_dir_all(mesh.path("stranger")).unwrap();
    let stranger = TestCa::new(&mesh.path("stranger"), "stranger");
    let cert = stranger.issue(
        "intruder",
        &["spiffe://cluster.local/ns/default/sa/product"],
    );
    let foreign = Command::new("curl")
        .args(["-sS", "-k", "--max-time", "10", "--cert"])
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .arg(&inbound)
        .output()
        .unwrap();
    assert!(
        !foreign.status.success(),
        "a foreign certificate was accepted"
    );
    let cleartext = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{vm1_endpoint}/"))
        .output()
        .unwrap();
    assert!(!cleartext.status.success(), "cleartext was accepted");
    assert_eq!(vm1.app.requests().len(), requests_before);

    // A second VM joins: its entry becomes an endpoint of both Services,
    // pushed to the running Envoys.
    let mut vm2 = mesh.start_vm(
        "vm-2",
        mesh.ip(20, 2),
        mesh.ip(21, 2),
        VM2_BLOCK,
        &Ports::new(),
    );
    let vm2_endpoint = format!("{}:{}", mesh.ip(20, 2), mesh.vm_port);
    let context = || logs(&[&cp, &vm1.agent, &vm2.agent]);
    wait_until("the second VM is an endpoint", context, || {
        vm1.ports.endpoints(&product_cluster)
            == [
                pod_endpoint.clone(),
                vm1_endpoint.clone(),
                vm2_endpoint.clone(),
            ]
    });
    wait_until("the second VM's Envoy serves", context, || {
        (0..6).any(|_| try_get(PRODUCT, product, "/", &[]).is_ok_and(|a| a.app == "vm-2"))
    });

    // ... and leaves: its agent stops, the grace period ends, the entry and
    // the endpoint go.
    assert!(vm2.agent.terminate(), "{}", vm2.agent.log());
    let context = || logs(&[&cp, &vm1.agent]);
    wait_until("the second VM has left", context, || {
        vm1.ports.endpoints(&product_cluster) == [pod_endpoint.clone(), vm1_endpoint.clone()]
    });
    let seen = spread(product, 10);
    assert!(!seen.contains_key("vm-2"), "{seen:?}");

    // A Pod added to the config joins; removed, it leaves.
    let extra = mesh.path("config/extra-pod.yaml");
    std::fs::write(
        &extra,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: product-v3, namespace: default, labels: {{app: product}}}}\n\
             spec: {{serviceAccountName: product, containers: [{{name: app, ports: [{{name: http, containerPort: {}}}]}}]}}\n\
             status: {{podIP: {}}}\n",
            mesh.pod_port,
            mesh.ip(10, 3)
        ),
    )
    .unwrap();
    let extra_endpoint = format!("{}:{}", mesh.ip(10, 3), mesh.pod_port);
    wait_until("the added Pod is an endpoint", context, || {
        vm1.ports
            .endpoints(&product_cluster)
            .contains(&extra_endpoint)
    });
    std::fs::remove_file(&extra).unwrap();
    wait_until("the removed Pod has left", context, || {
        vm1.ports.endpoints(&product_cluster) == [pod_endpoint.clone(), vm1_endpoint.clone()]
    });

    assert!(vm1.agent.terminate(), "{}", vm1.agent.log());
    assert!(pod.terminate(), "{}", pod.log());
    assert!(cp.terminate(), "{}", cp.log());
}

/// POSTs `body` to the agent's `/v1/health`; the status code.
fn post_health(ports: &Ports, body: &str) -> u16 {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .args(["-H", "content-type: application/json", "--data", body])
        .arg(format!("http://127.0.0.1:{}/v1/health", ports.status))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

/// The `Healthy` condition of `entry`, as `get workloadentries` shows it.
fn healthy_condition(mesh: &Mesh, entry: &str) -> Option<(String, String)> {
    let out = controlplane()
        .args(["get", "workloadentries", "-n", "default", "-o", "json"])
        .arg("--state-dir")
        .arg(mesh.path("state"))
        .output()
        .unwrap();
    let list: Value = serde_json::from_slice(&out.stdout).ok()?;
    let item = list["items"]
        .as_array()?
        .iter()
        .find(|e| e["metadata"]["name"] == entry)?
        .clone();
    let condition = item["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Healthy")?
        .clone();
    Some((
        condition["status"].as_str()?.to_string(),
        condition["message"].as_str().unwrap_or("").to_string(),
    ))
}

#[test]
fn a_vm_whose_health_fails_leaves_its_services_and_returns_when_healthy() {
    let mesh = Mesh::new();
    // The group gets a probe the agent runs itself: a TCP connect to a
    // port this test opens and closes.
    let health_port = free_port();
    let app = mesh.ip(21, 1);
    let group = mesh.path("config/product-vm.yaml");
    let mut text = std::fs::read_to_string(&group).unwrap();
    text.push_str(&format!(
        "  probe:\n    periodSeconds: 1\n    timeoutSeconds: 1\n    failureThreshold: 2\n    \
         tcpSocket: {{host: {app}, port: {health_port}}}\n"
    ));
    std::fs::write(&group, text).unwrap();
    let listener = std::net::TcpListener::bind((app, health_port)).unwrap();

    let mut cp = mesh.start_controlplane();
    let ports = Ports::new();
    let mut vm = mesh.start_vm("vm-1", mesh.ip(20, 1), app, VM1_BLOCK, &ports);
    let entry = format!("product-vm-{}", mesh.ip(20, 1));
    let endpoint = format!("{}:{}", mesh.ip(20, 1), mesh.vm_port);
    let cluster = "outbound|9080||product-vm.default.svc.cluster.local";
    let context = || logs(&[&cp, &vm.agent]);

    // Health-checked: an endpoint only once the first probe said healthy.
    wait_until("Healthy=True and an endpoint", context, || {
        healthy_condition(&mesh, &entry).is_some_and(|(s, _)| s == "True")
            && vm.ports.endpoints(cluster) == [endpoint.clone()]
    });

    // The probe fails: Healthy=False with the reason, out of the endpoints.
    drop(listener);
    wait_until("Healthy=False and no endpoint", context, || {
        healthy_condition(&mesh, &entry)
            .is_some_and(|(s, m)| s == "False" && m.contains("agent-probe"))
            && vm.ports.endpoints(cluster).is_empty()
    });
    let listener = std::net::TcpListener::bind((app, health_port)).unwrap();
    wait_until("healthy again and back", context, || {
        healthy_condition(&mesh, &entry).is_some_and(|(s, _)| s == "True")
            && vm.ports.endpoints(cluster) == [endpoint.clone()]
    });

    // Another source reports through the agent's /v1/health: garbage is
    // refused and changes nothing; an unhealthy report takes the VM out.
    assert_eq!(post_health(&ports, "{not json"), 400);
    assert_eq!(post_health(&ports, r#"{"healthy":"yes"}"#), 400);
    assert_eq!(healthy_condition(&mesh, &entry).unwrap().0, "True");
    assert_eq!(
        post_health(
            &ports,
            r#"{"healthy":false,"message":"maintenance","source":"operator"}"#
        ),
        204
    );
    wait_until("unhealthy by report", context, || {
        healthy_condition(&mesh, &entry)
            .is_some_and(|(s, m)| s == "False" && m.contains("maintenance"))
            && vm.ports.endpoints(cluster).is_empty()
    });
    assert_eq!(
        post_health(&ports, r#"{"healthy":true,"source":"operator"}"#),
        204
    );
    wait_until("healthy by report", context, || {
        vm.ports.endpoints(cluster) == [endpoint.clone()]
    });

    drop(listener);
    assert!(vm.agent.terminate(), "{}", vm.agent.log());
    assert!(cp.terminate(), "{}", cp.log());
}

type Switch = std::sync::Arc<std::sync::atomic::AtomicBool>;

/// An app whose `/health` answers 200 while `probe` is on and whose other
/// paths answer 200 while `traffic` is on (503 otherwise).
fn switchable_app(addr: SocketAddr) -> (Switch, Switch) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering};
    let probe = Switch::new(AtomicBool::new(true));
    let traffic = Switch::new(AtomicBool::new(true));
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let (p, t) = (probe.clone(), traffic.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let n = conn.read(&mut buf).unwrap_or(0);
            let health = buf[..n].starts_with(b"GET /health ");
            let ok = if health { &p } else { &t }.load(Ordering::Relaxed);
            let status = if ok {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (probe, traffic)
}

#[test]
fn the_filter_judges_the_app_from_inside_envoy_and_moves_the_vm_out_and_back() {
    use std::sync::atomic::Ordering;
    let mesh = Mesh::new();
    // The app's `api` port serves both the probe (/health) and a Service
    // of its own (product-vm-api), so real traffic reaches it through the
    // VM's inbound listener.
    let api_port = free_port();
    let app = mesh.ip(21, 1);
    let group = mesh.path("config/product-vm.yaml");
    let text = std::fs::read_to_string(&group).unwrap().replace(
        "    ports:\n",
        &format!("    ports:\n      api: {api_port}\n"),
    );
    let text = format!(
        "{text}  probe:\n    periodSeconds: 1\n    failureThreshold: 2\n    \
         httpGet: {{path: /health, port: {api_port}}}\n"
    );
    std::fs::write(&group, text).unwrap();
    std::fs::write(
        mesh.path("config/product-vm-api.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: product-vm-api, namespace: default}\n\
         spec:\n  selector: {app: product, tier: vm}\n  clusterIP: 10.96.88.40\n  \
         ports: [{name: http-api, port: 9090, targetPort: api}]\n",
    )
    .unwrap();
    let (healthy, serving) = switchable_app(SocketAddr::new(app, api_port));

    let mut cp = mesh.start_controlplane();
    let ports = Ports::new();
    let wasm = filter_wasm();
    let mut vm = mesh.start_vm_with(
        "vm-1",
        mesh.ip(20, 1),
        app,
        VM1_BLOCK,
        &ports,
        &[OsStr::new("--filter-wasm"), wasm.as_os_str()],
    );
    let entry = format!("product-vm-{}", mesh.ip(20, 1));
    let endpoint = format!("{}:{}", mesh.ip(20, 1), mesh.vm_port);
    let cluster = "outbound|9080||product-vm.default.svc.cluster.local";
    let context = || logs(&[&cp, &vm.agent]);

    wait_until("Healthy=True from the filter's probe", context, || {
        healthy_condition(&mesh, &entry).is_some_and(|(s, _)| s == "True")
            && vm.ports.endpoints(cluster) == [endpoint.clone()]
    });
    healthy.store(false, Ordering::Relaxed);
    wait_until("Healthy=False with the probe's status", context, || {
        healthy_condition(&mesh, &entry)
            .is_some_and(|(s, m)| s == "False" && m.contains("status 503"))
            && vm.ports.endpoints(cluster).is_empty()
    });
    healthy.store(true, Ordering::Relaxed);
    wait_until("healthy again", context, || {
        healthy_condition(&mesh, &entry).is_some_and(|(s, _)| s == "True")
            && vm.ports.endpoints(cluster) == [endpoint.clone()]
    });

    // Real traffic fails while the probe path is fine: the filter's
    // inbound half counts the 503s and the health service judges them.
    serving.store(false, Ordering::Relaxed);
    let api: SocketAddr = format!("127.{}.88.40:9090", mesh.net + VM1_BLOCK)
        .parse()
        .unwrap();
    wait_until("unhealthy from real traffic", context, || {
        for _ in 0..10 {
            let _ = try_get(
                "product-vm-api.default.svc.cluster.local",
                api,
                "/orders",
                &[],
            );
        }
        healthy_condition(&mesh, &entry)
            .is_some_and(|(s, m)| s == "False" && m.contains("requests failed"))
            && vm.ports.endpoints(cluster).is_empty()
    });
    // Out of the endpoints it gets no traffic; after the window it is tried
    // again, and now it serves.
    serving.store(true, Ordering::Relaxed);
    wait_until("back after the traffic window", context, || {
        healthy_condition(&mesh, &entry).is_some_and(|(s, _)| s == "True")
            && vm.ports.endpoints(cluster) == [endpoint.clone()]
    });
    assert!(vm.agent.terminate(), "{}", vm.agent.log());
    assert!(cp.terminate(), "{}", cp.log());
}

/// A WasmPlugin's path end to end: the control plane names the filter by
/// image (`oci://…` with its digest) and sends it over ECDS as istiod does;
/// the VM's agent pulls it from a real registry, checks it, caches it and
/// points Envoy at the cached file; Envoy labels requests with it. A push
/// naming the wrong digest is NACKed with the reason and Envoy keeps the
/// filter it runs; with the registry gone, a new Envoy gets the filter from
/// the cache.
#[test]
fn a_filter_image_reaches_envoy_through_the_agents_cache_and_a_bad_one_changes_nothing() {
    if skip_without_tools() {
        return;
    }
    const TAG: &str = "0.1.0";
    let mesh = Mesh::new();
    let images = mesh.path("images");
    build_filter_images(&filter_wasm(), &images, TAG);
    let registry_dir = mesh.path("registry");
    std::fs::create_dir_all(&registry_dir).unwrap();
    let mut registry = Registry::start(&registry_dir);
    registry.push(&images.join("oci"), TAG, "meshvm/filter");
    let digest = tagged_manifest(&images.join("oci"), TAG);
    let url = format!("oci://{}/meshvm/filter:{TAG}", registry.host);
    let serve_naming = |sha256: &str| {
        mesh.start_controlplane_with(&[
            OsStr::new("--filter-wasm"),
            OsStr::new(&url),
            OsStr::new("--filter-sha256"),
            OsStr::new(sha256),
        ])
    };
    let mut cp = serve_naming(&digest);
    let cache = mesh.path("vm-1/wasm");
    let wasm_args = [
        OsStr::new("--wasm-insecure-registry"),
        OsStr::new(&registry.host),
        OsStr::new("--wasm-cache-dir"),
        cache.as_os_str(),
    ];
    let ports = Ports::new();
    let mut vm = mesh.start_vm_with(
        "vm-1",
        mesh.ip(20, 1),
        mesh.ip(21, 1),
        VM1_BLOCK,
        &ports,
        &wasm_args,
    );
    let service = "product-vm.default.svc.cluster.local";
    let address: SocketAddr = format!("127.{}.88.20:9080", mesh.net + VM1_BLOCK)
        .parse()
        .unwrap();
    let spoofed = [("x-mesh-peer-identity", "spiffe://cluster.local/ns/x/sa/y")];
    let labelled = |what: &str, cp: &Process, agent: &Process| {
        wait_until(
            what,
            || logs(&[cp, agent]),
            || {
                try_get(service, address, "/whoami", &spoofed).is_ok_and(|a| {
                    a.headers.get("x-mesh-peer-identity").map(String::as_str) == Some(VM_IDENTITY)
                })
            },
        );
    };
    labelled("the VM answers through the pulled filter", &cp, &vm.agent);

    // Envoy runs the cached module: the file it loads is in the cache and
    // is the built filter.
    let admin = SocketAddr::from(([127, 0, 0, 1], ports.admin));
    let (_, dump) = http_get(admin, "/config_dump").unwrap();
    let cached = cache.join(format!(
        "{}/{}.wasm",
        sha256(format!("{}/meshvm/filter", registry.host).as_bytes()).trim_start_matches("sha256:"),
        digest.trim_start_matches("sha256:")
    ));
    assert!(
        dump.contains(&cached.display().to_string()) && !dump.contains("oci://"),
        "Envoy's ECDS config does not load {}",
        cached.display()
    );
    assert!(std::fs::read(&cached).unwrap() == std::fs::read(filter_wasm()).unwrap());
    assert!(vm.agent.log().contains("Wasm module fetched"));

    // The control plane now names a digest the image does not have: the
    // agent NACKs with the reason, Envoy never sees it and keeps labelling.
    cp.terminate();
    let wrong = sha256(b"not the image");
    cp = serve_naming(&wrong);
    let reason = format!("manifest digest is {digest}, but {wrong} was asked for");
    wait_until(
        "the control plane hears the NACK",
        || logs(&[&cp, &vm.agent]),
        || cp.log().contains("NACKed") && cp.log().contains(&reason),
    );
    assert!(vm.agent.log().contains("NACKing on Envoy's behalf"));
    for _ in 0..3 {
        let answer = get(service, address, "/whoami", &spoofed);
        assert_eq!(answer.headers["x-mesh-peer-identity"], VM_IDENTITY);
    }

    // The registry goes away; the control plane names the right digest
    // again; a new agent and Envoy get the filter from the cache.
    registry.process.kill();
    cp.terminate();
    cp = serve_naming(&digest);
    assert!(vm.agent.terminate(), "{}", vm.agent.log());
    vm.agent = mesh.start_vm_agent("vm-1", vm.app.addr().ip(), VM1_BLOCK, &ports, &wasm_args);
    labelled(
        "the restarted VM answers through the cached filter",
        &cp,
        &vm.agent,
    );
    assert!(
        !vm.agent.log().contains("Wasm module fetched"),
        "{}",
        vm.agent.log()
    );
    assert!(
        vm.agent
            .log()
            .contains("Wasm filter loads the cached module")
    );
}
