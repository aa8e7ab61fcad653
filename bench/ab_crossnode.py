"""Two vswitchd settings side by side on a two-node VXLAN cluster: cross-node TCP (one
stream), cross-node and same-node ping RTT, in alternating rounds.

    python -m bench.ab_crossnode "--poll-bulk-kib 32" ""         # as root: iperf3, ping
    python -m bench.ab_crossnode --rounds 5 --seconds 8 "" "--poll-us 0" "--busy-poll"

Theory of operation
-------------------
Each argument is one variant: the extra ``vswitchd`` arguments of both nodes (``""``: the
defaults). Per round, each variant in turn gets a fresh cluster (``vswitch.lab.cluster``:
two vswitch nodes, two pods each, the underlay bridge without netfilter as in
bench_crossnode.py), measures, and is removed before the next one starts, so no variant's
daemons (a busy-polling one fills a core) run beside another's measurement. A round
measures iperf3 from pod A (node 1) to pod B (node 2) for ``--seconds`` (the first left
out), then ``--pings`` pings A -> B and A -> A2 (node 1) at 5 ms. Alternating rounds put
the machine's drift on every variant alike; the medians over rounds are printed with every
round's value. This is the quick question "does this setting help?"; the figures of record
come from ``python -m bench --files bench_crossnode.py``, beside the kernel's VXLAN.
"""
from __future__ import annotations

import argparse
import re
import statistics

from vswitch import lab
from vswitch.lab import cluster

from .bench_crossnode import _underlay_plain


def _rtt_median_ms(ns: str, ip: str, count: int) -> float:
    out = lab.nsexec(ns, "ping", "-c", str(count), "-i", "0.005", ip).stdout
    return statistics.median(float(x) for x in re.findall(r"time=([\d.]+)", out))


def one_round(daemon_args: tuple, seconds: int, pings: int) -> dict:
    c = cluster.Cluster(2, kinds="vswitch", pods_per_node=2, port=cluster.IANA_VXLAN_PORT,
                        node_kwargs={"vswitch": {"daemon_args": daemon_args}})
    c.open()
    try:
        _underlay_plain(c.underlay)
        a, a2 = c.nodes[0].pods
        b = c.nodes[1].pods[0]
        res = lab.iperf3(b.ns, b.ip, a.ns, seconds=seconds, omit_s=1)
        return {"tcp_gbps": round(res["end"]["sum_received"]["bits_per_second"] / 1e9, 3),
                "cross_rtt_ms": _rtt_median_ms(a.ns, b.ip, pings),
                "same_rtt_ms": _rtt_median_ms(a.ns, a2.ip, pings)}
    finally:
        c.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab_crossnode", description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+", help='extra vswitchd arguments per variant ("" = defaults)')
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per round (the first is left out)")
    ap.add_argument("--pings", type=int, default=200)
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.seconds < 2 or a.pings < 1:
        ap.error("--rounds >= 1, --seconds >= 2, --pings >= 1")
    got = {v: [] for v in a.variants}
    for r in range(a.rounds):
        for v in a.variants:
            got[v].append(one_round(tuple(v.split()), a.seconds, a.pings))
            print(f"round {r + 1} {v or '(defaults)'}: {got[v][-1]}", flush=True)
    print("\n| variant | TCP Gbit/s | cross-node RTT ms | same-node RTT ms | cross ÷ same |\n|---|---|---|---|---|")
    for v, rows in got.items():
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        every = {k: ", ".join(str(row[k]) for row in rows) for k in rows[0]}
        print(f"| {v or '(defaults)'} | {med['tcp_gbps']:.2f} ({every['tcp_gbps']}) | "
              f"{med['cross_rtt_ms']:.3f} ({every['cross_rtt_ms']}) | {med['same_rtt_ms']:.3f} "
              f"({every['same_rtt_ms']}) | {med['cross_rtt_ms'] / med['same_rtt_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
