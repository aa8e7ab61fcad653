"""VXLAN in the datapath (docs/datapath.md "VXLAN", RFC 7348), on both implementations.

Expected frames are built by scapy from the RFC and the spec (outer Ethernet/IPv4 DF TTL 64
ID 0/UDP checksum 0/VXLAN flags I), the inner frame with its routed MACs and TTL - 1, and
the UDP source port from the FNV-1a rule computed in vx_helpers: nothing is taken from the
implementation under test. Every drop reason of the stage is provoked and counted.
"""
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from dp_helpers import GW_MAC, MAC_A, MAC_B, checksums_ok, drain, gc, ip4, ip6, mac_str, pc
from vx_helpers import (
    A4, A6, B4, GW4, GW6, HOST, NEXT_HOP_MAC, NODE_IP, NODE_MAC, PEER2_IP, PEER2_VTEP_MAC, PEER_CIDRS,
    PEER_IP, PEER_VTEP_MAC, POD_A, POD_B, REMOTE4, REMOTE6, UPLINK, VNI, VTEP_MAC, HBatch, fnv_sport,
    outer, peer, send1, topo, vnet_hdr,
)
from vswitch.datapath import consts as C

T0 = 1_000_000


def inner_frame(kind, family, src_mac=MAC_A, dst_mac=GW_MAC, src=None, dst=None, ttl=64, payload=b"hello"):
    src = src or (A4 if family == 4 else A6)
    dst = dst or (REMOTE4 if family == 4 else REMOTE6)
    l3 = IP(src=src, dst=dst, ttl=ttl) if family == 4 else IPv6(src=src, dst=dst, hlim=ttl)
    if kind == "tcp":
        l4 = TCP(sport=40000, dport=80, flags="S")
    elif kind == "udp":
        l4 = UDP(sport=40001, dport=53)
    else:
        l4 = ICMP(id=7, seq=1) if family == 4 else ICMPv6EchoRequest(id=7, seq=1)
    return bytes(Ether(src=mac_str(src_mac), dst=mac_str(dst_mac)) / l3 / l4 / payload)


def expected_sport(kind, family, src, dst):
    raw = ip4 if family == 4 else ip6
    proto = {"tcp": 6, "udp": 17, "icmp": 1 if family == 4 else 58}[kind]
    ports = {"tcp": (40000).to_bytes(2, "big") + (80).to_bytes(2, "big"),
             "udp": (40001).to_bytes(2, "big") + (53).to_bytes(2, "big"), "icmp": b""}[kind]
    return fnv_sport(raw(src), raw(dst), proto, ports)


# ---------------------------------------------------------------------------- encapsulation

@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp", "icmp"])
def test_encapsulation_is_rfc7348_with_routed_inner_frame(dp_impl, kind, family):
    dp = topo(dp_impl)
    frame = inner_frame(kind, family, ttl=64)
    out, got, _, doff, dlen = send1(dp, frame, POD_A, T0)
    routed = inner_frame(kind, family, src_mac=VTEP_MAC, dst_mac=PEER_VTEP_MAC, ttl=63)
    sport = expected_sport(kind, family, A4 if family == 4 else A6, REMOTE4 if family == 4 else REMOTE6)
    want = outer(routed, sport)
    assert (out, doff, dlen) == (UPLINK, -50, 50)
    assert got == want, f"\n got  {got.hex()}\n want {want.hex()}"
    assert checksums_ok(got) and checksums_ok(got[50:])
    assert Ether(got)[IP].ttl == 64 and Ether(got)[IP].flags == "DF"
    assert 49152 <= Ether(got)[UDP].sport <= 65535
    # counters: rx inner on the pod, tx outer on the uplink, the peer's tx outer
    assert pc(dp, POD_A, "rx_bytes") == len(frame) and pc(dp, UPLINK, "tx_bytes") == len(frame) + 50
    assert gc(dp, "vxlan_encap") == 1 and gc(dp, "bytes") == len(frame)
    p = peer(dp, PEER_IP)
    assert (p["tx_packets"], p["tx_bytes"], p["rx_packets"], p["drop_unresolved"]) == (1, len(frame) + 50, 0, 0)


