//! Registration through real processes: `meshvm-controlplane serve` (CA and
//! ADS on one TLS port, the testdata mesh as config), a VM onboarded with
//! `meshvm-controlplane onboard --autoregister`, and `meshvm-agent run` with
//! a real Envoy whose ADS stream goes through the agent. The WorkloadEntry is
//! read back with `meshvm-controlplane get workloadentries -o json`, as an
//! operator would.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use std::net::SocketAddr;

mod common;

use common::{controlplane, copy_testdata_config, onboard_autoregistered, serve};
use meshvm_testing::envoy::http_get;
use meshvm_testing::process::{Process, cargo_bin, free_port, signal, wait_until};
use serde_json::Value;

const ENTRY: &str = "ratings-vm-127.0.0.1-vm-network";
/// Short, so the tests see deletions; restarts below stay well within it.
const GRACE: Duration = Duration::from_secs(4);

struct Mesh {
    dir: tempfile::TempDir,
    port: u16,
}

impl Mesh {
    /// The testdata mesh in a config dir, and a VM's onboarding files for
    /// the `ratings-vm` group (address 127.0.0.1, auto-registration).
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = copy_testdata_config("controlplane/mesh", dir.path(), |text| text);
        let port = free_port();
        onboard_autoregistered(
            &config.join("ratings-vm.yaml"),
            &dir.path().join("vm"),
            &dir.path().join("ca"),
            "127.0.0.1",
            &format!("localhost:{port}"),
        );
        Self { dir, port }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start_controlplane(&self) -> Process {
        serve(self.dir.path(), self.port, GRACE, &[])
    }

    fn start_agent(&self, env: &[(&str, &str)]) -> Process {
        let mut command = Command::new(cargo_bin("meshvm-agent"));
        command
            .arg("--onboarding-dir")
            .arg(self.path("vm"))
            .arg("run")
            .arg("--state-dir")
            .arg(self.path("certs"))
            .arg("--run-dir")
            .arg(self.path("run"))
            .arg("--sds-socket")
            .arg(self.path("run/sds.sock"))
            .args(["--envoy-admin-port", "0"])
            .args(["--envoy-status-port", "0"])
            .args(["--envoy-prometheus-port", "0"])
            .args(["--status-listen", "127.0.0.1:0"])
            .args(["--dns-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info");
        for (k, v) in env {
            command.env(k, v);
        }
        Process::spawn("meshvm-agent", command)
    }

    /// The WorkloadEntries of vm-ns, as `get workloadentries -o json` shows.
    fn entries(&self) -> Vec<Value> {
        let out = controlplane()
            .args(["get", "workloadentries", "-n", "vm-ns", "-o", "json"])
            .arg("--state-dir")
            .arg(self.path("state"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    }

    fn entry(&self) -> Option<Value> {
        self.entries()
            .into_iter()
            .find(|e| e["metadata"]["name"] == ENTRY)
    }

    fn wait_for_entry(&self, logs: &[&Process]) -> Value {
        let context = || {
            logs.iter()
                .map(|p| p.log())
                .collect::<Vec<_>>()
                .join("\n---\n")
        };
        wait_until("the WorkloadEntry", context, || self.entry().is_some());
        self.entry().unwrap()
    }

    /// The entry is there and connected.
    fn assert_connected(&self) -> Value {
        let entry = self.entry().expect("the WorkloadEntry exists");
        let annotations = &entry["metadata"]["annotations"];
        assert!(annotations["istio.io/connectedAt"].is_string(), "{entry:#}");
        assert!(
            annotations["istio.io/disconnectedAt"].is_null(),
            "{entry:#}"
        );
        entry
    }
}

/// Watches the entry from another thread and reports whether it was ever
/// missing while `during` ran (a panic in `during` still stops the watcher).
fn never_missing(mesh: &Mesh, during: impl FnOnce()) -> bool {
    use std::sync::atomic::{AtomicBool, Ordering};
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut seen_missing = false;
            while !stop.load(Ordering::Relaxed) {
                seen_missing |= mesh.entry().is_none();
                std::thread::sleep(Duration::from_millis(100));
            }
            seen_missing
        });
        {
            let _stop = StopOnDrop(&stop);
            during();
        }
        !watcher.join().unwrap()
    })
}

