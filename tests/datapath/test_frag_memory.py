"""The fragment memory of hostPort datagrams (docs/datapath.md "Fragments", D39), as
specified, on both implementations: it holds 256 unexpired datagrams, forgets the one
remembered earliest when a 257th comes, refreshes a datagram remembered again, and never
translates a forgotten datagram's fragments with another's translation.

The expected frames are scapy's fragments of the datagram as it must leave (see
test_nat_fragments.py); a forgotten datagram's later fragment must leave byte for byte
as it came.
"""
from dp_helpers import A4, CLIENT4, GW_MAC, MAC_A, NODE4, NODE_MAC, POD_A, ROUTER_MAC, UPLINK, send1

from test_nat import dp  # noqa: F401  (the topology fixture)
from test_nat_fragments import frames

SLOTS = 256                      # docs/datapath.md: at most 256 datagrams are remembered


def _datagram(i):
    """(sent, expected) fragments of datagram i to the node's hostPort 5353 (-> pod A:53)."""
    ident = 0x100 + i
    return (frames(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 40000, 5353, 4, ident=ident),
            frames(GW_MAC, MAC_A, CLIENT4, A4, 40000, 53, 4, ident=ident))


def test_256_datagrams_are_all_remembered_and_a_257th_forgets_the_earliest(dp):
    grams = [_datagram(i) for i in range(SLOTS + 1)]
    now = 10
    for sent, want in grams[:SLOTS]:
        assert send1(dp, sent[0], UPLINK, now) == (POD_A, want[0])
        now += 1
    for i, (sent, want) in enumerate(grams[:SLOTS]):      # none forgotten under the bound
        assert send1(dp, sent[1], UPLINK, now) == (POD_A, want[1]), i
        now += 1
    sent, want = grams[SLOTS]
    assert send1(dp, sent[0], UPLINK, now) == (POD_A, want[0])
    assert send1(dp, grams[0][0][2], UPLINK, now + 1)[1] == grams[0][0][2]      # forgotten: untouched
    for i in (1, SLOTS - 1, SLOTS):
        sent, want = grams[i]
        assert send1(dp, sent[2], UPLINK, now + 2) == (POD_A, want[2]), i


def test_a_datagram_remembered_again_becomes_the_newest(dp):
    grams = [_datagram(i) for i in range(SLOTS + 1)]
    for i, (sent, _) in enumerate(grams[:SLOTS]):
        send1(dp, sent[0], UPLINK, 10 + i)
    send1(dp, grams[0][0][0], UPLINK, 300)               # datagram 0's first fragment again
    send1(dp, grams[SLOTS][0][0], UPLINK, 301)           # the 257th: datagram 1 goes, not 0
    assert send1(dp, grams[0][0][1], UPLINK, 302) == (POD_A, grams[0][1][1])
    assert send1(dp, grams[1][0][1], UPLINK, 303)[1] == grams[1][0][1]


def test_expired_datagrams_make_room_without_forgetting_live_ones(dp):
    timeout_ns = 30 * 10**9                               # Linux's ipfrag_time
    grams = [_datagram(i) for i in range(SLOTS + 1)]
    for i, (sent, _) in enumerate(grams[:SLOTS - 1]):
        send1(dp, sent[0], UPLINK, 10 + i)               # expire at 10 + i + 30 s
    late = 10 + timeout_ns
    send1(dp, grams[SLOTS - 1][0][0], UPLINK, late)       # live: 255 expired, this one
    send1(dp, grams[SLOTS][0][0], UPLINK, late + 1)       # 0 expired (the rest soon)
    for i in (SLOTS - 1, SLOTS):
        sent, want = grams[i]
        assert send1(dp, sent[1], UPLINK, late + 2) == (POD_A, want[1]), i
    assert send1(dp, grams[0][0][1], UPLINK, late + 3)[1] == grams[0][0][1]    # expired: untouched
