"""The CNI plugin run by vswitchd for the thin client (``cni/client.c``): the ``cni_exec`` op.

Theory of operation
-------------------
A CNI ADD of the Python plugin costs its interpreter's start and imports (about 20 ms of
the ~45 ms here) before any work; the reference Go bridge plugin does the whole ADD in
~18 ms. So the installed ``vswitch`` binary is a small C client (as kube-ovn's and Antrea's
are) and the plugin's logic, ``vswitch_cni.plugin.run``, runs here, where everything is
imported already. The IPAM plugin is still executed by the client, in the runtime's
context (its mount namespace, CNI_PATH, cgroup), as the CNI spec means it.

The client connects to the control socket and sends the line ``{"op":"cni_exec","v":1}``.
The control server (``ControlServer.handoff``) answers ``{"ok":true,"v":1}``, takes the
connection out of its epoll and gives it to a session thread here; from then on both
sides speak frames: one type byte, a 4-byte big-endian length, the payload
(``MAX_FRAME`` at most):

- client -> daemon ``I`` once: every variable of its environment as ``KEY=VALUE\\0``, an
  empty entry ``\\0``, then its stdin bytes; ``D`` per ``R``: the int32 status (exit
  code; -N killed by signal N; -1000-errno when it could not start, -1002 not found in
  any directory), the uint32 length of stdout, stdout, then stderr;
- daemon -> client ``R``: run the plugin ``name\\0`` found in ``dirs\\0`` (colon-separated)
  with the environment (entries, empty entry) and stdin (the rest); ``E`` stderr bytes,
  ``O`` stdout bytes, ``X`` the int32 exit status, last.

The session runs ``plugin.run`` with :class:`SessionIo` as the invocation's outside world
(stdout, stderr and IPAM executions go over the socket) and a log prefix with the client's
pid (SO_PEERCRED). The plugin's own requests (attach, detach ...) reach this daemon through
its control socket as they do from the Python plugin: the same code, the same ordering of
kernel operations. The plugin's ``logFile`` is written by this process.

Bounded: at most ``max_sessions`` at once (beyond, the op answers code 11 and the client
runs the Python plugin itself, which still works); the ``I`` frame must come within
``HELLO_TIMEOUT_S``, each ``D`` within ``RUN_TIMEOUT_S`` (an IPAM plugin may wait on a DHCP
server); a frame over ``MAX_FRAME``, an unknown frame type, an environment entry without
``=`` or a socket error ends the session (counted, logged); the client then reports code
11 to the runtime. Nothing here touches the packet path.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading

from vswitch_cni import plugin
from vswitch_cni.errors import CniError, IPAM_FAILED
from vswitch_cni.ipam import not_found

VERSION = 1
OK_LINE = b'{"ok":true,"v":1}\n'
MAX_FRAME = 16 << 20
MAX_SESSIONS = 64              # the runtimes here run up to 50 ADDs at once (bench_cni); beyond: Python fallback
HELLO_TIMEOUT_S = 10.0
RUN_TIMEOUT_S = 300.0
START_FAILED = -1000            # a 'D' status at or below this: -1000 - errno
_HEAD = struct.Struct(">cI")
_INT = struct.Struct(">i")
_D_HEAD = struct.Struct(">iI")


class ProtocolError(Exception):
    """The client broke the frame protocol."""


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ProtocolError(f"the client closed the connection ({got} of {n} bytes read)")
        got += k
    return bytes(buf)


def recv_frame(sock) -> tuple[bytes, bytes]:
    kind, length = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    if length > MAX_FRAME:
        raise ProtocolError(f"frame {kind!r} of {length} bytes; accepted: at most {MAX_FRAME}")
    return kind, _recv_exact(sock, length)


def send_frame(sock, kind: bytes, payload: bytes) -> None:
    if len(payload) > MAX_FRAME:
        payload = payload[:MAX_FRAME]   # only O/E text could be this big: cut, never refused
    sock.sendall(_HEAD.pack(kind, len(payload)) + payload)


def split_env(data: bytes) -> tuple[dict, bytes]:
    """``KEY=VALUE\\0``... ``\\0`` rest -> (environment, rest)."""
    env = {}
    pos = 0
    while True:
        end = data.find(b"\0", pos)
        if end < 0:
            raise ProtocolError("environment without its terminating empty entry")
        if end == pos:
            return env, data[end + 1:]
        key, eq, value = data[pos:end].partition(b"=")
        if not eq or not key:
            raise ProtocolError(f"environment entry without a name: {data[pos:end][:60]!r}")
        env[os.fsdecode(key)] = os.fsdecode(value)
        pos = end + 1


def join_env(env: dict) -> bytes:
    return b"".join(os.fsencode(k) + b"=" + os.fsencode(v) + b"\0" for k, v in env.items()) + b"\0"


class _Stdin:
    def __init__(self, data: bytes):
        self.data = data

    def read(self) -> bytes:
        return self.data


class SessionIo:
    """``ipam.LocalIo``'s interface over a client's socket."""

    def __init__(self, sock, pid: int | None):
        self.sock = sock
        self.own_netns = f"/proc/{pid}/ns/net" if pid else "/proc/self/ns/net"

    def out(self, text: str) -> None:
        send_frame(self.sock, b"O", text.encode("utf-8", "surrogateescape"))

    def err(self, text) -> None:
        send_frame(self.sock, b"E", text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape"))

    def run_plugin(self, plugin_type, path_dirs, env, stdin):
        send_frame(self.sock, b"R", os.fsencode(plugin_type) + b"\0" + os.fsencode(os.pathsep.join(path_dirs))
                   + b"\0" + join_env(env) + bytes(stdin))
        kind, payload = recv_frame(self.sock)
        if kind != b"D" or len(payload) < _D_HEAD.size:
            raise ProtocolError(f"expected a D frame of at least {_D_HEAD.size} bytes, got {kind!r} of {len(payload)}")
        status, n_out = _D_HEAD.unpack_from(payload)
        if n_out > len(payload) - _D_HEAD.size:
            raise ProtocolError(f"D frame: stdout of {n_out} bytes in a payload of {len(payload)}")
        out = payload[_D_HEAD.size:_D_HEAD.size + n_out]
        err = payload[_D_HEAD.size + n_out:]
        if status <= START_FAILED:
            code = START_FAILED - status
            if code == errno.ENOENT:
                raise not_found(plugin_type, path_dirs)
            raise CniError(IPAM_FAILED, f"cannot run IPAM plugin {plugin_type}: {os.strerror(code)}")
        if err:
            self.err(err)
        return status, out


class CniExec:
    """The sessions of thin clients: at most ``max_sessions`` threads at once."""

    def __init__(self, log, max_sessions: int = MAX_SESSIONS):
        self.log = log
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self.active = 0
        self.stats = dict.fromkeys(("sessions", "busy", "failed"), 0)

    def status(self) -> dict:
        return {"active": self.active, "max": self.max_sessions, **self.stats}

    def reserve(self) -> bool:
        """Room for one more session (taken); False counts a refusal."""
        with self._lock:
            if self.active >= self.max_sessions:
                self.stats["busy"] += 1
                return False
            self.active += 1
            self.stats["sessions"] += 1
            return True

    def start(self, sock) -> None:
        """Run a reserved session for ``sock`` (a connected unix socket, now ours)."""
        try:
            threading.Thread(target=self._session, args=(sock,), name="cni-exec", daemon=True).start()
        except BaseException:
            self._release()
            sock.close()
            raise

    def _release(self):
        with self._lock:
            self.active -= 1

    def _session(self, sock):
        pid = None
        command = None
        try:
            sock.setblocking(True)
            sock.settimeout(HELLO_TIMEOUT_S)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", creds)[0] or None
            sock.sendall(OK_LINE)
            kind, payload = recv_frame(sock)
            if kind != b"I":
                raise ProtocolError(f"expected the I frame, got {kind!r}")
            environ, stdin = split_env(payload)
            command = environ.get("CNI_COMMAND")
            sock.settimeout(RUN_TIMEOUT_S)
            io = SessionIo(sock, pid)
            rc = plugin.run(environ, _Stdin(stdin), plugin.Log(io, pid))
            sock.sendall(_HEAD.pack(b"X", _INT.size) + _INT.pack(rc))
        except (OSError, ProtocolError) as exc:
            with self._lock:
                self.stats["failed"] += 1
            self.log("cni_exec_failed", level="warning", pid=pid, command=command, error=str(exc) or repr(exc))
        except Exception as exc:        # a bug: logged with its traceback; the daemon lives
            import traceback
            with self._lock:
                self.stats["failed"] += 1
            self.log("cni_exec_crashed", level="error", pid=pid, command=command, error=repr(exc),
                     tb=traceback.format_exc())
        finally:
            sock.close()
            self._release()
