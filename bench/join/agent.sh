#!/usr/bin/env bash
# One `meshvm-agent run` (with Envoy) and its WorkloadEntry, for
# bench/join/run.sh.
#   agent.sh start PIDFILE STATE_DIR SDS_SOCKET PORT   start the agent against
#                                    the control plane on localhost:PORT
#   agent.sh stop PIDFILE            kill it (SIGKILL, as a crash: Envoy dies
#                                    with it) and wait until both are gone
#   agent.sh wait-file ENTRY         until the entry file exists
#   agent.sh wait-gone ENTRY         until it does not
#   agent.sh wait-connected ENTRY    until it is marked connected
#   agent.sh wait-disconnected ENTRY until it exists, marked disconnected
# Waits poll every few milliseconds and give up after 60 s. Uses
# MESHVM_AGENT (the binary), MESHVM_ONBOARDING (the onboarding directory)
# and MESHVM_ENVOY (the Envoy binary) from the environment.
set -euo pipefail

# poll CONDITION...: runs the condition every 2 ms until it holds.
poll() {
  local deadline=$((SECONDS + 60))
  until "$@"; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "agent.sh: timed out waiting for: $*" >&2
      exit 1
    fi
    sleep 0.002
  done
}
exists() { [ -e "$1" ]; }
missing() { [ ! -e "$1" ]; }
connected() { grep -qs 'istio.io/connectedAt' "$1"; }
disconnected() { grep -qs 'istio.io/disconnectedAt' "$1"; }
# A zombie (exited, not yet reaped by whoever adopted it) counts as gone.
alive() { [ -e "/proc/$1" ] && ! grep -qs '^State:.*Z' "/proc/$1/status"; }

case "$1" in
  start)
    CA_ADDR=localhost:$5 PROXY_CONFIG="{\"discoveryAddress\":\"localhost:$5\"}" \
      "$MESHVM_AGENT" --onboarding-dir "$MESHVM_ONBOARDING" run --state-dir "$3" \
      --run-dir "$3.run" --sds-socket "$4" --envoy "$MESHVM_ENVOY" \
      --envoy-admin-port 0 --envoy-status-port 0 --envoy-prometheus-port 0 \
      --status-listen 127.0.0.1:0 --dns-listen 127.0.0.1:0 \
      </dev/null >/dev/null 2>>"$3.log" &
    echo $! >"$2"
    ;;
  stop)
    [ -f "$2" ] || exit 0
    pid=$(cat "$2")
    rm -f "$2"
    # Envoy is the agent's child; PR_SET_PDEATHSIG kills it with the agent.
    children=$(cat /proc/"$pid"/task/*/children 2>/dev/null || true)
    kill -KILL "$pid" 2>/dev/null || exit 0
    for p in $pid $children; do
      for _ in $(seq 1000); do alive "$p" || break; sleep 0.005; done
    done
    ;;
  wait-file) poll exists "$2" ;;
  wait-gone) poll missing "$2" ;;
  wait-connected) poll connected "$2" ;;
  wait-disconnected) poll disconnected "$2" ;;
  *) echo "usage: agent.sh start PIDFILE STATE SOCKET PORT | stop PIDFILE | wait-file|wait-gone|wait-connected|wait-disconnected ENTRY" >&2; exit 2 ;;
esac
