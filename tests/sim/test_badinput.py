"""Bad input raises a clear exception naming the value, and nothing is half-applied."""
import pytest

from vswitch.sim import CBR, Simulation


def state(sim):
    return (sim.switch.describe(), sim.counters(), sorted(sim._endpoints), len(sim._events), sim.now)


@pytest.mark.parametrize("frame, words", [
    ("not a frame", ["str", "not a frame"]),
    (12345, ["int", "12345"]),
    (None, ["NoneType"]),
    ([1, 2, 3], ["list"]),
    (b"\0" * 70000, ["70000"]),
])
def test_send_bad_frame(sim, frame, words):
    before = state(sim)
    with pytest.raises(ValueError) as ei:
        sim["a"].send(frame)
    for w in words:
        assert w in str(ei.value)
    assert state(sim) == before


def test_send_unknown_port_and_bad_times(sim):
    a = sim["a"]
    before = state(sim)
    with pytest.raises(KeyError, match="'zz'"):
        sim.send("zz", a.ping(sim["b"]))
    with pytest.raises(ValueError, match="-5"):
        a.send(a.ping(sim["b"]), at_ns=-5)
    with pytest.raises(ValueError, match="1.5"):
        a.send(a.ping(sim["b"]), at_ns=1.5)
    with pytest.raises(ValueError, match="-1"):
        sim.run(until_ns=-1)
    with pytest.raises(ValueError, match="-3"):
        sim.advance(-3)
    with pytest.raises(ValueError, match="-2"):
        sim.expect("a", a.ping(sim["b"]), within_ns=-2)
    with pytest.raises(KeyError, match="'nobody'"):
        sim.expect_nothing("nobody")
    with pytest.raises(KeyError, match="'nobody'"):
        sim.write_pcap("nobody", "/tmp/never-written.pcap")
    with pytest.raises(KeyError, match="'nobody'"):
        sim.trace(a.ping(sim["b"]), in_port="nobody")
    assert state(sim) == before
    sim.advance(100)
    with pytest.raises(ValueError, match="before the current time 100"):
        a.send(a.ping(sim["b"]), at_ns=50)
    with pytest.raises(ValueError, match="before the current time"):
        sim.run(until_ns=10)


@pytest.mark.parametrize("bandwidth, words", [
    ({"ingressRate": 10_000_000}, ["ingress", "10000000"]),
    ({"ingressRate": -1, "ingressBurst": 5}, ["ingressRate", "-1"]),
    ({"ingressRate": "1M", "ingressBurst": 5}, ["ingressRate", "'1M'"]),
    ({"rate": 1}, ["'rate'"]),
    ("10mbit", ["'10mbit'"]),
])
def test_add_pod_bad_bandwidth_adds_nothing(sim, bandwidth, words):
    before = state(sim)
    with pytest.raises(ValueError) as ei:
        sim.add_pod("c", bandwidth=bandwidth)
    for w in words:
        assert w in str(ei.value)
    assert state(sim) == before
    # the address the failed pod would have had is still the next one
    assert sim.add_pod("c").ip == "10.0.0.4"


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="a"), ["'a'", "already used"]),
    (dict(name="host"), ["'host'"]),
    (dict(name=""), ["''"]),
    (dict(name="c", ip="10.0.0.2"), ["10.0.0.2", "in use"]),
    (dict(name="c", ip="10.0.0.1"), ["10.0.0.1", "in use"]),
    (dict(name="c", ip="fd00::5"), ["fd00::5", "IPv4"]),
    (dict(name="c", ip="banana"), ["'banana'"]),
    (dict(name="c", mac="zz:zz"), ["'zz:zz'"]),
    (dict(name="c", port_mappings=[{"hostPort": 99999, "containerPort": 80}]), ["hostPort", "99999"]),
    (dict(name="c", listen=[(0, "tcp")]), ["port 0"]),
    (dict(name="c", listen=[(80, "sctp")]), ["'sctp'"]),
])
def test_add_pod_bad_arguments(sim, kwargs, words):
    before = state(sim)
    with pytest.raises(ValueError) as ei:
        sim.add_pod(**kwargs)
    for w in words:
        assert w in str(ei.value)
    assert state(sim) == before


