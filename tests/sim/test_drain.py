"""Switch.drain_due: the one "release due packets and hand them on" loop (daemon and simulation).

The expected numbers come from the token bucket of docs/datapath.md (D15, D16): pod a's
egress shaper, 8 Mbit/s with a 16,000-bit burst, starts full; ten 1000-byte frames
(8000 bits each) sent at t=0: two pass, eight wait, and head k (k = 1..8) is due at
exactly k ms (its 8000 bits refilled at 8 bit/µs).
"""
import numpy as np
import pytest

from vswitch.datapath import consts as C
from vswitch.sim import frames as F
from vswitch.switch import Switch

MAC_A, MAC_B = bytes.fromhex("02000000000a"), bytes.fromhex("02000000000b")
FRAME_LEN = 1000
MS = 1_000_000


@pytest.fixture
def shaped(dp_impl):
    """(switch, a's id, b's id): ten frames a -> b sent at t=0, eight of them queued."""
    sw = Switch({"subnet": "10.0.0.0/24"}, impl=dp_impl)
    a = sw.add_port("a", "pod", mac=MAC_A, ips=["10.0.0.2"],
                    bandwidth={"egressRate": 8_000_000, "egressBurst": 16_000})
    b = sw.add_port("b", "pod", mac=MAC_B, ips=["10.0.0.3"])
    hello = F.ether(MAC_A, MAC_B, F.ETH_IP4, F.l4_packet("10.0.0.3", "10.0.0.2", 17, 9, 4000, b"hi"))
    assert send(sw, hello, b.port_id, 1) == [a.port_id]     # a's MAC is bound: a static entry (D42)
    frame = F.ether(MAC_B, MAC_A, F.ETH_IP4,
                    F.l4_packet("10.0.0.2", "10.0.0.3", 17, 4000, 9, b"x" * (FRAME_LEN - 42)))
    assert len(frame) == FRAME_LEN
    assert send(sw, frame, a.port_id, 10) == [b.port_id] * 2 + [C.OUT_QUEUED] * 8
    return sw, a.port_id, b.port_id


def send(sw, frame, in_port, n):
    """``n`` copies of ``frame`` into the switch on ``in_port`` at t=0; their out ports."""
    H, L = sw.config.vnet_hdr_len, len(frame)
    buf = np.zeros(n * (L + H) + H, np.uint8)
    offsets = (np.arange(n, dtype=np.uint32) * (L + H) + H).astype(np.uint32)
    for o in offsets:
        buf[o:o + L] = np.frombuffer(frame, np.uint8)
    outs = np.empty(n, np.int32)
    sw.process(buf, offsets, np.full(n, L, np.uint32), np.full(n, in_port, np.uint16), outs, n, 0)
    return outs.tolist()


def out_arrays(cap, buf_bytes=1 << 16):
    return (np.zeros(buf_bytes, np.uint8), np.empty(cap, np.uint32), np.empty(cap, np.uint32),
            np.empty(cap, np.uint16), np.empty(cap, np.int32))


def drain(sw, now_ns, max_pkts, arrays=None):
    """drain_due with a deliver that records what each call handed on: (total, [(k, outs, ins, lens)])."""
    arrays = arrays or out_arrays(max_pkts)
    buf, offs, lens, ins, outs = arrays
    seen = []
    total = sw.drain_due(now_ns, buf, offs, lens, ins, outs, max_pkts,
                         lambda k: seen.append((k, outs[:k].tolist(), ins[:k].tolist(), lens[:k].tolist())))
    return total, seen


def test_drains_every_due_packet_max_pkts_at_a_time(shaped):
    sw, a, b = shaped
    assert sw.next_departure_ns() == 1 * MS
    total, seen = drain(sw, 4 * MS, 2)                # heads due at 1, 2, 3, 4 ms
    assert total == 4
    assert seen == [(2, [b, b], [a, a], [FRAME_LEN] * 2)] * 2
    assert sw.next_departure_ns() == 5 * MS
    total, seen = drain(sw, 5 * MS + MS // 2, 2)      # one due: a short call ends the loop
    assert (total, [k for k, *_ in seen]) == (1, [1])
    assert drain(sw, 5 * MS + MS // 2, 2) == (0, [])  # nothing due: deliver is not called
    total, seen = drain(sw, 20 * MS, 2)               # the last three (7 and 8 ms, and 6 ms)
    assert (total, [k for k, *_ in seen]) == (3, [2, 1])
    assert sw.next_departure_ns() < 0
    assert sw.counters("b")["ports"]["b"]["tx_packets"] == 10


def test_a_full_out_buf_leaves_the_rest_for_the_next_drain(shaped):
    sw, a, b = shaped
    H = sw.config.vnet_hdr_len
    small = out_arrays(4, buf_bytes=H + FRAME_LEN + H + FRAME_LEN // 2)   # room for one frame
    total, seen = drain(sw, 4 * MS, 4, small)
    assert (total, [k for k, *_ in seen]) == (1, [1])                      # 4 due, 1 fits
    assert sw.next_departure_ns() == 2 * MS                                # the others still wait
    total, seen = drain(sw, 4 * MS, 4)
    assert (total, [k for k, *_ in seen]) == (3, [3])
