"""Acceptance 1 and 2: two pods on TAPs ping each other and the gateway, TCP flows between
them, and offloaded frames larger than 1514 bytes cross the switch whole; UDP datagrams
bigger than the MTU cross as IP fragments."""
import sys

from tests.integration.helpers import iperf3, nsexec, nspopen, ping, received_bps, wait_listening

# a UDP server answering each datagram with its size and a copy of it
UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(str(len(data)).encode() + b":" + data, peer)
"""
UDP_ASK = r"""
import socket, sys
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(1)
c.connect((sys.argv[1], int(sys.argv[2])))
msg = bytes(range(256)) * (int(sys.argv[3]) // 256)
for attempt in range(5):
    c.send(msg)
    try:
        size, _, echo = c.recv(70000).partition(b":")
        print(size.decode(), echo == msg); break
    except socket.timeout:
        continue
else:
    print("NO ANSWER")
"""


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


def test_udp_datagrams_bigger_than_the_mtu_cross_as_fragments(cluster):
    """4096 bytes of UDP leave the pod as three IP fragments each way (the TAP offers no
    UDP segmentation offload); the first fragment's UDP length counts the whole datagram
    and once made the switch drop it as malformed (D38)."""
    a = cluster.add_pod("a", 2)
    b = cluster.add_pod("b", 3)
    server = nspopen(b.ns, sys.executable, "-c", UDP_ECHO, "7000")
    try:
        wait_listening(b.ns, 7000, "udp")
        before = cluster.daemon.call("counters", port=a.port)["ports"][a.port]["rx_packets"]
        out = nsexec(a.ns, sys.executable, "-c", UDP_ASK, b.ip, "7000", "4096").stdout.split()
        assert out == ["4096", "True"], out
        sent = cluster.daemon.call("counters", port=a.port)["ports"][a.port]["rx_packets"] - before
        assert sent >= 3                                   # fragments, not one GSO frame
        assert cluster.daemon.call("counters")["global"]["malformed"] == 0
    finally:
        server.kill()
        server.wait(10)
