//! meshvm's own binaries as processes in tests: finding them, running them
//! with their log captured, waiting for what they say, stopping them.

use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Generous liveness bound for anything a test waits for; never a
/// performance expectation.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// A binary of this workspace (`meshvm-agent`, `meshvm-controlplane`) next
/// to the running test, in the same target directory and profile. Cargo
/// builds every package's binaries for `cargo test --workspace` (what
/// `make test` runs); a package's own binary is better found with
/// `env!("CARGO_BIN_EXE_<name>")`.
pub fn cargo_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    // <target>/<profile>/deps/<test> → <target>/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from <target>/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run the tests with `cargo test --workspace` (or `cargo build --bin {name}` first)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (for a server that must be restarted on the
/// same port; others should bind port 0 themselves).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `done` every 50 ms until it holds; panics after [`PATIENCE`] with
/// `what` and `context()`.
pub fn wait_until(what: &str, context: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process whose stderr (the log) is collected. Killed on drop.
pub struct Process {
    name: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Process {
    /// Starts `command` (stdin and stdout to /dev/null, stderr captured).
    pub fn spawn(name: &str, mut command: Command) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// How many log lines contain `text`.
    pub fn count(&self, text: &str) -> usize {
        self.log().lines().filter(|l| l.contains(text)).count()
    }

    /// Waits until `text` has been logged `n` times.
    pub fn wait_for_log(&self, text: &str, n: usize) {
        wait_until(
            &format!("{n} × {text:?} in {}'s log", self.name),
            || self.log(),
            || self.count(text) >= n,
        );
    }

    /// Still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().expect("wait").is_none())
    }

    /// SIGTERM, then waits for the exit; whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        signal(child.id(), "TERM");
        let ok = child.wait().expect("wait").success();
        // Let the log reader drain.
        std::thread::sleep(Duration::from_millis(100));
        ok
    }

    /// SIGKILL, then waits.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `SIG<name>` to `pid` with kill(1).
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}
