"""Traffic generators: their times against their settings; scheduled and bulk runs agree."""
import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap, wrpcap

from vswitch.sim import CBR, OnOff, PcapReplay, Poisson
from vswitch.sim import frames as F


UNKNOWN_MAC = bytes.fromhex("02000000ee01")      # no port has it


@pytest.fixture
def ab(make_sim):
    sim = make_sim()
    a, b = sim.add_pod("a"), sim.add_pod("b")
    b.send(b.ping(a))           # the switch learns b: a's traffic to b is unicast
    sim.run()
    sim.flush()
    a.clear()
    b.clear()
    return sim, a, b


def test_cbr_pps_exact(ab):
    _, a, b = ab
    t = CBR(a.udp_to(b, 9), rate_pps=3, count=7).times(start_ns=10)
    assert t.tolist() == [10 + k * 10 ** 9 // 3 for k in range(7)]


def test_cbr_bps_counts_each_frames_bits(ab):
    _, a, b = ab
    f1, f2 = a.udp_to(b, 9, b"x" * 100), a.udp_to(b, 9, b"y" * 400)
    t = CBR([f1, f2], rate_bps=1_000_000, count=6).times()
    bits = np.cumsum([0] + [len(f1) * 8, len(f2) * 8] * 3)[:6]
    assert t.tolist() == [int(b_) * 10 ** 9 // 1_000_000 for b_ in bits]


def test_cbr_long_run_does_not_drift(ab):
    _, a, b = ab
    g = CBR(a.udp_to(b, 9), rate_pps=7, count=3_000_001)
    t = g.times()
    assert int(t[-1]) == 3_000_000 * 10 ** 9 // 7 and len(t) == 3_000_001


def test_duration_bounds_the_count(ab):
    _, a, b = ab
    t = CBR(a.udp_to(b, 9), rate_pps=1000, duration_ns=10_000_000).times()
    assert len(t) == 10 and t[-1] < 10_000_000


def test_poisson_rate_and_seed(ab):
    _, a, b = ab
    g = Poisson(a.udp_to(b, 9), rate_pps=10_000, duration_ns=10 ** 9, seed=4)
    t = g.times()
    assert abs(len(t) - 10_000) < 5 * 100             # 5 sigma of a Poisson count of 10^4
    gaps = np.diff(t)
    assert abs(gaps.mean() - 1e5) < 5 * 1e5 / np.sqrt(len(gaps))
    assert abs(np.std(gaps) / gaps.mean() - 1) < 0.05  # exponential: cv = 1
    assert np.array_equal(t, g.times()) and np.all(gaps >= 0)
    assert not np.array_equal(t, Poisson(a.udp_to(b, 9), rate_pps=10_000, duration_ns=10 ** 9, seed=5).times())


def test_on_off_pattern(ab):
    _, a, b = ab
    t = OnOff(a.udp_to(b, 9), rate_pps=1_000_000, on_ns=3_000, off_ns=7_000, count=9).times()
    assert t.tolist() == [0, 1000, 2000, 10000, 11000, 12000, 20000, 21000, 22000]
    frame = a.udp_to(b, 9, b"z" * 83)          # 125 bytes: 1000 bits
    assert len(frame) == 125
    t = OnOff(frame, rate_bps=1_000_000_000, on_ns=2_500, off_ns=500, duration_ns=9_000).times()
    assert t.tolist() == [0, 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000]


def test_pcap_replay_captured_retimed_looped(ab, tmp_path):
    _, a, b = ab
    frames = [Ether(a.udp_to(b, 9, bytes([i]))) for i in range(3)]
    for p, t in zip(frames, (100.0, 100.25, 101.0)):
        p.time = t
    path = tmp_path / "in.pcap"
    wrpcap(str(path), frames)
    g = PcapReplay(path)
    assert g.times(start_ns=5).tolist() == [5, 5 + 250_000_000, 5 + 1_000_000_000]
    assert [bytes(f) for f in g.frames] == [bytes(p) for p in frames]
    assert PcapReplay(path, speed=2.0).times().tolist() == [0, 125_000_000, 500_000_000]
    assert PcapReplay(path, rate_pps=1000).times().tolist() == [0, 1_000_000, 2_000_000]
    looped = PcapReplay(path, loops=2).times().tolist()
    assert looped == [0, 250_000_000, 1_000_000_000, 1_500_000_000, 1_750_000_000, 2_500_000_000]
    with pytest.raises(ValueError, match="nope.pcap"):
        PcapReplay(tmp_path / "nope.pcap")


def test_generate_schedules_events_at_the_generator_times(ab):
    sim, a, b = ab
    g = CBR(a.udp_to(b, 9, b"q"), rate_pps=1000, count=20)
    start = sim.now + 1_000
    assert sim.generate("a", g, start_ns=start) == 20
    sim.run()
    assert [t for t, _ in b.received] == (start + g.times()).tolist()


def test_generator_rate_measured_at_the_receiver(ab):
    sim, a, b = ab
    sim.run_bulk([("a", CBR(a.udp_to(b, 9, b"\0" * 100), rate_bps=50_000_000, duration_ns=20_000_000))])
    c = sim.counters()["ports"]["b"]
    measured_bps = c["tx_bytes"] * 8 / 20e-3
    assert measured_bps == pytest.approx(50e6, rel=0.01)


def test_bulk_delivers_what_scheduled_delivers(make_sim):
    """The same traffic through generate()+run() and through run_bulk(): same counters."""
    results = []
    for mode in ("events", "bulk"):
        sim = make_sim()
        a, b, c = sim.add_pod("a"), sim.add_pod("b"), sim.add_pod("c")
        b.send(b.ping(a))
        sim.run()
        ip3 = F.l4_packet(c.ip, "10.0.0.200", 17, 40000, 9, b"3")
        flows = [("a", CBR(a.udp_to(b, 9, b"1"), rate_pps=100_000, count=300)),
                 ("c", Poisson(c.udp_to(b, 9, b"2"), rate_pps=50_000, count=200, seed=1)),
                 # an unknown unicast MAC: host (and uplink) only; a broadcast: every other port
                 ("c", CBR(F.ether(UNKNOWN_MAC, c.mac_bytes, F.ETH_IP4, ip3), rate_pps=10_000, count=30)),
                 ("c", CBR(F.ether(b"\xff" * 6, c.mac_bytes, F.ETH_IP4, ip3), rate_pps=10_000, count=20))]
        if mode == "events":
            for port, g in flows:
                sim.generate(port, g)
            sim.run()
            res = None
        else:
            res = sim.run_bulk(flows)
        counters = sim.counters()
        results.append(({p: {k: v for k, v in d.items()} for p, d in counters["ports"].items()},
                        counters["global"]["packets"], counters["global"]["flooded"]))
        if res is not None:
            assert res.frames == 550 and res.flooded == 50 and res.batches >= 1
            assert res.delivered == {"b": 520, "a": 20, "host": 50}     # no pod got the unknown unicast
    assert results[0] == results[1]


def test_bulk_until_and_record(ab):
    sim, a, b = ab
    g = CBR(a.udp_to(b, 9), rate_pps=1_000_000)          # endless
    t0 = sim.now
    res = sim.run_bulk([("a", g)], until_ns=t0 + 1_000_000)
    assert res.frames == 1001 and sim.now == t0 + 1_000_000
    res = sim.run_bulk([("a", CBR(a.udp_to(b, 9), rate_pps=1000, count=5))], record=True)
    assert len(b.received) == 5 and res.frames == 5
    assert [t for t, _ in b.received] == [sim.now - 4_000_000 + k * 1_000_000 for k in range(5)]


def test_bulk_record_captures_frames_as_sent_not_as_rewritten(make_sim, tmp_path):
    """record=True: the input port's capture holds the frame the client sent, before the
    hostPort DNAT rewrote it in the batch buffer; the pod sees it translated."""
    sim = make_sim(node_ips=["192.0.2.1"])
    a = sim.add_pod("a")
    client = sim.add_external("client", ip="192.0.2.10")
    sim.add_port_mapping("a", host_port=8080, container_port=80, protocol="udp")
    sent = client.udp_to(sim.node_ip, 8080, b"q", sport=5000)
    sim.run_bulk([("client", CBR(sent, rate_pps=1000, count=1))], record=True)
    assert sim.write_pcap("uplink", tmp_path / "u.pcap") == 2
    uplink = [bytes(p) for p in rdpcap(str(tmp_path / "u.pcap"))]
    assert uplink[0] == sent                                    # in: as sent
    reply = Ether(uplink[1])                                    # out: a's echo, translated back
    assert (reply[IP].src, reply[UDP].sport, reply[IP].dst, reply[UDP].dport) == \
        ("192.0.2.1", 8080, "192.0.2.10", 5000)
    (_, got), = a.received
    assert (Ether(got)[IP].dst, Ether(got)[UDP].dport) == (a.ip, 80)


def test_bulk_runs_queued_events_before_later_drains(make_sim):
    """Events queued while bulk traffic is shaped (a frame sent for later, frames the node
    routes from an external in record mode) run in time order with the drains: virtual time
    never runs back (it did: 'now_ns went backwards'), every frame arrives, in time order."""
    sim = make_sim(node_ips=["192.0.2.1"])
    s = sim.add_pod("s", bandwidth={"egressRate": 2_000_000, "egressBurst": 16_000})
    q = sim.add_pod("q")
    client = sim.add_external("client", ip="192.0.2.10")
    sim.send("q", q.udp_to(s, 7, b"later"), at_ns=3_000_000)
    flows = [("s", CBR(s.udp_to(q, 9, b"s" * 400), rate_bps=5_000_000, count=200)),
             ("client", CBR(client.udp_to(q, 5, b"c" * 200), rate_pps=20_000, count=100))]
    res = sim.run_bulk(flows, record=True)
    times = [t for t, _ in q.received]
    assert res.frames == 300 and len(times) == 300 and times == sorted(times)
    (t_later, _), = [(t, f) for t, f in s.received if f.endswith(b"later")]
    assert t_later == 3_000_000
