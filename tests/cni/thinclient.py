"""A reference thin CNI client in Python: the ``cni_exec`` protocol's client side as
``vswitch/daemon/cniexec.py`` documents it, written from that text (the C client is
``cni/client.c``). Tests drive vswitchd's side with it, and garble it where they attack."""
from __future__ import annotations

import os
import socket
import struct

from vswitch_cni import ipam

HELLO = b'{"op":"cni_exec","v":1}\n'
OK_LINE = b'{"ok":true,"v":1}\n'


def env_block(env: dict) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()) + b"\0"


def frame(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">cI", kind, len(payload)) + payload


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_frame(sock):
    kind, length = struct.unpack(">cI", recv_exact(sock, 5))
    return kind, recv_exact(sock, length)


def read_line(sock) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        c = sock.recv(1)
        if not c:
            break
        line += c
    return line


def run_r(payload: bytes) -> bytes:
    """Execute an R frame's plugin here; the D frame's payload."""
    name, dirs, rest = payload.split(b"\0", 2)
    env = {}
    while True:
        entry, rest = rest.split(b"\0", 1)
        if not entry:
            break
        k, _, v = entry.partition(b"=")
        env[k.decode()] = v.decode()
    try:
        exe = ipam.find_plugin(name.decode(), dirs.decode().split(":"))
    except Exception:
        return struct.pack(">iI", -1002, 0)
    rc, out, err = ipam._spawn(exe, env, rest)
    return struct.pack(">iI", rc, len(out)) + out + err


def invoke(socket_path: str, env: dict, stdin: bytes, timeout_s: float = 60.0):
    """One invocation through vswitchd: (exit status, stdout bytes, stderr bytes, R frames
    seen). Raises ConnectionError when the daemon refuses the session (its reply line)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(socket_path)
        s.sendall(HELLO)
        line = read_line(s)
        if line != OK_LINE:
            raise ConnectionError(line.decode(errors="replace"))
        s.sendall(frame(b"I", env_block(env) + stdin))
        out, err, runs = b"", b"", 0
        while True:
            kind, payload = recv_frame(s)
            if kind == b"R":
                runs += 1
                s.sendall(frame(b"D", run_r(payload)))
            elif kind == b"O":
                out += payload
            elif kind == b"E":
                err += payload
            elif kind == b"X":
                return struct.unpack(">i", payload)[0], out, err, runs
            else:
                raise AssertionError(f"unknown frame {kind!r}")
    finally:
        s.close()
