"""The simulation: simulated frames per second of wall time, and pod set-up time.

Theory of operation
-------------------
``sim-fps``: ``Simulation.run_bulk`` pushes generator traffic through the real Switch and
Datapath in numpy batches (vswitch/sim/generators.py). One benchmarked call runs ``FRAMES``
frames of 60 bytes (64 on the wire) from CBR generators — built before the timed region,
times computed by numpy inside it, as a user's run would — and the headline is frames per
second of wall time (``per_round`` = frames). Traffic ``unicast``: pod pairs talking to
known MACs; ``mixed``: 80 % known unicast, 10 % hostPort DNAT from an external client,
10 % into a pod's ingress shaper that has tokens (the core benchmark's mix). Subjects:
``vswitch`` (the Cython core) and ``vswitch-py`` (the pure-Python twin, fewer frames).

Growth: ``sim-fps`` with traffic ``north-south`` against 1, 10, 100 and 250 pods: every
pod sends to the node (90 %) and an external client reaches every pod through its own
hostPort (10 %, DNAT), so MACs, rules and flows grow with the pods.

``sim-setup``: the wall time to build a Simulation and add N pods (1 .. 10,000),
each with its own port, MAC, IP and anti-spoofing binding (one call = one fresh switch).
"""
from __future__ import annotations

import pytest

from .report import quick_mode, record
from vswitch.sim import Simulation
from vswitch.sim.generators import CBR

QUICK = quick_mode()
GROWTH_HOSTPORT0 = 30000


def _impl(name):
    if name == "c":
        from vswitch.datapath import _core as _datapath
        return _datapath
    from vswitch.datapath import pure as datapath_py
    return datapath_py


def build(impl, pods, traffic):
    """A simulation with ``pods`` pods, every MAC learnt, and its flows (not yet run)."""
    sim = Simulation(subnet="10.0.0.0/16", seed=0, impl=impl, max_ports=pods + 8, capture_limit=4,
                     node_ips=["192.0.2.1"])
    ps = [sim.add_pod(f"p{i}") for i in range(pods)]
    client = sim.add_external("client", ip="192.0.2.10")
    for p in ps:
        p.send(p.ping(sim.gateway))                 # the switch learns every pod
    sim.run()
    pairs = [(ps[i], ps[(i + 1) % pods]) for i in range(0, pods, 2)]
    flows = []
    if traffic == "unicast":
        for src, dst in pairs:
            flows.append((src, dst, 10))
    elif traffic == "north-south":
        # every pod talks to the node, and the client reaches every pod through its own
        # hostPort (DNAT): defined for any number of pods, 1 included
        for i, p in enumerate(ps):
            sim.add_port_mapping(p.name, host_port=GROWTH_HOSTPORT0 + i, container_port=80, protocol="udp")
            flows.append((p, "gateway", 9))
            flows.append((client, GROWTH_HOSTPORT0 + i, 1))
    elif traffic == "mixed":
        sim.add_port_mapping(ps[0].name, host_port=8080, container_port=80, protocol="udp")
        sim.set_bandwidth(ps[1].name, {"ingressRate": 10 ** 12, "ingressBurst": 2 ** 32 - 1})  # containerd's burst
        for src, dst in pairs:
            if dst is not ps[1]:
                flows.append((src, dst, 8))
        flows.append((ps[2 % pods], ps[1], 1))       # shaped, tokens available
        flows.append((client, None, 1))              # hostPort DNAT
    else:
        raise ValueError(f"traffic {traffic!r}: accepted unicast, mixed, north-south")
    total_w = sum(w for _, _, w in flows)
    return sim, ps, client, flows, total_w


