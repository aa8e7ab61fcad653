"""The pure-Python datapath: the executable spec of docs/datapath.md.

Theory of operation
===================
docs/datapath.md is the contract, and its section *Decisions* (D1..D39) the finer points
both implementations follow; comments here cite them by number. One class,
``Datapath``, one method per pipeline stage, one packet at a time, tables in plain dicts.
It is slow on purpose: every line should be obviously what docs/datapath.md says, so
that the Cython core (ext/) can be checked against it byte for byte
(tests/datapath/test_differential.py).

process() validates the whole batch, then runs ``_process_one`` for each packet in order:
rx counters, the in port must exist -> ``_parse`` -> ``_antispoof`` -> the egress shaper
of the in port -> ``_forward``: ``_nat`` -> ``_l2`` -> the ingress shaper of the out port
-> tx counters (the stages are named in consts.STAGES, their trace texts in
consts.TRACE_EVENTS). A drop anywhere raises ``_Drop``, which names the reason and the
port it is counted on. Each packet sees the state left by the ones before it (sequential
semantics); drain() re-enters at ``_forward``.

Malformed-frame rule. The parser reads headers from the first ``lengths[i]`` bytes only.
A frame is dropped and counted ``malformed`` when it is shorter than 14 bytes, or says
802.1Q / ARP / IPv4 / IPv6 and its headers are truncated or inconsistent (the exact list
is in docs/datapath.md, *Parse*, and in ``_parse``). A frame that cannot be understood
further but is not inconsistent (other ethertypes, unknown IP protocols, non-first
fragments, more than 8 IPv6 extension headers) is switched at L2 only (non-first
fragments of a hostPort datagram are still translated, D39). Nothing is ever read past
the frame's length, because ``_parse`` reads a ``bytes`` copy of exactly the frame and checks every length first.

Shaping. A token bucket per (port, direction) with credit in bit*ns (bits x 10^9, exact
Python ints): a packet costs C*8*10^9 where C is its charged length; refill adds
elapsed_ns * rate_bps. C is the frame length L, except for an offloaded GSO frame (a TSO
segment of up to 64 KiB from a TAP): on a wire it becomes ceil(payload / gso_size) frames,
each with its own Ethernet/IP/TCP headers, so it is charged those headers once per extra
segment, as Linux's qdiscs charge it (``_charged_len``, D36). Without that a shaped TCP
stream got 4-5% more than its rate on the wire. Queue limits and counters stay in frame
bytes. A packet leaves at once if its queue is empty and the credit covers it, otherwise
it waits in a FIFO bounded in (frame) bytes. Oversized packets (cost > burst): while such
a packet is the head of the queue the credit cap rises to its cost, so it leaves
(C*8 - burst)/rate seconds after the bucket was full, and the charged bytes released
still never exceed burst + rate*t. No packet stalls forever. drain() releases due heads
oldest departure first; an egress packet then continues at ``_forward``.

Conntrack. One entry per connection holds both directions (BESS nat.h style): one index
maps the original tuple and the reply tuple to the same entry, so a reply is found with
the same one lookup as an original packet. The first packet to a hostPort rule creates
the entry and fixes its translation (DNAT to the pod, plus SNAT to the gateway for
hairpin); later packets only replay it. Entries expire by TCP/UDP state (FIN/RST shorten
them); an expired entry found is deleted on the spot, and a full table is swept at most
once per second of now_ns before a new entry is refused (``table_full``).

Fragments (D39). A translated first fragment leaves its datagram's translation in a dict
by fragment key, oldest first; with FRAG_SLOTS live datagrams held, the oldest goes.

Checksums are patched per RFC 1624 (``_csum_patch``), never recomputed; for frames with
NEEDS_CSUM the L4 field holds the pseudo-header sum and only the address words change it.

VXLAN (docs/datapath.md "VXLAN", D45-D49). With a VTEP set, ``_vxlan`` runs between NAT
and L2: a frame for our VTEP is decapsulated (``_decap``) to a local pod or the host
port, a frame to the gateway/VTEP MAC whose destination is in a peer CIDR (longest prefix:
a dict keyed by (family, prefix length, prefix), probed for each length present, longest
first) is routed and encapsulated (``_encap``). The packet moves in the buffer; _forward
leaves its new (offset, length) in ``_out_frame`` for process() and drain() to write back.
"""
import copy
import operator
from collections import deque

import numpy as np

from vswitch.datapath.consts import (
    CT_CLOSE, CT_DTYPE, CT_ESTABLISHED, CT_FIN, CT_STATE_NAMES, CT_SYN_RECV, CT_SYN_SENT, CT_UDP_NEW,
    CT_UDP_REPLIED, DEFAULTS, EGRESS, FDB_DTYPE, GC, GLOBAL_COUNTERS, INGRESS, MAX_FRAME,
    MAX_IPS_PER_PORT, MAX_IPV6_EXT_HEADERS, OUT_DROP, OUT_FLOOD, OUT_FLOOD_UNKNOWN, OUT_QUEUED, PC,
    FLOOD_MEMBER, FLOOD_UNKNOWN_MEMBER,
    PORT_COUNTERS, PORT_HOST, PORT_POD, PORT_UPLINK, SEC_NS, SWEEP_INTERVAL_NS,
    VNET_F_NEEDS_CSUM, VNET_F_DATA_VALID, FRAG_SLOTS, FRAG_TIMEOUT_NS, MAX_NODE_ADDRESSES, DROP_REASONS,
    SHAPER_VERDICTS, TRACE_EVENTS, trace_step,
    ENCAP_LEN, ENCAP_HEADROOM, MAX_PEER_CIDRS, VNET_GSO_UDP_TUNNEL_IPV4, VXLAN_PORT,
)

__all__ = ["Datapath"]
_MAX_I63 = 2**63 - 1

ETH_P_8021Q = 0x8100
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
FRAG_NONE, FRAG_FIRST, FRAG_LATER, FRAG_ATOMIC = 0, 1, 2, 3      # _Parsed.frag_kind (D39)
IPV6_EXT_HEADERS = (0, 43, 60, 44, 51)   # hop-by-hop, routing, dest opts, fragment, AH
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
# virtio-net header gso_type values (linux/virtio_net.h); D36
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

_ZERO4 = bytes(4)
_ZERO16 = bytes(16)
_V4MAPPED = bytes(10) + b"\xff\xff"


# --------------------------------------------------------------------------- helpers

_TRACE_EVENT = {event: i for i, (event, _, _) in enumerate(TRACE_EVENTS)}


def _trace(tr, event, a=0, b=0, frame_len=0):
    """Records trace event ``event`` (consts.TRACE_EVENTS) when tracing (tr is a list)."""
    tr.append(trace_step(_TRACE_EVENT[event], a, b, frame_len))


def _be16(b, i):
    return (b[i] << 8) | b[i + 1]


def _np16(buf, i):
    """A big-endian 16-bit word of a numpy uint8 buffer, as a Python int."""
    return (int(buf[i]) << 8) | int(buf[i + 1])


def _addr16(raw):
    """An address as the 16 bytes of the conntrack key (IPv4 as ::ffff:a.b.c.d)."""
    return _V4MAPPED + raw if len(raw) == 4 else raw


def _index(value, what, lo, hi):
    """An int in lo..hi, else ValueError naming the value."""
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{what} must be in {lo}..{hi}, got {v}")
    return v


def _bytes_of(value, what, lengths):
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what} must be bytes of length {' or '.join(map(str, lengths))}, got {value!r}")
    b = bytes(value)
    if len(b) not in lengths:
        raise ValueError(f"{what} must be {' or '.join(map(str, lengths))} bytes long, got {len(b)} bytes: {b.hex()}")
    return b


def _ip(value, what):
    return _bytes_of(value, what, (4, 16))


def _mac(value, what):
    return _bytes_of(value, what, (6,))


def _addr_items(ips, or_none, limit, noun):
    """list(ips), refusing a non-iterable and more than ``limit`` items."""
    try:
        items = list(ips)
    except TypeError:
        raise ValueError(f"ips must be an iterable of addresses{or_none}, got {ips!r}") from None
    if len(items) > limit:
        raise ValueError(f"at most {limit} {noun}, got {len(items)}")
    return items


def _words(raw):
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, len(raw), 2)]


def _fold(s):
    """Ones' complement fold with end-around carry: 0 only if s == 0, else 1..0xFFFF."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum_patch(hc, old_words, new_words, partial=False):
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'); partial (pseudo-header sum): HC + ~m + m'."""
    s = hc if partial else (~hc & 0xFFFF)
    for m in old_words:
        s += ~m & 0xFFFF
    for m in new_words:
        s += m
    s = _fold(s)
    return s if partial else (~s & 0xFFFF)


def _is_linklocal6(a):
    return a[0] == 0xFE and (a[1] & 0xC0) == 0x80


# --------------------------------------------------------------------------- parse

class _Parsed:
    """What the parser found in one frame. Offsets are relative to the frame start."""
    __slots__ = ("vlan", "ethertype", "l3", "family", "src", "dst", "is_arp",
                 "l4", "l4_proto", "fragment", "sport", "dport", "tcp_flags",
                 "frag_kind", "frag_id", "frag_proto")

    def __init__(self):
        self.vlan = 0
        self.ethertype = 0
        self.l3 = 14
        self.family = 0          # 4, 6 or 0 (no IP)
        self.src = None          # raw source address (4 or 16 bytes)
        self.dst = None
        self.is_arp = False
        self.l4 = -1             # offset of the L4 header, -1 = no L4
        self.l4_proto = 0        # 6, 17, 1, 58 when l4 >= 0
        self.fragment = False    # any fragment
        self.frag_kind = FRAG_NONE   # D39: FRAG_FIRST (more follow), FRAG_LATER, FRAG_ATOMIC
        self.frag_id = 0         # identification (IPv4 16 bits, IPv6 32 bits)
        self.frag_proto = 0      # IPv4 protocol / the IPv6 fragment header's next header
        self.sport = 0
        self.dport = 0
        self.tcp_flags = 0


def _parse_l4(b, p, proto, start, end, icmp_proto):
    """Checks the L4 header at b[start:end] (end = end of the IP payload). None or a reason.
    icmp_proto: the family's ICMP (1 in IPv4, 58 in IPv6; D9)."""
    avail = end - start
    if proto == IPPROTO_TCP:
        if avail < 20:
            return "tcp header truncated"
        doff = b[start + 12] >> 4
        if doff < 5:
            return "tcp data offset < 5"
        if doff * 4 > avail:
            return "tcp data offset beyond the packet"
        p.sport, p.dport, p.tcp_flags = _be16(b, start), _be16(b, start + 2), b[start + 13]
    elif proto == IPPROTO_UDP:
        if avail < 8:
            return "udp header truncated"
        ulen = _be16(b, start + 4)
        if ulen < 8 or (ulen > avail and not p.fragment):   # D38
            return "udp length inconsistent"
        p.sport, p.dport = _be16(b, start), _be16(b, start + 2)
    elif proto == icmp_proto:
        if avail < 4:
            return "icmp header truncated"
    else:
        return None
    p.l4, p.l4_proto = start, proto
    return None


