#!/usr/bin/env python3
"""VM -> Service requests through both Envoys over mTLS, with the meshvm
filter on both sides and without it, in one run; and the time from an
agent's start to its first successful request through the mesh.

Two meshes run side by side on this host, each with its own control plane,
Pod (meshvm-controlplane run-pod: agent, Envoy, echo app) and VM
(meshvm-agent with Envoy): `filter` (control plane given --filter-wasm:
the filter outbound on the VM, inbound on the Pod) and `plain` (no Wasm:
Envoy-to-Envoy mTLS only). The VM calls the Service `product-pod` (only the
Pod), so every request crosses: VM Envoy (outbound listener on the
Service's loopback address) -> mTLS -> Pod Envoy (inbound listener) -> app.

a. wrk (HTTP/1.1, keep-alive) against each mesh's VM-side address,
   alternating filter and plain runs: requests/s and latency percentiles,
   and the ratio filter / plain.
b. Start to first request: a new VM (new identity, new address) starts
   `meshvm-agent run`; curl is retried every 10 ms through its outbound
   listener until the Pod's app answers; timed from the agent's exec, in
   each mesh.

Knobs (environment): DURATION=10 (s per wrk run) RUNS=3 (wrk runs per
variant) CONNECTIONS=16 THREADS=1 JOIN_RUNS=5 OUT=bench/results/mesh.md
BIN_DIR (release binaries) WASM (the filter).
"""

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DURATION = int(os.environ.get("DURATION", "10"))
RUNS = int(os.environ.get("RUNS", "3"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "16"))
THREADS = int(os.environ.get("THREADS", "1"))
JOIN_RUNS = int(os.environ.get("JOIN_RUNS", "5"))
OUT = Path(os.environ.get("OUT", ROOT / "bench/results/mesh.md"))
BIN = Path(os.environ["BIN_DIR"])
WASM = Path(os.environ["WASM"])
CONTROLPLANE = BIN / "meshvm-controlplane"
AGENT = BIN / "meshvm-agent"
HOST = "product-pod.default.svc.cluster.local"

POD_SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: product-pod, namespace: default}
spec:
  selector: {app: product, version: v1}
  clusterIP: 10.96.88.30
  ports: [{name: http, port: 9080, targetPort: http}]
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, check, timeout=120.0, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.05)
    for log in logs:
        sys.stderr.write(f"--- {log}\n{Path(log).read_text()[-3000:]}\n")
    raise SystemExit(f"bench-mesh: timed out waiting for {what}")


def http_ok(url, host=None, timeout=2.0):
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status == 200


