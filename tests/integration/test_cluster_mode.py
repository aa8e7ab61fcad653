"""vswitchd in cluster mode against a real etcd: leases, usePodCidr pods, restarts, etcd outages.

Every test builds a ``vswitch.lab.etcdns.ClusterLab``: an underlay bridge in its own
namespace with a real etcd member on it, node namespaces attached to it, a real vswitchd
per node in cluster mode, pods added through the real CNI plugin with host-local IPAM
(``"subnet": "usePodCidr"``), exactly as a runtime runs them. Everything is removed in
every outcome (daemons and etcd by their PIDs, then the namespaces). Expected values come
from the configuration: the cluster CIDR and node subnet size given on the command line.
Time bounds are generous invariants; the figures are printed (``-s``) for the report.
"""
from __future__ import annotations

import http.server
import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vswitch import lab, rpc
from vswitch.lab import REPO, SYSTEM_CNI_PATH, CniChain, CniError, Namespaces, kernel_unavailable
from vswitch.lab.etcd import etcd_unavailable

try:
    import etcd3gw  # noqa: F401
    _no_client = None
except ImportError as exc:
    _no_client = f"needs the etcd client of the cluster extra (etcd3gw): {exc}"

_skip = kernel_unavailable() or etcd_unavailable() or _no_client or (
    None if os.access(os.path.join(SYSTEM_CNI_PATH, "host-local"), os.X_OK)
    else "needs host-local (containernetworking-plugins)")
pytestmark = [pytest.mark.integration, pytest.mark.skipif(bool(_skip), reason=_skip or "")]

from vswitch.lab.etcdns import ClusterLab, wait_for  # noqa: E402

DUAL_CIDR, DUAL_SIZES = "10.244.0.0/16,fd00:10:244::/48", "24,64"


