"""The control socket: connections, request lines, dispatch, and the order of replies.

Theory of operation
-------------------
The daemon listens on a unix stream socket (mode 0600, owned by root; a stale socket
file is replaced, a live daemon on it stops this one) and, with ``--metrics-port``, on
127.0.0.1 for HTTP. Every socket and connection is non-blocking in the daemon's control
epoll, which the packet loop watches: the loop returns to Python when it is readable and
the daemon calls ``event`` for each ready fd. Nothing here blocks.

A control connection is framed into lines (``rpc.LineBuffer``; a line over 1 MiB gets
code 105) and each line is one request (``docs/control.md``). ``handle_line`` decodes
it (``rpc.decode``: at most ``rpc.MAX_DEPTH`` levels of nesting), checks the argument
types of its op once against ``ARG_TYPES`` (a wrong type is code 4 naming the argument)
and looks the op up in the daemon's table of handlers. Most ops answer at once.
The ops that touch the kernel (``attach``, ``detach``, ``check``, ``gc``) are generator
functions: they are queued and run one at a time, in arrival order; their steps run on
the loop thread and each job they ``yield`` — ``(fn, *args)`` — runs on the
``KernelWorker`` (``vswitch.daemon.worker``), whose result is sent back into the generator
(an exception is thrown into it). The generator's return value is the reply, except its
``_after``: a list of deferred pieces of work the reply waits for, which run while the
next operation does (detach's TAP closes: each waits ~20 ms for the kernel to unregister
the device, on a closer thread of its own; the state writes of attach and detach,
grouped by a writer thread: ``_defer``). A
connection waiting for such a reply reads its next request only after it, so replies
on one connection keep the order of its requests. During shutdown a queued operation
that has not started gets code 11.

**Any client, bounded work.** The daemon's loop calls ``round_start`` and ``round_end``
around each batch of control events: one round answers at most ``REQUESTS_PER_ROUND``
requests, starts none after ``ROUND_NS``, and accepts at most ``ACCEPTS_PER_ROUND`` connections, all clients together.
Requests left over wait in their connection; ``round_end`` then makes the wake-up
eventfd readable, so the packet loop returns after one more round of packets, never
waiting on control work longer than one round. A connection is read only while it has
no request waiting and less than ``READ_HIGH_WATER`` bytes of replies unsent: a client
that does not read its replies stops being read (the kernel's socket buffers hold the
rest), and is dropped when it made no progress for the idle timeout or its unsent replies
exceed ``Limits.max_queued_bytes``. Each connection is closed when idle (no byte either
way and no operation running) for ``idle_timeout_s``, and a request line begun must end
within ``line_timeout_s`` (code 105, then closed). At ``max_conns`` connections a new
one is accepted, told code 11 and closed. ``accept`` failing for want of file descriptors
(EMFILE, ENFILE) refuses the waiting client the same way, with a spare descriptor kept
for that purpose; if even that fails, the listening socket is left out of the epoll for
``BACKOFF_NS`` (a readable listener the daemon cannot serve would spin the loop). Every
refusal and drop is counted (``stats``, the ``status`` reply's ``control``) and logged
(``control_accept_failed`` at most once a second). ``tick`` enforces the timeouts; the
loop calls it at ``timer_ns``, every ``TICK_NS`` while any connection is open.

Errors: an ``RpcError`` is the reply (logged as ``request_failed``); any other exception
is a bug, logged with its traceback as ``request_crashed`` and answered with code 999.
The daemon survives every request.

An HTTP connection reads one request head and gets one response (``vswitch.daemon.metrics``),
then closes. A connection closed by the client is answered first, then closed (one the
peer closed entirely, EPOLLHUP, is closed at once: nothing could reach it).
"""
from __future__ import annotations

import collections
import errno
import ipaddress
import os
import select
import socket
import time
import traceback
from dataclasses import dataclass