#[test]
fn a_vm_registers_survives_restarts_of_envoy_and_the_control_plane_and_leaves() {
    let mesh = Mesh::new();
    // A malformed manifest next to the good ones: reported, the rest served.
    std::fs::write(
        mesh.path("config/broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken}\nspec: {ports: [{port: http}]}\n",
    )
    .unwrap();
    let mut cp = mesh.start_controlplane();
    cp.wait_for_log("broken.yaml", 1);
    let mut agent = mesh.start_agent(&[]);

    // Registered, as istiod would have it.
    let entry = mesh.wait_for_entry(&[&agent, &cp]);
    let meta = &entry["metadata"];
    assert_eq!(entry["apiVersion"], "networking.istio.io/v1");
    assert_eq!(entry["kind"], "WorkloadEntry");
    assert_eq!(meta["namespace"], "vm-ns");
    assert_eq!(meta["labels"]["app"], "ratings");
    assert_eq!(meta["labels"]["version"], "v2");
    assert_eq!(
        meta["annotations"]["istio.io/autoRegistrationGroup"],
        "ratings-vm"
    );
    assert_eq!(
        meta["annotations"]["proxy.istio.io/health-checks-enabled"],
        "true"
    );
    assert!(meta["annotations"]["istio.io/workloadController"].is_string());
    assert!(meta["annotations"]["istio.io/connectedAt"].is_string());
    let owner = &meta["ownerReferences"][0];
    assert_eq!(owner["kind"], "WorkloadGroup");
    assert_eq!(owner["name"], "ratings-vm");
    assert_eq!(owner["controller"], true);
    assert_eq!(entry["spec"]["address"], "127.0.0.1");
    assert_eq!(entry["spec"]["network"], "vm-network");
    assert_eq!(entry["spec"]["serviceAccount"], "ratings-sa");

    // The agent holds the NameTable (the Services of the config dir).
    agent.wait_for_log("xDS proxy: NameTable received", 1);
    assert!(agent.log().contains("hosts=2"), "{}", agent.log());

    // Ready, asked through Envoy's status listener, which forwards to the
    // agent; the agent's metrics say why.
    let status_port = envoy_listener_port(&mesh, "0.0.0.0_status");
    let envoy_status = SocketAddr::from(([127, 0, 0, 1], status_port));
    wait_until(
        "/healthz/ready through Envoy",
        || {
            format!(
                "{:?}\n{}",
                http_get(envoy_status, "/healthz/ready"),
                agent.log()
            )
        },
        || matches!(http_get(envoy_status, "/healthz/ready"), Ok((200, body)) if body == "ready\n"),
    );
    let metrics = http_get(agent_status_address(&agent), "/metrics")
        .unwrap()
        .1;
    assert!(
        metrics.contains("\nmeshvm_agent_name_table_hosts 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nmeshvm_agent_xds_upstream_streams 1\n"),
        "{metrics}"
    );

    // Envoy killed: the agent starts a new one; the entry stays.
    let pid = envoy_pid(&agent);
    let kept = never_missing(&mesh, || {
        signal(pid, "KILL");
        agent.wait_for_log("started Envoy", 2);
        agent.wait_for_log("xDS proxy: upstream stream open", 2);
        std::thread::sleep(GRACE + Duration::from_secs(1));
    });
    assert!(kept, "the entry disappeared while Envoy restarted");
    mesh.assert_connected();

    // The control plane restarts mid-stream: the agent reconnects and the
    // entry survives.
    let opened = agent.count("xDS proxy: upstream stream open");
    let kept = never_missing(&mesh, || {
        assert!(cp.terminate(), "{}", cp.log());
        cp = mesh.start_controlplane();
        agent.wait_for_log("xDS proxy: upstream stream open", opened + 1);
        std::thread::sleep(GRACE + Duration::from_secs(1));
    });
    assert!(
        kept,
        "the entry disappeared while the control plane restarted"
    );
    mesh.assert_connected();
    assert!(agent.is_running());

    // The agent stops: the entry is gone after the grace period.
    assert!(agent.terminate(), "{}", agent.log());
    wait_until(
        "the entry's deletion",
        || cp.log(),
        || mesh.entry().is_none(),
    );
    cp.wait_for_log("cleaned up auto-registered WorkloadEntry", 1);
}

#[test]
fn an_agent_restarted_within_the_grace_period_keeps_its_entry() {
    let mesh = Mesh::new();
    let cp = mesh.start_controlplane();
    let mut agent = mesh.start_agent(&[]);
    let first = mesh.wait_for_entry(&[&agent, &cp]);
    let connected_at = first["metadata"]["annotations"]["istio.io/connectedAt"].clone();
    let kept = never_missing(&mesh, || {
        assert!(agent.terminate());
        agent = mesh.start_agent(&[]);
        cp.wait_for_log("ADS: proxy connected", 2);
    });
    assert!(
        kept,
        "the entry disappeared across the restart:\n{}",
        cp.log()
    );
    let entry = mesh.assert_connected();
    assert_ne!(
        entry["metadata"]["annotations"]["istio.io/connectedAt"],
        connected_at
    );
    assert_eq!(cp.count("cleaned up auto-registered WorkloadEntry"), 0);
}

#[test]
fn an_unknown_group_is_refused_clearly_on_both_sides() {
    let mesh = Mesh::new();
    let cp = mesh.start_controlplane();
    let agent = mesh.start_agent(&[("ISTIO_META_AUTO_REGISTER_GROUP", "no-such-group")]);
    agent.wait_for_log("FailedPrecondition", 1);
    let line = agent
        .log()
        .lines()
        .find(|l| l.contains("FailedPrecondition"))
        .unwrap()
        .to_string();
    assert!(
        line.contains("the control plane refused the stream"),
        "{line}"
    );
    assert!(line.contains("no-such-group"), "{line}");
    cp.wait_for_log("ADS: stream refused", 1);
    assert!(
        cp.log()
            .lines()
            .any(|l| l.contains("ADS: stream refused") && l.contains("no-such-group")),
        "{}",
        cp.log()
    );
    assert!(mesh.entries().is_empty());
}

/// The port of the agent's Envoy's listener `name`, from Envoy's admin API.
fn envoy_listener_port(mesh: &Mesh, name: &str) -> u16 {
    let admin: SocketAddr = std::fs::read_to_string(mesh.path("run/envoy-admin-address"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (_, body) = http_get(admin, "/listeners?format=json").unwrap();
    let listeners: Value = serde_json::from_str(&body).unwrap();
    listeners["listener_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
        .unwrap_or_else(|| panic!("no listener {name}: {body}")) as u16
}

/// The agent's status server address, from its log.
fn agent_status_address(agent: &Process) -> SocketAddr {
    agent.wait_for_log("status server", 1);
    let log = agent.log();
    let line = log.lines().find(|l| l.contains("status server")).unwrap();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("status_address="))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line}"))
}

/// The Envoy the agent started last, from its log.
fn envoy_pid(agent: &Process) -> u32 {
    agent.wait_for_log("started Envoy", 1);
    let log = agent.log();
    let line = log.lines().rfind(|l| l.contains("started Envoy")).unwrap();
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line}"))
}
