"""Helpers for the VXLAN datapath tests: a two-node topology, batches with encapsulation
headroom, and the RFC 7348 outer headers built with scapy (never by the code under test).

The flow hash (docs/datapath.md "VXLAN", encapsulation step 6) is computed here from its
definition, independently of both implementations: FNV-1a 32 bits over the inner source
and destination address, the protocol byte and, for TCP/UDP, the two ports as on the wire;
folded h ^= h >> 16; source port 49152 + (h & 0x3FFF).
"""
import numpy as np
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

from dp_helpers import GW_MAC, MAC_A, MAC_B, ip4, ip6, mac_str
from vswitch.datapath import consts as C

HOST, UPLINK, POD_A, POD_B = 0, 1, 2, 3
NODE_IP = "192.168.1.10"
PEER_IP, PEER2_IP = "192.168.1.20", "192.168.1.30"
NODE_MAC = bytes.fromhex("02000000aa01")       # our uplink MAC: outer source MAC
VTEP_MAC = bytes.fromhex("0200000ee001")       # our VTEP MAC (flannel.1's)
PEER_VTEP_MAC = bytes.fromhex("0200000ee002")
PEER2_VTEP_MAC = bytes.fromhex("0200000ee003")
NEXT_HOP_MAC = bytes.fromhex("02000000bb01")   # the underlay next hop towards the peers
VNI = 1
GW4, GW6 = "10.244.0.1", "fd00::1"
A4, A6 = "10.244.0.2", "fd00::2"
B4 = "10.244.0.3"
REMOTE4, REMOTE6 = "10.244.1.5", "fd00:1::5"   # a pod on the peer node
PEER_CIDRS = [(ip4("10.244.1.0"), 24), (ip6("fd00:1::"), 64)]


def topo(impl, vnet_hdr_len=0, mtu=1500, **kw):
    """host 0, uplink 1 (the VTEP port), pods A 2 and B 3 (bound); one peer, resolved."""
    dp = impl.Datapath(vnet_hdr_len=vnet_hdr_len, **kw)
    dp.add_port(HOST, C.PORT_HOST)
    dp.add_port(UPLINK, C.PORT_UPLINK)
    dp.add_port(POD_A, C.PORT_POD)
    dp.add_port(POD_B, C.PORT_POD)
    dp.bind_port(POD_A, MAC_A, [ip4(A4), ip6(A6)])
    dp.bind_port(POD_B, MAC_B, [ip4(B4)])
    dp.set_gateway(GW_MAC, ip4(GW4), ip6(GW6))
    dp.set_vtep(UPLINK, ip4(NODE_IP), NODE_MAC, VTEP_MAC, VNI, mtu=mtu)
    dp.set_peer(ip4(PEER_IP), PEER_VTEP_MAC, NEXT_HOP_MAC, PEER_CIDRS)
    return dp


def fnv_sport(src, dst, proto, ports=b""):
    """The UDP source port of the spec's rule, from raw address bytes."""
    h = 0x811C9DC5
    for x in src + dst + bytes([proto]) + ports:
        h ^= x
        h = (h * 0x01000193) % 2**32
    h ^= h >> 16
    return 49152 + (h & 0x3FFF)


def outer(inner, sport, src=NODE_IP, dst=PEER_IP, smac=NODE_MAC, dmac=NEXT_HOP_MAC, vni=VNI,
          dport=C.VXLAN_PORT, **ipkw):
    """inner (bytes) encapsulated per RFC 7348 and docs/datapath.md: DF, TTL 64, ID 0,
    UDP checksum 0, VXLAN flags I."""
    pkt = (Ether(src=mac_str(smac), dst=mac_str(dmac))
           / IP(src=src, dst=dst, ttl=64, id=0, flags="DF", **ipkw)
           / UDP(sport=sport, dport=dport, chksum=0) / VXLAN(vni=vni, flags=0x08) / inner)
    return bytes(pkt)


class HBatch:
    """Frames in one buffer, ENCAP_HEADROOM (or ``headroom``) free bytes before each vnet header."""

    def __init__(self, frames, in_ports, H=0, hdrs=None, headroom=C.ENCAP_HEADROOM):
        self.H = H
        n = len(frames)
        total = sum(headroom + H + len(f) for f in frames) + 8
        self.buf = np.zeros(total, dtype=np.uint8)
        self.offsets = np.zeros(n, dtype=np.uint32)
        self.lengths = np.zeros(n, dtype=np.uint32)
        self.in_ports = np.array(in_ports if not isinstance(in_ports, int) else [in_ports] * n,
                                 dtype=np.uint16)
        self.out_ports = np.full(n, 12345, dtype=np.int32)
        pos = 0
        for i, f in enumerate(frames):
            pos += headroom
            if H:
                hdr = bytes(hdrs[i]) if hdrs is not None else bytes(H)
                self.buf[pos:pos + H] = np.frombuffer(hdr, np.uint8)
            pos += H
            self.offsets[i] = pos
            self.lengths[i] = len(f)
            self.buf[pos:pos + len(f)] = np.frombuffer(bytes(f), np.uint8)
            pos += len(f)
        self.n = n
        self.in_offsets = self.offsets.copy()
        self.in_lengths = self.lengths.copy()

    def run(self, dp, now_ns):
        dp.process(self.buf, self.offsets, self.lengths, self.in_ports, self.out_ports, self.n, now_ns)
        return [int(x) for x in self.out_ports]

    def frame(self, i):
        o, n = int(self.offsets[i]), int(self.lengths[i])
        return self.buf[o:o + n].tobytes()

    def header(self, i):
        o = int(self.offsets[i])
        return self.buf[o - self.H:o].tobytes()


def send1(dp, frame, in_port, now_ns, H=0, hdr=None, headroom=C.ENCAP_HEADROOM):
    """(out port, frame out, vnet header out, offset delta, length delta)."""
    b = HBatch([frame], [in_port], H, None if hdr is None else [hdr], headroom)
    out = b.run(dp, now_ns)[0]
    return (out, b.frame(0), b.header(0), int(b.offsets[0]) - int(b.in_offsets[0]),
            int(b.lengths[0]) - int(b.in_lengths[0]))


def peer(dp, ip):
    return next(p for p in dp.peers() if p["ip"] == ip4(ip))


def vnet_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, H=12):
    b = (bytes([flags, gso_type]) + hdr_len.to_bytes(2, "little") + gso_size.to_bytes(2, "little")
         + csum_start.to_bytes(2, "little") + csum_offset.to_bytes(2, "little"))
    return b + bytes(H - 10)