def test_the_source_port_follows_the_flow_and_is_stable(dp_impl):
    dp = topo(dp_impl)
    ports = set()
    for sport in range(1000, 1064):
        f = bytes(Ether(src=mac_str(MAC_A), dst=mac_str(GW_MAC)) / IP(src=A4, dst=REMOTE4)
                  / UDP(sport=sport, dport=53) / b"x")
        out, got, *_ = send1(dp, f, POD_A, T0)
        s = Ether(got)[UDP].sport
        assert s == fnv_sport(ip4(A4), ip4(REMOTE4), 17, sport.to_bytes(2, "big") + (53).to_bytes(2, "big"))
        ports.add(s)
    assert len(ports) > 50                      # entropy for ECMP


def test_frames_to_the_vtep_mac_are_routed_and_others_are_switched(dp_impl):
    dp = topo(dp_impl)
    out, got, *_ = send1(dp, inner_frame("udp", 4, dst_mac=VTEP_MAC), POD_A, T0)
    assert out == UPLINK and len(got) > 50 and Ether(got)[UDP].dport == C.VXLAN_PORT
    # to pod B's MAC (not routed): switched at L2, untouched
    f = inner_frame("udp", 4, dst_mac=MAC_B)
    out, got, _, doff, dlen = send1(dp, f, POD_A, T0)
    assert (out, got, doff, dlen) == (POD_B, f, 0, 0)
    # to the gateway, but not in a peer CIDR: L2 as today
    f = inner_frame("udp", 4, dst="10.99.0.1")
    out, got, _, doff, dlen = send1(dp, f, POD_A, T0)
    assert (got, doff, dlen) == (f, 0, 0) and out != UPLINK
    # tagged: not routed
    f = bytes(Ether(src=mac_str(NODE_MAC), dst=mac_str(GW_MAC)) / Dot1Q(vlan=5) / IP(src=A4, dst=REMOTE4) / UDP())
    out, got, _, doff, dlen = send1(dp, f, HOST, T0)
    assert (got, doff, dlen) == (f, 0, 0)
    assert gc(dp, "vxlan_encap") == 1


def test_longest_prefix_match_over_overlapping_cidrs(dp_impl):
    dp = topo(dp_impl)
    dp.set_peer(ip4(PEER_IP), PEER_VTEP_MAC, NEXT_HOP_MAC, [(ip4("10.244.0.0"), 16)])
    dp.set_peer(ip4(PEER2_IP), PEER2_VTEP_MAC, NEXT_HOP_MAC,
                [(ip4("10.244.5.0"), 24), (ip4("10.244.5.128"), 25)])

    def dst_of(dst):
        out, got, *_ = send1(dp, inner_frame("udp", 4, dst=dst), POD_A, T0)
        assert out == UPLINK
        return Ether(got)[IP].dst, Ether(got)[Ether].payload

    assert dst_of("10.244.5.9")[0] == PEER2_IP           # /24 beats /16
    assert dst_of("10.244.5.200")[0] == PEER2_IP         # /25 of the same peer
    assert dst_of("10.244.6.1")[0] == PEER_IP            # only the /16
    assert dst_of("10.244.255.255")[0] == PEER_IP
    # the local pod CIDR is inside the /16 too, but a frame to a local pod's MAC is switched
    dp.remove_peer(ip4(PEER2_IP))
    assert dst_of("10.244.5.9")[0] == PEER_IP
    dp.remove_peer(ip4(PEER_IP))
    f = inner_frame("udp", 4, dst="10.244.5.9")
    out, got, _, doff, _ = send1(dp, f, POD_A, T0)
    assert (got, doff) == (f, 0) and out != UPLINK


def test_ipv6_lpm_is_per_family(dp_impl):
    dp = topo(dp_impl)
    dp.set_peer(ip4(PEER2_IP), PEER2_VTEP_MAC, NEXT_HOP_MAC, [(ip6("fd00:1:0:1::"), 80), (ip4("10.244.1.0"), 25)])
    out, got, *_ = send1(dp, inner_frame("udp", 6, dst="fd00:1:0:1::9"), POD_A, T0)
    assert Ether(got)[IP].dst == PEER2_IP
    out, got, *_ = send1(dp, inner_frame("udp", 6, dst="fd00:1::2:9"), POD_A, T0)
    assert Ether(got)[IP].dst == PEER_IP


# ---------------------------------------------------------------------------- decapsulation

def remote_inner(dst=A4, family=4, ttl=63, dst_mac=VTEP_MAC, kind="udp"):
    src = REMOTE4 if family == 4 else REMOTE6
    return inner_frame(kind, family, src_mac=PEER_VTEP_MAC, dst_mac=dst_mac, src=src, dst=dst, ttl=ttl)


