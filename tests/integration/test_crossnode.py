"""Pods on three vswitch nodes (vswitch.lab.cluster, VXLAN in the core, peers through the
daemon's control plane): every pair reaches every other over ICMP, TCP and UDP; the node
reaches remote pods; TTL as the kernel pair (64 -> 62 for a reply across two routers); a
node's daemon killed: only traffic to it stops, and after its restart it resumes without
the others being touched; peers removed and added at run time through the op and through
the --peers file with SIGHUP (a bad file: logged, the previous table kept)."""
import json
import re
import signal
import time

import pytest

from vswitch import lab, rpc
from vswitch.lab.cluster import Cluster, VswitchNode
from tests.integration.test_lab_cluster import _echo_from, _ping_ok, _start_servers, _stop, _unreachable

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(lab.kernel_unavailable() is not None, reason=lab.kernel_unavailable() or "")]


@pytest.fixture(scope="module")
def c3():
    with Cluster(3, kinds="vswitch", pods_per_node=2) as c:
        servers = _start_servers(c.pods)
        try:
            yield c
        finally:
            _stop(servers)


def _all_ok(res):
    return all(r == {"tcp": True, "udp": True} for r in res.values())


def _peers(node):
    return {r["name"]: r for r in node.daemon.call("peers")["peers"]}


def test_every_pod_reaches_every_other_pod(c3):
    pods = c3.pods
    for a in pods:
        others = [b.ip for b in pods if b is not a]
        for ip in others:
            assert _ping_ok(a, ip), (a.name, ip)
        res = _echo_from(a, others)
        assert _all_ok(res), (a.name, res)
    n1 = c3.nodes[0]
    rows = _peers(n1)
    assert sorted(rows) == ["n2", "n3"]
    for name, r in rows.items():
        peer = c3.node(name)
        assert r["state"] == "resolved" and r["node_ip"] == peer.underlay_ip
        assert r["underlay_mac"] == peer.vtep_mac      # on one segment: the peer's NIC is the next hop
        assert r["pod_cidrs"] == [peer.pod_cidr] and r["source"] == "control"
        assert r["tx_packets"] > 0 and r["rx_packets"] > 0 and r["tx_bytes"] > r["tx_packets"] * 50
    assert n1.daemon.call("counters")["global"]["vxlan_encap"] > 0
    text = n1.daemon.call("metrics")["text"]
    assert re.search(r'vswitch_peer_tx_packets_total\{peer="n2",node_ip="10.200.0.2"\} [1-9]', text)


