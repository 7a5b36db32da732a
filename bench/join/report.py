"""Markdown report for bench/join/run.sh.

usage: report.py TIMES_JSON SWARM_JSONL SAMPLES ENTRIES DISK_BYTES DISK_KIB
                 NPROC CPU TOOLS KNOBS

TIMES_JSON is hyperfine's export; SWARM_JSONL the vm_swarm tool's phase lines;
SAMPLES one `key=value` line per sample of the control plane (labels before,
registered, held, closed, deleted).
"""

import json
import sys


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def main() -> None:
    times, swarm, samples, entries, disk_bytes, disk_kib, nproc, cpu, tools, knobs = sys.argv[1:11]
    results = json.load(open(times))["results"]
    phases = {}
    for line in open(swarm):
        record = json.loads(line)
        phases[record["phase"]] = record
    s = {}
    for line in open(samples):
        fields = dict(kv.split("=", 1) for kv in line.split())
        label = fields.pop("label")
        s[label] = {k: float(v) for k, v in fields.items()}
    entries, disk_bytes, disk_kib = int(entries), int(disk_bytes), int(disk_kib)

    identity = next(r for r in results if "(identity)" in r["command"])
    registered = next(r for r in results if "(registered)" in r["command"])

    print("# meshvm: joining the mesh\n")
    print(
        "Time from `meshvm-agent run` starting (with Envoy 1.40; Envoy's ADS stream, "
        "carried by the agent over TLS, registers the VM) to its WorkloadEntry being "
        "stored by `meshvm-controlplane serve` on loopback, and the control plane's "
        "cost of many registered VMs. Produced by `make bench-join` "
        f"({knobs}; {nproc} CPUs, {cpu}; {tools}).\n"
    )
    print("## Time from agent start\n")
    print("| case | median ms | mean ± σ ms | min ms | max ms | × identity |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = r["median"] / identity["median"]
        print(
            f"| {r['command']} | {ms(r['median'])} | {ms(r['mean'])} ± {ms(r['stddev'] or 0)} "
            f"| {ms(r['min'])} | {ms(r['max'])} | {ratio:.2f} |"
        )
    print()
    print(
        f"- Registration adds {ms(registered['median'] - identity['median'])} ms (median) "
        "to a served identity: Envoy's start, its SDS and ADS streams to the agent, the "
        "agent's TLS connection to the control plane, the identity and node checks, and "
        "the WorkloadEntry written to disk (fsync)."
    )
    print(
        "- Each case starts from nothing: a new key and certificate, no entry (the previous "
        "one deleted after a 1 s grace period); the restart case keeps the stored "
        "certificate and its entry (marked disconnected), and stops when the entry is "
        "marked connected again."
    )
    print()

    ready, reg, closed = phases["ready"], phases["registered"], phases["closed"]
    deleted = phases.get("deleted")
    n = reg["registered"]
    before, after, settled, held = s["before"], s["registered"], s["settled"], s["held"]
    hold_s = held["t"] - settled["t"]
    # Until settled: streams finish the updates of the last registrations.
    reg_cpu_ms = settled["cpu_ms"] - before["cpu_ms"]
    idle_cpu_ms = held["cpu_ms"] - settled["cpu_ms"]
    lat, conn = reg["latency_ms"], reg["connect_ms"]

    print(f"## The control plane with {reg['vms']} VMs\n")
    print(
        f"`controlplane/examples/vm_swarm.rs`: {reg['vms']} simulated VMs, each with its own "
        "workload certificate (ECDSA P-256), TLS connection and ADS stream (node with "
        "`AUTO_REGISTER_GROUP=ratings-vm`, an LDS then a NameTable request), "
        f"{reg['concurrency']} registrations in flight; a VM is registered at its first "
        "response. The control plane was fresh (1 s grace period); the tool ran on the same "
        "machine, so both shared its CPUs.\n"
    )
    print("| measure | value |")
    print("|---|---:|")
    print(f"| VMs registered / failed | {n} / {reg['failures']} |")
    print(
        f"| time to register all | {reg['register_all_s']:.2f} s "
        f"({reg['per_second']:.0f} VMs/s) |"
    )
    print(
        f"| registration latency p50 / p90 / p99 / max | {lat['p50']:.1f} / {lat['p90']:.1f} / "
        f"{lat['p99']:.1f} / {lat['max']:.1f} ms |"
    )
    print(
        f"| … of which TCP + TLS + HTTP/2 connect, p50 / p99 | {conn['p50']:.1f} / "
        f"{conn['p99']:.1f} ms |"
    )
    print(
        f"| control plane CPU to register all | {reg_cpu_ms:.0f} ms "
        f"({reg_cpu_ms * 1000 / max(n, 1):.0f} µs per VM) |"
    )
    print(
        f"| … of it after the last VM was registered (streams catching up) | "
        f"{settled['cpu_ms'] - after['cpu_ms']:.0f} ms over "
        f"{max(settled['t'] - after['t'] - 1, 0):.1f} s |"
    )
    print(
        f"| control plane CPU while holding {n} idle streams | {idle_cpu_ms:.0f} ms in "
        f"{hold_s:.1f} s ({idle_cpu_ms / hold_s / 10:.2f} % of one core) |"
    )
    print(
        f"| VmRSS before / with {n} VMs / after {hold_s:.0f} s idle | {mib(before['rss_kib'])} / "
        f"{mib(after['rss_kib'])} / {mib(held['rss_kib'])} MiB |"
    )
    print(
        f"| VmRSS per VM | {(after['rss_kib'] - before['rss_kib']) / max(n, 1):.1f} KiB |"
    )
    print(f"| VmHWM (peak) with {n} VMs | {mib(held['hwm_kib'])} MiB |")
    print(
        f"| threads / open descriptors with {n} VMs | {held['threads']:.0f} / {held['fds']:.0f} |"
    )
    print(
        f"| WorkloadEntry on disk | {disk_bytes / max(entries, 1):.0f} bytes per file "
        f"({disk_kib / max(entries, 1):.1f} KiB allocated; {entries} files) |"
    )
    if deleted:
        gone = s.get("deleted")
        print(
            f"| all closed → all entries deleted (grace 1 s) | {deleted['deleted_after_s']:.2f} s "
            f"({deleted['entries_left']} left) |"
        )
        if gone:
            print(
                f"| control plane CPU for disconnects and deletions | "
                f"{gone['cpu_ms'] - held['cpu_ms']:.0f} ms |"
            )
            print(f"| VmRSS after all were deleted | {mib(gone['rss_kib'])} MiB |")
    print()
    print(
        f"The tool issued the {reg['vms']} certificates in {ready['certificates_s']:.2f} s "
        f"before connecting; the control plane sent {closed['responses']} responses in all "
        f"({closed['responses'] / max(n, 1):.1f} per VM)."
    )


if __name__ == "__main__":
    main()