def from_peer(inner, sport=50000, **kw):
    return outer(inner, sport, src=PEER_IP, dst=NODE_IP, smac=NEXT_HOP_MAC, dmac=NODE_MAC, **kw)


@pytest.mark.parametrize("family,kind", [(4, "udp"), (4, "tcp"), (4, "icmp"), (6, "udp"), (6, "tcp")])
def test_decapsulation_to_a_pod(dp_impl, family, kind):
    dp = topo(dp_impl)
    dst = A4 if family == 4 else A6
    wire = from_peer(remote_inner(dst, family, ttl=63, kind=kind))
    out, got, _, doff, dlen = send1(dp, wire, UPLINK, T0)
    want = inner_frame(kind, family, src_mac=GW_MAC, dst_mac=MAC_A,
                       src=REMOTE4 if family == 4 else REMOTE6, dst=dst, ttl=62)
    assert (out, doff, dlen) == (POD_A, 50, -50)
    assert got == want and checksums_ok(got)
    assert gc(dp, "vxlan_decap") == 1 and pc(dp, UPLINK, "rx_bytes") == len(wire)
    assert pc(dp, POD_A, "tx_bytes") == len(want)
    p = peer(dp, PEER_IP)
    assert (p["rx_packets"], p["rx_bytes"], p["tx_packets"]) == (1, len(wire), 0)
    assert not any(r["mac"].tobytes() == PEER_VTEP_MAC for r in dp.fdb())      # not learned


def test_decapsulation_to_the_gateway_goes_to_the_host_port(dp_impl):
    dp = topo(dp_impl)
    for family, gw in ((4, GW4), (6, GW6)):
        out, got, *_ = send1(dp, from_peer(remote_inner(gw, family)), UPLINK, T0)
        want = inner_frame("udp", family, src_mac=VTEP_MAC, dst_mac=GW_MAC,
                           src=REMOTE4 if family == 4 else REMOTE6, dst=gw, ttl=62)
        assert out == HOST and got == want


def test_a_pod_pair_across_two_nodes_sees_ttl_minus_two(dp_impl):
    """Node 1 encapsulates pod A's frame, node 2 decapsulates it to its pod: TTL 64 -> 62."""
    for impl in (dp_impl,):
        n1 = topo(impl)
        n2 = impl.Datapath()
        n2.add_port(0, C.PORT_HOST)
        n2.add_port(1, C.PORT_UPLINK)
        n2.add_port(2, C.PORT_POD)
        n2.bind_port(2, bytes.fromhex("0200000001f1"), [ip4(REMOTE4)])
        n2.set_gateway(bytes.fromhex("02000000fe02"), ip4("10.244.1.1"))
        n2.set_vtep(1, ip4(PEER_IP), NEXT_HOP_MAC, PEER_VTEP_MAC, VNI)
        n2.set_peer(ip4(NODE_IP), VTEP_MAC, NODE_MAC, [(ip4("10.244.0.0"), 24)])
        out, wire, *_ = send1(n1, inner_frame("tcp", 4, ttl=64), POD_A, T0)
        assert out == UPLINK
        out, got, *_ = send1(n2, wire, 1, T0)
        assert out == 2 and Ether(got)[IP].ttl == 62 and checksums_ok(got)
        assert Ether(got).dst == "02:00:00:00:01:f1" and Ether(got).src == "02:00:00:00:fe:02"


def test_not_for_our_vtep_is_switched_as_before(dp_impl):
    dp = topo(dp_impl)
    inner = remote_inner()
    cases = [
        outer(inner, 50000, src=PEER_IP, dst="192.168.1.99", smac=NEXT_HOP_MAC, dmac=NODE_MAC),  # other IP
        outer(inner, 50000, src=PEER_IP, dst=NODE_IP, smac=NEXT_HOP_MAC, dmac=NODE_MAC, dport=8472),
        outer(inner, 50000, src=PEER_IP, dst=NODE_IP, smac=NEXT_HOP_MAC, dmac=MAC_B),         # other MAC
    ]
    for wire in cases:
        out, got, _, doff, dlen = send1(dp, wire, UPLINK, T0)
        assert (got, doff, dlen) == (wire, 0, 0)
    # the right frame on another port is not decapsulated either
    out, got, _, doff, _ = send1(dp, from_peer(inner), HOST, T0)
    assert doff == 0
    assert gc(dp, "vxlan_decap") == 0


