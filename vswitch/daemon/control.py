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
it and looks the op up in the daemon's table of handlers. Most ops answer at once.
The ops that touch the kernel (``attach``, ``detach``, ``check``, ``gc``) are generator
functions: they are queued and run one at a time, in arrival order; their steps run on
the loop thread and each job they ``yield`` — ``(fn, *args)`` — runs on the
``KernelWorker`` (``vswitch.daemon.worker``), whose result is sent back into the generator
(an exception is thrown into it). The generator's return value is the reply. A
connection waiting for such a reply reads its next request only after it, so replies
on one connection keep the order of its requests. During shutdown a queued operation
that has not started gets code 11.

Errors: an ``RpcError`` is the reply (logged as ``request_failed``); any other exception
is a bug, logged with its traceback as ``request_crashed`` and answered with code 999.
The daemon survives every request.

An HTTP connection reads one request head and gets one response (``vswitch.daemon.metrics``),
then closes. A connection closed by the client is answered first, then closed.
"""
from __future__ import annotations

import collections
import os
import select
import socket
import traceback

from vswitch import rpc
from vswitch.daemon import metrics
from vswitch.rpc import RpcError

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


class ControlServer:
    def __init__(self, ep, log, handlers: dict, kernel_ops: frozenset, kernel, stopping, metrics_text):
        self.ep = ep                    # the control epoll
        self.log = log
        self.handlers = handlers        # op name -> fn(req) -> reply fields (a generator for kernel_ops)
        self.kernel_ops = kernel_ops
        self.kernel = kernel            # KernelWorker
        self.stopping = stopping        # () -> bool: the daemon is shutting down
        self.metrics_text = metrics_text
        self.socket_path = None
        self.lsock = self.msock = None
        self.conns: dict[int, dict] = {}
        self.ops = collections.deque()  # kernel operations waiting for their turn
        self.active_op = None           # (generator, op name, reply callback) of the running one

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

    def listen_metrics(self, port: int):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(16)
        s.setblocking(False)
        self.msock = s
        self.ep.register(s.fileno(), EPOLLIN)

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

    # ----------------------------------------------------------------- connections

    def event(self, fd: int, ev: int) -> bool:
        """Handle one ready fd of ours; False if it is not ours."""
        if fd in self.conns:
            self._conn_event(fd, ev)
        elif self.lsock is not None and fd == self.lsock.fileno():
            self._accept(self.lsock, "ctl")
        elif self.msock is not None and fd == self.msock.fileno():
            self._accept(self.msock, "http")
        else:
            return False
        return True

    def _accept(self, lsock, kind):
        while True:
            try:
                c, _ = lsock.accept()
            except BlockingIOError:
                return
            c.setblocking(False)
            self.conns[c.fileno()] = {"sock": c, "kind": kind, "in": rpc.LineBuffer() if kind == "ctl" else bytearray(),
                                      "out": bytearray(), "waiting": False, "lines": collections.deque()}
            self.ep.register(c.fileno(), EPOLLIN)

    def _close_conn(self, fd):
        conn = self.conns.pop(fd, None)
        if conn:
            try:
                self.ep.unregister(fd)
            except OSError:
                pass
            conn["sock"].close()

    def _conn_event(self, fd, ev):
        conn = self.conns[fd]
        if ev & EPOLLIN and not conn.get("eof"):
            try:
                data = conn["sock"].recv(1 << 16)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                conn["eof"] = True          # answer what was asked, then close
            elif data:
                if conn["kind"] == "ctl":
                    conn["lines"].extend(conn["in"].feed(data))
                    self._serve_lines(conn)
                else:
                    conn["in"] += data
                    if metrics.http_request_complete(conn["in"]):
                        conn["out"] += metrics.http_reply(bytes(conn["in"]), self.metrics_text)
                        conn["eof"] = True
        self._flush_conn(fd, conn)

    def _serve_lines(self, conn):
        """Answer the connection's request lines in order; stop at one answered later."""
        while conn["lines"] and not conn["waiting"]:
            line = conn["lines"].popleft()
            if line is None:
                reply = RpcError(rpc.E_BAD_REQUEST, f"request line exceeds {rpc.MAX_LINE_BYTES} bytes").reply()
            else:
                reply = self.handle_line(line, lambda r, conn=conn: self._late_reply(conn, r))
            if reply is None:
                conn["waiting"] = True
            else:
                conn["out"] += rpc.encode(reply)

    def _late_reply(self, conn, reply):
        """The reply of an operation that ran on the kernel thread."""
        conn["waiting"] = False
        fd = conn["sock"].fileno()
        if fd < 0 or self.conns.get(fd) is not conn:
            return                          # the client went away
        conn["out"] += rpc.encode(reply)
        self._serve_lines(conn)
        self._flush_conn(fd, conn)

    def _flush_conn(self, fd, conn):
        if conn["out"]:
            try:
                sent = conn["sock"].send(conn["out"])
                del conn["out"][:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._close_conn(fd)
                return
        if conn.get("eof") and not conn["out"] and not conn["waiting"] and not conn["lines"]:
            self._close_conn(fd)
            return
        events = (0 if conn.get("eof") else EPOLLIN) | (EPOLLOUT if conn["out"] else 0)
        if events != conn.get("events", EPOLLIN):
            self.ep.modify(fd, events)
            conn["events"] = events

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
                raise RpcError(rpc.E_UNKNOWN_OP, f"unknown op {op!r}; accepted: {', '.join(sorted(self.handlers))}")
            if op in self.kernel_ops:
                if late_reply is None:
                    raise RpcError(rpc.E_INTERNAL, f"{op!r} needs the event loop")
                self.ops.append((handler(req), op, late_reply))   # started by next_op
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

    @property
    def busy(self) -> bool:
        """A kernel operation is running (the loop must not stop under it)."""
        return self.active_op is not None

    def next_op(self):
        """Start the next queued kernel operation unless one is running."""
        while self.active_op is None and self.ops:
            gen, op, reply = self.ops.popleft()
            if self.stopping():
                gen.close()
                reply(RpcError(rpc.E_TRY_AGAIN, "vswitchd is shutting down; try again").reply())
                continue
            self.active_op = (gen, op, reply)
            self._step_op(True, None)

    def _step_op(self, ok, value):
        """Advance the running operation with a kernel job's result (or exception)."""
        gen, op, reply_cb = self.active_op
        try:
            job = gen.send(value) if ok else gen.throw(value)
        except StopIteration as done:
            reply = {"ok": True, **(done.value or {})}
        except Exception as exc:
            reply = self._error_reply(op, exc)
        else:
            self.kernel.submit(job[0], job[1:])
            return
        self.active_op = None
        reply_cb(reply)
        self.next_op()

    def kernel_done(self):
        """The kernel thread finished jobs: hand their results to the running operation."""
        for ok, value in self.kernel.completions():
            if self.active_op is not None:
                self._step_op(ok, value)
