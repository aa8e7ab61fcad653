"""Differential tests: the Cython core against the pure-Python twin, frame for frame.

Seeded random batches of every kind of frame (ARP, 802.1Q, IPv4/IPv6 TCP/UDP/ICMP, IPv6
extension headers and fragments, hostPort flows and their replies, hairpin, pod-to-pod via
a node address, spoofed sources, partial-checksum frames, GSO frames (virtio-net gso_type
and gso_size of every kind, so shapers charge wire bytes, D36), 64 KiB frames) and mutations of
them (truncated, bit-flipped, garbage) go through both implementations with the same
control-plane set-up, the same sequence of now_ns, drain() calls and control calls between
batches. After every batch both must agree on out_ports and every byte of the buffer,
on drained packets, counters, shaper states and next_departure_ns(); the sorted table
snapshots (fdb(), conntrack()) and trace() are compared every few batches. Small tables
and short timeouts make table-full, sweeps, aging, expiry and queue overflow frequent.

Where a behaviour depends on a table layout, docs/datapath.md specifies the behaviour, not
the layout, and specifies it exactly: the fragment memory (D39) keeps up to FRAG_SLOTS
unexpired datagrams and forgets the earliest remembered first, in both implementations
(the twin with a dict, the core with records it scans), so no input is excluded here.
The specified behaviour itself is tested on both in test_frag_memory.py.

Frames are built by hand (struct), not scapy: the twin already limits the pace (about
100,000 packets per second at best) and the run must stay within a CI budget. More than
100,000 frames go through per run (the sum over the seeds below).
"""
import struct

import numpy as np
import pytest

from vswitch.datapath import consts as C

# --------------------------------------------------------------------------- frame builders


def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _pseudo(src, dst, proto, length):
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def l4_tcp(src, dst, sport, dport, flags, payload=b"", csum=True):
    hdr = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    seg = hdr + payload
    if csum:
        c = _csum(_pseudo(src, dst, 6, len(seg)) + seg)
        seg = seg[:16] + struct.pack("!H", c) + seg[18:]
    return 6, seg


def l4_udp(src, dst, sport, dport, payload=b"", csum=True):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if csum:
        c = _csum(_pseudo(src, dst, 17, len(seg)) + seg) or 0xFFFF
        seg = seg[:6] + struct.pack("!H", c) + seg[8:]
    return 17, seg


def l4_icmp(family, payload=b"abcd"):
    t = 8 if family == 4 else 128
    body = struct.pack("!BBHHH", t, 0, 0, 1, 1) + payload
    return (1 if family == 4 else 58), body


def ipv4(src, dst, proto, payload, frag=0, options=b"", ident=1):
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), ident, frag, 64, proto, 0,
                      src, dst) + options
    c = _csum(hdr)
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + payload


def ipv6(src, dst, nh, payload, ext=()):
    """ext: sequence of (header type, raw bytes without the next-header byte)."""
    chain = b""
    types = [t for t, _ in ext] + [nh]
    for i, (t, raw) in enumerate(ext):
        chain += bytes([types[i + 1]]) + raw
    first = types[0]
    body = chain + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), first, 64, src, dst) + body


def eth(dst, src, ethertype, payload, vlan=None):
    if vlan is not None:
        return dst + src + struct.pack("!HHH", 0x8100, vlan, ethertype) + payload
    return dst + src + struct.pack("!H", ethertype) + payload


def arp(op, sha, spa, tha, tpa):
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, sha, spa, tha, tpa)


def ext_hdr(kind, rng, frag_offset=0, more=0):
    if kind == 44:
        return 44, struct.pack("!xHI", (frag_offset << 3) | more, 7)
    if kind == 51:
        return 51, bytes([1]) + bytes(10)     # (1+2)*4 = 12 bytes
    n = int(rng.integers(0, 2))
    return kind, bytes([n]) + bytes(6 + 8 * n)


# --------------------------------------------------------------------------- the topology

GW_MAC = bytes.fromhex("02000000fe01")
GW4 = bytes([10, 0, 0, 1])
GW6 = bytes.fromhex("fd000000000000000000000000000001")
NODE4 = bytes([192, 168, 1, 1])
NODE6 = bytes.fromhex("20010db8000000000000000000000001")
NODE_MAC = bytes.fromhex("02000000aa01")
BCAST = b"\xff" * 6
HOST, UPLINK, ABSENT, DYN = 0, 1, 9, 8
PODS = (2, 3, 4, 5, 6, 7)


def pod_mac(p):
    return bytes([2, 0, 0, 0, 1, p])


def pod_ip4(p):
    return bytes([10, 0, 0, 10 + p])


def pod_ip6(p):
    return bytes.fromhex("fd00000000000000000000000000") + bytes([0, 10 + p])


def client(i):
    """A host behind the uplink: MAC, IPv4, IPv6."""
    return (bytes([2, 0, 0, 9, 0, i]), bytes([192, 168, 7, i]),
            bytes.fromhex("20010db80000000000000000000007") + bytes([i]))


