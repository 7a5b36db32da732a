//! The filter as OCI images (`scripts/oci_image.py`, what `make oci` runs) on
//! the built `.wasm`: the build is reproducible, both variants carry the
//! media types and annotations Istio's WasmPlugin fetcher looks for, and a
//! real registry (Debian's `docker-registry`, pushed and pulled with
//! `skopeo`) hands back the very manifests and module bytes that were built.

use meshvm_testing::envoy::filter_wasm;
use meshvm_testing::registry::{Registry, sha256, skip_without_tools, skopeo, tagged_manifest};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BUILDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/oci_image.py");
const VARIANTS: [&str; 2] = ["compat", "oci"];
const TAG: &str = env!("CARGO_PKG_VERSION");

fn run_builder(wasm: &Path, out: &Path) -> Output {
    Command::new("python3")
        .arg(BUILDER)
        .arg(wasm)
        .arg(out)
        .output()
        .expect("running python3")
}

/// Builds both images into `out`; returns the builder's stdout.
fn build(wasm: &Path, out: &Path) -> String {
    let output = run_builder(wasm, out);
    assert!(
        output.status.success(),
        "oci_image.py failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A blob of an OCI layout, checked against the digest that names it.
fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let data = std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(
        sha256(&data),
        digest,
        "blob {digest} in {}",
        layout.display()
    );
    data
}

/// The module inside a compat layer (a tar.gz holding `plugin.wasm`),
/// unpacked by GNU tar rather than by the code that packed it.
fn plugin_wasm(layer: &[u8]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("layer.tar.gz");
    std::fs::write(&archive, layer).unwrap();
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "tar could not unpack the compat layer");
    std::fs::read(dir.path().join("plugin.wasm")).expect("plugin.wasm in the compat layer")
}

/// Checks a manifest and its config against the variant's format; returns
/// the module it carries (`layer` fetches a blob by digest).
fn check_image(
    variant: &str,
    manifest: &[u8],
    config: &[u8],
    layer: impl Fn(&str) -> Vec<u8>,
) -> Vec<u8> {
    let manifest: Value = serde_json::from_slice(manifest).unwrap();
    let config_json: Value = serde_json::from_slice(config).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(manifest["config"]["digest"], sha256(config));
    let annotations = &manifest["annotations"];
    assert_eq!(annotations["org.opencontainers.image.version"], TAG);
    assert_eq!(
        annotations["org.opencontainers.image.licenses"],
        "Apache-2.0"
    );
    assert_eq!(
        annotations["org.opencontainers.image.title"],
        "meshvm-filter"
    );
    for key in ["description", "source", "created"] {
        assert!(
            annotations[format!("org.opencontainers.image.{key}")].is_string(),
            "{variant}: no {key} annotation in {manifest}"
        );
    }
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{variant}: one layer in {manifest}");
    let layer_digest = layers[0]["digest"].as_str().unwrap();
    match variant {
        "compat" => {
            assert_eq!(annotations["module.wasm.image/variant"], "compat");
            assert_eq!(
                manifest["config"]["mediaType"],
                "application/vnd.oci.image.config.v1+json"
            );
            assert_eq!(
                layers[0]["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+gzip"
            );
            let data = layer(layer_digest);
            let wasm = plugin_wasm(&data);
            // The config names the uncompressed layer; gzip(1) unpacks it.
            let compressed = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(compressed.path(), &data).unwrap();
            let unzipped = Command::new("gzip")
                .arg("-dc")
                .arg(compressed.path())
                .output()
                .unwrap();
            assert!(
                unzipped.status.success(),
                "gzip could not unpack the compat layer"
            );
            assert_eq!(
                config_json["rootfs"]["diff_ids"][0],
                sha256(&unzipped.stdout)
            );
            wasm
        }
        "oci" => {
            assert_eq!(annotations["module.wasm.runtime/type"], "envoy_proxy");
            assert_eq!(annotations["module.wasm.runtime/abi_version"], "v0.2.1");
            assert_eq!(
                manifest["config"]["mediaType"],
                "application/vnd.module.wasm.config.v1+json"
            );
            assert_eq!(
                manifest["config"]["annotations"]["org.opencontainers.image.title"],
                "runtime-config.json"
            );
            assert_eq!(
                layers[0]["mediaType"],
                "application/vnd.module.wasm.content.layer.v1+wasm"
            );
            assert_eq!(
                layers[0]["annotations"]["org.opencontainers.image.title"],
                "filter.wasm"
            );
            assert_eq!(config_json["type"], "envoy_proxy");
            assert_eq!(config_json["abiVersions"], serde_json::json!(["v0.2.1"]));
            assert_eq!(
                config_json["config"]["rootIds"],
                serde_json::json!(["meshvm", "meshvm-health"])
            );
            layer(layer_digest)
        }
        other => unreachable!("variant {other}"),
    }
}

/// Checks a built layout's image against the variant's format and the
/// built module; returns its manifest digest.
fn check_layout(variant: &str, layout: &Path, wasm: &[u8]) -> String {
    let module = layout_module(variant, layout, TAG);
    assert!(
        module == wasm,
        "{variant}: the image's module is not the built .wasm"
    );
    tagged_manifest(layout, TAG)
}

/// The module of the image tagged `tag` in `layout`, checked against the
/// variant's format.
fn layout_module(variant: &str, layout: &Path, tag: &str) -> Vec<u8> {
    let manifest = blob(layout, &tagged_manifest(layout, tag));
    let parsed: Value = serde_json::from_slice(&manifest).unwrap();
    let config = blob(layout, parsed["config"]["digest"].as_str().unwrap());
    check_image(variant, &manifest, &config, |d| blob(layout, d))
}

#[test]
fn build_is_reproducible_and_follows_both_formats() {
    let wasm_path = filter_wasm();
    let wasm = std::fs::read(&wasm_path).unwrap();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let printed = build(&wasm_path, a.path());
    build(&wasm_path, b.path());

    for variant in VARIANTS {
        let digest = check_layout(variant, &a.path().join(variant), &wasm);
        assert_eq!(
            check_layout(variant, &b.path().join(variant), &wasm),
            digest,
            "{variant}: two builds of one .wasm, two manifests"
        );
        assert!(
            printed.contains(&digest),
            "the builder does not print the {variant} digest {digest}: {printed}"
        );
        let tarball = format!("meshvm-filter-{variant}.tar");
        assert!(
            std::fs::read(a.path().join(&tarball)).unwrap()
                == std::fs::read(b.path().join(&tarball)).unwrap(),
            "{tarball} differs between two builds"
        );
    }

    // A different module (an extra byte after a valid header is enough for
    // the builder) must give different images: the digests follow the input.
    let other = tempfile::tempdir().unwrap();
    let changed = other.path().join("changed.wasm");
    let mut bytes = wasm.clone();
    bytes.push(0);
    std::fs::write(&changed, &bytes).unwrap();
    build(&changed, &other.path().join("out"));
    for variant in VARIANTS {
        let out = other.path().join("out").join(variant);
        assert_ne!(
            check_layout(variant, &out, &bytes),
            tagged_manifest(&a.path().join(variant), TAG),
            "{variant}: a changed module kept its digest"
        );
    }
}

#[test]
fn bad_input_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let not_wasm = dir.path().join("filter.wasm");
    std::fs::write(&not_wasm, b"#!/bin/sh\necho not a module\n").unwrap();
    let missing = dir.path().join("missing.wasm");
    for (input, reason) in [
        (&not_wasm, "is not a WebAssembly module"),
        (&missing, "cannot read"),
    ] {
        let out = dir.path().join("out");
        let output = run_builder(input, &out);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{}: {stderr}",
            input.display()
        );
        assert!(stderr.contains(reason), "{}: {stderr}", input.display());
        assert!(!out.exists(), "{} written for bad input", out.display());
    }

    // Images already built survive a failed rebuild.
    let out = dir.path().join("built");
    build(&filter_wasm(), &out);
    let index = std::fs::read(out.join("oci/index.json")).unwrap();
    assert!(!run_builder(&not_wasm, &out).status.success());
    assert_eq!(std::fs::read(out.join("oci/index.json")).unwrap(), index);
}

