//! Runs Envoy and keeps it running.
//!
//! Istio's agent runs Envoy once and exits with it, leaving restarts to
//! systemd (`Restart=always`, 10 s), which also restarts the agent and drops
//! its xDS and SDS state. Here the agent restarts Envoy itself, with capped
//! exponential backoff and jitter (a crash-looping Envoy does not spin, and a
//! fleet does not restart in step), and forgets past failures once an Envoy
//! has stayed up for a while.
//!
//! Envoy never outlives the agent: the child is killed when the
//! [`Supervisor`] is dropped, and the kernel kills it if the agent dies
//! without cleaning up (`PR_SET_PDEATHSIG`). It runs in its own process group
//! so that a terminal's Ctrl-C reaches only the agent, which then stops
//! Envoy gracefully: [`Supervisor::shutdown`] drains the listeners through
//! the admin API, waits the termination drain time, sends SIGTERM, and
//! SIGKILL if Envoy has not exited after a timeout.
//!
//! Envoy's log lines become the agent's `tracing` events (target `envoy`),
//! and its state (process id, admin address, restart count) is published on
//! a [`watch`] channel for the agent's health endpoint and for tests.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Level;

use super::admin;
use super::bootstrap::BootstrapOptions;
use super::log;
use crate::identity::random_jitter;
use crate::identity_manager::Backoff;

/// The file Envoy writes its admin address to, next to the bootstrap.
pub const ADMIN_ADDRESS_FILE: &str = "envoy-admin-address";

/// How often the supervisor looks for the admin address of a new Envoy.
const ADMIN_POLL: Duration = Duration::from_millis(100);
/// The timeout of one admin call.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run Envoy.
#[derive(Debug, Clone, PartialEq)]
pub struct SupervisorOptions {
    /// The Envoy binary; a bare name is looked up on `PATH`.
    pub binary: PathBuf,
    /// The bootstrap (`-c`).
    pub config_path: PathBuf,
    /// Where Envoy writes its admin address (`--admin-address-path`), which
    /// tells the supervisor the real port when the bootstrap says port 0.
    pub admin_address_path: PathBuf,
    /// `--drain-time-s`: how long a drain lasts inside Envoy.
    pub drain_time: Duration,
    /// `--parent-shutdown-time-s`.
    pub parent_shutdown_time: Duration,
    /// How long [`Supervisor::shutdown`] lets Envoy drain before SIGTERM.
    pub termination_drain: Duration,
    /// How long Envoy has to exit after SIGTERM before SIGKILL.
    pub terminate_timeout: Duration,
    /// Envoy's log level (`-l`).
    pub log_level: Level,
    /// `--component-log-level`, e.g. `misc:error,upstream:info`.
    pub component_log_level: Option<String>,
    /// `--concurrency`; `None` lets Envoy use one worker per CPU.
    pub concurrency: Option<u32>,
    /// `--local-address-ip-version v6` (a VM with only IPv6 addresses).
    pub ipv6: bool,
    /// Delays between restarts.
    pub restart_backoff: Backoff,
    /// After this long up, an exit counts as the first failure again.
    pub stable_after: Duration,
    /// More arguments, after the supervisor's own.
    pub extra_args: Vec<OsString>,
}

impl SupervisorOptions {
    /// `envoy` from `PATH` with the bootstrap at `config_path`, Istio's
    /// defaults (drain 45 s, termination drain 5 s, log level `warning`
    /// with `misc:error`), SIGKILL 10 s after SIGTERM, restarts after 1 s
    /// doubling to 30 s (± 20 %), forgotten after 60 s up.
    pub fn new(config_path: impl Into<PathBuf>) -> Self {
        let config_path = config_path.into();
        Self {
            binary: PathBuf::from("envoy"),
            admin_address_path: config_path.with_file_name(ADMIN_ADDRESS_FILE),
            config_path,
            drain_time: Duration::from_secs(45),
            parent_shutdown_time: Duration::from_secs(60),
            termination_drain: Duration::from_secs(5),
            terminate_timeout: Duration::from_secs(10),
            log_level: Level::WARN,
            component_log_level: Some("misc:error".into()),
            concurrency: None,
            ipv6: false,
            restart_backoff: Backoff {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(30),
                jitter: 0.2,
            },
            stable_after: Duration::from_secs(60),
            extra_args: Vec::new(),
        }
    }