class Mesh:
    """A control plane, the Pod and (started separately) VMs, on 127.<net>.x.y."""

    def __init__(self, name, net, work, wasm):
        self.name, self.net, self.work = name, net, work
        self.procs = []
        work.mkdir(parents=True)
        self.port = free_port()
        config = work / "config"
        shutil.copytree(ROOT / "testdata/demo", config)
        (config / "README.md").unlink()
        self.app_port = free_port()
        self.vm_app_port = free_port()
        for f in config.glob("*.yaml"):
            text = f.read_text().replace("9081", str(self.app_port)).replace("9082", str(self.vm_app_port))
            f.write_text(text.replace("127.0.10.", f"127.{net}.10."))
        (config / "product-pod.yaml").write_text(POD_SERVICE)
        args = [CONTROLPLANE, "serve", "--ca-dir", work / "ca", "--config-dir", config,
                "--state-dir", work / "state", "--listen", f"127.0.0.1:{self.port}",
                "--grace-period", "2s"]
        if wasm:
            args += ["--filter-wasm", wasm]
        self.spawn("controlplane", args)
        wait("the control plane", lambda: "serving the CA" in (work / "controlplane.log").read_text())
        self.pod_admin = free_port()
        self.spawn("pod", [CONTROLPLANE, "run-pod", "product-v1", "--config-dir", config,
                           "--ca-dir", work / "ca", "--discovery-address", f"localhost:{self.port}",
                           "--work-dir", work / "pod", "--outbound-addresses", f"127.{net + 100}.0.0/16",
                           "--agent", AGENT, "--",
                           *self.agent_ports(self.pod_admin)])

    def spawn(self, name, args, env=None):
        log = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen([str(a) for a in args], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                env={**os.environ, "RUST_LOG": "info", **(env or {})})
        self.procs.append(proc)
        return proc

    @staticmethod
    def agent_ports(admin):
        return ["--envoy-admin-port", str(admin), "--envoy-status-port", "0",
                "--envoy-prometheus-port", "0", "--status-listen", "127.0.0.1:0",
                "--dns-listen", "127.0.0.1:0"]

    def vip(self, vm_block):
        """The product-pod Service's address on a VM with outbound block vm_block."""
        return f"127.{vm_block}.88.30"

    def start_vm(self, index):
        """A VM at 127.<net>.20.<index>, its outbound block 127.<net+150+index>."""
        ip = f"127.{self.net}.20.{index}"
        vm = self.work / f"vm-{index}"
        subprocess.run([CONTROLPLANE, "onboard", "-f", self.work / "config/product-vm.yaml", "-o", vm / "onboarding",
                        "--ca-dir", self.work / "ca", "--internal-ip", ip, "--autoregister",
                        "--discovery-address", f"localhost:{self.port}"],
                       check=True, capture_output=True)
        block = self.net + 150 + index
        admin = free_port()
        started = time.monotonic()
        proc = self.spawn(f"vm-{index}", [AGENT, "--onboarding-dir", vm / "onboarding", "run",
                                          "--state-dir", vm / "certs", "--run-dir", vm / "run",
                                          "--sds-socket", vm / "run/sds.sock", *self.agent_ports(admin)],
                          env={"ISTIO_META_MESHVM_APP_ADDRESS": f"127.{self.net}.21.{index}",
                               "ISTIO_META_MESHVM_OUTBOUND_ADDRESSES": f"127.{block}.0.0/16"})
        return proc, started, f"http://{self.vip(block)}:9080/"

    def stop_vm(self, proc):
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        self.procs.remove(proc)

    def stop(self):
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def first_request(mesh, index):
    """Seconds from the agent's exec to the first 200 from the Pod's app."""
    proc, started, url = mesh.start_vm(index)
    deadline = started + 120
    while time.monotonic() < deadline:
        try:
            if http_ok(url, HOST, timeout=1.0):
                elapsed = time.monotonic() - started
                mesh.stop_vm(proc)
                return elapsed
        except Exception:
            pass
        time.sleep(0.01)
    raise SystemExit(f"bench-mesh: {mesh.name}: no answer through VM {index}; see {mesh.work}")


WRK_LATENCY = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
WRK_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
WRK_ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)")


def wrk(url):
    out = subprocess.run(["wrk", "-t", str(THREADS), "-c", str(CONNECTIONS), "-d", f"{DURATION}s",
                          "--latency", "-H", f"Host: {HOST}", url],
                         check=True, capture_output=True, text=True).stdout
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    latency = {int(p): float(v) * scale[u] for p, v, u in WRK_LATENCY.findall(out)}
    errors = [m.group(0) for m in WRK_ERRORS.finditer(out)]
    return {"rps": float(WRK_RPS.search(out).group(1)), "p50": latency[50], "p90": latency[90],
            "p99": latency[99], "errors": errors}


