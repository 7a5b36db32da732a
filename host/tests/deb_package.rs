//! The Debian package (`make deb`): built by `scripts/build-deb.sh` from the
//! test build of the agent, inspected with dpkg-deb, its unit checked by
//! `systemd-analyze verify`, and installed, reinstalled, removed and purged
//! with dpkg in a throwaway root (never this host's dpkg database or users).

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_meshvm-agent");
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(command: &mut Command) -> String {
    String::from_utf8(run(command).stdout).expect("UTF-8 output")
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The package's inputs: the agent of this test build, stripped (a debug
/// build is hundreds of MB), and the real filter if `make wasm` built it,
/// else a minimal Wasm module.
fn inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let bin = dir.join("meshvm-agent");
    std::fs::copy(BIN, &bin).expect("copy the agent");
    if have("strip") {
        run(Command::new("strip").arg(&bin));
    }
    let wasm = match std::env::var_os("MESHVM_FILTER_WASM").map(PathBuf::from) {
        Some(path) if path.is_file() => path,
        _ => {
            let path = dir.join("meshvm_filter.wasm");
            std::fs::write(&path, b"\0asm\x01\0\0\0").unwrap();
            path
        }
    };
    (bin, wasm)
}

fn build_deb(bin: &Path, wasm: &Path, out: &Path) -> PathBuf {
    let printed = stdout(
        Command::new(repo().join("scripts/build-deb.sh"))
            .args([bin, wasm, out])
            .env("SOURCE_DATE_EPOCH", "1700000000"),
    );
    let deb = PathBuf::from(printed.trim());
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(
        deb,
        out.join(format!("meshvm-agent_{VERSION}_{}.deb", arch.trim()))
    );
    deb
}

