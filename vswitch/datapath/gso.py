"""Tunnel GSO in software: a VXLAN-encapsulated TCP segmentation-offload frame cut into wire frames.

Theory of operation
-------------------
The core encapsulates a pod's TSO frame (up to 64 KiB of TCP payload behind one set of
headers) whole and marks its virtio-net header ``gso_type |= VNET_GSO_UDP_TUNNEL_IPV4``
(docs/datapath.md "VXLAN"). No socket here takes that type (AF_PACKET's vnet header on
Linux 6.18 refuses it with EINVAL; only tun has the 6.17 tunnel extension), so the I/O
layer does what a NIC with ``tx-udp_tnl-segmentation`` does: :func:`segment_vxlan` cuts
the inner TCP payload into ``gso_size`` pieces and puts in front of each a copy of the
frame's headers (outer Ethernet, IPv4, UDP, VXLAN, inner Ethernet, IP, TCP) with, per
segment k of N:

- outer IPv4: total length, ID + k, header checksum recomputed; UDP: length, checksum 0;
- inner IPv4: total length, ID + k, header checksum recomputed / IPv6: payload length;
- TCP: seq + k * gso_size; CWR only in the first segment, FIN and PSH only in the last;
  the checksum field := the pseudo-header sum of that segment, not complemented (what
  Linux's tcp4/6_gso_segment leave for CHECKSUM_PARTIAL);
- its own vnet header: NEEDS_CSUM, gso_type 0, csum_start = the inner TCP header's offset
  (from the outer frame's start), csum_offset 16, hdr_len and gso_size 0: the kernel (or
  the NIC) completes the TCP checksum of each wire frame.

The layout is parsed from the frame, never taken from the header's csum_start/hdr_len:
outer Ethernet + IPv4 (any IHL) + UDP + VXLAN, inner Ethernet (untagged) + IPv4 (any IHL,
not a fragment) or IPv6 (hop-by-hop / routing / destination options headers skipped, at
most MAX_IPV6_EXT_HEADERS) + TCP (any data offset). Anything else carrying the tunnel bit
(inner UDP, a gso_type that does not match the inner family, truncated headers, headers
longer than GSO_MAX_HDR_BYTES, gso_size below GSO_MIN_SIZE, a segment longer than an IPv4
packet) is not segmentable: ValueError with the reason (GSO_ERRORS); the writers count it
as a tx error and write nothing.

On an AF_PACKET port these segments leave packed as UDP GSO packets (``pack_udp_gso``,
"UDP GSO" below, D54); one write per segment stays for ``--tunnel-gso segments``.

This module is the executable spec (stdlib only) of the C version in ``ext/io.pxi``
(``_core.segment_vxlan`` for tests; the BatchIO writer writes the same segments with
writev(vnet header, rebuilt headers, payload slice): no payload copy). The Python writer
of ``vswitch/daemon/ports.py`` uses this module.
"""
from __future__ import annotations

import struct

from vswitch.datapath.consts import (MAX_IPV6_EXT_HEADERS, UDP_GSO_MAX_SEGS, VNET_F_DATA_VALID, VNET_F_NEEDS_CSUM,
                                     VNET_GSO_UDP_L4, VNET_GSO_UDP_TUNNEL_IPV4)

VNET_GSO_TCPV4 = 1
VNET_GSO_TCPV6 = 4
VNET_GSO_ECN = 0x80
# a frame with a smaller gso_size is not segmented: Linux's net.ipv4.tcp_min_snd_mss default,
# the smallest MSS a Linux sender uses; caps one 64 KiB frame at 1366 writes (a pod setting
# gso_size 1 would otherwise cost 65,000 writes per frame read)
GSO_MIN_SIZE = 48
# the rebuilt headers of a segment (outer + inner, up to the end of the inner TCP header)
# live in a buffer of this size in the C writer
GSO_MAX_HDR_BYTES = 512