from vswitch import rpc
from vswitch.daemon import metrics
from vswitch.rpc import RpcError

EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP

REQUESTS_PER_ROUND = 32         # requests answered per return of the packet loop, all clients together
ROUND_NS = 1_000_000            # ... and no new one started after this long in a round
ACCEPTS_PER_ROUND = 16          # connections accepted (or refused) per listener and round
READ_HIGH_WATER = 64 << 10      # a connection with this many reply bytes unsent is not read
BACKOFF_NS = 100_000_000        # the listener rests this long when accept fails and cannot refuse
TICK_NS = 250_000_000           # timeouts are checked this often while a connection is open
LOG_EVERY_NS = 1_000_000_000    # control_accept_failed is logged at most this often
NEVER_NS = 1 << 62
_NO_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class Limits:
    """The control server's limits (daemon flags ``--ctl-*``, ``docs/daemon.md``)."""
    max_conns: int = 128                # open control + HTTP connections
    idle_timeout_s: float = 60.0        # no byte either way and no operation running
    line_timeout_s: float = 10.0        # from a request line's first byte to its newline
    max_queued_bytes: int = 8 << 20     # unsent reply bytes of one connection

    RANGES = {"max_conns": (1, 65536), "idle_timeout_s": (0.1, 86400.0), "line_timeout_s": (0.1, 3600.0),
              "max_queued_bytes": (READ_HIGH_WATER, 1 << 30)}

    def __post_init__(self):
        for name, (lo, hi) in self.RANGES.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ValueError(f"{name}={v!r}; accepted: {lo} .. {hi}")
            if isinstance(lo, int) and not isinstance(v, int):
                raise ValueError(f"{name}={v!r}; accepted: an integer {lo} .. {hi}")


# --------------------------------------------------------------------------- argument types
# The arguments of every op and the JSON types each accepts: checked once in
# ``handle_line`` before the handler runs (code 4, naming the argument, on a mismatch).
# A spec is a type name, a tuple of them, or ``[{key: spec}]``: a list of objects whose
# listed keys have those types. The handlers validate values (ranges, formats); what is
# not listed here is left to them.

STR, INT, NUM, BOOL, LIST, DICT, NULL = "string", "integer", "number", "boolean", "list", "object", "null"
PORT = (STR, INT)               # a switch port by name or id

_ATTACH_ID = {"container_id": STR, "ifname": STR}
_IPS = [{"address": STR, "gateway": (STR, NULL)}]
_ROUTES = [{"dst": STR, "gw": (STR, NULL)}]
_CHECK = {"netns": (STR, NULL), "mac": (STR, NULL), "ips": (_IPS, NULL), "routes": (_ROUTES, NULL),
          "port_mappings": (LIST, NULL), "bandwidth": (DICT, NULL)}
_LISTING = {"port": (STR, INT, NULL), "limit": (INT, NULL), "cursor": (STR, NULL)}
ARG_TYPES = {
    "attach": {**_ATTACH_ID, **_CHECK, "netns": STR, "ips": _IPS, "mtu": INT, "ip_masq": BOOL, "network": STR,
               "pod": DICT, "fault": (STR, NULL)},
    "detach": {**_ATTACH_ID, "netns": (STR, NULL)},
    "check": {**_ATTACH_ID, **_CHECK},
    "gc": {"valid": [{"containerID": STR, "container_id": STR, "ifname": STR}], "network": (STR, NULL)},
    "counters": {"port": (STR, INT, NULL)},
    "fdb": _LISTING,
    "conntrack": _LISTING,
    "capture_start": {"port": PORT, "path": STR},
    "capture_stop": {"port": PORT},
    "peers": {"action": STR, "peers": [{"name": STR, "node_ip": STR, "pod_cidrs": LIST, "vtep_mac": STR}]},
    "cni_exec": {"v": INT},
    "trace": {"in_port": PORT, "frame_hex": STR, "packet": DICT, "src_mac": STR, "dst_mac": STR, "src_ip": STR,
              "dst_ip": STR, "proto": STR, "sport": INT, "dport": INT},
}


