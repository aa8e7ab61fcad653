"""Helpers for the datapath tests: batches in numpy buffers, counters by name, scapy checks.

Everything here goes through the public Datapath API only, so the same tests run against
the pure-Python twin and the Cython core (fixture ``dp_impl``, ids ``py`` and ``c``).
"""
import numpy as np
from scapy.layers.inet import IP, TCP, UDP, ICMP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from vswitch.datapath import consts as C

# addresses used across the tests
GW_MAC = bytes.fromhex("02000000fe01")
NODE_MAC = bytes.fromhex("02000000aa01")      # the node's uplink MAC: clients send to it
ROUTER_MAC = bytes.fromhex("02000000bb01")    # a client behind the uplink
MAC_A = bytes.fromhex("0200000000a1")
MAC_B = bytes.fromhex("0200000000b1")
MAC_C = bytes.fromhex("0200000000c1")
BCAST = b"\xff" * 6


def mac_str(b):
    return ":".join(f"{x:02x}" for x in b)


def ip4(s):
    return bytes(int(x) for x in s.split("."))


def ip6(s):
    import ipaddress
    return ipaddress.IPv6Address(s).packed


class Batch:
    """Frames laid out in one uint8 buffer with room for a vnet header before each."""

    def __init__(self, frames, in_ports, vnet_hdr_len=0, vnet_hdrs=None, gap=7, fill=0):
        self.H = vnet_hdr_len
        n = len(frames)
        total = sum(len(f) + vnet_hdr_len + gap for f in frames) + gap + 1
        self.buf = np.full(total, fill, dtype=np.uint8)
        self.offsets = np.zeros(n + 2, dtype=np.uint32)     # arrays longer than n on purpose
        self.lengths = np.zeros(n + 2, dtype=np.uint32)
        self.in_ports = np.zeros(n + 2, dtype=np.uint16)
        self.out_ports = np.full(n + 2, 12345, dtype=np.int32)
        pos = gap
        for i, f in enumerate(frames):
            f = bytes(f)
            if vnet_hdr_len:
                hdr = bytes(vnet_hdrs[i]) if vnet_hdrs is not None else bytes(vnet_hdr_len)
                assert len(hdr) == vnet_hdr_len
                self.buf[pos:pos + vnet_hdr_len] = np.frombuffer(hdr, np.uint8)
                pos += vnet_hdr_len
            self.offsets[i] = pos
            self.lengths[i] = len(f)
            self.buf[pos:pos + len(f)] = np.frombuffer(f, np.uint8) if f else []
            pos += len(f) + gap
        self.in_ports[:n] = in_ports if not isinstance(in_ports, int) else [in_ports] * n
        self.n = n

    def run(self, dp, now_ns):
        dp.process(self.buf, self.offsets, self.lengths, self.in_ports, self.out_ports, self.n, now_ns)
        return [int(x) for x in self.out_ports[:self.n]]

    def frame(self, i):
        o, l = int(self.offsets[i]), int(self.lengths[i])
        return self.buf[o:o + l].tobytes()

    def header(self, i):
        o = int(self.offsets[i])
        return self.buf[o - self.H:o].tobytes()


def send(dp, frames, in_ports, now_ns, vnet_hdr_len=0, vnet_hdrs=None):
    """Processes frames; returns (out_ports, rewritten frames)."""
    b = Batch(frames, in_ports, vnet_hdr_len, vnet_hdrs)
    outs = b.run(dp, now_ns)
    return outs, [b.frame(i) for i in range(b.n)]


def send1(dp, frame, in_port, now_ns, **kw):
    outs, frames = send(dp, [frame], [in_port], now_ns, **kw)
    return outs[0], frames[0]


def drain(dp, now_ns, max_pkts=4096, buf_bytes=None, vnet_hdr_len=0):
    """Drains; returns a list of (in_port, out_port, frame bytes, vnet header bytes)."""
    size = buf_bytes if buf_bytes is not None else 8 * 1024 * 1024
    out_buf = np.zeros(size, dtype=np.uint8)
    offs = np.zeros(max_pkts + 1, dtype=np.uint32)
    lens = np.zeros(max_pkts + 1, dtype=np.uint32)
    ins = np.zeros(max_pkts + 1, dtype=np.uint16)
    outs = np.zeros(max_pkts + 1, dtype=np.int32)
    k = dp.drain(now_ns, out_buf, offs, lens, ins, outs, max_pkts)
    res = []
    expect = C.ENCAP_HEADROOM + vnet_hdr_len          # headroom before each header (VXLAN)
    for i in range(k):
        o, l = int(offs[i]), int(lens[i])
        # an encapsulated frame starts ENCAP_LEN earlier in its slot (docs/datapath.md "VXLAN")
        assert o in (expect, expect - C.ENCAP_LEN), \
            f"drain offsets must follow the headroom layout: got {o}, expected {expect}"
        expect = o + l + C.ENCAP_HEADROOM + vnet_hdr_len
        res.append((int(ins[i]), int(outs[i]), out_buf[o:o + l].tobytes(),
                    out_buf[o - vnet_hdr_len:o].tobytes()))
    return res


def pc(dp, port, name):
    return int(dp.port_counters()[port, C.PC[name]])


def gc(dp, name):
    return int(dp.global_counters()[C.GC[name]])


