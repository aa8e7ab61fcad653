"""Stage 1: the malformed-frame rule, 802.1Q, IPv6 extension headers, fragments.

Frames are sent from the uplink port (no anti-spoofing).
Whether a frame got an L4 parse is observed through NAT: a TCP packet to the hostPort
8080 of a node address is translated (a conntrack entry appears) only if its L4 was found.
"""
import random

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, IPOption_NOP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, Dot1Q, Ether

from dp_helpers import (
    A4, C4, CLIENT4, CLIENT6, MAC_C, NODE4, NODE6, NODE_MAC, UPLINK,
    Batch, gc, gcounters, make_topo, mac_str, pc, send1,
)
from vswitch.datapath import consts as C

SRC = mac_str(MAC_C)
DST = mac_str(NODE_MAC)


def is_malformed(dp, frame, in_port=UPLINK, now_ns=1):
    before = gc(dp, "malformed")
    out, _ = send1(dp, frame, in_port, now_ns)
    after = gc(dp, "malformed")
    assert after - before in (0, 1)
    if after > before:
        assert out == C.OUT_DROP
    return after > before


def translated(dp, frame, in_port=UPLINK, now_ns=1):
    """Sends frame; True if NAT translated it."""
    before = gc(dp, "nat_translated")
    send1(dp, frame, in_port, now_ns)
    return gc(dp, "nat_translated") > before


TEMPLATES = {
    "arp": Ether(src=SRC, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=SRC, psrc=C4, pdst=A4),
    "ipv4-tcp": Ether(src=SRC, dst=DST) / IP(src=CLIENT4, dst=NODE4) / TCP(sport=1000, dport=8080) / b"data",
    "ipv4-options-tcp": Ether(src=SRC, dst=DST) / IP(src=CLIENT4, dst=NODE4, options=[IPOption_NOP()] * 8)
                        / TCP(sport=1000, dport=8080, options=[("MSS", 1460), ("NOP", None), ("WScale", 7)]),
    "ipv4-udp": Ether(src=SRC, dst=DST) / IP(src=CLIENT4, dst=NODE4) / UDP(sport=1000, dport=5353) / b"q",
    "ipv4-icmp": Ether(src=SRC, dst=DST) / IP(src=CLIENT4, dst=NODE4) / ICMP() / b"ping",
    "ipv6-tcp": Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6) / TCP(sport=1000, dport=8080),
    "ipv6-udp": Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6) / UDP(sport=1000, dport=5353) / b"q",
    "ipv6-icmpv6": Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6) / ICMPv6EchoRequest(),
    "ipv6-ext-tcp": Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6) / IPv6ExtHdrHopByHop()
                    / IPv6ExtHdrRouting() / IPv6ExtHdrDestOpt() / AH(nh=6, payloadlen=4, icv=b"\0" * 12)
                    / TCP(sport=1000, dport=8080),
    "ipv6-frag-tcp": Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6) / IPv6ExtHdrFragment(m=1)
                     / TCP(sport=1000, dport=8080),
    "vlan-ipv4-tcp": Ether(src=SRC, dst=DST) / Dot1Q(vlan=42) / IP(src=CLIENT4, dst=NODE4)
                     / TCP(sport=1000, dport=8080),
    "vlan-arp": Ether(src=SRC, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=7) / ARP(hwsrc=SRC, psrc=C4, pdst=A4),
}


@pytest.fixture
def dp(dp_impl):
    return make_topo(dp_impl)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_truncation_of_a_template_is_malformed_and_the_whole_is_not(dp, name):
    frame = bytes(TEMPLATES[name])
    assert not is_malformed(dp, frame)
    for k in range(len(frame)):
        assert is_malformed(dp, frame[:k]), f"{name} cut at {k} of {len(frame)} bytes"
    n = len(frame) + 1
    assert gc(dp, "malformed") == len(frame) == pc(dp, UPLINK, "drop_malformed")
    assert gc(dp, "packets") == n == pc(dp, UPLINK, "rx_packets")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_parser_never_reads_past_the_length(dp_impl, name):
    """A truncated frame followed in buf by the rest of the real packet (which would make
    it look whole) behaves exactly like the same frame followed by zeros."""
    frame = bytes(TEMPLATES[name])
    dp_rest, dp_zeros = make_topo(dp_impl), make_topo(dp_impl)
    for k in range(len(frame)):
        outs = []
        for d, tail in ((dp_rest, frame[k:]), (dp_zeros, bytes(len(frame) - k))):
            buf = np.frombuffer(frame[:k] + tail + b"\0", dtype=np.uint8).copy()
            o = np.array([0], np.uint32)
            out = np.zeros(1, np.int32)
            d.process(buf, o, np.array([k], np.uint32), np.array([UPLINK], np.uint16), out, 1, 1)
            outs.append((int(out[0]), buf[:k].tobytes()))
        assert outs[0] == outs[1], f"{name} cut at {k}"
    assert dp_rest.global_counters().tolist() == dp_zeros.global_counters().tolist()