def _parse(b):
    """The parse stage. b: the frame's bytes. Returns a _Parsed, or a str: why it is malformed."""
    n = len(b)
    p = _Parsed()
    if n < 14:
        return "shorter than 14 bytes"
    et = _be16(b, 12)
    l3 = 14
    if et == ETH_P_8021Q:
        if n < 18:
            return "802.1Q tag truncated"
        p.vlan = _be16(b, 14) & 0x0FFF
        et = _be16(b, 16)
        l3 = 18
    p.ethertype, p.l3 = et, l3
    avail = n - l3
    if et == ETH_P_ARP:
        if avail < 28:
            return "arp truncated"
        if _be16(b, l3) != 1 or _be16(b, l3 + 2) != ETH_P_IP or b[l3 + 4] != 6 or b[l3 + 5] != 4:
            return "arp not ethernet/ipv4"
        p.is_arp = True
    elif et == ETH_P_IP:
        if avail < 20:
            return "ipv4 header truncated"
        if b[l3] >> 4 != 4:
            return "ipv4 version != 4"
        ihl = (b[l3] & 0x0F) * 4
        if ihl < 20:
            return "ipv4 ihl < 5"
        total = _be16(b, l3 + 2)
        if total < ihl:
            return "ipv4 total length < header length"
        if total > avail:
            return "ipv4 total length beyond the frame"
        p.family, p.src, p.dst = 4, b[l3 + 12:l3 + 16], b[l3 + 16:l3 + 20]
        frag = _be16(b, l3 + 6)
        offset, more = frag & 0x1FFF, frag & 0x2000
        p.fragment = bool(offset or more)
        p.frag_kind = FRAG_LATER if offset else FRAG_FIRST if more else FRAG_NONE
        p.frag_id, p.frag_proto = _be16(b, l3 + 4), b[l3 + 9]
        if offset == 0:
            return _parse_l4(b, p, b[l3 + 9], l3 + ihl, l3 + total, IPPROTO_ICMP) or p
    elif et == ETH_P_IPV6:
        if avail < 40:
            return "ipv6 header truncated"
        if b[l3] >> 4 != 6:
            return "ipv6 version != 6"
        plen = _be16(b, l3 + 4)
        if plen > avail - 40:
            return "ipv6 payload length beyond the frame"
        p.family, p.src, p.dst = 6, b[l3 + 8:l3 + 24], b[l3 + 24:l3 + 40]
        nh, pos, end = b[l3 + 6], l3 + 40, l3 + 40 + plen
        for _ in range(MAX_IPV6_EXT_HEADERS):
            if nh not in IPV6_EXT_HEADERS:
                break
            left = end - pos
            if nh == 44:
                if left < 8:
                    return "ipv6 fragment header truncated"
                p.fragment = True
                p.frag_id, p.frag_proto = int.from_bytes(b[pos + 4:pos + 8], "big"), b[pos]
                if _be16(b, pos + 2) >> 3:
                    p.frag_kind = FRAG_LATER
                    return p                       # non-first fragment: no L4
                p.frag_kind = FRAG_FIRST if _be16(b, pos + 2) & 1 else FRAG_ATOMIC
                hlen = 8
            else:
                if left < 2:
                    return "ipv6 extension header truncated"
                hlen = (b[pos + 1] + 2) * 4 if nh == 51 else (b[pos + 1] + 1) * 8
                if left < hlen:
                    return "ipv6 extension header truncated"
            nh, pos = b[pos], pos + hlen
        else:
            if nh in IPV6_EXT_HEADERS:
                return p                           # more than 8 extension headers: no L4
        if nh in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6):
            return _parse_l4(b, p, nh, pos, end, IPPROTO_ICMPV6) or p
    return p


ICMP_ERROR_TYPES = {4: (3, 11, 12), 6: (1, 2, 3, 4)}   # D37

def _frag_key(family, src, dst, proto, ident):
    """D39: the key a fragmented datagram's translation is remembered under."""
    return (family, _addr16(src), _addr16(dst), proto, ident)


def _icmp_quoted(b, p):
    """D37: the packet an ICMP error quotes, as (quoted l3, quoted l4, end, proto, src,
    dst, sport, dport) with offsets from the frame start, or None. p: b's _Parsed, an
    ICMP / ICMPv6 packet with L4 and not a fragment."""
    l3, l4 = p.l3, p.l4
    end = l3 + _be16(b, l3 + 2) if p.family == 4 else l3 + 40 + _be16(b, l3 + 4)
    if b[l4] not in ICMP_ERROR_TYPES[p.family]:
        return None
    q3 = l4 + 8
    if p.family == 4:
        if end - q3 < 20 or b[q3] >> 4 != 4:
            return None
        ihl = (b[q3] & 0x0F) * 4
        if ihl < 20 or _be16(b, q3 + 6) & 0x3FFF:
            return None
        proto, src, dst, q4 = b[q3 + 9], b[q3 + 12:q3 + 16], b[q3 + 16:q3 + 20], q3 + ihl
    else:
        if end - q3 < 40 or b[q3] >> 4 != 6:
            return None
        proto, src, dst, q4 = b[q3 + 6], b[q3 + 8:q3 + 24], b[q3 + 24:q3 + 40], q3 + 40
    if proto not in (IPPROTO_TCP, IPPROTO_UDP) or end - q4 < 8:
        return None
    return q3, q4, end, proto, src, dst, _be16(b, q4), _be16(b, q4 + 2)


# --------------------------------------------------------------------------- state records

class _Port:
    __slots__ = ("kind", "up", "antispoof", "mac", "ips", "shapers")

    def __init__(self, kind):
        self.kind = kind
        self.up = True
        self.antispoof = kind == PORT_POD
        self.mac = None          # bound MAC or None
        self.ips = None          # frozenset of raw addresses, or None (IPs not checked)
        self.shapers = [None, None]   # indexed by EGRESS / INGRESS


