"""Shaping accuracy: the rate a pod gets, against the rate it was given.

Theory of operation
-------------------
A runtime passes ``runtimeConfig.bandwidth`` (``ingressRate``/``egressRate`` in bit/s,
``ingressBurst``/``egressBurst`` in bits) to the CNI chain; the reference ``bandwidth``
plugin turns it into tc tbf (ingress: on the host veth; egress: on an ifb device the host
veth's ingress is redirected to). vswitch does it in its core. This file measures either
the same way, through one seam:

    make_pair(bandwidth: dict) -> context manager yielding a PodPair

makes two pods that can reach each other, pod A shaped with ``bandwidth`` and pod B
unshaped, and removes them on exit. ``measure_shaping(benchmark, make_pair, subject,
rate_bps, direction)`` then runs iperf3 from B to A (``ingress``: towards the pod) or from
A to B (``egress``) and records achieved/set. ``reference_pair`` runs the reference chain
bridge + host-local + bandwidth from /usr/lib/cni as a runtime would (ADD in order with
``prevResult``, DEL in reverse), with the thread inside a node namespace of its own;
``vswitch_pair`` is the vswitch variant: a vswitchd of its own in a node namespace, both
pods added through the vswitch CNI plugin, pod A with the same
``runtimeConfig.bandwidth``. Both are a ``bench.podnet.Node`` (whose chains are
``vswitch.lab.CniChain``, also importable from here as ``CniChain``);
``test_shaping_vswitch`` measures vswitch like the plugin, so the rows sit side by side.

What is compared with the setting: shapers count Ethernet frames on the wire, iperf3
reports TCP payload (goodput). A bulk TCP stream fills every frame to the MTU, so the wire
rate is ``goodput · (mtu + 14) / mss`` (mss from iperf3, mtu from the receiving pod's
interface); that is the headline ``achieved_ratio`` (1.0 is exact, the target is within
2%). The goodput ratio is kept in ``info`` too. The first ``omit`` seconds (the initial
burst and slow start) are left out. The burst given is 100 ms at the rate, at least one
64 KiB segment: large enough to ride out scheduling delays of a loaded machine, small
enough to be spent within the omitted seconds.
"""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass

import pytest

from . import nettools, podnet
from .report import quick_mode, record
from vswitch import lab

pytestmark = pytest.mark.integration

CNI_PATH = podnet.REF_CNI
QUICK = quick_mode()
RATES_BPS = (200_000_000,) if QUICK else (20_000_000, 200_000_000, 2_000_000_000)
SECONDS, OMIT_S, ROUNDS = (3, 1, 1) if QUICK else (8, 2, 3)
#: Ethernet header bytes not counted in the MTU (no FCS, no VLAN tag).
ETH_HDR_BYTES = 14


