"""Shaping through the simulation against token-bucket theory (virtual time, exact).

For rate R (bit/s) and burst B (bits), with backlog from t0 on: the bits delivered by t
never exceed B + R·(t − t0) and, while a queue is waiting, fall short of it by less
than one packet.
"""
import numpy as np
import pytest

from vswitch.sim import CBR

R_BPS = 1_000_000
B_BITS = 10_000
FRAME_BYTES = 125          # 1000 bits


def setup(make_sim, direction):
    sim = make_sim()
    a = sim.add_pod("a")
    bw = {f"{direction}Rate": R_BPS, f"{direction}Burst": B_BITS}
    b = sim.add_pod("b", bandwidth=bw if direction == "ingress" else None)
    if direction == "egress":
        sim.set_bandwidth("a", bw)
    b.send(b.ping(a))          # learn b (the echo reply takes some of the burst) ...
    sim.run()
    sim.advance(10 ** 9)       # ... so wait until the buckets are full again
    sim.flush()
    a.clear()
    b.clear()
    frame = a.udp_to(b, 9, b"\0" * (FRAME_BYTES - 42))
    assert len(frame) == FRAME_BYTES
    return sim, a, b, frame


def check_curve(times_ns, arrivals_ns, t0, frame_bits):
    """delivered(t) ≤ B + R·(t − t0) always; > B + R·(t − t0) − one frame while backlogged."""
    times = np.asarray(times_ns, dtype=np.int64)
    delivered = frame_bits * np.arange(1, len(times) + 1)
    bound = B_BITS + R_BPS * (times - t0) / 1e9
    assert np.all(delivered <= bound + 1e-6), "more than burst + rate·t"
    delayed = times > np.asarray(arrivals_ns)
    assert delayed.any() and not delayed[:B_BITS // frame_bits].any()   # the burst passes at once
    backlog = np.arange(len(times)) >= int(np.argmax(delayed))          # from the first wait on
    assert np.all(delivered[backlog] > bound[backlog] - frame_bits), "short by more than one packet"


@pytest.mark.parametrize("direction", ["ingress", "egress"])
def test_shaped_curve_events(make_sim, direction):
    sim, a, b, frame = setup(make_sim, direction)
    t0 = sim.now
    n = 60                                                # 3 Mbit/s offered for 20 ms
    gen = CBR(frame, rate_bps=3 * R_BPS, count=n)
    sim.generate("a", gen)
    sim.run()
    times = [t for t, _ in b.received]
    assert len(times) == n                                # the queue held everything
    check_curve(times, t0 + gen.times(), t0, FRAME_BYTES * 8)
    # under backlog, frames leave at exactly the configured rate
    d = int(np.argmax(np.asarray(times) > t0 + gen.times()))
    span_s = (times[-1] - times[d]) / 1e9
    assert (len(times) - 1 - d) * FRAME_BYTES * 8 / span_s == pytest.approx(R_BPS, rel=1e-6)
    c = sim.counters()
    port = "b" if direction == "ingress" else "a"
    assert c["ports"][port]["queued"] == n - d          # every delayed frame went through the queue
    assert c["ports"][port]["drop_queue_full"] == 0


def test_shaped_curve_bulk(make_sim):
    """Bulk mode: batches and drains are quantised to batch_ns; the bound still holds."""
    sim, a, b, frame = setup(make_sim, "ingress")
    t0 = sim.now
    T = 50_000_000
    before = sim.counters()["ports"]["b"]["tx_bytes"]
    res = sim.run_bulk([("a", CBR(frame, rate_bps=3 * R_BPS, duration_ns=T))], until_ns=t0 + T,
                       batch_ns=100_000)
    bits = (sim.counters()["ports"]["b"]["tx_bytes"] - before) * 8
    theory = B_BITS + R_BPS * T / 1e9
    assert theory - FRAME_BYTES * 8 - R_BPS * 100_000 / 1e9 <= bits <= theory
    assert res.queued > 0 and res.delivered["b"] * FRAME_BYTES * 8 == bits


def test_queue_full_drops_are_counted(make_sim):
    sim = make_sim(shaper_queue_bytes=1_000)
    a, b = sim.add_pod("a"), sim.add_pod("b", bandwidth={"ingressRate": R_BPS, "ingressBurst": B_BITS})
    b.send(b.ping(a))
    sim.run()
    sim.advance(10 ** 9)
    frame = a.udp_to(b, 9, b"\0" * (FRAME_BYTES - 42))
    sim.generate("a", CBR(frame, rate_bps=100 * R_BPS, count=40))
    sim.run()
    c = sim.counters()["ports"]["b"]
    burst_frames, queue_frames = B_BITS // 1000, 1_000 // FRAME_BYTES
    assert c["queued"] >= queue_frames
    assert c["drop_queue_full"] > 0
    assert c["tx_packets"] - 1 + c["drop_queue_full"] == 40         # 1: the echo request
    assert c["tx_packets"] - 1 >= burst_frames + queue_frames


def test_oversized_packet_is_not_stuck(make_sim):
    """A frame bigger than the burst waits (L·8 − B)/R, then leaves (docs/datapath.md)."""
    sim = make_sim()
    a, b = sim.add_pod("a"), sim.add_pod("b", bandwidth={"ingressRate": R_BPS, "ingressBurst": 4_000})
    b.send(b.ping(a))
    sim.run()
    sim.advance(10 ** 9)
    b.clear()
    big = a.udp_to(b, 9, b"\0" * (1000 - 42))           # 8000 bits
    t0 = sim.now
    a.send(big)
    sim.run()
    (t, _), = b.received
    assert t - t0 == (8_000 - 4_000) * 10 ** 9 // R_BPS
