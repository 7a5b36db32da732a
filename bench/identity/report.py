"""Markdown report for bench/identity/run.sh from hyperfine's JSON export.

usage: report.py TIMES_JSON P256_RSS_KIB P256_HWM_KIB RSA_RSS_KIB RSA_HWM_KIB
                 NPROC CPU TOOLS KNOBS
"""

import json
import sys


def main() -> None:
    times, p256_rss, p256_hwm, rsa_rss, rsa_hwm, nproc, cpu, tools, knobs = sys.argv[1:10]
    results = json.load(open(times))["results"]
    by_name = {r["command"]: r for r in results}
    floor = next(r for r in results if "floor" in r["command"])
    p256 = next(r for r in results if "P-256 identity" in r["command"])
    rsa = next(r for r in results if "RSA 2048 identity" in r["command"])

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.1f}"

    print("# meshvm-agent: time to a served identity\n")
    print(
        "Time from `meshvm-agent run` starting to `default` being served over "
        "SDS (as Envoy asks for it), against `meshvm-controlplane serve` on "
        "loopback over TLS. Produced by `make bench-identity` "
        f"({knobs}; {nproc} CPUs, {cpu}; {tools}).\n"
    )
    print("| case | median ms | mean ± σ ms | min ms | max ms | × floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        ratio = r["median"] / floor["median"]
        print(
            f"| {r['command']} | {ms(r['median'])} | {ms(r['mean'])} ± {ms(r['stddev'] or 0)} "
            f"| {ms(r['min'])} | {ms(r['max'])} | {ratio:.2f} |"
        )
    print()
    print(
        f"- A new identity costs {ms(p256['median'] - floor['median'])} ms over the floor "
        f"with P-256 and {ms(rsa['median'] - floor['median'])} ms with RSA 2048 "
        f"(RSA/P-256: {rsa['median'] / p256['median']:.1f}×): key generation, CSR, "
        "TLS to the CA, signing, checking the answer, writing it 0600."
    )
    ossl_rsa = next((r for r in results if r["command"] == "openssl genpkey RSA 2048"), None)
    if ossl_rsa:
        print(
            f"- `openssl genpkey` makes an RSA 2048 key in {ms(ossl_rsa['median'])} ms "
            "(median, including process start)."
        )
    print()
    print("Agent memory once serving (median of 5 starts):\n")
    print("| key | VmRSS MiB | VmHWM (peak) MiB |")
    print("|---|---:|---:|")
    for name, rss, hwm in (("ECDSA P-256", p256_rss, p256_hwm), ("RSA 2048", rsa_rss, rsa_hwm)):
        print(f"| {name} | {int(rss) / 1024:.1f} | {int(hwm) / 1024:.1f} |")
    del by_name


if __name__ == "__main__":
    main()