def json_type(v) -> str:
    if v is None:
        return NULL
    if isinstance(v, bool):
        return BOOL
    if isinstance(v, int):
        return INT
    if isinstance(v, float):
        return NUM
    if isinstance(v, str):
        return STR
    if isinstance(v, list):
        return LIST
    return DICT


def _check(op: str, where: str, value, spec) -> None:
    alts = spec if isinstance(spec, tuple) else (spec,)
    got = json_type(value)
    for alt in alts:
        if isinstance(alt, list):
            if got == LIST:
                for i, item in enumerate(value):
                    if not isinstance(item, dict):
                        raise RpcError(rpc.E_BAD_ARGS, f"{op}: argument {where}[{i}] is a {json_type(item)} "
                                                       f"({item!r:.60}); accepted: object")
                    for key, sub in alt[0].items():
                        if key in item:
                            _check(op, f"{where}[{i}].{key}", item[key], sub)
                return
        elif got == alt or (got == INT and alt == NUM):
            return
    names = " or ".join(LIST if isinstance(a, list) else a for a in alts)
    raise RpcError(rpc.E_BAD_ARGS, f"{op}: argument {where} is a {got} ({value!r:.60}); accepted: {names}")


def check_args(op: str, req: dict) -> None:
    """RpcError 4 naming the first argument of ``req`` whose JSON type ``op`` does not accept."""
    for key, spec in ARG_TYPES.get(op, {}).items():
        if key in req:
            _check(op, key, req[key], spec)


class Conn:
    """One accepted connection."""
    __slots__ = ("sock", "fd", "kind", "inbuf", "out", "waiting", "lines", "eof", "events", "last_active_ns",
                 "line_start_ns")

    def __init__(self, sock, kind, now_ns):
        self.sock, self.fd, self.kind = sock, sock.fileno(), kind
        self.inbuf = rpc.LineBuffer() if kind == "ctl" else bytearray()
        self.out = bytearray()
        self.waiting = False            # a kernel operation of this connection runs or is queued
        self.lines = collections.deque()
        self.eof = False
        self.events = EPOLLIN
        self.last_active_ns = now_ns
        self.line_start_ns = None       # the first byte of an unfinished request line


