#!/usr/bin/env python3
"""Package meshvm_filter.wasm as OCI images that Istio's WasmPlugin can pull.

No container engine is needed: an OCI image layout is only JSON and blobs
named by their sha256, so this script writes it by hand (standard library
only). Two variants are written, because registries and tools differ in what
they accept (solo-io/wasm spec, Istio's pkg/wasm image fetcher):

  compat  an ordinary image: one tar+gzip layer holding `plugin.wasm`, a
          plain image config, and the manifest annotation
          `module.wasm.image/variant: compat`. Any registry stores it;
          Istio's recommended format.
  oci     the Wasm artifact format: config
          `application/vnd.module.wasm.config.v1+json` (runtime type, ABI
          versions, root ids) and the raw module as the single layer
          `application/vnd.module.wasm.content.layer.v1+wasm`.

Output, under OUT: a layout directory per variant (`compat/`, `oci/`, each
with `oci-layout`, `index.json` naming the tag, `blobs/sha256/`) and a tarball
of each (`meshvm-filter-<variant>.tar`, which `skopeo` reads as
`oci-archive:`). The manifest digests are printed last; Istio checks a pulled
image against the manifest digest (WasmPlugin `sha256`), not the module's.

The build is reproducible: the same module and metadata give the same bytes.
Times come from --created (default SOURCE_DATE_EPOCH, else the last commit's
time), tar entries have fixed owners and modes, gzip stores no name or time,
and JSON keys are sorted. Nothing is written unless the input is a Wasm
module.
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

WASM_MAGIC = b"\0asm\x01\0\0\0"

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
TAR_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"

# The proxy-wasm ABI the filter is built against (proxy-wasm crate 0.2.x).
ABI_VERSION = "v0.2.1"
# The filter's root contexts: the HTTP filter and the singleton health service.
ROOT_IDS = ["meshvm", "meshvm-health"]

VARIANTS = ("compat", "oci")


class BuildError(Exception):
    """Bad input; reported as one line and exit status 1."""


def canonical_json(value):
    """Sorted keys, no whitespace: equal documents are equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Layout:
    """An OCI image layout being written: blobs, then index.json."""

    def __init__(self, root):
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))

    def blob(self, media_type, data, annotations=None):
        """Stores `data`; returns its descriptor."""
        d = digest(data)
        (self.root / "blobs" / "sha256" / d.split(":", 1)[1]).write_bytes(data)
        descriptor = {"mediaType": media_type, "digest": d, "size": len(data)}
        if annotations:
            descriptor["annotations"] = annotations
        return descriptor

    def finish(self, manifest, tag):
        """Stores the manifest and tags it in index.json; returns its digest."""
        descriptor = self.blob(MANIFEST, canonical_json(manifest))
        descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [descriptor]}
        (self.root / "index.json").write_bytes(canonical_json(index))
        return descriptor["digest"]


def tar_entry(name, size, mtime, mode=0o644, kind=tarfile.REGTYPE):
    """A tar header with nothing taken from the machine (owner, time, mode)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = mode
    info.type = kind
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def plugin_layer(wasm, mtime):
    """The compat layer: `plugin.wasm` in a tar, gzipped without name or time.

    Returns (compressed, uncompressed): the config's diff_id is the digest of
    the uncompressed tar.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(tar_entry("plugin.wasm", len(wasm), mtime), io.BytesIO(wasm))
    compressed = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return compressed.getvalue(), raw.getvalue()


def build_compat(layout, wasm, meta):
    layer, diff = plugin_layer(wasm, meta["epoch"])
    config = {
        "architecture": "wasm",
        "os": "wasip1",
        "created": meta["created"],
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(diff)]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": layout.blob(IMAGE_CONFIG, canonical_json(config)),
        "layers": [layout.blob(TAR_GZIP_LAYER, layer)],
        "annotations": {**meta["annotations"], "module.wasm.image/variant": "compat"},
    }
    return layout.finish(manifest, meta["tag"])


def build_oci(layout, wasm, meta):
    config = {
        "type": "envoy_proxy",
        "abiVersions": [ABI_VERSION],
        "config": {"rootIds": ROOT_IDS},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": layout.blob(
            WASM_CONFIG,
            canonical_json(config),
            {"org.opencontainers.image.title": "runtime-config.json"},
        ),
        "layers": [layout.blob(WASM_LAYER, wasm, {"org.opencontainers.image.title": "filter.wasm"})],
        "annotations": {
            **meta["annotations"],
            "module.wasm.runtime/type": "envoy_proxy",
            "module.wasm.runtime/abi_version": ABI_VERSION,
        },
    }
    return layout.finish(manifest, meta["tag"])


