"""What the real-network benchmarks measure with, beyond ``vswitch.lab``.

Theory of operation
-------------------
Namespaces, commands inside them, unique names, ``ping`` and ``iperf3`` are
``vswitch.lab``'s (``Namespaces``, ``sh``/``nsexec``/``nspopen``, ``uid``, ``ping``,
``iperf3``, ``wait_listening``); this module adds only what a benchmark needs on top, so
every figure is taken the same way whichever subject carries the traffic:

- TCP throughput, any number of streams: ``lab.iperf3`` with the server in the sending
  namespace and the client in the receiving one with ``-R``, so the client's own
  per-interval figures are receiver-side counts (:func:`tcp_goodput_and_mss`); intervals
  marked omitted (``--omit``: slow start, the shaper's initial burst) are excluded, and so
  is the first one after them (iperf3 3.12 misreports its duration:
  :func:`receiver_intervals`). Where the client reaches the server on another port than
  the one it listens on (a hostPort mapping), :func:`start_iperf_server` and
  :func:`iperf_client` run the two halves separately;
- 64-byte UDP frames per second: a ``sendmmsg`` flooder in the sending namespace (iperf3
  3.12 cannot send fast enough here) towards a UDP socket bound in the receiving one
  (:func:`udp_sink`), counted at the receiving interface (``rx_packets``). The socket is
  never read: once its buffer is full the kernel drops each further datagram silently
  (``RcvbufErrors``), the cheapest thing a receiver can do, and the same on every
  subject. Without it the receiver's kernel would answer every datagram with an ICMP port
  unreachable, work that lands on the switch's thread (a TAP write runs the receiver's
  stack in the writer's context) and whose replies cross the switch again;
- round-trip time: ``lab.ping`` at a short interval, every reply's time kept as a sample.

Nothing here imports pyroute2 (only ``vswitch/daemon/netlink.py`` does). Tools and privileges
missing on the machine turn into ``pytest.skip`` with the reason, through ``require()``.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from typing import NamedTuple

from vswitch import lab

IPERF_PORT = 5201
#: UDP payload making a 60-byte frame (64 on the wire with the FCS):
#: 14 Ethernet + 20 IPv4 + 8 UDP + 18 = 60.
UDP_64B_PAYLOAD = 18
#: The flood's destination port (discard), where :func:`udp_sink` binds in the receiver.
FLOOD_PORT = 9


def require(*binaries, root=True):
    """Skip the calling benchmark unless namespaces and TAP devices can be used here
    (``lab.kernel_unavailable``; when ``root``) and every binary is on PATH."""
    import pytest
    why = lab.kernel_unavailable() if root else None
    if why:
        pytest.skip(why)
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


# ---------------------------------------------------------------- TCP (iperf3)


def start_iperf_server(ns, port=IPERF_PORT):
    """An iperf3 server for one test (``-1``) in namespace ``ns``, listening on ``port``
    when this returns; end it with :func:`stop_process`."""
    proc = lab.nspopen(ns, "iperf3", "-s", "-1", "-p", port,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lab.wait_listening(ns, port)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def stop_process(proc, timeout_s=5.0):
    """Ends a child we started (``proc``, e.g. ``ip netns exec`` → iperf3): SIGTERM,
    then SIGKILL after ``timeout_s``; closes its pipes."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


def iperf_client(ns, server_ip, port, seconds, args=()):
    """iperf3's client in namespace ``ns`` towards ``server_ip``:``port`` with ``-R``
    (the server sends, this side counts) for ``seconds``; its JSON result."""
    r = lab.nsexec(ns, "iperf3", "-c", server_ip, "-p", port, "-R", "-J", "-t", seconds,
                   *args, check=False, timeout=seconds + 30)
    try:
        data = json.loads(r.stdout)
    except ValueError:
        raise RuntimeError(f"iperf3 client in {ns}: no JSON: "
                           f"{(r.stdout or r.stderr).strip()[:300]}") from None
    if data.get("error"):
        raise RuntimeError(f"iperf3 client in {ns}: {data['error']}")
    return data


def receiver_intervals(data):
    """(bytes, seconds) summed over the client's non-omitted intervals.

    The first interval after omitted ones is left out too: iperf3 3.12 sometimes reports
    it with the omitted second's duration added (seconds 2.0, bytes of one second), which
    made throughput read 8/9 of the truth in an 8-second run."""
    total_b = total_s = 0
    after_omitted = False
    for iv in data.get("intervals", []):
        s = iv.get("sum", {})
        if s.get("omitted"):
            after_omitted = True
            continue
        if after_omitted:
            after_omitted = False
            continue
        total_b += s.get("bytes", 0)
        total_s += s.get("seconds", 0.0)
    return total_b, total_s