def test_add_pod_mac_collision_and_full_subnet(make_sim):
    sim = make_sim(subnet="10.9.0.0/29")              # room for the gateway and five pods
    a = sim.add_pod("a")
    with pytest.raises(ValueError, match=a.mac):
        sim.add_pod("b", mac=a.mac)
    for name in "bcde":
        sim.add_pod(name)
    with pytest.raises(ValueError, match="10.9.0.0/29.*no free address"):
        sim.add_pod("f")
    assert list(sim.pods) == list("abcde") and sim["e"].ip == "10.9.0.6"


def test_add_external_and_port_mapping_errors(sim):
    before = state(sim)
    with pytest.raises(ValueError, match="10.0.0.77.*inside the pod subnet"):
        sim.add_external("x", ip="10.0.0.77")
    with pytest.raises(ValueError, match="192.0.2.10.*in use"):
        sim.add_external("x", ip="192.0.2.10")
    with pytest.raises(ValueError, match="'client' is not a pod"):
        sim.add_port_mapping("client", host_port=80, container_port=80)
    with pytest.raises(KeyError, match="'ghost'"):
        sim.add_port_mapping("ghost", host_port=80, container_port=80)
    with pytest.raises(ValueError, match="'icmp'"):
        sim.add_port_mapping("a", host_port=80, container_port=80, protocol="icmp")
    with pytest.raises(ValueError, match="host_port"):
        sim.add_port_mapping("a")
    assert state(sim) == before
    sim.add_port_mapping("a", host_port=80, container_port=80)
    with pytest.raises(ValueError, match="80.*'a'"):
        sim.add_port_mapping("b", host_port=80, container_port=8080)
    assert [r["pod"] for r in sim.hostports()] == ["a"]


def test_constructor_and_generator_errors(dp_impl, sim):
    for kw, word in [(dict(seed=-1), "-1"), (dict(seed="x"), "'x'"), (dict(capture_limit=0), "capture_limit"),
                     (dict(batch_size=0), "batch_size"), (dict(subnet="nope"), "'nope'"),
                     (dict(reply_delay_ns=-4), "-4"), (dict(max_portz=3), "max_portz")]:
        with pytest.raises((ValueError, TypeError), match=word):
            Simulation(impl=dp_impl, **kw)
    a, b = sim["a"], sim["b"]
    with pytest.raises(ValueError, match="rate_pps"):
        CBR(a.ping(b), rate_pps=0, count=3)
    with pytest.raises(ValueError, match="exactly one"):
        CBR(a.ping(b), rate_pps=1, rate_bps=1, count=3)
    with pytest.raises(ValueError, match="endless"):
        sim.generate("a", CBR(a.ping(b), rate_pps=10))
    with pytest.raises(ValueError, match="endless"):
        sim.run_bulk([("a", CBR(a.ping(b), rate_pps=10))])
    before = state(sim)
    with pytest.raises(KeyError, match="'zz'"):
        sim.generate("zz", CBR(a.ping(b), rate_pps=10, count=3))
    with pytest.raises(KeyError, match="'zz'"):
        sim.run_bulk([("zz", CBR(a.ping(b), rate_pps=10, count=3))])
    with pytest.raises(ValueError, match="'bad'"):
        sim.run_bulk([("a", "bad")])
    assert state(sim) == before


def test_engine_protocol_bad_clock_and_port(sim):
    """set_clock never moves time back nor takes a non-integer; port_id names the unknown port."""
    sim.advance(1_000)
    before = state(sim)
    for bad, words in ((999, ["999", "before the current time 1000"]), (-1, ["-1"]), (1.5e3, ["1500.0"]),
                       (True, ["True"])):
        with pytest.raises(ValueError) as ei:
            sim.set_clock(bad)
        assert all(w in str(ei.value) for w in words)
    with pytest.raises(KeyError, match="'zz'"):
        sim.port_id("zz")
    assert state(sim) == before
    sim.set_clock(5_000)
    assert sim.now == 5_000 and sim.counters()["sim"]["now_ns"] == 5_000