    /// For the bootstrap [`BootstrapOptions`] describe: its path, its drain
    /// durations (also reported in `PROXY_CONFIG`) and address family.
    pub fn for_bootstrap(bootstrap: &BootstrapOptions) -> Self {
        Self {
            drain_time: bootstrap.drain_duration,
            termination_drain: bootstrap.termination_drain_duration,
            ipv6: bootstrap.addresses.all_ipv6(),
            ..Self::new(bootstrap.bootstrap_path())
        }
    }

    /// Envoy's command-line arguments.
    pub fn args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &str, b: &dyn AsRef<std::ffi::OsStr>| {
            args.push(a.into());
            args.push(b.as_ref().to_owned());
        };
        push("-c", &self.config_path);
        push("--drain-time-s", &self.drain_time.as_secs().to_string());
        // Clients are told to go away as soon as a drain starts (Istio's choice).
        push("--drain-strategy", &"immediate");
        push(
            "--parent-shutdown-time-s",
            &self.parent_shutdown_time.as_secs().to_string(),
        );
        push(
            "--local-address-ip-version",
            &if self.ipv6 { "v6" } else { "v4" },
        );
        push("--file-flush-interval-msec", &"1000");
        push("--log-format", &log::LOG_FORMAT);
        push("-l", &log::envoy_level(self.log_level));
        if let Some(components) = &self.component_log_level {
            push("--component-log-level", components);
        }
        push("--admin-address-path", &self.admin_address_path);
        if let Some(n) = self.concurrency {
            push("--concurrency", &n.to_string());
        }
        // Several Envoys (a restart while the old one is still exiting, or
        // tests) must not fight over hot-restart shared memory; the agent
        // restarts Envoy itself.
        args.push("--disable-hot-restart".into());
        args.push("--log-format-escaped".into());
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// What Envoy is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Started; the admin API has not answered yet.
    Starting,
    /// The admin API answers.
    Running,
    /// Exited or could not be started; waiting before the next start.
    Backoff,
    /// Being drained and stopped.
    Stopping,
    /// Stopped for good.
    Stopped,
}

/// The supervisor's published state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyStatus {
    pub phase: Phase,
    /// The running Envoy's process id.
    pub pid: Option<u32>,
    /// Its admin API, once it answers.
    pub admin: Option<SocketAddr>,
    /// Starts after the first one (each exit or failed start leads to one).
    pub restarts: u64,
    /// Consecutive exits and failed starts (the backoff step), updated at
    /// each one; an exit after [`SupervisorOptions::stable_after`] up counts
    /// as the first again.
    pub failures: u32,
    /// How the last Envoy ended, or why it could not start.
    pub last_exit: Option<String>,
}

impl EnvoyStatus {
    fn initial() -> Self {
        Self {
            phase: Phase::Starting,
            pid: None,
            admin: None,
            restarts: 0,
            failures: 0,
            last_exit: None,
        }
    }
}

/// Runs Envoy until [`Supervisor::shutdown`] (or drop, which kills it).
#[derive(Debug)]
pub struct Supervisor {
    status: watch::Receiver<EnvoyStatus>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts Envoy in the background. Must be called inside a Tokio runtime,
    /// on a thread that lives as long as Envoy should (a runtime thread):
    /// the kernel kills Envoy when the thread that started it exits.
    pub fn start(options: SupervisorOptions) -> Self {
        let (status_tx, status) = watch::channel(EnvoyStatus::initial());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(options, status_tx, stop_rx));
        Self {
            status,
            stop,
            task: Some(task),
        }
    }

    /// The current state.
    pub fn status(&self) -> EnvoyStatus {
        self.status.borrow().clone()
    }

    /// Every change of state.
    pub fn subscribe(&self) -> watch::Receiver<EnvoyStatus> {
        self.status.clone()
    }

    /// The running Envoy's admin API, once it answers.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.status.borrow().admin
    }

    /// Drains and stops Envoy, and stops restarting it. Returns when Envoy
    /// has exited.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
            && e.is_panic()
        {
            tracing::error!("the Envoy supervisor panicked: {e}");
        }
    }
}