def goodput_bps(data):
    """Receiver-counted goodput of an iperf3 ``-R`` result in bit/s over
    :func:`receiver_intervals` (iperf3's own end-of-run figure when none are left)."""
    b, s = receiver_intervals(data)
    if s > 0:
        return 8 * b / s
    return float(data["end"]["sum_received"]["bits_per_second"])


def tcp_goodput_and_mss(sender_ns, receiver_ns, sender_ip, seconds, omit_s=0, streams=1,
                        port=IPERF_PORT):
    """Receiver-measured TCP goodput in bit/s from ``sender_ns`` to ``receiver_ns`` over
    the non-omitted intervals, and the connection's MSS in bytes (None if not reported)."""
    data = lab.iperf3(sender_ns, sender_ip, receiver_ns, seconds=seconds, streams=streams,
                      reverse=True, omit_s=omit_s, port=port)
    return goodput_bps(data), data.get("start", {}).get("tcp_mss_default")


def tcp_rate_bps(sender_ns, receiver_ns, sender_ip, seconds, streams=1, omit_s=0,
                 port=IPERF_PORT):
    """Receiver-measured TCP goodput in bit/s from ``sender_ns`` to ``receiver_ns``."""
    return tcp_goodput_and_mss(sender_ns, receiver_ns, sender_ip, seconds, omit_s, streams,
                               port)[0]


# ---------------------------------------------------------------- 64-byte UDP frames


# The 64-byte frame sender: sendmmsg(2) of 256 datagrams per call through ctypes (a
# Python send() per datagram tops out near 0.2 Mpps here, iperf3 3.12's UDP sender near
# 0.13 Mpps: both below the 0.25 Mpps target, so neither can measure it). Runs in the
# sending namespace; prints "<sent> <seconds>".
_FLOOD_SRC = r"""
import ctypes, ctypes.util, socket, sys, time
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.POINTER(iovec)), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
dst, port, payload, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
B = 256
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, port))
buf = ctypes.create_string_buffer(b"x" * payload)
iov = iovec(ctypes.cast(buf, ctypes.c_void_p), payload)
msgs = (mmsghdr * B)()
for m in msgs:
    m.hdr.iov = ctypes.pointer(iov)
    m.hdr.iovlen = 1
fd, sendmmsg, clock = s.fileno(), libc.sendmmsg, time.perf_counter
sent, t0 = 0, clock()
end = t0 + seconds
while clock() < end:
    r = sendmmsg(fd, msgs, B, 0)
    if r > 0:
        sent += r
print(sent, clock() - t0)
"""

# The receiver's socket: bound, never read, held until stdin closes (see the module
# docstring: a full buffer drops silently, where no socket would mean an ICMP reply each).
_SINK_SRC = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
sys.stdin.read()
"""


@contextlib.contextmanager
def udp_sink(ns, port=FLOOD_PORT):
    """A UDP socket bound to ``port`` in namespace ``ns`` for the ``with`` block, never
    read (the kernel drops what its full buffer cannot take, silently)."""
    proc = lab.nspopen(ns, sys.executable, "-c", _SINK_SRC, port, stdin=subprocess.PIPE,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        try:
            lab.wait_listening(ns, port, "udp")
        except RuntimeError:
            if proc.poll() is not None:
                raise RuntimeError(f"UDP sink in {ns} exited with {proc.returncode}: "
                                   f"{proc.stderr.read().strip()[-300:]}") from None
            raise
        yield proc
    finally:
        stop_process(proc)


def rx_packets(ns, ifname):
    """The rx_packets counter of ``ifname`` inside namespace ``ns``."""
    return int(lab.nsexec(ns, "cat", f"/sys/class/net/{ifname}/statistics/rx_packets").stdout)


def snmp_counters(ns):
    """``/proc/net/snmp`` of namespace ``ns`` as {"Udp": {"NoPorts": n, ...}, "Icmp": ...}."""
    lines = lab.nsexec(ns, "cat", "/proc/net/snmp").stdout.splitlines()
    out = {}
    for names, values in zip(lines[::2], lines[1::2]):
        proto, names = names.split(":", 1)
        out[proto] = dict(zip(names.split(), map(int, values.split(":", 1)[1].split())))
    return out


class Flood(NamedTuple):
    """One flood: frames per second received at the interface and sent, and what the
    receiver's kernel did with the datagrams (deltas over the flood)."""
    rx_pps: float
    tx_pps: float
    udp_rcvbuf_errors: int       # dropped silently at the sink's full buffer
    udp_no_ports: int            # arrived with no socket on the port (0 with the sink)
    icmp_unreach_sent: int       # ICMP destination unreachable sent back (≈ 0 with the sink)