def burst_bits_for(rate_bps):
    """100 ms at the rate, at least one 64 KiB segment with its headers (bits).

    A burst a shaper must hold without losing tokens when its timer or loop runs a little
    late on a loaded machine, and small enough to be spent within the omitted first
    seconds of a run (runtimes send far larger ones, which no short run could measure
    past)."""
    return max(rate_bps // 10, (65536 + 1514) * 8)


def bandwidth_conf(rate_bps, burst_bits):
    """``runtimeConfig.bandwidth`` shaping both directions of a pod at ``rate_bps``."""
    return {"ingressRate": rate_bps, "ingressBurst": burst_bits,
            "egressRate": rate_bps, "egressBurst": burst_bits}


@dataclass
class PodPair:
    """Two pods: namespaces, their interface names inside them and their IPv4 addresses.
    Pod A carries the shaping, pod B none."""
    ns_a: str
    ns_b: str
    if_a: str
    if_b: str
    ip_a: str
    ip_b: str


# --------------------------------------------------------------------------- the pairs

#: The CNI chain runner both pairs use (through ``podnet.Node``): ``vswitch.lab``'s, kept
#: importable from here under its old name.
CniChain = lab.CniChain


@contextlib.contextmanager
def _node_pair(subject, bandwidth, tag):
    podnet.require_subject(subject, bandwidth=True, tools=("iperf3", "ping"))
    with podnet.Node(subject, bandwidth=True, tag=tag) as node:
        a = node.add_pod({"bandwidth": bandwidth})
        b = node.add_pod()
        nettools.wait_reachable(a.ns, b.ip)
        yield PodPair(a.ns, b.ns, a.ifname, b.ifname, a.ip, b.ip)


def reference_pair(bandwidth):
    """Two pods on the reference chain bridge + host-local + bandwidth from /usr/lib/cni
    (``podnet.Node("bridge", bandwidth=True)``: run as a runtime would, with this thread
    inside a node namespace of its own, so the bridge, the host veths, the ifb device and
    the tc qdiscs land there, never in the machine's own namespace), pod A shaped by the
    bandwidth plugin with ``bandwidth``; everything removed on exit."""
    return _node_pair("bridge", bandwidth, "bsb")


def vswitch_pair(bandwidth):
    """Two pods attached through the vswitch CNI plugin to a vswitchd of their own (in a
    node namespace made here, host-local IPAM), pod A with ``runtimeConfig.bandwidth``
    (vswitch shapes in its core); everything removed on exit."""
    return _node_pair("vswitch", bandwidth, "bsv")


# --------------------------------------------------------------------------- measurement


def _mtu(ns, ifname):
    return int(lab.nsexec(ns, "cat", f"/sys/class/net/{ifname}/mtu").stdout)


def measure_shaping(benchmark, make_pair, subject, rate_bps, direction):
    """Records achieved/set of ``rate_bps`` for ``direction`` ("ingress": towards pod A,
    "egress": from pod A) through pods made by ``make_pair``."""
    if direction not in ("ingress", "egress"):
        raise ValueError(f"direction {direction!r}: accepted are 'ingress' and 'egress'")
    if rate_bps <= 0:
        raise ValueError(f"rate_bps must be > 0, got {rate_bps}")
    burst_bits = burst_bits_for(rate_bps)
    ratios, goodput_ratios, wire_mbps = [], [], []
    record(benchmark, group="shaping", subject=subject, unit="achieved_ratio",
           samples=ratios, target="shaping", rate_bps=rate_bps, direction=direction,
           info={"burst_bits": burst_bits, "seconds": SECONDS, "omit_s": OMIT_S,
                 "goodput_ratio": goodput_ratios, "wire_mbps": wire_mbps,
                 "measure": "iperf3 TCP goodput scaled to Ethernet frames"})
    with make_pair(bandwidth_conf(rate_bps, burst_bits)) as pair:
        if direction == "ingress":
            sender, receiver, sender_ip, rx_if = pair.ns_b, pair.ns_a, pair.ip_b, pair.if_a
        else:
            sender, receiver, sender_ip, rx_if = pair.ns_a, pair.ns_b, pair.ip_a, pair.if_b
        mtu = _mtu(receiver, rx_if)

        def once():
            goodput_bps, mss = nettools.tcp_goodput_and_mss(sender, receiver, sender_ip,
                                                            SECONDS, OMIT_S)
            wire_bps = goodput_bps * (mtu + ETH_HDR_BYTES) / mss
            ratios.append(wire_bps / rate_bps)
            goodput_ratios.append(round(goodput_bps / rate_bps, 4))
            wire_mbps.append(round(wire_bps / 1e6, 3))
        benchmark.pedantic(once, rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("direction", ["egress", "ingress"])
@pytest.mark.parametrize("rate_bps", RATES_BPS, ids=lambda r: f"{r // 1_000_000}Mbit")
def test_shaping_bandwidth_plugin(benchmark, rate_bps, direction):
    """The reference bandwidth plugin (tc tbf) on the reference bridge plugin's veths."""
    measure_shaping(benchmark, reference_pair, "bandwidth-plugin", rate_bps, direction)


@pytest.mark.parametrize("direction", ["egress", "ingress"])
@pytest.mark.parametrize("rate_bps", RATES_BPS, ids=lambda r: f"{r // 1_000_000}Mbit")
def test_shaping_vswitch(benchmark, rate_bps, direction):
    """vswitch's own shapers (pod attached through the vswitch CNI plugin)."""
    measure_shaping(benchmark, vswitch_pair, "vswitch", rate_bps, direction)
    ei = benchmark.extra_info
    wire, goodput = ei.get("samples") or [], ei.get("info", {}).get("goodput_ratio") or []
    if wire and goodput:
        w, g = statistics.median(wire), statistics.median(goodput)
        if abs(w - 1) > 0.02 and abs(g - 1) <= 0.02:
            ei["note"] = (f"vswitch shaping {direction} at {rate_bps / 1e6:g} Mbit/s: the wire "
                          f"rate is {w:.4f} of the setting while TCP goodput is {g:.4f} of it, "
                          f"so the shaper charged about payload bytes, not Ethernet frames; "
                          f"consistent with an offloaded (GSO/TSO) segment costing its length "
                          f"once instead of the headers of every frame it becomes on the wire")
