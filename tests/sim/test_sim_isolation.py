"""Isolation in the simulation (issue 11, findings 1 and 2; docs/datapath.md D41-D42).

A pod's MAC is a static entry from the moment it is attached, so unicast between two pods
never reaches a third one, even with nothing learned yet (a switch that just started);
unicast to a MAC nobody has goes to the host and uplink ports only; and a shaped pod's copy
of a flood passes its ingress shaper like any other frame to it. Both implementations.
"""
from vswitch.datapath import consts as C
from vswitch.sim import CBR
from vswitch.sim import frames as F

UNKNOWN_MAC = bytes.fromhex("02000000ee01")      # no port has it
R_BPS = 1_000_000
B_BITS = 10_000
FRAME_BYTES = 125                               # 1000 bits


def test_a_third_pod_sees_none_of_two_pods_unicast_from_the_first_frame(make_sim):
    sim = make_sim(subnet="10.0.0.0/24", node_ips=["192.0.2.1"])
    a, b, c = sim.add_pod("a"), sim.add_pod("b"), sim.add_pod("c")
    client = sim.add_external("client", ip="192.0.2.10")
    assert sim.counters()["global"]["mac_learned"] == 0          # nothing learned yet
    for i in range(100):                                         # no ARP, no ping first
        a.send(a.udp_to(b, 9, b"a%d" % i), at_ns=i * 1000)
        b.send(b.udp_to(a, 9, b"b%d" % i), at_ns=i * 1000 + 500)
    sim.run()
    assert len(b.received) == 100 and len(a.received) == 100
    assert sim.received("c") == []                              # c's port: not one frame
    assert sim.counters()["global"]["flooded"] == 0
    # a frame to a MAC nobody has, from a pod and from outside: host and uplink only
    n_host, n_up = len(sim.received("host")), len(sim.received("uplink"))
    c.send(F.ether(UNKNOWN_MAC, c.mac_bytes, F.ETH_IP4, F.l4_packet(c.ip, "10.0.0.99", 17, 1, 9, b"x")))
    client.send(F.ether(UNKNOWN_MAC, client.mac_bytes, F.ETH_IP4,
                        F.l4_packet(client.ip, "10.0.0.99", 17, 1, 9, b"y")))
    sim.run()
    assert len(sim.received("host")) == n_host + 2
    assert len(sim.received("uplink")) == n_up + 1              # c's frame; not its own back
    assert [len(sim.received(p)) for p in "abc"] == [100, 100, 0]
    assert sim.counters()["global"]["flooded"] == 2


def test_a_shaped_pods_flooded_input_is_shaped(make_sim):
    sim = make_sim(subnet="10.0.0.0/24")
    a = sim.add_pod("a")
    b = sim.add_pod("b", bandwidth={"ingressRate": R_BPS, "ingressBurst": B_BITS})
    c = sim.add_pod("c")
    bcast = F.ether(b"\xff" * 6, a.mac_bytes, 0x88B5, bytes(FRAME_BYTES - 14))
    assert len(bcast) == FRAME_BYTES
    t0 = sim.now
    n = 60                                                       # 3 Mbit/s of broadcasts for 20 ms
    gen = CBR(bcast, rate_bps=3 * R_BPS, count=n)
    sim.generate("a", gen)
    sim.run()
    sent = (t0 + gen.times()).tolist()
    assert [t for t, _ in sim.received("c")] == sent             # unshaped: every copy at once
    times = [t for t, _ in sim.received("b")]
    assert len(times) == n                                       # the queue held them all
    for k, t in enumerate(times):                                # burst + rate * t, never more
        assert (k + 1) * FRAME_BYTES * 8 <= B_BITS + R_BPS * (t - t0) / 1e9 + 1e-6, k
    assert times[-1] - t0 >= (n * FRAME_BYTES * 8 - B_BITS) * 10**9 // R_BPS   # ~50 ms, not 20
    assert sim.counters()["ports"]["b"]["queued"] == n
    assert sim.switch.dp.flood_classes()[sim.port_id("b")] == 0
    assert sim.switch.dp.flood_classes()[sim.port_id("c")] == C.FLOOD_MEMBER