# why a frame with the tunnel bit is not segmentable; the C version returns the same index
GSO_ERRORS = (
    "ok",
    "vnet header shorter than 10 bytes",
    "gso_type lacks VNET_GSO_UDP_TUNNEL_IPV4 (0x20)",
    "inner gso_type is not TCPV4 (1) or TCPV6 (4)",
    f"gso_size below {GSO_MIN_SIZE}",
    "outer headers: not Ethernet + IPv4 + UDP + VXLAN (truncated, or another protocol)",
    "inner Ethernet type does not match the gso_type (0x0800 for TCPV4, 0x86DD for TCPV6)",
    "inner IP header: truncated, bad version or IHL, a fragment, or not TCP",
    "inner TCP header truncated or data offset below 5",
    f"headers longer than {GSO_MAX_HDR_BYTES} bytes",
    "a segment would exceed 65535 bytes of outer IPv4",
)

_IPV6_SKIPPED = (0, 43, 60)      # hop-by-hop, routing, destination options


def _sum16(data, s: int = 0) -> int:
    if len(data) & 1:
        data = bytes(data) + b"\0"
    for (w,) in struct.iter_unpack("!H", data):
        s += w
    return s


def _fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def ipv4_header_checksum(header) -> int:
    """The RFC 791 checksum of an IPv4 header whose checksum field is zero."""
    return ~_fold(_sum16(header)) & 0xFFFF


