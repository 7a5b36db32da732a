#!/usr/bin/env bash
# How long a VM waits for its mesh identity: the time from `meshvm-agent run`
# starting to its workload certificate being served over SDS, against the
# local control plane's CA (`meshvm-controlplane serve` on loopback, TLS),
# with ECDSA P-256 keys (the default) and with RSA 2048 keys; and the agent's
# memory once it serves.
#
# Peers in the same run:
#   restart     the same agent finding a valid certificate on disk: no key
#               generation, no CA round trip — the floor (process start,
#               config load, SDS socket, one SDS answer);
#   openssl     `openssl genpkey` making the same two kinds of key: the cost
#               that dominates RSA, with OpenSSL's implementation.
#
# Each timed command starts the agent in the background and runs
# `meshvm-agent secrets --wait`, which asks the SDS socket for `default`
# exactly as Envoy does and exits at the first answer. hyperfine times that;
# stopping the agent and resetting its state happen in --prepare, untimed.
#
# Knobs (environment): RUNS=30 WARMUP=3 OUT=bench/results/identity.md
# KEEP_TMP=1 (keep the run directory). Needs hyperfine, python3, and a
# release build (made here with cargo).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNS=${RUNS:-30}
WARMUP=${WARMUP:-3}
OUT=${OUT:-$ROOT/bench/results/identity.md}
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/meshvm/target}

die() { echo "bench-identity: $*" >&2; exit 1; }
for tool in hyperfine python3 openssl; do
  command -v "$tool" >/dev/null || die "$tool is required (apt-get install $tool)"
done

echo "== building release binaries" >&2
CARGO_TARGET_DIR=$TARGET_DIR cargo build --quiet --release -p meshvm-agent -p meshvm-controlplane
AGENT=$TARGET_DIR/release/meshvm-agent
CP=$TARGET_DIR/release/meshvm-controlplane

T=$(mktemp -d)
CP_PID=
cleanup() {
  "$HERE/agent.sh" stop "$T/agent.pid" || true
  [ -n "$CP_PID" ] && kill "$CP_PID" 2>/dev/null && wait "$CP_PID" 2>/dev/null
  if [ -n "${KEEP_TMP:-}" ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$CP" serve --ca-dir "$T/ca" --listen "127.0.0.1:$PORT" 2>"$T/controlplane.log" &
CP_PID=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  sleep 0.1
done
"$CP" onboard -f "$ROOT/testdata/controlplane/workloadgroup-ratings.yaml" -o "$T/onboarding" \
  --ca-dir "$T/ca" 2>/dev/null >/dev/null

export MESHVM_AGENT=$AGENT MESHVM_ONBOARDING=$T/onboarding CA_ADDR=localhost:$PORT
A="$HERE/agent.sh"

# A stored certificate for the restart case.
"$A" start "$T/agent.pid" "$T/saved" "$T/sds.sock" ecdsa-p256
"$AGENT" secrets --sds-socket "$T/sds.sock" --wait 30s >/dev/null
"$A" stop "$T/agent.pid"

echo "== timing ($RUNS runs each, $WARMUP warm-up)" >&2
hyperfine --style basic --runs "$RUNS" --warmup "$WARMUP" \
  --export-json "$T/times.json" --export-markdown "$T/times.md" \
  -n "agent, new ECDSA P-256 identity" \
  --prepare "'$A' stop '$T/agent.pid'; rm -rf '$T/state' '$T/state.run'" \
  "'$A' start '$T/agent.pid' '$T/state' '$T/sds.sock' ecdsa-p256 && '$AGENT' secrets --sds-socket '$T/sds.sock' --wait 30s >/dev/null" \
  -n "agent, new RSA 2048 identity" \
  --prepare "'$A' stop '$T/agent.pid'; rm -rf '$T/state' '$T/state.run'" \
  "'$A' start '$T/agent.pid' '$T/state' '$T/sds.sock' rsa-2048 && '$AGENT' secrets --sds-socket '$T/sds.sock' --wait 30s >/dev/null" \
  -n "agent restart, stored certificate (floor)" \
  --prepare "'$A' stop '$T/agent.pid'; rm -rf '$T/state' '$T/state.run'; cp -a '$T/saved' '$T/state'" \
  "'$A' start '$T/agent.pid' '$T/state' '$T/sds.sock' ecdsa-p256 && '$AGENT' secrets --sds-socket '$T/sds.sock' --wait 30s >/dev/null" \
  -n "openssl genpkey EC P-256" \
  --prepare "'$A' stop '$T/agent.pid'" \
  "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out /dev/null" \
  -n "openssl genpkey RSA 2048" \
  --prepare "'$A' stop '$T/agent.pid'" \
  "openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out /dev/null" >&2
"$A" stop "$T/agent.pid"

echo "== agent memory once serving (5 starts each)" >&2
memory() { # alg -> "rss_kib hwm_kib" medians
  local alg=$1 rss=() hwm=()
  for _ in 1 2 3 4 5; do
    rm -rf "$T/state"
    "$A" start "$T/agent.pid" "$T/state" "$T/sds.sock" "$alg"
    "$AGENT" secrets --sds-socket "$T/sds.sock" --wait 30s >/dev/null
    local pid; pid=$(cat "$T/agent.pid")
    rss+=("$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")")
    hwm+=("$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")")
    "$A" stop "$T/agent.pid"
  done
  python3 -c 'import statistics,sys; a=sys.argv[1].split(); b=sys.argv[2].split(); print(int(statistics.median(map(int,a))), int(statistics.median(map(int,b))))' "${rss[*]}" "${hwm[*]}"
}
read -r P256_RSS P256_HWM < <(memory ecdsa-p256)
read -r RSA_RSS RSA_HWM < <(memory rsa-2048)

python3 "$HERE/report.py" "$T/times.json" "$P256_RSS" "$P256_HWM" "$RSA_RSS" "$RSA_HWM" \
  "$(nproc)" "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" \
  "hyperfine $(hyperfine --version | awk '{print $2}'), $(openssl version | awk '{print $1, $2}')" \
  "RUNS=$RUNS WARMUP=$WARMUP" > "$T/report.md"
mkdir -p "$(dirname "$OUT")"
cp "$T/report.md" "$OUT"
cat "$OUT"
