"""Looking at packets in a running switch: pcap captures of a port, and traces.

Theory of operation
-------------------
**Captures** (``capture_start`` / ``capture_stop``; ``vswitchctl capture``): one classic
pcap file (Ethernet link type, microsecond timestamps of the wall clock) per captured
port. While any capture runs the daemon's loop leaves the Cython fast path and steps in
Python, calling ``Captures.frames`` on each batch twice: before processing (the frames
the port sent, ``out_ports`` None) and after (the frames the port receives: those sent
to it, and floods from another port while it has an fd), and on each batch the shaping
queues release. A port that leaves the switch closes its capture. Captures cost nothing
while none runs.

**Listings** (``fdb``, ``conntrack``; ``vswitchctl fdb`` / ``conntrack``) come in pages
of at most ``limit`` entries (``PAGE_DEFAULT``, at most ``PAGE_MAX``), optionally only
those of one ``port``. Entries are in the order of a key (the MAC table's: VLAN and MAC;
conntrack's: protocol, original addresses and ports, family); the reply's ``next`` is the
last key of the page as an opaque cursor, and the next page holds the entries after it.
So a table that changes between pages is listed without repeats or skips of the entries
that stayed; each page is a fresh snapshot (numpy, no Python object per table entry:
only the page's entries are converted).

**Traces** (``trace``; ``vswitchctl trace``): a frame, given as hex or described
(``build_frame``: Ethernet/IPv4 with TCP SYN, UDP or ICMP echo, without scapy), is run
through ``Switch.trace``, which reports each pipeline stage's decision without changing
any table.
"""
from __future__ import annotations

import ipaddress
import struct
import time

import numpy as np

from vswitch.datapath import consts as C
from vswitch import rpc
from vswitch.config import format_mac, parse_mac
from vswitch.rpc import RpcError


class PcapWriter:
    """A classic pcap file (Ethernet link type) of the frames seen on one port."""

    SNAPLEN = 262144

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "wb")
        self.f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, self.SNAPLEN, 1))
        self.packets = 0

    def write(self, frame) -> None:
        t = time.time()
        sec = int(t)
        self.f.write(struct.pack("<IIII", sec, int((t - sec) * 1e6), len(frame), len(frame)))
        self.f.write(frame)
        self.packets += 1

    def close(self) -> int:
        self.f.close()
        return self.packets


class Captures:
    """The running captures, by port id."""

    def __init__(self, log):
        self.log = log
        self.writers: dict[int, PcapWriter] = {}

    def __bool__(self) -> bool:
        return bool(self.writers)

    def start(self, sp, path: str) -> dict:
        """Capture switch port ``sp`` into a new pcap file at ``path``."""
        if sp.port_id in self.writers:
            raise RpcError(rpc.E_BAD_ARGS, f"port {sp.name!r} is already captured to {self.writers[sp.port_id].path}")
        try:
            self.writers[sp.port_id] = PcapWriter(path)
        except OSError as exc:
            raise RpcError(rpc.E_BAD_ARGS, f"path: cannot write {path!r}: {exc.strerror}") from None
        self.log("capture_start", port=sp.name, path=path)
        return {"port": sp.name, "path": path}

    def stop(self, sp) -> dict:
        w = self.writers.pop(sp.port_id, None)
        if w is None:
            raise RpcError(rpc.E_BAD_ARGS, f"port {sp.name!r} has no capture running")
        n = w.close()
        self.log("capture_stop", port=sp.name, path=w.path, packets=n)
        return {"packets": n, "path": w.path}

    def close(self, port_id: int):
        """The port left the switch: its capture ends."""
        w = self.writers.pop(port_id, None)
        if w:
            w.close()

    def close_all(self):
        for pid in list(self.writers):
            self.close(pid)

    def paths(self, switch) -> dict:
        """{switch port name: pcap path} (``show``)."""
        return {switch.port_name(k): v.path for k, v in self.writers.items()}

    def frames(self, buf, offsets, lengths, in_ports, out_ports, n, port_fds, port_flood=None):
        """rx (out_ports None: before processing) or tx frames of captured ports into pcaps."""
        for pid, w in self.writers.items():
            for i in range(n):
                if out_ports is None:
                    hit = in_ports[i] == pid
                else:
                    o = out_ports[i]
                    flood = (C.FLOOD_MEMBER if o == C.OUT_FLOOD else C.FLOOD_UNKNOWN_MEMBER
                             if o == C.OUT_FLOOD_UNKNOWN else 0)
                    hit = o == pid or (flood and in_ports[i] != pid and port_fds[pid] >= 0
                                       and (port_flood is None or port_flood[pid] & flood))
                if hit:
                    off = int(offsets[i])
                    w.write(bytes(buf[off:off + int(lengths[i])]))