def _fix_ipv4_total(frame, total, l3=14):
    b = bytearray(frame)
    b[l3 + 2:l3 + 4] = total.to_bytes(2, "big")
    return bytes(b)


def _fix_ipv6_payload(frame, plen, l3=14):
    b = bytearray(frame)
    b[l3 + 4:l3 + 6] = plen.to_bytes(2, "big")
    return bytes(b)


@pytest.mark.parametrize("name,l4_hdr", [("ipv4-tcp", 20), ("ipv4-options-tcp", 28),
                                         ("ipv4-udp", 9), ("ipv4-icmp", 4)])
def test_ipv4_with_consistent_lengths_is_malformed_exactly_when_l4_is_short(dp, name, l4_hdr):
    """IP total length fixed to each cut: only the L4 rule decides. l4_hdr: the bytes the
    L4 header needs (TCP: data offset*4; UDP: its length field, 8 + 1 byte of payload)."""
    frame = bytes(TEMPLATES[name])
    ihl = (frame[14] & 15) * 4
    for k in range(14 + ihl, len(frame) + 1):
        cut = _fix_ipv4_total(frame[:k], k - 14)
        assert is_malformed(dp, cut) == (k - 14 - ihl < l4_hdr), f"{name} cut at {k}"


@pytest.mark.parametrize("name,l4_at,l4_hdr", [("ipv6-tcp", 54, 20), ("ipv6-udp", 54, 9),
                                               ("ipv6-icmpv6", 54, 4)])
def test_ipv6_with_consistent_lengths_is_malformed_exactly_when_l4_is_short(dp, name, l4_at, l4_hdr):
    frame = bytes(TEMPLATES[name])
    for k in range(54, len(frame) + 1):
        cut = _fix_ipv6_payload(frame[:k], k - 54)
        assert is_malformed(dp, cut) == (k - l4_at < l4_hdr), f"{name} cut at {k}"


def test_ipv6_extension_headers_truncated_with_consistent_length_are_malformed(dp):
    frame = bytes(TEMPLATES["ipv6-ext-tcp"])
    # HBH 8, routing 8, dest opts 8, AH (4+2)*4 = 24, then TCP 20
    assert len(frame) == 54 + 8 + 8 + 8 + 24 + 20
    for k in range(54, len(frame) + 1):
        cut = _fix_ipv6_payload(frame[:k], k - 54)
        assert is_malformed(dp, cut) == (k < len(frame)), f"cut at {k}"
    assert translated(dp, frame)


def test_bytes_beyond_the_ip_length_are_padding(dp):
    for name in ("ipv4-tcp", "ipv6-tcp", "arp", "ipv4-udp"):
        frame = bytes(TEMPLATES[name]) + b"\xaa" * 30
        assert not is_malformed(dp, frame), name
    assert translated(dp, bytes(TEMPLATES["ipv4-tcp"]) + b"\xaa" * 30)
    assert translated(dp, bytes(TEMPLATES["ipv6-tcp"]) + b"\xaa" * 30)


def _mutate(frame, at, value):
    b = bytearray(frame)
    b[at] = value
    return bytes(b)


@pytest.mark.parametrize("why,frame", [
    ("ipv4 version 5", _mutate(bytes(TEMPLATES["ipv4-tcp"]), 14, 0x55)),
    ("ipv4 ihl 4", _mutate(bytes(TEMPLATES["ipv4-tcp"]), 14, 0x44)),
    ("ipv4 total < ihl*4", _fix_ipv4_total(bytes(TEMPLATES["ipv4-tcp"]), 19)),
    ("ipv4 ihl*4 > total", _mutate(bytes(TEMPLATES["ipv4-udp"]), 14, 0x4F)),
    ("ipv4 total > available", _fix_ipv4_total(bytes(TEMPLATES["ipv4-tcp"]), 200)),
    ("ipv6 version 4", _mutate(bytes(TEMPLATES["ipv6-tcp"]), 14, 0x40)),
    ("ipv6 payload > available", _fix_ipv6_payload(bytes(TEMPLATES["ipv6-tcp"]), 21)),
    ("arp htype 6", _mutate(bytes(TEMPLATES["arp"]), 15, 6)),
    ("arp ptype 0x86dd", _mutate(_mutate(bytes(TEMPLATES["arp"]), 16, 0x86), 17, 0xDD)),
    ("arp hlen 8", _mutate(bytes(TEMPLATES["arp"]), 18, 8)),
    ("arp plen 16", _mutate(bytes(TEMPLATES["arp"]), 19, 16)),
    ("tcp data offset 4", _mutate(bytes(TEMPLATES["ipv4-tcp"]), 34 + 12, 0x40)),
    ("tcp data offset 15 > available", _mutate(bytes(TEMPLATES["ipv4-tcp"]), 34 + 12, 0xF0)),
    ("udp length 7", _mutate(bytes(TEMPLATES["ipv4-udp"]), 34 + 5, 7)),
    ("udp length > available", _mutate(bytes(TEMPLATES["ipv4-udp"]), 34 + 5, 10)),
    ("ipv6 udp length 0", _mutate(bytes(TEMPLATES["ipv6-udp"]), 54 + 5, 0)),
    ("vlan tag cut", bytes(Ether(src=SRC, dst=DST, type=0x8100))[:14] + b"\x00\x2a\x08"),
])
def test_inconsistent_headers_are_malformed(dp, why, frame):
    assert is_malformed(dp, frame), why
    assert pc(dp, UPLINK, "drop_malformed") == 1


