"""Fault injection in attach: a failure at any step leaves nothing behind (no TAP in the
node or the pod namespace, no switch port, no state entry, no gateway added for nothing),
and the same attach then succeeds. Malformed and hostile requests get error replies and
the daemon keeps serving."""
import json
import os
import socket

import pytest

from tests.integration.helpers import Namespaces, nsexec, ping
from vswitch.daemon.attachment import ATTACH_STEPS


def _state(cluster):
    path = os.path.join(cluster.daemon.state_dir, "state.json")
    return json.load(open(path)) if os.path.exists(path) else {"attachments": []}


@pytest.mark.parametrize("step", ATTACH_STEPS)
def test_fault_at_each_step_is_undone_and_a_retry_succeeds(cluster, step):
    ns = cluster.nss.new("f")
    args = dict(container_id="ctr-fault", ifname="eth0", netns=Namespaces.path(ns),
                ips=[{"address": f"10.{cluster.octet}.0.9/24", "gateway": cluster.gateway}],
                port_mappings=[{"hostPort": 8080, "containerPort": 80}],
                bandwidth={"egressRate": 10_000_000, "egressBurst": 1_000_000})
    r = cluster.daemon.request({"op": "attach", **args, "fault": step})
    assert r["ok"] is False and r["code"] == 107 and step in r["msg"]
    assert nsexec(ns, "ip", "-o", "link", "show", "type", "tun").stdout.strip() == ""
    assert nsexec(cluster.node, "ip", "-o", "link", "show", "type", "tun").stdout.count("vp") == 0
    show = cluster.daemon.call("show")
    assert [p["kind"] for p in show["ports"]] == ["host"]
    assert show["hostports"] == [] and show["gateways"] == []
    assert _state(cluster)["attachments"] == []
    ok = cluster.daemon.call("attach", **args)
    assert ok["attachment"]["ips"][0]["address"] == f"10.{cluster.octet}.0.9/24"
    assert ping(ns, cluster.gateway, count=1)["received"] == 1


def test_faults_are_refused_without_test_faults_flag(nss, tmp_path):
    from tests.integration.helpers import Cluster
    c = Cluster(nss, tmp_path)
    c.daemon.start()
    try:
        ns = nss.new("f")
        r = c.daemon.request({"op": "attach", "container_id": "x", "ifname": "eth0",
                              "netns": Namespaces.path(ns), "fault": "routes"})
        assert r["ok"] is False and r["code"] == 4 and "--test-faults" in r["msg"]
    finally:
        c.daemon.stop()


def test_attach_is_idempotent_and_conflicts_are_refused(cluster):
    a = cluster.add_pod("a", 2)
    args = dict(container_id=a.cid, ifname="eth0", netns=Namespaces.path(a.ns),
                ips=[{"address": f"{a.ip}/24", "gateway": cluster.gateway}])
    again = cluster.daemon.call("attach", **args)
    assert again["attachment"] == a.attachment
    r = cluster.daemon.request({"op": "attach", **args, "mtu": 9000})
    assert r["code"] == 4 and "mtu" in r["msg"]
    # the same ifname in the same namespace under another container id
    r = cluster.daemon.request({"op": "attach", **args, "container_id": "other"})
    assert r["code"] == 102


BAD_REQUESTS = [
    (b"this is not json\n", 105),
    (b"[1, 2, 3]\n", 105),
    (b'{"op": "no_such_op"}\n', 106),
    (b'{"op": 42}\n', 106),
    (b'{"op": "attach"}\n', 4),
    (b'{"op": "attach", "container_id": "x", "ifname": "a/b", "netns": "/x"}\n', 4),
    (b'{"op": "attach", "container_id": "x", "ifname": "eth0", "netns": "/nonexistent/ns"}\n', 4),
    (b'{"op": "attach", "container_id": "x", "ifname": "eth0", "netns": "/proc/1/ns/net", '
     b'"ips": [{"address": "10.0.0.300/24"}]}\n', 4),
    (b'{"op": "attach", "container_id": "x", "ifname": "eth0", "netns": "/proc/1/ns/net", '
     b'"bandwidth": {"ingressRate": -5}}\n', 4),
    (b'{"op": "attach", "container_id": "x", "ifname": "eth0", "netns": "/proc/1/ns/net", '
     b'"port_mappings": [{"hostPort": 70000, "containerPort": 80}]}\n', 4),
    (b'{"op": "capture_start", "port": "nope", "path": "/tmp/x"}\n', 4),
    (b'{"op": "trace", "in_port": 0, "frame_hex": "zz"}\n', 4),
    (b'{"op": "gc", "valid": "all"}\n', 4),
    (b"\xff\xfe\n", 105),
]


def test_malformed_and_hostile_requests_get_errors_and_the_daemon_survives(cluster):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(cluster.daemon.socket)
    f = s.makefile("rb")
    for raw, code in BAD_REQUESTS:
        s.sendall(raw)
        reply = json.loads(f.readline())
        assert reply["ok"] is False and reply["code"] == code, (raw, reply)
        assert reply["msg"]
    # a line over 1 MiB
    s.sendall(b"x" * ((1 << 20) + 10) + b"\n")
    reply = json.loads(f.readline())
    assert reply["code"] == 105
    s.sendall(b'{"op": "status"}\n')
    assert json.loads(f.readline())["ok"] is True
    s.close()
    # a client that connects and vanishes mid-line
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(cluster.daemon.socket)
    s.sendall(b'{"op": "sta')
    s.close()
    assert cluster.daemon.call("status")["ok"]
    st = os.stat(cluster.daemon.socket)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == 0
