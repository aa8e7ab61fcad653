"""Detach and gc against a real daemon: a TAP already gone is success, gateways follow the
subnets in use, gc can be limited to one network, and kernel operations queue correctly
(parallel clients, several requests on one connection)."""
import concurrent.futures
import json
import os
import socket

from tests.integration.helpers import Namespaces, nsexec, ping, sh
from vswitch import rpc


def _state(cluster):
    path = os.path.join(cluster.daemon.state_dir, "state.json")
    return json.load(open(path)) if os.path.exists(path) else {"attachments": [], "host": {"gateways": []}}


def _node_addresses(cluster):
    out = nsexec(cluster.node, "ip", "-o", "addr", "show", "dev", "vsw0").stdout
    return {line.split()[3] for line in out.splitlines()}


def _assert_only_host_port_left(cluster):
    show = cluster.daemon.call("show")
    assert [p["kind"] for p in show["ports"]] == ["host"]
    assert show["hostports"] == [] and show["gateways"] == []
    assert _state(cluster)["attachments"] == []
    assert cluster.daemon.call("list")["attachments"] == []
    assert nsexec(cluster.node, "ip", "-o", "link", "show", "type", "tun").stdout.count("vp") == 0


def test_detach_after_the_pod_namespace_was_deleted_releases_everything(cluster):
    a = cluster.add_pod("a", 2, port_mappings=[{"hostPort": 8080, "containerPort": 80}],
                        bandwidth={"egressRate": 10_000_000, "egressBurst": 1_000_000})
    assert ping(a.ns, cluster.gateway, count=1)["received"] == 1
    sh("ip", "netns", "del", a.ns)
    r = cluster.daemon.call("detach", container_id=a.cid, ifname="eth0")
    assert r["existed"] is True
    _assert_only_host_port_left(cluster)
    assert f"{cluster.gateway}/24" not in _node_addresses(cluster)
    assert cluster.daemon.call("detach", container_id=a.cid, ifname="eth0")["existed"] is False
    # the daemon is fine: a new pod on the same subnet works
    b = cluster.add_pod("b", 3)
    assert ping(b.ns, cluster.gateway, count=1)["received"] == 1


def test_detach_after_the_interface_was_deleted_behind_our_back(cluster):
    a = cluster.add_pod("a", 2, port_mappings=[{"hostPort": 8081, "containerPort": 80}])
    b = cluster.add_pod("b", 3)
    nsexec(a.ns, "ip", "link", "del", "eth0")
    r = cluster.daemon.call("detach", container_id=a.cid, ifname="eth0")
    assert r["existed"] is True and r["tap_existed"] is False
    show = cluster.daemon.call("show")
    assert {p["name"] for p in show["ports"]} == {"vsw0", b.port} and show["hostports"] == []
    assert [x["container_id"] for x in _state(cluster)["attachments"]] == [b.cid]
    assert ping(b.ns, cluster.gateway, count=1)["received"] == 1     # b's subnet keeps its gateway
    cluster.daemon.call("detach", container_id=b.cid, ifname="eth0")
    _assert_only_host_port_left(cluster)


def test_gateway_goes_with_the_last_pod_of_its_subnet(cluster):
    o = cluster.octet
    a = cluster.add_pod("a", 2)
    ns_b = cluster.nss.new("pb")
    gw_b = f"10.{o}.1.1"
    cluster.daemon.call("attach", container_id="ctr-b", ifname="eth0", netns=Namespaces.path(ns_b),
                        ips=[{"address": f"10.{o}.1.2/24", "gateway": gw_b}])
    ns_c = cluster.nss.new("pc")
    cluster.daemon.call("attach", container_id="ctr-c", ifname="eth0", netns=Namespaces.path(ns_c),
                        ips=[{"address": f"10.{o}.1.3/24", "gateway": gw_b}])
    show = cluster.daemon.call("show")
    assert show["gateways"] == [f"{cluster.gateway}/24", f"{gw_b}/24"]
    assert gw_b in show["node_addresses"] and f"{gw_b}/24" in _node_addresses(cluster)
    assert ping(ns_b, gw_b, count=1)["received"] == 1

    cluster.daemon.call("detach", container_id="ctr-b", ifname="eth0")     # c still uses it
    assert f"{gw_b}/24" in cluster.daemon.call("show")["gateways"]
    assert ping(ns_c, gw_b, count=1)["received"] == 1

    cluster.daemon.call("detach", container_id="ctr-c", ifname="eth0")     # the last one
    show = cluster.daemon.call("show")
    assert show["gateways"] == [f"{cluster.gateway}/24"]
    assert gw_b not in show["node_addresses"]                             # datapath binding
    assert f"{gw_b}/24" not in _node_addresses(cluster)                    # kernel address
    assert _state(cluster)["host"]["gateways"] == [f"{cluster.gateway}/24"]
    assert ping(a.ns, cluster.gateway, count=1)["received"] == 1


