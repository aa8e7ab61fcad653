"""Stages 3 and 6: token buckets with queues, on a virtual clock.

The central property (issue 2): for rate R and burst B, the bytes released by time t
never exceed B + R*t, and under backlog (a caller that drains at next_departure_ns())
they fall short of it by less than one packet. All arithmetic is exact integers.
"""
import random

import numpy as np
import pytest
from scapy.layers.l2 import Ether

from dp_helpers import BCAST, Batch, drain, gc, mac_str, pc, pcounters, send, send1
from vswitch.datapath import consts as C

SEC = 10**9
HOST, A, B, D = 0, 2, 3, 5
MAC_A, MAC_B, MAC_H = bytes.fromhex("0200000000a1"), bytes.fromhex("0200000000b1"), bytes.fromhex("020000000001")


def frame(src, dst, size, tag=0):
    b = bytes(Ether(src=mac_str(src), dst=mac_str(dst), type=0x88B5)) + tag.to_bytes(4, "big")
    return b + bytes(size - len(b))


def make(impl, **kw):
    dp = impl.Datapath(max_ports=8, **kw)
    dp.add_port(HOST, C.PORT_HOST)
    for p in (A, B, D):
        dp.add_port(p, C.PORT_POD)
    return dp


def learn(dp, now_ns=0, vnet_hdr_len=0):
    """Teach the switch where MAC_A, MAC_B and MAC_H are."""
    send(dp, [frame(MAC_A, BCAST, 60), frame(MAC_B, BCAST, 60), frame(MAC_H, BCAST, 60)], [A, B, HOST], now_ns,
         vnet_hdr_len=vnet_hdr_len)


@pytest.fixture
def dp(dp_impl):
    return make(dp_impl)


def offer(dp, direction, sizes, now_ns, tag0=0):
    """Frames of the given sizes through the shaper of `direction` on pod A; returns the
    bytes that passed at once."""
    if direction == C.EGRESS:
        frames, port = [frame(MAC_A, MAC_H, s, tag0 + i) for i, s in enumerate(sizes)], A
    else:
        frames, port = [frame(MAC_H, MAC_A, s, tag0 + i) for i, s in enumerate(sizes)], HOST
    outs, _ = send(dp, frames, [port] * len(frames), now_ns)
    assert C.OUT_DROP not in outs
    return sum(s for s, o in zip(sizes, outs) if o != C.OUT_QUEUED)


