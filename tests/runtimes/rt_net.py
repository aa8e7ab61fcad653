"""Network helpers for the runtime tests: a client namespace, HTTP from it, rate probes.

Theory of operation: hostPort is a node-level feature, so its client sits outside the
node's pod network: ``ClientLink`` creates a namespace ``vsrtc<suffix>`` joined to the node
by a veth pair (node end ``vsrth<suffix>`` with 198.18.N.1/30, client end with .2 and a
default route via .1; 198.18.0.0/15 is the benchmarking range, used by nothing else here).
The client reaches ``198.18.N.1:hostPort``; with the reference chain that is portmap's DNAT
in PREROUTING, with vswitch the node end is the daemon's uplink and the DNAT is in the
switch. With ``ipv6=True`` (the dual-stack test) both ends also get an address of
``fd00:198:18:N::/64`` (``::1`` on the node, ``::2`` in the client, ``nodad`` so they are
usable at once) and the client a default IPv6 route via ``::1``. Commands run through ``vswitch.lab``'s ``sh`` and ``nsexec`` (RuntimeError naming
the command and its output on failure).

``stream_rate_bps`` measures a shaped direction: it streams over TCP until the token
bucket the runtime configured is spent (containerd sends a burst of 2^32-1 bits with the
bandwidth annotations, so the first hundreds of MiB pass at line rate), then counts the
bytes crossing the pod's interface over a fixed window. That sustained rate is what a
shaper must hold.
"""
from __future__ import annotations

import random
import socket
import sys
import threading
import time
from dataclasses import dataclass

from vswitch.lab import nsexec, sh


WEB_PAGE = "hello from the web pod"   # what the pods' httpd serves at /


def free_host_port() -> int:
    for _ in range(50):
        port = random.randrange(20000, 30000)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free TCP port in 20000-29999")


def _free_link_net() -> int:
    used = sh("ip", "-4", "-o", "addr", "show").stdout
    for _ in range(100):
        n = random.randrange(0, 64) * 4
        third = random.randrange(0, 256)
        if f"198.18.{third}.{n + 1}/" not in used and f"198.18.{third}.{n + 2}/" not in used:
            return third * 256 + n
    raise RuntimeError("no free 198.18.x.y/30 found")


@dataclass
class ClientLink:
    """A client namespace linked to the node by a veth pair; ``remove()`` undoes it."""
    suffix: str
    ipv6: bool = False

    def __post_init__(self):
        code = _free_link_net()
        self.netns = f"vsrtc{self.suffix}"
        self.node_ifname = f"vsrth{self.suffix}"[:15]
        self.client_ifname = f"vsrtp{self.suffix}"[:15]
        self.node_ip = f"198.18.{code // 256}.{code % 256 + 1}"
        self.client_ip = f"198.18.{code // 256}.{code % 256 + 2}"
        self.node_ip6 = f"fd00:198:18:{code:x}::1" if self.ipv6 else None
        self.client_ip6 = f"fd00:198:18:{code:x}::2" if self.ipv6 else None

    def create(self) -> "ClientLink":
        try:
            sh("ip", "netns", "add", self.netns)
            sh("ip", "link", "add", self.node_ifname, "type", "veth",
               "peer", "name", self.client_ifname, "netns", self.netns)
            sh("ip", "addr", "add", f"{self.node_ip}/30", "dev", self.node_ifname)
            sh("ip", "link", "set", self.node_ifname, "up")
            self.ns("ip", "addr", "add", f"{self.client_ip}/30", "dev", self.client_ifname)
            self.ns("ip", "link", "set", self.client_ifname, "up")
            self.ns("ip", "link", "set", "lo", "up")
            self.ns("ip", "route", "add", "default", "via", self.node_ip)
            if self.ipv6:
                sh("ip", "-6", "addr", "add", f"{self.node_ip6}/64", "dev", self.node_ifname,
                   "nodad")
                self.ns("ip", "-6", "addr", "add", f"{self.client_ip6}/64", "dev",
                        self.client_ifname, "nodad")
                self.ns("ip", "-6", "route", "add", "default", "via", self.node_ip6)
        except Exception:
            self.remove()
            raise
        return self

    def ns(self, *cmd: str, check: bool = True, timeout_s: float = 60.0):
        return nsexec(self.netns, *cmd, check=check, timeout=timeout_s)

    def http_get(self, host: str, port: int, path: str = "/", timeout_s: int = 10) -> str:
        """The body of http://host:port/path fetched from the client namespace.

        Python's urllib, not busybox wget: Debian 12's static busybox wget crashed
        (SIGSEGV) here on replies that came through the DNAT.
        """
        code = ("import sys, urllib.request; "
                "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))"
                ".read().decode())")
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        res = self.ns(sys.executable, "-c", code, f"http://{netloc}{path}", str(timeout_s),
                      check=False, timeout_s=timeout_s + 10)
        if res.returncode != 0:
            err = (res.stderr.strip().splitlines() or [""])[-1]
            raise ConnectionError(f"GET http://{netloc}{path} from {self.netns} failed "
                                  f"({res.returncode}): {err}")
        return res.stdout

    def remove(self) -> None:
        sh("ip", "link", "del", "dev", self.node_ifname, check=False)
        sh("ip", "netns", "del", self.netns, check=False)


