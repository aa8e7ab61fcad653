"""Pod to pod through vswitch against the Linux bridge, in the real kernel, same run.

Theory of operation
-------------------
Two pods on one node, the way a runtime makes them (``bench.podnet.Node``: a node
namespace of our own, pods added through a CNI chain run with the thread inside it):

- ``vswitch``: vswitchd in the node namespace, pods added through the vswitch CNI plugin
  (host-local IPAM): each pod's eth0 is a TAP whose other end is the daemon;
- ``bridge``: the reference bridge plugin (+ host-local): a Linux bridge and veths, the
  kernel's own data path, which the ``tap-tcp`` and ``ping-rtt`` targets compare with.

Measured with the tools of ``bench.nettools`` by the ``measure_*`` functions here, which
``bench_ovs.py`` and ``bench_growth.py`` call too (OVS's rows sit beside these: same
groups, same parameters, same durations, the same code):

- ``real-tcp``: iperf3 TCP from pod A to pod B, 1 and 4 streams, Gbit/s counted by the
  receiver (omitted slow-start seconds excluded); one sample per iperf3 run;
- ``real-ping``: ping from A to B at a 10 ms interval (5 ms in the full run), every
  reply's RTT a sample, after ARP and MAC learning settled;
- ``real-udp-64B``: 60-byte frames (64 with the FCS) sent flat out by nettools'
  ``sendmmsg`` flooder in A to a UDP socket bound in B (never read: a full buffer drops
  silently, where no socket would make B's kernel answer each datagram with an ICMP port
  unreachable), counted at B's eth0 (``rx_packets``): Mpps the path delivers; the sent
  rate, the socket's drops and any ICMP unreachables B sent are in ``info``.

Each subject's node is a module-scoped fixture, made once and removed at the end
whatever happens; a subject that cannot run here (not root, a tool or the reference
plugins missing) skips with the reason.

    python -m bench --files bench_real.py        # as root: iperf3, ping, containernetworking-plugins
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import pytest

from . import nettools, podnet
from .report import quick_mode, record

pytestmark = pytest.mark.integration

QUICK = quick_mode()
# bench_ovs.py imports these: its rows are measured exactly as these
TCP_SECONDS, TCP_OMIT_S, TCP_ROUNDS = (2, 0, 1) if QUICK else (8, 1, 3)
UDP_SECONDS, UDP_ROUNDS = (1, 1) if QUICK else (3, 3)
PING_COUNT, PING_INTERVAL_S = (100, 0.01) if QUICK else (1000, 0.005)
TOOLS = ("iperf3", "ping")


class Endpoint(NamedTuple):
    """One end of a pair: its namespace, IPv4 address and interface (a ``podnet.Pod``
    has these too)."""
    ns: str
    ip: str
    ifname: str


@dataclass
class PodPair:
    """Two pods that reach each other (A sends, B receives; each with ``ns``, ``ip`` and
    ``ifname``) and the facts every row of theirs records in ``info``."""
    a: object
    b: object
    facts: dict


def connected_pair(a, b, facts):
    """A :class:`PodPair` of ``a`` and ``b`` once each reaches the other."""
    nettools.wait_reachable(a.ns, b.ip)
    nettools.wait_reachable(b.ns, a.ip)
    return PodPair(a, b, facts)


def make_pair(node):
    """Adds two pods to ``node`` and waits until each reaches the other."""
    a, b = node.add_pod(), node.add_pod()
    return connected_pair(a, b, node.facts())


@pytest.fixture(scope="module")
def pair_vswitch():
    podnet.require_subject("vswitch", tools=TOOLS)
    with podnet.Node("vswitch", tag="brv") as node:
        yield make_pair(node)


@pytest.fixture(scope="module")
def pair_bridge():
    podnet.require_subject("bridge", tools=TOOLS)
    with podnet.Node("bridge", tag="brb") as node:
        yield make_pair(node)


# ---------------------------------------------------------------- measurements (also growth)


def measure_tcp(benchmark, pair, group, subject, streams, seconds, omit_s, rounds, target=None,
                **params):
    gbps = []
    record(benchmark, group=group, subject=subject, unit="gbps", samples=gbps, target=target,
           info={"seconds": seconds, "omit_s": omit_s, "tool": "iperf3 -R", **pair.facts},
           streams=streams, **params)

    def once():
        gbps.append(nettools.tcp_rate_bps(pair.a.ns, pair.b.ns, pair.a.ip, seconds, streams,
                                          omit_s) / 1e9)
    benchmark.pedantic(once, rounds=rounds, iterations=1)


def measure_ping(benchmark, pair, group, subject, count, interval_s, target=None, **params):
    rtts = []
    record(benchmark, group=group, subject=subject, unit="rtt_ms", samples=rtts, target=target,
           info={"count": count, "interval_s": interval_s, **pair.facts}, **params)
    nettools.ping_rtts_ms(pair.a.ns, pair.b.ip, 5, 0.01)        # ARP, MAC learning settled

    def once():
        rtts.extend(nettools.ping_rtts_ms(pair.a.ns, pair.b.ip, count, interval_s))
    benchmark.pedantic(once, rounds=1, iterations=1)


def measure_udp(benchmark, pair, group, subject, seconds, rounds, target=None, **params):
    mpps, sent, dropped, unreach = [], [], [], []
    record(benchmark, group=group, subject=subject, unit="mpps", samples=mpps, target=target,
           info={"seconds": seconds, "sent_mpps": sent, "frame_bytes": 60,
                 "counted_at": "receiver interface",
                 "receiver": f"UDP socket on port {nettools.FLOOD_PORT}, not read",
                 "socket_drops": dropped, "icmp_unreach_sent": unreach, **pair.facts},
           **params)

    def once():
        flood = nettools.udp_flood_pps(pair.a.ns, pair.b.ns, pair.b.ip, pair.b.ifname,
                                       seconds)
        mpps.append(flood.rx_pps / 1e6)
        sent.append(round(flood.tx_pps / 1e6, 4))
        dropped.append(flood.udp_rcvbuf_errors)
        unreach.append(flood.icmp_unreach_sent)
    benchmark.pedantic(once, rounds=rounds, iterations=1)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("subject", podnet.SUBJECTS)
def test_real_tcp(benchmark, request, subject, streams):
    """Pod-to-pod TCP goodput (Gbit/s, receiver side)."""
    pair = request.getfixturevalue(f"pair_{subject}")
    measure_tcp(benchmark, pair, "real-tcp", subject, streams, TCP_SECONDS, TCP_OMIT_S,
                TCP_ROUNDS, target="tap-tcp")


@pytest.mark.parametrize("subject", podnet.SUBJECTS)
def test_real_ping(benchmark, request, subject):
    """Pod-to-pod ping RTT (ms): every reply is a sample."""
    pair = request.getfixturevalue(f"pair_{subject}")
    measure_ping(benchmark, pair, "real-ping", subject, PING_COUNT, PING_INTERVAL_S,
                 target="ping-rtt")


@pytest.mark.parametrize("subject", podnet.SUBJECTS)
def test_real_udp_64B(benchmark, request, subject):
    """64-byte UDP frames per second (Mpps) arriving at the receiving pod's interface."""
    pair = request.getfixturevalue(f"pair_{subject}")
    measure_udp(benchmark, pair, "real-udp-64B", subject, UDP_SECONDS, UDP_ROUNDS,
                target="udp-64B")