# ---------------------------------------------------------------------------- drops

def set_byte(frame, at, value):
    b = bytearray(frame)
    b[at] = value
    return bytes(b)


def drop_cases():
    inner = remote_inner()
    wire = from_peer(inner)
    mf = bytes(Ether(src=mac_str(NEXT_HOP_MAC), dst=mac_str(NODE_MAC)) / IP(src=PEER_IP, dst=NODE_IP, flags="MF")
               / UDP(sport=5, dport=4789, len=8 + 8 + len(inner) + 100) / bytes(8) / inner)
    short_udp = bytes(Ether(src=mac_str(NEXT_HOP_MAC), dst=mac_str(NODE_MAC)) / IP(src=PEER_IP, dst=NODE_IP)
                      / UDP(sport=5, dport=4789) / bytes.fromhex("0800000000000100") / bytes(13))
    arp = bytes(Ether(src=mac_str(PEER_VTEP_MAC), dst=mac_str(VTEP_MAC)) / ARP(psrc=REMOTE4, pdst=A4))
    tagged = bytes(Ether(src=mac_str(PEER_VTEP_MAC), dst=mac_str(VTEP_MAC)) / Dot1Q(vlan=3)
                   / IP(src=REMOTE4, dst=A4) / UDP())
    bad_inner = inner[:14] + bytes([0x45]) + inner[15:16] + (9999).to_bytes(2, "big") + inner[18:]
    return [
        ("vxlan_malformed", UPLINK, mf),
        ("vxlan_malformed", UPLINK, short_udp),
        ("vxlan_malformed", UPLINK, set_byte(wire, 42, 0x00)),                # I flag clear
        ("vxlan_malformed", UPLINK, from_peer(bad_inner)),                     # inner IPv4 length
        ("vxlan_bad_vni", UPLINK, from_peer(inner, vni=VNI + 1)),
        ("vxlan_unknown_peer", UPLINK, outer(inner, 1, src="192.168.1.77", dst=NODE_IP,
                                              smac=NEXT_HOP_MAC, dmac=NODE_MAC)),
        ("vxlan_not_ours", UPLINK, from_peer(remote_inner(dst_mac=MAC_A))),
        ("vxlan_not_ours", UPLINK, from_peer(arp)),
        ("vxlan_not_ours", UPLINK, from_peer(tagged)),
        ("vxlan_no_route", UPLINK, from_peer(remote_inner(dst="10.244.0.77"))),
        ("ttl_expired", UPLINK, from_peer(remote_inner(ttl=1))),
        ("ttl_expired", POD_A, inner_frame("udp", 4, ttl=1)),
        ("ttl_expired", POD_A, inner_frame("udp", 6, ttl=0)),
        ("too_big", POD_A, inner_frame("udp", 4, payload=bytes(1500 - 50 - 28 + 1))),
    ]


@pytest.mark.parametrize("i", range(14))
def test_every_drop_reason_is_counted_on_the_in_port(dp_impl, i):
    reason, in_port, frame = drop_cases()[i]
    dp = topo(dp_impl)
    out, got, _, doff, dlen = send1(dp, frame, in_port, T0)
    assert (out, doff, dlen) == (C.OUT_DROP, 0, 0)
    assert pc(dp, in_port, "drop_" + reason) == 1 and gc(dp, reason) == 1
    assert gc(dp, "vxlan_encap") == gc(dp, "vxlan_decap") == 0
    assert dp.trace(frame, in_port, T0)[-1] == ("output", "drop " + reason)


def test_the_largest_frame_that_fits_the_mtu_passes(dp_impl):
    dp = topo(dp_impl)
    f = inner_frame("udp", 4, payload=bytes(1500 - 50 - 28))     # inner IP 1450: outer IP 1500
    out, got, *_ = send1(dp, f, POD_A, T0)
    assert out == UPLINK and Ether(got)[IP].len == 1500


