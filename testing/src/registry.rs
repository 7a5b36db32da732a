//! A real OCI registry for tests: Debian's `docker-registry` on a loopback
//! port of its own (no auth), images pushed and inspected with `skopeo`, and
//! hand-made OCI image layouts for the images a test needs (broken ones
//! included), built from media types and bytes.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::envoy::http_get;
use crate::process::{Process, free_port, wait_until};

/// `sha256:<hex>` of `data`.
pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

/// Whether `name` is an executable on PATH.
pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// The registry tools missing here (`skopeo`, `docker-registry`); a test
/// that needs them says it is skipped when any is (`.ci/run` installs
/// them).
pub fn missing_tools() -> Vec<&'static str> {
    ["skopeo", "docker-registry"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .collect()
}

/// Whether a test needing the registry tools must be skipped; says so on
/// stderr when it must.
pub fn skip_without_tools() -> bool {
    let missing = missing_tools();
    if !missing.is_empty() {
        eprintln!(
            "skipped: {} not installed (.ci/run installs them)",
            missing.join(", ")
        );
    }
    !missing.is_empty()
}

/// Runs skopeo (without a signature policy: these images are unsigned);
/// returns its stdout, panicking with its stderr on failure.
pub fn skopeo(args: &[&str]) -> Vec<u8> {
    let output = Command::new("skopeo")
        .arg("--insecure-policy")
        .args(args)
        .output()
        .expect("running skopeo");
    assert!(
        output.status.success(),
        "skopeo {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// A running `docker-registry`.
pub struct Registry {
    pub process: Process,
    /// `127.0.0.1:<port>`.
    pub host: String,
}

impl Registry {
    /// Starts one storing into `dir`, on a free port, and waits for `/v2/`.
    pub fn start(dir: &Path) -> Registry {
        Self::start_on(dir, free_port())
    }

    /// The same on `port` (to bring a stopped registry back).
    pub fn start_on(dir: &Path, port: u16) -> Registry {
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let mut command = Command::new("docker-registry");
        command.arg("serve").arg(&config);
        let process = Process::spawn("docker-registry", command);
        let addr = ([127, 0, 0, 1], port).into();
        wait_until(
            "the registry's /v2/",
            || process.log(),
            || matches!(http_get(addr, "/v2/"), Ok((200, _))),
        );
        Registry {
            process,
            host: format!("127.0.0.1:{port}"),
        }
    }

    /// Pushes the image tagged `tag` of the OCI layout `layout` to
    /// `<registry>/<repo>:<tag>`; returns `docker://<registry>/<repo>:<tag>`.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) -> String {
        let dest = format!("docker://{}/{repo}:{tag}", self.host);
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:{tag}", layout.display()),
            &dest,
        ]);
        dest
    }
}

/// Writes an OCI image layout at `dir` holding one image tagged `tag`: a
/// config blob of `config_type` and the given `(media type, bytes)`
/// layers, with `annotations` on the manifest. Returns the manifest digest.
pub fn write_layout(
    dir: &Path,
    tag: &str,
    config_type: &str,
    config: &[u8],
    layers: &[(&str, &[u8])],
    annotations: &[(&str, &str)],
) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> Value {
        let digest = sha256(data);
        std::fs::write(blobs.join(&digest["sha256:".len()..]), data).unwrap();
        json!({ "digest": digest, "size": data.len() })
    };
    let descriptor = |media_type: &str, data: &[u8]| {
        let mut d = put(data);
        d["mediaType"] = json!(media_type);
        d
    };
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor(config_type, config),
        "layers": layers.iter().map(|(t, d)| descriptor(t, d)).collect::<Vec<_>>(),
    });
    if !annotations.is_empty() {
        manifest["annotations"] = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    entry["annotations"] = json!({ "org.opencontainers.image.ref.name": tag });
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({ "schemaVersion": 2, "manifests": [entry] })).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    sha256(&manifest)
}

/// The `oci` variant's media types (Istio's Wasm config and content layer).
pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";

/// An `oci`-variant image of `module` (whatever its bytes) at `dir`;
/// returns the manifest digest.
pub fn write_wasm_image(dir: &Path, tag: &str, layer_type: &str, module: &[u8]) -> String {
    let config = br#"{"type":"envoy_proxy","abiVersions":["v0.2.1"]}"#;
    write_layout(dir, tag, WASM_CONFIG, config, &[(layer_type, module)], &[])
}

/// Builds the filter's images with `scripts/oci_image.py` (what `make oci`
/// runs) into `out` (`out/compat`, `out/oci`), tagged `tag`; returns the
/// builder's stdout.
pub fn build_filter_images(wasm: &Path, out: &Path, tag: &str) -> String {
    let builder = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/oci_image.py");
    let output = Command::new("python3")
        .arg(builder)
        .arg("--tag")
        .arg(tag)
        .arg(wasm)
        .arg(out)
        .output()
        .expect("running python3");
    assert!(
        output.status.success(),
        "oci_image.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The digest of the manifest that `tag` names in a layout's index.json.
pub fn tagged_manifest(layout: &Path, tag: &str) -> String {
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    let entry = manifests
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no manifest tagged {tag} in {index}"));
    entry["digest"].as_str().unwrap().to_string()
}