impl Drop for Supervisor {
    /// Without a shutdown, Envoy is killed (the child is `kill_on_drop`).
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Completes when a stop is requested (or the [`Supervisor`] is gone).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    // The guard must not live across the caller's awaits.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Sleeps for `delay`; `true` if a stop was requested meanwhile.
async fn stopped_during(delay: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop_requested(stop) => true,
    }
}

async fn supervise(
    options: SupervisorOptions,
    status: watch::Sender<EnvoyStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    let mut starts: u64 = 0;
    loop {
        if *stop.borrow() {
            break;
        }
        starts += 1;
        // A stale address from the previous Envoy must not be taken for the
        // new one's.
        if let Err(e) = std::fs::remove_file(&options.admin_address_path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(
                path = %options.admin_address_path.display(),
                error = %e,
                "cannot remove the old admin address file"
            );
        }
        let restarts = starts - 1;
        status.send_modify(|s| {
            s.phase = Phase::Starting;
            s.pid = None;
            s.admin = None;
            s.restarts = restarts;
        });
        let (ended, uptime) = match spawn(&options) {
            Err(e) => (
                format!("cannot start `{}`: {e}", options.binary.display()),
                None,
            ),
            Ok(mut child) => {
                let started = Instant::now();
                match run_until_exit(&options, &mut child, &status, &mut stop).await {
                    Some(exit) => (exit, Some(started.elapsed())),
                    None => break,
                }
            }
        };
        if uptime.is_some_and(|up| up >= options.stable_after) {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let delay = options.restart_backoff.delay(failures, random_jitter());
        match uptime {
            None => tracing::error!(reason = %ended, retry_in = ?delay, "Envoy did not start"),
            Some(uptime) => {
                tracing::warn!(exit = %ended, uptime = ?uptime, restart_in = ?delay, "Envoy exited");
            }
        }
        status.send_modify(|s| {
            s.phase = Phase::Backoff;
            s.pid = None;
            s.admin = None;
            s.failures = failures;
            s.last_exit = Some(ended);
        });
        if stopped_during(delay, &mut stop).await {
            break;
        }
    }
    status.send_modify(|s| {
        s.phase = Phase::Stopped;
        s.pid = None;
        s.admin = None;
    });
}

/// Starts Envoy with its output piped to the log forwarders.
fn spawn(options: &SupervisorOptions) -> io::Result<Child> {
    let mut cmd = Command::new(&options.binary);
    cmd.args(options.args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let agent = std::process::id();
    // SAFETY: the closure runs in the child between fork and exec, and only
    // makes two system calls (no allocation, no locks).
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // The agent may have died before the line above took effect.
            if nix::unistd::getppid().as_raw() as u32 != agent {
                return Err(io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or_default();
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_logs(out, pid));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_logs(err, pid));
    }
    Ok(child)
}

/// Re-emits Envoy's output line by line until it closes.
async fn forward_logs(stream: impl AsyncRead + Unpin, pid: u32) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    let mut level = Level::INFO;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                level = log::emit(text.trim_end_matches(['\n', '\r']), level, pid);
            }
        }
    }
}