def test_unresolved_peer_is_counted_on_the_peer(dp_impl):
    dp = topo(dp_impl)
    dp.set_peer(ip4(PEER_IP), PEER_VTEP_MAC, None, PEER_CIDRS)
    out, *_ = send1(dp, inner_frame("udp", 4), POD_A, T0)
    assert out == C.OUT_DROP and pc(dp, POD_A, "drop_vxlan_unresolved") == 1
    assert peer(dp, PEER_IP)["drop_unresolved"] == 1 and peer(dp, PEER_IP)["underlay_mac"] is None
    dp.set_peer(ip4(PEER_IP), PEER_VTEP_MAC, NEXT_HOP_MAC, PEER_CIDRS)     # resolved: counters kept
    out, *_ = send1(dp, inner_frame("udp", 4), POD_A, T0)
    assert out == UPLINK and peer(dp, PEER_IP)["drop_unresolved"] == 1 and peer(dp, PEER_IP)["tx_packets"] == 1


def test_no_headroom_is_a_counted_drop(dp_impl):
    dp = topo(dp_impl, vnet_hdr_len=10)
    f = inner_frame("udp", 4)
    out, got, _, doff, _ = send1(dp, f, POD_A, T0, H=10, headroom=49)     # offset - H = 49 < 50
    assert (out, doff) == (C.OUT_DROP, 0) and pc(dp, POD_A, "drop_no_headroom") == 1
    out, got, _, doff, _ = send1(dp, f, POD_A, T0, H=10, headroom=50)     # exactly enough
    assert (out, doff) == (UPLINK, -50)


def test_a_down_vtep_port_drops_no_route_after_encapsulating(dp_impl):
    dp = topo(dp_impl)
    dp.set_port_up(UPLINK, False)
    out, *_ = send1(dp, inner_frame("udp", 4), POD_A, T0)
    assert out == C.OUT_DROP and pc(dp, POD_A, "drop_no_route") == 1 and gc(dp, "vxlan_encap") == 1


# ---------------------------------------------------------------------------- vnet headers

def test_encap_adjusts_the_vnet_header(dp_impl):
    dp = topo(dp_impl, vnet_hdr_len=12)
    f = inner_frame("tcp", 4, payload=bytes(100))
    hdr = vnet_hdr(flags=C.VNET_F_NEEDS_CSUM, gso_type=1, hdr_len=54, gso_size=1000, csum_start=34,
                   csum_offset=16)
    out, got, h, doff, _ = send1(dp, f, POD_A, T0, H=12, hdr=hdr)
    assert out == UPLINK and doff == -50
    assert h == vnet_hdr(flags=1, gso_type=1 | C.VNET_GSO_UDP_TUNNEL_IPV4, hdr_len=104, gso_size=1000,
                         csum_start=84, csum_offset=16)
    # without GSO or a partial checksum the header is copied; hdr_len 0 stays 0
    out, got, h, *_ = send1(dp, f, POD_A, T0, H=12, hdr=vnet_hdr(gso_size=7))
    assert h == vnet_hdr(gso_size=7)


def test_a_gso_frame_is_checked_per_segment_and_gets_zero_lengths_above_64k(dp_impl):
    dp = topo(dp_impl, vnet_hdr_len=12)
    big = inner_frame("tcp", 4, payload=bytes(65535 - 40))              # inner IP 65535
    hdr = vnet_hdr(flags=1, gso_type=1, hdr_len=54, gso_size=1410, csum_start=34, csum_offset=16)
    out, got, h, doff, dlen = send1(dp, big, POD_A, T0, H=12, hdr=hdr)
    assert (out, dlen) == (UPLINK, 50)
    o = Ether(got[:50] + bytes(100))
    assert o[IP].len == 0 and o[UDP].len == 0 and h[1] == 0x21
    # 1411 + 54 + 36 > 1500: too big
    hdr = vnet_hdr(flags=1, gso_type=1, hdr_len=54, gso_size=1411, csum_start=34, csum_offset=16)
    out, *_ = send1(dp, big, POD_A, T0, H=12, hdr=hdr)
    assert out == C.OUT_DROP and gc(dp, "too_big") == 1


