#!/usr/bin/env bash
# How long the agent takes to get a WasmPlugin's module: the meshvm filter's
# image (both variants) from a local registry (Debian's docker-registry on
# loopback) into the agent's cache with `meshvm-agent pull-wasm` (manifest,
# layer, digest checks, \0asm, atomic write), and from the cache alone
# (what every later ECDS push and every restart costs).
#
# Peer in the same run: `skopeo copy` of the same image from the same
# registry into an OCI layout (a standard client fetching the same bytes,
# without unpacking or verifying a Wasm module).
#
# Knobs (environment): RUNS=30 WARMUP=3 OUT=bench/results/wasm.md
# KEEP_TMP=1. Needs hyperfine, skopeo, docker-registry, python3, and a
# release build (made here with cargo) and the filter (make wasm).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNS=${RUNS:-30}
WARMUP=${WARMUP:-3}
OUT=${OUT:-$ROOT/bench/results/wasm.md}
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/meshvm/target}
WASM=${MESHVM_FILTER_WASM:-$TARGET_DIR/meshvm/meshvm_filter.wasm}

die() { echo "bench-wasm: $*" >&2; exit 1; }
for tool in hyperfine skopeo docker-registry python3; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
[ -f "$WASM" ] || die "$WASM not found (make wasm)"

echo "== building the release agent" >&2
CARGO_TARGET_DIR=$TARGET_DIR cargo build --quiet --release -p meshvm-agent
AGENT=$TARGET_DIR/release/meshvm-agent

T=$(mktemp -d)
REGISTRY_PID=
cleanup() {
  if [ -n "$REGISTRY_PID" ]; then kill "$REGISTRY_PID" 2>/dev/null; wait "$REGISTRY_PID" 2>/dev/null || true; fi
  if [ -n "${KEEP_TMP:-}" ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
REG=127.0.0.1:$PORT
printf 'version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
  "$T/storage" "$REG" >"$T/registry.yml"
docker-registry serve "$T/registry.yml" >"$T/registry.log" 2>&1 &
REGISTRY_PID=$!
for _ in $(seq 100); do
  curl -fs "http://$REG/v2/" >/dev/null && break
  sleep 0.1
done
python3 "$ROOT/scripts/oci_image.py" --tag bench "$WASM" "$T/images" >/dev/null
for variant in compat oci; do
  skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$T/images/$variant:bench" \
    "docker://$REG/meshvm/filter-$variant:bench"
done

pull() { # variant cache-dir
  echo "$AGENT pull-wasm oci://$REG/meshvm/filter-$1:bench --wasm-cache-dir $2 --wasm-insecure-registry $REG"
}
args=(--runs "$RUNS" --warmup "$WARMUP" --export-json "$T/times.json" --shell=none)
for variant in compat oci; do
  # Filled once, then only read: the cache-hit case.
  $(pull "$variant" "$T/warm-$variant") >/dev/null 2>&1
  args+=(
    --command-name "skopeo copy ($variant)" --prepare "rm -rf $T/skopeo-$variant"
    "skopeo --insecure-policy copy -q --src-tls-verify=false docker://$REG/meshvm/filter-$variant:bench oci:$T/skopeo-$variant:x"
    --command-name "agent pull, empty cache ($variant)" --prepare "rm -rf $T/cold-$variant"
    "$(pull "$variant" "$T/cold-$variant")"
    --command-name "agent pull, cached ($variant)" --prepare "true"
    "$(pull "$variant" "$T/warm-$variant")"
  )
done
echo "== timing (hyperfine, $RUNS runs each)" >&2
hyperfine "${args[@]}" >&2

python3 - "$T/times.json" "$OUT" "$(wc -c <"$WASM")" "$RUNS" <<'EOF'
import json, sys, platform, os
times, out, size, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
results = {r["command"]: r for r in json.load(open(times))["results"]}
def ms(name, key="median"):
    return results[name][key] * 1000
lines = [
    "# bench-wasm: the filter's image from a registry into the agent's cache",
    "",
    f"`make bench-wasm` ({runs} runs each, hyperfine medians; {os.cpu_count()} CPUs, {platform.machine()}).",
    f"Module: meshvm_filter.wasm, {size:,} bytes; registry: docker-registry on loopback.",
    "",
    "| variant | skopeo copy (peer) ms | agent pull, empty cache ms | agent / skopeo | agent pull, cached ms |",
    "|---|---:|---:|---:|---:|",
]
for v in ["compat", "oci"]:
    s, c, w = ms(f"skopeo copy ({v})"), ms(f"agent pull, empty cache ({v})"), ms(f"agent pull, cached ({v})")
    lines.append(f"| {v} | {s:.1f} | {c:.1f} | {c / s:.2f} | {w:.1f} |")
lines += [
    "",
    "The agent's numbers are whole `meshvm-agent pull-wasm` processes (start,",
    "manifest, layer, digest and \\0asm checks, atomic write; compat also",
    "gunzips and untars). A cached pull asks no registry (pull policy",
    "IfNotPresent) and re-checks the module's sha256 and record.",
]
open(out, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
