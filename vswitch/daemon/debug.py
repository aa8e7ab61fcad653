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

**Traces** (``trace``; ``vswitchctl trace``): a frame, given as hex or described
(``build_frame``: Ethernet/IPv4 with TCP SYN, UDP or ICMP echo, without scapy), is run
through ``Switch.trace``, which reports each pipeline stage's decision without changing
any table.
"""
from __future__ import annotations

import ipaddress
import struct
import time

from vswitch.datapath import consts as C
from vswitch import rpc
from vswitch.config import parse_mac
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

    def frames(self, buf, offsets, lengths, in_ports, out_ports, n, port_fds):
        """rx (out_ports None: before processing) or tx frames of captured ports into pcaps."""
        for pid, w in self.writers.items():
            for i in range(n):
                if out_ports is None:
                    hit = in_ports[i] == pid
                else:
                    o = out_ports[i]
                    hit = o == pid or (o == C.OUT_FLOOD and in_ports[i] != pid and port_fds[pid] >= 0)
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