RULES = [  # (proto, host_port, pod, container_port, host_ip or None, family)
    (6, 8080, 2, 80, None, 4), (6, 8080, 2, 80, None, 6), (17, 5353, 3, 53, None, 4),
    (6, 8443, 4, 443, NODE4, 4), (17, 9000, 5, 9000, None, 6), (17, 9001, 6, 53, None, 4),
    (6, 2222, 7, 22, None, 4), (6, 2222, 3, 22, NODE6, 6),
]
RULE_TARGETS = {}
for _proto, _hp, _pod, _cp, _hip, _fam in RULES:
    RULE_TARGETS.setdefault((_proto, _hp, _fam), (_pod, _cp))

CONFIG = dict(max_ports=10, mac_table_size=24, conntrack_size=40, max_hostports=6,
              mac_aging_ns=15 * C.SEC_NS, tcp_syn_timeout_ns=2 * C.SEC_NS,
              tcp_est_timeout_ns=20 * C.SEC_NS, tcp_fin_timeout_ns=2 * C.SEC_NS,
              tcp_close_timeout_ns=C.SEC_NS, udp_timeout_ns=3 * C.SEC_NS,
              udp_replied_timeout_ns=10 * C.SEC_NS)


def _both(dps, name, *args, **kw):
    """Calls a method on both datapaths; both must return equal values or both raise ValueError."""
    results = []
    for dp in dps:
        try:
            results.append(("ok", getattr(dp, name)(*args, **kw)))
        except ValueError as exc:
            results.append(("ValueError", str(exc)))
    (k0, r0), (k1, r1) = results
    assert k0 == k1, f"{name}{args}: py {k0} {r0!r} vs c {k1} {r1!r}"
    if k0 == "ok":
        assert _eq(r0, r1), f"{name}{args}: py {r0!r} vs c {r1!r}"
    return r0 if k0 == "ok" else None


