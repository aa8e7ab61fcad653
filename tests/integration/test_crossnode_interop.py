"""A vswitch node and a node built as flannel's VXLAN backend builds it with the Linux kernel
(vswitch.lab.cluster.KernelNode) reach each other's pods in both directions: ping (TTL as
the kernel pair), TCP, UDP, a 16 MiB TCP echo with TSO on the pods (64 KiB segments
encapsulated whole by the sender, checked byte for byte); a malformed and a foreign-VNI
VXLAN stream injected from the underlay (scapy) is dropped and counted by reason while a
transfer goes on; ipMasq with --cluster-cidr: a flow to the outside is masqueraded, one to a
remote pod is not (real nftables)."""
import re
import sys
import threading

import pytest

from vswitch import lab
from vswitch.lab.cluster import Cluster
from tests.integration.test_lab_cluster import _echo_from, _ping_ok, _start_servers, _stop

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(lab.kernel_unavailable() is not None, reason=lab.kernel_unavailable() or "")]

BIG = 16 << 20


@pytest.fixture(scope="module")
def mixed():
    with Cluster(2, kinds=["kernel", "vswitch"], pods_per_node=1) as c:
        servers = _start_servers(c.pods)
        try:
            yield c
        finally:
            _stop(servers)


def test_ping_tcp_udp_both_directions_and_ttl(mixed):
    k, v = mixed.nodes
    kp, vp = k.pods[0], v.pods[0]
    for src, dst in ((kp, vp), (vp, kp)):
        assert _ping_ok(src, dst.ip)
        out = lab.nsexec(src.ns, "ping", "-c", "1", "-W", "5", dst.ip).stdout
        assert re.search(r"ttl=62\b", out), out           # as between two kernel nodes
        assert _echo_from(src, [dst.ip]) == {dst.ip: {"tcp": True, "udp": True}}


def test_large_transfer_with_tso_both_directions(mixed):
    k, v = mixed.nodes
    kp, vp = k.pods[0], v.pods[0]
    before = {r["name"]: r for r in v.daemon.call("peers")["peers"]}[k.name]
    for src, dst in ((vp, kp), (kp, vp)):
        assert _echo_from(src, [dst.ip], size=BIG) == {dst.ip: {"tcp": True, "udp": True}}, (src.name, dst.name)
    row = {r["name"]: r for r in v.daemon.call("peers")["peers"]}[k.name]
    sent_bytes, sent = row["tx_bytes"] - before["tx_bytes"], row["tx_packets"] - before["tx_packets"]
    assert sent_bytes > 2 * BIG and row["rx_bytes"] - before["rx_bytes"] > 2 * BIG
    # TSO: the pod's segments were encapsulated whole (up to 64 KiB), not as 1398-byte MSS
    # frames: far fewer encapsulations than wire segments (2 * 16 MiB / 1398 = 24000)
    assert sent < 2 * BIG / 1398 / 2, (sent, sent_bytes)


INJECT = r"""
import sys
from scapy.all import Ether, IP, UDP, Raw, sendp
from scapy.layers.vxlan import VXLAN
dst_mac, src_ip, dst_ip, port, vni, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
inner = Ether(dst=dst_mac, src="0e:00:00:00:00:99") / IP(src="10.244.1.99", dst="10.244.2.2") / UDP(sport=1, dport=2) / Raw(b"x" * 32)
foreign = Ether(dst=dst_mac) / IP(src=src_ip, dst=dst_ip) / UDP(sport=40000, dport=port) / VXLAN(vni=vni + 1) / inner
# no I bit in the VXLAN flags (RFC 7348: must be set)
no_i = Ether(dst=dst_mac) / IP(src=src_ip, dst=dst_ip) / UDP(sport=40001, dport=port) / VXLAN(flags=0, vni=vni) / inner
# UDP length too short for a VXLAN header and an inner Ethernet header
short = Ether(dst=dst_mac) / IP(src=src_ip, dst=dst_ip) / UDP(sport=40002, dport=port) / Raw(b"\x08\x00\x00\x00\x00\x00\x01\x00" + b"\x00" * 6)
sendp([foreign] * n, iface="br0", verbose=False)
sendp([no_i, short] * n, iface="br0", verbose=False)
"""


def test_malformed_and_foreign_vni_streams_are_dropped_and_counted_while_traffic_goes_on(mixed):
    k, v = mixed.nodes
    kp, vp = k.pods[0], v.pods[0]
    n = 300
    before = v.daemon.call("counters")["ports"]["eth0"]
    result = {}
    t = threading.Thread(target=lambda: result.update(_echo_from(kp, [vp.ip], size=BIG)))
    t.start()
    try:
        lab.nsexec(mixed.underlay.ns, sys.executable, "-c", INJECT, v.vtep_mac, k.underlay_ip, v.underlay_ip,
                   v.port, v.vni, n, timeout=120)
    finally:
        t.join(180)
    assert result == {vp.ip: {"tcp": True, "udp": True}}
    after = v.daemon.call("counters")["ports"]["eth0"]
    assert after["drop_vxlan_bad_vni"] - before.get("drop_vxlan_bad_vni", 0) == n
    assert after["drop_vxlan_malformed"] - before.get("drop_vxlan_malformed", 0) == 2 * n
    assert v.daemon.call("status")["pods"] == 1 and _ping_ok(kp, vp.ip)


def test_ipmasq_masquerades_to_the_outside_but_not_to_remote_pods(tmp_path):
    """--cluster-cidr without etcd: the masquerade rule excludes the cluster; a pod with
    ipMasq seen by a remote pod keeps its address, seen by the underlay it is the node's."""
    with Cluster(2, kinds=["kernel", "vswitch"], pods_per_node=0,
                 node_kwargs={"vswitch": {"daemon_args": ["--cluster-cidr", "10.244.0.0/16"]}}) as c:
        k, v = c.nodes
        v.chain.conflist["plugins"][0]["ipMasq"] = True
        vp = v.add_pod()
        kp = k.add_pod()
        table = lab.nsexec(v.ns, "nft", "list", "table", "ip", "vswitch_masq").stdout
        assert re.search(r"ip saddr 10\.244\.2\.0/24 ip daddr != 10\.244\.0\.0/16 masquerade", table), table
        seen = {}
        for ns, ip in ((kp.ns, kp.ip), (k.ns, k.underlay_ip)):
            srv = lab.nspopen(ns, sys.executable, "-c", SRC_SERVER, ip)
            try:
                lab.wait_listening(ns, 7100)
                r = lab.nsexec(vp.ns, sys.executable, "-c", "import socket;s=socket.create_connection(("
                               f"'{ip}',7100),timeout=5);print(s.recv(100).decode())")
                seen[ip] = r.stdout.strip()
            finally:
                srv.kill()
                srv.communicate(timeout=10)
        assert seen[kp.ip] == vp.ip                  # to a remote pod: not masqueraded
        assert seen[k.underlay_ip] == v.underlay_ip  # to the outside: the node's address


SRC_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7100)); s.listen(4)
while True:
    c, a = s.accept(); c.sendall(a[0].encode()); c.close()
"""