def pod_iface_bytes(pid: int, ifname: str = "eth0") -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of ``ifname`` in the network namespace of process ``pid``."""
    with open(f"/proc/{pid}/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == ifname:
                fields = rest.split()
                return int(fields[0]), int(fields[8])
    raise LookupError(f"no interface {ifname} in the netns of process {pid}")


@dataclass
class RateSample:
    rate_bps: float          # sustained rate over the measuring window, at the pod's eth0
    window_s: float
    window_bytes: int
    drained_bytes: int       # bytes through the pod's eth0 before the window
    drain_s: float

    def __str__(self):
        return (f"{self.rate_bps / 1e6:.2f} Mbit/s over {self.window_s:.1f} s "
                f"({self.window_bytes} B), after {self.drained_bytes / 2**20:.0f} MiB in "
                f"{self.drain_s:.1f} s spent the burst")


class _Streamer(threading.Thread):
    """Sends to (``to``) or receives from (``from``) a TCP peer until stopped."""

    def __init__(self, host: str, port: int, direction: str, request: bytes = b""):
        super().__init__(daemon=True)
        self.sock = connect(host, port)
        if request:
            self.sock.sendall(request)
        self.sock.settimeout(0.5)
        self.direction = direction
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def run(self):
        chunk = bytearray(256 * 1024)
        try:
            while not self.stop_event.is_set():
                try:
                    if self.direction == "to":
                        self.sock.send(chunk)
                    elif self.sock.recv_into(chunk) == 0:
                        raise ConnectionError("the peer closed the stream")
                except socket.timeout:
                    continue
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def stop(self):
        self.stop_event.set()
        self.join(timeout=5)
        self.sock.close()


def stream_rate_bps(host: str, port: int, direction: str, pod_pid: int, limit_bps: float,
                    request: bytes = b"", window_s: float = 2.0, drain_timeout_s: float = 60.0,
                    ifname: str = "eth0") -> RateSample:
    """Sustained rate of a TCP stream between the node and a pod, once the burst is spent.

    direction ``"to"`` (ingress of the pod; the peer must discard, ``nc -l > /dev/null``)
    or ``"from"`` (egress; the peer must send more than the burst, e.g. an HTTP server
    asked by ``request`` for a large file). Bytes are
    counted at the pod's interface (rx for ingress, tx for egress: what the shaper let
    through, at L2, as shapers count). The burst is spent once the rate over the last
    0.5 s falls below 3 times ``limit_bps`` after having been above it (or, with no fast
    phase at all, after 3 s); then ``window_s`` is measured.
    """
    if direction not in ("to", "from"):
        raise ValueError(f"direction must be 'to' or 'from', not {direction!r}")
    which = 0 if direction == "to" else 1

    def count():
        return pod_iface_bytes(pod_pid, ifname)[which]

    streamer = _Streamer(host, port, direction, request)
    streamer.start()
    try:
        t0 = time.monotonic()
        start_bytes = count()
        history = [(t0, start_bytes)]
        seen_fast = False
        while True:
            time.sleep(0.1)
            if streamer.error is not None:
                raise ConnectionError(f"stream {direction} {host}:{port}: {streamer.error}")
            now, moved = time.monotonic(), count()
            history.append((now, moved))
            old = [h for h in history if h[0] <= now - 0.5]
            # Spent: slow now, after a fast phase or, if there was none (a small burst),
            # after 3 s (a stream that has barely started is slow too).
            if old:
                t_old, b_old = old[-1]
                fast = (moved - b_old) * 8 / (now - t_old) >= 3 * limit_bps
                seen_fast = seen_fast or fast
                if not fast and (seen_fast or now - t0 >= 3.0):
                    break
            if now - t0 > drain_timeout_s:
                raise TimeoutError(
                    f"the stream {direction} {host}:{port} still ran above 3 x {limit_bps} bit/s "
                    f"after {drain_timeout_s} s and {(moved - start_bytes) / 2**20:.0f} MiB: "
                    "no shaper is holding it")
        drained, drain_s = moved - start_bytes, now - t0
        w0, b0 = time.monotonic(), count()
        time.sleep(window_s)
        w1, b1 = time.monotonic(), count()
        if streamer.error is not None:
            raise ConnectionError(f"stream {direction} {host}:{port}: {streamer.error}")
        return RateSample(rate_bps=(b1 - b0) * 8 / (w1 - w0), window_s=w1 - w0,
                          window_bytes=b1 - b0, drained_bytes=drained, drain_s=drain_s)
    finally:
        streamer.stop()


def connect(host: str, port: int, timeout_s: float = 20.0) -> socket.socket:
    """A TCP connection to ``host:port``, retried while the server is (re)starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return socket.create_connection((host, port), timeout=2)
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} accepted no connection within "
                                   f"{timeout_s} s: {exc}") from exc
            time.sleep(0.1)


def wait_tcp(host: str, port: int, timeout_s: float = 20.0) -> None:
    """Waits until ``host:port`` accepts a TCP connection (a server came up)."""
    connect(host, port, timeout_s).close()