@pytest.mark.parametrize("why,frame", [
    ("udp length shorter than available", _mutate(bytes(TEMPLATES["ipv4-udp"]) + b"", 34 + 5, 8)),
    ("other ethertype, header only", bytes(Ether(src=SRC, dst=DST, type=0x88CC))),
    ("802.3 length field", bytes(Ether(src=SRC, dst=DST, type=46)) + bytes(46)),
    ("double tag: inner 0x8100 is L2 only", bytes(Ether(src=SRC, dst=DST) / Dot1Q(vlan=1, type=0x8100))),
    ("ipv4 unknown protocol with 0 bytes", bytes(Ether(src=SRC, dst=DST) / IP(src=CLIENT4, dst=NODE4, proto=47))),
    ("ipv6 no next header", bytes(Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6, nh=59))),
    ("ipv4 non-first fragment with 2 bytes", bytes(Ether(src=SRC, dst=DST)
                                                   / IP(src=CLIENT4, dst=NODE4, proto=6, frag=100) / b"xy")),
    ("ipv6 non-first fragment with 2 bytes", bytes(Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6)
                                                   / IPv6ExtHdrFragment(nh=6, offset=10) / b"xy")),
])
def test_frames_understood_only_in_part_are_not_malformed(dp, why, frame):
    assert not is_malformed(dp, frame), why


def test_tcp_in_an_ipv4_non_first_fragment_has_no_l4(dp):
    frame = bytes(Ether(src=SRC, dst=DST) / IP(src=CLIENT4, dst=NODE4, frag=185)
                  / TCP(sport=1000, dport=8080))
    assert not translated(dp, frame)
    assert len(dp.conntrack()) == 0


def test_ipv4_first_fragment_carries_l4_and_is_natted(dp):
    """D39 (the fragment rows are in test_nat_fragments.py): a first fragment is tracked
    like an unfragmented packet."""
    frame = bytes(Ether(src=SRC, dst=DST) / IP(src=CLIENT4, dst=NODE4, flags="MF")
                  / TCP(sport=1000, dport=8080))
    assert translated(dp, frame)
    assert len(dp.conntrack()) == 1
    # its L4 is still checked: a truncated TCP header in a first fragment is malformed
    short = _fix_ipv4_total(frame[:34 + 10], 30)
    assert is_malformed(dp, short)


def test_ipv6_fragment_header_offset_zero_checks_l4_and_is_natted(dp):
    frame = bytes(TEMPLATES["ipv6-frag-tcp"])
    assert translated(dp, frame) and len(dp.conntrack()) == 1
    atomic = bytes(Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6) / IPv6ExtHdrFragment(m=0)
                   / TCP(sport=1001, dport=8080))
    assert translated(dp, atomic) and len(dp.conntrack()) == 2
    short = _fix_ipv6_payload(frame[:54 + 8 + 12], 20)
    assert is_malformed(dp, short)
    truncated_frag_header = _fix_ipv6_payload(frame[:54 + 6], 6)
    assert is_malformed(dp, truncated_frag_header)


