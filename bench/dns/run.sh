#!/usr/bin/env bash
# The agent's DNS proxy against dnsmasq, the same names in both: dnsperf
# asks every name (A) for SECONDS seconds with CLIENTS clients, verbose, so
# latency percentiles come from every answer; then the resident memory of
# each with N and 10×N names. Writes bench/results/dns.md.
#
# Knobs (environment): N=10000 SECONDS_PER_RUN=10 CLIENTS=10 RATE=20000 (the
# fixed-rate run). Needs dnsperf,
# dnsmasq, dig, python3, and a release build (made here with cargo).
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in dnsperf dnsmasq dig python3; do
  command -v "$tool" >/dev/null || { echo "bench-dns: $tool is required" >&2; exit 1; }
done
TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/meshvm/target}
echo "== building the release agent" >&2
CARGO_TARGET_DIR=$TARGET_DIR cargo build --quiet --release -p meshvm-agent
N=${N:-10000}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-10}
CLIENTS=${CLIENTS:-10}
RATE=${RATE:-20000}
AGENT=$TARGET_DIR/release/meshvm-agent
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
wait_answers() { # port name
  for _ in $(seq 1 600); do
    if dig @127.0.0.1 -p "$1" +short +tries=1 +time=1 "$2" A | grep -q .; then return 0; fi
    sleep 0.1
  done
  echo "no answer on port $1" >&2; return 1
}

start_both() { # names → sets dnsmasq_pid agent_pid dnsmasq_port agent_port
  local n=$1 dir="$work/$1"
  mkdir -p "$dir/state" "$dir/run"
  chmod 755 "$dir"
  python3 bench/dns/gen.py "$n" "$dir/hosts" "$dir/state/dns-name-table.pb" "$dir/queries"
  chmod 644 "$dir/hosts"
  dnsmasq_port=$(free_port)
  dnsmasq --conf-file=/dev/null --no-resolv --no-hosts --addn-hosts="$dir/hosts" \
    --local=/example.com/ --port="$dnsmasq_port" --listen-address=127.0.0.1 --bind-interfaces \
    --keep-in-foreground --pid-file="$dir/dnsmasq.pid" 2>"$dir/dnsmasq.log" &
  dnsmasq_pid=$!; pids+=("$dnsmasq_pid")
  agent_port=$(free_port)
  # No control plane: the saved NameTable answers (the CA is unreachable,
  # the agent keeps retrying it in the background).
  CA_ADDR=127.0.0.1:1 RUST_LOG=warn "$AGENT" --onboarding-dir testdata/onboarding/ratings-vm run \
    --no-envoy --dns --dns-listen "127.0.0.1:$agent_port" --state-dir "$dir/state" \
    --run-dir "$dir/run" --sds-socket "$dir/run/sds.sock" 2>"$dir/agent.log" &
  agent_pid=$!; pids+=("$agent_pid")
  wait_answers "$dnsmasq_port" "svc-$((n - 1)).bench.example.com"
  wait_answers "$agent_port" "svc-$((n - 1)).bench.example.com"
}

perf() { # port queries out [extra dnsperf args]
  dnsperf -s 127.0.0.1 -p "$1" -d "$2" -l "$SECONDS_PER_RUN" -c "$CLIENTS" -T 1 -v "${@:4}" >"$3" 2>&1
}

start_both "$N"
perf "$dnsmasq_port" "$work/$N/queries" "$work/dnsmasq.out"
perf "$agent_port" "$work/$N/queries" "$work/agent.out"
# The same at a fixed RATE (queries/s): latency when not saturated.
perf "$dnsmasq_port" "$work/$N/queries" "$work/dnsmasq-rate.out" -Q "$RATE"
perf "$agent_port" "$work/$N/queries" "$work/agent-rate.out" -Q "$RATE"
rss_dnsmasq_n=$(rss_kib "$dnsmasq_pid"); rss_agent_n=$(rss_kib "$agent_pid")
kill "$dnsmasq_pid" "$agent_pid"; wait "$dnsmasq_pid" "$agent_pid" 2>/dev/null || true
big=$((N * 10))
start_both "$big"
rss_dnsmasq_big=$(rss_kib "$dnsmasq_pid"); rss_agent_big=$(rss_kib "$agent_pid")

python3 bench/dns/report.py "$N" "$big" "$SECONDS_PER_RUN" "$CLIENTS" \
  "$work/dnsmasq.out" "$work/agent.out" "$RATE" "$work/dnsmasq-rate.out" "$work/agent-rate.out" \
  "$rss_dnsmasq_n" "$rss_agent_n" "$rss_dnsmasq_big" "$rss_agent_big" \
  "$(dnsmasq --version | head -1 | awk '{print $3}')" \
  "$(grep -m1 -o 'Version [0-9.]*' "$work/dnsmasq.out" | awk '{print $2}')" "$(nproc)" \
  >bench/results/dns.md
cat bench/results/dns.md