class ControlServer:
    def __init__(self, ep, log, handlers: dict, kernel_ops: frozenset, kernel, stopping, metrics_text,
                 limits: Limits = Limits(), cniexec=None):
        self.ep = ep                    # the control epoll
        self.log = log
        self.handlers = handlers        # op name -> fn(req) -> reply fields (a generator for kernel_ops)
        self.cniexec = cniexec          # vswitch.daemon.cniexec.CniExec: the thin CNI client's sessions
        if cniexec is not None:
            self.handlers = {**handlers, "cni_exec": self._op_cni_exec}
        self.kernel_ops = kernel_ops
        self.kernel = kernel            # KernelWorker
        self.stopping = stopping        # () -> bool: the daemon is shutting down
        self.metrics_text = metrics_text
        self.limits = limits
        self.socket_path = None
        self.lsock = self.msock = None
        self.conns: dict[int, Conn] = {}
        self.ops = collections.deque()  # kernel operations waiting for their turn
        self.active_op = None           # (generator, op name, reply callback) of the running one
        self.deferred = 0               # finished operations whose reply waits for deferred work
        self._deferred_done = collections.deque()   # their completions, from other threads
        self.budget = REQUESTS_PER_ROUND
        self.round_end_ns = NEVER_NS
        self.ready: set[int] = set()    # connections with requests left over by a round
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.woken = False
        self.ep.register(self.wake_fd, EPOLLIN)
        self.spare_fd = None            # given up to accept-and-refuse when the fds run out
        self.resting: dict[int, tuple] = {}     # listener fd -> (socket, kind, until_ns): out of the epoll
        self.last_fail_log_ns = -NEVER_NS
        self._last_tick_ns = 0
        self.stats = dict.fromkeys(("accepted", "refused", "accept_errors", "closed_idle", "closed_line_timeout",
                                    "dropped_slow", "requests", "deferred"), 0)

    # ----------------------------------------------------------------- listening

    def listen(self, path: str):
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, mode=0o755, exist_ok=True)
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise SystemExit(f"vswitchd: another daemon is listening on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        os.chown(path, 0, 0)
        s.listen(64)
        s.setblocking(False)
        self.lsock, self.socket_path = s, path
        self.ep.register(s.fileno(), EPOLLIN)
        self._spare()

    def listen_metrics(self, port: int, address: str = "127.0.0.1"):
        """Prometheus text on ``address:port`` (IPv4 or IPv6; 0.0.0.0 or :: for all)."""
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        except ValueError:
            raise ValueError(f"--metrics-address {address!r} is not an IP address; accepted: the node's "
                             f"IPv4 or IPv6 address, 127.0.0.1 (the default), 0.0.0.0 or ::") from None
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        s.listen(16)
        s.setblocking(False)
        self.msock = s
        self.ep.register(s.fileno(), EPOLLIN)

    def _spare(self):
        if self.spare_fd is None:
            try:
                self.spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass                    # still out of fds: retried at the next tick

    def drop_queued(self):
        """Shutdown: queued operations that never started (nothing to undo) are dropped."""
        while self.ops:
            self.ops.popleft()[0].close()

    def close_conns(self):
        for fd in list(self.conns):
            self._close_conn(fd)

    def close_listeners(self):
        """The listening sockets and the socket file."""
        if self.msock is not None:
            self.msock.close()
        if self.lsock is not None:
            self.lsock.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        if self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None

    def status(self) -> dict:
        """The ``status`` reply's ``control``: open connections and the counters since start
        (``cni_exec``: the thin CNI client's sessions)."""
        out = {"conns": len(self.conns), **self.stats}
        if self.cniexec is not None:
            out["cni_exec"] = self.cniexec.status()
        return out

    # ----------------------------------------------------------------- rounds and timers

    def round_start(self):
        """The loop is about to hand this round's control events to ``event``."""
        self.budget = REQUESTS_PER_ROUND
        self.round_end_ns = time.monotonic_ns() + ROUND_NS

    def round_end(self):
        """Serve leftover requests with what the round has left; start the next kernel
        operation; keep the wake-up fd readable while requests are left over."""
        for fd in list(self.ready):
            if self.budget <= 0 or time.monotonic_ns() >= self.round_end_ns:
                break
            self.ready.discard(fd)
            conn = self.conns.get(fd)
            if conn is not None:
                self._serve_lines(conn)
                self._flush_conn(conn)
        self.next_op()
        if self.ready and not self.woken:
            self.stats["deferred"] += 1
            os.eventfd_write(self.wake_fd, 1)
            self.woken = True

    @property
    def timer_ns(self) -> int:
        """When the loop must call ``tick`` (monotonic ns)."""
        if not self.conns and not self.resting and self.spare_fd is not None:
            return NEVER_NS
        return self._last_tick_ns + TICK_NS

    def tick(self, now_ns: int):
        """Timeouts: idle and slow connections, unfinished lines, resting listeners."""
        self._last_tick_ns = now_ns
        lim = self.limits
        idle_ns, line_ns = int(lim.idle_timeout_s * 1e9), int(lim.line_timeout_s * 1e9)
        for conn in list(self.conns.values()):
            if conn.line_start_ns is not None and not self._readable(conn):
                conn.line_start_ns = now_ns     # not read by us (its replies wait): no line clock
            if conn.line_start_ns is not None and now_ns - conn.line_start_ns > line_ns:
                self.stats["closed_line_timeout"] += 1
                self._say_and_close(conn, RpcError(rpc.E_BAD_REQUEST, f"request line not completed within "
                                                                      f"{lim.line_timeout_s:g} s; closing"))
            elif not conn.waiting and now_ns - conn.last_active_ns > idle_ns:
                self.stats["dropped_slow" if conn.out else "closed_idle"] += 1
                if conn.out:
                    self.log("control_dropped", level="warning", reason="replies unread",
                             unsent_bytes=len(conn.out), idle_s=lim.idle_timeout_s)
                self._close_conn(conn.fd)
        for fd, (lsock, kind, until_ns) in list(self.resting.items()):
            if now_ns >= until_ns:
                del self.resting[fd]
                self.ep.register(fd, EPOLLIN)
        self._spare()

    # ----------------------------------------------------------------- connections

    def event(self, fd: int, ev: int) -> bool:
        """Handle one ready fd of ours; False if it is not ours."""
        if fd in self.conns:
            self._conn_event(self.conns[fd], ev)
        elif fd == self.wake_fd:
            try:
                os.eventfd_read(self.wake_fd)
            except BlockingIOError:
                pass
            self.woken = False
            self._deferred_replies()
        elif self.lsock is not None and fd == self.lsock.fileno():
            self._accept(self.lsock, "ctl")
        elif self.msock is not None and fd == self.msock.fileno():
            self._accept(self.msock, "http")
        else:
            return False
        return True

    def _accept(self, lsock, kind):
        for _ in range(ACCEPTS_PER_ROUND):
            try:
                c, _ = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if not self._accept_failed(lsock, kind, exc):
                    return
                continue
            if len(self.conns) >= self.limits.max_conns:
                self._refuse(c, kind, f"vswitchd has {len(self.conns)} control connections, its limit "
                                      f"(--ctl-max-conns {self.limits.max_conns}); try again")
                continue
            c.setblocking(False)
            conn = Conn(c, kind, time.monotonic_ns())
            self.conns[conn.fd] = conn
            self.stats["accepted"] += 1
            self.ep.register(conn.fd, EPOLLIN)

    def _accept_failed(self, lsock, kind, exc: OSError) -> bool:
        """accept failed: refuse one waiting client with the spare fd (True: go on
        accepting), or rest the listener for BACKOFF_NS (False)."""
        self.stats["accept_errors"] += 1
        refused = False
        if exc.errno in _NO_FDS and self.spare_fd is not None:
            os.close(self.spare_fd)
            self.spare_fd = None
            try:
                c, _ = lsock.accept()
            except OSError:
                pass
            else:
                self._refuse(c, kind, f"vswitchd is out of file descriptors ({exc.strerror}); try again")
                refused = True
            self._spare()
        now = time.monotonic_ns()
        if now - self.last_fail_log_ns >= LOG_EVERY_NS:
            self.last_fail_log_ns = now
            self.log("control_accept_failed", level="error", listener=kind, error=exc.strerror,
                     errno=exc.errno, conns=len(self.conns), refused=self.stats["refused"],
                     accept_errors=self.stats["accept_errors"])
        if refused and self.spare_fd is not None:
            return True
        fd = lsock.fileno()
        if fd not in self.resting:
            self.ep.unregister(fd)
            self.resting[fd] = (lsock, kind, now + BACKOFF_NS)
        return False

    def _refuse(self, sock, kind, msg: str):
        """Tell a just-accepted client why it is not served (best effort), and close it."""
        self.stats["refused"] += 1
        if kind == "ctl":
            data = rpc.encode(RpcError(rpc.E_TRY_AGAIN, msg).reply())
        else:
            data = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: " + str(len(msg) + 1).encode()
                    + b"\r\nConnection: close\r\n\r\n" + msg.encode() + b"\n")
        try:
            sock.setblocking(False)
            sock.send(data)
        except OSError:
            pass
        sock.close()

    def _say_and_close(self, conn, err: RpcError):
        if conn.kind == "ctl":
            conn.out += rpc.encode(err.reply())
            try:
                conn.sock.send(conn.out)
            except OSError:
                pass
        self._close_conn(conn.fd)

    def _close_conn(self, fd):
        conn = self.conns.pop(fd, None)
        self.ready.discard(fd)
        if conn:
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            conn.sock.close()

    def _conn_event(self, conn, ev):
        if ev & (EPOLLHUP | EPOLLERR) and not ev & EPOLLIN:
            self._close_conn(conn.fd)       # the peer is gone entirely: nothing could reach it
            return
        if ev & EPOLLIN and self._readable(conn):
            try:
                data = conn.sock.recv(1 << 16)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            now = time.monotonic_ns()
            if data == b"":
                conn.eof = True             # answer what was asked, then close
                conn.line_start_ns = None
            elif data:
                conn.last_active_ns = now
                if conn.kind == "ctl":
                    lines = conn.inbuf.feed(data)
                    conn.lines.extend(lines)
                    if not conn.inbuf.pending:
                        conn.line_start_ns = None
                    elif lines or conn.line_start_ns is None:
                        conn.line_start_ns = now
                    self._serve_lines(conn)
                else:
                    conn.inbuf += data
                    if conn.line_start_ns is None:
                        conn.line_start_ns = now
                    if metrics.http_request_complete(conn.inbuf):
                        conn.line_start_ns = None
                        conn.out += metrics.http_reply(bytes(conn.inbuf), self.metrics_text)
                        conn.eof = True
        self._flush_conn(conn)

    def _readable(self, conn) -> bool:
        """Read more from this connection: nothing waits in it, and its replies are read."""
        return not conn.eof and not conn.lines and not conn.waiting and len(conn.out) < READ_HIGH_WATER

    def _serve_lines(self, conn):
        """Answer the connection's request lines in order, while the round's budget lasts;
        stop at one answered later, or while the client leaves its replies unread."""
        while conn.lines and not conn.waiting and len(conn.out) < READ_HIGH_WATER:
            if self.budget <= 0 or time.monotonic_ns() >= self.round_end_ns:
                self.ready.add(conn.fd)
                return
            line = conn.lines.popleft()
            self.budget -= 1 + (len(line) >> 15 if line else 0)    # a 1 MiB line is a round's work
            self.stats["requests"] += 1
            if line is None:
                reply = RpcError(rpc.E_BAD_REQUEST, f"request line exceeds {rpc.MAX_LINE_BYTES} bytes").reply()
            else:
                reply = self.handle_line(line, lambda r, conn=conn: self._late_reply(conn, r))
            if reply is not None and reply.pop("_handoff", False):
                reply = self._handoff(conn)
                if reply is None:
                    return                  # the connection is a cni_exec session's now
            if reply is None:
                conn.waiting = True
            else:
                conn.out += rpc.encode(reply)

    def _op_cni_exec(self, req):
        """``cni_exec``: checked here, done by ``_handoff`` (it needs the connection)."""
        if req.get("v") != 1:
            raise RpcError(rpc.E_BAD_ARGS, f"cni_exec: v={req.get('v')!r}; accepted: 1")
        return {"_handoff": True}

    def _handoff(self, conn):
        """Give a ``cni_exec`` connection to a session thread (vswitch.daemon.cniexec): out
        of the epoll and of ``conns``, answered there. It must be the connection's only
        request with nothing unsent; at ``max_sessions``, code 11 (the client then runs
        the Python plugin). Returns the error reply, or None when handed off."""
        if conn.lines or conn.inbuf.pending or conn.out or conn.eof:
            return RpcError(rpc.E_BAD_REQUEST, "cni_exec must be the only request of its connection").reply()
        if not self.cniexec.reserve():
            return RpcError(rpc.E_TRY_AGAIN, f"{self.cniexec.max_sessions} CNI sessions run already; "
                                             "try again").reply()
        self.conns.pop(conn.fd, None)
        self.ready.discard(conn.fd)
        try:
            self.ep.unregister(conn.fd)
        except OSError:
            pass
        self.cniexec.start(conn.sock)
        return None

    def _late_reply(self, conn, reply):
        """The reply of an operation that ran on the kernel thread."""
        conn.waiting = False
        if self.conns.get(conn.fd) is not conn:
            return                          # the client went away
        conn.last_active_ns = time.monotonic_ns()
        conn.out += rpc.encode(reply)
        self._serve_lines(conn)
        self._flush_conn(conn)

    def _flush_conn(self, conn):
        fd = conn.fd
        if self.conns.get(fd) is not conn:
            return
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close_conn(fd)
                return
            if sent:
                del conn.out[:sent]
                conn.last_active_ns = time.monotonic_ns()
                if conn.lines and len(conn.out) < READ_HIGH_WATER:
                    self._serve_lines(conn)     # the client reads again: answer what it asked
            if len(conn.out) > self.limits.max_queued_bytes:
                self.stats["dropped_slow"] += 1
                self.log("control_dropped", level="warning", reason="unsent replies over the limit",
                         unsent_bytes=len(conn.out), limit=self.limits.max_queued_bytes)
                self._close_conn(fd)
                return
        if conn.eof and not conn.out and not conn.waiting and not conn.lines:
            self._close_conn(fd)
            return
        events = (EPOLLIN if self._readable(conn) else 0) | (EPOLLOUT if conn.out else 0)
        if events != conn.events:
            self.ep.modify(fd, events)
            conn.events = events

    # ----------------------------------------------------------------- dispatch

    def handle_line(self, line: bytes, late_reply=None) -> dict | None:
        """One request line -> one reply; never raises.

        For a kernel operation this returns None and ``late_reply(reply)`` is called when
        the operation ends (without ``late_reply``, an error).
        """
        op = None
        try:
            req = rpc.decode(line)
            op = req.get("op")
            handler = self.handlers.get(op) if isinstance(op, str) else None
            if handler is None:
                raise RpcError(rpc.E_UNKNOWN_OP, f"unknown op {op!r:.80}; accepted: {', '.join(sorted(self.handlers))}")
            check_args(op, req)
            if op in self.kernel_ops:
                if late_reply is None:
                    raise RpcError(rpc.E_INTERNAL, f"{op!r} needs the event loop")
                self.ops.append((handler(req), op, late_reply, time.monotonic_ns()))   # started by next_op
                return None
            return {"ok": True, **handler(req)}
        except Exception as exc:
            return self._error_reply(op, exc)

    def _error_reply(self, op, exc: Exception) -> dict:
        if isinstance(exc, RpcError):
            self.log("request_failed", level="warning", op=op, code=exc.code, msg=exc.msg)
            return exc.reply()
        self.log("request_crashed", level="error", op=op, error=repr(exc), tb=traceback.format_exc())
        return RpcError(rpc.E_INTERNAL, f"internal error in {op!r}: {exc!r}").reply()

    def submit_internal(self, gen, op: str):
        """Queue a kernel operation of the daemon itself (a generator, like the ops'): it
        runs in turn with the clients' ones; a failure is logged, a shutdown closes it."""
        def done(reply):
            if not reply.get("ok"):
                self.log("internal_op_failed", level="warning", op=op, code=reply.get("code"), msg=reply.get("msg"))
        self.ops.append((gen, op, done, time.monotonic_ns()))
        self.next_op()

    @property
    def busy(self) -> bool:
        """A kernel operation is running or its reply waits for deferred work (the loop
        must not stop under it)."""
        return self.active_op is not None or self.deferred > 0

    def _defer(self, op: str, reply: dict, reply_cb, after: list):
        """Send ``reply`` once every deferred piece of work of ``after`` is done. Each is a
        starter ``start(done)`` that begins the work and calls ``done(error)`` when it is
        over (``error`` None or an exception), from any thread: detach's TAP closes, the
        state writes of attach and detach (``vswitch.daemon.pods``). An item may be a pair
        ``(start, on_error)``: if its work fails, ``on_error(exc)`` gives ``(RpcError,
        undo)`` and the reply is that error, sent after the operation ``undo`` (a generator,
        or None) ran first in the queue. A failure without ``on_error`` answers code 101."""
        entry = {"op": op, "reply": reply, "cb": reply_cb, "left": len(after), "error": None}
        self.deferred += 1
        for item in after:
            start, on_error = item if isinstance(item, tuple) else (item, None)

            def done(exc=None, on_error=on_error):      # any thread: to the loop via the wake fd
                self._deferred_done.append((entry, exc, on_error))
                os.eventfd_write(self.wake_fd, 1)
            start(done)

    def _deferred_replies(self):
        """Loop thread: send the replies whose deferred work is all done."""
        while self._deferred_done:
            entry, exc, on_error = self._deferred_done.popleft()
            if exc is not None and entry["error"] is None:
                entry["error"] = (exc, on_error)
            entry["left"] -= 1
            if entry["left"]:
                continue
            self.deferred -= 1
            if entry["error"] is None:
                entry["cb"](entry["reply"])
                continue
            exc, on_error = entry["error"]
            undo = None
            if on_error is not None:
                err, undo = on_error(exc)
            else:
                err = RpcError(rpc.E_NETLINK, f"{entry['op']}: done, but the state file could not be "
                                              f"written: {exc}")
            self.log("request_failed", level="warning", op=entry["op"], code=err.code, msg=err.msg)
            if undo is None:
                entry["cb"](err.reply())
            else:                       # first in the queue; its own reply is not the client's
                self.ops.appendleft((undo, entry["op"] + "_undo", lambda _r, cb=entry["cb"], e=err: cb(e.reply()),
                                     time.monotonic_ns()))
                self.next_op()

    def next_op(self):
        """Start the next queued kernel operation unless one is running."""
        while self.active_op is None and self.ops:
            gen, op, reply, queued_ns = self.ops.popleft()
            if self.stopping():
                gen.close()
                reply(RpcError(rpc.E_TRY_AGAIN, "vswitchd is shutting down; try again").reply())
                continue
            # [generator, op, reply callback, queued, started, kernel jobs, their ns]
            self.active_op = [gen, op, reply, queued_ns, time.monotonic_ns(), 0, 0]
            self._step_op(True, None)

    def _step_op(self, ok, value):
        """Advance the running operation with a kernel job's result (or exception)."""
        active = self.active_op
        gen, op, reply_cb = active[0], active[1], active[2]
        after = None
        try:
            job = gen.send(value) if ok else gen.throw(value)
        except StopIteration as done:
            fields = dict(done.value or {})
            after = fields.pop("_after", None)     # deferred work the reply waits for
            reply = {"ok": True, **fields}
        except Exception as exc:
            reply = self._error_reply(op, exc)
        else:
            active[5] += 1
            self.kernel.submit(job[0], job[1:])
            return
        self.active_op = None
        if after:
            self._defer(op, reply, reply_cb, after)
        else:
            reply_cb(reply)
        if getattr(self.log, "min_rank", 1) == 0:      # --log-level debug: where a kernel operation's time went
            now = time.monotonic_ns()
            self.log("kernel_op", level="debug", op=op, ok=reply.get("ok"), wait_ms=round((active[4] - active[3]) / 1e6, 2),
                     run_ms=round((now - active[4]) / 1e6, 2), jobs=active[5], queued=len(self.ops))
        self.next_op()

    def kernel_done(self):
        """The kernel thread finished jobs: hand their results to the running operation."""
        for ok, value in self.kernel.completions():
            if self.active_op is not None:
                self._step_op(ok, value)