@pytest.mark.parametrize("family", [4, 6])
def test_every_fragment_of_a_udp_datagram_bigger_than_the_mtu_is_switched(dp, family):
    """D38: a first fragment's UDP length counts the whole datagram (3008 bytes here, in
    a 1500-byte packet): not malformed. A UDP length below 8 still is."""
    from scapy.layers.inet import fragment
    from scapy.layers.inet6 import fragment6
    if family == 4:
        frags = fragment(IP(src=CLIENT4, dst=A4) / UDP(sport=1, dport=2) / (b"x" * 3000), fragsize=1480)
    else:
        frags = fragment6(IPv6(src=CLIENT6, dst=NODE6) / IPv6ExtHdrFragment() / UDP(sport=1, dport=2)
                          / (b"x" * 3000), 1500)
    frames = [bytes(Ether(src=SRC, dst=DST) / f) for f in frags]
    assert len(frames) == 3 and UDP in Ether(frames[0]) and Ether(frames[0])[UDP].len == 3008
    for f in frames:
        out, rewritten = send1(dp, f, UPLINK, 1)
        assert out == C.OUT_FLOOD_UNKNOWN and rewritten == f      # DST is unknown: host and uplink
    assert gc(dp, "malformed") == 0
    at = 14 + (20 if family == 4 else 48) + 4         # the UDP length field of the first fragment
    assert is_malformed(dp, frames[0][:at] + b"\x00\x07" + frames[0][at + 2:])


def _ext_chain(n, last_nh=6):
    """IPv6 with n destination-option headers, then TCP to hostPort 8080."""
    layers = IPv6(src=CLIENT6, dst=NODE6)
    for _ in range(n):
        layers = layers / IPv6ExtHdrDestOpt()
    return Ether(src=SRC, dst=DST) / layers / TCP(sport=1000 + n, dport=8080)


def test_at_most_eight_extension_headers_are_skipped(dp):
    assert translated(dp, bytes(_ext_chain(8)))
    nine = bytes(_ext_chain(9))
    assert not is_malformed(dp, nine)
    assert not translated(dp, nine)


def test_a_truncated_ninth_extension_header_is_not_examined(dp):
    # 8 good dest-opt headers, then a 9th (hop-by-hop, nh 0) claiming 255*8 bytes
    frame = bytes(Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6)
                  / (IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                     / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                     / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt(nh=0))
                  / (b"\x06\xff" + bytes(6)))
    assert not is_malformed(dp, frame)
    # the same claim as the 8th header is examined, and is malformed
    frame7 = bytes(Ether(src=SRC, dst=DST) / IPv6(src=CLIENT6, dst=NODE6)
                   / (IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt()
                      / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt(nh=0))
                   / (b"\x06\xff" + bytes(6)))
    assert is_malformed(dp, frame7)


def test_ah_length_is_in_four_byte_units(dp):
    # AH payloadlen=4: (4+2)*4 = 24 bytes; TCP after it is found
    assert translated(dp, bytes(TEMPLATES["ipv6-ext-tcp"]))


def test_tagged_frames_are_parsed_after_the_tag_and_keep_it(dp):
    frame = bytes(TEMPLATES["vlan-ipv4-tcp"])
    out, rewritten = send1(dp, frame, UPLINK, 1)
    assert gc(dp, "nat_translated") == 1
    pkt = Ether(rewritten)
    assert pkt[Dot1Q].vlan == 42 and pkt[IP].dst == A4 and pkt[TCP].dport == 80
    fdb = dp.fdb()
    assert [int(v) for v in fdb["vlan"][fdb["static"] == 0]] == [42]      # learned on its VLAN


def test_short_frames_of_every_length_below_14_are_malformed(dp):
    frames = [bytes(range(k)) for k in range(14)]
    b = Batch(frames, [UPLINK] * 14)
    assert b.run(dp, 5) == [C.OUT_DROP] * 14
    g = gcounters(dp)
    assert g["malformed"] == 14 and g["packets"] == 14 and g["bytes"] == sum(range(14))


def test_random_mutations_never_crash_and_every_frame_is_accounted(dp_impl):
    """Seeded byte mutations and cuts of every template: every output is valid, every
    frame counted once, and drops are exactly the malformed ones (nothing else can drop
    here: no shaper, no loop since every source MAC is unicast C... or mutated)."""
    rng = random.Random(1234)
    dp = make_topo(dp_impl)
    names = sorted(TEMPLATES)
    frames = []
    for i in range(700):
        f = bytearray(bytes(TEMPLATES[names[i % len(names)]]))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(min(len(f), 80))
            f[at] = rng.randrange(256) if rng.random() < 0.7 else f[at] ^ (1 << rng.randrange(8))
        if rng.random() < 0.3:
            f = f[:rng.randrange(len(f) + 1)]
        frames.append(bytes(f))
    b = Batch(frames, [UPLINK] * len(frames))
    outs = b.run(dp, 10)
    valid = set(range(dp.port_counters().shape[0])) | {C.OUT_FLOOD, C.OUT_FLOOD_UNKNOWN, C.OUT_DROP}
    assert set(outs) <= valid
    g = gcounters(dp)
    assert g["packets"] == len(frames) and g["bytes"] == sum(map(len, frames))
    drops = sum(g[r] for r in C.DROP_REASONS)
    assert outs.count(C.OUT_DROP) == drops
    assert g["malformed"] > 50