/// `dpkg` on the throwaway root: its own database and log, maintainer
/// scripts run here with DPKG_ROOT set, dependencies (libc6, passwd) not
/// looked for in the empty database.
fn dpkg(root: &Path) -> Command {
    let mut command = Command::new("dpkg");
    command
        .arg(format!("--root={}", root.display()))
        .arg(format!("--log={}", root.join("dpkg.log").display()))
        .args(["--force-script-chrootless", "--force-depends"])
        // dpkg looks for ldconfig and start-stop-daemon on PATH.
        .env(
            "PATH",
            format!(
                "/usr/sbin:/sbin:{}",
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    command
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let path = path.as_ref();
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn deb_package() {
    if !have("dpkg-deb") {
        eprintln!("skipped: dpkg-deb is not installed (not a Debian system)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (bin, wasm) = inputs(tmp.path());
    let deb = build_deb(&bin, &wasm, &tmp.path().join("out"));

    // Reproducible: the same inputs give the same bytes.
    let again = build_deb(&bin, &wasm, &tmp.path().join("again"));
    assert!(read(&deb) == read(&again), "two builds differ");

    // Control fields.
    let field = |name: &str| {
        stdout(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(name))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "meshvm-agent");
    assert_eq!(field("Version"), VERSION);
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(field("Architecture"), arch.trim());
    assert!(field("Maintainer").contains('<'));
    let depends = field("Depends");
    assert!(depends.starts_with("libc6 (>= "), "{depends}");
    assert!(depends.contains("passwd"), "{depends}");
    assert!(field("Description").contains("Envoy 1.40"));
    let info = stdout(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(info.contains(script), "no {script} in\n{info}");
    }

    // Files, modes and owners.
    let listing = stdout(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let contents: BTreeMap<&str, (&str, &str)> = listing
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let path = fields[5].trim_start_matches('.');
            (path, (fields[0], fields[1]))
        })
        .collect();
    for (path, perms) in [
        ("/usr/bin/meshvm-agent", "-rwxr-xr-x"),
        ("/usr/share/meshvm/meshvm_filter.wasm", "-rw-r--r--"),
        ("/lib/systemd/system/meshvm-agent.service", "-rw-r--r--"),
        ("/etc/default/meshvm-agent", "-rw-r--r--"),
        ("/usr/share/doc/meshvm-agent/copyright", "-rw-r--r--"),
        ("/usr/share/doc/meshvm-agent/README", "-rw-r--r--"),
    ] {
        assert_eq!(
            contents.get(path),
            Some(&(perms, "root/root")),
            "{path} in\n{listing}"
        );
    }
    assert!(
        contents.values().all(|(_, owner)| *owner == "root/root"),
        "{listing}"
    );

    // The unit, as systemd reads it: inside the extracted tree, where
    // ExecStart's binary exists; the targets it names are the host's.
    let tree = tmp.path().join("tree");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree));
    let verify = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", tree.display()))
        .args(["--man=no", "--recursive-errors=no", "meshvm-agent.service"]));
    assert!(
        verify.stderr.is_empty(),
        "systemd-analyze warns:\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // The default MESHVM_ARGS are flags `run` accepts: without onboarding
    // files the agent fails on the first missing file, not on its usage.
    let defaults = String::from_utf8(read(tree.join("etc/default/meshvm-agent"))).unwrap();
    let args = defaults
        .lines()
        .find_map(|l| l.strip_prefix("MESHVM_ARGS="))
        .expect("MESHVM_ARGS in /etc/default/meshvm-agent")
        .trim_matches('"');
    let empty = tmp.path().join("no-onboarding");
    std::fs::create_dir(&empty).unwrap();
    let output = Command::new(tree.join("usr/bin/meshvm-agent"))
        .arg("run")
        .args(args.split_whitespace())
        .arg("--onboarding-dir")
        .arg(&empty)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cluster.env"), "{stderr}");

    install_remove_purge(&deb, tmp.path());
}

fn install_remove_purge(deb: &Path, tmp: &Path) {
    // /proc/self belongs to the effective user.
    let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if !is_root {
        eprintln!("skipped installing: dpkg --root needs root to set owners");
        return;
    }
    // A minimal root: dpkg's database, and the account files useradd and
    // groupadd --prefix edit.
    let root = tmp.join("root");
    for dir in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    for file in ["var/lib/dpkg/status", "var/lib/dpkg/available"] {
        std::fs::write(root.join(file), "").unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    for file in ["etc/shadow", "etc/gshadow"] {
        std::fs::write(root.join(file), "").unwrap();
    }
    let host_files = ["/var/lib/dpkg/status", "/etc/passwd", "/etc/group"];
    let host_before: Vec<Vec<u8>> = host_files.iter().map(read).collect();

    run(dpkg(&root).arg("-i").arg(deb));
    let status = stdout(dpkg(&root).args(["-s", "meshvm-agent"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    let version = stdout(Command::new(root.join("usr/bin/meshvm-agent")).arg("--version"));
    assert_eq!(version, format!("meshvm-agent {VERSION}\n"));

    // Istio's user, without a login shell, and its directories.
    let passwd = String::from_utf8(read(root.join("etc/passwd"))).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("istio-proxy:"))
        .unwrap_or_else(|| panic!("no istio-proxy in\n{passwd}"));
    let fields: Vec<&str> = user.split(':').collect();
    assert_eq!(fields[5..], ["/var/lib/istio", "/usr/sbin/nologin"]);
    let uid: u32 = fields[2].parse().unwrap();
    for (dir, dir_mode) in [
        ("etc/certs", 0o700),
        ("etc/istio/proxy", 0o755),
        ("etc/istio/config", 0o755),
        ("var/lib/istio/envoy", 0o755),
        ("var/lib/meshvm", 0o750),
        ("var/lib/istio/data", 0o750),
    ] {
        let path = root.join(dir);
        assert_eq!(mode(&path), dir_mode, "{dir}");
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), uid, "{dir}");
    }

    // Idempotent: installing again (an upgrade to the same version) changes
    // nothing.
    run(dpkg(&root).arg("-i").arg(deb));
    assert_eq!(read(root.join("etc/passwd")), passwd.as_bytes());

    // Remove keeps the configuration and data; purge removes what the agent
    // wrote and the emptied directories, and leaves the administrator's
    // files and the user.
    std::fs::write(root.join("etc/certs/key.pem"), "key").unwrap();
    std::fs::write(root.join("etc/certs/root-cert.pem"), "root").unwrap();
    std::fs::create_dir_all(root.join("var/lib/istio/data/0a1b")).unwrap();
    std::fs::write(root.join("var/lib/istio/data/0a1b/cafe.wasm"), "\0asm").unwrap();
    run(dpkg(&root).args(["-r", "meshvm-agent"]));
    assert!(!root.join("usr/bin/meshvm-agent").exists());
    assert!(root.join("etc/default/meshvm-agent").exists());
    assert!(root.join("var/lib/meshvm").is_dir());
    run(dpkg(&root).args(["-P", "meshvm-agent"]));
    assert!(!root.join("etc/default/meshvm-agent").exists());
    assert!(!root.join("var/lib/meshvm").exists());
    assert!(!root.join("etc/istio").exists());
    assert!(!root.join("var/lib/istio").exists());
    assert!(!root.join("etc/certs/key.pem").exists());
    assert!(root.join("etc/certs/root-cert.pem").exists());
    assert_eq!(read(root.join("etc/passwd")), passwd.as_bytes());

    let host_after: Vec<Vec<u8>> = host_files.iter().map(read).collect();
    assert!(
        host_before == host_after,
        "the host's dpkg database or users changed"
    );
}
