#!/usr/bin/env python3
"""Helpers for bench/filter/run.sh (standard library only).

Subcommands:
  render OUT TEMPLATE [K=V | K=@FILE]...   substitute ${K} placeholders; @FILE values
                                           are rendered with the same variables and
                                           indented to the placeholder's column
  peer-metadata client|dut                 base64 Struct for x-envoy-peer-metadata
  node-yaml dut                            node metadata as one-line YAML (flow style)
  listener-port ADMIN_ADDR_FILE NAME       resolved port of a listener bound to :0
  wait-ready ADMIN_ADDR_FILE TIMEOUT_S     poll admin /ready until LIVE
  cpu-ns PID                               on-CPU time of all threads of PID, in ns
  check DIRECTION VARIANT ECHO_JSON        assert what the upstream received
  wrk-parse FILE WHAT                      "rps requests p50 p99" from report.lua's line;
                                           fails on non-2xx responses
  snapshot FILE CHILDREN_TIMES PID...      CPU counters (machine, our processes)
  foreign SNAP0 SNAP1                      CPU used by other processes in between
  foreign-over SNAP0 SNAP1 PCT             exit 0 if that is over PCT %
  report RESULTS_TSV OUT_MD WASM_PATH PARAMS   medians → Markdown table
"""
import base64
import json
import os
import re
import statistics
import struct
import sys
import time
import urllib.request

# ---------------------------------------------------------------------------
# Node metadata: single source of truth for both the Envoy bootstraps and the
# precomputed header values (Lua outbound variant, client sidecar).
# ---------------------------------------------------------------------------

# The "client sidecar" (the caller in the inbound scenario): an Istio 1.23-style
# Kubernetes pod, so the header it sends has the realistic, richer shape.
CLIENT_ID = "sidecar~10.244.0.17~productpage-v1-6b746f74dc-9stvs.default~default.svc.cluster.local"
CLIENT_META = {
    "NAME": "productpage-v1-6b746f74dc-9stvs",
    "NAMESPACE": "default",
    "OWNER": "kubernetes://apis/apps/v1/namespaces/default/deployments/productpage-v1",
    "WORKLOAD_NAME": "productpage-v1",
    "ISTIO_VERSION": "1.23.2",
    "MESH_ID": "cluster.local",
    "CLUSTER_ID": "Kubernetes",
    "SERVICE_ACCOUNT": "bench-client",
    "LABELS": {
        "app": "productpage",
        "version": "v1",
        "pod-template-hash": "6b746f74dc",
        "security.istio.io/tlsMode": "istio",
        "service.istio.io/canonical-name": "productpage",
        "service.istio.io/canonical-revision": "v1",
    },
    "PLATFORM_METADATA": {},
    "APP_CONTAINERS": "productpage",
    "INSTANCE_IPS": "10.244.0.17",
}
# What the inbound filter should derive from CLIENT_META.
CLIENT_EXPECT = {
    "x-mesh-peer-identity": "spiffe://cluster.local/ns/default/sa/bench-client",
    "x-mesh-peer-namespace": "default",
    "x-mesh-peer-service-account": "bench-client",
    "x-mesh-peer-workload": "productpage-v1",
    "x-mesh-peer-app": "productpage",
    "x-mesh-peer-version": "v1",
    "x-mesh-peer-cluster": "Kubernetes",
}

# The Envoy under test: a VM workload, as the meshvm agent writes its bootstrap.
DUT_ID = "sidecar~127.0.0.1~vm-1.default~default.svc.cluster.local"
DUT_META = {
    "NAME": "vm-1",
    "NAMESPACE": "default",
    "WORKLOAD_NAME": "ratings-vm",
    "CLUSTER_ID": "Kubernetes",
    "OWNER": "kubernetes://apis/networking.istio.io/v1/namespaces/default/workloadgroups/ratings-vm",
    "LABELS": {"app": "ratings", "version": "v1"},
}
# Keys the outbound filter is specified to emit (node.metadata subset).
OUTBOUND_KEYS = ["NAME", "NAMESPACE", "WORKLOAD_NAME", "CLUSTER_ID", "OWNER", "LABELS"]