def _eq(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def setup(dps, vnet_hdr_len):
    for dp in dps:
        dp.add_port(HOST, C.PORT_HOST)
        dp.add_port(UPLINK, C.PORT_UPLINK)
        for p in PODS:
            dp.add_port(p, C.PORT_POD)
        dp.add_port(DYN, C.PORT_POD)
        for p in PODS[:-1]:                     # pod 7: no binding (anti-spoofing does nothing)
            dp.bind_port(p, pod_mac(p), [pod_ip4(p), pod_ip6(p)])
        dp.bind_port(DYN, pod_mac(DYN), [pod_ip4(DYN)])
        dp.set_antispoof(6, False)
        dp.set_gateway(GW_MAC, GW4, GW6)
        dp.set_node_addresses([NODE4, NODE6, GW4, GW6])
        dp.set_shaper(2, C.EGRESS, 2_000_000, 20_000, 8_000)            # queues often
        dp.set_shaper(3, C.INGRESS, 5_000_000, 100_000)                  # default limit
        dp.set_shaper(4, C.EGRESS, 10**9, 2**32 - 1)                     # huge burst
        dp.set_shaper(5, C.INGRESS, 1_000_000, 4_000, 3_000)             # burst < frame
    for proto, hp, pod, cp, hip, fam in RULES[:6]:
        _both(dps, "add_hostport", proto, hp, pod_ip4(pod) if fam == 4 else pod_ip6(pod), cp, pod, hip)


# --------------------------------------------------------------------------- traffic


class Traffic:
    def __init__(self, rng, H):
        self.rng = rng
        self.H = H
        self.clients = [client(i) for i in range(1, 7)]
        self.cports = [40000 + i for i in range(6)]
        self.recent = []                 # (frame, in_port) of valid frames, for mutations
        self.flows = []                  # recent hostPort requests, for ICMP errors about them
        self.pending = []                # (frame, in_port): later fragments of a datagram (D39)

    def pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def tcp_flags(self):
        r = self.rng.random()
        if r < 0.15:
            return 0x02
        if r < 0.22:
            return 0x11
        if r < 0.26:
            return 0x04
        if r < 0.30:
            return 0x12
        return 0x10

    def l4(self, family, src, dst, sport, dport, proto=None):
        rng = self.rng
        proto = proto or self.pick((6, 6, 17, 17, 1))
        # mostly small; sometimes a few GSO segments' worth (D36 charges them per segment)
        pay = bytes(int(rng.integers(0, 24)) if rng.random() < 0.9 else int(rng.integers(24, 4000)))
        if proto == 6:
            return l4_tcp(src, dst, sport, dport, self.tcp_flags(), pay, csum=rng.random() < 0.9)
        if proto == 17:
            return l4_udp(src, dst, sport, dport, pay, csum=rng.random() < 0.8)
        return l4_icmp(family)

    def ip_frame(self, dst_mac, src_mac, family, src, dst, proto, payload, vlan=None):
        rng = self.rng
        if family == 4:
            frag, opts = 0, b""
            r = rng.random()
            if r < 0.04:
                frag = 0x2000                              # first fragment
            elif r < 0.07:
                frag = int(rng.integers(1, 200))           # non-first
            elif r < 0.10:
                opts = b"\x01\x01\x01\x00"                 # NOPs + EOL
            return eth(dst_mac, src_mac, 0x0800, ipv4(src, dst, proto, payload, frag, opts), vlan)
        ext = []
        r = rng.random()
        if r < 0.10:
            for _ in range(int(rng.integers(1, 4))):
                ext.append(ext_hdr(self.pick((0, 43, 60, 51)), rng))
        elif r < 0.14:
            ext.append(ext_hdr(44, rng, 0, int(rng.integers(0, 2))))
        elif r < 0.16:
            ext.append(ext_hdr(44, rng, int(rng.integers(1, 50)), 0))
        elif r < 0.18:
            ext = [ext_hdr(60, rng) for _ in range(int(rng.integers(8, 10)))]
        return eth(dst_mac, src_mac, 0x86DD, ipv6(src, dst, proto, payload, ext), vlan)

    def pod_addr(self, p, family):
        return pod_ip4(p) if family == 4 else pod_ip6(p)

    def frame(self):
        """(frame bytes, in_port)."""
        rng = self.rng
        if self.pending and rng.random() < 0.5:
            return self.pending.pop(0)
        r = rng.random()
        vlan = int(rng.integers(1, 4095)) if rng.random() < 0.05 else None
        family = 4 if rng.random() < 0.6 else 6
        if r < 0.04:                                  # an ICMP error about a hostPort flow
            return self.icmp_error()
        if r < 0.25:                                  # pod to pod
            a, b = self.pick(PODS), self.pick(PODS)
            src, dst = self.pod_addr(a, family), self.pod_addr(b, family)
            proto, pay = self.l4(family, src, dst, int(rng.integers(1000, 1010)), int(rng.integers(80, 83)))
            dmac = pod_mac(b) if rng.random() < 0.9 else bytes([2, 0, 0, 0, 0x55, int(rng.integers(256))])
            return self.ip_frame(dmac, pod_mac(a), family, src, dst, proto, pay, vlan), a
        if r < 0.45:                                  # client to a hostPort
            proto, hp, fam = self.pick([(x[0], x[1], x[5]) for x in RULES])
            cmac, c4, c6 = self.pick(self.clients)
            src = c4 if fam == 4 else c6
            dst = self.pick((NODE4, GW4)) if fam == 4 else self.pick((NODE6, GW6))
            sport = self.pick(self.cports)
            self.flows.append((proto, hp, fam, cmac, c4, c6, sport, dst))
            del self.flows[:-16]
            proto2, pay = self.l4(fam, src, dst, sport, hp, proto)
            in_port = self.pick((UPLINK, UPLINK, HOST))
            if rng.random() < 0.15:
                return self.fragmented(NODE_MAC, cmac, fam, src, dst, proto2, pay, in_port)
            return self.ip_frame(NODE_MAC, cmac, fam, src, dst, proto2, pay), in_port
        if r < 0.62:                                  # a pod's reply to a client
            (proto, hp, fam), (pod, cp) = self.pick(list(RULE_TARGETS.items()))
            cmac, c4, c6 = self.pick(self.clients)
            src = self.pod_addr(pod, fam)
            dst = c4 if fam == 4 else c6
            proto2, pay = self.l4(fam, src, dst, cp, self.pick(self.cports), proto)
            if rng.random() < 0.15:
                return self.fragmented(GW_MAC, pod_mac(pod), fam, src, dst, proto2, pay, pod)
            return self.ip_frame(GW_MAC, pod_mac(pod), fam, src, dst, proto2, pay), pod
        if r < 0.72:                                  # hairpin / pod to another pod's hostPort
            (proto, hp, fam), (pod, cp) = self.pick(list(RULE_TARGETS.items()))
            me = pod if rng.random() < 0.5 else self.pick(PODS)
            if rng.random() < 0.5:                    # the request
                src = self.pod_addr(me, fam)
                dst = self.pick((NODE4, GW4)) if fam == 4 else self.pick((NODE6, GW6))
                proto2, pay = self.l4(fam, src, dst, 50000 + me, hp, proto)
                return self.ip_frame(GW_MAC, pod_mac(me), fam, src, dst, proto2, pay), me
            src = self.pod_addr(pod, fam)             # the reply, to the gateway or the pod
            dst = (GW4 if fam == 4 else GW6) if rng.random() < 0.5 else self.pod_addr(me, fam)
            proto2, pay = self.l4(fam, src, dst, cp, 50000 + me, proto)
            return self.ip_frame(GW_MAC, pod_mac(pod), fam, src, dst, proto2, pay), pod
        if r < 0.80:                                  # ARP
            p = self.pick(PODS + (UPLINK,))
            if p == UPLINK:
                mac, ip = self.clients[0][0], self.clients[0][1]
            else:
                mac, ip = pod_mac(p), pod_ip4(p)
            x = rng.random()
            if x < 0.1:
                ip = b"\0\0\0\0"                      # probe
            elif x < 0.15:
                ip = bytes([10, 0, 0, 99])            # spoofed sender IP
            elif x < 0.2:
                mac = bytes([2, 0, 0, 0, 7, 7])       # spoofed sender MAC
            op = 1 if rng.random() < 0.7 else 2
            dst = BCAST if op == 1 else pod_mac(self.pick(PODS))
            return eth(dst, pod_mac(p) if p != UPLINK else mac, 0x0806,
                       arp(op, mac, ip, bytes(6), GW4) + bytes(int(rng.integers(0, 18))), vlan), p
        if r < 0.85:                                  # broadcast / multicast / other ethertypes
            p = self.pick(PODS + (UPLINK, HOST))
            smac = pod_mac(p) if p in PODS else self.clients[1][0]
            dmac = self.pick((BCAST, bytes.fromhex("01005e000001"), bytes.fromhex("333300000001"),
                              pod_mac(self.pick(PODS))))
            et = self.pick((0x88CC, 0x0842, 0x0100, 0x88A8, 0x8100))
            return eth(dmac, smac, et, bytes(int(rng.integers(0, 50))), vlan), p
        if r < 0.90:                                  # spoofed IP / MAC from a pod
            p = self.pick(PODS)
            smac = pod_mac(p) if rng.random() < 0.6 else bytes([2, 0, 0, 0, 8, int(rng.integers(256))])
            src = self.pick((bytes([10, 0, 0, 200]), b"\0\0\0\0", pod_ip4(self.pick(PODS)))) if family == 4 \
                else self.pick((bytes(16), bytes.fromhex("fe80000000000000000000000000abcd"),
                                pod_ip6(self.pick(PODS)), bytes.fromhex("fd00000000000000000000000000ffff")))
            dst = self.pod_addr(self.pick(PODS), family)
            proto, pay = self.l4(family, src, dst, 1234, 80)
            return self.ip_frame(pod_mac(self.pick(PODS)), smac, family, src, dst, proto, pay, vlan), p
        if r < 0.93:                                  # garbage
            n = int(rng.integers(0, 90))
            return rng.integers(0, 256, n, dtype=np.uint8).tobytes(), self.pick(PODS + (UPLINK, HOST, ABSENT))
        if r < 0.935:                                 # a big frame (TSO-sized)
            p = self.pick(PODS)
            q = self.pick(PODS)
            size = self.pick((1500, 9000, 30000, C.MAX_FRAME - 18 - 40 - 20 - 4))
            src, dst = pod_ip6(p), pod_ip6(q)
            proto, pay = l4_tcp(src, dst, 1000, 80, 0x10, bytes(size))
            f = eth(pod_mac(q), pod_mac(p), 0x86DD, ipv6(src, dst, proto, pay))
            return f[:C.MAX_FRAME], p
        # mutation of a recent valid frame
        if not self.recent:
            return eth(BCAST, pod_mac(2), 0x0806, arp(1, pod_mac(2), pod_ip4(2), bytes(6), GW4)), 2
        f, p = self.pick(self.recent)
        f = bytearray(f)
        x = rng.random()
        if x < 0.4 and len(f) > 1:
            f = f[:int(rng.integers(0, len(f)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                if f:
                    i = int(rng.integers(0, min(len(f), 80)))
                    f[i] ^= 1 << int(rng.integers(0, 8))
        return bytes(f), p

    def fragmented(self, dst_mac, src_mac, family, src, dst, proto, l4, in_port):
        """(first fragment, in_port) of the datagram `l4` cut in 8-byte multiples; the later
        fragments wait in self.pending (sometimes one is lost, sometimes one is duplicated)."""
        rng = self.rng
        l4 = l4 + bytes(int(rng.integers(0, 40)))
        ident = int(rng.integers(0, 1 << (16 if family == 4 else 32)))
        cuts = sorted({0, *(8 * int(x) for x in rng.integers(1, max(2, len(l4) // 8), size=3))})
        cuts = [c for c in cuts if c < len(l4)] + [len(l4)]
        frames = []
        for a, b in zip(cuts, cuts[1:]):
            more = int(b < len(l4))
            if family == 4:
                ip = ipv4(src, dst, proto, l4[a:b], frag=(0x2000 if more else 0) | (a // 8), ident=ident)
            else:
                ip = ipv6(src, dst, proto, l4[a:b], ext=[(44, struct.pack("!xHI", (a // 8) << 3 | more, ident))])
            frames.append((eth(dst_mac, src_mac, 0x0800 if family == 4 else 0x86DD, ip), in_port))
        later = frames[1:]
        if later and rng.random() < 0.1:
            later.pop(int(rng.integers(len(later))))
        if later and rng.random() < 0.1:
            later.append(later[0])
        self.pending += later
        return frames[0]

    def icmp_error(self):
        """(frame, in_port): an ICMP / ICMPv6 error (D37) quoting a packet of a hostPort
        flow as one side received it: the pod about a request (from a client, or from
        the gateway: hairpin), or a client about a reply. Quotes are whole or truncated
        (8 L4 bytes, or fewer), checksums mostly right; some types are not errors."""
        rng = self.rng
        if self.flows and rng.random() < 0.8:         # mostly about a recent request
            proto, hp, fam, cmac, c4, c6, sport, node = self.pick(self.flows)
            pod, cp = RULE_TARGETS[(proto, hp, fam)]
        else:
            (proto, hp, fam), (pod, cp) = self.pick(list(RULE_TARGETS.items()))
            cmac, c4, c6 = self.pick(self.clients)
            sport = self.pick(self.cports)
            node = self.pick((NODE4, GW4)) if fam == 4 else self.pick((NODE6, GW6))
        client_ip = c4 if fam == 4 else c6
        pod_ip = self.pod_addr(pod, fam)
        x = rng.random()
        if x < 0.45:                                  # the pod, about a client's request
            q = (client_ip, pod_ip, sport, cp)
            outer = (pod_ip, client_ip, pod_mac(pod), GW_MAC, pod)
        elif x < 0.6:                                 # the pod, about a hairpin request
            gw = GW4 if fam == 4 else GW6
            q = (gw, pod_ip, 50000 + self.pick(PODS), cp)
            outer = (pod_ip, gw, pod_mac(pod), GW_MAC, pod)
        else:                                         # a client, about a reply from node:hostPort
            q = (node, client_ip, hp, sport)
            outer = (client_ip, node, cmac, NODE_MAC, UPLINK)
        q_src, q_dst, qs, qd = q
        qproto, ql4 = self.l4(fam, q_src, q_dst, qs, qd, proto)
        quoted = ipv4(q_src, q_dst, qproto, ql4) if fam == 4 else ipv6(q_src, q_dst, qproto, ql4)
        hdr = 20 if fam == 4 else 40
        y = rng.random()
        if y < 0.3:
            quoted = quoted[:hdr + 8]
        elif y < 0.4:
            quoted = quoted[:hdr + int(rng.integers(0, 24))]
        if rng.random() < 0.05:
            quoted = bytearray(quoted)
            quoted[int(rng.integers(0, len(quoted)))] ^= 1 << int(rng.integers(0, 8))
            quoted = bytes(quoted)
        o_src, o_dst, smac, dmac, in_port = outer
        t = self.pick((3, 3, 11, 12, 8, 0) if fam == 4 else (1, 1, 2, 3, 4, 128))
        body = struct.pack("!BBHI", t, int(rng.integers(0, 5)), 0, 0) + quoted
        if rng.random() < 0.9:
            c = _csum(body if fam == 4 else _pseudo(o_src, o_dst, 58, len(body)) + body)
            body = body[:2] + struct.pack("!H", c) + body[4:]
        return self.ip_frame(dmac, smac, fam, o_src, o_dst, 1 if fam == 4 else 58, body), in_port

    def vnet_header(self):
        """Random bytes with flags 0 or 1 (NEEDS_CSUM); half the time a GSO header: gso_type
        (byte 1) TCPV4/UDP/TCPV6/UDP_L4, with or without ECN, or none / unknown, and a
        gso_size (bytes 4-5, little endian) from 0 and 1 up to 65535."""
        if not self.H:
            return b""
        rng = self.rng
        h = bytearray(rng.integers(0, 256, self.H, dtype=np.uint8).tobytes())
        h[0] = int(rng.integers(0, 2))
        if rng.random() < 0.5:
            h[1] = self.pick((1, 1, 4, 4, 3, 5, 0x81, 0x84, 0x83, 0x85, 0, 0x80, 2, 6))
            size = self.pick((0, 1, 7, 16, 48, 536, 1200, 1448, 8948, 65535, None))
            if size is None:
                size = int(rng.integers(1, 4000))
            h[4:6] = size.to_bytes(2, "little")
        return bytes(h)

    def batch(self, n):
        frames, ports, hdrs = [], [], []
        for _ in range(n):
            f, p = self.frame()
            frames.append(f)
            ports.append(p)
            hdrs.append(self.vnet_header())
            if 14 <= len(f) <= 200 and self.rng.random() < 0.3:
                self.recent.append((f, p))
                if len(self.recent) > 64:
                    self.recent.pop(0)
        H = self.H
        gaps = self.rng.integers(0, 9, n + 1)
        total = int(sum(len(f) for f in frames) + n * H + gaps.sum()) + 1
        buf = self.rng.integers(0, 256, total, dtype=np.uint8)
        offsets = np.zeros(n + 3, dtype=np.uint32)
        lengths = np.zeros(n + 3, dtype=np.uint32)
        in_ports = np.zeros(n + 3, dtype=np.uint16)
        pos = int(gaps[0])
        for i, f in enumerate(frames):
            buf[pos:pos + H] = np.frombuffer(hdrs[i], np.uint8) if H else []
            pos += H
            offsets[i], lengths[i], in_ports[i] = pos, len(f), ports[i]
            buf[pos:pos + len(f)] = np.frombuffer(f, np.uint8) if f else []
            pos += len(f) + int(gaps[i + 1])
        # the core finishes a batch whose frames lie in ascending, disjoint order chunk by
        # chunk, parsed ahead; any other layout packet by packet. Both must equal the twin:
        # some batches list their frames out of order, some list a frame twice (the second
        # time it is processed as the first left it, NAT rewrites included)
        x = self.rng.random()
        if n > 1 and x < 0.1:
            perm = self.rng.permutation(n)
            offsets[:n], lengths[:n], in_ports[:n] = offsets[perm], lengths[perm], in_ports[perm]
        elif n > 1 and x < 0.2:
            for i in self.rng.integers(1, n, size=1 + n // 8):
                j = int(self.rng.integers(0, i))
                offsets[i], lengths[i], in_ports[i] = offsets[j], lengths[j], in_ports[j]
        return buf, offsets, lengths, in_ports


# --------------------------------------------------------------------------- the run


def _compare_state(py, c, where, tables):
    assert _eq(py.port_counters(), c.port_counters()), f"{where}: port counters\n" \
        f"{_diff_rows(py.port_counters(), c.port_counters(), C.PORT_COUNTERS)}"
    assert _eq(py.global_counters(), c.global_counters()), f"{where}: global counters\n" \
        f"{_diff_rows(py.global_counters()[None], c.global_counters()[None], C.GLOBAL_COUNTERS)}"
    assert py.next_departure_ns() == c.next_departure_ns(), f"{where}: next_departure_ns"
    for p in range(CONFIG["max_ports"]):
        for d in (C.EGRESS, C.INGRESS):
            try:
                a = py.shaper_state(p, d)
            except ValueError:
                a = "absent"
            try:
                b = c.shaper_state(p, d)
            except ValueError:
                b = "absent"
            assert a == b, f"{where}: shaper_state({p}, {d}): py {a} vs c {b}"
    if tables:
        assert _eq(py.fdb(), c.fdb()), f"{where}: fdb\npy {py.fdb()}\nc  {c.fdb()}"
        assert _eq(py.conntrack(), c.conntrack()), f"{where}: conntrack\npy {py.conntrack()}\nc  {c.conntrack()}"
        assert py.hostports() == c.hostports(), f"{where}: hostports"


def _diff_rows(a, b, names):
    out = []
    for r in range(a.shape[0]):
        for j, name in enumerate(names):
            if a[r, j] != b[r, j]:
                out.append(f"row {r} {name}: py {a[r, j]} c {b[r, j]}")
    return "\n".join(out)


def _control(rng, dps, now):
    """One random control-plane change, applied to both."""
    x = rng.random()
    if x < 0.15:
        p = int(rng.choice(PODS))
        _both(dps, "set_port_up", p, bool(rng.random() < 0.6))
    elif x < 0.35:
        proto, hp, pod, cp, hip, fam = RULES[int(rng.integers(len(RULES)))]
        if rng.random() < 0.6:
            _both(dps, "add_hostport", proto, hp, pod_ip4(pod) if fam == 4 else pod_ip6(pod), cp, pod, hip)
        else:
            _both(dps, "remove_hostport", proto, hp, hip)
    elif x < 0.50:
        p = int(rng.choice(PODS))
        d = int(rng.integers(0, 2))
        rate = int(rng.choice([0, 1_000_000, 3_000_000, 50_000_000]))
        burst = int(rng.choice([0, 8_000, 12_000, 2**32 - 1, 2**40]))
        qb = int(rng.choice([0, 1500, 20_000]))
        _both(dps, "set_shaper", p, d, rate, burst, qb)
    elif x < 0.55:
        _both(dps, "clear_shaper", int(rng.choice(PODS)), int(rng.integers(0, 2)))
    elif x < 0.65:
        if rng.random() < 0.5:
            _both(dps, "remove_port", DYN)
        else:
            _both(dps, "add_port", DYN, C.PORT_POD)
            _both(dps, "bind_port", DYN, pod_mac(DYN), [pod_ip4(DYN)])
            _both(dps, "add_hostport", 17, 7000, pod_ip4(DYN), 7000, DYN)
    elif x < 0.72:
        _both(dps, "mac_sweep", now)
    elif x < 0.79:
        _both(dps, "conntrack_sweep", now)
    elif x < 0.86:
        _both(dps, "set_antispoof", int(rng.choice(PODS)), bool(rng.random() < 0.7))
    elif x < 0.93:
        p = int(rng.choice(PODS))
        choice = rng.random()
        if choice < 0.3:
            _both(dps, "bind_port", p, pod_mac(p), None)
        elif choice < 0.5:
            _both(dps, "bind_port", p, None, [pod_ip4(p)])
        elif choice < 0.6:
            _both(dps, "bind_port", p, None, None)
        else:
            _both(dps, "bind_port", p, pod_mac(p), [pod_ip4(p), pod_ip6(p)])
    else:
        nodes = [NODE4, NODE6, GW4, GW6]
        k = int(rng.integers(1, 5))
        _both(dps, "set_node_addresses", [nodes[i] for i in rng.permutation(4)[:k]])


def run_scenario(both_impls, seed, n_frames, vnet_hdr_len, prefetch=False):
    rng = np.random.default_rng(seed)
    py_mod, c_mod = both_impls
    cfg = dict(CONFIG, vnet_hdr_len=vnet_hdr_len)
    py, c = py_mod.Datapath(**cfg), c_mod.Datapath(**cfg)
    if prefetch:       # the core's prefetch pipeline, normally only for big tables
        c._tune(prefetch_min_entries=0)
    dps = (py, c)
    setup(dps, vnet_hdr_len)
    traffic = Traffic(rng, vnet_hdr_len)
    now = int(rng.integers(0, 10**9))
    sent = batch_no = 0
    while sent < n_frames:
        r = rng.random()
        n = int(rng.choice([1, 3, 31, 32, 33, 64])) if r < 0.3 else int(rng.integers(0, 100))
        buf, offsets, lengths, in_ports = traffic.batch(n)
        bufs = [buf.copy(), buf.copy()]
        outs = [np.full(n + 3, 777, dtype=np.int32) for _ in dps]
        for dp, b, o in zip(dps, bufs, outs):
            dp.process(b, offsets, lengths, in_ports, o, n, now)
        where = f"seed {seed} H={vnet_hdr_len} batch {batch_no} now {now}"
        if not np.array_equal(outs[0], outs[1]) or not np.array_equal(bufs[0], bufs[1]):
            i = next((i for i in range(n) if outs[0][i] != outs[1][i]
                      or not np.array_equal(bufs[0][offsets[i]:offsets[i] + lengths[i]],
                                            bufs[1][offsets[i]:offsets[i] + lengths[i]])), None)
            detail = ""
            if i is not None:
                o, ln = int(offsets[i]), int(lengths[i])
                detail = (f"\npacket {i} in_port {in_ports[i]} len {ln}: out py {outs[0][i]} c {outs[1][i]}"
                          f"\nin   {buf[o - vnet_hdr_len:o + ln].tobytes().hex()}"
                          f"\npy   {bufs[0][o:o + ln].tobytes().hex()}\nc    {bufs[1][o:o + ln].tobytes().hex()}")
            raise AssertionError(f"{where}: process() differs{detail}")
        sent += n
        batch_no += 1
        # time moves on
        x = rng.random()
        if x < 0.1:
            step = 0
        elif x < 0.7:
            step = int(rng.integers(1_000, 2_000_000))
        elif x < 0.95:
            step = int(rng.integers(10_000_000, 1_500_000_000))
        else:
            step = int(rng.integers(3, 40)) * C.SEC_NS
        now += step
        if rng.random() < 0.7:
            size = int(rng.choice([60, 200, 3000, 70000, 300000]))
            maxp = int(rng.integers(0, 40))
            res = []
            for dp in dps:
                ob = np.zeros(size, dtype=np.uint8)
                oo = np.zeros(48, dtype=np.uint32)
                ol = np.zeros(48, dtype=np.uint32)
                oi = np.zeros(48, dtype=np.uint16)
                op = np.zeros(48, dtype=np.int32)
                k = dp.drain(now, ob, oo, ol, oi, op, maxp)
                res.append((k, ob, oo[:k], ol[:k], oi[:k], op[:k]))
            (k0, *a), (k1, *b) = res
            assert k0 == k1, f"{where}: drain count py {k0} c {k1}"
            for name, x0, x1 in zip(("out_buf", "offsets", "lengths", "in_ports", "out_ports"), a, b):
                assert np.array_equal(x0, x1), f"{where}: drain {name} differs:\npy {x0[:200]}\nc  {x1[:200]}"
        if rng.random() < 0.06:
            _control(rng, dps, now)
        if rng.random() < 0.03:
            f, p = traffic.frame()
            before = (py.global_counters(), c.global_counters())
            t0, t1 = py.trace(f, p, now), c.trace(f, p, now)
            assert [s for s, _ in t0] == [s for s, _ in t1], f"{where}: trace stages {t0} vs {t1}"
            assert t0[-1] == t1[-1], f"{where}: trace output {t0[-1]} vs {t1[-1]}"
            assert _eq(before[1], c.global_counters()), "trace changed the C datapath's counters"
        _compare_state(py, c, where, tables=batch_no % 4 == 0)
    _compare_state(py, c, f"seed {seed} end", tables=True)
    return sent


@pytest.mark.parametrize("seed,vnet_hdr_len,prefetch", [(1, 0, False), (2, 12, True), (3, 10, False),
                                                        (4, 12, False), (5, 0, True)])
def test_random_batches(both_impls, seed, vnet_hdr_len, prefetch):
    """30,000 frames per case, 150,000 in all: both implementations agree on everything
    (two cases with the core's prefetch pipeline forced on, which only big tables use)."""
    assert run_scenario(both_impls, seed, 30_000, vnet_hdr_len, prefetch) >= 30_000


def test_the_generator_makes_gso_frames_that_cost_more_than_their_length():
    """The random batches exercise D36: many frames are charged more than their length
    (and a few hit the 2x cap), measured with the twin's own rule."""
    from vswitch.datapath import pure as datapath_py
    rng = np.random.default_rng(9)
    traffic = Traffic(rng, 12)
    more = capped = 0
    for _ in range(3000):
        f, _ = traffic.frame()
        hdr = traffic.vnet_header()
        p = datapath_py._parse(f)
        if isinstance(p, str):
            continue
        c = datapath_py._charged_len(hdr, f, p)
        more += c > len(f)
        capped += c == 2 * len(f) > 0
    assert more >= 50 and capped >= 10, (more, capped)


def test_the_generator_makes_icmp_errors_that_get_translated():
    """The random batches exercise D37: among ICMP errors run through the twin, some
    find their flow and are rewritten, others do not."""
    from vswitch.datapath import pure as datapath_py
    dp = datapath_py.Datapath(**CONFIG)
    setup((dp, datapath_py.Datapath(**CONFIG)), 0)      # (setup wants a pair)
    rng = np.random.default_rng(11)
    traffic = Traffic(rng, 0)
    translated = now = 0
    for _ in range(40):
        buf, offsets, lengths, in_ports = traffic.batch(100)
        before = dp.global_counters()[C.GC["nat_translated"]]
        icmp = [i for i in range(100) if lengths[i] > 34 and (
            (buf[offsets[i] + 12:offsets[i] + 14].tobytes() == b"\x08\x00" and buf[offsets[i] + 23] == 1)
            or (buf[offsets[i] + 12:offsets[i] + 14].tobytes() == b"\x86\xdd" and buf[offsets[i] + 20] == 58))]
        original = [buf[offsets[i]:offsets[i] + lengths[i]].tobytes() for i in icmp]
        dp.process(buf, offsets, lengths, in_ports, np.zeros(103, np.int32), 100, now)
        translated += sum(buf[offsets[i]:offsets[i] + lengths[i]].tobytes() != o for i, o in zip(icmp, original))
        assert dp.global_counters()[C.GC["nat_translated"]] >= before
        now += C.SEC_NS // 2          # entries come and go (the table holds 40)
    assert translated >= 10, translated


def test_the_generator_makes_fragments_that_get_translated():
    """The random batches exercise D39: later fragments of hostPort datagrams are
    translated through what their first fragment left, in both directions."""
    from vswitch.datapath import pure as datapath_py
    dp = datapath_py.Datapath(**CONFIG)
    setup((dp, datapath_py.Datapath(**CONFIG)), 0)      # (setup wants a pair)
    rng = np.random.default_rng(12)
    traffic = Traffic(rng, 0)
    seen = {0: 0, 1: 0}
    translate = dp._nat_fragment

    def counting(buf, off, p, now, tr):
        out = translate(buf, off, p, now, tr)
        if out is not None:
            seen[dp._frags[datapath_py._frag_key(p.family, p.src, p.dst, p.frag_proto, p.frag_id)][1]] += 1
        return out
    dp._nat_fragment = counting
    now = 0
    for _ in range(40):
        buf, offsets, lengths, in_ports = traffic.batch(100)
        dp.process(buf, offsets, lengths, in_ports, np.zeros(103, np.int32), 100, now)
        now += C.SEC_NS // 2
    assert seen[0] >= 30 and seen[1] >= 5, seen


def test_validation_agrees(both_impls):
    """Bad batches raise ValueError in both and change nothing."""
    py_mod, c_mod = both_impls
    dps = (py_mod.Datapath(max_ports=4, vnet_hdr_len=12), c_mod.Datapath(max_ports=4, vnet_hdr_len=12))
    for dp in dps:
        dp.add_port(0, C.PORT_POD)
    buf = np.zeros(200, dtype=np.uint8)
    ok = dict(offsets=np.array([12], np.uint32), lengths=np.array([60], np.uint32),
              in_ports=np.array([0], np.uint16))
    cases = [
        dict(offsets=np.array([11], np.uint32)),                      # no room for the header
        dict(offsets=np.array([150], np.uint32)),                     # beyond buf
        dict(lengths=np.array([C.MAX_FRAME + 1], np.uint32)),         # oversized
        dict(in_ports=np.array([4], np.uint16)),                      # beyond max_ports
        dict(offsets=np.array([12], np.int64)),                       # wrong dtype
        dict(n=2),                                                    # n beyond the arrays
    ]
    for case in cases:
        args = dict(ok, n=1)
        args.update(case)
        for dp in dps:
            out = np.zeros(1, np.int32)
            with pytest.raises(ValueError):
                dp.process(buf, args["offsets"], args["lengths"], args["in_ports"], out, args["n"], 5)
    for dp in dps:
        assert not dp.global_counters().any()
        dp.process(buf, ok["offsets"], ok["lengths"], ok["in_ports"], np.zeros(1, np.int32), 1, 100)
        with pytest.raises(ValueError):       # time never goes back
            dp.process(buf, ok["offsets"], ok["lengths"], ok["in_ports"], np.zeros(1, np.int32), 1, 99)
    assert _eq(dps[0].port_counters(), dps[1].port_counters())


def test_ipv4_protocol_58_has_no_l4(both_impls):
    """D9: protocol 58 inside IPv4 is not ICMP: a 2-byte payload is switched, not malformed."""
    src, dst = pod_ip4(2), pod_ip4(3)
    frame = eth(pod_mac(3), pod_mac(2), 0x0800, ipv4(src, dst, 58, b"\0\0"))
    for mod in both_impls:
        dp = mod.Datapath(max_ports=4)
        dp.add_port(2, C.PORT_POD)
        dp.add_port(3, C.PORT_POD)
        buf = np.frombuffer(frame, np.uint8).copy()
        out = np.zeros(1, np.int32)
        dp.process(buf, np.zeros(1, np.uint32), np.array([len(frame)], np.uint32),
                   np.array([2], np.uint16), out, 1, 1)
        assert out[0] == C.OUT_FLOOD_UNKNOWN, mod.__name__
