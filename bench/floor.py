"""The floor under vswitchd's cross-node figures: ``vxfloor`` (bench/vxfloor.c), the least
work a TAP + AF_PACKET VXLAN data path can do, on the same underlay as the cluster.

    python -m bench.floor                       # as root: gcc, iperf3, ping; a Markdown table
    python -m bench.floor --rounds 5 --variants csum,csum+tx-ring

Theory of operation
-------------------
Issue 13 asks for cross-node TCP >= 0.8x the kernel's VXLAN node pair and a cross-node RTT
within 1.3x of our same-node RTT. Whether a goal is out of reach of vswitchd's loop or of
the design (pods on TAPs, the uplink an AF_PACKET socket, a userspace process per node) is
a measurement: ``vxfloor`` keeps the design and drops everything else (no MAC table,
routing, checks, shaping, counters or batching; see its header). Its figures bound what
making our loop cheaper can gain. ``--variants ...+tx-ring`` measures the one kernel
interface the design leaves unused that could lift the floor itself, a zero-copy
PACKET_TX_RING send (docs/cluster.md "The floor": on this underlay of veths it does not).

``floor_pairs`` builds what ``bench_crossnode._pairs`` builds, with ``vxfloor`` instead of
vswitchd: an underlay bridge (``cluster.Underlay``, bridge netfilter off, MTU 1500), two
node namespaces on it (their underlay addresses removed, as vswitchd moves them off the
NIC), a ``vxfloor vxlan`` per node with one pod (TAP, MTU 1450) on it, the two pods on one
overlay subnet (an L2 tunnel: ARP crosses it), and on node 1 a ``vxfloor pair`` with two
more pods for the same-node figure. Every ``vxfloor`` is a process this module started;
it is stopped by PID before the namespaces go, in every outcome.

bench_crossnode.py measures it as the subjects ``c-floor`` and ``c-floor-nocsum`` beside
the kernel pair and vswitchd (its figures of record); ``python -m bench.floor`` is the quick look, alternating
rounds of the variants in ``VARIANTS`` (by default with and without the inner checksums:
``--csum``, vswitchd computes them, a wire that may cut the packet needs them).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile

from vswitch import lab
from vswitch.lab import cluster

from . import bench_real, nettools
from .nettools import alternate, cell, rtt_median_ms, rtt_ratio

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vxfloor.c")
CROSS_NET = "10.247.0.{}"              # the two pods of the tunnel: one L2 segment
SAME_NET = "10.247.1.{}"               # the two pods of the same-node pair
PREFIX = 24


def build(outdir: str) -> str:
    """Compiles vxfloor.c into ``outdir``; returns the binary's path."""
    nettools.require("gcc")
    out = os.path.join(outdir, "vxfloor")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", out, SOURCE], check=True, capture_output=True)
    return out


