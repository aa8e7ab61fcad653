"""Acceptance 4: shaping inside the switch. iperf3 TCP from a pod with egress 20 Mbit/s and
to a pod with ingress 20 Mbit/s gets 0.95-1.02 of the rate on the wire; an unshaped pod is
not slowed. The shaper charges each TCP segment its whole frame (an offloaded GSO frame
the frames of its segments: docs/datapath.md, D36), so iperf3's goodput is the rate times
the payload's share of a frame."""
import threading

from tests.integration.helpers import iperf3, received_bps

RATE_BPS = 20_000_000
BURST_BITS = 1_000_000      # 50 ms at the rate; iperf3 -O 1 leaves the initial burst out
# MTU 1500, TCP with timestamps: 1448 payload bytes per 1514-byte frame (14 + 20 + 32 + 1448)
PAYLOAD_SHARE = 1448 / 1514


def test_egress_and_ingress_shaping_hold_the_rate_and_spare_unshaped_pods(cluster):
    eg = cluster.add_pod("eg", 2, bandwidth={"egressRate": RATE_BPS, "egressBurst": BURST_BITS})
    ig = cluster.add_pod("ig", 3, bandwidth={"ingressRate": RATE_BPS, "ingressBurst": BURST_BITS})
    free = cluster.add_pod("free", 4)
    sink = cluster.add_pod("sink", 5)
    shows = cluster.daemon.call("show")["ports"]
    assert {p["name"]: p["bandwidth"] for p in shows}[eg.port] == {"egressRate": RATE_BPS,
                                                                    "egressBurst": BURST_BITS}

    results = {}

    def unshaped():
        results["free"] = iperf3(sink.ns, sink.ip, free.ns, seconds=5, omit=1, port=5202)

    t = threading.Thread(target=unshaped)
    t.start()
    results["egress"] = iperf3(sink.ns, sink.ip, eg.ns, seconds=5, omit=1)
    t.join()
    results["ingress"] = iperf3(ig.ns, ig.ip, free.ns, seconds=5, omit=1)

    for k in ("egress", "ingress"):
        ratio = received_bps(results[k]) / (RATE_BPS * PAYLOAD_SHARE)
        print(f"{k}: {ratio:.4f} of {RATE_BPS} bit/s on the wire")
        assert 0.95 <= ratio <= 1.02, (k, ratio)
    # the unshaped pod ran at the same time as the egress-shaped one and was not held to it
    assert received_bps(results["free"]) > 10 * RATE_BPS, received_bps(results["free"])
    counters = cluster.daemon.call("counters", port=eg.port)["ports"][eg.port]
    assert counters["queued"] > 0