def subnets_of(d, timeout_s: float = 15.0) -> list[str]:
    """The node's leased subnets, once it holds them: a daemon with an uplink answers
    ``status`` before it has registered (it reaches etcd through its own switch)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return d.call("pod_cidr")["pod_cidrs"]
        except rpc.RpcError as exc:
            if exc.code != rpc.E_TRY_AGAIN or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def node_names(d) -> set[str]:
    return {n["name"] for n in d.call("nodes")["nodes"]}


class Plugin:
    """The vswitch CNI plugin installed for one node, with host-local on usePodCidr."""

    def __init__(self, d, workdir: Path, ranges: int = 1):
        from vswitch_cni.install import install
        bin_dir = workdir / "bin"
        install(str(bin_dir), str(workdir / "net.d"), socket_path=d.socket)
        ipam = {"type": "host-local", "dataDir": str(workdir / "ipam"),
                "ranges": [[{"subnet": "usePodCidr"}] for _ in range(ranges)],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}][:ranges]}
        self.chain = CniChain({"cniVersion": "1.0.0", "name": "cluster",
                               "plugins": [{"type": "vswitch", "socket": d.socket, "ipam": ipam}]},
                              cni_path=(bin_dir, SYSTEM_CNI_PATH))

    def add(self, nss: Namespaces, name: str):
        ns = nss.new("p")
        res = self.chain.add(f"ctr-{name}-{lab.uid()}", Namespaces.path(ns))
        return ns, [i["address"] for i in res["ips"]]


@pytest.fixture
def clab(tmp_path):
    with ClusterLab(workdir=tmp_path) as c:
        yield c


@pytest.fixture
def pods_nss():
    with Namespaces("cp") as n:
        yield n


def test_three_dual_stack_nodes_lease_distinct_subnets_pods_get_addresses_inside(tmp_path, pods_nss):
    with ClusterLab(DUAL_CIDR, DUAL_SIZES, workdir=tmp_path) as clab:
        ds = [clab.add_node(f"node-{i}") for i in range(3)]
        leases = {}
        for i, d in enumerate(ds):
            s = subnets_of(d)
            assert [ipaddress.ip_network(x).version for x in s] == [4, 6]
            assert ipaddress.ip_network(s[0]).prefixlen == 24 and ipaddress.ip_network(s[1]).prefixlen == 64
            assert ipaddress.ip_network(s[0]).subnet_of(ipaddress.ip_network("10.244.0.0/16"))
            assert ipaddress.ip_network(s[1]).subnet_of(ipaddress.ip_network("fd00:10:244::/48"))
            leases[f"node-{i}"] = s
        assert len({s[0] for s in leases.values()}) == 3 and len({s[1] for s in leases.values()}) == 3
        # every node sees all three, with the others' subnets as they hold them
        for d in ds:
            view = wait_for(lambda: (lambda r: r if len(r["nodes"]) == 3 else None)(d.call("nodes")), 10,
                            "3 nodes in the view")
            assert {n["name"]: n["pod_cidrs"] for n in view["nodes"]} == leases
            assert view["cluster"]["connected"] is True
        # pods through the plugin: both families, each inside its node's subnets
        for i, d in enumerate(ds):
            plugin = Plugin(d, tmp_path / f"cni{i}", ranges=2)
            for k in range(2):
                ns, addrs = plugin.add(pods_nss, f"p{i}{k}")
                assert len(addrs) == 2
                for a, net in zip(sorted(addrs, key=lambda a: ":" in a), leases[f"node-{i}"]):
                    assert ipaddress.ip_interface(a).ip in ipaddress.ip_network(net), (a, net)
            assert len(d.call("list")["attachments"]) == 2


def test_fourth_node_is_seen_by_the_others_within_2s(clab):
    ds = [clab.add_node(f"node-{i}") for i in range(3)]
    for d in ds:
        wait_for(lambda: len(node_names(d)) == 3, 10, "3 nodes")
    t0 = time.monotonic()
    d4 = clab.add_node("node-3")
    leased = time.monotonic()
    s4 = subnets_of(d4)
    seen = {}
    deadline = t0 + 30
    while len(seen) < 3 and time.monotonic() < deadline:
        for i, d in enumerate(ds):
            if i not in seen:
                n = {x["name"]: x for x in d.call("nodes")["nodes"]}
                if "node-3" in n:
                    assert n["node-3"]["pod_cidrs"] == s4
                    seen[i] = time.monotonic()
        time.sleep(0.01)
    assert len(seen) == 3, f"node-3 seen only by {seen}"
    # registration is at most the answer to `status` after start (lab.Daemon.start); the
    # issue's bound is 2 s from registration
    lag_s = max(seen.values()) - leased
    print(f"\nnode-3: daemon start -> answering {leased - t0:.3f} s; answering -> seen by all 3: {lag_s:.3f} s")
    assert lag_s < 2.0


def test_a_stopped_node_without_pods_revokes_its_lease_through_its_own_switch(tmp_path):
    """A clean leave (SIGTERM, no pods) deletes the node's keys at once: the revoke reaches
    etcd through the node's own switch (vsw0 -> uplink), so the daemon sends it while its
    loop still forwards. With a 60 s lease TTL the keys can only be gone because of it."""
    with ClusterLab(lease_ttl_s=60, workdir=tmp_path) as clab:
        a, b = clab.add_node("node-a"), clab.add_node("node-b")
        subnets_of(a)
        wait_for(lambda: node_names(b) == {"node-a", "node-b"}, 10, "b sees a")
        assert a.stop() == 0
        events = [json.loads(line) for line in a.logs().splitlines() if line.startswith("{")]
        stop = [e for e in events if e.get("event") == "cluster_stop"]
        assert stop and stop[-1]["revoke"] is True and stop[-1]["revoked"] is True, stop
        # b's watch sees the keys deleted (the TTL is 60 s: only the revoke removes them now)
        wait_for(lambda: node_names(b) == {"node-b"}, 10, "b forgets a")


def test_killed_daemon_restarts_with_the_same_subnet_and_its_pods(clab, pods_nss, tmp_path):
    a = clab.add_node("node-a")
    b = clab.add_node("node-b")
    wait_for(lambda: "node-a" in node_names(b), 10, "node-a seen by node-b")
    before = subnets_of(a)
    plugin = Plugin(a, tmp_path / "cni-a")
    ns, addrs = plugin.add(pods_nss, "pa")
    assert ipaddress.ip_interface(addrs[0]).ip in ipaddress.ip_network(before[0])
    a.kill9()
    # its record expires after the TTL (3 s): node-b forgets it
    wait_for(lambda: "node-a" not in node_names(b), 15, "node-a dropped by node-b after the TTL")
    a.start()
    assert subnets_of(a) == before
    att = a.call("list")["attachments"]
    assert [x["ips"][0]["address"] for x in att] == addrs         # re-adopted
    wait_for(lambda: {n["name"]: n["pod_cidrs"] for n in b.call("nodes")["nodes"]}.get("node-a") == before,
             10, "node-a back in node-b's view with its subnet")
    # the pod still answers its gateway through the re-adopted port
    gw = str(ipaddress.ip_network(before[0]).network_address + 1)
    assert lab.ping(ns, gw, count=2)["received"] >= 1


def test_etcd_down_fail_static_add_works_then_reconnects(clab, pods_nss, tmp_path):
    a = clab.add_node("node-a")
    b = clab.add_node("node-b")
    wait_for(lambda: "node-a" in node_names(b), 10, "node-a seen by node-b")
    plugin = Plugin(a, tmp_path / "cni-a")
    lease = subnets_of(a)
    clab.etcd.kill9()
    for d in (a, b):
        wait_for(lambda: d.call("status")["cluster"]["connected"] is False, 15, "connected: false")
    # fail static: the peers stay, the lease stays usable, pods are added
    assert "node-b" in node_names(a) and "node-a" in node_names(b)
    ns, addrs = plugin.add(pods_nss, "pa")
    assert ipaddress.ip_interface(addrs[0]).ip in ipaddress.ip_network(lease[0])
    m = a.call("metrics")["text"]
    assert "vswitch_cluster_connected 0" in m
    time.sleep(1.0)
    assert a.proc.poll() is None and b.proc.poll() is None
    clab.etcd.restart(timeout_s=30)
    for d in (a, b):
        wait_for(lambda: d.call("status")["cluster"]["connected"] is True, 20, "connected again")
    assert subnets_of(a) == lease
    wait_for(lambda: "node-a" in node_names(b) and "node-b" in node_names(a), 10, "both views again")


def test_no_lease_yet_add_fails_with_code_11_then_succeeds(clab, pods_nss, tmp_path):
    clab.etcd.kill9()                                   # etcd down from the start
    a = clab.add_node("node-a")
    st = a.call("status")["cluster"]
    assert st["registered"] is False and st["connected"] is False
    with pytest.raises(rpc.RpcError) as ei:
        a.call("pod_cidr")
    assert ei.value.code == 11
    plugin = Plugin(a, tmp_path / "cni-a")
    with pytest.raises(CniError) as ce:
        plugin.add(pods_nss, "pa")
    assert ce.value.code == 11, ce.value
    assert a.call("list")["attachments"] == []
    clab.etcd.restart(timeout_s=30)
    wait_for(lambda: a.call("status")["cluster"]["registered"], 20, "registered after etcd came up")
    ns, addrs = plugin.add(pods_nss, "pb")
    assert ipaddress.ip_interface(addrs[0]).ip in ipaddress.ip_network(subnets_of(a)[0])


def test_full_cluster_cidr_is_fatal_at_start(tmp_path):
    with ClusterLab("10.244.0.0/24", "24", workdir=tmp_path) as clab:
        clab.add_node("node-a")
        b = clab.add_node("node-b", start=False)
        # with the uplink (cluster mode implies VXLAN) the node reaches etcd through its own
        # switch, so the answer comes once the loop runs: before or after `status` answers
        try:
            b.start()
        except RuntimeError:
            pass
        assert b.proc.wait(30) == 3
        assert "no free /24 node subnet" in b.logs()


def test_cluster_cidr_smaller_than_node_subnet_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vswitch.daemon", "--socket", str(tmp_path / "s"),
                        "--state-dir", str(tmp_path / "st"), "--cluster-cidr", "10.244.0.0/24",
                        "--node-subnet-size", "16", "--etcd-endpoints", "http://127.0.0.1:1",
                        "--node-name", "n1"], capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert r.returncode == 2
    assert "node subnet size /16 is larger than cluster CIDR 10.244.0.0/24" in r.stderr


def test_endpoint_that_is_not_etcd_daemon_lives_and_says_so(clab):
    # an HTTP server that is not etcd, on the underlay (in the underlay namespace)
    srv = lab.nspopen(clab.underlay.ns, sys.executable, "-m", "http.server", "--bind",
                      clab.etcd.address, "8099", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lab.wait_listening(clab.underlay.ns, 8099)
        args = clab.node_args("node-x")
        args[args.index("--etcd-endpoints") + 1] = f"http://{clab.etcd.address}:8099"
        d = clab.add_node("node-x", args=args)
        time.sleep(1.5)
        assert d.proc.poll() is None
        st = wait_for(lambda: (lambda s: s if s["last_error"] else None)(d.call("status")["cluster"]), 10,
                      "an error in the status")
        assert st["connected"] is False and st["registered"] is False
        with pytest.raises(rpc.RpcError) as ei:
            d.call("pod_cidr")
        assert ei.value.code == 11
        print(f"\nnot-etcd endpoint: last_error = {st['last_error']}")
    finally:
        srv.kill()
        srv.wait(10)


def test_nodes_cli_table_and_json(clab):
    a = clab.add_node("node-a")
    b = clab.add_node("node-b")
    wait_for(lambda: "node-b" in node_names(a), 10, "node-b seen by node-a")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "vswitch.cli", "--socket", a.socket, "nodes"],
                         capture_output=True, text=True, timeout=30, env=env, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    assert "node-a" in out.stdout and "node-b" in out.stdout and subnets_of(b)[0] in out.stdout
    js = subprocess.run([sys.executable, "-m", "vswitch.cli", "--socket", a.socket, "--json", "nodes"],
                        capture_output=True, text=True, timeout=30, env=env, cwd=str(REPO))
    view = json.loads(js.stdout)
    assert {n["name"] for n in view["nodes"]} == {"node-a", "node-b"}
    assert view["cluster"]["connected"] is True


def test_install_cni_writes_use_pod_cidr_for_a_cluster_mode_daemon(clab, tmp_path):
    a = clab.add_node("node-a")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "vswitch.cli", "--socket", a.socket, "install-cni",
                        "--bin-dir", str(tmp_path / "b"), "--conf-dir", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=60, env=env, cwd=str(REPO))
    assert r.returncode == 0, r.stderr
    c = json.loads((tmp_path / "c" / "05-vswitch.conflist").read_text())
    assert c["plugins"][0]["ipam"]["ranges"] == [[{"subnet": "usePodCidr"}]]
    assert c["plugins"][0]["socket"] == a.socket


def test_cluster_mode_without_an_uplink_is_refused(tmp_path):
    # cluster mode implies VXLAN, which sends through the uplink
    r = subprocess.run([sys.executable, "-m", "vswitch.daemon", "--socket", str(tmp_path / "s"),
                        "--state-dir", str(tmp_path / "st"), "--cluster-cidr", "10.244.0.0/16",
                        "--node-subnet-size", "24", "--etcd-endpoints", "http://127.0.0.1:1",
                        "--node-name", "n1"], capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert r.returncode == 2
    assert "cluster mode (--cluster-cidr with --etcd-endpoints) needs --uplink" in r.stderr