def _start(ns: str, argv: list) -> subprocess.Popen:
    """``argv`` in ``ns``; returns once it printed ready (its TAPs exist)."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise RuntimeError(f"vxfloor in {ns} did not start: {line!r} {p.communicate()[1]!r}")
    return p


def _pod(nss, node_ns: str, tap: str, role: str, ip: str, mtu: int) -> bench_real.Endpoint:
    pod_ns = nss.new(role)
    lab.nsexec(node_ns, "ip", "link", "set", tap, "netns", pod_ns)
    lab.nsexec(pod_ns, "ip", "link", "set", tap, "mtu", str(mtu))
    lab.nsexec(pod_ns, "ip", "addr", "add", f"{ip}/{PREFIX}", "dev", tap)
    lab.nsexec(pod_ns, "ip", "link", "set", tap, "up")
    return bench_real.Endpoint(pod_ns, ip, tap)


def floor_pairs(csum: bool = True, tx_ring: bool = False):
    """Yields {"cross": pod on node 1 -> pod on node 2, "same": two pods of node 1,
    "underlay": the ``cluster.Underlay`` (its bridge ports are ``n1`` and ``n2``),
    "tso_sent": a function, each node's TSO segments sent from the TX ring and by sendmsg} on
    ``vxfloor`` processes (module docstring); removes everything in every outcome."""
    nettools.require("iperf3", "ping")
    workdir = tempfile.mkdtemp(prefix=f"bench-floor-{lab.uid()}-")
    underlay = nss = None
    procs = []
    try:
        binary = build(workdir)
        underlay = cluster.Underlay().open()
        bridge_nf = nettools.underlay_plain(underlay)
        nss = lab.Namespaces(prefix="cf")
        nodes = []
        for i in (1, 2):
            ns = nss.new(f"{i}n")
            ip = underlay.attach(f"n{i}", ns, i)
            lab.nsexec(ns, "ip", "addr", "flush", "dev", cluster.UNDERLAY_IFNAME)
            mac = lab.nsexec(ns, "cat", f"/sys/class/net/{cluster.UNDERLAY_IFNAME}/address").stdout.strip()
            nodes.append((ns, ip, mac))
        mtu = underlay.mtu - cluster.VXLAN_OVERHEAD_BYTES
        flags = (["--csum"] if csum else []) + (["--tx-ring"] if tx_ring else [])
        uid = lab.uid()
        pods = []
        for i, (ns, ip, _) in enumerate(nodes):
            other = nodes[1 - i]
            tap = f"fx{i}{uid}"[:15]
            procs.append(_start(ns, [binary, "vxlan", tap, cluster.UNDERLAY_IFNAME, ip, other[1], other[2],
                                     str(cluster.DEFAULT_VNI), str(cluster.IANA_VXLAN_PORT), *flags]))
            pods.append(_pod(nss, ns, tap, f"{i}p", CROSS_NET.format(i + 1), mtu))
        taps = [f"fs{k}{uid}"[:15] for k in (1, 2)]
        procs.append(_start(nodes[0][0], [binary, "pair", *taps]))
        same = [_pod(nss, nodes[0][0], t, f"s{k}", SAME_NET.format(k + 1), mtu) for k, t in enumerate(taps)]
        facts = {"nodes": 2, "kind": "c-floor", "vni": cluster.DEFAULT_VNI, "udp_port": cluster.IANA_VXLAN_PORT,
                 "underlay_mtu": underlay.mtu, "pod_mtu": mtu, "underlay_bridge_nf": bridge_nf,
                 "inner_csum": csum, "tx_ring": tx_ring,
                 "datapath": "pod TAP - vxfloor (bench/vxfloor.c) - uplink AF_PACKET"}
        def tso_sent():
            """Per node: TSO segments its vxfloor sent {"ring": from the TX ring, "copy": by sendmsg}."""
            out = []
            for p in procs[:2]:
                p.send_signal(signal.SIGUSR1)
                words = p.stdout.readline().split()         # "tso ring N copy M"
                out.append({"ring": int(words[2]), "copy": int(words[4])})
            return out

        yield {"cross": bench_real.connected_pair(pods[0], pods[1], facts),
               "same": bench_real.connected_pair(*same, {**facts, "path": "same node: pod TAP - vxfloor pair - pod TAP"}),
               "underlay": underlay, "tso_sent": tso_sent}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if nss is not None:
            nss.cleanup()
        if underlay is not None:
            underlay.close()
        shutil.rmtree(workdir, ignore_errors=True)


#: python -m bench.floor's variants: floor_pairs' keyword arguments
VARIANTS = {"csum": {"csum": True}, "no-csum": {"csum": False},
            "csum+tx-ring": {"csum": True, "tx_ring": True}, "no-csum+tx-ring": {"csum": False, "tx_ring": True}}


def one_round(variant: dict, seconds: int, pings: int) -> dict:
    with contextlib.contextmanager(floor_pairs)(**variant) as pairs:
        a, b = pairs["cross"].a, pairs["cross"].b
        s1, s2 = pairs["same"].a, pairs["same"].b
        cross = lab.iperf3(b.ns, b.ip, a.ns, seconds=seconds, omit_s=1)
        same = lab.iperf3(s2.ns, s2.ip, s1.ns, seconds=seconds, omit_s=1)
        return {"cross_tcp_gbps": round(cross["end"]["sum_received"]["bits_per_second"] / 1e9, 3),
                "same_tcp_gbps": round(same["end"]["sum_received"]["bits_per_second"] / 1e9, 3),
                "cross_rtt_ms": rtt_median_ms(a.ns, b.ip, pings), "same_rtt_ms": rtt_median_ms(s1.ns, s2.ip, pings)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="iperf3 duration per round (the first is left out)")
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--variants", default="csum,no-csum",
                    help=f"comma-separated, measured in turns: {', '.join(VARIANTS)} (default: csum,no-csum)")
    a = ap.parse_args(argv)
    names = [v for v in a.variants.split(",") if v]
    if a.rounds < 1 or a.seconds < 2 or a.pings < 1:
        ap.error("--rounds >= 1, --seconds >= 2, --pings >= 1")
    if not names or any(v not in VARIANTS for v in names):
        ap.error(f"--variants {a.variants!r}: accepted are {', '.join(VARIANTS)}")
    got = alternate(names, a.rounds, lambda k, r, v: one_round(VARIANTS[v], a.seconds, a.pings))
    print("\n| vxfloor | cross-node TCP Gbit/s | same-node TCP | cross-node RTT ms | same-node RTT ms | cross ÷ same RTT |")
    print("|---|---|---|---|---|---|")
    for v, rows in got.items():
        print(f"| {v} | {cell(rows, 'cross_tcp_gbps', 2)} | {cell(rows, 'same_tcp_gbps', 2)} | "
              f"{cell(rows, 'cross_rtt_ms')} | {cell(rows, 'same_rtt_ms')} | {rtt_ratio(rows):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