def trace(switch, sp, req: dict, now_ns: int) -> dict:
    """The ``trace`` reply for a frame entering switch port ``sp``; code 4 on bad input."""
    try:
        if "frame_hex" in req:
            try:
                frame = bytes.fromhex(req["frame_hex"])
            except (TypeError, ValueError):
                raise ValueError(f"frame_hex: not hexadecimal: {req['frame_hex']!r:.80}") from None
        else:
            try:
                frame = build_frame(req.get("packet", req))
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"packet description: {exc}") from None
        stages = switch.trace(frame, sp.name, now_ns)
    except ValueError as exc:
        raise RpcError(rpc.E_BAD_ARGS, str(exc)) from None
    return {"stages": [list(s) for s in stages], "frame_hex": frame.hex()}


def build_frame(d: dict) -> bytes:
    """An Ethernet/IPv4 frame from a description (vswitchctl trace), without scapy."""
    src_mac = parse_mac(d.get("src_mac", "02:00:00:00:00:02"))
    dst_mac = parse_mac(d.get("dst_mac", "ff:ff:ff:ff:ff:ff"))
    src = ipaddress.IPv4Address(d["src_ip"])
    dst = ipaddress.IPv4Address(d["dst_ip"])
    proto = d.get("proto", "icmp")
    pnum = {"tcp": 6, "udp": 17, "icmp": 1}.get(proto)
    if pnum is None:
        raise ValueError(f"proto {proto!r}; accepted: tcp, udp, icmp")
    sport, dport = int(d.get("sport", 12345)), int(d.get("dport", 80))
    if pnum == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    elif pnum == 17:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
    else:
        l4 = struct.pack("!BBHHH", 8, 0, 0, 1, 1)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 1, 0, 64, pnum, 0, src.packed, dst.packed))
    s = sum(struct.unpack("!10H", ip))
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    ip[10:12] = struct.pack("!H", ~s & 0xFFFF)
    return dst_mac + src_mac + b"\x08\x00" + bytes(ip) + l4


# --------------------------------------------------------------------------- listings

PAGE_DEFAULT = 1000             # entries per page of fdb / conntrack without a limit
PAGE_MAX = 10000                # the largest limit accepted


def _page_args(switch, req: dict):
    """(limit, port id or None, cursor bytes or None, {port id: name}); code 4 on bad values."""
    limit = req.get("limit")
    limit = PAGE_DEFAULT if limit is None else limit
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= PAGE_MAX:
        raise RpcError(rpc.E_BAD_ARGS, f"limit: {limit!r}; accepted: an integer 1 .. {PAGE_MAX}")
    port = req.get("port")
    pid = None
    if port is not None:
        try:
            pid = switch.port(port).port_id
        except KeyError as exc:
            raise RpcError(rpc.E_BAD_ARGS, f"port: {exc.args[0]}") from None
    cursor = req.get("cursor")
    if cursor is not None:
        try:
            cursor = bytes.fromhex(cursor)
        except (TypeError, ValueError):
            raise RpcError(rpc.E_BAD_ARGS, f"cursor: {cursor!r:.80} is not a cursor; accepted: the "
                                           f"'next' of the previous page") from None
    return limit, pid, cursor, {p.port_id: p.name for p in switch.ports()}