@pytest.mark.parametrize("direction", [C.EGRESS, C.INGRESS])
@pytest.mark.parametrize("rate_bps,burst_bits,lo,hi", [
    (10_000_000, 20_000, 64, 1500),          # burst above every packet
    (1_000_000, 12_000, 64, 9000),           # oversized packets (cost > burst) among small ones
    (3_333_333, 0, 60, 700),                 # no burst at all: every packet is "oversized"
    (10**12, 8 * 65553, 60, 65553),          # huge rate, maximal frames
])
def test_released_bytes_stay_within_one_packet_of_burst_plus_rate_times_t(dp_impl, direction, rate_bps,
                                                                          burst_bits, lo, hi):
    rng = random.Random(rate_bps ^ burst_bits ^ direction)
    dp = make(dp_impl)
    learn(dp)
    dp.set_shaper(A, direction, rate_bps, burst_bits, queue_bytes=10**8)
    t0 = 1000
    sizes = [rng.randint(lo, hi) for _ in range(120)]
    released = offer(dp, direction, sizes, t0)
    assert released * 8 <= burst_bits
    biggest = max(sizes)
    extra, offered = 0, sum(sizes)
    while True:
        t = dp.next_departure_ns()
        if t == -1:
            break
        assert t >= t0
        assert t == t0 or drain(dp, t - 1) == []           # nothing is due before it
        got = drain(dp, t)
        assert got, f"next_departure_ns {t} released nothing"
        released += sum(len(f) for _, _, f, _ in got)
        budget = burst_bits * SEC + rate_bps * (t - t0)          # bit*ns
        assert released * 8 * SEC <= budget, "released more than burst + rate*t"
        state = dp.shaper_state(A, direction)
        if state["queue_packets"]:
            assert budget - released * 8 * SEC < biggest * 8 * SEC, "fell short by a packet or more"
        # more arrivals while backlogged, half way to the next departure
        nxt = dp.next_departure_ns()
        if state["queue_packets"] and extra < 40 and nxt > t + 1:
            more = [rng.randint(lo, hi) for _ in range(2)]
            biggest, offered = max(biggest, *more), offered + sum(more)
            assert offer(dp, direction, more, (t + nxt) // 2, tag0=1000 + extra) == 0
            extra += 2
    assert released == offered and extra > 0
    assert pcounters(dp, A)["drop_queue_full"] == 0


@pytest.mark.parametrize("direction", [C.EGRESS, C.INGRESS])
def test_late_or_early_drains_never_exceed_the_budget(dp_impl, direction):
    rng = random.Random(7)
    dp = make(dp_impl)
    learn(dp)
    rate, burst = 2_000_000, 30_000
    dp.set_shaper(A, direction, rate, burst, queue_bytes=10**7)
    t0 = 5
    released = offer(dp, direction, [rng.randint(60, 3000) for _ in range(200)], t0)
    t = t0
    for _ in range(300):
        t += rng.randint(0, 20_000_000)
        got = drain(dp, t, max_pkts=rng.choice([1, 2, 1000]))
        released += sum(len(f) for _, _, f, _ in got)
        assert released * 8 * SEC <= burst * SEC + rate * (t - t0)


def test_an_oversized_packet_leaves_after_its_extra_time(dp):
    learn(dp)
    dp.set_shaper(A, C.EGRESS, 1_000_000, 1000)          # 1 Mbit/s, burst 1000 bits
    t0 = 10**6
    out, _ = send1(dp, frame(MAC_A, MAC_H, 9000), A, t0)
    assert out == C.OUT_QUEUED
    # (9000*8 - 1000) bits at 1 Mbit/s = 71 ms after the (full) bucket was first touched
    assert dp.next_departure_ns() == t0 + 71_000_000
    assert drain(dp, t0 + 70_999_999) == []
    got = drain(dp, t0 + 71_000_000)
    assert [(i, o, len(f)) for i, o, f, _ in got] == [(A, HOST, 9000)]
    assert dp.next_departure_ns() == -1
    assert dp.shaper_state(A, C.EGRESS)["credit"] == 0


def test_a_packet_larger_than_the_whole_queue_is_dropped_not_stalled(dp):
    dp.set_shaper(A, C.EGRESS, 1000, 0, queue_bytes=100)
    assert send1(dp, frame(MAC_A, MAC_H, 200), A, 0)[0] == C.OUT_DROP
    assert gc(dp, "queue_full") == 1 and dp.next_departure_ns() == -1


@pytest.mark.parametrize("burst_bits", [2**32 - 1, 2**32 * 8, 2**35, 2**40, 2**63 - 1])
def test_huge_bursts_are_exact(dp, burst_bits):
    """containerd sends 4294967295 bits, CRI-O about 2**35; 2**35 * 10**9 bit*ns is past 2**64."""
    learn(dp)
    dp.set_shaper(A, C.EGRESS, 10**9, burst_bits)
    state = dp.shaper_state(A, C.EGRESS)
    assert state["credit"] == burst_bits * SEC
    assert state["queue_limit_bytes"] == max(131106, 10**9 // 320, min(burst_bits // 8, 16777216))
    sizes = [65553, 60, 1500]
    outs, _ = send(dp, [frame(MAC_A, MAC_H, s) for s in sizes], [A] * 3, 10)
    assert outs == [HOST] * 3
    assert dp.shaper_state(A, C.EGRESS)["credit"] == burst_bits * SEC - sum(sizes) * 8 * SEC
    # an hour later the bucket is full again, exactly
    send1(dp, frame(MAC_A, MAC_H, 60), A, 10 + 3600 * SEC)
    assert dp.shaper_state(A, C.EGRESS)["credit"] == burst_bits * SEC - 60 * 8 * SEC


def test_2_to_the_32_bytes_pass_at_once_with_a_2_to_the_35_bit_burst(dp_impl):
    """Sent as 65536 maximal frames: all pass at once, the next one waits."""
    dp = make(dp_impl)
    learn(dp)
    burst_bits = 2**35
    dp.set_shaper(A, C.EGRESS, 1000, burst_bits)
    size = 65536
    f = frame(MAC_A, MAC_H, size - 4) + b"abcd"
    # one buffer, every entry pointing at the same frame: no NAT, so nothing is rewritten
    n = 2**32 // size
    buf = np.frombuffer(f, dtype=np.uint8).copy()
    offsets = np.zeros(n + 1, np.uint32)
    lengths = np.full(n + 1, size, np.uint32)
    lengths[-1] = 60
    in_ports = np.full(n + 1, A, np.uint16)
    out_ports = np.zeros(n + 1, np.int32)
    if getattr(dp_impl, "__name__", "").endswith(".pure"):
        pytest.skip("65537 maximal frames through the pure-Python twin take too long; the credit "
                    "arithmetic is covered by test_huge_bursts_are_exact")
    dp.process(buf, offsets, lengths, in_ports, out_ports, n + 1, 5)
    assert (out_ports[:n] == HOST).all() and out_ports[n] == C.OUT_QUEUED
    assert dp.shaper_state(A, C.EGRESS)["credit"] == 0


def test_huge_rate_and_long_idle_do_not_overflow(dp):
    learn(dp)
    top = 2**63 - 1
    dp.set_shaper(A, C.INGRESS, top, top)
    state = dp.shaper_state(A, C.INGRESS)
    assert state["queue_limit_bytes"] == top // 320
    assert send1(dp, frame(MAC_H, MAC_A, 65553), HOST, 1)[0] == A
    # A's entry has aged: A announces itself again (its own broadcast does not pass its
    # ingress shaper; the others' broadcasts would, D41)
    send1(dp, frame(MAC_A, BCAST, 60), A, 2**62)
    assert send1(dp, frame(MAC_H, MAC_A, 60), HOST, 2**62)[0] == A
    assert dp.shaper_state(A, C.INGRESS)["credit"] == top * SEC - 60 * 8 * SEC


@pytest.mark.parametrize("direction", [C.EGRESS, C.INGRESS])
def test_queue_full_drops_are_counted_on_the_shaper_port(dp, direction):
    learn(dp)
    dp.set_shaper(A, direction, 8000, 0, queue_bytes=3000)
    sizes = [1000, 1000, 1000, 1000, 500]
    if direction == C.EGRESS:
        outs, _ = send(dp, [frame(MAC_A, MAC_H, s) for s in sizes], [A] * 5, 0)
    else:
        outs, _ = send(dp, [frame(MAC_H, MAC_A, s) for s in sizes], [HOST] * 5, 0)
    assert outs == [C.OUT_QUEUED] * 3 + [C.OUT_DROP] * 2
    assert pc(dp, A, "drop_queue_full") == 2 and pc(dp, A, "queued") == 3
    assert gc(dp, "queue_full") == 2 and gc(dp, "queued") == 3
    s = dp.shaper_state(A, direction)
    assert (s["queue_bytes"], s["queue_packets"], s["queue_limit_bytes"]) == (3000, 3, 3000)
    if direction == C.INGRESS:
        assert pc(dp, HOST, "drop_queue_full") == 0


def test_flooded_frames_pass_the_ingress_shaper_and_unknown_unicast_never_reaches_a_pod(dp):
    """D41 (issue 11.2; this test asserted the opposite before): a broadcast's copy for a
    shaped pod is queued in its ingress shaper, unknown unicast is not written to a pod at
    all, and a known unicast frame queues behind the flood copy (FIFO)."""
    learn(dp)
    dp.set_shaper(A, C.INGRESS, 1, 0)
    tx_a, tx_b = pc(dp, A, "tx_packets"), pc(dp, B, "tx_packets")      # the learning broadcasts
    assert send1(dp, frame(MAC_H, BCAST, 1000), HOST, 1)[0] == C.OUT_FLOOD
    assert dp.shaper_state(A, C.INGRESS)["queue_packets"] == 1
    assert pc(dp, A, "tx_packets") == tx_a and pc(dp, A, "queued") == 1
    assert pc(dp, B, "tx_packets") == tx_b + 1           # an unshaped pod gets its copy at once
    assert send1(dp, frame(MAC_H, bytes.fromhex("020000000099"), 1000), HOST, 1)[0] == C.OUT_FLOOD_UNKNOWN
    assert dp.shaper_state(A, C.INGRESS)["queue_packets"] == 1
    assert pc(dp, B, "tx_packets") == tx_b + 1
    assert send1(dp, frame(MAC_H, MAC_A, 1000), HOST, 1)[0] == C.OUT_QUEUED
    assert dp.shaper_state(A, C.INGRESS)["queue_packets"] == 2


def test_egress_shaping_applies_to_every_frame_of_the_port(dp):
    learn(dp)
    dp.set_shaper(A, C.EGRESS, 1, 0)
    assert send1(dp, frame(MAC_A, BCAST, 60), A, 1)[0] == C.OUT_QUEUED


def test_a_new_shaper_starts_full_and_its_clock_starts_at_the_first_packet(dp):
    learn(dp)
    dp.set_shaper(A, C.EGRESS, 8000, 8000)              # 1000 bytes/s, burst 1000 bytes
    # a long time after set_shaper: still only the burst (no refill before the first packet)
    outs, _ = send(dp, [frame(MAC_A, MAC_H, 500)] * 3, [A] * 3, 50 * SEC)
    assert outs == [HOST, HOST, C.OUT_QUEUED]
    assert dp.next_departure_ns() == 50 * SEC + SEC // 2


def test_drain_orders_by_departure_then_port_then_direction(dp):
    learn(dp)
    # every shaper: 8000 bit/s, no burst: a 100-byte frame departs 100 ms after the first touch
    for port, direction in ((A, C.EGRESS), (A, C.INGRESS), (B, C.EGRESS), (HOST, C.EGRESS)):
        dp.set_shaper(port, direction, 8000, 0)
    # B egress at t=0, A egress at t=0, host egress (towards A, not shaped at ingress since A's
    # ingress is busy... it will be) at t=0, A ingress at t=0 via a frame from D
    frames = [frame(MAC_B, MAC_H, 100, 1), frame(MAC_A, MAC_H, 100, 2), frame(MAC_H, MAC_B, 100, 3)]
    outs, _ = send(dp, frames, [B, A, HOST], 0)
    assert outs == [C.OUT_QUEUED] * 3
    assert send1(dp, frame(bytes.fromhex("0200000000d1"), MAC_A, 100, 4), D, 0)[0] == C.OUT_QUEUED
    assert dp.next_departure_ns() == 100_000_000
    got = drain(dp, 100_000_000)
    tags = [int.from_bytes(f[14:18], "big") for _, _, f, _ in got]
    # departure ties: port 0 (host egress), port 2 egress, port 2 ingress, port 3 egress
    assert tags == [3, 2, 4, 1]
    assert [(i, o) for i, o, _, _ in got] == [(HOST, B), (A, HOST), (D, A), (B, HOST)]


def test_drain_orders_oldest_departure_first(dp):
    learn(dp)
    for port in (A, B, D):
        dp.set_shaper(port, C.EGRESS, 8000, 0)       # 1 ms per byte, no burst
    send1(dp, frame(MAC_B, MAC_H, 300, 1), B, 0)      # departs at 300 ms
    send1(dp, frame(MAC_A, MAC_H, 100, 2), A, 0)      # 100 ms
    send1(dp, frame(MAC_A, MAC_H, 150, 3), A, 0)      # 100 + 150 = 250 ms
    mac_d = bytes.fromhex("0200000000d1")
    send1(dp, frame(mac_d, mac_d, 200, 4), D, 0)      # 200 ms (dropped as a loop when it leaves)
    send1(dp, frame(MAC_A, MAC_H, 100, 5), A, 0)      # 350 ms
    got = drain(dp, SEC)
    # a late drain releases each packet at its own departure time, oldest first
    assert [int.from_bytes(f[14:18], "big") for _, _, f, _ in got] == [2, 4, 3, 1, 5]
    assert [o for _, o, _, _ in got] == [HOST, C.OUT_DROP, HOST, HOST, HOST]
    assert dp.next_departure_ns() == -1
    # the next packet of A finds an empty queue: the refill at 1 s is capped at the burst
    # (0 bits), so it waits its full cost
    assert send1(dp, frame(MAC_A, MAC_H, 100, 6), A, SEC)[0] == C.OUT_QUEUED
    assert dp.next_departure_ns() == SEC + 100_000_000


def test_drain_respects_max_pkts_and_the_buffer_size(dp_impl):
    dp = make(dp_impl, vnet_hdr_len=10)
    learn(dp, vnet_hdr_len=10)
    dp.set_shaper(A, C.EGRESS, 8000, 0)
    hdrs = [bytes([0, i]) + bytes(8) for i in range(5)]
    b = Batch([frame(MAC_A, MAC_H, 100, i) for i in range(5)], [A] * 5, vnet_hdr_len=10, vnet_hdrs=hdrs)
    assert b.run(dp, 0) == [C.OUT_QUEUED] * 5
    got = drain(dp, 10 * SEC, max_pkts=2, vnet_hdr_len=10)
    assert [int.from_bytes(f[14:18], "big") for _, _, f, _ in got] == [0, 1]
    assert [h for _, _, _, h in got] == hdrs[:2]                 # the header travels with it
    # room for exactly one more (headroom 64 + header 10 + 100 bytes): the second does not fit and stays
    got = drain(dp, 10 * SEC, buf_bytes=(64 + 10 + 100) + (64 + 10 + 99), vnet_hdr_len=10)
    assert [int.from_bytes(f[14:18], "big") for _, _, f, _ in got] == [2]
    assert dp.shaper_state(A, C.EGRESS)["queue_packets"] == 2
    got = drain(dp, 10 * SEC, vnet_hdr_len=10)
    assert [int.from_bytes(f[14:18], "big") for _, _, f, _ in got] == [3, 4]
    assert [h for _, _, _, h in got] == hdrs[3:]
    assert dp.next_departure_ns() == -1
    assert pc(dp, HOST, "tx_packets") == 5 + 2     # + the floods of learn()


def test_a_packet_requeued_by_the_ingress_shaper_is_not_emitted_in_the_same_drain(dp):
    learn(dp)
    dp.set_shaper(A, C.EGRESS, 8000, 0)        # A -> B: 1 ms per byte
    dp.set_shaper(B, C.INGRESS, 8000, 0)       # to B: 1 ms per byte
    assert send1(dp, frame(MAC_H, MAC_B, 30, 1), HOST, 0)[0] == C.OUT_QUEUED    # B ingress: 30 ms
    assert send1(dp, frame(MAC_A, MAC_B, 20, 2), A, 0)[0] == C.OUT_QUEUED        # A egress: 20 ms
    got = drain(dp, 60_000_000)
    # 20 ms: A's packet leaves its egress queue and joins B's ingress queue behind packet 1;
    # 30 ms: packet 1 leaves; packet 2 is now B's head but joined during this drain
    assert [int.from_bytes(f[14:18], "big") for _, _, f, _ in got] == [1]
    assert dp.shaper_state(B, C.INGRESS)["queue_packets"] == 1
    assert pc(dp, B, "queued") == 2
    assert drain(dp, 60_000_000) == []             # not due: 160 bits after the 60 ms refill
    assert dp.next_departure_ns() == 80_000_000
    got = drain(dp, 80_000_000)
    assert [(i, o, int.from_bytes(f[14:18], "big")) for i, o, f, _ in got] == [(A, B, 2)]


def test_egress_released_packets_continue_at_stage_4_with_the_drain_time(dp):
    learn(dp)
    dp.set_shaper(A, C.EGRESS, 8000, 0)
    send1(dp, frame(MAC_A, MAC_B, 100), A, 0)
    dp.set_port_up(B, False)
    got = drain(dp, SEC)
    assert [(i, o) for i, o, _, _ in got] == [(A, C.OUT_DROP)]
    assert pc(dp, A, "drop_no_route") == 1
    # learning happened at the drain time
    rows = {bytes(r["mac"]): int(r["last_seen_ns"]) for r in dp.fdb()}
    assert rows[MAC_A] == SEC


def test_clear_shaper_drops_the_queue_and_counts_it(dp):
    learn(dp)
    dp.set_shaper(A, C.INGRESS, 8000, 0)
    send(dp, [frame(MAC_H, MAC_A, 100)] * 3, [HOST] * 3, 0)
    dp.clear_shaper(A, C.INGRESS)
    assert dp.shaper_state(A, C.INGRESS) is None
    assert pc(dp, A, "drop_queue_full") == 3 and dp.next_departure_ns() == -1
    dp.clear_shaper(A, C.INGRESS)                    # no shaper: nothing happens
    assert send1(dp, frame(MAC_H, MAC_A, 100), HOST, 1)[0] == A


def test_rate_zero_is_clear_shaper(dp):
    learn(dp)
    dp.set_shaper(A, C.EGRESS, 8000, 0)
    send1(dp, frame(MAC_A, MAC_H, 100), A, 0)
    dp.set_shaper(A, C.EGRESS, 0, 1000)
    assert dp.shaper_state(A, C.EGRESS) is None and pc(dp, A, "drop_queue_full") == 1


def test_set_shaper_again_keeps_queue_and_caps_credit(dp):
    learn(dp)
    dp.set_shaper(A, C.EGRESS, 8000, 80_000)                  # burst 10000 bytes
    send1(dp, frame(MAC_A, MAC_H, 1000), A, 0)
    assert dp.shaper_state(A, C.EGRESS)["credit"] == 72_000 * SEC
    dp.set_shaper(A, C.EGRESS, 16000, 8000, queue_bytes=5000)
    s = dp.shaper_state(A, C.EGRESS)
    assert (s["rate_bps"], s["burst_bits"], s["credit"], s["queue_limit_bytes"]) == (16000, 8000, 8000 * SEC, 5000)
    send(dp, [frame(MAC_A, MAC_H, 1000)] * 3, [A] * 3, 0)      # 1 passes, 2 queue
    dp.set_shaper(A, C.EGRESS, 16000, 0, queue_bytes=1000)     # the queue is over the new limit: kept
    s = dp.shaper_state(A, C.EGRESS)
    assert (s["queue_packets"], s["queue_bytes"], s["credit"]) == (2, 2000, 0)
    assert send1(dp, frame(MAC_A, MAC_H, 60), A, 0)[0] == C.OUT_DROP   # refused until it fits
    assert dp.next_departure_ns() == 500_000_000               # 8000 bits at 16 kbit/s


def test_remove_port_drops_its_queues(dp):
    learn(dp)
    dp.set_shaper(A, C.EGRESS, 8000, 0)
    dp.set_shaper(A, C.INGRESS, 8000, 0)
    send1(dp, frame(MAC_A, MAC_H, 100), A, 0)
    send(dp, [frame(MAC_H, MAC_A, 100)] * 2, [HOST] * 2, 0)
    dp.remove_port(A)
    assert pc(dp, A, "drop_queue_full") == 3 and gc(dp, "queue_full") == 3
    assert dp.next_departure_ns() == -1


@pytest.mark.parametrize("args", [
    (A, 2, 1, 1), (A, C.EGRESS, -1, 1), (A, C.EGRESS, 1, -1), (A, C.EGRESS, 2**63, 1),
    (A, C.EGRESS, 1, 2**63), (A, C.EGRESS, 1, 1, -5), (7, C.EGRESS, 1, 1), (A, C.EGRESS, 1.5, 1),
])
def test_set_shaper_rejects_bad_arguments(dp, args):
    with pytest.raises(ValueError):
        dp.set_shaper(*args)
    assert dp.shaper_state(A, C.EGRESS) is None


def test_next_departure_is_minus_one_when_nothing_waits(dp):
    assert dp.next_departure_ns() == -1
    dp.set_shaper(A, C.EGRESS, 1000, 10**6)
    assert dp.next_departure_ns() == -1


# --------------------------------------------------------------------------- GSO frames (D36)
# An offloaded TCP segment from a TAP becomes ceil(payload / gso_size) frames on a wire,
# each with its own headers; a shaper charges it those bytes, as Linux's
# qdisc_pkt_len_init does, so the rate on the wire is the rate set. Queue bytes and
# counters stay frame bytes.

GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4, GSO_ECN = 1, 3, 4, 5, 0x80
H12 = 12


def vnet_hdr(gso_type=0, gso_size=0, flags=0):
    """struct virtio_net_hdr_mrg_rxbuf (12 bytes, little endian); hdr_len and csum_* are
    deliberately nonsense: the datapath does not read them."""
    import struct
    return struct.pack("<BBHHHHH", flags, gso_type, 7, gso_size, 3, 5, 0)


def tcp_frame(src, dst, payload_bytes, family=4, vlan=None):
    """Ethernet + IPv4/IPv6 + TCP with 12 bytes of options (timestamps): headers of
    14 + 20 + 32 = 66 bytes (IPv4) or 14 + 40 + 32 = 86 (IPv6), plus 4 with a tag."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Dot1Q
    l3 = IP(src="10.0.0.2", dst="10.0.0.9") if family == 4 else IPv6(src="fd00::2", dst="fd00::9")
    eth = Ether(src=mac_str(src), dst=mac_str(dst))
    if vlan is not None:
        eth = eth / Dot1Q(vlan=vlan)
    tcp = TCP(sport=40000, dport=5201, flags="A", options=[("NOP", None), ("NOP", None),
                                                            ("Timestamp", (1, 2))])
    return bytes(eth / l3 / tcp / bytes(payload_bytes))


def udp_frame(src, dst, payload_bytes):
    """Ethernet + IPv4 + UDP: headers of 14 + 20 + 8 = 42 bytes."""
    from scapy.layers.inet import IP, UDP
    return bytes(Ether(src=mac_str(src), dst=mac_str(dst)) / IP(src="10.0.0.2", dst="10.0.0.9")
                 / UDP(sport=4000, dport=4001) / bytes(payload_bytes))


def gso_dp(dp_impl, direction, rate_bps, burst_bits):
    dp = make(dp_impl, vnet_hdr_len=H12)
    learn(dp, vnet_hdr_len=H12)
    from scapy.layers.l2 import Dot1Q       # the same MACs in VLAN 5
    send(dp, [bytes(Ether(src=mac_str(m), dst=mac_str(BCAST)) / Dot1Q(vlan=5)) + bytes(42) for m in (MAC_A, MAC_H)],
         [A, HOST], 0, vnet_hdr_len=H12)
    dp.set_shaper(A, direction, rate_bps, burst_bits, queue_bytes=10**6)
    return dp


def through(dp, direction, frames, hdrs, now_ns):
    """Sends frames (each with its vnet header) through pod A's shaper of `direction`."""
    src, dst, port = (MAC_A, MAC_H, A) if direction == C.EGRESS else (MAC_H, MAC_A, HOST)
    frames = [f(src, dst) for f in frames]
    outs, _ = send(dp, frames, [port] * len(frames), now_ns, vnet_hdr_len=H12, vnet_hdrs=hdrs)
    return outs, frames


def charged(dp_impl, direction, make_frame, hdr):
    """The bytes the shaper took from its credit for one frame that passed at once."""
    burst = 8 * 200_000
    dp = gso_dp(dp_impl, direction, 8_000_000, burst)
    outs, frames = through(dp, direction, [make_frame], [hdr], 1000)
    assert outs == [HOST if direction == C.EGRESS else A]
    taken = burst * SEC - dp.shaper_state(A, direction)["credit"]
    assert taken % (8 * SEC) == 0
    return taken // (8 * SEC), len(frames[0])


@pytest.mark.parametrize("direction", [C.EGRESS, C.INGRESS])
@pytest.mark.parametrize("gso_type", [GSO_TCPV4, GSO_TCPV4 | GSO_ECN])
def test_a_tso_frame_is_charged_the_bytes_of_its_segments_on_the_wire(dp_impl, direction, gso_type):
    # 10 segments of 1448 bytes: 9 more copies of the 66 header bytes on the wire
    cost, length = charged(dp_impl, direction, lambda s, d: tcp_frame(s, d, 14480), vnet_hdr(gso_type, 1448))
    assert length == 66 + 14480
    assert cost == length + 9 * 66 == 15140


@pytest.mark.parametrize("direction", [C.EGRESS, C.INGRESS])
def test_the_next_packet_waits_for_the_wire_bytes_of_a_tso_frame(dp_impl, direction):
    """A GSO frame at the head of a queue: its departure time, the credit after it, and
    the next packet's departure all follow from its wire bytes; the queue counts frame bytes."""
    rate = 8_000_000                                  # one byte per microsecond
    dp = gso_dp(dp_impl, direction, rate, 0)
    t0 = 10**6
    big = lambda s, d: tcp_frame(s, d, 14480)        # 14546 bytes, 15140 on the wire
    small = lambda s, d: frame(s, d, 1000, 7)
    outs, frames = through(dp, direction, [big, small], [vnet_hdr(GSO_TCPV4, 1448), vnet_hdr()], t0)
    assert outs == [C.OUT_QUEUED] * 2
    state = dp.shaper_state(A, direction)
    assert (state["queue_bytes"], state["queue_packets"]) == (14546 + 1000, 2)
    assert dp.next_departure_ns() == t0 + 15140 * 1000          # 15140 bytes at 1 byte/us
    assert drain(dp, t0 + 15140 * 1000 - 1, vnet_hdr_len=H12) == []
    got = drain(dp, t0 + 15140 * 1000, vnet_hdr_len=H12)
    assert [(len(f), h) for _, _, f, h in got] == [(14546, vnet_hdr(GSO_TCPV4, 1448))]
    assert dp.shaper_state(A, direction)["credit"] == 0
    assert dp.next_departure_ns() == t0 + (15140 + 1000) * 1000
    got = drain(dp, t0 + (15140 + 1000) * 1000, vnet_hdr_len=H12)
    assert [len(f) for _, _, f, _ in got] == [1000]
    assert dp.shaper_state(A, direction)["queue_bytes"] == 0


@pytest.mark.parametrize("direction", [C.EGRESS, C.INGRESS])
def test_counters_count_the_frame_bytes_of_a_tso_frame(dp_impl, direction):
    dp = gso_dp(dp_impl, direction, 8_000_000, 8 * 200_000)
    in_port, out_port = (A, HOST) if direction == C.EGRESS else (HOST, A)
    before = (pcounters(dp, in_port), pcounters(dp, out_port), gc(dp, "bytes"))
    through(dp, direction, [lambda s, d: tcp_frame(s, d, 14480)], [vnet_hdr(GSO_TCPV4, 1448)], 1000)
    assert pc(dp, in_port, "rx_bytes") - before[0]["rx_bytes"] == 14546
    assert pc(dp, out_port, "tx_bytes") - before[1]["tx_bytes"] == 14546
    assert gc(dp, "bytes") - before[2] == 14546


@pytest.mark.parametrize("name,make_frame,hdr,expect", [
    # IPv6: 86 header bytes per segment
    ("tcpv6", lambda s, d: tcp_frame(s, d, 4 * 1428, family=6), vnet_hdr(GSO_TCPV6, 1428), 86 + 4 * 1428 + 3 * 86),
    # an 802.1Q tag is part of every segment's headers
    ("vlan", lambda s, d: tcp_frame(s, d, 3000, vlan=5), vnet_hdr(GSO_TCPV4, 1448), 70 + 3000 + 2 * 70),
    # a last partial segment counts: ceil(3000 / 1000) = 3
    ("partial", lambda s, d: tcp_frame(s, d, 2001), vnet_hdr(GSO_TCPV4, 1000), 66 + 2001 + 2 * 66),
    # UDP segmentation (USO): every segment carries Ethernet + IPv4 + UDP, 42 bytes
    ("uso", lambda s, d: udp_frame(s, d, 5 * 1200), vnet_hdr(GSO_UDP_L4, 1200), 42 + 6000 + 4 * 42),
    # UFO: IP fragments, only the first carries the UDP header: 34 more bytes per extra one
    # (the payload that is split is UDP header + data: ceil(6008 / 1480) = 5)
    ("ufo", lambda s, d: udp_frame(s, d, 6000), vnet_hdr(GSO_UDP, 1480), 42 + 6000 + 4 * 34),
    # the cap: a crafted gso_size of 1 would be 14480 segments; at most twice the frame
    ("cap", lambda s, d: tcp_frame(s, d, 14480), vnet_hdr(GSO_TCPV4, 1), 2 * (66 + 14480)),
])
def test_gso_wire_bytes_by_kind(dp_impl, name, make_frame, hdr, expect):
    for direction in (C.EGRESS, C.INGRESS):
        assert charged(dp_impl, direction, make_frame, hdr)[0] == expect, (name, direction)


@pytest.mark.parametrize("name,make_frame,hdr", [
    ("no gso", lambda s, d: tcp_frame(s, d, 14480), vnet_hdr(0, 1448)),
    ("ecn bit alone", lambda s, d: tcp_frame(s, d, 14480), vnet_hdr(GSO_ECN, 1448)),
    ("gso_size 0", lambda s, d: tcp_frame(s, d, 14480), vnet_hdr(GSO_TCPV4, 0)),
    ("payload fits one segment", lambda s, d: tcp_frame(s, d, 1448), vnet_hdr(GSO_TCPV4, 1448)),
    ("no payload", lambda s, d: tcp_frame(s, d, 0), vnet_hdr(GSO_TCPV4, 1448)),
    ("tcp type on udp", lambda s, d: udp_frame(s, d, 6000), vnet_hdr(GSO_TCPV4, 1200)),
    ("udp type on tcp", lambda s, d: tcp_frame(s, d, 6000), vnet_hdr(GSO_UDP_L4, 1200)),
    ("unknown type", lambda s, d: tcp_frame(s, d, 6000), vnet_hdr(2, 1200)),
    ("not ip", lambda s, d: frame(s, d, 6000), vnet_hdr(GSO_TCPV4, 1200)),
])
def test_other_frames_are_charged_their_length(dp_impl, name, make_frame, hdr):
    for direction in (C.EGRESS, C.INGRESS):
        cost, length = charged(dp_impl, direction, make_frame, hdr)
        assert cost == length, (name, direction)


@pytest.mark.parametrize("direction", [C.EGRESS, C.INGRESS])
def test_without_vnet_headers_a_tso_sized_frame_is_charged_its_length(dp_impl, direction):
    """vnet_hdr_len=0: there is no GSO metadata, the frame is one frame."""
    dp = make(dp_impl)
    learn(dp)
    burst = 8 * 200_000
    dp.set_shaper(A, direction, 8_000_000, burst)
    src, dst, port = (MAC_A, MAC_H, A) if direction == C.EGRESS else (MAC_H, MAC_A, HOST)
    f = tcp_frame(src, dst, 14480)
    assert send1(dp, f, port, 1000)[0] != C.OUT_QUEUED
    assert dp.shaper_state(A, direction)["credit"] == (burst - len(f) * 8) * SEC