def layout(hdr, frame):
    """(error index, dict) of a tunnel GSO frame: the offsets segment_vxlan works with
    (outer_l3, udp, inner_l3, l4, hdr_end, v6, gso_size, segs); error 0 = segmentable."""
    if len(hdr) < 10:
        return 1, None
    gso_type = hdr[1]
    if not gso_type & VNET_GSO_UDP_TUNNEL_IPV4:
        return 2, None
    inner_type = gso_type & ~(VNET_GSO_UDP_TUNNEL_IPV4 | VNET_GSO_ECN)
    if inner_type not in (VNET_GSO_TCPV4, VNET_GSO_TCPV6):
        return 3, None
    gso_size = hdr[4] | hdr[5] << 8
    if gso_size < GSO_MIN_SIZE:
        return 4, None
    n = len(frame)
    if n < 14 + 20 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4 or frame[14] & 15 < 5:
        return 5, None
    udp = 14 + (frame[14] & 15) * 4
    if frame[14 + 9] != 17 or udp + 8 + 8 + 14 > n:
        return 5, None
    inner_eth = udp + 16
    il3 = inner_eth + 14
    v6 = inner_type == VNET_GSO_TCPV6
    if frame[inner_eth + 12:inner_eth + 14] != (b"\x86\xdd" if v6 else b"\x08\x00"):
        return 6, None
    if not v6:
        if il3 + 20 > n or frame[il3] >> 4 != 4 or frame[il3] & 15 < 5:
            return 7, None
        l4 = il3 + (frame[il3] & 15) * 4
        frag = (frame[il3 + 6] << 8 | frame[il3 + 7]) & 0x3FFF
        if l4 > n or frame[il3 + 9] != 6 or frag:
            return 7, None
    else:
        if il3 + 40 > n or frame[il3] >> 4 != 6:
            return 7, None
        nh, l4 = frame[il3 + 6], il3 + 40
        for _ in range(MAX_IPV6_EXT_HEADERS):
            if nh not in _IPV6_SKIPPED:
                break
            if l4 + 8 > n:
                return 7, None
            nh, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
        if nh != 6:
            return 7, None
    if l4 + 20 > n or frame[l4 + 12] >> 4 < 5:
        return 8, None
    hdr_end = l4 + (frame[l4 + 12] >> 4) * 4
    if hdr_end > n:
        return 8, None
    if hdr_end > GSO_MAX_HDR_BYTES:
        return 9, None
    payload = n - hdr_end
    segs = max(1, -(-payload // gso_size))
    if hdr_end + min(payload, gso_size) - 14 > 65535:
        return 10, None
    return 0, dict(udp=udp, inner_l3=il3, l4=l4, hdr_end=hdr_end, v6=v6, gso_size=gso_size, segs=segs)


def segment_vxlan(hdr, frame) -> list[tuple[bytes, bytes]]:
    """The wire frames of a tunnel GSO frame: [(vnet header, frame)], each header as long as
    `hdr` (10 or 12 bytes; a longer `hdr`: 12). ValueError (GSO_ERRORS) when the frame is
    not segmentable."""
    hdr, frame = bytes(hdr), bytes(frame)
    err, g = layout(hdr, frame)
    if err:
        raise ValueError(f"segment_vxlan: {GSO_ERRORS[err]}")
    udp, il3, l4, hdr_end, gso_size, segs = (g[k] for k in ("udp", "inner_l3", "l4", "hdr_end", "gso_size", "segs"))
    outer_id = int.from_bytes(frame[18:20], "big")
    inner_id = int.from_bytes(frame[il3 + 4:il3 + 6], "big")
    seq = int.from_bytes(frame[l4 + 4:l4 + 8], "big")
    flags = frame[l4 + 13]
    vh = bytearray(min(len(hdr), 12))
    vh[0] = VNET_F_NEEDS_CSUM
    vh[6:8] = l4.to_bytes(2, "little")
    vh[8:10] = (16).to_bytes(2, "little")
    out = []
    for k in range(segs):
        start = hdr_end + k * gso_size
        payload = frame[start:start + gso_size]
        seg_len = hdr_end + len(payload)
        h = bytearray(frame[:hdr_end])
        h[16:18] = (seg_len - 14).to_bytes(2, "big")
        h[18:20] = ((outer_id + k) & 0xFFFF).to_bytes(2, "big")
        h[24:26] = b"\0\0"
        h[24:26] = ipv4_header_checksum(h[14:udp]).to_bytes(2, "big")
        h[udp + 4:udp + 6] = (seg_len - udp).to_bytes(2, "big")
        h[udp + 6:udp + 8] = b"\0\0"
        tcp_len = seg_len - l4
        if g["v6"]:
            h[il3 + 4:il3 + 6] = (seg_len - il3 - 40).to_bytes(2, "big")
            pseudo = _sum16(h[il3 + 8:il3 + 40], tcp_len + 6)
        else:
            h[il3 + 2:il3 + 4] = (seg_len - il3).to_bytes(2, "big")
            h[il3 + 4:il3 + 6] = ((inner_id + k) & 0xFFFF).to_bytes(2, "big")
            h[il3 + 10:il3 + 12] = b"\0\0"
            h[il3 + 10:il3 + 12] = ipv4_header_checksum(h[il3:l4]).to_bytes(2, "big")
            pseudo = _sum16(h[il3 + 12:il3 + 20], tcp_len + 6)
        h[l4 + 4:l4 + 8] = ((seq + k * gso_size) & 0xFFFFFFFF).to_bytes(4, "big")
        f = flags
        if k > 0:
            f &= ~0x80                      # CWR: the first segment only
        if k < segs - 1:
            f &= ~0x09                      # FIN, PSH: the last segment only
        h[l4 + 13] = f
        h[l4 + 16:l4 + 18] = _fold(pseudo).to_bytes(2, "big")
        out.append((bytes(vh), bytes(h) + payload))
    return out


# ---------------------------------------------------------------- receive coalescing
# The other direction: decapsulated frames of one TCP flow reach a pod one wire segment at a
# time. The TAP writer merges a run of them into one GSO frame (what the kernel's GRO does
# for a NIC), so the pod's stack gets one skb and the switch makes one write instead of up
# to COALESCE_MAX_FRAMES. A run: consecutive frames of the batch to the same port (frames
# dropped or queued between them are skipped, any other output ends it), each one
# *eligible* (coalesce_info) and *mergeable* with the first (same_flow, contiguous sequence
# numbers, the same payload length except the last, which may be shorter, a PSH ends the
# run, at most 65535 bytes of IP). The merged frame: the first frame's headers with the IP
# length (IPv4 header checksum recomputed) for the whole payload, TCP flags ACK (| PSH of
# the last), the TCP checksum field := the pseudo-header sum, and a vnet header NEEDS_CSUM,
# gso_type TCPV4/TCPV6, gso_size = the first payload length, hdr_len = the headers' length,
# csum_start = the TCP offset, csum_offset 16. The C writer gathers the payloads straight
# from the batch with one writev (no copy).

COALESCE_MAX_FRAMES = 64
_ACK, _PSH = 0x10, 0x08


def coalesce_info(vh, frame):
    """(l4, hdr_end, payload length, seq, v6, psh) of a frame that may be coalesced, else None:
    vnet header with no GSO and NEEDS_CSUM or DATA_VALID (its checksum is trusted: never
    merge what was not verified), untagged IPv4 (IHL 5, not a fragment, total length = the
    frame's) or IPv6 (TCP directly, payload length = the frame's), TCP flags ACK or ACK|PSH
    exactly, a payload of at least one byte."""
    n = len(frame)
    if vh[1] != 0 or not vh[0] & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID) or n < 54:
        return None
    if frame[12:14] == b"\x08\x00":
        if (frame[14] != 0x45 or frame[23] != 6 or (frame[20] << 8 | frame[21]) & 0x3FFF
                or frame[16] << 8 | frame[17] != n - 14):
            return None
        l4, v6 = 34, False
    elif frame[12:14] == b"\x86\xdd":
        if n < 74 or frame[14] >> 4 != 6 or frame[20] != 6 or frame[18] << 8 | frame[19] != n - 54:
            return None
        l4, v6 = 54, True
    else:
        return None
    doff = frame[l4 + 12] >> 4
    hdr_end = l4 + doff * 4
    if doff < 5 or hdr_end >= n or frame[l4 + 13] & ~_PSH != _ACK:
        return None
    return l4, hdr_end, n - hdr_end, int.from_bytes(frame[l4 + 4:l4 + 8], "big"), v6, bool(frame[l4 + 13] & _PSH)


def _flow_bytes(frame, l4, hdr_end, v6):
    """The header bytes two frames of one run share: all but lengths, IPv4 ID and checksum,
    TCP seq, flags and checksum."""
    ip = frame[:18] + frame[20:l4] if v6 else frame[:16] + frame[20:24] + frame[26:l4]
    return ip + frame[l4:l4 + 4] + frame[l4 + 8:l4 + 13] + frame[l4 + 14:l4 + 16] + frame[l4 + 18:hdr_end]


def coalesce_count(items) -> int:
    """How many leading (vnet header, frame) of `items` (the candidates of one port, in batch
    order) merge into one frame: 1 when none."""
    first = coalesce_info(*items[0]) if items else None
    if first is None or first[5]:
        return 1
    l4, hdr_end, size, _, v6, _ = first
    f0 = _flow_bytes(items[0][1], l4, hdr_end, v6)
    total, prev, m = size, first, 1
    for vh, frame in items[1:COALESCE_MAX_FRAMES]:
        s = coalesce_info(vh, frame)
        if (s is None or s[4] != v6 or s[1] != hdr_end or prev[2] != size or s[2] > size
                or s[3] != (prev[3] + prev[2]) & 0xFFFFFFFF or hdr_end - 14 + total + s[2] > 65535
                or _flow_bytes(frame, l4, hdr_end, v6) != f0):
            break
        total, prev, m = total + s[2], s, m + 1
        if s[5]:
            break
    return m


def coalesced(items) -> tuple[bytes, bytes]:
    """The merged (12-byte vnet header, frame) of items (coalesce_count(items) == len(items) >= 2)."""
    l4, hdr_end, size, _, v6, _ = coalesce_info(*items[0])
    last_psh = coalesce_info(*items[-1])[5]
    payload = b"".join(bytes(f[hdr_end:]) for _, f in items)
    h = bytearray(items[0][1][:hdr_end])
    tcp_len = hdr_end - l4 + len(payload)
    if v6:
        h[18:20] = (hdr_end - 54 + len(payload)).to_bytes(2, "big")
        pseudo = _sum16(h[22:54], tcp_len + 6)
    else:
        h[16:18] = (hdr_end - 14 + len(payload)).to_bytes(2, "big")
        h[24:26] = b"\0\0"
        h[24:26] = ipv4_header_checksum(h[14:34]).to_bytes(2, "big")
        pseudo = _sum16(h[26:34], tcp_len + 6)
    h[l4 + 13] = _ACK | (_PSH if last_psh else 0)
    h[l4 + 16:l4 + 18] = _fold(pseudo).to_bytes(2, "big")
    vh = struct.pack("<BBHHHHH", VNET_F_NEEDS_CSUM, VNET_GSO_TCPV6 if v6 else VNET_GSO_TCPV4, hdr_end, size,
                     l4, 16, 0)
    return vh, bytes(h) + payload


# ---------------------------------------------------------------- UDP GSO (D54)
# Segments leave faster as one packet: AF_PACKET on this kernel takes a vnet header with
# gso_type VNET_GSO_UDP_L4 (USO), and a veth, a bridge and the peer's packet socket carry
# such an skb whole; only a real NIC (or a socket that does not take GSO) cuts it, in
# gso_size pieces of UDP payload, each behind a copy of the outer headers with the IPv4
# length, ID (+1 per piece) and header checksum and the UDP length and checksum rewritten
# (Linux's __udp_gso_segment). So pack_udp_gso puts the wire segments of segment_vxlan back
# to back as the UDP payload of one packet: the kernel's cut gives back exactly those
# segments. The outer UDP checksum is the kernel's (NEEDS_CSUM at the outer UDP header: the
# one partial checksum a packet may carry), so each inner TCP checksum is completed here.
# The receiving switch reads the packet whole and cuts it itself (split_udp_gso): one
# sendmsg and one read per up to UDP_GSO_MAX_SEGS segments instead of one each.


SPLIT_ERRORS = (
    "ok",
    "vnet header shorter than 10 bytes",
    f"gso_type is not UDP_L4 ({VNET_GSO_UDP_L4})",
    "not untagged Ethernet + IPv4 (IHL >= 5, not a fragment) + UDP, or truncated",
    "gso_size 0",
    f"more than {UDP_GSO_MAX_SEGS} segments",
)


def complete_tcp_checksum(seg: bytes, l4: int) -> bytes:
    """`seg` (a segment_vxlan frame: the TCP checksum field holds the pseudo-header sum) with
    the TCP checksum completed, as the kernel completes NEEDS_CSUM at csum_start = l4."""
    s = bytearray(seg)
    s[l4 + 16:l4 + 18] = (~_fold(_sum16(s[l4:])) & 0xFFFF).to_bytes(2, "big")
    return bytes(s)


def _udp_pseudo(frame, udp_len: int) -> int:
    """The IPv4 UDP pseudo-header sum (folded, not complemented) for a UDP length."""
    return _fold(_sum16(frame[26:34], 17 + udp_len))


def pack_udp_gso(hdr, frame) -> list[tuple[bytes, bytes]]:
    """The UDP GSO packets of a tunnel GSO frame: [(vnet header, packet)], each header as
    long as `hdr` (10 or 12). Packet j carries segments j*per .. (the segment_vxlan frames,
    TCP checksums completed) as one UDP payload behind the first's outer headers: IPv4 total
    length of the whole, ID of its first segment, header checksum; UDP length of the whole,
    checksum field = the pseudo-header sum. per = the most segments whose packet stays within
    65535 bytes of IP, at most UDP_GSO_MAX_SEGS. vnet header: NEEDS_CSUM, csum_start = the
    outer UDP offset, csum_offset 6, hdr_len = UDP offset + 8; gso_type UDP_L4 and gso_size =
    a full segment's UDP payload when the packet holds two or more segments, else 0.
    ValueError (GSO_ERRORS) as segment_vxlan."""
    hdr, frame = bytes(hdr), bytes(frame)
    err, g = layout(hdr, frame)
    if err:
        raise ValueError(f"pack_udp_gso: {GSO_ERRORS[err]}")
    udp, l4 = g["udp"], g["l4"]
    segs = [complete_tcp_checksum(f, l4) for _, f in segment_vxlan(hdr, frame)]
    seg_payload = len(segs[0]) - (udp + 8)
    per = max(1, min(UDP_GSO_MAX_SEGS, (65535 - (udp - 14) - 8) // seg_payload))
    out = []
    for j in range(0, len(segs), per):
        group = segs[j:j + per]
        body = b"".join(s[udp + 8:] for s in group)
        h = bytearray(group[0][:udp + 8])
        h[16:18] = (udp - 14 + 8 + len(body)).to_bytes(2, "big")
        h[24:26] = b"\0\0"
        h[24:26] = ipv4_header_checksum(h[14:udp]).to_bytes(2, "big")
        h[udp + 4:udp + 6] = (8 + len(body)).to_bytes(2, "big")
        h[udp + 6:udp + 8] = _udp_pseudo(h, 8 + len(body)).to_bytes(2, "big")
        many = len(group) > 1
        vh = struct.pack("<BBHHHH", VNET_F_NEEDS_CSUM, VNET_GSO_UDP_L4 if many else 0, udp + 8,
                         seg_payload if many else 0, udp, 6) + bytes(2)
        out.append((vh[:min(len(hdr), 12)], bytes(h) + body))
    return out


def split_layout(hdr, frame):
    """(error index, (udp offset, gso_size, segments)) of a UDP GSO frame read whole."""
    if len(hdr) < 10:
        return 1, None
    if hdr[1] != VNET_GSO_UDP_L4:
        return 2, None
    n = len(frame)
    if n < 14 + 20 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4 or frame[14] & 15 < 5:
        return 3, None
    udp = 14 + (frame[14] & 15) * 4
    if frame[23] != 17 or (frame[20] << 8 | frame[21]) & 0x3FFF or udp + 8 > n:
        return 3, None
    gso_size = hdr[4] | hdr[5] << 8
    if gso_size == 0:
        return 4, None
    segs = max(1, -(-(n - udp - 8) // gso_size))
    if segs > UDP_GSO_MAX_SEGS:
        return 5, None
    return 0, (udp, gso_size, segs)


def split_udp_gso(hdr, frame) -> list[tuple[bytes, bytes]]:
    """The datagrams of a UDP GSO frame as the reader puts them in the batch (what the
    kernel's __udp_gso_segment makes of it): [(12-byte vnet header, frame)]. Segment k: the
    outer Ethernet + IPv4 + UDP headers with the IPv4 total length, ID + k and header
    checksum, the UDP length set, and UDP payload bytes k*gso_size .. of the frame (the last
    piece may be shorter). NEEDS_CSUM in `hdr` (locally sent: the packet never crossed a
    wire): each keeps it with its own pseudo-header sum (csum_start = the UDP offset,
    csum_offset 6), else the UDP checksum is 0 and the flags keep DATA_VALID only.
    ValueError (SPLIT_ERRORS) when it cannot be cut."""
    hdr, frame = bytes(hdr), bytes(frame)
    err, g = split_layout(hdr, frame)
    if err:
        raise ValueError(f"split_udp_gso: {SPLIT_ERRORS[err]}")
    udp, gso_size, segs = g
    partial = hdr[0] & VNET_F_NEEDS_CSUM
    ip_id = frame[18] << 8 | frame[19]
    out = []
    for k in range(segs):
        piece = frame[udp + 8 + k * gso_size:udp + 8 + (k + 1) * gso_size]
        h = bytearray(frame[:udp + 8])
        h[16:18] = (udp - 14 + 8 + len(piece)).to_bytes(2, "big")
        h[18:20] = ((ip_id + k) & 0xFFFF).to_bytes(2, "big")
        h[24:26] = b"\0\0"
        h[24:26] = ipv4_header_checksum(h[14:udp]).to_bytes(2, "big")
        h[udp + 4:udp + 6] = (8 + len(piece)).to_bytes(2, "big")
        if partial:
            h[udp + 6:udp + 8] = _udp_pseudo(h, 8 + len(piece)).to_bytes(2, "big")
            vh = struct.pack("<BBHHHHH", VNET_F_NEEDS_CSUM, 0, 0, 0, udp, 6, 0)
        else:
            h[udp + 6:udp + 8] = b"\0\0"
            vh = struct.pack("<BBHHHHH", hdr[0] & VNET_F_DATA_VALID, 0, 0, 0, 0, 0, 0)
        out.append((vh, bytes(h) + piece))
    return out