#[test]
fn registry_round_trip() {
    if skip_without_tools() {
        return;
    }
    let wasm_path = filter_wasm();
    let wasm = std::fs::read(&wasm_path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let built = dir.path().join("built");
    build(&wasm_path, &built);
    let registry = Registry::start(dir.path());
    let host = &registry.host;

    for variant in VARIANTS {
        let layout = built.join(variant);
        let digest = tagged_manifest(&layout, TAG);
        let repo = format!("docker://{host}/meshvm/filter-{variant}");
        let tagged = format!("{repo}:{TAG}");
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:{TAG}", layout.display()),
            &tagged,
        ]);

        // The registry serves the manifest unchanged: the digest Istio
        // checks (WasmPlugin sha256) is the one the build printed.
        let manifest = skopeo(&["inspect", "--raw", "--tls-verify=false", &tagged]);
        assert_eq!(
            sha256(&manifest),
            digest,
            "{variant}: manifest changed on push"
        );
        let config = skopeo(&[
            "inspect",
            "--raw",
            "--config",
            "--tls-verify=false",
            &tagged,
        ]);
        check_image(variant, &manifest, &config, |d| blob(&layout, d));

        // Pulled back by tag and by digest into fresh layouts, the module
        // is the built .wasm byte for byte.
        for (source, name) in [
            (tagged.clone(), "by-tag"),
            (format!("{repo}@{digest}"), "by-digest"),
        ] {
            let pulled: PathBuf = dir.path().join(format!("{variant}-{name}"));
            skopeo(&[
                "copy",
                "--src-tls-verify=false",
                &source,
                &format!("oci:{}:pulled", pulled.display()),
            ]);
            assert_eq!(
                tagged_manifest(&pulled, "pulled"),
                digest,
                "{variant} {name}: another manifest came back"
            );
            let module = layout_module(variant, &pulled, "pulled");
            assert!(
                module == wasm,
                "{variant} {name}: the pulled module is not the built .wasm"
            );
        }
    }
}
