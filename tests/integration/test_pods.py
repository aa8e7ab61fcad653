"""Acceptance 1 and 2: two pods on TAPs ping each other and the gateway, TCP flows between
them, and offloaded frames larger than 1514 bytes cross the switch whole."""
from tests.integration.helpers import iperf3, ping, received_bps


def test_two_pods_ping_each_other_and_the_gateway_and_tcp_flows(cluster):
    a = cluster.add_pod("a", 2)
    b = cluster.add_pod("b", 3)
    assert ping(a.ns, b.ip)["received"] == 3
    assert ping(b.ns, a.ip)["received"] == 3
    assert ping(a.ns, cluster.gateway)["received"] == 3
    res = iperf3(b.ns, b.ip, a.ns, seconds=2)
    assert received_bps(res) > 0
    assert res["end"]["sum_received"]["bytes"] > 1_000_000


def test_offloaded_frames_larger_than_1514_bytes_cross_the_switch(cluster):
    a = cluster.add_pod("a", 2)
    b = cluster.add_pod("b", 3)
    before = cluster.daemon.call("counters", port=a.port)["ports"][a.port]
    iperf3(b.ns, b.ip, a.ns, seconds=2)
    after = cluster.daemon.call("counters", port=a.port)["ports"][a.port]
    packets = after["rx_packets"] - before["rx_packets"]
    nbytes = after["rx_bytes"] - before["rx_bytes"]
    # the mean frame size from the sending pod exceeds one MTU-sized frame only if TSO
    # segments (up to 64 KiB) crossed the switch unsegmented
    assert packets > 0 and nbytes / packets > 1514, (packets, nbytes)
    tx_b = cluster.daemon.call("counters", port=b.port)["ports"][b.port]
    assert tx_b["tx_errors"] == 0
