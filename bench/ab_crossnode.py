"""Two vswitchd settings side by side on a two-node VXLAN cluster: cross-node TCP (one
stream), cross-node and same-node ping RTT, in alternating rounds.

    python -m bench.ab_crossnode "--poll-bulk-kib 32" ""         # as root: iperf3, ping
    python -m bench.ab_crossnode --rounds 5 --seconds 8 -- "" "--poll-us 0" "--busy-poll"

Theory of operation
-------------------
Each argument is one variant: the extra ``vswitchd`` arguments of both nodes (``""``: the
defaults). Per round, each variant in turn gets a fresh cluster (bench_crossnode.py's
``_pairs``: two vswitch nodes, two pods each, the underlay bridge without netfilter),
measures, and is removed before the next one starts, so no variant's
daemons (a busy-polling one fills a core) run beside another's measurement. A round
measures iperf3 from pod A (node 1) to pod B (node 2) for ``--seconds`` (the first left
out), then ``--pings`` pings A -> B and A -> A2 (node 1) at 5 ms. Alternating rounds put
the machine's drift on every variant alike; the medians over rounds are printed with every
round's value. This is the quick question "does this setting help?"; the figures of record
come from ``python -m bench --files bench_crossnode.py``, beside the kernel's VXLAN.

``--perf DIR`` (needs perf) also records ``perf record -a`` for 4 s in the middle of every
TCP measurement into DIR/variant<k>-round<r>.data and prints where the machine's CPU went:
per command (the daemons are ``python``) and, for the daemons, by kind of kernel or user
work (copies, the network core, TCP/IP, our Cython, scheduling, syscalls), from
``perf report --sort sym``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import threading
import time

from vswitch import lab

from .bench_crossnode import _pairs
from .nettools import alternate, cell, rtt_median_ms, rtt_ratio


#: what a daemon's samples are, by symbol (first match wins; the rest is "other")
CATEGORIES = (
    ("copies", r"copy_(to|from)_iter|copy_page|memcpy|memmove|copy_user"),
    ("ours (Cython)", r"__pyx"),
    ("scheduling, wakeups", r"schedule|switch_to|finish_task_switch|yield|pick_|enqueue|dequeue|update_curr"
                            r"|wake|ttwu|select_task|idle|sched|spin_unlock_irqrestore"),
    ("TCP/IP", r"tcp_|^ip_|ipv4|inet|fib_|udp|icmp|__ip|raw_"),
    ("network core", r"netif|skb|dev_|veth|br_|napi|softirq|gro|gso|net_rx|nf_|fdb|packet_|sock|tun_"),
    ("memory", r"kmem|kfree|alloc|page|slab|free"),
    ("syscalls, epoll", r"syscall|entry|fdget|fput|iovec|check_object|virt_addr|rw_verify|exit_to_user|epoll|__x64"),
)


def perf_summary(data: str) -> str:
    """Where the CPU went in a ``perf record -a`` file: % of all samples per command, and the
    daemons' (``python``) samples by CATEGORIES."""
    def report(*args):
        return subprocess.run(["perf", "report", "-i", data, "--stdio", *args], capture_output=True,
                              text=True, check=True).stdout
    comms = re.findall(r"^\s*([\d.]+)%\s+(\S+)\s*$", report("--sort", "comm"), re.M)
    cats = dict.fromkeys([c for c, _ in CATEGORIES] + ["other"], 0.0)
    for pct, sym in re.findall(r"^\s*([\d.]+)%\s+\[.\]\s+(\S+)", report("--comm", "python", "--sort", "sym"), re.M):
        cat = next((c for c, rx in CATEGORIES if re.search(rx, sym)), "other")
        cats[cat] += float(pct)
    total = sum(cats.values()) or 1.0
    lines = ["CPU by command (% of all samples): " + ", ".join(f"{c} {p}" for p, c in comms[:6]),
             "the daemons' samples by kind (% of the daemons' samples): "
             + ", ".join(f"{c} {100 * v / total:.1f}" for c, v in sorted(cats.items(), key=lambda kv: -kv[1]))]
    return "\n".join(lines)


def _perf_during(out: str, delay_s: float):
    """A thread that waits ``delay_s`` and records the whole machine for 4 s into ``out``."""
    def rec():
        time.sleep(delay_s)
        subprocess.run(["perf", "record", "-a", "-F", "1999", "-o", out, "--", "sleep", "4"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    t = threading.Thread(target=rec)
    t.start()
    return t


def one_round(daemon_args: tuple, seconds: int, pings: int, perf_out: str | None = None) -> dict:
    with contextlib.contextmanager(_pairs)("vswitch", daemon_args) as pairs:
        a, b = pairs["cross"].a, pairs["cross"].b
        a2 = pairs["same"].b
        rec = _perf_during(perf_out, max(1.0, (seconds - 4) / 2 + 0.5)) if perf_out else None
        res = lab.iperf3(b.ns, b.ip, a.ns, seconds=seconds, omit_s=1)
        if rec is not None:
            rec.join()
        return {"tcp_gbps": round(res["end"]["sum_received"]["bits_per_second"] / 1e9, 3),
                "cross_rtt_ms": rtt_median_ms(a.ns, b.ip, pings),
                "same_rtt_ms": rtt_median_ms(a.ns, a2.ip, pings)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab_crossnode", description=__doc__.split("\n")[0])
    ap.add_argument("variants", nargs="+", help='extra vswitchd arguments per variant ("" = defaults; put -- before '
                         'them when one is a single option such as "--busy-poll")')
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per round (the first is left out)")
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--perf", metavar="DIR", help="perf record -a during each TCP measurement, into DIR")
    a = ap.parse_args(argv)
    if a.rounds < 1 or a.seconds < 2 or a.pings < 1:
        ap.error("--rounds >= 1, --seconds >= 2, --pings >= 1")
    if a.perf and a.seconds < 6:
        ap.error("--perf records 4 s inside the measurement: --seconds >= 6")
    if a.perf:
        os.makedirs(a.perf, exist_ok=True)

    def measure(k, r, v):
        data = os.path.join(a.perf, f"variant{k}-round{r + 1}.data") if a.perf else None
        res = one_round(tuple(v.split()), a.seconds, a.pings, data)
        if data:
            print(perf_summary(data), flush=True)
        return res

    got = alternate(a.variants, a.rounds, measure)
    print("\n| variant | TCP Gbit/s | cross-node RTT ms | same-node RTT ms | cross ÷ same |\n|---|---|---|---|---|")
    for v, rows in got.items():
        print(f"| {v or '(defaults)'} | {cell(rows, 'tcp_gbps', 2)} | {cell(rows, 'cross_rtt_ms')} | "
              f"{cell(rows, 'same_rtt_ms')} | {rtt_ratio(rows):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