def _page(rows, keys, limit: int, cursor) -> tuple:
    """(the page's rows, the next cursor or None): rows sorted by their byte-string keys."""
    order = np.argsort(keys, kind="stable")
    rows, keys = rows[order], keys[order]
    start = 0 if cursor is None else int(np.searchsorted(keys, np.array(cursor, dtype=keys.dtype),
                                                         side="right"))
    end = min(start + limit, len(rows))
    nxt = keys[end - 1].tobytes().ljust(keys.dtype.itemsize, b"\0").hex() if end < len(rows) else None
    return rows[start:end], nxt


def fdb_page(switch, req: dict, now_ns: int) -> dict:
    """The ``fdb`` reply: {"entries": [{"vlan", "mac", "port", "age_s", "static"}], "total", "next"}."""
    limit, pid, cursor, names = _page_args(switch, req)
    t = switch.dp.fdb()
    if pid is not None:
        t = t[t["port"] == pid]
    raw = np.empty((len(t), 8), dtype=np.uint8)
    raw[:, 0:2] = t["vlan"].astype(">u2").view(np.uint8).reshape(-1, 2)
    raw[:, 2:8] = t["mac"]
    page, nxt = _page(t, raw.view("S8").ravel(), limit, cursor)
    entries = [{"vlan": int(e["vlan"]), "mac": format_mac(bytes(e["mac"])),
                "port": names.get(int(e["port"]), int(e["port"])),
                "age_s": 0.0 if e["static"] else round(max(0, now_ns - int(e["last_seen_ns"])) / 1e9, 3),
                "static": bool(e["static"])} for e in page]
    return {"entries": entries, "total": len(t), "next": nxt}


def _ip_text(raw) -> str:
    """A snapshot's 16 address bytes (IPv4 as ::ffff:a.b.c.d) as text (as ``Switch.conntrack``)."""
    b = bytes(raw)
    return str(ipaddress.ip_address(b[12:] if b[:12] == b"\0" * 10 + b"\xff\xff" else b))


def conntrack_page(switch, req: dict, now_ns: int) -> dict:
    """The ``conntrack`` reply: {"entries": [...], "total", "next"} (docs/control.md)."""
    limit, pid, cursor, names = _page_args(switch, req)
    t = switch.dp.conntrack()
    if pid is not None:
        t = t[(t["in_port"] == pid) | (t["out_port"] == pid)]
    raw = np.empty((len(t), 38), dtype=np.uint8)
    raw[:, 0] = t["proto"]
    raw[:, 1:17] = t["orig_src"]
    raw[:, 17:33] = t["orig_dst"]
    raw[:, 33:35] = t["orig_sport"].astype(">u2").view(np.uint8).reshape(-1, 2)
    raw[:, 35:37] = t["orig_dport"].astype(">u2").view(np.uint8).reshape(-1, 2)
    raw[:, 37] = t["family"]
    page, nxt = _page(t, raw.view("S38").ravel(), limit, cursor)
    entries = []
    for e in page:
        fam, proto, state = int(e["family"]), int(e["proto"]), int(e["state"])
        entries.append({
            "proto": {6: "tcp", 17: "udp"}.get(proto, proto), "state": C.CT_STATE_NAMES.get(state, state),
            "hairpin": bool(e["hairpin"]), "family": fam,
            "orig_src": _ip_text(e["orig_src"]), "orig_dst": _ip_text(e["orig_dst"]),
            "orig_sport": int(e["orig_sport"]), "orig_dport": int(e["orig_dport"]),
            "reply_src": _ip_text(e["reply_src"]), "reply_dst": _ip_text(e["reply_dst"]),
            "reply_sport": int(e["reply_sport"]), "reply_dport": int(e["reply_dport"]),
            "in_port": names.get(int(e["in_port"]), int(e["in_port"])),
            "out_port": names.get(int(e["out_port"]), int(e["out_port"])),
            "orig_src_mac": format_mac(bytes(e["orig_src_mac"])), "orig_dst_mac": format_mac(bytes(e["orig_dst_mac"])),
            "packets": int(e["packets"]), "bytes": int(e["bytes"]),
            "expires_in_s": round((int(e["expires_ns"]) - now_ns) / 1e9, 3)})
    return {"entries": entries, "total": len(t), "next": nxt}