def test_more_subnets_than_the_host_port_holds_is_a_clear_error(cluster):
    o = cluster.octet
    for i in range(8):
        ns = cluster.nss.new(f"s{i}")
        cluster.daemon.call("attach", container_id=f"ctr-s{i}", ifname="eth0", netns=Namespaces.path(ns),
                            ips=[{"address": f"10.{o}.{i}.2/24", "gateway": f"10.{o}.{i}.1"}])
    ns9 = cluster.nss.new("s8")
    r = cluster.daemon.request({"op": "attach", "container_id": "ctr-s8", "ifname": "eth0",
                                "netns": Namespaces.path(ns9),
                                "ips": [{"address": f"10.{o}.8.2/24", "gateway": f"10.{o}.8.1"}]})
    assert r["ok"] is False and r["code"] == rpc.E_INVALID_CONFIG
    assert "at most 8 gateway addresses" in r["msg"] and f"10.{o}.8.1/24" in r["msg"]
    assert nsexec(ns9, "ip", "-o", "link", "show", "type", "tun").stdout.strip() == ""
    show = cluster.daemon.call("show")
    assert len(show["gateways"]) == 8 and len(show["ports"]) == 9
    assert ping(cluster.nss.names[-2], f"10.{o}.7.1", count=1)["received"] == 1
    cluster.daemon.call("detach", container_id="ctr-s0", ifname="eth0")   # frees a subnet
    assert cluster.daemon.call("attach", container_id="ctr-s8", ifname="eth0", netns=Namespaces.path(ns9),
                               ips=[{"address": f"10.{o}.8.2/24", "gateway": f"10.{o}.8.1"}])["ok"]
    assert ping(ns9, f"10.{o}.8.1", count=1)["received"] == 1


def test_gc_limited_to_one_network_keeps_the_others(cluster):
    o = cluster.octet
    pods = {}
    for i, (cid, net) in enumerate([("n1-a", "one"), ("n1-b", "one"), ("n2-a", "two"), ("nn", "")]):
        ns = cluster.nss.new("g")
        cluster.daemon.call("attach", container_id=cid, ifname="eth0", netns=Namespaces.path(ns), network=net,
                            ips=[{"address": f"10.{o}.0.{10 + i}/24", "gateway": cluster.gateway}])
        pods[cid] = ns
    r = cluster.daemon.call("gc", network="one", valid=[{"containerID": "n1-b", "ifname": "eth0"}])
    assert r["removed"] == [{"container_id": "n1-a", "ifname": "eth0"}] and r["errors"] == []
    assert sorted(a["container_id"] for a in cluster.daemon.call("list")["attachments"]) == ["n1-b", "n2-a", "nn"]
    bad = cluster.daemon.request({"op": "gc", "network": 5, "valid": []})
    assert bad["ok"] is False and bad["code"] == rpc.E_BAD_ARGS and "network" in bad["msg"]
    r = cluster.daemon.call("gc", valid=[{"containerID": "n2-a", "ifname": "eth0"}])   # every network
    assert sorted(x["container_id"] for x in r["removed"]) == ["n1-b", "nn"]
    assert [a["container_id"] for a in cluster.daemon.call("list")["attachments"]] == ["n2-a"]
    assert ping(pods["n2-a"], cluster.gateway, count=1)["received"] == 1


def test_parallel_clients_and_pipelined_requests_are_served_in_order(cluster):
    o = cluster.octet
    n = 20
    nss = [cluster.nss.new("q") for _ in range(n)]

    def attach(i):
        return rpc.call(cluster.daemon.socket, "attach", container_id=f"par{i}", ifname="eth0",
                        netns=Namespaces.path(nss[i]), ips=[{"address": f"10.{o}.0.{100 + i}/24",
                                                            "gateway": cluster.gateway}])

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(attach, range(n)))
    assert [r["attachment"]["ips"][0]["address"] for r in results] == [f"10.{o}.0.{100 + i}/24" for i in range(n)]
    assert len(_state(cluster)["attachments"]) == n
    assert ping(nss[0], f"10.{o}.0.{100 + n - 1}", count=1)["received"] == 1

    # several requests in one write on one connection: one reply each, in order
    lines = b""
    for i in range(n):
        lines += rpc.encode({"op": "detach", "container_id": f"par{i}", "ifname": "eth0"})
        lines += rpc.encode({"op": "status"})
    lines += rpc.encode({"op": "detach", "container_id": "par0", "ifname": "eth0"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(cluster.daemon.socket)
        s.sendall(lines)
        s.shutdown(socket.SHUT_WR)          # the daemon answers everything, then closes
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    replies = [json.loads(x) for x in data.splitlines()]
    assert len(replies) == 2 * n + 1
    assert [r.get("existed") for r in replies[0:2 * n:2]] == [True] * n
    assert [r["pods"] for r in replies[1:2 * n:2]] == list(range(n - 1, -1, -1))
    assert replies[-1] == {"ok": True, "existed": False}
    _assert_only_host_port_left(cluster)
