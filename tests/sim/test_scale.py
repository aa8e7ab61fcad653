"""Scale: 1,000 pods on one simulated switch; memory of bulk runs bounded by tables and
queues, not by the number of frames. (Set-up time is measured in bench/bench_sim.py.)"""
import gc
import tracemalloc

from scapy.layers.l2 import ARP, Ether

from vswitch.sim import CBR

N_PODS = 1000


def thousand(make_sim):
    sim = make_sim(subnet="10.0.0.0/22", max_ports=N_PODS + 8, capture_limit=16)
    pods = [sim.add_pod(f"pod{i}") for i in range(N_PODS)]
    return sim, pods


def test_thousand_pods_distinct_and_reachable(make_sim):
    sim, pods = thousand(make_sim)
    assert len({p.ip for p in pods}) == len({p.mac for p in pods}) == N_PODS
    assert pods[-1].ip == "10.0.3.233" and sim.switch.port_id("pod999") == N_PODS
    first, last = pods[0], pods[-1]
    last.send(last.arp_request(first))               # a broadcast: every port gets it
    sim.run()
    replies = [Ether(f)[ARP] for _, f in last.received]
    assert [(r.op, r.psrc, r.hwsrc) for r in replies] == [(2, first.ip, first.mac)]
    c = sim.counters()
    assert c["global"]["flooded"] == 1
    assert sum(d["tx_packets"] for d in c["ports"].values()) == N_PODS + 1   # 999 pods + host + reply
    last.send(last.ping(first, seq=4))
    sim.run()
    assert len(last.received) == 2


def peak_bytes(sim, pods, n_frames):
    flows = [(pods[i].name, CBR(pods[i].udp_to(pods[i + 1], 9, b"\0" * 18), rate_pps=10_000_000,
                                count=n_frames // 100)) for i in range(0, 200, 2)]
    gc.collect()
    tracemalloc.start()
    try:
        res = sim.run_bulk(flows, chunk_frames=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.frames == n_frames
    return peak


def test_bulk_memory_does_not_grow_with_frames(make_sim, dp_impl):
    sim, pods = thousand(make_sim)
    for i in range(1, 201, 2):                         # the receivers speak once: known unicast
        pods[i].send(pods[i].ping(sim.gateway))
    sim.run()
    small = 10_000 if dp_impl.__name__.endswith("_py") else 100_000
    peak_bytes(sim, pods, 1000)                        # warm-up: imports, first-use caches
    peak_small = peak_bytes(sim, pods, small)
    peak_large = peak_bytes(sim, pods, 10 * small)
    assert peak_large < peak_small * 1.2 + (2 << 20), (peak_small, peak_large)