def udp_flood_pps(sender_ns, receiver_ns, dst_ip, receiver_ifname, seconds,
                  payload_bytes=UDP_64B_PAYLOAD, port=FLOOD_PORT, sink=True):
    """64-byte frames per second arriving at ``receiver_ifname`` (in ``receiver_ns``)
    while ``sender_ns`` sends UDP to ``dst_ip``:``port`` flat out for ``seconds``, with a
    :func:`udp_sink` on that port in the receiver (``sink=False``: none, the receiver
    answers ICMP port unreachable; for comparison only); a :class:`Flood`. Counted at the
    receiving interface, so the result is what the path delivers, not what a receiving
    application keeps up with."""
    with udp_sink(receiver_ns, port) if sink else contextlib.nullcontext():
        snmp0 = snmp_counters(receiver_ns)
        before = rx_packets(receiver_ns, receiver_ifname)
        out = lab.nsexec(sender_ns, sys.executable, "-c", _FLOOD_SRC, dst_ip, port,
                         payload_bytes, seconds, timeout=seconds + 30).stdout
        after = rx_packets(receiver_ns, receiver_ifname)
        snmp1 = snmp_counters(receiver_ns)
    sent, took = out.split()
    took = float(took)

    def delta(proto, name):
        return snmp1.get(proto, {}).get(name, 0) - snmp0.get(proto, {}).get(name, 0)
    return Flood((after - before) / took, int(sent) / took, delta("Udp", "RcvbufErrors"),
                 delta("Udp", "NoPorts"), delta("Icmp", "OutDestUnreachs"))


# ---------------------------------------------------------------- ping


_RTT = re.compile(r"time[=<]([0-9.]+) ms")


def ping_rtts_ms(ns, dst_ip, count, interval_s=0.01, timeout_s=None):
    """Every echo reply's round-trip time in ms, from namespace ``ns`` to ``dst_ip``
    (``lab.ping``'s output, each reply's ``time=``)."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    r = lab.ping(ns, dst_ip, count, interval_s, timeout_s=timeout_s or count * interval_s + 15)
    rtts = [float(t) for t in _RTT.findall(r["out"])]
    if not rtts:
        raise RuntimeError(f"ping from {ns} to {dst_ip} got no reply: {r['out'].strip()[-300:]}")
    return rtts


#: a lab underlay bridge is a physical switch's stand-in: no netfilter on it
#: (bench_crossnode.py's docstring says why)
UNDERLAY_SYSCTLS = {f"net.bridge.bridge-nf-call-{t}": "0"
                    for t in ("iptables", "ip6tables", "arptables")}


def underlay_plain(underlay):
    """Turns bridge netfilter off in a ``cluster.Underlay``'s namespace; 0 when done (the
    ``underlay_bridge_nf`` info value), 1 when this kernel has no such sysctl (no
    br_netfilter: nothing to turn off)."""
    r = lab.nsexec(underlay.ns, "sysctl", "-q", "-w",
                   *(f"{k}={v}" for k, v in UNDERLAY_SYSCTLS.items()), check=False)
    return 0 if r.returncode == 0 else 1


def rtt_median_ms(ns, dst_ip, count, interval_s=0.005):
    """The median of :func:`ping_rtts_ms` (the quick A/B tools' RTT figure)."""
    return statistics.median(ping_rtts_ms(ns, dst_ip, count, interval_s))


def alternate(names, rounds, measure):
    """The quick A/B tools' rounds: ``measure(k, r, name)`` for every variant ``name``
    (``k`` its index) in turn, ``rounds`` times (round ``r`` from 0), so the machine's
    drift falls on every variant alike; each result printed as it comes. Returns {name:
    [result per round]}."""
    got = {v: [] for v in names}
    for r in range(rounds):
        for k, v in enumerate(names):
            got[v].append(measure(k, r, v))
            print(f"round {r + 1} ({v or 'defaults'}): {got[v][-1]}", flush=True)
    return got


def cell(rows, key, digits=3):
    """A quick A/B tool's table cell: the median of ``key`` over the rounds' ``rows`` (dicts),
    then every round's value."""
    med = statistics.median(row[key] for row in rows)
    return f"{med:.{digits}f} ({', '.join(str(row[key]) for row in rows)})"


def rtt_ratio(rows):
    """Cross-node RTT over same-node RTT (``cross_rtt_ms`` / ``same_rtt_ms``), of the
    medians over the rounds' ``rows``."""
    return statistics.median(r["cross_rtt_ms"] for r in rows) / statistics.median(r["same_rtt_ms"] for r in rows)


def wait_reachable(ns, dst_ip, timeout_s=10.0):
    """Pings until ``dst_ip`` answers (ARP resolved, switch learned), or raises."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lab.ping(ns, dst_ip, count=1, timeout_s=10)["received"]:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{dst_ip} not reachable from {ns} within {timeout_s} s")