def test_pod_mtu_leaves_room_for_vxlan_and_ttl_is_the_kernel_pairs(c3):
    a, b = c3.nodes[0].pods[0], c3.nodes[1].pods[0]
    assert lab.nsexec(a.ns, "cat", "/sys/class/net/eth0/mtu").stdout.strip() == "1450"
    out = lab.nsexec(a.ns, "ping", "-c", "1", "-W", "5", b.ip).stdout
    assert re.search(r"ttl=62\b", out), out      # 64, minus one hop on each node (like two routers)
    # a full-size frame crosses (1450 - 28 bytes of ICMP payload, DF set)
    out = lab.nsexec(a.ns, "ping", "-c", "1", "-W", "5", "-M", "do", "-s", "1422", b.ip, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_node_reaches_remote_pods(c3):
    n1 = c3.nodes[0]
    for pod in c3.nodes[1].pods + c3.nodes[2].pods:
        assert _ping_ok(n1, pod.ip), pod.ip
    assert _all_ok(_echo_from(n1, [c3.nodes[1].pods[0].ip]))
    route = json.loads(lab.nsexec(n1.ns, "ip", "-j", "route", "get", c3.nodes[1].pods[0].ip).stdout)[0]
    assert route["dev"] == "vsw0" and route["gateway"] == "10.244.2.0" and route["prefsrc"] == n1.gateway_ip


def test_a_killed_daemon_stops_only_traffic_to_its_node_and_it_resumes_after_restart(c3):
    n1, n2, n3 = c3.nodes
    pids = {n.name: n.daemon.proc.pid for n in (n1, n2)}
    before = {n.name: _peers(n) for n in (n1, n2)}
    n3.daemon.kill9()
    try:
        a, b, dead = n1.pods[0], n2.pods[0], n3.pods[0]
        assert _unreachable(a, dead.ip) and _unreachable(b, dead.ip)
        assert _all_ok(_echo_from(a, [b.ip, n2.pods[1].ip, n1.pods[1].ip]))
        assert _all_ok(_echo_from(b, [a.ip]))
    finally:
        n3.restart()
    n3.wait_resolved()
    # the restarted node serves its pods again (its peers from its state file)
    deadline = time.monotonic() + 10
    while not _ping_ok(n1.pods[0], n3.pods[0].ip) and time.monotonic() < deadline:
        time.sleep(0.2)
    for a in n1.pods + n2.pods:
        assert _all_ok(_echo_from(a, [p.ip for p in n3.pods])), a.name
    assert _all_ok(_echo_from(n3.pods[0], [n1.pods[0].ip, n2.pods[1].ip]))
    # the others were not touched: same processes, same peers
    assert {n.name: n.daemon.proc.pid for n in (n1, n2)} == pids
    for n in (n1, n2):
        assert {k: (r["node_ip"], r["vtep_mac"], r["pod_cidrs"]) for k, r in _peers(n).items()} == \
               {k: (r["node_ip"], r["vtep_mac"], r["pod_cidrs"]) for k, r in before[n.name].items()}


def test_peers_removed_and_added_at_run_time_through_the_op(c3):
    n1, n2, n3 = c3.nodes
    a, b, c = n1.pods[0], n2.pods[0], n3.pods[0]
    drops0 = n1.daemon.call("counters")["ports"]["eth0"].get("drop_vxlan_unknown_peer", 0)
    n1.remove_peer(n2)
    try:
        assert sorted(_peers(n1)) == ["n3"]
        assert _unreachable(a, b.ip)
        # n2 still sends to n1: dropped there as from an unknown peer, and counted
        assert _unreachable(b, a.ip)
        assert n1.daemon.call("counters")["ports"]["eth0"]["drop_vxlan_unknown_peer"] > drops0
        assert "10.244.2.0/24" not in lab.nsexec(n1.ns, "ip", "route").stdout
        assert _all_ok(_echo_from(a, [c.ip]))          # the others go on
    finally:
        n1.add_peer(n2)
    assert _all_ok(_echo_from(a, [b.ip])) and _all_ok(_echo_from(b, [a.ip]))


def test_peers_from_a_file_reloaded_on_sighup_and_by_the_op(c3, tmp_path):
    n1, n2 = c3.nodes[0], c3.nodes[1]
    a, b = n1.pods[0], n2.pods[0]
    path = tmp_path / "peers.json"
    path.write_text("[]")
    n1.daemon.stop()
    n1.daemon.extra_args += ["--peers", str(path)]
    try:
        n1.restart()
        n1.remove_peer(n2)                       # n2 leaves the control source ...
        assert _unreachable(a, b.ip)
        path.write_text(json.dumps([VswitchNode.peer_record(n2)]))
        n1.daemon.proc.send_signal(signal.SIGHUP)   # ... and comes from the file
        rows = n1.wait_resolved(["n2"])
        assert rows["n2"]["source"] == "file"
        assert _all_ok(_echo_from(a, [b.ip]))
        # a bad file: SIGHUP logs it and keeps the table; the op says what is wrong
        path.write_text(json.dumps([dict(VswitchNode.peer_record(n2), pod_cidrs=["10.244.2.1/24"])]))
        n1.daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "peers_reload_failed" not in n1.daemon.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "peers_reload_failed" in n1.daemon.logs()
        assert _peers(n1)["n2"]["source"] == "file" and _all_ok(_echo_from(a, [b.ip]))
        with pytest.raises(rpc.RpcError) as e:
            n1.daemon.call("peers", action="reload")
        assert e.value.code == 4 and "10.244.2.1/24" in e.value.msg
        path.write_text("[]")
        assert "n2" not in {r["name"] for r in n1.daemon.call("peers", action="reload")["peers"]}
        assert _unreachable(a, b.ip)
    finally:
        n1.daemon.stop()
        n1.daemon.extra_args = n1.daemon.extra_args[:-2]
        n1.restart()
        n1.add_peer(n2)
    assert _all_ok(_echo_from(a, [b.ip]))