def main():
    for tool in ("wrk", "envoy", "curl"):
        if not shutil.which(tool):
            raise SystemExit(f"bench-mesh: {tool} is required")
    tmp = Path(tempfile.mkdtemp(prefix="bench-mesh-"))
    net = free_port() % 40 + 1
    meshes = {}
    try:
        meshes["filter"] = Mesh("filter", net, tmp / "filter", WASM)
        meshes["plain"] = Mesh("plain", net + 50, tmp / "plain", None)

        # b first, on quiet meshes: a new VM each time.
        join = {name: [] for name in meshes}
        for i in range(JOIN_RUNS):
            for name, m in meshes.items():
                join[name].append(first_request(m, 10 + i))
                print(f"  first request via a new VM ({name}): {join[name][-1] * 1000:.0f} ms", flush=True)

        # a: one long-lived VM per mesh.
        urls = {}
        for name, m in meshes.items():
            proc, _, url = m.start_vm(1)
            wait(f"{name}: the VM's first answer", lambda: http_ok(url, HOST),
                 logs=[m.work / "vm-1.log", m.work / "pod.log"])
            urls[name] = url
        for name, url in urls.items():  # warm-up
            subprocess.run(["wrk", "-t1", "-c4", "-d2s", "-H", f"Host: {HOST}", url], check=True,
                           capture_output=True)
        results = {name: [] for name in meshes}
        for run in range(RUNS):
            for name in (("filter", "plain") if run % 2 == 0 else ("plain", "filter")):
                r = wrk(urls[name])
                results[name].append(r)
                print(f"  wrk {name} run {run + 1}: {r['rps']:.0f} req/s, p50 {r['p50']:.2f} ms, "
                      f"p99 {r['p99']:.2f} ms {' '.join(r['errors'])}", flush=True)
        envoy_version = subprocess.run(["envoy", "--version"], capture_output=True, text=True).stdout
    finally:
        for m in meshes.values():
            m.stop()
        if os.environ.get("KEEP_TMP") != "1":
            shutil.rmtree(tmp, ignore_errors=True)

    report(results, join, envoy_version)


def report(results, join, envoy_version):
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    f, p = results["filter"], results["plain"]
    version = re.search(r"version: [0-9a-f]+/([^/]+)/", envoy_version)
    lines = [
        "# bench-mesh: VM -> Service through both Envoys over mTLS, with and without the meshvm filter",
        "",
        f"`make bench-mesh` (bench/mesh/run.py), {time.strftime('%Y-%m-%d')}, {os.cpu_count()} vCPU, "
        f"Envoy {version.group(1) if version else '?'} (V8), wrk -t{THREADS} -c{CONNECTIONS} -d{DURATION}s, "
        f"{RUNS} alternating runs per variant (medians). Path: VM app -> VM Envoy (outbound listener on the "
        "Service's loopback address) -> mTLS -> Pod Envoy (inbound listener) -> echo app; both meshes, their "
        "control planes, Pods and VMs run side by side on this host.",
        "",
        "| variant | requests/s | p50 ms | p90 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rs in (("plain mTLS (no Wasm)", p), ("meshvm filter both sides", f)):
        lines.append(f"| {name} | {med(rs, 'rps'):.0f} | {med(rs, 'p50'):.2f} | {med(rs, 'p90'):.2f} | "
                     f"{med(rs, 'p99'):.2f} |")
    lines += [
        "",
        f"Ratio filter / plain: throughput {med(f, 'rps') / med(p, 'rps'):.3f}, "
        f"p50 {med(f, 'p50') / med(p, 'p50'):.3f}, p99 {med(f, 'p99') / med(p, 'p99'):.3f}.",
        "",
        "## Start to first request",
        "",
        "A new VM (new key and certificate, new WorkloadEntry) from `meshvm-agent run` to the first 200 "
        "from the Pod's app through its Envoy (curl every 10 ms), "
        f"{JOIN_RUNS} runs per mesh:",
        "",
        "| mesh | median ms | min ms | max ms |",
        "|---|---:|---:|---:|",
    ]
    for name in ("plain", "filter"):
        xs = [x * 1000 for x in join[name]]
        lines.append(f"| {name} | {statistics.median(xs):.0f} | {min(xs):.0f} | {max(xs):.0f} |")
    lines += ["", "Raw wrk results:", "", "```", json.dumps(results, indent=1), "```", ""]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))
    print("\n".join(lines[:20]))
    print(f"\nwritten to {OUT}")


if __name__ == "__main__":
    main()
