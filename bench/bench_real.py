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

Every group has IPv6 rows too (parameter ``family=6``; the IPv4 rows keep their
parameters): the pods are dual-stack (``podnet.Node(ipv6=True)``, host-local with two
ranges) and the IPv6 rows run the same tools between their IPv6 addresses. An IPv6/UDP
frame is at least 62 bytes (14 + 40 + 8, no payload), so the IPv6 ``real-udp-64B`` row
sends the smallest there is, 62-byte frames (66 with the FCS), said in its ``info``; its
sender and never-read sink are nettools' with an AF_INET6 socket, its counters
``/proc/net/snmp6``'s.

Each subject's node is a module-scoped fixture, made once and removed at the end
whatever happens; a subject that cannot run here (not root, a tool or the reference
plugins missing) skips with the reason.

    python -m bench --files bench_real.py        # as root: iperf3, ping, containernetworking-plugins
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import dataclass
from typing import NamedTuple

import pytest

from vswitch import lab

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


def ipv6_pair(pair):
    """The same two (dual-stack) pods, addressed by their IPv6 addresses."""
    a, b = (Endpoint(p.ns, p.ip6, p.ifname) for p in (pair.a, pair.b))
    return connected_pair(a, b, pair.facts)


@pytest.fixture(scope="module")
def pair_vswitch():
    podnet.require_subject("vswitch", tools=TOOLS)
    with podnet.Node("vswitch", tag="brv", ipv6=True) as node:
        pair = make_pair(node)
        yield {4: pair, 6: ipv6_pair(pair)}


@pytest.fixture(scope="module")
def pair_bridge():
    podnet.require_subject("bridge", tools=TOOLS)
    with podnet.Node("bridge", tag="brb", ipv6=True) as node:
        pair = make_pair(node)
        yield {4: pair, 6: ipv6_pair(pair)}


def _pair(request, subject, family):
    return request.getfixturevalue(f"pair_{subject}")[family]


def _family(family):
    """The parameters naming a row's family: none for IPv4 (its rows as they always were)."""
    return {} if family == 4 else {"family": family}


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


def measure_udp(benchmark, pair, group, subject, seconds, rounds, target=None, flood=None,
                frame_bytes=60, **params):
    flood_fn = flood or nettools.udp_flood_pps
    mpps, sent, dropped, unreach = [], [], [], []
    record(benchmark, group=group, subject=subject, unit="mpps", samples=mpps, target=target,
           info={"seconds": seconds, "sent_mpps": sent, "frame_bytes": frame_bytes,
                 "counted_at": "receiver interface",
                 "receiver": f"UDP socket on port {nettools.FLOOD_PORT}, not read",
                 "socket_drops": dropped, "icmp_unreach_sent": unreach, **pair.facts},
           **params)

    def once():
        flood = flood_fn(pair.a.ns, pair.b.ns, pair.b.ip, pair.b.ifname, seconds)
        mpps.append(flood.rx_pps / 1e6)
        sent.append(round(flood.tx_pps / 1e6, 4))
        dropped.append(flood.udp_rcvbuf_errors)
        unreach.append(flood.icmp_unreach_sent)
    benchmark.pedantic(once, rounds=rounds, iterations=1)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("subject", podnet.SUBJECTS)
def test_real_tcp(benchmark, request, subject, streams, family):
    """Pod-to-pod TCP goodput (Gbit/s, receiver side)."""
    measure_tcp(benchmark, _pair(request, subject, family), "real-tcp", subject, streams,
                TCP_SECONDS, TCP_OMIT_S, TCP_ROUNDS, target="tap-tcp" if family == 4 else None,
                **_family(family))


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("subject", podnet.SUBJECTS)
def test_real_ping(benchmark, request, subject, family):
    """Pod-to-pod ping RTT (ms): every reply is a sample."""
    measure_ping(benchmark, _pair(request, subject, family), "real-ping", subject, PING_COUNT,
                 PING_INTERVAL_S, target="ping-rtt" if family == 4 else None, **_family(family))


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("subject", podnet.SUBJECTS)
def test_real_udp_64B(benchmark, request, subject, family):
    """64-byte UDP frames per second (Mpps) arriving at the receiving pod's interface
    (IPv6: 62-byte frames, the smallest IPv6/UDP frame)."""
    if family == 4:
        measure_udp(benchmark, _pair(request, subject, 4), "real-udp-64B", subject, UDP_SECONDS,
                    UDP_ROUNDS, target="udp-64B")
    else:
        measure_udp(benchmark, _pair(request, subject, 6), "real-udp-64B", subject, UDP_SECONDS,
                    UDP_ROUNDS, flood=udp6_flood_pps, frame_bytes=62, family=6)


# ---------------------------------------------------------------- the IPv6 flood

def _inet6(src):
    """nettools' sender or sink source with an IPv6 socket (refuses a source it does not
    know how to change, so a changed nettools cannot silently flood over IPv4)."""
    out = src.replace("socket.AF_INET, socket.SOCK_DGRAM", "socket.AF_INET6, socket.SOCK_DGRAM")
    out = out.replace('s.bind(("0.0.0.0",', 's.bind(("::",')
    if out.count("AF_INET6") != 1 or "0.0.0.0" in out:
        raise RuntimeError("bench_real: nettools' UDP flood/sink changed; update _inet6")
    return out


@contextlib.contextmanager
def _udp6_sink(ns, port):
    proc = lab.nspopen(ns, sys.executable, "-c", _inet6(nettools._SINK_SRC), port, stdin=subprocess.PIPE,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lab.wait_listening(ns, port, "udp")
        yield proc
    finally:
        nettools.stop_process(proc)


def _snmp6(ns):
    return {k: int(v) for k, v in (line.split() for line in
                                   lab.nsexec(ns, "cat", "/proc/net/snmp6").stdout.splitlines() if line.strip())}


def udp6_flood_pps(sender_ns, receiver_ns, dst_ip, receiver_ifname, seconds, port=nettools.FLOOD_PORT):
    """``nettools.udp_flood_pps`` over IPv6 with empty datagrams (62-byte frames)."""
    with _udp6_sink(receiver_ns, port):
        snmp0 = _snmp6(receiver_ns)
        before = nettools.rx_packets(receiver_ns, receiver_ifname)
        out = lab.nsexec(sender_ns, sys.executable, "-c", _inet6(nettools._FLOOD_SRC), dst_ip, port, 0,
                         seconds, timeout=seconds + 30).stdout
        after = nettools.rx_packets(receiver_ns, receiver_ifname)
        snmp1 = _snmp6(receiver_ns)
    sent, took = out.split()
    took = float(took)

    def delta(name):
        return snmp1.get(name, 0) - snmp0.get(name, 0)
    return nettools.Flood((after - before) / took, int(sent) / took, delta("Udp6RcvbufErrors"),
                          delta("Udp6NoPorts"), delta("Icmp6OutDestUnreachs"))