def write_tarball(layout_dir, path, mtime):
    """The layout as an uncompressed tar, entries sorted, owners and times fixed."""
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for entry in sorted(p for p in layout_dir.rglob("*")):
            name = entry.relative_to(layout_dir).as_posix()
            if entry.is_dir():
                tar.addfile(tar_entry(name, 0, mtime, 0o755, tarfile.DIRTYPE))
            else:
                data = entry.read_bytes()
                tar.addfile(tar_entry(name, len(data), mtime), io.BytesIO(data))


def git(*args):
    """A git answer about this checkout, or None outside one (e.g. a source tarball)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out or None


def default_epoch():
    """SOURCE_DATE_EPOCH (the reproducible-builds convention), else the last commit's time."""
    value = os.environ.get("SOURCE_DATE_EPOCH") or git("log", "-1", "--format=%ct") or "0"
    return int(value)


def cargo_metadata():
    """Version, licence and source from the workspace; the filter's description."""
    workspace = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["package"]
    filter_pkg = tomllib.loads((REPO / "filter" / "Cargo.toml").read_text())["package"]
    return {
        "version": workspace["version"],
        "licenses": workspace["license"],
        "source": workspace["repository"],
        "description": filter_pkg["description"],
    }


def read_module(path):
    try:
        wasm = path.read_bytes()
    except OSError as e:
        raise BuildError(f"cannot read {path}: {e.strerror}") from None
    # The same check Istio's fetcher makes before handing the file to Envoy.
    if not wasm.startswith(WASM_MAGIC):
        raise BuildError(f"{path} is not a WebAssembly module (no \\0asm version 1 header)")
    return wasm


def build(wasm_path, out, args):
    wasm = read_module(wasm_path)
    cargo = cargo_metadata()
    epoch = args.created if args.created is not None else default_epoch()
    created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    revision = args.revision if args.revision is not None else git("rev-parse", "HEAD")
    annotations = {
        "org.opencontainers.image.title": "meshvm-filter",
        "org.opencontainers.image.description": cargo["description"],
        "org.opencontainers.image.source": cargo["source"],
        "org.opencontainers.image.version": cargo["version"],
        "org.opencontainers.image.licenses": cargo["licenses"],
        "org.opencontainers.image.created": created,
    }
    if revision:
        annotations["org.opencontainers.image.revision"] = revision
    meta = {
        "annotations": annotations,
        "created": created,
        "epoch": epoch,
        "tag": args.tag or cargo["version"],
    }

    out.mkdir(parents=True, exist_ok=True)
    # Written beside the output and moved into place, so an interrupted build
    # leaves the previous images whole.
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as scratch:
        scratch = Path(scratch)
        digests = {}
        for variant, builder in (("compat", build_compat), ("oci", build_oci)):
            layout_dir = scratch / variant
            digests[variant] = builder(Layout(layout_dir), wasm, meta)
            write_tarball(layout_dir, scratch / f"meshvm-filter-{variant}.tar", epoch)
        for variant in VARIANTS:
            shutil.rmtree(out / variant, ignore_errors=True)
            (scratch / variant).rename(out / variant)
            tarball = f"meshvm-filter-{variant}.tar"
            (scratch / tarball).replace(out / tarball)
    return meta["tag"], digests


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wasm", type=Path, help="the filter module (meshvm_filter.wasm)")
    parser.add_argument("out", type=Path, help="directory for the layouts and tarballs")
    parser.add_argument("--tag", help="tag in index.json (default: the crate version)")
    parser.add_argument(
        "--created",
        type=int,
        help="image time, seconds since the epoch (default: SOURCE_DATE_EPOCH, else the last commit's time)",
    )
    parser.add_argument(
        "--revision", help="org.opencontainers.image.revision (default: the checkout's commit)"
    )
    args = parser.parse_args()
    try:
        tag, digests = build(args.wasm, args.out, args)
    except BuildError as e:
        print(f"oci_image: {e}", file=sys.stderr)
        return 1
    for variant in VARIANTS:
        print(f"{variant}: {args.out / variant}:{tag} {digests[variant]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
