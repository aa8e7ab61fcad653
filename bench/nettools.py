"""Measuring tools for the real-network benchmarks: namespaces, iperf3, ping.

Theory of operation
-------------------
Every measurement runs between network namespaces the benchmark created itself (unique
names with the pid and a random suffix, removed in ``finally``), with the stock tools a
performance engineer would use by hand, so the numbers are comparable with theirs:

- TCP throughput, any number of streams: ``iperf3``. The
  iperf3 *server* runs in the sending namespace and the *client* in the receiving one with
  ``-R``, so the client's own per-interval figures are receiver-side counts; intervals
  marked omitted (``--omit``: slow start, the shaper's initial burst) are excluded, and
  so is the first one after them (iperf3 3.12 misreports its duration);
- 64-byte UDP frames per second: a ``sendmmsg`` flooder (iperf3 3.12 cannot send fast
  enough here) in the sending namespace, counted at the receiving interface;
- round-trip time: ``ping`` at a short interval, every reply's time kept as a sample.

Nothing here imports pyroute2 (only ``vswitch/netlink.py`` does); links and namespaces
are made with ``ip``. Tools and privileges missing on the machine turn into
``pytest.skip`` with the reason, through ``require()``.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import select
import shutil
import subprocess
import time

IPERF_PORT = 5201
#: UDP payload making a 60-byte frame (64 on the wire with the FCS):
#: 14 Ethernet + 20 IPv4 + 8 UDP + 18 = 60.
UDP_64B_PAYLOAD = 18


def uid():
    """A short unique suffix for interface and namespace names (IFNAMSIZ is 16)."""
    return f"{os.getpid() % 10000}{secrets.token_hex(2)}"


def require(*binaries, root=True):
    """Skip the calling benchmark unless root (when asked) and every binary is on PATH."""
    import pytest
    if root and os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, TAP/veth devices)")
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def run(cmd, ns=None, check=True, timeout_s=60.0, input_text=None, env=None):
    """Runs a command (a list), inside namespace ``ns`` when given; returns stdout."""
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          input=input_text, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}: "
                           f"{(proc.stderr or proc.stdout).strip()[:500]}")
    return proc.stdout


class Netns:
    """A network namespace with loopback up; removed on exit (context manager)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        run(["ip", "netns", "add", self.name])
        try:
            run(["ip", "link", "set", "lo", "up"], ns=self.name)
        except Exception:
            self.close()
            raise
        return self

    def close(self):
        run(["ip", "netns", "del", self.name], check=False)

    def __exit__(self, *exc):
        self.close()


def _start_server(ns, port, bind_ip=None):
    cmd = ["ip", "netns", "exec", ns, "iperf3", "-s", "-1", "-p", str(port), "--forceflush"]
    if bind_ip:
        cmd += ["-B", bind_ip]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + 10.0
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            seen += chunk
            if b"listening" in seen.lower():
                return proc
            if not chunk:
                break
    _stop(proc)
    raise RuntimeError(f"iperf3 server in {ns} did not start: "
                       f"{seen.decode(errors='replace').strip()[:300]}")


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()               # our own child (ip netns exec → iperf3)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()


def _iperf_client(receiver_ns, sender_ip, args, seconds, port):
    cmd = ["iperf3", "-c", sender_ip, "-p", str(port), "-R", "-J", "-t", str(seconds),
           *args]
    out = run(cmd, ns=receiver_ns, check=False, timeout_s=seconds + 30)
    try:
        data = json.loads(out)
    except ValueError:
        raise RuntimeError(f"iperf3 client in {receiver_ns}: no JSON: {out.strip()[:300]}")
    if data.get("error"):
        raise RuntimeError(f"iperf3 client in {receiver_ns}: {data['error']}")
    return data


def _receiver_intervals(data):
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


def tcp_goodput_and_mss(sender_ns, receiver_ns, sender_ip, seconds, omit_s=0, streams=1,
                        port=IPERF_PORT):
    """Receiver-measured TCP goodput in bit/s from ``sender_ns`` to ``receiver_ns`` over
    the non-omitted intervals, and the connection's MSS in bytes (None if not reported)."""
    server = _start_server(sender_ns, port, sender_ip)
    try:
        data = _iperf_client(receiver_ns, sender_ip,
                             ["-P", str(streams), "-O", str(omit_s)], seconds, port)
    finally:
        _stop(server)
    b, s = _receiver_intervals(data)
    mss = data.get("start", {}).get("tcp_mss_default")
    if s > 0:
        return 8 * b / s, mss
    return float(data["end"]["sum_received"]["bits_per_second"]), mss


def tcp_rate_bps(sender_ns, receiver_ns, sender_ip, seconds, streams=1, omit_s=0,
                 port=IPERF_PORT):
    """Receiver-measured TCP goodput in bit/s from ``sender_ns`` to ``receiver_ns``."""
    return tcp_goodput_and_mss(sender_ns, receiver_ns, sender_ip, seconds, omit_s, streams,
                               port)[0]


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


def rx_packets(ns, ifname):
    """The rx_packets counter of ``ifname`` inside namespace ``ns``."""
    return int(run(["cat", f"/sys/class/net/{ifname}/statistics/rx_packets"], ns=ns))


def udp_flood_pps(sender_ns, receiver_ns, dst_ip, receiver_ifname, seconds,
                  payload_bytes=UDP_64B_PAYLOAD, port=9):
    """64-byte frames per second arriving at ``receiver_ifname`` (in ``receiver_ns``)
    while ``sender_ns`` sends UDP to ``dst_ip`` flat out for ``seconds``; returns
    (received pps, sent pps). Counted at the receiving interface, so the result is what
    the path delivers, not what a receiving application keeps up with."""
    import sys
    before = rx_packets(receiver_ns, receiver_ifname)
    out = run([sys.executable, "-c", _FLOOD_SRC, dst_ip, str(port), str(payload_bytes),
               str(seconds)], ns=sender_ns, timeout_s=seconds + 30)
    after = rx_packets(receiver_ns, receiver_ifname)
    sent, took = out.split()
    took = float(took)
    return (after - before) / took, int(sent) / took


_RTT = re.compile(r"time[=<]([0-9.]+) ms")


def ping_rtts_ms(ns, dst_ip, count, interval_s=0.01, timeout_s=None):
    """Every echo reply's round-trip time in ms, from namespace ``ns`` to ``dst_ip``."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    out = run(["ping", "-n", "-c", str(count), "-i", f"{interval_s:g}", "-W", "1", dst_ip],
              ns=ns, check=False, timeout_s=timeout_s or count * interval_s + 15)
    rtts = [float(m.group(1)) for m in _RTT.finditer(out)]
    if not rtts:
        raise RuntimeError(f"ping from {ns} to {dst_ip} got no reply: {out.strip()[-300:]}")
    return rtts


def wait_reachable(ns, dst_ip, timeout_s=10.0):
    """Pings until ``dst_ip`` answers (ARP resolved, switch learned), or raises."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = run(["ping", "-n", "-c", "1", "-W", "1", dst_ip], ns=ns, check=False)
        if _RTT.search(out):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{dst_ip} not reachable from {ns} within {timeout_s} s")