/// Watches a started Envoy: publishes its admin address once it answers,
/// and returns how it exited, or `None` after stopping it on request.
async fn run_until_exit(
    options: &SupervisorOptions,
    child: &mut Child,
    status: &watch::Sender<EnvoyStatus>,
    stop: &mut watch::Receiver<bool>,
) -> Option<String> {
    let pid = child.id().unwrap_or_default();
    tracing::info!(pid, binary = %options.binary.display(), "started Envoy");
    status.send_modify(|s| s.pid = Some(pid));
    let mut admin = None;
    let mut poll = tokio::time::interval(ADMIN_POLL);
    loop {
        tokio::select! {
            exit = child.wait() => return Some(describe(exit)),
            _ = stop_requested(stop) => {
                status.send_modify(|s| s.phase = Phase::Stopping);
                let admin = admin.or_else(|| read_admin_address(&options.admin_address_path));
                stop_envoy(options, child, pid, admin).await;
                return None;
            }
            _ = poll.tick(), if admin.is_none() => {
                if let Some(addr) = read_admin_address(&options.admin_address_path)
                    && admin::request(addr, "GET", "/ready", ADMIN_TIMEOUT).await.is_ok()
                {
                    admin = Some(addr);
                    tracing::info!(pid, admin = %addr, "Envoy's admin API answers");
                    status.send_modify(|s| {
                        s.phase = Phase::Running;
                        s.admin = Some(addr);
                    });
                }
            }
        }
    }
}

/// The address Envoy wrote, if it has written a whole one.
fn read_admin_address(path: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Drain, wait, SIGTERM, then SIGKILL.
async fn stop_envoy(
    options: &SupervisorOptions,
    child: &mut Child,
    pid: u32,
    admin: Option<SocketAddr>,
) {
    if let Some(addr) = admin {
        match admin::drain_listeners(addr, ADMIN_TIMEOUT).await {
            Ok(()) => {
                tracing::info!(pid, wait = ?options.termination_drain, "draining Envoy's listeners");
                tokio::select! {
                    exit = child.wait() => {
                        tracing::info!(pid, exit = %describe(exit), "Envoy exited while draining");
                        return;
                    }
                    _ = tokio::time::sleep(options.termination_drain) => {}
                }
            }
            Err(e) => tracing::warn!(pid, error = %e, "cannot drain Envoy; stopping it now"),
        }
    }
    // Signal only a child that has not been reaped: its pid cannot have
    // been reused.
    if let Ok(Some(exit)) = child.try_wait() {
        tracing::info!(pid, exit = %exit_description(exit), "Envoy had exited");
        return;
    }
    if let Err(e) = kill(Pid::from_raw(pid as i32), Signal::SIGTERM) {
        tracing::warn!(pid, error = %e, "cannot send SIGTERM to Envoy");
    }
    match tokio::time::timeout(options.terminate_timeout, child.wait()).await {
        Ok(exit) => tracing::info!(pid, exit = %describe(exit), "Envoy stopped"),
        Err(_) => {
            tracing::warn!(
                pid,
                timeout = ?options.terminate_timeout,
                "Envoy did not exit after SIGTERM; killing it"
            );
            if let Err(e) = child.kill().await {
                tracing::error!(pid, error = %e, "cannot kill Envoy");
            }
        }
    }
}

fn describe(exit: io::Result<ExitStatus>) -> String {
    match exit {
        Ok(status) => exit_description(status),
        Err(e) => format!("unknown ({e})"),
    }
}

/// `exit status: 1`, `signal: 9 (SIGKILL)`.
fn exit_description(status: ExitStatus) -> String {
    status.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let mut o = SupervisorOptions::new("/run/meshvm/envoy-rev.json");
        o.concurrency = Some(2);
        o.extra_args = vec!["--base-id".into(), "7".into()];
        let args: Vec<String> = o
            .args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "-c",
                "/run/meshvm/envoy-rev.json",
                "--drain-time-s",
                "45",
                "--drain-strategy",
                "immediate",
                "--parent-shutdown-time-s",
                "60",
                "--local-address-ip-version",
                "v4",
                "--file-flush-interval-msec",
                "1000",
                "--log-format",
                "[%l][%n] %v",
                "-l",
                "warning",
                "--component-log-level",
                "misc:error",
                "--admin-address-path",
                "/run/meshvm/envoy-admin-address",
                "--concurrency",
                "2",
                "--disable-hot-restart",
                "--log-format-escaped",
                "--base-id",
                "7",
            ]
        );
    }

    #[test]
    fn exits_are_described() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(
            exit_description(ExitStatus::from_raw(9)),
            "signal: 9 (SIGKILL)"
        );
        assert_eq!(
            exit_description(ExitStatus::from_raw(1 << 8)),
            "exit status: 1"
        );
    }
}