def test_decap_adjusts_the_vnet_header(dp_impl):
    dp = topo(dp_impl, vnet_hdr_len=10)
    wire = from_peer(remote_inner(kind="tcp"))
    # partial checksum of the inner TCP (csum_start counts from the outer frame)
    hdr = vnet_hdr(flags=1, hdr_len=104, csum_start=50 + 34, csum_offset=16, H=10)
    out, got, h, doff, _ = send1(dp, wire, UPLINK, T0, H=10, hdr=hdr)
    assert (out, doff) == (POD_A, 50)
    assert h == vnet_hdr(flags=1, hdr_len=54, csum_start=34, csum_offset=16, H=10)
    # partial checksum in the outer headers: a locally sent packet, so the inner checksums
    # are complete and valid: DATA_VALID (D54; what lets the TAP writer coalesce them)
    hdr = vnet_hdr(flags=1, hdr_len=20, csum_start=34, csum_offset=6, H=10)
    out, got, h, *_ = send1(dp, wire, UPLINK, T0, H=10, hdr=hdr)
    assert out == POD_A and h == vnet_hdr(flags=2, H=10)
    # no flags: none set on the inner frame
    out, got, h, *_ = send1(dp, wire, UPLINK, T0, H=10, hdr=vnet_hdr(H=10))
    assert out == POD_A and h == vnet_hdr(H=10)
    # UFO (gso_type 3) from the underlay: malformed (D53)
    out, *_ = send1(dp, wire, UPLINK, T0, H=10, hdr=vnet_hdr(gso_type=3, gso_size=1000, H=10))
    assert out == C.OUT_DROP and gc(dp, "vxlan_malformed") == 1


@pytest.mark.parametrize("family,kind,gso_type", [(4, "tcp", 1), (6, "tcp", 4), (4, "udp", 5), (6, "udp", 5),
                                                  (4, "tcp", 1 | 0x80)])
def test_decap_passes_a_kernel_vteps_gso_frame_whole(dp_impl, family, kind, gso_type):
    """A kernel VXLAN device sending over a veth hands the uplink's packet socket one GSO
    frame (vnet gso_type of the inner protocol, csum_start at the inner L4 header, no tunnel
    bit; tests/integration/test_gso_kernel.py): it is decapsulated with its GSO fields, so the
    pod's TAP takes the inner segment whole (D53)."""
    dp = topo(dp_impl, vnet_hdr_len=10)
    dst = A4 if family == 4 else A6
    l4_off = 34 if family == 4 else 54
    wire = from_peer(remote_inner(dst, family, ttl=63, kind=kind))
    csum_off = 16 if kind == "tcp" else 6
    hdr = vnet_hdr(flags=1, gso_type=gso_type, gso_size=1400, hdr_len=0, csum_start=50 + l4_off,
                   csum_offset=csum_off, H=10)
    out, got, h, doff, dlen = send1(dp, wire, UPLINK, T0, H=10, hdr=hdr)
    assert (out, doff, dlen) == (POD_A, 50, -50)
    assert h == vnet_hdr(flags=1, gso_type=gso_type, gso_size=1400, hdr_len=0, csum_start=l4_off,
                         csum_offset=csum_off, H=10)
    assert gc(dp, "vxlan_decap") == 1 and gc(dp, "vxlan_malformed") == 0


@pytest.mark.parametrize("why,family,kind,gso_type,flags,start", [
    ("TCPV4 on an IPv6 inner", 6, "tcp", 1, 1, 50 + 54),
    ("TCPV6 on an IPv4 inner", 4, "tcp", 4, 1, 50 + 34),
    ("TCP type on UDP", 4, "udp", 1, 1, 50 + 34),
    ("UDP_L4 on TCP", 4, "tcp", 5, 1, 50 + 34),
    ("no NEEDS_CSUM", 4, "tcp", 1, 0, 50 + 34),
    ("csum_start in the outer headers", 4, "tcp", 1, 1, 34),
    ("ICMP inner", 4, "icmp", 1, 1, 50 + 34),
])
def test_decap_refuses_a_gso_header_that_does_not_describe_the_inner_frame(dp_impl, why, family, kind,
                                                                            gso_type, flags, start):
    dp = topo(dp_impl, vnet_hdr_len=10)
    dst = A4 if family == 4 else A6
    wire = from_peer(remote_inner(dst, family, ttl=63, kind=kind))
    hdr = vnet_hdr(flags=flags, gso_type=gso_type, gso_size=1400, csum_start=start, csum_offset=16, H=10)
    out, *_ = send1(dp, wire, UPLINK, T0, H=10, hdr=hdr)
    assert out == C.OUT_DROP and gc(dp, "vxlan_malformed") == 1, why
    assert gc(dp, "vxlan_decap") == 0


# ---------------------------------------------------------------------------- shapers and drain