def _charged_len(vnet, b, p):
    """D36: the bytes a shaper charges for a frame. vnet: its virtio-net header (b"" when
    vnet_hdr_len is 0), b: the frame, p: its _Parsed."""
    length = len(b)
    if not vnet or p.l4 < 0:
        return length
    gso_type = vnet[1] & ~VIRTIO_NET_HDR_GSO_ECN
    gso_size = vnet[4] | (vnet[5] << 8)
    if gso_size == 0:
        return length
    if gso_type in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) and p.l4_proto == IPPROTO_TCP:
        hdr_len = p.l4 + (b[p.l4 + 12] >> 4) * 4
    elif gso_type == VIRTIO_NET_HDR_GSO_UDP_L4 and p.l4_proto == IPPROTO_UDP:
        hdr_len = p.l4 + 8
    elif gso_type == VIRTIO_NET_HDR_GSO_UDP and p.l4_proto == IPPROTO_UDP:
        hdr_len = p.l4                     # IP fragments: the UDP header only in the first
    else:
        return length
    payload = length - hdr_len
    if payload <= 0:
        return length
    segs = -(-payload // gso_size)
    return min(length + (segs - 1) * hdr_len, 2 * length)


class _Queued:
    __slots__ = ("data", "length", "charged", "in_port", "out_port", "fresh")

    def __init__(self, data, length, charged, in_port, out_port, fresh):
        self.data = data         # vnet header + frame, as bytes
        self.length = length     # frame length (header excluded)
        self.charged = charged   # the length the shaper charges (D36)
        self.in_port = in_port
        self.out_port = out_port  # ingress queues: the decided out port
        self.fresh = fresh       # enqueued during the current drain() call


class _Shaper:
    """A token bucket with a FIFO; credit in bit*ns."""
    __slots__ = ("rate_bps", "burst_bits", "credit", "last_ns", "queue", "queue_bytes",
                 "queue_limit_bytes")

    def __init__(self, rate_bps, burst_bits, queue_limit_bytes):
        self.rate_bps = rate_bps
        self.burst_bits = burst_bits
        self.credit = burst_bits * SEC_NS      # a new shaper starts full
        self.last_ns = None                    # unset until the first packet or drain
        self.queue = deque()
        self.queue_bytes = 0
        self.queue_limit_bytes = queue_limit_bytes

    def cap(self):
        cap = self.burst_bits * SEC_NS
        if self.queue:
            cap = max(cap, self.queue[0].charged * 8 * SEC_NS)
        return cap

    def refill(self, now_ns):
        if self.last_ns is not None:
            self.credit = min(self.cap(), self.credit + (now_ns - self.last_ns) * self.rate_bps)
        self.last_ns = now_ns

    def head_departure_ns(self):
        cost = self.queue[0].charged * 8 * SEC_NS
        need = cost - self.credit
        wait = -(-need // self.rate_bps) if need > 0 else 0
        return self.last_ns + wait

    def offer(self, now_ns, length, charged):
        """'pass' (credit taken), 'queue' (caller appends) or 'full'. length: frame bytes
        (the queue limit), charged: the bytes the credit pays for (D36)."""
        self.refill(now_ns)
        cost = charged * 8 * SEC_NS
        if not self.queue and self.credit >= cost:
            self.credit -= cost
            return "pass"
        if self.queue_bytes + length <= self.queue_limit_bytes:
            return "queue"
        return "full"

    def append(self, item):
        self.queue.append(item)
        self.queue_bytes += item.length

    def release(self):
        """Pops the head at its departure time (D15)."""
        self.refill(self.head_departure_ns())
        item = self.queue.popleft()
        self.credit -= item.charged * 8 * SEC_NS
        self.queue_bytes -= item.length
        return item


class _Rule:
    __slots__ = ("id", "proto", "host_port", "host_ip", "pod_ip", "container_port", "pod_port_id")

    def __init__(self, rid, proto, host_port, host_ip, pod_ip, container_port, pod_port_id):
        self.id, self.proto, self.host_port, self.host_ip = rid, proto, host_port, host_ip
        self.pod_ip, self.container_port, self.pod_port_id = pod_ip, container_port, pod_port_id

    def key(self):
        return _rule_key(self.proto, self.host_port, self.host_ip, 4 if len(self.pod_ip) == 4 else 6)

    def as_dict(self):
        return dict(id=self.id, proto=self.proto, host_port=self.host_port, host_ip=self.host_ip,
                    pod_ip=self.pod_ip, container_port=self.container_port,
                    pod_port_id=self.pod_port_id)


def _rule_key(proto, host_port, host_ip, family):
    return (proto, host_port, host_ip) if host_ip is not None else (proto, host_port, None, family)


class _Entry:
    """One connection, both directions. Raw addresses are 4 or 16 bytes (the family's)."""
    __slots__ = ("proto", "state", "hairpin", "family", "orig_src", "orig_dst", "orig_sport",
                 "orig_dport", "reply_src", "reply_dst", "reply_sport", "reply_dport",
                 "in_port", "out_port", "orig_src_mac", "orig_dst_mac", "expires_ns",
                 "packets", "bytes", "fin_seen")

    def tuple_orig(self):
        return (self.family, self.proto, _addr16(self.orig_src), _addr16(self.orig_dst),
                self.orig_sport, self.orig_dport)

    def tuple_reply(self):
        return (self.family, self.proto, _addr16(self.reply_src), _addr16(self.reply_dst),
                self.reply_sport, self.reply_dport)


class _FdbEntry:
    __slots__ = ("port", "last_seen_ns", "static")

    def __init__(self, port, last_seen_ns, static=False):
        self.port, self.last_seen_ns, self.static = port, last_seen_ns, static


class _Drop(Exception):
    """Raised inside the pipeline: the packet is dropped for `reason`, counted on `port`."""

    def __init__(self, reason, port, why):
        super().__init__(reason)
        self.reason, self.port, self.why = reason, port, why


# --------------------------------------------------------------------------- VXLAN records

MAX_PEERS_LIMIT = 1 << 20          # the largest max_peers a Datapath accepts
FNV_OFFSET_BASIS = 0x811C9DC5
FNV_PRIME = 0x01000193


class _Vtep:
    __slots__ = ("port", "ip", "outer_mac", "vtep_mac", "vni", "udp_port", "mtu")

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class _Peer:
    __slots__ = ("ip", "vtep_mac", "underlay_mac", "cidrs", "tx_packets", "tx_bytes",
                 "rx_packets", "rx_bytes", "drop_unresolved")

    def as_dict(self):
        d = {name: getattr(self, name) for name in self.__slots__}
        d["cidrs"] = list(self.cidrs)
        return d


def _fnv1a(data):
    """FNV-1a, 32 bits, byte by byte (docs/datapath.md "VXLAN", encapsulation step 6)."""
    h = FNV_OFFSET_BASIS
    for x in data:
        h = ((h ^ x) * FNV_PRIME) & 0xFFFFFFFF
    return h


def _masked(addr, plen):
    """addr with every bit after the first plen bits cleared."""
    bits = len(addr) * 8
    v = int.from_bytes(addr, "big") & (((1 << plen) - 1) << (bits - plen))
    return v.to_bytes(len(addr), "big")


def _ip6_final_nh(b, l3):
    """The next header an IPv6 packet's extension-header chain ends with, walked as _parse
    walks it (D47): the first that is not an extension header; a non-first fragment's
    fragment-header next header; after 8 extension headers, the 9th next header value."""
    nh, pos = b[l3 + 6], l3 + 40
    for _ in range(MAX_IPV6_EXT_HEADERS):
        if nh not in IPV6_EXT_HEADERS:
            return nh
        if nh == 44:
            if _be16(b, pos + 2) >> 3:
                return b[pos]
            hlen = 8
        else:
            hlen = (b[pos + 1] + 2) * 4 if nh == 51 else (b[pos + 1] + 1) * 8
        nh, pos = b[pos], pos + hlen
    return nh


def _le16(buf, i):
    return int(buf[i]) | (int(buf[i + 1]) << 8)


def _put_le16(buf, i, v):
    buf[i], buf[i + 1] = v & 0xFF, (v >> 8) & 0xFF


def _cidr_key(addr, plen):
    return (4 if len(addr) == 4 else 6, plen, addr)


def _cidr_text(addr, plen):
    import ipaddress
    return f"{ipaddress.ip_address(addr)}/{plen}"


def _peer_cidrs(cidrs):
    """set_peer's cidrs as [(family, prefix_len, addr)], checked (ValueError naming the value)."""
    try:
        items = list(cidrs)
    except TypeError:
        raise ValueError(f"cidrs must be a list of (address, prefix_len), got {cidrs!r}") from None
    if not 1 <= len(items) <= MAX_PEER_CIDRS:
        raise ValueError(f"cidrs must hold 1..{MAX_PEER_CIDRS} items, got {len(items)}")
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"a cidr must be (address, prefix_len), got {item!r}")
        addr = _ip(item[0], "cidr address")
        plen = _index(item[1], "cidr prefix_len", 0, len(addr) * 8)
        if _masked(addr, plen) != addr:
            raise ValueError(f"cidr {_cidr_text(addr, plen)} has host bits set")
        key = _cidr_key(addr, plen)
        if key in out:
            raise ValueError(f"cidr {_cidr_text(addr, plen)} is given twice")
        out.append(key)
    return out


# --------------------------------------------------------------------------- the datapath

class Datapath:
    """See the module docstring and docs/datapath.md."""

    def __init__(self, *, max_ports=DEFAULTS["max_ports"], mac_table_size=DEFAULTS["mac_table_size"],
                 conntrack_size=DEFAULTS["conntrack_size"], max_hostports=DEFAULTS["max_hostports"],
                 vnet_hdr_len=DEFAULTS["vnet_hdr_len"], mac_aging_ns=DEFAULTS["mac_aging_ns"],
                 tcp_syn_timeout_ns=DEFAULTS["tcp_syn_timeout_ns"],
                 tcp_est_timeout_ns=DEFAULTS["tcp_est_timeout_ns"],
                 tcp_fin_timeout_ns=DEFAULTS["tcp_fin_timeout_ns"],
                 tcp_close_timeout_ns=DEFAULTS["tcp_close_timeout_ns"],
                 udp_timeout_ns=DEFAULTS["udp_timeout_ns"],
                 udp_replied_timeout_ns=DEFAULTS["udp_replied_timeout_ns"],
                 tcp_syn_recv_timeout_ns=DEFAULTS["tcp_syn_recv_timeout_ns"],
                 mac_learn_rate_per_s=DEFAULTS["mac_learn_rate_per_s"],
                 mac_learn_burst=DEFAULTS["mac_learn_burst"], max_peers=DEFAULTS["max_peers"]):
        self.max_ports = _index(max_ports, "max_ports", 1, 65535)
        self.max_peers = _index(max_peers, "max_peers", 1, MAX_PEERS_LIMIT)
        self.mac_table_size = _index(mac_table_size, "mac_table_size", 1, _MAX_I63)
        self.conntrack_size = _index(conntrack_size, "conntrack_size", 1, _MAX_I63)
        self.max_hostports = _index(max_hostports, "max_hostports", 1, _MAX_I63)
        self.vnet_hdr_len = _index(vnet_hdr_len, "vnet_hdr_len", 0, 12)
        if self.vnet_hdr_len not in (0, 10, 12):
            raise ValueError(f"vnet_hdr_len must be 0, 10 or 12, got {vnet_hdr_len}")
        self.mac_aging_ns = _index(mac_aging_ns, "mac_aging_ns", 0, _MAX_I63)
        self.mac_learn_rate_per_s = _index(mac_learn_rate_per_s, "mac_learn_rate_per_s", 0, 10**9)
        self.mac_learn_burst = _index(mac_learn_burst, "mac_learn_burst", 1, 10**9)
        self._timeouts = {
            CT_SYN_SENT: _index(tcp_syn_timeout_ns, "tcp_syn_timeout_ns", 0, _MAX_I63),
            CT_ESTABLISHED: _index(tcp_est_timeout_ns, "tcp_est_timeout_ns", 0, _MAX_I63),
            CT_FIN: _index(tcp_fin_timeout_ns, "tcp_fin_timeout_ns", 0, _MAX_I63),
            CT_CLOSE: _index(tcp_close_timeout_ns, "tcp_close_timeout_ns", 0, _MAX_I63),
            CT_UDP_NEW: _index(udp_timeout_ns, "udp_timeout_ns", 0, _MAX_I63),
            CT_UDP_REPLIED: _index(udp_replied_timeout_ns, "udp_replied_timeout_ns", 0, _MAX_I63),
            CT_SYN_RECV: _index(tcp_syn_recv_timeout_ns, "tcp_syn_recv_timeout_ns", 0, _MAX_I63),
        }
        self._ports = {}                       # port id -> _Port
        self._pc = [[0] * len(PORT_COUNTERS) for _ in range(self.max_ports)]
        self._gc = [0] * len(GLOBAL_COUNTERS)
        self._gw_mac = None
        self._gw_ip = {4: None, 6: None}
        self._node_ips = frozenset()
        self._fdb = {}                         # (vlan, mac bytes) -> _FdbEntry
        self._learned = {}                     # port id -> {key: None} of its learned entries, oldest first
        self._learn_bucket = {}                # port id -> [tokens in learns*10^9, last_ns or None]
        self._flood = np.zeros(self.max_ports, dtype=np.uint8)   # flood_classes()
        self._fdb_auto_sweep_ns = None
        self._rules = {}                       # rule key -> _Rule
        self._rule_ids = {}                    # rule id -> _Rule
        self._ct = {}                          # tuple -> (_Entry, 0 original | 1 reply)
        self._ct_entries = set()               # every live _Entry (by identity)
        self._ct_unassured = {}                # D40: the unassured entries (keys), oldest first
        self._frags = {}                       # D39: fragment key -> its datagram's translation, oldest first
        self._ct_auto_sweep_ns = None
        self._now_ns = 0                       # the latest now_ns of process() / drain()
        self._draining = False
        self._vtep = None                      # VXLAN: our _Vtep, or None (docs/datapath.md "VXLAN")
        self._peers = {}                       # peer VTEP IPv4 (4 bytes) -> _Peer
        self._cidrs = {}                       # (family, prefix_len, masked addr) -> peer ip
        self._plens = None                     # {family: prefix lengths present, longest first}
        self._out_frame = None                 # (offset, length) of the frame _forward output

    # ------------------------------------------------------------------ ports

    def _port(self, port_id):
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        port = self._ports.get(pid)
        if port is None:
            raise ValueError(f"port {pid} is not added")
        return pid, port

    def add_port(self, port_id, kind):
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        if pid in self._ports:
            raise ValueError(f"port {pid} is already added")
        if kind not in (PORT_POD, PORT_HOST, PORT_UPLINK) or isinstance(kind, bool):
            raise ValueError(f"port kind must be PORT_POD, PORT_HOST or PORT_UPLINK (0, 1, 2), got {kind!r}")
        self._ports[pid] = _Port(kind)
        self._pc[pid] = [0] * len(PORT_COUNTERS)
        self._learned[pid] = {}
        self._learn_bucket[pid] = [self.mac_learn_burst * SEC_NS, None]
        self._update_flood_classes()

    def remove_port(self, port_id):
        pid, port = self._port(port_id)
        for direction in (EGRESS, INGRESS):
            self._drop_shaper(pid, direction)
        for key in [k for k, e in self._fdb.items() if e.port == pid]:
            del self._fdb[key]
        del self._learned[pid], self._learn_bucket[pid]
        for rule in sorted((r for r in self._rules.values() if r.pod_port_id == pid), key=lambda r: r.id):
            self._remove_rule(rule)
        for entry in [e for e in self._ct_entries if pid in (e.in_port, e.out_port)]:
            self._ct_delete(entry, "ct_deleted")
        del self._ports[pid]
        if self._vtep is not None and self._vtep.port == pid:
            self._vtep = None
        self._update_flood_classes()

    def set_port_up(self, port_id, up):
        _, port = self._port(port_id)
        port.up = bool(up)
        self._update_flood_classes()

    def _update_flood_classes(self):
        """flood_classes(): which ports a flood output is written to (D41)."""
        self._flood[:] = 0
        for pid, port in self._ports.items():
            if port.up and port.shapers[INGRESS] is None:
                self._flood[pid] = FLOOD_MEMBER | (FLOOD_UNKNOWN_MEMBER if port.kind != PORT_POD else 0)

    def flood_classes(self):
        """uint8[max_ports], read-only and kept current: bit FLOOD_MEMBER set for the ports an
        OUT_FLOOD output is written to, FLOOD_UNKNOWN_MEMBER for OUT_FLOOD_UNKNOWN (the I/O
        layer still skips the in port). Ports with an ingress shaper are in neither: they get
        their copy through the shaper's queue (D41)."""
        view = self._flood.view()
        view.flags.writeable = False
        return view

    def bind_port(self, port_id, mac=None, ips=None):
        pid, port = self._port(port_id)
        mac_b = None if mac is None else _mac(mac, "mac")
        ips_set = None
        if ips is not None:
            items = _addr_items(ips, " or None", MAX_IPS_PER_PORT, "ips per port")
            ips_set = frozenset(_ip(a, "ip") for a in items)
        # D42: the bound MAC is a static FDB entry (vlan 0) of this port
        # (a MAC bound to another port moves to this one: the latest binding owns it)
        old_key = None if port.mac is None else (0, port.mac)
        new_key = None if mac_b is None else (0, mac_b)
        if new_key is not None and new_key not in self._fdb and new_key != old_key:
            if len(self._fdb) >= self.mac_table_size and not any(self._learned.values()):
                raise ValueError(f"the MAC table ({self.mac_table_size} entries) holds only bound MACs; "
                                 f"cannot bind mac {mac_b.hex(':')}")
        if old_key is not None and old_key != new_key:
            e = self._fdb.get(old_key)
            if e is not None and e.static and e.port == pid:
                del self._fdb[old_key]
        if new_key is not None:
            e = self._fdb.get(new_key)
            if e is not None:
                self._fdb_delete(new_key)
            elif len(self._fdb) >= self.mac_table_size:
                self._evict(None)
            self._fdb[new_key] = _FdbEntry(pid, 0, True)
        port.mac, port.ips = mac_b, ips_set

    def set_antispoof(self, port_id, enabled):
        _, port = self._port(port_id)
        port.antispoof = bool(enabled)

    def set_gateway(self, mac, ipv4=None, ipv6=None):
        mac_b = _mac(mac, "gateway mac")
        v4 = None if ipv4 is None else _bytes_of(ipv4, "gateway ipv4", (4,))
        v6 = None if ipv6 is None else _bytes_of(ipv6, "gateway ipv6", (16,))
        self._gw_mac, self._gw_ip = mac_b, {4: v4, 6: v6}

    def set_node_addresses(self, ips):
        items = _addr_items(ips, "", MAX_NODE_ADDRESSES, "node addresses")
        self._node_ips = frozenset(_ip(a, "node address") for a in items)

    # ------------------------------------------------------------------ shapers

    def set_shaper(self, port_id, direction, rate_bps, burst_bits, queue_bytes=0):
        pid, port = self._port(port_id)
        if direction not in (EGRESS, INGRESS) or isinstance(direction, bool):
            raise ValueError(f"direction must be EGRESS (0) or INGRESS (1), got {direction!r}")
        rate = _index(rate_bps, "rate_bps", 0, _MAX_I63)
        burst = _index(burst_bits, "burst_bits", 0, _MAX_I63)
        qbytes = _index(queue_bytes, "queue_bytes", 0, _MAX_I63)
        if rate == 0:
            self._drop_shaper(pid, direction)
            return
        limit = qbytes or max(131106, rate // 320, min(burst // 8, 16777216))
        shaper = port.shapers[direction]
        if shaper is None:
            port.shapers[direction] = _Shaper(rate, burst, limit)
            self._update_flood_classes()
        else:
            shaper.rate_bps, shaper.burst_bits, shaper.queue_limit_bytes = rate, burst, limit
            shaper.credit = min(shaper.credit, burst * SEC_NS)

    def clear_shaper(self, port_id, direction):
        pid, _ = self._port(port_id)
        if direction not in (EGRESS, INGRESS) or isinstance(direction, bool):
            raise ValueError(f"direction must be EGRESS (0) or INGRESS (1), got {direction!r}")
        self._drop_shaper(pid, direction)

    def _drop_shaper(self, pid, direction):
        port = self._ports[pid]
        shaper = port.shapers[direction]
        if shaper is None:
            return
        for _ in shaper.queue:
            self._count_drop("queue_full", pid)
        port.shapers[direction] = None
        self._update_flood_classes()

    def shaper_state(self, port_id, direction):
        _, port = self._port(port_id)
        if direction not in (EGRESS, INGRESS) or isinstance(direction, bool):
            raise ValueError(f"direction must be EGRESS (0) or INGRESS (1), got {direction!r}")
        s = port.shapers[direction]
        if s is None:
            return None
        return dict(rate_bps=s.rate_bps, burst_bits=s.burst_bits, credit=s.credit,
                    queue_bytes=s.queue_bytes, queue_packets=len(s.queue),
                    queue_limit_bytes=s.queue_limit_bytes)

    def next_departure_ns(self):
        times = [s.head_departure_ns() for port in self._ports.values()
                 for s in port.shapers if s is not None and s.queue]
        return min(times) if times else -1

    # ------------------------------------------------------------------ hostPort rules

    def add_hostport(self, proto, host_port, pod_ip, container_port, pod_port_id, host_ip=None):
        if proto not in (IPPROTO_TCP, IPPROTO_UDP) or isinstance(proto, bool):
            raise ValueError(f"proto must be 6 (TCP) or 17 (UDP), got {proto!r}")
        hport = _index(host_port, "host_port", 1, 65535)
        cport = _index(container_port, "container_port", 1, 65535)
        pod = _ip(pod_ip, "pod_ip")
        host = None if host_ip is None else _ip(host_ip, "host_ip")
        if host is not None and len(host) != len(pod):
            raise ValueError(f"host_ip {host.hex()} and pod_ip {pod.hex()} are of different families")
        pid, _ = self._port(pod_port_id)
        key = _rule_key(proto, hport, host, 4 if len(pod) == 4 else 6)
        old = self._rules.get(key)
        if old is not None:
            rid = old.id
        else:
            if len(self._rules) >= self.max_hostports:
                raise ValueError(f"hostPort table full: at most {self.max_hostports} rules")
            rid = min(set(range(len(self._rules) + 1)) - set(self._rule_ids))
        rule = _Rule(rid, proto, hport, host, pod, cport, pid)
        self._rules[key] = rule
        self._rule_ids[rid] = rule
        self._flush_udp(hport)
        return rid

    def remove_hostport(self, proto, host_port, host_ip=None):
        if proto not in (IPPROTO_TCP, IPPROTO_UDP) or isinstance(proto, bool):
            raise ValueError(f"proto must be 6 (TCP) or 17 (UDP), got {proto!r}")
        hport = _index(host_port, "host_port", 1, 65535)
        host = None if host_ip is None else _ip(host_ip, "host_ip")
        if host is not None:
            keys = [(proto, hport, host)]
        else:
            keys = [(proto, hport, None, 4), (proto, hport, None, 6)]
        rules = [self._rules[k] for k in keys if k in self._rules]
        if not rules:
            where = host.hex() if host is not None else "any node address"
            raise ValueError(f"no hostPort rule for proto {proto} port {hport} on {where}")
        for rule in rules:
            self._remove_rule(rule)

    def _remove_rule(self, rule):
        del self._rules[rule.key()]
        del self._rule_ids[rule.id]
        self._flush_udp(rule.host_port)

    def _flush_udp(self, host_port):
        for entry in [e for e in self._ct_entries if e.proto == IPPROTO_UDP and e.orig_dport == host_port]:
            self._ct_delete(entry, "ct_deleted")

    def hostports(self):
        return [self._rule_ids[rid].as_dict() for rid in sorted(self._rule_ids)]

    # ------------------------------------------------------------------ counters

    def _count_drop(self, reason, port_id):
        self._pc[port_id][PC["drop_" + reason]] += 1
        self._gc[GC[reason]] += 1

    def _count_tx(self, port_id, length):
        self._pc[port_id][PC["tx_packets"]] += 1
        self._pc[port_id][PC["tx_bytes"]] += length

    def _count_queued(self, port_id):
        self._pc[port_id][PC["queued"]] += 1
        self._gc[GC["queued"]] += 1

    def port_counters(self):
        return np.array(self._pc, dtype=np.uint64).reshape(self.max_ports, len(PORT_COUNTERS))

    def global_counters(self):
        return np.array(self._gc, dtype=np.uint64)

    # ------------------------------------------------------------------ batch entry points

    def _check_now(self, now_ns):
        now = _index(now_ns, "now_ns", 0, _MAX_I63)
        if now < self._now_ns:
            raise ValueError(f"now_ns went backwards: {now} < {self._now_ns}")
        return now

    @staticmethod
    def _array(a, name, dtype, writable=False):
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1:
            got = f"{a.dtype}[{a.ndim}-D]" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name} must be a 1-D {np.dtype(dtype)} numpy array, got {got}")
        if writable and not a.flags.writeable:
            raise ValueError(f"{name} must be writable")
        return a

    def _check_buf(self, buf, name):
        self._array(buf, name, np.uint8, writable=True)
        if not buf.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")

    def process(self, buf, offsets, lengths, in_ports, out_ports, n, now_ns):
        self._check_buf(buf, "buf")
        self._array(offsets, "offsets", np.uint32, writable=True)     # VXLAN rewrites them
        self._array(lengths, "lengths", np.uint32, writable=True)
        self._array(in_ports, "in_ports", np.uint16)
        self._array(out_ports, "out_ports", np.int32, writable=True)
        n = _index(n, "n", 0, min(len(offsets), len(lengths), len(in_ports), len(out_ports)))
        now = self._check_now(now_ns)
        H = self.vnet_hdr_len
        for i in range(n):
            off, length, in_port = int(offsets[i]), int(lengths[i]), int(in_ports[i])
            if in_port >= self.max_ports:
                raise ValueError(f"in_ports[{i}] = {in_port} is not below max_ports {self.max_ports}")
            if length > MAX_FRAME:
                raise ValueError(f"lengths[{i}] = {length} exceeds MAX_FRAME {MAX_FRAME}")
            if off < H or off + length > len(buf):
                raise ValueError(f"packet {i} (offset {off}, length {length}, vnet header {H}) "
                                 f"does not lie inside buf of {len(buf)} bytes")
        self._now_ns = now
        for i in range(n):
            self._out_frame = None
            out_ports[i] = self._process_one(buf, int(offsets[i]), int(lengths[i]),
                                             int(in_ports[i]), now, None)
            if self._out_frame is not None:       # encapsulated or decapsulated
                offsets[i], lengths[i] = self._out_frame

    def drain(self, now_ns, out_buf, out_offsets, out_lengths, out_in_ports, out_ports, max_pkts):
        self._check_buf(out_buf, "out_buf")
        self._array(out_offsets, "out_offsets", np.uint32, writable=True)
        self._array(out_lengths, "out_lengths", np.uint32, writable=True)
        self._array(out_in_ports, "out_in_ports", np.uint16, writable=True)
        self._array(out_ports, "out_ports", np.int32, writable=True)
        max_pkts = _index(max_pkts, "max_pkts", 0,
                          min(len(out_offsets), len(out_lengths), len(out_in_ports), len(out_ports)))
        now = self._check_now(now_ns)
        self._now_ns = now
        H = self.vnet_hdr_len
        emitted, off = 0, ENCAP_HEADROOM + H     # headroom before each frame's header (VXLAN)
        self._draining = True
        try:
            while emitted < max_pkts:
                best = None
                for pid in sorted(self._ports):
                    for direction in (EGRESS, INGRESS):
                        s = self._ports[pid].shapers[direction]
                        if s is None or not s.queue or s.queue[0].fresh:
                            continue
                        t_dep = s.head_departure_ns()
                        if t_dep <= now and (best is None or (t_dep, pid, direction) < best[0]):
                            best = ((t_dep, pid, direction), s)
                if best is None:
                    break
                (_, pid, direction), shaper = best
                if off + shaper.queue[0].length > len(out_buf):
                    break
                item = shaper.release()
                length = item.length
                out_buf[off - H:off + length] = np.frombuffer(item.data, dtype=np.uint8)
                if direction == EGRESS:
                    self._out_frame = None
                    out = self._forward(out_buf, off, length, item.in_port, None, now, None)
                    if out == OUT_QUEUED:
                        continue
                    if self._out_frame is not None:
                        off, length = self._out_frame
                else:
                    out = item.out_port
                    self._count_tx(out, length)
                out_offsets[emitted], out_lengths[emitted] = off, length
                out_in_ports[emitted], out_ports[emitted] = item.in_port, out
                emitted += 1
                off += length + ENCAP_HEADROOM + H
        finally:
            self._draining = False
            for port in self._ports.values():
                for s in port.shapers:
                    if s is not None:
                        for item in s.queue:
                            item.fresh = False
        return emitted

    def trace(self, frame, in_port, now_ns):
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ValueError(f"frame must be bytes, got {type(frame).__name__}")
        frame = bytes(frame)
        if len(frame) > MAX_FRAME:
            raise ValueError(f"frame of {len(frame)} bytes exceeds MAX_FRAME {MAX_FRAME}")
        pid = _index(in_port, "in_port", 0, self.max_ports - 1)
        now = self._check_now(now_ns)
        H = self.vnet_hdr_len
        buf = np.zeros(ENCAP_HEADROOM + H + len(frame), dtype=np.uint8)   # room to encapsulate
        buf[ENCAP_HEADROOM + H:] = np.frombuffer(frame, dtype=np.uint8)
        shadow = copy.deepcopy(self)
        steps = []
        shadow._process_one(buf, ENCAP_HEADROOM + H, len(frame), pid, now, steps)
        return steps

    # ------------------------------------------------------------------ the pipeline

    def _process_one(self, buf, off, length, in_port, now, tr):
        """The whole pipeline for one received packet; returns its out_ports value."""
        pc = self._pc[in_port]
        pc[PC["rx_packets"]] += 1
        pc[PC["rx_bytes"]] += length
        self._gc[GC["packets"]] += 1
        self._gc[GC["bytes"]] += length
        if tr is not None:
            _trace(tr, "rx", in_port, length)
        try:
            port = self._ports.get(in_port)
            if port is None:
                raise _Drop("no_route", in_port, "the in port is not added")
            # 1. parse
            b = buf[off:off + length].tobytes()
            p = _parse(b)
            if isinstance(p, str):
                raise _Drop("malformed", in_port, p)
            if tr is not None:
                _trace(tr, "parse", frame_len=length)
            # 2. anti-spoofing
            why = self._antispoof(port, b, p)
            if why:
                raise _Drop("spoofed", in_port, why)
            if tr is not None and port.antispoof and (port.mac is not None or port.ips is not None):
                _trace(tr, "antispoof")
            # 3. egress shaping
            shaper = port.shapers[EGRESS]
            if shaper is not None:
                charged = self._charged_len(buf, off, b, p)
                verdict = shaper.offer(now, length, charged)
                if verdict == "full":
                    raise _Drop("queue_full", in_port, "egress queue full")
                if tr is not None:
                    _trace(tr, "egress", SHAPER_VERDICTS.index(verdict))
                if verdict == "queue":
                    H = self.vnet_hdr_len
                    shaper.append(_Queued(buf[off - H:off + length].tobytes(), length, charged, in_port,
                                          -1, self._draining))
                    self._count_queued(in_port)
                    if tr is not None:
                        _trace(tr, "out_queued")
                    return OUT_QUEUED
        except _Drop as drop:
            return self._dropped(drop, tr)
        return self._forward(buf, off, length, in_port, p, now, tr)

    def _charged_len(self, buf, off, b, p):
        """D36 for the frame b at buf[off:]; its vnet header is the H bytes before it."""
        H = self.vnet_hdr_len
        return _charged_len(buf[off - H:off].tobytes() if H else b"", b, p)

    def _dropped(self, drop, tr):
        self._count_drop(drop.reason, drop.port)
        if tr is not None:
            _trace(tr, "out_drop", 0, DROP_REASONS.index(drop.reason))
        return OUT_DROP

    def _forward(self, buf, off, length, in_port, p, now, tr):
        """NAT, L2, ingress shaper, output (also where a packet released from an egress queue continues)."""
        try:
            if p is None:
                p = _parse(buf[off:off + length].tobytes())
            src_mac = buf[off + 6:off + 12].tobytes()     # learning uses the original source MAC
            # 4. NAT / conntrack
            nat_out = self._nat(buf, off, length, in_port, p, now, tr)
            # 4b. VXLAN: a routed frame skips L2 (docs/datapath.md "VXLAN")
            routed = None
            if nat_out is None and self._vtep is not None:
                routed = self._vxlan(buf, off, length, in_port, p, now, tr)
            if routed is not None:
                out, off, length, p = routed
                self._out_frame = (off, length)
            else:
                # 5. L2
                out = self._l2(buf, off, in_port, p.vlan, src_mac, nat_out, now, tr)
        except _Drop as drop:
            return self._dropped(drop, tr)
        # 6. ingress shaping (a flood: a copy per shaped receiver, D41) and 7. output
        if out in (OUT_FLOOD, OUT_FLOOD_UNKNOWN):
            self._gc[GC["flooded"]] += 1
            charged = None
            for pid in sorted(self._ports):
                port = self._ports[pid]
                if pid == in_port or not port.up or (out == OUT_FLOOD_UNKNOWN and port.kind == PORT_POD):
                    continue
                shaper = port.shapers[INGRESS]
                if shaper is None:
                    self._count_tx(pid, length)
                    continue
                # always through the queue (the output value names no single port); with an
                # empty queue and enough credit it is due at once (D41)
                if charged is None:
                    charged = self._charged_len(buf, off, buf[off:off + length].tobytes(), p)
                shaper.refill(now)
                if shaper.queue_bytes + length > shaper.queue_limit_bytes:
                    self._count_drop("queue_full", pid)
                    continue
                H = self.vnet_hdr_len
                shaper.append(_Queued(buf[off - H:off + length].tobytes(), length, charged, in_port,
                                      pid, self._draining))
                self._count_queued(pid)
            if tr is not None:
                _trace(tr, "out_flood" if out == OUT_FLOOD else "out_flood_unknown")
            return out
        shaper = self._ports[out].shapers[INGRESS]
        if shaper is not None:
            charged = self._charged_len(buf, off, buf[off:off + length].tobytes(), p)
            verdict = shaper.offer(now, length, charged)
            if tr is not None:
                _trace(tr, "ingress", SHAPER_VERDICTS.index(verdict))
            if verdict == "full":
                return self._dropped(_Drop("queue_full", out, "ingress queue full"), tr)
            if verdict == "queue":
                H = self.vnet_hdr_len
                shaper.append(_Queued(buf[off - H:off + length].tobytes(), length, charged, in_port,
                                      out, self._draining))
                self._count_queued(out)
                if tr is not None:
                    _trace(tr, "out_queued")
                return OUT_QUEUED
        self._count_tx(out, length)
        if tr is not None:
            _trace(tr, "out_port", out)
        return out

    # ------------------------------------------------------------------ antispoof

    @staticmethod
    def _antispoof(port, b, p):
        """None if the frame may leave this port, else why not."""
        if not port.antispoof or (port.mac is None and port.ips is None):
            return None
        if port.mac is not None:
            if b[6:12] != port.mac:
                return "source MAC not bound"
            if p.is_arp and b[p.l3 + 8:p.l3 + 14] != port.mac:
                return "ARP sender MAC not bound"
        if port.ips is not None:
            if p.is_arp:
                spa = b[p.l3 + 14:p.l3 + 18]
                if spa != _ZERO4 and spa not in port.ips:
                    return "ARP sender IP not bound"
            elif p.family == 4:
                if p.src != _ZERO4 and p.src not in port.ips:
                    return "IPv4 source not bound"
            elif p.family == 6:
                if p.src != _ZERO16 and not _is_linklocal6(p.src) and p.src not in port.ips:
                    return "IPv6 source not bound"
        return None

    # ------------------------------------------------------------------ nat

    def _nat(self, buf, off, length, in_port, p, now, tr):
        """Returns the out port NAT decided, or None (untouched). Raises _Drop."""
        if p.frag_kind == FRAG_LATER:
            return self._nat_fragment(buf, off, p, now, tr)
        if p.l4 < 0:
            return None
        if p.l4_proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            return None if p.fragment else self._nat_icmp_error(buf, off, length, p, now, tr)
        if p.l4_proto not in (IPPROTO_TCP, IPPROTO_UDP):
            return None
        key = (p.family, p.l4_proto, _addr16(p.src), _addr16(p.dst), p.sport, p.dport)
        found = self._ct_lookup(key, now)
        if found is not None:
            entry, direction = found
        else:
            entry = self._ct_create(key, buf, off, in_port, p, now, tr)
            if entry is None:
                if tr is not None:
                    _trace(tr, "nat_none")
                return None
            direction = 0
        self._ct_update(entry, direction, p, length, now)
        self._translate(buf, off, p, entry, direction)
        self._gc[GC["nat_translated"]] += 1
        if p.frag_kind == FRAG_FIRST:
            self._frag_remember(p, entry, direction, now)
        if tr is not None:
            _trace(tr, "nat_hit", direction, entry.state)
        return entry.out_port if direction == 0 else entry.in_port

    def _ct_lookup(self, key, now):
        found = self._ct.get(key)
        if found is not None and found[0].expires_ns <= now:
            self._ct_delete(found[0], "ct_expired")
            return None
        return found

    def _ct_delete(self, entry, counter):
        del self._ct[entry.tuple_orig()]
        del self._ct[entry.tuple_reply()]
        self._ct_entries.discard(entry)
        self._ct_unassured.pop(entry, None)
        self._gc[GC[counter]] += 1

    def _find_rule(self, p):
        rule = self._rules.get((p.l4_proto, p.dport, p.dst))
        if rule is None and p.dst in self._node_ips:
            rule = self._rules.get((p.l4_proto, p.dport, None, p.family))
        return rule

    def _ct_create(self, key, buf, off, in_port, p, now, tr):
        rule = self._find_rule(p)
        if rule is None:
            return None
        gw = self._gw_ip[p.family]
        hairpin = p.src == rule.pod_ip and gw is not None
        new_src = gw if hairpin else p.src
        reply_key = (p.family, p.l4_proto, _addr16(rule.pod_ip), _addr16(new_src),
                     rule.container_port, p.sport)
        if reply_key == key or self._ct_lookup(reply_key, now) is not None:
            raise _Drop("nat_collision", in_port, "the reply tuple is in use")
        if len(self._ct_entries) >= self.conntrack_size:
            if self._ct_auto_sweep_ns is None or now - self._ct_auto_sweep_ns >= SWEEP_INTERVAL_NS:
                self._ct_auto_sweep_ns = now
                self.conntrack_sweep(now)
            if len(self._ct_entries) >= self.conntrack_size:
                if not self._ct_unassured:
                    raise _Drop("table_full", in_port, "conntrack table full, every entry assured")
                self._ct_delete(next(iter(self._ct_unassured)), "ct_early_drop")
        e = _Entry()
        e.proto, e.family, e.hairpin = p.l4_proto, p.family, int(hairpin)
        e.state = CT_SYN_SENT if p.l4_proto == IPPROTO_TCP else CT_UDP_NEW
        e.orig_src, e.orig_dst, e.orig_sport, e.orig_dport = p.src, p.dst, p.sport, p.dport
        e.reply_src, e.reply_dst = rule.pod_ip, new_src
        e.reply_sport, e.reply_dport = rule.container_port, p.sport
        e.in_port, e.out_port = in_port, rule.pod_port_id
        e.orig_dst_mac = buf[off:off + 6].tobytes()
        e.orig_src_mac = buf[off + 6:off + 12].tobytes()
        e.packets = e.bytes = 0
        e.fin_seen = [False, False]
        e.expires_ns = 0
        self._ct[key] = (e, 0)
        self._ct[reply_key] = (e, 1)
        self._ct_entries.add(e)
        self._ct_unassured[e] = None
        self._gc[GC["ct_created"]] += 1
        if tr is not None:
            _trace(tr, "nat_new", rule.id, int(hairpin))
        return e

    def _ct_update(self, e, direction, p, length, now):
        if e.proto == IPPROTO_TCP:
            flags = p.tcp_flags
            if flags & TCP_RST:
                e.state = CT_CLOSE
            elif flags & TCP_FIN:
                e.fin_seen[direction] = True
                if e.state == CT_CLOSE or all(e.fin_seen):
                    e.state = CT_CLOSE
                else:
                    e.state = CT_FIN
            elif e.state == CT_SYN_SENT and direction == 1 and (flags & (TCP_SYN | TCP_ACK)) == TCP_SYN | TCP_ACK:
                e.state = CT_SYN_RECV                  # the SYN-ACK
            elif (flags & (TCP_SYN | TCP_ACK)) == TCP_ACK and (
                    (e.state == CT_SYN_SENT and direction == 1)         # picked up mid-stream
                    or (e.state == CT_SYN_RECV and direction == 0)):    # the handshake's final ACK
                e.state = CT_ESTABLISHED
                self._ct_unassured.pop(e, None)        # D40: assured
        elif direction == 1:
            e.state = CT_UDP_REPLIED
            self._ct_unassured.pop(e, None)
        e.expires_ns = now + self._timeouts[e.state]
        e.packets += 1
        e.bytes += length

    def _translate(self, buf, off, p, e, direction):
        """Rewrites addresses, ports, checksums and MACs in place (D24-D26)."""
        if direction == 0:
            self._rewrite(buf, off, p, src=e.reply_dst if e.hairpin else None,
                          dst=e.reply_src, dport=e.reply_sport)
        else:
            self._rewrite(buf, off, p, src=e.orig_dst, sport=e.orig_dport,
                          dst=e.orig_src if e.hairpin else None)
        self._entry_macs(buf, off, e, direction)

    def _entry_macs(self, buf, off, e, direction):
        self._set_macs(buf, off, direction, e.out_port, e.orig_dst_mac, e.orig_src_mac)

    def _set_macs(self, buf, off, direction, out_port, src_mac, dst_mac):
        """D24: the MACs of a translated packet of that direction: direction 0 the gateway
        MAC and the out port's bound MAC, direction 1 src_mac and dst_mac."""
        if direction == 0:
            if self._gw_mac is not None:
                buf[off + 6:off + 12] = np.frombuffer(self._gw_mac, dtype=np.uint8)
            port = self._ports.get(out_port)
            if port is not None and port.mac is not None:
                buf[off:off + 6] = np.frombuffer(port.mac, dtype=np.uint8)
        else:
            buf[off + 6:off + 12] = np.frombuffer(src_mac, dtype=np.uint8)
            buf[off:off + 6] = np.frombuffer(dst_mac, dtype=np.uint8)

    def _frag_remember(self, p, e, d, now):
        """D39: a translated first fragment's translation, for the rest of its datagram.
        At most FRAG_SLOTS datagrams are remembered; the oldest is forgotten first."""
        key = _frag_key(p.family, p.src, p.dst, p.frag_proto, p.frag_id)
        if d == 0:
            rec = (now + FRAG_TIMEOUT_NS, 0, e.out_port, e.reply_dst if e.hairpin else None,
                   e.reply_src, None, None)
        else:
            rec = (now + FRAG_TIMEOUT_NS, 1, e.in_port, e.orig_dst,
                   e.orig_src if e.hairpin else None, e.orig_dst_mac, e.orig_src_mac)
        self._frags.pop(key, None)
        while len(self._frags) >= FRAG_SLOTS:
            del self._frags[next(iter(self._frags))]
        self._frags[key] = rec

    def _nat_fragment(self, buf, off, p, now, tr):
        """D39: a non-first fragment is translated as its datagram's first fragment was."""
        rec = self._frags.get(_frag_key(p.family, p.src, p.dst, p.frag_proto, p.frag_id))
        if rec is None or rec[0] <= now:
            return None
        _, d, out_port, new_src, new_dst, src_mac, dst_mac = rec
        self._rewrite(buf, off, p, src=new_src, dst=new_dst)
        self._set_macs(buf, off, d, out_port, src_mac, dst_mac)
        self._gc[GC["nat_translated"]] += 1
        if tr is not None:
            _trace(tr, "nat_fragment", d)
        return out_port

    def _nat_icmp_error(self, buf, off, length, p, now, tr):
        """D37: an ICMP error about a tracked flow is translated with it."""
        H = self.vnet_hdr_len
        if H and buf[off - H] & VNET_F_NEEDS_CSUM:
            return None
        quoted = _icmp_quoted(buf[off:off + length].tobytes(), p)
        if quoted is None:
            return None
        proto, q_src, q_dst, q_sport, q_dport = quoted[3:]
        found = self._ct_lookup((p.family, proto, _addr16(q_dst), _addr16(q_src), q_dport, q_sport), now)
        if found is None:
            if tr is not None:
                _trace(tr, "nat_icmp_none")
            return None
        e, d = found
        if d == 0:
            outer = dict(src=e.reply_dst if e.hairpin else None, dst=e.reply_src)
            inner = dict(src=e.reply_src, sport=e.reply_sport, dst=e.reply_dst if e.hairpin else None)
        else:
            outer = dict(src=e.orig_dst, dst=e.orig_src if e.hairpin else None)
            inner = dict(dst=e.orig_dst, dport=e.orig_dport, src=e.orig_src if e.hairpin else None)
        self._rewrite_icmp_error(buf, off, p, quoted[:3], proto, outer, inner)
        self._entry_macs(buf, off, e, d)
        self._gc[GC["nat_translated"]] += 1
        if tr is not None:
            _trace(tr, "nat_icmp", d)
        return e.out_port if d == 0 else e.in_port

    def _rewrite_icmp_error(self, buf, off, p, where, proto, outer, inner):
        """D37's writes and checksums. where: (quoted l3, quoted l4, end), frame offsets."""
        q3, q4, end = (off + x for x in where)
        l3, l4 = off + p.l3, off + p.l4
        alen = 4 if p.family == 4 else 16
        icmp_old, icmp_new = [], []          # every word written inside the ICMP message

        def put(at, nbytes, value, old, new):
            old += _words(buf[at:at + nbytes].tobytes())
            new += _words(value)
            buf[at:at + nbytes] = np.frombuffer(value, dtype=np.uint8)

        # the quoted packet: addresses, ports, its IPv4 header checksum, its L4 checksum
        q_src_at, q_dst_at = (q3 + 12, q3 + 16) if p.family == 4 else (q3 + 8, q3 + 24)
        qa_old, qa_new, qp_old, qp_new = [], [], [], []
        for at, value in ((q_src_at, inner.get("src")), (q_dst_at, inner.get("dst"))):
            if value is not None:
                put(at, alen, value, qa_old, qa_new)
        for at, value in ((q4, inner.get("sport")), (q4 + 2, inner.get("dport"))):
            if value is not None:
                put(at, 2, value.to_bytes(2, "big"), qp_old, qp_new)
        icmp_old += qa_old + qp_old
        icmp_new += qa_new + qp_new
        if p.family == 4:
            hc = _np16(buf, q3 + 10)
            nc = _csum_patch(hc, qa_old, qa_new)
            put(q3 + 10, 2, nc.to_bytes(2, "big"), icmp_old, icmp_new)
        at = q4 + (16 if proto == IPPROTO_TCP else 6)
        if at + 2 <= end:
            hc = _np16(buf, at)
            if not (proto == IPPROTO_UDP and p.family == 4 and hc == 0):
                nc = _csum_patch(hc, qa_old + qp_old, qa_new + qp_new)
                if proto == IPPROTO_UDP and nc == 0:
                    nc = 0xFFFF
                put(at, 2, nc.to_bytes(2, "big"), icmp_old, icmp_new)
        # the outer header
        src_at, dst_at = (l3 + 12, l3 + 16) if p.family == 4 else (l3 + 8, l3 + 24)
        oa_old, oa_new = [], []
        for at, value in ((src_at, outer.get("src")), (dst_at, outer.get("dst"))):
            if value is not None:
                put(at, alen, value, oa_old, oa_new)
        if p.family == 4:
            hc = _np16(buf, l3 + 10)
            nc = _csum_patch(hc, oa_old, oa_new)
            buf[l3 + 10], buf[l3 + 11] = nc >> 8, nc & 0xFF
        else:                                # ICMPv6 covers the pseudo-header
            icmp_old += oa_old
            icmp_new += oa_new
        hc = _np16(buf, l4 + 2)
        nc = _csum_patch(hc, icmp_old, icmp_new)
        buf[l4 + 2], buf[l4 + 3] = nc >> 8, nc & 0xFF

    def _rewrite(self, buf, off, p, src=None, dst=None, sport=None, dport=None):
        """Writes the given addresses and ports and patches the checksums, in one step (D26);
        a packet without L4 (a non-first fragment, D39) gets its addresses and the IPv4
        header checksum only."""
        l3, l4 = off + p.l3, off + p.l4
        H = self.vnet_hdr_len
        partial = H > 0 and bool(buf[off - H] & VNET_F_NEEDS_CSUM)
        old_addr, new_addr, old_port, new_port = [], [], [], []
        if p.family == 4:
            src_at, dst_at, alen = l3 + 12, l3 + 16, 4
        else:
            src_at, dst_at, alen = l3 + 8, l3 + 24, 16
        for at, value in ((src_at, src), (dst_at, dst)):
            if value is not None:
                old_addr += _words(buf[at:at + alen].tobytes())
                new_addr += _words(value)
                buf[at:at + alen] = np.frombuffer(value, dtype=np.uint8)
        for at, value in ((l4, sport), (l4 + 2, dport)):
            if value is not None:
                old_port.append(_np16(buf, at))
                new_port.append(value)
                buf[at], buf[at + 1] = value >> 8, value & 0xFF
        if p.family == 4 and old_addr:
            hc = _np16(buf, l3 + 10)
            hc = _csum_patch(hc, old_addr, new_addr)
            buf[l3 + 10], buf[l3 + 11] = hc >> 8, hc & 0xFF
        if p.l4 < 0:
            return
        at = l4 + (16 if p.l4_proto == IPPROTO_TCP else 6)
        hc = _np16(buf, at)
        if partial:
            hc = _csum_patch(hc, old_addr, new_addr, partial=True)
        else:
            if p.l4_proto == IPPROTO_UDP and p.family == 4 and hc == 0:
                return
            hc = _csum_patch(hc, old_addr + old_port, new_addr + new_port)
            if p.l4_proto == IPPROTO_UDP and hc == 0:
                hc = 0xFFFF
        buf[at], buf[at + 1] = hc >> 8, hc & 0xFF

    # ------------------------------------------------------------------ l2

    def _l2(self, buf, off, in_port, vlan, src_mac, nat_out, now, tr):
        self._learn(vlan, src_mac, in_port, now)
        if nat_out is not None:
            port = self._ports.get(nat_out)
            if port is None or not port.up:
                raise _Drop("no_route", in_port, f"NAT out port {nat_out} is down")
            if tr is not None:
                _trace(tr, "l2_nat", 0, nat_out)
            return nat_out
        dst = buf[off:off + 6].tobytes()
        if dst[0] & 1:
            if tr is not None:
                _trace(tr, "l2_multicast")
            return OUT_FLOOD
        entry = self._fdb_get((vlan, dst), now)
        if entry is None:
            if tr is not None:
                _trace(tr, "l2_unknown")
            return OUT_FLOOD_UNKNOWN
        if entry.port == in_port:
            raise _Drop("loop", in_port, "destination MAC is on the in port")
        port = self._ports.get(entry.port)
        if port is None or not port.up:
            raise _Drop("no_route", in_port, f"port {entry.port} is down")
        if tr is not None:
            _trace(tr, "l2_known", 0, entry.port)
        return entry.port

    def _fdb_get(self, key, now):
        entry = self._fdb.get(key)
        if entry is not None and not entry.static and now - entry.last_seen_ns > self.mac_aging_ns:
            self._fdb_delete(key)
            return None
        return entry

    def _fdb_delete(self, key):
        entry = self._fdb.pop(key)
        if not entry.static:
            del self._learned[entry.port][key]

    def _evict(self, learner):
        """D43: deletes the oldest learned entry of the port holding the most learned
        entries (the learning port if it is one of them, else the lowest such port id);
        False when no learned entry exists."""
        most = max((len(d) for d in self._learned.values()), default=0)
        if most == 0:
            return False
        if learner is not None and len(self._learned[learner]) == most:
            victim = learner
        else:
            victim = min(pid for pid, d in self._learned.items() if len(d) == most)
        self._fdb_delete(next(iter(self._learned[victim])))
        self._gc[GC["mac_evicted"]] += 1
        return True

    def _learn_token(self, port_id, now):
        """D44: takes one new-MAC token of the port's learning bucket; False when empty."""
        rate = self.mac_learn_rate_per_s
        if rate == 0:
            return True
        bucket = self._learn_bucket[port_id]
        cap = self.mac_learn_burst * SEC_NS
        if bucket[1] is not None:
            bucket[0] = min(cap, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if bucket[0] < SEC_NS:
            return False
        bucket[0] -= SEC_NS
        return True

    def _learn(self, vlan, mac, in_port, now):
        if mac[0] & 1:
            return
        key = (vlan, mac)
        entry = self._fdb.get(key)
        if entry is not None and entry.static:
            if entry.port != in_port:     # D42: a bound MAC is never taken over
                raise _Drop("mac_stolen", in_port, f"source MAC is bound to port {entry.port}")
            return
        entry = self._fdb_get(key, now)
        if entry is not None:
            if entry.port != in_port:
                del self._learned[entry.port][key]
                self._learned[in_port][key] = None      # a move is a new learn on in_port (D43)
                entry.port = in_port
                self._gc[GC["mac_moves"]] += 1
            entry.last_seen_ns = now
            return
        if not self._learn_token(in_port, now):
            self._gc[GC["mac_learn_limited"]] += 1
            return
        if len(self._fdb) >= self.mac_table_size:
            if self._fdb_auto_sweep_ns is None or now - self._fdb_auto_sweep_ns >= SWEEP_INTERVAL_NS:
                self._fdb_auto_sweep_ns = now
                self.mac_sweep(now)
            if len(self._fdb) >= self.mac_table_size and not self._evict(in_port):
                self._gc[GC["mac_table_full"]] += 1
                return
        self._fdb[key] = _FdbEntry(in_port, now)
        self._learned[in_port][key] = None
        self._gc[GC["mac_learned"]] += 1

    # ------------------------------------------------------------------ sweeps and snapshots

    def mac_sweep(self, now_ns):
        now = _index(now_ns, "now_ns", 0, _MAX_I63)
        aged = [k for k, e in self._fdb.items() if not e.static and now - e.last_seen_ns > self.mac_aging_ns]
        for k in aged:
            self._fdb_delete(k)
        return len(aged)

    def conntrack_sweep(self, now_ns):
        now = _index(now_ns, "now_ns", 0, _MAX_I63)
        expired = [e for e in self._ct_entries if e.expires_ns <= now]
        for e in expired:
            self._ct_delete(e, "ct_expired")
        return len(expired)

    def fdb(self):
        out = np.zeros(len(self._fdb), dtype=FDB_DTYPE)
        for i, ((vlan, mac), e) in enumerate(sorted(self._fdb.items(), key=lambda kv: kv[0])):
            out[i] = (vlan, tuple(mac), e.port, e.last_seen_ns, e.static)
        return out

    def conntrack(self):
        entries = sorted(self._ct_entries, key=lambda e: (e.tuple_orig()[1:], e.family))
        out = np.zeros(len(entries), dtype=CT_DTYPE)
        for i, e in enumerate(entries):
            out[i] = (e.proto, e.state, e.hairpin, e.family,
                      tuple(_addr16(e.orig_src)), tuple(_addr16(e.orig_dst)), e.orig_sport, e.orig_dport,
                      tuple(_addr16(e.reply_src)), tuple(_addr16(e.reply_dst)), e.reply_sport,
                      e.reply_dport, e.in_port, e.out_port, tuple(e.orig_src_mac), tuple(e.orig_dst_mac),
                      e.expires_ns, e.packets, e.bytes)
        return out

    # ------------------------------------------------------------------ VXLAN (docs/datapath.md "VXLAN")

    def set_vtep(self, port_id, ip, outer_mac, vtep_mac, vni, udp_port=VXLAN_PORT, mtu=1500):
        pid, _ = self._port(port_id)
        v = _Vtep()
        v.port = pid
        v.ip = _bytes_of(ip, "vtep ip", (4,))
        v.outer_mac = _mac(outer_mac, "outer_mac")
        v.vtep_mac = _mac(vtep_mac, "vtep_mac")
        v.vni = _index(vni, "vni", 0, 2**24 - 1)
        v.udp_port = _index(udp_port, "udp_port", 1, 65535)
        v.mtu = _index(mtu, "mtu", 68, 65535)
        self._vtep = v

    def clear_vtep(self):
        self._vtep = None

    def vtep(self):
        return None if self._vtep is None else self._vtep.as_dict()

    def set_peer(self, ip, vtep_mac, underlay_mac, cidrs):
        key = _bytes_of(ip, "peer ip", (4,))
        vmac = _mac(vtep_mac, "vtep_mac")
        umac = None if underlay_mac is None else _mac(underlay_mac, "underlay_mac")
        items = _peer_cidrs(cidrs)
        for family, plen, addr in items:
            owner = self._cidrs.get((family, plen, addr))
            if owner is not None and owner != key:
                raise ValueError(f"cidr {_cidr_text(addr, plen)} is already held by peer {owner.hex()}")
        old = self._peers.get(key)
        if old is None and len(self._peers) >= self.max_peers:
            raise ValueError(f"peer table full: at most {self.max_peers} peers")
        peer = old if old is not None else _Peer()
        if old is not None:
            for family, plen, addr in [_cidr_key(a, n) for a, n in old.cidrs]:
                del self._cidrs[(family, plen, addr)]
        else:
            peer.ip = key
            peer.tx_packets = peer.tx_bytes = peer.rx_packets = peer.rx_bytes = peer.drop_unresolved = 0
        peer.vtep_mac, peer.underlay_mac = vmac, umac
        peer.cidrs = [(addr, plen) for _, plen, addr in items]
        for family, plen, addr in items:
            self._cidrs[(family, plen, addr)] = key
        self._peers[key] = peer
        self._plens = None

    def remove_peer(self, ip):
        key = _bytes_of(ip, "peer ip", (4,))
        peer = self._peers.pop(key, None)
        if peer is None:
            raise ValueError(f"no peer {key.hex()}")
        for addr, plen in peer.cidrs:
            del self._cidrs[_cidr_key(addr, plen)]
        self._plens = None

    def peers(self):
        return [self._peers[k].as_dict() for k in sorted(self._peers)]

    def _lpm(self, family, addr):
        """The peer whose CIDR of that family holds addr with the longest prefix, or None."""
        if self._plens is None:
            self._plens = {f: sorted({n for fam, n, _ in self._cidrs if fam == f}, reverse=True)
                           for f in (4, 6)}
        for plen in self._plens[family]:
            owner = self._cidrs.get((family, plen, _masked(addr, plen)))
            if owner is not None:
                return self._peers[owner]
        return None

    def _vxlan(self, buf, off, length, in_port, p, now, tr):
        """The "vxlan" stage: (out port, new offset, new length, the new frame's _Parsed)
        for a frame it decapsulates or encapsulates, None for any other frame. Raises _Drop."""
        v = self._vtep
        if in_port == v.port:
            if (p.l3 == 14 and p.family == 4 and buf[off:off + 6].tobytes() == v.outer_mac
                    and p.dst == v.ip and p.l4 >= 0 and p.l4_proto == IPPROTO_UDP
                    and p.dport == v.udp_port):
                return self._decap(buf, off, length, in_port, p, now, tr)
            return None
        if p.l3 != 14 or p.family == 0:
            return None
        dst_mac = buf[off:off + 6].tobytes()
        if dst_mac != self._gw_mac and dst_mac != v.vtep_mac:
            return None
        peer = self._lpm(p.family, p.dst)
        if peer is None:
            return None
        return self._encap(buf, off, length, in_port, p, peer, tr)

    def _ttl_decrement(self, buf, l3, family, in_port):
        """Routing's TTL / hop limit step; the IPv4 checksum patched over the TTL/protocol word (D26)."""
        at = l3 + 8 if family == 4 else l3 + 7
        ttl = int(buf[at])
        if ttl <= 1:
            raise _Drop("ttl_expired", in_port, f"TTL / hop limit {ttl}")
        if family == 4:
            proto = int(buf[l3 + 9])
            hc = _csum_patch(_np16(buf, l3 + 10), [(ttl << 8) | proto], [((ttl - 1) << 8) | proto])
            buf[l3 + 10], buf[l3 + 11] = hc >> 8, hc & 0xFF
        buf[at] = ttl - 1

    def _decap(self, buf, off, length, in_port, p, now, tr):
        v, H = self._vtep, self.vnet_hdr_len
        b = buf[off:off + length].tobytes()
        l3, l4 = p.l3, p.l4
        if _be16(b, l3 + 6) & 0x2000:
            raise _Drop("vxlan_malformed", in_port, "outer IPv4 is a first fragment")
        peer = self._peers.get(p.src)
        if peer is None:
            raise _Drop("vxlan_unknown_peer", in_port, f"{p.src.hex()} is not a peer")
        ulen = _be16(b, l4 + 4)
        if ulen < 8 + 8 + 14 or not b[l4 + 8] & 0x08:
            raise _Drop("vxlan_malformed", in_port, "UDP length too short or I flag clear")
        vni = int.from_bytes(b[l4 + 12:l4 + 15], "big")
        if vni != v.vni:
            raise _Drop("vxlan_bad_vni", in_port, f"VNI {vni}")
        d = l4 + 16                                # the inner frame's offset in the outer (D46)
        inner = b[d:l4 + ulen]
        q = _parse(inner)
        if isinstance(q, str):
            raise _Drop("vxlan_malformed", in_port, "inner frame: " + q)
        if H and buf[off - H + 1] != 0:
            # a GSO frame as a kernel VTEP hands it over a veth (D53): its inner segment
            # crosses whole, if the header describes the inner TCP/UDP it carries
            g = int(buf[off - H + 1]) & 0x7F
            want = {VIRTIO_NET_HDR_GSO_TCPV4: (4, IPPROTO_TCP), VIRTIO_NET_HDR_GSO_TCPV6: (6, IPPROTO_TCP),
                    VIRTIO_NET_HDR_GSO_UDP_L4: (None, IPPROTO_UDP)}.get(g)
            if (want is None or not buf[off - H] & VNET_F_NEEDS_CSUM
                    or _le16(buf[off - H:off], 6) < d + 14 or q.l4 < 0
                    or q.l4_proto != want[1] or (want[0] is not None and q.family != want[0])):
                raise _Drop("vxlan_malformed", in_port, "a GSO header that does not describe the inner TCP/UDP")
        if inner[0:6] != v.vtep_mac:
            raise _Drop("vxlan_not_ours", in_port, "inner destination MAC is not our VTEP MAC")
        if q.l3 != 14 or q.family == 0:
            raise _Drop("vxlan_not_ours", in_port, "inner frame is not untagged IPv4/IPv6")
        out = min((pid for pid, port in self._ports.items()
                   if port.kind == PORT_POD and port.ips is not None and q.dst in port.ips), default=None)
        if out is not None:
            new_dst, new_src = self._ports[out].mac, self._gw_mac
        elif q.dst == self._gw_ip[q.family]:
            out = min((pid for pid, port in self._ports.items() if port.kind == PORT_HOST), default=None)
            if out is None:
                raise _Drop("vxlan_no_route", in_port, "to the gateway, but no host port")
            new_dst, new_src = self._gw_mac, v.vtep_mac
        else:
            raise _Drop("vxlan_no_route", in_port, f"no pod or gateway {q.dst.hex()}")
        ioff = off + d
        self._ttl_decrement(buf, ioff + 14, q.family, in_port)
        if new_dst is not None:
            buf[ioff:ioff + 6] = np.frombuffer(new_dst, dtype=np.uint8)
        if new_src is not None:
            buf[ioff + 6:ioff + 12] = np.frombuffer(new_src, dtype=np.uint8)
        if H:
            hdr = buf[off - H:off].copy()
            hdr_len = max(0, _le16(hdr, 2) - d)
            _put_le16(hdr, 2, hdr_len)
            if hdr[0] & VNET_F_NEEDS_CSUM:
                if _le16(hdr, 6) >= d + 14:
                    _put_le16(hdr, 6, _le16(hdr, 6) - d)
                else:                              # the partial checksum was in the outer headers:
                    # a locally sent packet, its inner checksums complete and trusted (D54)
                    hdr[0] = (int(hdr[0]) & ~VNET_F_NEEDS_CSUM & 0xFF) | VNET_F_DATA_VALID
                    _put_le16(hdr, 6, 0)
                    _put_le16(hdr, 8, 0)
            buf[ioff - H:ioff] = hdr
        self._gc[GC["vxlan_decap"]] += 1
        peer.rx_packets += 1
        peer.rx_bytes += length
        if tr is not None:
            _trace(tr, "vxlan_decap", vni, out)
        port = self._ports[out]
        if not port.up:
            raise _Drop("no_route", in_port, f"port {out} is down")
        return out, ioff, len(inner), _parse(buf[ioff:ioff + len(inner)].tobytes())

    def _encap(self, buf, off, length, in_port, p, peer, tr):
        v, H = self._vtep, self.vnet_hdr_len
        l3 = off + p.l3
        self._ttl_decrement(buf, l3, p.family, in_port)
        if peer.underlay_mac is None:
            peer.drop_unresolved += 1
            raise _Drop("vxlan_unresolved", in_port, f"peer {peer.ip.hex()} has no underlay MAC")
        gso_type = int(buf[off - H + 1]) if H else 0
        b = buf[off:off + length].tobytes()
        if gso_type and p.l4 >= 0 and p.l4_proto in (IPPROTO_TCP, IPPROTO_UDP):
            l4_end = p.l4 + ((b[p.l4 + 12] >> 4) * 4 if p.l4_proto == IPPROTO_TCP else 8)
            outer_ip_len = _le16(buf, off - H + 4) + l4_end + 36      # one segment (D48)
        else:
            outer_ip_len = length + 36
        if outer_ip_len > v.mtu:
            raise _Drop("too_big", in_port, f"outer IP length {outer_ip_len} > MTU {v.mtu}")
        if off - H < ENCAP_LEN:
            raise _Drop("no_headroom", in_port, f"offset {off} - vnet header {H} < {ENCAP_LEN}")
        # the flow hash for the UDP source port, after the TTL decrement
        if p.family == 4:
            proto = b[p.l3 + 9]
        else:
            proto = _ip6_final_nh(b, p.l3)
        data = p.src + p.dst + bytes([proto])
        if p.l4 >= 0 and p.l4_proto in (IPPROTO_TCP, IPPROTO_UDP):
            data += b[p.l4:p.l4 + 4]
        h = _fnv1a(data)
        h ^= h >> 16
        sport = 49152 + (h & 0x3FFF)
        hdr = buf[off - H:off].copy()
        buf[off:off + 6] = np.frombuffer(peer.vtep_mac, dtype=np.uint8)
        buf[off + 6:off + 12] = np.frombuffer(v.vtep_mac, dtype=np.uint8)
        total = length + 36
        ulen = length + 16
        ip_hdr = bytearray(bytes([0x45, 0]) + (total if total <= 65535 else 0).to_bytes(2, "big")
                           + bytes([0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]) + v.ip + peer.ip)
        csum = ~_fold(sum(_words(bytes(ip_hdr)))) & 0xFFFF
        ip_hdr[10:12] = csum.to_bytes(2, "big")
        outer = (peer.underlay_mac + v.outer_mac + b"\x08\x00" + bytes(ip_hdr)
                 + sport.to_bytes(2, "big") + v.udp_port.to_bytes(2, "big")
                 + (ulen if ulen <= 65535 else 0).to_bytes(2, "big") + b"\0\0"
                 + b"\x08\0\0\0" + v.vni.to_bytes(3, "big") + b"\0")
        assert len(outer) == ENCAP_LEN
        o = off - ENCAP_LEN
        buf[o:off] = np.frombuffer(outer, dtype=np.uint8)
        if H:
            if hdr[0] & VNET_F_NEEDS_CSUM:
                _put_le16(hdr, 6, _le16(hdr, 6) + ENCAP_LEN)
            if _le16(hdr, 2):
                _put_le16(hdr, 2, _le16(hdr, 2) + ENCAP_LEN)
            if hdr[1]:
                hdr[1] |= VNET_GSO_UDP_TUNNEL_IPV4
            buf[o - H:o] = hdr
        length += ENCAP_LEN
        self._gc[GC["vxlan_encap"]] += 1
        peer.tx_packets += 1
        peer.tx_bytes += length
        if tr is not None:
            _trace(tr, "vxlan_encap", v.vni, sport)
        port = self._ports[v.port]
        if not port.up:
            raise _Drop("no_route", in_port, f"VTEP port {v.port} is down")
        q = _parse(buf[o:o + length].tobytes())
        return v.port, o, length, (q if not isinstance(q, str) else _Parsed())
