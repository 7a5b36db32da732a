//! `meshvm-agent pull-wasm` against a real registry (Debian's
//! `docker-registry`, images pushed with `skopeo`) and a real HTTP server:
//! the filter's images in both variants come back by tag and by digest as
//! the built `.wasm`, byte for byte, and are then served from the cache;
//! every bad image (wrong digest, not Wasm, a layer over the limit, a media
//! type Istio does not accept) is refused with an error naming the problem
//! and leaves nothing in the cache; with the registry down, cached modules
//! are still served and uncached ones fail clearly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use meshvm_testing::envoy::filter_wasm;
use meshvm_testing::process::{Process, free_port, wait_until};
use meshvm_testing::registry::{
    Registry, WASM_LAYER, build_filter_images, sha256, skip_without_tools, skopeo, tagged_manifest,
    write_wasm_image,
};
use serde_json::Value;

const TAG: &str = "0.1.0";

struct Cache {
    dir: PathBuf,
    registry: String,
}

impl Cache {
    fn pull_with(&self, url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_meshvm-agent"))
            .arg("pull-wasm")
            .arg(url)
            .arg("--wasm-cache-dir")
            .arg(&self.dir)
            .args(["--wasm-insecure-registry", &self.registry])
            .args(["--format", "json"])
            .args(args)
            .envs(env.iter().copied())
            .env("WASM_HTTP_REQUEST_TIMEOUT", "5s")
            .env("RUST_LOG", "info")
            .output()
            .expect("running meshvm-agent")
    }

    /// Pulls `url`; returns what the agent printed (path, digest, …).
    fn pull(&self, url: &str, args: &[&str]) -> Value {
        let out = self.pull_with(url, args, &[]);
        assert!(
            out.status.success(),
            "pull-wasm {url} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Pulls `url`, which must fail; returns the error output.
    fn refused(&self, url: &str, args: &[&str], env: &[(&str, &str)]) -> String {
        let before = self.modules();
        let out = self.pull_with(url, args, env);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "pull-wasm {url} succeeded: {stderr}");
        assert!(out.stdout.is_empty(), "{url}: printed a result");
        assert_eq!(self.modules(), before, "{url}: the cache changed");
        stderr
    }

    /// The modules the cache holds.
    fn modules(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for dir in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            for file in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if file.path().extension().is_some_and(|e| e == "wasm") {
                    out.push(file.path());
                }
            }
        }
        out.sort();
        out
    }
}

fn assert_module(pulled: &Value, wasm: &[u8], digest: &str, from_cache: bool) {
    let path = Path::new(pulled["path"].as_str().unwrap());
    assert!(
        std::fs::read(path).unwrap() == wasm,
        "{pulled}: not the built .wasm"
    );
    assert_eq!(pulled["digest"], digest, "{pulled}");
    assert_eq!(pulled["from_cache"], from_cache, "{pulled}");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions())
            & 0o777,
        0o600
    );
}

