#!/usr/bin/env bash
# Starts or stops one `meshvm-agent run` for bench/identity/run.sh.
#   agent.sh start PIDFILE STATE_DIR SDS_SOCKET KEY_ALGORITHM
#   agent.sh stop PIDFILE
# Uses MESHVM_AGENT (the binary), MESHVM_ONBOARDING (the onboarding
# directory) and CA_ADDR from the environment.
set -euo pipefail
case "$1" in
  start)
    "$MESHVM_AGENT" --onboarding-dir "$MESHVM_ONBOARDING" run --state-dir "$3" \
      --sds-socket "$4" --run-dir "$3.run" --no-envoy --status-listen 127.0.0.1:0 --dns-listen 127.0.0.1:0 --key-algorithm "$5" \
      </dev/null >/dev/null 2>>"$3.log" &
    echo $! >"$2"
    ;;
  stop)
    [ -f "$2" ] || exit 0
    pid=$(cat "$2")
    rm -f "$2"
    kill -TERM "$pid" 2>/dev/null || exit 0
    # Wait for it to exit (it is not our child here).
    for _ in $(seq 500); do kill -0 "$pid" 2>/dev/null || exit 0; sleep 0.01; done
    kill -KILL "$pid" 2>/dev/null || true
    ;;
  *) echo "usage: agent.sh start PIDFILE STATE SOCKET ALG | stop PIDFILE" >&2; exit 2 ;;
esac