# ---------------------------------------------------------------------------
# google.protobuf.Struct, deterministic serialization (map keys sorted), and a
# decoder for checking what the filter sent.
# ---------------------------------------------------------------------------
def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(field, payload):
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _value(v):
    if v is None:
        return _varint(1 << 3 | 0) + _varint(0)
    if isinstance(v, bool):
        return _varint(4 << 3 | 0) + _varint(1 if v else 0)
    if isinstance(v, (int, float)):
        return _varint(2 << 3 | 1) + struct.pack("<d", float(v))
    if isinstance(v, str):
        return _ld(3, v.encode())
    if isinstance(v, dict):
        return _ld(5, encode_struct(v))
    if isinstance(v, list):
        return _ld(6, b"".join(_ld(1, _value(x)) for x in v))
    raise TypeError(type(v))


def encode_struct(d):
    return b"".join(_ld(1, _ld(1, k.encode()) + _ld(2, _value(d[k]))) for k in sorted(d))


def _read_varint(b, i):
    shift = n = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        shift += 7
        if not c & 0x80:
            return n, i


def _fields(b):
    i = 0
    while i < len(b):
        key, i = _read_varint(b, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _read_varint(b, i)
        elif wt == 1:
            v, i = b[i:i + 8], i + 8
        elif wt == 5:
            v, i = b[i:i + 4], i + 4
        elif wt == 2:
            n, i = _read_varint(b, i)
            v, i = b[i:i + n], i + n
        else:
            raise ValueError("wire type %d" % wt)
        yield f, wt, v


def _decode_value(b):
    out = None
    for f, wt, v in _fields(b):
        if f == 1:
            out = None
        elif f == 2:
            out = struct.unpack("<d", v)[0]
        elif f == 3:
            out = v.decode()
        elif f == 4:
            out = bool(v)
        elif f == 5:
            out = decode_struct(v)
        elif f == 6:
            out = [_decode_value(x) for g, _, x in _fields(v) if g == 1]
    return out


def decode_struct(b):
    d = {}
    for f, _, entry in _fields(b):
        if f != 1:
            continue
        k, val = None, None
        for g, _, v in _fields(entry):
            if g == 1:
                k = v.decode()
            elif g == 2:
                val = _decode_value(v)
        d[k] = val
    return d


def b64decode_loose(s):
    s = s.strip()
    return base64.b64decode(s + "=" * (-len(s) % 4))


def peer_metadata(which):
    if which == "client":
        return base64.b64encode(encode_struct(CLIENT_META)).decode()
    if which == "dut":
        meta = {k: DUT_META[k] for k in OUTBOUND_KEYS if k in DUT_META}
        return base64.b64encode(encode_struct(meta)).decode()
    raise SystemExit("peer-metadata: client|dut")


# ---------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------
def render_text(text, env):
    """Substitute ${K} on every line except YAML comment lines ("#...").
    A placeholder alone on its line with a multi-line value is replaced by the
    value indented to the placeholder's column."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("#"):
            out.append(line)
            continue
        m = re.fullmatch(r"(\s*)\$\{(\w+)\}\s*\n?", line)
        if m and m.group(2) in env and "\n" in env[m.group(2)].rstrip("\n"):
            ind = m.group(1)
            val = env[m.group(2)].rstrip("\n")
            out.append("".join(ind + l + "\n" if l.strip() else "\n" for l in val.split("\n")))
            continue
        def sub(mm, line=line):
            if mm.group(1) not in env:
                raise SystemExit("render: no value for ${%s} in: %s" % (mm.group(1), line.strip()))
            return env[mm.group(1)]
        out.append(re.sub(r"\$\{(\w+)\}", sub, line))
    return "".join(out)


def cmd_render(out, tpl, *assigns):
    env = {}
    files = {}
    for a in assigns:
        k, _, v = a.partition("=")
        if v.startswith("@"):
            files[k] = v[1:]
        else:
            env[k] = v
    for k, path in files.items():  # included snippets see the plain variables
        with open(path) as f:
            env[k] = render_text(f.read(), env)
    with open(tpl) as f:
        text = render_text(f.read(), env)
    with open(out, "w") as f:
        f.write(text)


def node_yaml(which):
    if which != "dut":
        raise SystemExit("node-yaml: dut")
    return json.dumps(DUT_META)


# ---------------------------------------------------------------------------
# Envoy admin
# ---------------------------------------------------------------------------
def _admin(addr_file):
    with open(addr_file) as f:
        return "http://" + f.read().strip()


def listener_port(addr_file, name):
    with urllib.request.urlopen(_admin(addr_file) + "/listeners?format=json", timeout=5) as r:
        data = json.load(r)
    for l in data.get("listener_statuses", []):
        if l.get("name") == name:
            return l["local_address"]["socket_address"]["port_value"]
    raise SystemExit("listener %s not found" % name)


def wait_ready(addr_file, timeout):
    deadline = time.time() + float(timeout)
    last = ""
    while time.time() < deadline:
        try:
            if os.path.exists(addr_file) and os.path.getsize(addr_file) > 0:
                with urllib.request.urlopen(_admin(addr_file) + "/ready", timeout=2) as r:
                    last = r.read().decode().strip()
                    if r.status == 200 and last == "LIVE":
                        return
        except Exception as e:  # not up yet
            last = str(e)
        time.sleep(0.1)
    raise SystemExit("not ready after %ss (%s): %s" % (timeout, addr_file, last))


def cpu_ns(pid):
    total = 0
    for t in os.listdir("/proc/%s/task" % pid):
        try:
            with open("/proc/%s/task/%s/schedstat" % (pid, t)) as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total


# ---------------------------------------------------------------------------
# Correctness check of what the upstream (echo server) received
# ---------------------------------------------------------------------------
def check(direction, variant, echo_file):
    with open(echo_file) as f:
        got = {k.lower(): v for k, v in json.load(f)["headers"].items()}
    errors = []
    mesh = {k: v for k, v in got.items() if k.startswith("x-mesh-peer-")}
    shown = variant
    if variant == "noop":  # the calibration filter changes nothing
        variant = "none"
    if direction == "inbound":
        if variant == "none":
            # Baseline: nothing removed, nothing added; the spoofed headers pass.
            if got.get("x-mesh-peer-identity") != "spiffe://evil/ns/x/sa/y":
                errors.append("baseline should pass the spoofed header through: %r" % mesh)
            if "x-envoy-peer-metadata" not in got:
                errors.append("baseline should pass x-envoy-peer-metadata through")
        else:
            if mesh != CLIENT_EXPECT:
                for k in sorted(set(mesh) | set(CLIENT_EXPECT)):
                    if mesh.get(k) != CLIENT_EXPECT.get(k):
                        errors.append("%s: got %r, want %r" % (k, mesh.get(k), CLIENT_EXPECT.get(k)))
            for h in ("x-envoy-peer-metadata", "x-envoy-peer-metadata-id"):
                if h in got:
                    errors.append("%s should have been removed" % h)
    else:
        if variant == "none":
            if "x-envoy-peer-metadata" in got:
                errors.append("baseline should not add x-envoy-peer-metadata")
        else:
            if got.get("x-envoy-peer-metadata-id") != DUT_ID:
                errors.append("x-envoy-peer-metadata-id: got %r, want %r"
                              % (got.get("x-envoy-peer-metadata-id"), DUT_ID))
            raw = got.get("x-envoy-peer-metadata")
            if raw is None:
                errors.append("x-envoy-peer-metadata missing")
            else:
                try:
                    meta = decode_struct(b64decode_loose(raw))
                except Exception as e:
                    errors.append("x-envoy-peer-metadata does not decode as a Struct: %s" % e)
                    meta = {}
                want = {k: DUT_META[k] for k in OUTBOUND_KEYS}
                for k in OUTBOUND_KEYS:
                    if meta.get(k) != want[k]:
                        errors.append("metadata %s: got %r, want %r" % (k, meta.get(k), want[k]))
                extra = sorted(set(meta) - set(OUTBOUND_KEYS))
                if extra:
                    print("  note: %s/%s metadata has extra keys %s" % (direction, variant, extra))
                canonical = base64.b64encode(encode_struct(meta)).decode()
                if canonical != raw:
                    print("  note: %s/%s header is not the canonical (sorted-key, padded) "
                          "serialization of its content" % (direction, variant))
        # Spoofed inbound-identity headers are not the outbound filter's business.
    if errors:
        print("FAIL %s/%s: upstream received:" % (direction, shown))
        for k in sorted(got):
            print("    %s: %s" % (k, got[k]))
        for e in errors:
            print("  - " + e)
        sys.exit(1)
    print("  ok   %-8s %-5s %s" % (direction, shown,
                                   "(%d x-mesh-peer-* headers)" % len(mesh) if direction == "inbound" else
                                   "(x-envoy-peer-metadata %s)" % ("present" if "x-envoy-peer-metadata" in got else "absent")))


# ---------------------------------------------------------------------------
# wrk output, machine load, and the report
# ---------------------------------------------------------------------------
def wrk_parse(path, what):
    """Print "rps requests p50_us p99_us"; fail on non-2xx, warn on socket errors."""
    with open(path) as f:
        text = f.read()
    for line in text.splitlines():
        if line.startswith("BENCHJSON "):
            d = json.loads(line[len("BENCHJSON "):])
            break
    else:
        sys.stderr.write(text)
        raise SystemExit("%s: wrk output without a BENCHJSON line" % what)
    if d["err_status"]:
        sys.stderr.write(text)
        raise SystemExit("%s: %d non-2xx responses" % (what, d["err_status"]))
    sock = d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"]
    if sock:
        sys.stderr.write("   warning: %s: %d socket errors/timeouts\n" % (what, sock))
    if d["requests"] == 0:
        raise SystemExit("%s: no requests completed" % what)
    print(d["rps"], d["requests"], d["p50_us"], d["p99_us"])


def _times_ns(s):
    # bash `times` children line: "0m1.234s 0m0.567s"
    tot = 0.0
    for part in s.split():
        m = re.fullmatch(r"(\d+)m([\d.]+)s", part)
        if m:
            tot += int(m.group(1)) * 60 + float(m.group(2))
    return int(tot * 1e9)


def snapshot(out, children_times, *pids):
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (cpu + [0] * 8)[:8]
    ours = 0
    for p in pids:
        try:
            ours += cpu_ns(p)
        except FileNotFoundError:
            pass
    snap = {
        "t": time.monotonic(),
        "busy_ns": (user + nice + system) * 1e9 / hz,
        "steal_ns": steal * 1e9 / hz,
        "ours_ns": ours + _times_ns(children_times),
        "ncpu": os.cpu_count(),
    }
    with open(out, "w") as f:
        json.dump(snap, f)


def _foreign(f0, f1):
    with open(f0) as f:
        a = json.load(f)
    with open(f1) as f:
        b = json.load(f)
    cap = (b["t"] - a["t"]) * 1e9 * a["ncpu"]
    foreign = max(0.0, (b["busy_ns"] - a["busy_ns"]) - (b["ours_ns"] - a["ours_ns"]))
    return 100 * foreign / cap, 100 * (b["steal_ns"] - a["steal_ns"]) / cap


def foreign(f0, f1):
    fp, st = _foreign(f0, f1)
    print("%.0f%% of the CPUs (steal %.0f%%)" % (fp, st))


def foreign_over(f0, f1, pct):
    fp, st = _foreign(f0, f1)
    sys.exit(0 if fp + st > float(pct) else 1)


VARIANT_NAMES = {"none": "no filter", "noop": "no-op Wasm (floor)", "wasm": "meshvm Wasm", "lua": "Lua"}
ORDER = ["none", "noop", "wasm", "lua"]


def _q(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def report(tsv, out_md, wasm_path, params):
    # tsv columns: direction variant run kind rps|requests p50_us p99_us cpu_us_per_req
    # kind "tput": CONNECTIONS connections; kind "lat": one 1-s slice, 1 connection
    rows = {}
    with open(tsv) as f:
        for line in f:
            d, v, run, kind, rps, p50, p99, cpu = line.split()
            r = rows.setdefault((d, v), {"rps": [], "cpu": [], "p50": [], "p99": [], "cpu1": []})
            if kind == "tput":
                r["rps"].append(float(rps))
                r["cpu"].append(float(cpu))
            else:
                r["p50"].append(float(p50))
                r["p99"].append(float(p99))
                r["cpu1"].append(float(cpu))
    med = {k: {m: (statistics.median(x) if x else float("nan")) for m, x in r.items()} for k, r in rows.items()}
    size = os.path.getsize(wasm_path) if wasm_path and os.path.exists(wasm_path) else None
    digest = None
    if size is not None:
        import hashlib
        with open(wasm_path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]

    L = []
    L.append("| direction | variant | req/s | × no filter | p50 µs | p99 µs | +p50 µs | +p99 µs "
             "| Envoy CPU µs/req | +CPU µs/req | capacity × no filter |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for d in ("inbound", "outbound"):
        base = med.get((d, "none"))
        for v in ORDER:
            m = med.get((d, v))
            if not m or not base:
                continue
            dash = v == "none"
            rel = lambda x, fmt: "–" if dash else fmt % x
            L.append("| %s | %s | %.0f | %s | %.0f | %.0f | %s | %s | %.1f | %s | %s |" % (
                d + (" (mTLS)" if d == "inbound" else ""), VARIANT_NAMES[v], m["rps"],
                "1.000" if dash else "%.3f" % (m["rps"] / base["rps"]), m["p50"], m["p99"],
                rel(m["p50"] - base["p50"], "%+.0f"), rel(m["p99"] - base["p99"], "%+.0f"),
                m["cpu1"], rel(m["cpu1"] - base["cpu1"], "%+.1f"),
                "1.000" if dash else "%.3f" % (base["cpu"] / m["cpu"])))
        w, l = med.get((d, "wasm")), med.get((d, "lua"))
        if w and base:
            r = w["rps"] / base["rps"]
            a = w["p99"] - base["p99"]
            verdicts.append("| %s | Wasm throughput ≥ 0.97× no filter (req/s, this setup) | %.3f× | %s |" % (d, r, "PASS" if r >= 0.97 else "FAIL"))
            c = base["cpu"] / w["cpu"]
            verdicts.append("| %s | Wasm throughput ≥ 0.97× no filter (capacity of a CPU-bound Envoy) | %.3f× | %s |" % (d, c, "PASS" if c >= 0.97 else "FAIL"))
            verdicts.append("| %s | Wasm added p99 ≤ 50 µs | %+.0f µs | %s |" % (d, a, "PASS" if a <= 50 else "FAIL"))
            if l:
                verdicts.append("| %s | Wasm faster than Lua (req/s) | %.0f vs %.0f | %s |" % (
                    d, w["rps"], l["rps"], "PASS" if w["rps"] > l["rps"] else "FAIL"))
                verdicts.append("| %s | Wasm cheaper than Lua (+CPU µs/req) | %+.1f vs %+.1f | %s |" % (
                    d, w["cpu1"] - base["cpu1"], l["cpu1"] - base["cpu1"], "PASS" if w["cpu1"] < l["cpu1"] else "FAIL"))

    CONN = os.environ.get("CONNECTIONS", "?")
    doc = []
    doc.append("# meshvm filter benchmark")
    doc.append("")
    doc.append("Generated by `bench/filter/run.sh` (`make bench-filter`) on %s." % time.strftime("%Y-%m-%d %H:%M %Z"))
    doc.append("")
    doc.append("Setup: %s" % params)
    doc.append("")
    busy = [float(x) for x in re.findall(r"used (\d+)% of the CPUs", params)]
    if busy and max(busy) > 5:
        doc.append("**Warning: other processes used up to %.0f%% of the CPUs; p99 and req/s are disturbed. "
                   "CPU µs/req and p50 (medians) are the robust numbers here.**" % max(busy))
        doc.append("")
    doc.append("meshvm filter: `%s`, **%s bytes**%s." % (
        os.path.basename(wasm_path) if wasm_path else "-", "{:,}".format(size) if size is not None else "n/a",
        ", sha256 %s…" % digest if digest else ""))
    doc.append("")
    doc.extend(L)
    doc.append("")
    doc.append("- **req/s**: `wrk -t1 -c%s`, closed loop, median of the runs; × no filter = ratio of medians." % CONN)
    doc.append("- **p50/p99**: one connection, closed loop (`wrk -t1 -c1`), whole chain, median over 1-s slices "
               "(variants interleaved slice by slice); +p50/+p99 = difference to no filter.")
    doc.append("- **Envoy CPU µs/req**: on-CPU time of the Envoy under test (all threads, /proc/PID/task/*/schedstat) "
               "÷ requests, during the 1-connection slices (median); +CPU = difference to no filter: the filter's cost per request.")
    doc.append("- **capacity × no filter**: no-filter CPU/req ÷ variant CPU/req measured during the req/s run (batched, "
               "%s connections): the req/s ratio of an Envoy whose worker is CPU-bound. On this box the Envoy under test is "
               "not saturated in the req/s run (client sidecar, upstream and wrk share the other CPU), so the req/s ratio is "
               "that of this whole chain, where the filter also lengthens each connection's round trip." % CONN)
    doc.append("- Variants: *no filter* = router only; *meshvm Wasm* = `envoy.filters.http.wasm`, V8, FAIL_CLOSED; "
               "*Lua* = `envoy.filters.http.lua`, inbound: remove `x-mesh-peer-*`, SPIFFE URI SAN → 3 headers, base64 + "
               "protobuf Struct decode of `x-envoy-peer-metadata` in pure Lua → 4 headers, remove the 2 Istio headers; "
               "outbound: set the 2 Istio headers to precomputed values; *no-op Wasm* (optional) = a proxy-wasm "
               "module that exports the same callbacks and does nothing (bench/filter/noop/noop.rs): Envoy's Wasm floor.")
    doc.append("")
    if verdicts:
        doc.append("Targets:")
        doc.append("")
        doc.append("| direction | target | measured | verdict |")
        doc.append("|---|---|---:|---|")
        doc.extend(verdicts)
        doc.append("")
    doc.append("<details><summary>Spread</summary>")
    doc.append("")
    doc.append("| direction | variant | req/s per run | CPU µs/req per req/s run | CPU µs/req 1 conn (slices: min / median / max) "
               "| p50 µs (slices: min / median / max) | p99 µs (slices: min / q25 / median / q75 / max) |")
    doc.append("|---|---|---|---|---|---|---|")
    for (d, v), r in sorted(rows.items(), key=lambda kv: (kv[0][0], ORDER.index(kv[0][1]))):
        doc.append("| %s | %s | %s | %s | %.1f / %.1f / %.1f | %.0f / %.0f / %.0f | %.0f / %.0f / %.0f / %.0f / %.0f |" % (
            d, VARIANT_NAMES[v], " ".join("%.0f" % x for x in r["rps"]), " ".join("%.1f" % x for x in r["cpu"]),
            min(r["cpu1"]), statistics.median(r["cpu1"]), max(r["cpu1"]),
            min(r["p50"]), statistics.median(r["p50"]), max(r["p50"]),
            min(r["p99"]), _q(r["p99"], .25), statistics.median(r["p99"]), _q(r["p99"], .75), max(r["p99"])))
    doc.append("")
    doc.append("</details>")
    doc.append("")
    text = "\n".join(doc)
    with open(out_md, "w") as f:
        f.write(text)
    print(text)


def main(argv):
    if len(argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "render":
        cmd_render(*args)
    elif cmd == "peer-metadata":
        print(peer_metadata(*args))
    elif cmd == "node-yaml":
        print(node_yaml(*args))
    elif cmd == "listener-port":
        print(listener_port(*args))
    elif cmd == "wait-ready":
        wait_ready(*args)
    elif cmd == "cpu-ns":
        print(cpu_ns(*args))
    elif cmd == "check":
        check(*args)
    elif cmd == "wrk-parse":
        wrk_parse(*args)
    elif cmd == "snapshot":
        snapshot(*args)
    elif cmd == "foreign":
        foreign(*args)
    elif cmd == "foreign-over":
        foreign_over(*args)
    elif cmd == "report":
        report(*args)
    elif cmd == "peer-id":
        print({"client": CLIENT_ID, "dut": DUT_ID}[args[0]])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