def test_egress_shaped_pod_frames_leave_drain_encapsulated_with_headroom(dp_impl):
    dp = topo(dp_impl, vnet_hdr_len=10)
    dp.set_shaper(POD_A, C.EGRESS, 8_000_000, 0)                # no burst: everything queues
    frames = [inner_frame("udp", 4, payload=bytes(100 + i)) for i in range(3)]
    b = HBatch(frames, POD_A, H=10)
    assert b.run(dp, T0) == [C.OUT_QUEUED] * 3
    got = drain(dp, T0 + 10**9, vnet_hdr_len=10)
    assert [g[1] for g in got] == [UPLINK] * 3
    for (in_port, out, frame, hdr), f in zip(got, frames):
        routed = inner_frame("udp", 4, src_mac=VTEP_MAC, dst_mac=PEER_VTEP_MAC, ttl=63, payload=f[42:])
        assert frame == outer(routed, expected_sport("udp", 4, A4, REMOTE4)) and hdr == bytes(10)


def test_a_decapsulated_frame_passes_the_pods_ingress_shaper(dp_impl):
    dp = topo(dp_impl)
    dp.set_shaper(POD_A, C.INGRESS, 8_000_000, 0)
    wire = from_peer(remote_inner())
    out, got, _, doff, dlen = send1(dp, wire, UPLINK, T0)
    assert (out, doff, dlen) == (C.OUT_QUEUED, 50, -50)
    assert pc(dp, POD_A, "queued") == 1 and gc(dp, "vxlan_decap") == 1
    due = dp.next_departure_ns()
    assert due == T0 + len(got) * 1000                            # inner bytes at 8 Mbit/s: 1 us each
    (in_port, out, frame, _), = drain(dp, due)
    assert (in_port, out, frame) == (UPLINK, POD_A, got)


# ---------------------------------------------------------------------------- trace, API

def test_trace_shows_the_vxlan_stage(dp_impl):
    dp = topo(dp_impl)
    f = inner_frame("udp", 4)
    steps = dp.trace(f, POD_A, T0)
    sport = expected_sport("udp", 4, A4, REMOTE4)
    assert ("vxlan", f"encapsulated, VNI {VNI}, UDP source port {sport}") in steps
    assert steps[-1] == ("output", f"port {UPLINK}") and not any(s == "l2" for s, _ in steps)
    steps = dp.trace(from_peer(remote_inner()), UPLINK, T0)
    assert ("vxlan", f"decapsulated, VNI {VNI}, to port {POD_A}") in steps
    assert steps[-1] == ("output", f"port {POD_A}")
    assert gc(dp, "vxlan_encap") == 0 and peer(dp, PEER_IP)["tx_packets"] == 0    # trace changes nothing


def test_vtep_api(dp_impl):
    dp = topo(dp_impl)
    assert dp.vtep() == dict(port=UPLINK, ip=ip4(NODE_IP), outer_mac=NODE_MAC, vtep_mac=VTEP_MAC, vni=VNI,
                             udp_port=4789, mtu=1500)
    bad = [dict(port_id=9), dict(port_id=-1), dict(ip=ip6("fd00::1")), dict(ip=b"abc"), dict(outer_mac=b"12345"),
           dict(vtep_mac=None), dict(vni=2**24), dict(vni=-1), dict(udp_port=0), dict(udp_port=65536),
           dict(mtu=67), dict(mtu=65536), dict(vni="1")]
    good = dict(port_id=HOST, ip=ip4("10.0.0.1"), outer_mac=NODE_MAC, vtep_mac=VTEP_MAC, vni=5, udp_port=8472,
                mtu=9000)
    for b in bad:
        with pytest.raises(ValueError):
            dp.set_vtep(**{**good, **b})
        assert dp.vtep()["vni"] == VNI
    dp.set_vtep(**good)
    assert dp.vtep() == dict(port=HOST, ip=ip4("10.0.0.1"), outer_mac=NODE_MAC, vtep_mac=VTEP_MAC, vni=5,
                             udp_port=8472, mtu=9000)
    dp.remove_port(HOST)
    assert dp.vtep() is None
    dp.set_vtep(UPLINK, ip4(NODE_IP), NODE_MAC, VTEP_MAC, VNI)
    dp.clear_vtep()
    assert dp.vtep() is None
    f = inner_frame("udp", 4)
    out, got, _, doff, _ = send1(dp, f, POD_A, T0)                # no VTEP: switched
    assert doff == 0 and got == f


