"""Frames for the simulation: builders and a small parser, in plain struct, no scapy.

Theory of operation
-------------------
The simulated hosts (pods, externals, the node behind the host port) answer ARP, ICMP
echo, TCP SYNs and UDP; the helpers (``a.udp_to(b, ...)``) build frames users send.
Doing that with scapy would cost ~100 µs per frame and make a 1,000-pod ARP flood take
seconds, so frames are packed with ``struct`` here, with checksums computed in full
(RFC 1071). Every builder is deterministic: IPv4 id 0 with DF set, TTL/hop limit 64,
no padding to 60 bytes (TAP devices do not pad). ``tests/sim`` checks each builder's
checksums and fields against scapy.

``frame_bytes`` accepts what users pass as a frame (bytes-like or a scapy packet; scapy
is imported only when the value is neither). ``parse`` reads just what a responder needs
(MACs, ethertype, ARP fields, IP addresses, protocol, ports, TCP flags/seq/ack, ICMP
type/id/seq and payload) and returns ``None`` for anything it cannot read; it never
raises on bad input.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_IP4, ETH_ARP, ETH_IP6, ETH_VLAN = 0x0800, 0x0806, 0x86DD, 0x8100
BROADCAST = b"\xff" * 6
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def frame_bytes(frame, what: str = "frame") -> bytes:
    """bytes of a frame given as bytes-like or a scapy packet; ValueError naming the value."""
    if isinstance(frame, bytes):
        return frame
    if isinstance(frame, (bytearray, memoryview)):
        return bytes(frame)
    try:
        from scapy.packet import Packet
    except ImportError:  # pragma: no cover
        Packet = ()
    if Packet and isinstance(frame, Packet):
        return bytes(frame)
    raise ValueError(f"{what}: expected bytes or a scapy packet, got {type(frame).__name__} {frame!r:.80}")


def ip_bytes(ip) -> bytes:
    if isinstance(ip, (bytes, bytearray)):
        return bytes(ip)
    return ipaddress.ip_address(ip).packed


def csum(data: bytes, start: int = 0) -> int:
    """Internet checksum (RFC 1071) of data, continuing from a partial sum ``start``."""
    if len(data) & 1:
        data += b"\0"
    s = start + sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> int:
    if len(src) == 4:
        hdr = src + dst + struct.pack("!BBH", 0, proto, length)
    else:
        hdr = src + dst + struct.pack("!IxxxB", length, proto)
    return sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))


# ---------------------------------------------------------------------------- builders

def ether(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return struct.pack("!HHBBH", 1, ETH_IP4, 6, 4, op) + sha + spa + tha + tpa


def arp_frame(op, src_mac, dst_mac, sha, spa, tha, tpa) -> bytes:
    return ether(dst_mac, src_mac, ETH_ARP, arp(op, sha, ip_bytes(spa), tha, ip_bytes(tpa)))


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ttl: int = 64, ident: int = 0) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, ttl, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def ipv6(src: bytes, dst: bytes, nh: int, payload: bytes, hlim: int = 64) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, hlim, src, dst) + payload


def ip_packet(src, dst, proto: int, l4: bytes, ttl: int = 64) -> bytes:
    src, dst = ip_bytes(src), ip_bytes(dst)
    if len(src) != len(dst):
        raise ValueError(f"source {ipaddress.ip_address(src)} and destination "
                         f"{ipaddress.ip_address(dst)} are of different families")
    return ipv4(src, dst, proto, l4, ttl) if len(src) == 4 else ipv6(src, dst, proto, l4, ttl)


def udp(src, dst, sport: int, dport: int, payload: bytes) -> bytes:
    src, dst = ip_bytes(src), ip_bytes(dst)
    length = 8 + len(payload)
    seg = struct.pack("!HHHH", sport, dport, length, 0) + payload
    c = csum(seg, _pseudo(src, dst, 17, length)) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def tcp(src, dst, sport: int, dport: int, seq: int, ack: int, flags: int, payload: bytes = b"",
        window: int = 65535, options: bytes = b"") -> bytes:
    src, dst = ip_bytes(src), ip_bytes(dst)
    if len(options) % 4:
        options += b"\0" * (4 - len(options) % 4)
    off = (20 + len(options)) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      off << 4, flags, window, 0, 0) + options + payload
    c = csum(seg, _pseudo(src, dst, 6, len(seg)))
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def icmp_echo(ident: int, seq: int, payload: bytes, reply: bool = False) -> bytes:
    msg = struct.pack("!BBHHH", 0 if reply else 8, 0, 0, ident, seq) + payload
    return msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]


def icmp6(src, dst, typ: int, code: int, body: bytes) -> bytes:
    src, dst = ip_bytes(src), ip_bytes(dst)
    msg = struct.pack("!BBH", typ, code, 0) + body
    c = csum(msg, _pseudo(src, dst, 58, len(msg)))
    return msg[:2] + struct.pack("!H", c) + msg[4:]


def icmp6_echo(src, dst, ident: int, seq: int, payload: bytes, reply: bool = False) -> bytes:
    return icmp6(src, dst, 129 if reply else 128, 0, struct.pack("!HH", ident, seq) + payload)


def ns_body(target: bytes, src_mac: bytes) -> bytes:
    return b"\0" * 4 + target + b"\x01\x01" + src_mac        # option: source link-layer address


def na_body(target: bytes, mac: bytes, solicited: bool = True) -> bytes:
    flags = 0x60000000 if solicited else 0x20000000          # S and O flags
    return struct.pack("!I", flags) + target + b"\x02\x01" + mac  # option: target link-layer


def solicited_node(ip6: bytes) -> tuple[bytes, bytes]:
    """(solicited-node multicast IPv6, its MAC) of an IPv6 address."""
    grp = b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + ip6[13:]
    return grp, b"\x33\x33" + grp[12:]


def l4_packet(src, dst, proto: int, sport: int, dport: int, payload: bytes = b"", *,
              flags: int = TCP_SYN, seq: int = 0, ack: int = 0) -> bytes:
    """An IP packet (v4 or v6 by address) carrying TCP or UDP."""
    if proto == 17:
        l4 = udp(src, dst, sport, dport, payload)
    elif proto == 6:
        l4 = tcp(src, dst, sport, dport, seq, ack, flags, payload)
    else:
        raise ValueError(f"protocol {proto!r}; accepted: 6 (tcp), 17 (udp)")
    return ip_packet(src, dst, proto, l4)


def vxlan(dst_mac: bytes, src_mac: bytes, src_ip, dst_ip, vni: int, inner: bytes, *,
          sport: int = 49152, dport: int = 4789, flags: int = 0x08, ttl: int = 64) -> bytes:
    """An underlay frame carrying ``inner`` (an Ethernet frame) in VXLAN (RFC 7348): outer
    IPv4 with DF, id 0; UDP checksum 0; VXLAN flags (0x08: the I bit), 24-bit VNI."""
    if not 0 <= vni < 1 << 24:
        raise ValueError(f"vni: {vni!r}; accepted: 0 .. {(1 << 24) - 1}")
    seg = struct.pack("!HHHHB3xI", sport, dport, 16 + len(inner), 0, flags, vni << 8) + inner
    return ether(dst_mac, src_mac, ETH_IP4, ipv4(ip_bytes(src_ip), ip_bytes(dst_ip), 17, seg, ttl))


def ethertype_of(ip_packet_bytes: bytes) -> int:
    return ETH_IP6 if ip_packet_bytes and ip_packet_bytes[0] >> 4 == 6 else ETH_IP4


# ---------------------------------------------------------------------------- parser

@dataclass
class Parsed:
    dst_mac: bytes
    src_mac: bytes
    ethertype: int
    arp_op: int = 0
    arp_sha: bytes = b""
    arp_spa: bytes = b""
    arp_tpa: bytes = b""
    ip_version: int = 0
    src_ip: bytes = b""
    dst_ip: bytes = b""
    ttl: int = 0
    proto: int = -1
    l3_offset: int = 14
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    seq: int = 0
    ack: int = 0
    icmp_type: int = -1
    icmp_code: int = 0
    icmp_id: int = 0
    icmp_seq: int = 0
    payload: bytes = b""


def parse(frame: bytes) -> Parsed | None:
    """The fields a simulated host needs, or None if the frame is not readable."""
    if len(frame) < 14:
        return None
    et = struct.unpack_from("!H", frame, 12)[0]
    off = 14
    if et == ETH_VLAN:
        if len(frame) < 18:
            return None
        et = struct.unpack_from("!H", frame, 16)[0]
        off = 18
    p = Parsed(frame[0:6], frame[6:12], et, l3_offset=off)
    try:
        if et == ETH_ARP:
            if len(frame) < off + 28:
                return None
            p.arp_op = struct.unpack_from("!H", frame, off + 6)[0]
            p.arp_sha = frame[off + 8:off + 14]
            p.arp_spa = frame[off + 14:off + 18]
            p.arp_tpa = frame[off + 24:off + 28]
            return p
        if et == ETH_IP4:
            vihl = frame[off]
            ihl = (vihl & 0xF) * 4
            if vihl >> 4 != 4 or ihl < 20 or len(frame) < off + ihl:
                return None
            total = struct.unpack_from("!H", frame, off + 2)[0]
            frag = struct.unpack_from("!H", frame, off + 6)[0]
            end = min(len(frame), off + total)
            p.ip_version, p.ttl, p.proto = 4, frame[off + 8], frame[off + 9]
            p.src_ip, p.dst_ip = frame[off + 12:off + 16], frame[off + 16:off + 20]
            l4 = off + ihl
            if frag & 0x1FFF or frag & 0x2000:
                p.proto = -p.proto - 1   # a fragment: not for the L4 responders
                return p
        elif et == ETH_IP6:
            if len(frame) < off + 40:
                return None
            plen = struct.unpack_from("!H", frame, off + 4)[0]
            p.ip_version, p.proto, p.ttl = 6, frame[off + 6], frame[off + 7]
            p.src_ip, p.dst_ip = frame[off + 8:off + 24], frame[off + 24:off + 40]
            l4 = off + 40
            end = min(len(frame), l4 + plen)
        else:
            return p
        seg = frame[l4:end]
        if p.proto in (6, 17) and len(seg) >= (20 if p.proto == 6 else 8):
            p.sport, p.dport = struct.unpack_from("!HH", seg)
            if p.proto == 6:
                p.seq, p.ack = struct.unpack_from("!II", seg, 4)
                p.tcp_flags = seg[13]
                p.payload = seg[(seg[12] >> 4) * 4:]
            else:
                p.payload = seg[8:]
        elif p.proto in (1, 58) and len(seg) >= 8:
            p.icmp_type, p.icmp_code = seg[0], seg[1]
            p.icmp_id, p.icmp_seq = struct.unpack_from("!HH", seg, 4)
            p.payload = seg[8:]
        return p
    except (struct.error, IndexError):
        return None
