//! What the control plane's process tests share: the binary, and
//! `serve` on a directory laid out as `ca/`, `config/`, `state/`.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshvm_testing::process::Process;

/// `meshvm-controlplane`, as built for these tests.
pub fn controlplane() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshvm-controlplane"))
}

/// Starts `meshvm-controlplane serve` on `127.0.0.1:<port>` with the CA,
/// config and state directories under `dir`, and waits until it serves.
pub fn serve(dir: &Path, port: u16, grace: Duration, extra: &[&OsStr]) -> Process {
    let mut command = controlplane();
    command
        .arg("serve")
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--grace-period")
        .arg(format!("{}s", grace.as_secs()))
        .args(extra)
        .env("RUST_LOG", "info");
    let cp = Process::spawn("meshvm-controlplane", command);
    cp.wait_for_log("serving the CA and ADS over TLS", 1);
    cp
}

/// `meshvm-controlplane onboard --autoregister`: istioctl's files for a VM
/// of the WorkloadGroup in `group` at `ip`, written to `out`.
pub fn onboard_autoregistered(group: &Path, out: &Path, ca_dir: &Path, ip: &str, discovery: &str) {
    let output = controlplane()
        .args(["onboard", "-f"])
        .arg(group)
        .arg("-o")
        .arg(out)
        .arg("--ca-dir")
        .arg(ca_dir)
        .args(["--internal-ip", ip, "--autoregister"])
        .args(["--discovery-address", discovery])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Copies the manifests (`*.yaml`) of `testdata/<name>` into `<dir>/config`,
/// each passed through `edit`.
pub fn copy_testdata_config(name: &str, dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let config = dir.join("config");
    std::fs::create_dir_all(&config).unwrap();
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(name);
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(config.join(path.file_name().unwrap()), edit(text)).unwrap();
        }
    }
    config
}
