#!/usr/bin/env python3
"""Writes N mesh names three ways: a dnsmasq hosts file, the agent's saved
NameTable (protobuf, istio.networking.nds.v1.NameTable), and a dnsperf query
file asking for each name once (A)."""
import sys


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def main():
    n, hosts_path, table_path, queries_path = int(sys.argv[1]), *sys.argv[2:5]
    table = bytearray()
    with open(hosts_path, "w") as hosts, open(queries_path, "w") as queries:
        for i in range(n):
            name = f"svc-{i}.bench.example.com"
            ip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
            hosts.write(f"{ip} {name}\n")
            queries.write(f"{name} A\n")
            info = field(1, ip.encode()) + field(2, b"External")
            table += field(1, field(1, name.encode()) + field(2, info))
    with open(table_path, "wb") as f:
        f.write(table)


main()