def test_peer_api(dp_impl):
    dp = topo(dp_impl, max_peers=2)
    p = peer(dp, PEER_IP)
    assert p == dict(ip=ip4(PEER_IP), vtep_mac=PEER_VTEP_MAC, underlay_mac=NEXT_HOP_MAC, cidrs=PEER_CIDRS,
                     tx_packets=0, tx_bytes=0, rx_packets=0, rx_bytes=0, drop_unresolved=0)
    before = dp.peers()
    v4 = lambda s: ip4(s)          # noqa: E731
    bad = [
        (v4("1.2.3"), PEER2_VTEP_MAC, None, [(v4("10.9.0.0"), 16)]),
        (ip6("fd00::9"), PEER2_VTEP_MAC, None, [(v4("10.9.0.0"), 16)]),
        (v4("1.2.3.4"), b"12345", None, [(v4("10.9.0.0"), 16)]),
        (v4("1.2.3.4"), PEER2_VTEP_MAC, b"1", [(v4("10.9.0.0"), 16)]),
        (v4("1.2.3.4"), PEER2_VTEP_MAC, None, []),
        (v4("1.2.3.4"), PEER2_VTEP_MAC, None, [(v4("10.9.0.%d" % i), 32) for i in range(9)]),
        (v4("1.2.3.4"), PEER2_VTEP_MAC, None, [(v4("10.9.0.1"), 16)]),            # host bits
        (v4("1.2.3.4"), PEER2_VTEP_MAC, None, [(v4("10.9.0.0"), 33)]),
        (v4("1.2.3.4"), PEER2_VTEP_MAC, None, [(ip6("fd00::"), 129)]),
        (v4("1.2.3.4"), PEER2_VTEP_MAC, None, [(v4("10.9.0.0"), 16), (v4("10.9.0.0"), 16)]),
        (v4("1.2.3.4"), PEER2_VTEP_MAC, None, [(v4("10.244.1.0"), 24)]),          # held by PEER_IP
        (v4("1.2.3.4"), PEER2_VTEP_MAC, None, [v4("10.9.0.0")]),
        (v4("1.2.3.4"), PEER2_VTEP_MAC, None, None),
    ]
    for args in bad:
        with pytest.raises(ValueError):
            dp.set_peer(*args)
        assert dp.peers() == before
    dp.set_peer(v4("192.168.1.2"), PEER2_VTEP_MAC, None, [(v4("10.244.1.0"), 25)])   # overlap: other length
    with pytest.raises(ValueError, match="2"):
        dp.set_peer(v4("192.168.1.3"), PEER2_VTEP_MAC, None, [(v4("10.9.0.0"), 16)])  # max_peers
    assert [q["ip"] for q in dp.peers()] == [v4("192.168.1.2"), v4(PEER_IP)]          # sorted by bytes
    # replacing keeps counters and frees the old CIDRs
    send1(dp, inner_frame("udp", 4, dst="10.244.1.200"), POD_A, T0)      # outside the /25
    dp.set_peer(v4(PEER_IP), PEER_VTEP_MAC, NEXT_HOP_MAC, [(v4("10.244.2.0"), 24)])
    assert peer(dp, PEER_IP)["tx_packets"] == 1 and peer(dp, PEER_IP)["cidrs"] == [(v4("10.244.2.0"), 24)]
    dp.set_peer(v4("192.168.1.2"), PEER2_VTEP_MAC, None, [(v4("10.244.1.0"), 24)])   # now free
    with pytest.raises(ValueError):
        dp.remove_peer(v4("192.168.1.99"))
    dp.remove_peer(v4("192.168.1.2"))
    assert [q["ip"] for q in dp.peers()] == [v4(PEER_IP)]


def test_pod_index_follows_bind_and_remove(dp_impl):
    dp = topo(dp_impl)
    wire = from_peer(remote_inner(dst=B4))
    assert send1(dp, wire, UPLINK, T0)[0] == POD_B
    dp.bind_port(POD_A, MAC_A, [ip4(A4), ip4(B4)])                    # the lowest port id wins
    assert send1(dp, wire, UPLINK, T0)[0] == POD_A
    dp.remove_port(POD_A)
    assert send1(dp, wire, UPLINK, T0)[0] == POD_B
    dp.bind_port(POD_B, MAC_B, None)
    assert send1(dp, wire, UPLINK, T0)[0] == C.OUT_DROP and gc(dp, "vxlan_no_route") == 1
