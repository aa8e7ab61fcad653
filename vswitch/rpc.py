"""The control protocol of vswitchd: JSON lines over a unix stream socket.

Theory of operation: a client writes one JSON object and ``\\n``; the daemon answers with
one JSON object and ``\\n``; a connection may carry several requests in turn
(``docs/control.md`` is the contract). This module holds the framing, the error codes and
a blocking client. It imports only the standard library, because the CNI plugin (which
must start fast) and vswitchctl use it; the daemon uses :class:`LineBuffer` for its
non-blocking side. For the plugin's start, it imports neither ``json`` nor ``re`` nor
``socket`` (each costs milliseconds per pod, mostly in ``re`` and ``enum``): JSON goes through
``vswitch.fastjson`` (the same C code as ``json``), the client's socket is ``_socket``'s
(what ``socket.socket`` extends), and ``re`` is compiled the first time a line holds more
brackets than ``MAX_DEPTH`` (never for a normal request).
"""
from __future__ import annotations

import _socket

from vswitch import fastjson

DEFAULT_SOCKET = "/run/vswitch/vswitchd.sock"
MAX_LINE_BYTES = 1 << 20        # a request line (the daemon's limit; replies have none of their own)
MAX_REPLY_BYTES = 1 << 30       # what a client reads as one reply, at most
MAX_DEPTH = 32                  # levels of nesting of a request (the object itself is level 1)

# error codes: CNI ones where one fits, 100+ our own
E_BAD_ARGS = 4
E_INVALID_CONFIG = 7
E_TRY_AGAIN = 11
E_NETLINK = 101
E_IF_EXISTS = 102
E_UNKNOWN_ATTACHMENT = 103
E_CHECK_FAILED = 104
E_BAD_REQUEST = 105
E_UNKNOWN_OP = 106
E_FAULT = 107
E_INTERNAL = 999


class RpcError(Exception):
    """An error reply (or a transport failure, code 11) with the protocol's fields."""

    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def reply(self) -> dict:
        out = {"ok": False, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def encode(obj: dict) -> bytes:
    """One protocol line."""
    return fastjson.dumps(obj, separators=(",", ":")).encode() + b"\n"


_STRING = None      # the compiled pattern of a JSON string (nesting_exceeds), made on first use
_BRACKETS = bytes.maketrans(b"{}", b"[]")      # one kind of bracket: the depth is the same
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


def nesting_exceeds(line: bytes, max_depth: int = MAX_DEPTH) -> bool:
    """Whether the JSON text ``line`` nests deeper than ``max_depth``, without parsing it:
    the strings are cut out and only the brackets kept; then a run of more opening
    brackets than the depth left is too deep, else each pass removes the innermost pairs
    (``[]``). Text that is not balanced is left to the parser to reject. Normal requests
    (at most ``max_depth`` brackets in all) cost two counts; a 1 MiB line at most ~0.1 s."""
    if line.count(b"[") + line.count(b"{") <= max_depth:
        return False
    global _STRING
    if _STRING is None:
        import re
        _STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
    s = _STRING.sub(b"", line).translate(_BRACKETS, _NOT_BRACKET)
    for left in range(max_depth, 0, -1):
        if not s:
            return False
        if b"[" * (left + 1) in s:
            return True
        t = s.replace(b"[]", b"")
        if len(t) == len(s):
            return False
        s = t
    return bool(s)


def decode(line: bytes, what: str = "request", max_bytes: int = MAX_LINE_BYTES) -> dict:
    """Parse one request (or, with ``what="reply"`` and a larger ``max_bytes``, reply)
    line; RpcError 105 if it is too long, nests deeper than MAX_DEPTH, or is not a JSON
    object."""
    if len(line) > max_bytes:
        raise RpcError(E_BAD_REQUEST, f"{what} of {len(line)} bytes exceeds {max_bytes} bytes")
    if nesting_exceeds(line):
        raise RpcError(E_BAD_REQUEST, f"{what} nests deeper than {MAX_DEPTH} levels; accepted: at most {MAX_DEPTH}")
    try:
        obj = fastjson.loads(line)
    except ValueError as exc:          # json.JSONDecodeError, UnicodeDecodeError
        raise RpcError(E_BAD_REQUEST, f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise RpcError(E_BAD_REQUEST, f"{what} nests too deeply; accepted: at most {MAX_DEPTH} levels") from None
    if not isinstance(obj, dict):
        raise RpcError(E_BAD_REQUEST, f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


class LineBuffer:
    """Accumulates bytes from a stream and returns complete lines (without ``\\n``).

    A line longer than MAX_LINE_BYTES is reported once as ``None`` (the caller answers with
    an error) and its bytes are discarded up to the next newline.
    """

    def __init__(self):
        self._buf = bytearray()
        self._skipping = False

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished line are held (or being skipped)."""
        return bool(self._buf) or self._skipping

    def feed(self, data: bytes) -> list:
        self._buf += data
        lines = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_LINE_BYTES and not self._skipping:
                    self._skipping = True
                    lines.append(None)
                if self._skipping:
                    self._buf.clear()
                return lines
            line = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            if self._skipping:
                self._skipping = False
                continue
            if len(line) > MAX_LINE_BYTES:
                lines.append(None)
            else:
                lines.append(line)


class Client:
    """A blocking connection to vswitchd. ``call`` raises RpcError on an error reply."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout_s: float = 30.0):
        self.path = path
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout_s)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise RpcError(E_TRY_AGAIN, f"vswitchd is not reachable at {path}: {exc.strerror or exc}") from None
        self._buf = bytearray()

    def _readline(self) -> bytes:
        """The next reply line with its ``\\n`` (at most MAX_REPLY_BYTES + 1 bytes, like
        ``readline(limit)``); what came before the end of the stream if it has none."""
        buf = self._buf
        scanned = 0
        while True:
            nl = buf.find(b"\n", scanned)
            if 0 <= nl <= MAX_REPLY_BYTES:
                line = bytes(buf[:nl + 1])
                del buf[:nl + 1]
                return line
            if len(buf) > MAX_REPLY_BYTES:
                line = bytes(buf[:MAX_REPLY_BYTES + 1])
                del buf[:MAX_REPLY_BYTES + 1]
                return line
            scanned = len(buf)
            data = self.sock.recv(1 << 16)
            if not data:
                line = bytes(buf)
                buf.clear()
                return line
            buf += data

    def request(self, req: dict) -> dict:
        """Send one request, return the raw reply (ok or not)."""
        try:
            self.sock.sendall(encode(req))
            line = self._readline()
        except OSError as exc:
            raise RpcError(E_TRY_AGAIN, f"vswitchd at {self.path} failed: {exc.strerror or exc}") from None
        if not line:
            raise RpcError(E_TRY_AGAIN, f"vswitchd at {self.path} closed the connection")
        return decode(line, "reply", MAX_REPLY_BYTES)

    def call(self, op: str, **args) -> dict:
        reply = self.request({"op": op, **args})
        if not reply.get("ok"):
            raise RpcError(int(reply.get("code", E_INTERNAL)), str(reply.get("msg", "unknown error")),
                           str(reply.get("details", "")))
        return reply

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def call(path: str, op: str, timeout_s: float = 30.0, **args) -> dict:
    """One request on a fresh connection."""
    with Client(path, timeout_s) as c:
        return c.call(op, **args)
