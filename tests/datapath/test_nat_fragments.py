"""hostPort NAT of IP fragments (twin's D39): a datagram bigger than the MTU crosses the
switch as fragments; the first is tracked like any packet and its translation carries the
later ones, without reassembly (Linux conntrack reassembles, then NATs).

Expected frames are scapy's fragments of the datagram as it must come out (built whole,
every checksum computed by scapy, then fragmented with the same identification), so the
first fragment's L4 checksum, which covers the whole datagram, is checked byte for byte.
"""
import pytest
from scapy.layers.inet import IP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6

from dp_helpers import (
    A4, A6, CLIENT4, CLIENT6, GW_MAC, MAC_A, NODE4, NODE6, NODE_MAC, POD_A, ROUTER_MAC, UPLINK,
    eth, gc, send1,
)

from test_nat import dp  # noqa: F401  (the topology fixture)

FAM = {4: dict(client=CLIENT4, node=NODE4, a=A4), 6: dict(client=CLIENT6, node=NODE6, a=A6)}
PAYLOAD = bytes(range(256)) * 12                      # 3072 bytes: three fragments


def frames(smac, dmac, src, dst, sport, dport, family, ident=0x1234):
    """The Ethernet frames of one UDP datagram cut to a 1500-byte MTU."""
    if family == 4:
        whole = IP(src=src, dst=dst, id=ident) / UDP(sport=sport, dport=dport) / PAYLOAD
        parts = fragment(IP(bytes(whole)), fragsize=1480)
    else:
        whole = IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=ident) / UDP(sport=sport, dport=dport) / PAYLOAD
        parts = fragment6(IPv6(bytes(whole)), 1500)
    return [bytes(eth(smac, dmac) / p) for p in parts]


@pytest.mark.parametrize("family", [4, 6])
def test_a_fragmented_datagram_to_a_hostport_and_its_fragmented_answer(dp, family):
    f = FAM[family]
    sent = frames(ROUTER_MAC, NODE_MAC, f["client"], f["node"], 40000, 5353, family)
    want = frames(GW_MAC, MAC_A, f["client"], f["a"], 40000, 53, family)
    assert len(sent) == 3
    for i, (frame, expected) in enumerate(zip(sent, want)):
        out, got = send1(dp, frame, UPLINK, 10 + i)
        assert out == POD_A and got == expected, i
    answer = frames(MAC_A, GW_MAC, f["a"], f["client"], 53, 40000, family, ident=0x777)
    want = frames(NODE_MAC, ROUTER_MAC, f["node"], f["client"], 5353, 40000, family, ident=0x777)
    for i, (frame, expected) in enumerate(zip(answer, want)):
        out, got = send1(dp, frame, POD_A, 20 + i)
        assert out == UPLINK and got == expected, i
    assert gc(dp, "nat_translated") == 6 and gc(dp, "ct_created") == 1
    assert int(dp.conntrack()[0]["packets"]) == 2          # the first fragments only


def test_a_later_fragment_is_translated_only_after_its_first(dp):
    sent = frames(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 40000, 5353, 4)
    want = frames(GW_MAC, MAC_A, CLIENT4, A4, 40000, 53, 4)
    out, got = send1(dp, sent[2], UPLINK, 10)                # ahead of its first fragment
    assert got == sent[2] and out != POD_A
    for i in (0, 1, 2):
        assert send1(dp, sent[i], UPLINK, 11 + i) == (POD_A, want[i])


def test_other_datagrams_and_old_ones_are_not_translated(dp):
    sent = frames(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 40000, 5353, 4)
    send1(dp, sent[0], UPLINK, 10)
    other = frames(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 40000, 5353, 4, ident=0x1235)
    assert send1(dp, other[1], UPLINK, 11)[1] == other[1]   # another identification
    # remembered for 30 s (docs/datapath.md, Linux's ipfrag_time), from the first fragment
    frag_timeout_ns = 30 * 10**9
    want = frames(GW_MAC, MAC_A, CLIENT4, A4, 40000, 53, 4)
    assert send1(dp, sent[1], UPLINK, 10 + frag_timeout_ns - 1) == (POD_A, want[1])  # known
    assert send1(dp, sent[2], UPLINK, 10 + frag_timeout_ns)[1] == sent[2]       # forgotten


def test_a_fragment_of_an_untracked_datagram_is_switched_untouched(dp):
    """A datagram to no hostPort: its first fragment creates nothing, the rest pass."""
    sent = frames(ROUTER_MAC, MAC_A, CLIENT4, A4, 40000, 9999, 4)
    for i, frame in enumerate(sent):
        assert send1(dp, frame, UPLINK, 10 + i)[1] == frame
    assert gc(dp, "nat_translated") == 0 and len(dp.conntrack()) == 0


def test_trace_shows_a_translated_fragment(dp):
    sent = frames(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 40000, 5353, 4)
    send1(dp, sent[0], UPLINK, 10)
    stages = dp.trace(sent[1], UPLINK, 11)
    assert [s for s, _ in stages if s == "nat"] == ["nat"] and stages[-1] == ("output", f"port {POD_A}")
