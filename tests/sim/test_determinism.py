"""Determinism: the same seed and inputs give byte-identical pcaps and counters, with either
implementation; a different seed gives different MACs (so the seed matters)."""
from vswitch.sim import CBR, OnOff, Poisson, Simulation


def scenario(impl, seed, tmp_path, tag):
    sim = Simulation(seed=seed, impl=impl, node_ips=["192.0.2.1"])
    a = sim.add_pod("a")
    b = sim.add_pod("b", bandwidth={"ingressRate": 5_000_000, "ingressBurst": 20_000})
    c = sim.add_pod("c", bandwidth={"egressRate": 2_000_000, "egressBurst": 16_000})
    client = sim.add_external("client", ip="192.0.2.10")
    sim.add_port_mapping("a", host_port=8080, container_port=80)
    sim.add_port_mapping("b", {"hostPort": 5353, "containerPort": 53, "protocol": "udp"})
    client.send(client.tcp_syn(sim.node_ip, 8080, sport=1000))
    client.send(client.udp_to(sim.node_ip, 5353, b"dns?", sport=1001), at_ns=1_000)
    a.send(a.tcp_syn(sim.node_ip, 8080, sport=1002), at_ns=2_000)        # hairpin
    c.send(c.tcp_syn(sim.node_ip, 8080, sport=1003), at_ns=3_000)        # pod to pod via hostPort
    a.send(a.ping(b), at_ns=4_000)
    sim.generate("c", Poisson(c.udp_to(b, 9, b"p" * 200), rate_pps=20_000, count=100))
    sim.generate("a", CBR(a.udp_to(client, 7, b"c" * 50), rate_pps=50_000, count=50, start_ns=10_000))
    sim.run()
    res = sim.run_bulk([("a", CBR(a.udp_to(b, 9, b"x" * 300), rate_bps=20_000_000, count=3000)),
                        ("c", OnOff(c.udp_to(a, 9, b"y" * 64), rate_pps=200_000, on_ns=200_000,
                                    off_ns=800_000, count=1000)),
                        ("client", Poisson(client.udp_to(sim.node_ip, 5353, b"z"), rate_pps=10_000,
                                           count=200))])
    pcaps = {}
    for port in ("host", "a", "b", "c", "uplink"):
        path = tmp_path / f"{tag}-{port}.pcap"
        sim.write_pcap(port, path)
        pcaps[port] = path.read_bytes()
    return {"pcaps": pcaps, "counters": sim.counters(), "fdb": sim.fdb(), "conntrack": sim.conntrack(),
            "bulk": (res.frames, res.delivered, res.dropped, res.queued, res.flooded, res.end_ns),
            "macs": {n: e.mac for n, e in sim.pods.items()}}


def test_same_seed_same_bytes(dp_impl, tmp_path):
    first = scenario(dp_impl, 7, tmp_path, "one")
    second = scenario(dp_impl, 7, tmp_path, "two")
    assert first == second
    assert first["counters"]["global"]["nat_translated"] > 0 and first["counters"]["global"]["queued"] > 0
    assert all(len(p) > 24 for p in first["pcaps"].values())


def test_both_implementations_agree_byte_for_byte(both_impls, tmp_path):
    py, c = both_impls
    assert scenario(py, 3, tmp_path, "py") == scenario(c, 3, tmp_path, "c")


def test_other_seed_other_macs(dp_impl, tmp_path):
    one = scenario(dp_impl, 1, tmp_path, "s1")
    two = scenario(dp_impl, 2, tmp_path, "s2")
    assert one["macs"] != two["macs"] and one["pcaps"]["a"] != two["pcaps"]["a"]
