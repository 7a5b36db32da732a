#!/usr/bin/env python3
"""Turns two verbose dnsperf outputs and RSS readings into bench/results/dns.md."""
import re
import sys


def parse(path):
    text = open(path).read()
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", text).group(1))
    lost = re.search(r"Queries lost:\s+(\d+)", text).group(1)
    lat = sorted(
        float(m.group(1)) * 1e6
        for m in re.finditer(r"^> NOERROR .* ([\d.]+)$", text, re.M)
    )
    noerror = len(lat)
    pct = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] if lat else float("nan")
    return qps, lost, noerror, pct(50), pct(99), pct(99.9)


(n, big, seconds, clients, dnsmasq_out, agent_out, rate, dnsmasq_rate_out, agent_rate_out,
 rss_d, rss_a, rss_d_big, rss_a_big, dnsmasq_version, dnsperf_version, cpus) = sys.argv[1:]
d, a = parse(dnsmasq_out), parse(agent_out)
dr, ar = parse(dnsmasq_rate_out), parse(agent_rate_out)
print(f"""# DNS proxy vs dnsmasq

`make bench-dns` (N={n}, {seconds} s per server, {clients} dnsperf clients, one
thread; {cpus} CPUs; dnsmasq {dnsmasq_version}; dnsperf {dnsperf_version}). Both serve
the same {n} names (`svc-<i>.bench.example.com`, one A record each) on
loopback: dnsmasq from a hosts file, the agent (`meshvm-agent run --dns`,
release build, no control plane) from its saved NameTable. dnsperf asks each
name once per pass, A, over UDP; latencies are from every NOERROR answer.

| server | queries/s | × dnsmasq | lost | NOERROR answers | p50 µs | p99 µs | p99.9 µs |
|---|---:|---:|---:|---:|---:|---:|---:|
| dnsmasq | {d[0]:.0f} | 1.000 | {d[1]} | {d[2]} | {d[3]:.0f} | {d[4]:.0f} | {d[5]:.0f} |
| meshvm-agent | {a[0]:.0f} | {a[0] / d[0]:.3f} | {a[1]} | {a[2]} | {a[3]:.0f} | {a[4]:.0f} | {a[5]:.0f} |

At a fixed {int(rate):,} queries/s (`dnsperf -Q {rate}`), not saturated:

| server | queries/s | lost | p50 µs | p99 µs | p99.9 µs |
|---|---:|---:|---:|---:|---:|
| dnsmasq | {dr[0]:.0f} | {dr[1]} | {dr[3]:.0f} | {dr[4]:.0f} | {dr[5]:.0f} |
| meshvm-agent | {ar[0]:.0f} | {ar[1]} | {ar[3]:.0f} | {ar[4]:.0f} | {ar[5]:.0f} |

Resident memory (VmRSS) with the names loaded, before any query for the
larger table:

| server | {n} names | {big} names |
|---|---:|---:|
| dnsmasq | {int(rss_d) / 1024:.1f} MiB | {int(rss_d_big) / 1024:.1f} MiB |
| meshvm-agent (whole agent) | {int(rss_a) / 1024:.1f} MiB | {int(rss_a_big) / 1024:.1f} MiB |

Read with care: client and servers share the same CPUs and dnsperf's one
thread is itself near its limit, so these are what that client gets, not
either server's capacity (run to run the ratio moved between 1.2 and 1.4);
dnsmasq answers on one thread, the agent's runtime has two. The agent's
memory is its whole process (identity, SDS, xDS), and includes the decoded
NameTable's transient copy that the allocator keeps; with a search domain
in resolv.conf (none here) its table also holds a CNAME per name, as
Istio's does.
""")
