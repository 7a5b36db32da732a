#!/usr/bin/env bash
# make bench-mesh: builds release binaries and the filter's path, then runs
# bench/mesh/run.py (see its header for what is measured and the knobs).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
for tool in wrk envoy curl python3; do
  command -v "$tool" >/dev/null || { echo "bench-mesh: $tool is required" >&2; exit 1; }
done
cargo build --release -q -p meshvm-agent -p meshvm-controlplane
export BIN_DIR="$TARGET_DIR/release"
export WASM="${MESHVM_FILTER_WASM:-$TARGET_DIR/meshvm/meshvm_filter.wasm}"
[ -f "$WASM" ] || { echo "bench-mesh: $WASM missing (make wasm)" >&2; exit 1; }
exec python3 "$HERE/run.py"