#[test]
fn images_are_pulled_verified_cached_and_served_offline() {
    if skip_without_tools() {
        return;
    }
    let wasm_path = filter_wasm();
    let wasm = std::fs::read(&wasm_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let built = dir.path().join("built");
    build_filter_images(&wasm_path, &built, TAG);
    let port = free_port();
    let registry_dir = dir.path().join("registry");
    std::fs::create_dir_all(&registry_dir).unwrap();
    let mut registry = Registry::start_on(&registry_dir, port);
    let host = registry.host.clone();
    let cache = Cache {
        dir: dir.path().join("cache"),
        registry: host.clone(),
    };

    // Both variants, by tag then by digest: the built module each time;
    // the second pull of an image comes from the cache.
    let mut digests = Vec::new();
    for variant in ["compat", "oci"] {
        let layout = built.join(variant);
        let digest = tagged_manifest(&layout, TAG);
        registry.push(&layout, TAG, &format!("meshvm/filter-{variant}"));
        let url = format!("oci://{host}/meshvm/filter-{variant}:{TAG}");
        assert_module(&cache.pull(&url, &[]), &wasm, &digest, false);
        assert_module(&cache.pull(&url, &[]), &wasm, &digest, true);
        let pinned = format!("oci://{host}/meshvm/filter-{variant}@{digest}");
        assert_module(&cache.pull(&pinned, &[]), &wasm, &digest, true);
        assert_module(
            &cache.pull(&url, &["--sha256", &digest]),
            &wasm,
            &digest,
            true,
        );
        digests.push((url, digest));
    }
    assert_eq!(cache.modules().len(), 2);

    // A digest that is not the image's.
    let (compat_url, compat_digest) = &digests[0];
    let (_, oci_digest) = &digests[1];
    let e = cache.refused(
        &format!("oci://{host}/meshvm/filter-compat:{TAG}"),
        &["--sha256", oci_digest, "--always"],
        &[],
    );
    assert!(
        e.contains(&format!(
            "manifest digest is {compat_digest}, but {oci_digest} was asked for"
        )),
        "{e}"
    );
    let e = cache.refused(
        &format!("oci://{host}/meshvm/filter-compat@{}", sha256(b"other")),
        &[],
        &[],
    );
    assert!(
        e.contains("the registry refused") && e.contains("manifest unknown"),
        "{e}"
    );

    // Images that are not Wasm filters Istio could load.
    let bad = |name: &str, layer_type: &str, content: &[u8]| {
        let layout = dir.path().join(name);
        write_wasm_image(&layout, TAG, layer_type, content);
        registry.push(&layout, TAG, &format!("bad/{name}"));
        format!("oci://{host}/bad/{name}:{TAG}")
    };
    let e = cache.refused(
        &bad("text", WASM_LAYER, b"<html>not a module</html>"),
        &[],
        &[],
    );
    assert!(
        e.contains("not a WebAssembly module") && e.contains("\\0asm"),
        "{e}"
    );
    let huge = {
        let mut m = wasm.clone();
        m.resize(3 << 20, 0);
        m
    };
    let e = cache.refused(
        &bad("huge", WASM_LAYER, &huge),
        &[],
        &[("ISTIO_WASM_MAX_BINARY_SIZE_BYTES", "1048576")],
    );
    assert!(e.contains("larger than the limit of 1048576 bytes"), "{e}");
    let e = cache.refused(
        &bad("oras", "application/vnd.wasm.content.layer.v1+wasm", &wasm),
        &[],
        &[],
    );
    assert!(
        e.contains("no layer of a type Istio accepts")
            && e.contains("application/vnd.wasm.content.layer.v1+wasm"),
        "{e}"
    );
    let e = cache.refused(&format!("oci://{host}/meshvm/absent:{TAG}"), &[], &[]);
    assert!(e.contains("the registry refused"), "{e}");

    // The registry goes away: cached modules are still served (by tag, by
    // digest, and when asked to pull again), uncached ones fail clearly.
    registry.process.kill();
    assert_module(&cache.pull(compat_url, &[]), &wasm, compat_digest, true);
    let offline = cache.pull_with(compat_url, &["--always"], &[]);
    assert!(offline.status.success());
    assert!(
        String::from_utf8_lossy(&offline.stderr).contains("using the cached Wasm module"),
        "{}",
        String::from_utf8_lossy(&offline.stderr)
    );
    let e = cache.refused(
        &format!("oci://{host}/meshvm/filter-compat:other"),
        &[],
        &[],
    );
    assert!(e.contains("cannot fetch"), "{e}");

    // Back again, a new tag of the same image is one more name for the
    // module already cached.
    let registry = Registry::start_on(&registry_dir, port);
    let repo = format!("docker://{}/meshvm/filter-compat", registry.host);
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("{repo}:{TAG}"),
        &format!("{repo}:v2"),
    ]);
    let again = cache.pull(&format!("oci://{host}/meshvm/filter-compat:v2"), &[]);
    assert_module(&again, &wasm, compat_digest, false);
    assert_eq!(cache.modules().len(), 2);
}

#[test]
fn files_over_http_are_checked_against_their_sha256() {
    let wasm_path = filter_wasm();
    let wasm = std::fs::read(&wasm_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::copy(&wasm_path, served.join("filter.wasm")).unwrap();
    std::fs::write(served.join("page.html"), b"<html>hello</html>").unwrap();
    let port = free_port();
    let mut command = Command::new("python3");
    command
        .args(["-m", "http.server", "--bind", "127.0.0.1"])
        .arg(port.to_string())
        .current_dir(&served);
    let server = Process::spawn("http.server", command);
    let addr = ([127, 0, 0, 1], port).into();
    wait_until(
        "python's http.server",
        || server.log(),
        || matches!(meshvm_testing::envoy::http_get(addr, "/"), Ok((200, _))),
    );
    let cache = Cache {
        dir: dir.path().join("cache"),
        registry: "none".into(),
    };
    let url = format!("http://127.0.0.1:{port}/filter.wasm");
    let digest = sha256(&wasm);
    assert_module(
        &cache.pull(&url, &["--sha256", &digest]),
        &wasm,
        &digest,
        false,
    );
    assert_module(
        &cache.pull(&url, &["--sha256", &digest]),
        &wasm,
        &digest,
        true,
    );
    let e = cache.refused(&url, &["--sha256", &sha256(b"x"), "--always"], &[]);
    assert!(e.contains("the file's digest is"), "{e}");
    let e = cache.refused(&format!("http://127.0.0.1:{port}/page.html"), &[], &[]);
    assert!(e.contains("not a WebAssembly module"), "{e}");
    let e = cache.refused(&format!("http://127.0.0.1:{port}/absent.wasm"), &[], &[]);
    assert!(e.contains("404"), "{e}");
}