def gcounters(dp):
    g = dp.global_counters()
    return {name: int(g[i]) for i, name in enumerate(C.GLOBAL_COUNTERS)}


def pcounters(dp, port):
    row = dp.port_counters()[port]
    return {name: int(row[i]) for i, name in enumerate(C.PORT_COUNTERS)}


def snapshot(dp):
    """Every observable table and counter, for "nothing changed" assertions."""
    shapers = {}
    for port in range(dp_max_ports(dp)):
        for d in (C.EGRESS, C.INGRESS):
            try:
                shapers[(port, d)] = dp.shaper_state(port, d)
            except ValueError:
                pass
    return dict(fdb=dp.fdb().tobytes(), ct=dp.conntrack().tobytes(),
                pc=dp.port_counters().tobytes(), gc=dp.global_counters().tobytes(),
                hostports=repr(dp.hostports()), next=dp.next_departure_ns(), shapers=repr(shapers))


def dp_max_ports(dp):
    return dp.port_counters().shape[0]


def checksums_ok(frame):
    """True if every IPv4/TCP/UDP/ICMP checksum in frame equals scapy's recomputation.

    UDP over IPv4 with checksum 0 ("no checksum") counts as correct.
    """
    pkt = Ether(frame)
    rebuilt = pkt.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if layer in rebuilt:
            if layer is UDP and IP in rebuilt and rebuilt[UDP].chksum == 0:
                continue
            rebuilt[layer].chksum = None
    return bytes(rebuilt) == bytes(frame)


def pseudo_sum(src, dst, proto, l4_len):
    """Ones' complement (folded, not complemented) pseudo-header sum: the partial
    checksum a NEEDS_CSUM frame carries in its L4 checksum field."""
    if len(src) == 4:
        data = src + dst + bytes([0, proto]) + l4_len.to_bytes(2, "big")
    else:
        data = src + dst + l4_len.to_bytes(4, "big") + bytes([0, 0, 0, proto])
    s = sum((data[i] << 8) | data[i + 1] for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def with_l4_check(frame, value):
    """frame with its TCP/UDP checksum field set to value (bytes, nothing recomputed)."""
    pkt = Ether(frame)
    l4 = TCP if TCP in pkt else UDP
    raw = bytearray(frame)
    off = len(frame) - len(pkt[l4])
    at = off + (16 if l4 is TCP else 6)
    raw[at:at + 2] = value.to_bytes(2, "big")
    return bytes(raw)


def vnet(needs_csum=False, gso_type=0, hdr_len=12):
    return bytes([1 if needs_csum else 0, gso_type]) + bytes(hdr_len - 2)


# ---------------------------------------------------------------------------- a standard topology
HOST, UPLINK, POD_A, POD_B, POD_C = 0, 1, 2, 3, 4
GW4, GW6 = "10.244.0.1", "fd00::1"
A4, A6 = "10.244.0.2", "fd00::2"
B4, B6 = "10.244.0.3", "fd00::3"
C4 = "10.244.0.4"
NODE4, NODE6 = "192.168.1.10", "2001:db8::10"
CLIENT4, CLIENT6 = "198.51.100.7", "2001:db8:1::7"


def ipb(s):
    return ip6(s) if ":" in s else ip4(s)


def make_topo(impl, **kw):
    """host 0, uplink 1, pods A 2 and B 3 (bound), pod C 4 (unbound); gateway, node
    addresses, and hostPort rules: TCP 8080 -> A:80 and UDP 5353 -> A:53 on any node
    address (both families), TCP 9090 on 192.168.1.10 only -> B:90."""
    dp = impl.Datapath(**kw)
    dp.add_port(HOST, C.PORT_HOST)
    dp.add_port(UPLINK, C.PORT_UPLINK)
    for p in (POD_A, POD_B, POD_C):
        dp.add_port(p, C.PORT_POD)
    dp.bind_port(POD_A, MAC_A, [ip4(A4), ip6(A6)])
    dp.bind_port(POD_B, MAC_B, [ip4(B4), ip6(B6)])
    dp.set_gateway(GW_MAC, ip4(GW4), ip6(GW6))
    dp.set_node_addresses([ip4(NODE4), ip6(NODE6)])
    dp.add_hostport(6, 8080, ip4(A4), 80, POD_A)
    dp.add_hostport(17, 5353, ip4(A4), 53, POD_A)
    dp.add_hostport(6, 8080, ip6(A6), 80, POD_A)
    dp.add_hostport(17, 5353, ip6(A6), 53, POD_A)
    dp.add_hostport(6, 9090, ip4(B4), 90, POD_B, host_ip=ip4(NODE4))
    return dp


def l3(src, dst, **kw):
    return IPv6(src=src, dst=dst, **kw) if ":" in src else IP(src=src, dst=dst, **kw)


def eth(src_mac, dst_mac, **kw):
    return Ether(src=mac_str(src_mac), dst=mac_str(dst_mac), **kw)


def tcp(src_mac, dst_mac, src, dst, sport, dport, flags="S", payload=b"", **kw):
    return bytes(eth(src_mac, dst_mac) / l3(src, dst) / TCP(sport=sport, dport=dport, flags=flags, **kw) / payload)


def udp(src_mac, dst_mac, src, dst, sport, dport, payload=b"x", **kw):
    return bytes(eth(src_mac, dst_mac) / l3(src, dst) / UDP(sport=sport, dport=dport, **kw) / payload)