def make_gens(sim, flows, total_w, frames):
    gens = []
    for src, dst, w in flows:
        n = max(1, frames * w // total_w)
        if dst is None:
            f = src.udp_to(sim.node_ip, 8080, b"\0" * 18)
        elif dst == "gateway":
            f = src.udp_to(sim.gateway, 9, b"\0" * 18)
        elif isinstance(dst, int):                   # a hostPort of the node
            f = src.udp_to(sim.node_ip, dst, b"\0" * 18)
        else:
            f = src.udp_to(dst, 9, b"\0" * 18)
        assert len(f) == 60
        gens.append((src.name, CBR(f, rate_pps=n * 1000, count=n)))   # every flow spans 1 ms
    return gens


FPS_GRID = [(2, "unicast"), (1000, "mixed")] if QUICK else \
    [(2, "unicast"), (2, "mixed"), (1000, "unicast"), (1000, "mixed")]


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("pods,traffic", FPS_GRID)
def test_sim_fps(benchmark, impl, pods, traffic):
    frames = (200_000 if QUICK else 1_000_000) if impl == "c" else (2_000 if QUICK else 20_000)
    sim, ps, client, flows, total_w = build(_impl(impl), pods, traffic)
    gens_template = make_gens(sim, flows, total_w, frames)
    n_frames = sum(g.count for _, g in gens_template)
    results = []

    def once():
        # fresh generators (cheap: a frame and a rate each) start at the current clock
        gens = [(port, CBR(g.frames[0], rate_pps=g.rate_pps, count=g.count)) for port, g in gens_template]
        res = sim.run_bulk(gens, batch_size=256)
        results.append(res)

    benchmark.pedantic(once, rounds=3 if QUICK else 5, iterations=1, warmup_rounds=1)
    for res in results:                      # every round, the warm-up included
        check_delivered(res, n_frames)
    res = results[-1]
    # recorded only now, valid: a failed check above leaves no row (and bench.runner drops
    # the timing of a failed test from the JSON)
    record(benchmark, group="sim-fps", subject="vswitch" if impl == "c" else "vswitch-py", unit="fps",
           per_round=n_frames, pods=pods, traffic=traffic, batch=256, frame_bytes=64,
           info={"frames": n_frames, "flows": len(gens_template), "batches": res.batches,
                 "dropped": res.dropped, "queued": res.queued, "flooded": res.flooded})


def check_delivered(res, n_frames):
    """Every frame of a ``sim-fps`` run went where its flow says: all ``n_frames`` ran,
    none dropped, queued or flooded (every traffic here is known unicast, DNAT or shaped
    with tokens); else AssertionError naming the counts."""
    bad = {k: getattr(res, k) for k in ("dropped", "queued", "flooded") if getattr(res, k)}
    assert res.frames == n_frames and not bad, \
        f"sim-fps run is invalid: {res.frames} of {n_frames} frames ran, {bad or 'none'} lost or flooded"


GROWTH_PODS = [1, 10, 100, 250]
GROWTH_CASES = [(p, i) for p in GROWTH_PODS for i in ("c", "py") if i == "c" or not QUICK]


@pytest.mark.parametrize("pods,impl", GROWTH_CASES, ids=[f"{p}-{i}" for p, i in GROWTH_CASES])
def test_sim_fps_growth(benchmark, pods, impl):
    """Frames/s of wall time against the number of pods (1, 10, 100, 250), traffic
    ``north-south``: 90 % from the pods to the node, 10 % from an external client to each
    pod's own hostPort (DNAT); every pod has a port, a MAC, an IP, a hostPort rule and a
    conntrack entry."""
    test_sim_fps(benchmark, impl, pods, "north-south")     # checks every frame was delivered


SETUP_GRID = [10, 1000] if QUICK else [1, 10, 100, 250, 1000, 10_000]


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("pods", SETUP_GRID)
def test_sim_setup(benchmark, impl, pods):
    dp = _impl(impl)

    def once():
        sim = Simulation(subnet="10.0.0.0/16", seed=0, impl=dp, max_ports=pods + 8)
        for i in range(pods):
            sim.add_pod(f"p{i}")
        return sim

    # small set-ups take ms and page faults of the fresh tables dominate: more rounds
    rounds = 3 if pods >= 10_000 else 5 if pods >= 1000 else 20
    sim = benchmark.pedantic(once, rounds=rounds, iterations=1, warmup_rounds=1)
    assert len(sim.pods) == pods
    record(benchmark, group="sim-setup", subject="vswitch" if impl == "c" else "vswitch-py", unit="s",
           per_round=1, pods=pods)
