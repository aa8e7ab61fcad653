"""Cluster membership against a real etcd: how long a node takes to join, and how long the
others take to learn it (issue 14).

Theory of operation
-------------------
- ``cluster-join`` (s), ``mode=daemon``, 3 nodes: ``vswitch.lab.etcdns.MemberCluster(2,
  etcd_members=1)`` (etcd on the underlay bridge, node namespaces, real vswitchd in cluster
  mode with VXLAN, a pod on each node through the CNI plugin on usePodCidr); per round a
  third node is added (``Cluster.add_node``) and the clock runs from just before its
  vswitchd is started until its pod (ADDed through the plugin as soon as the lease is
  there) answers a ping from the pod of *each* other node: daemon start, registration,
  the others learning it from etcd and resolving its underlay MAC, and the pod's CNI ADD,
  i.e. the time until traffic to the new node's pods can flow. Pings of 0.2 s each, from
  the other nodes in parallel threads. The node is then stopped (its lease kept: pods
  left) and removed; the round ends when the others have forgotten it (lease TTL 3 s).
  Most of it is the daemon's own start (interpreter, datapath import, host port), which
  the ``converge`` figure leaves out.
- ``cluster-join`` and ``cluster-converge`` (s), ``mode=membership``, 3 and 10 nodes:
  ``Membership`` instances (the library the daemon runs, same threads and etcd calls) in
  this process against one etcd on loopback; per round a new member starts: join = from
  ``start()`` until it is registered and every other member's ``on_peers`` has named it;
  converge = from its registration (its own ``on_subnets`` callback, which runs just
  after its record was written) until the last other member's ``on_peers`` named it
  (callback timestamps, no polling; a watcher can be told of the record before the
  registering thread reaches its callback, so a sample may be a few µs below zero). It then leaves (lease revoked) before the next round.
  Membership instances because 10 daemons (each a Python process with the datapath) do
  not fit this 2-core machine's other users; the daemon row above measures what the
  process adds.

flannel's etcd subnet manager is not installed here (no Debian package), so there is no
peer row; subject ``vswitch`` only.

    python -m bench --files bench_cluster.py          # root (namespaces) and etcd-server
"""
from __future__ import annotations

import time

import pytest

from vswitch import lab
from vswitch.lab.etcd import Etcd, etcd_unavailable

from .report import quick_mode, record

ROUNDS = 3 if quick_mode() else 5
SUBJECT = "vswitch"


def _skip_reason():
    try:
        import etcd3gw  # noqa: F401
    except ImportError as exc:
        return f"needs the cluster extra (etcd3gw): {exc}"
    return etcd_unavailable()


pytestmark = pytest.mark.skipif(bool(_skip_reason()), reason=_skip_reason() or "")


class _Member:
    def __init__(self, name, i, endpoints, prefix):
        from vswitch.cluster.membership import Membership
        self.name = name
        self.seen: dict[str, float] = {}          # peer name -> first time on_peers named it
        self.m = Membership(cluster_cidrs="10.244.0.0/16", node_subnet_size="24", node_name=name,
                            node_ip=f"192.0.2.{i + 1}", vtep_mac=f"02:00:00:00:00:{i + 1:02x}",
                            etcd_endpoints=endpoints, prefix=prefix, lease_ttl_s=10,
                            on_peers=self._on_peers, on_subnets=self._on_subnets)
        self.registered_at = None

    def _on_subnets(self, subnets):
        if self.registered_at is None:
            self.registered_at = time.monotonic()

    def _on_peers(self, peers):
        now = time.monotonic()
        for p in peers:
            self.seen.setdefault(p.name, now)


@pytest.mark.parametrize("nodes", [3, 10])
def test_membership_join_and_converge(benchmark, nodes, tmp_path):
    join_s, converge_s = [], []
    with Etcd(workdir=tmp_path / "etcd") as etcd:
        prefix = f"/bench-{lab.uid()}/"
        others = [_Member(f"n{i}", i, [etcd.url], prefix) for i in range(nodes - 1)]
        for o in others:
            o.m.start()
        try:
            for o in others:
                o.m.wait_registered(10)

            def one_round():
                name = f"new-{lab.uid()}"
                new = _Member(name, nodes, [etcd.url], prefix)
                t0 = time.monotonic()
                new.m.start()
                new.m.wait_registered(10)
                registered = new.registered_at
                deadline = registered + 10
                while not all(name in o.seen for o in others):
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{name} not seen by all within 10 s")
                    time.sleep(0.001)
                last = max(o.seen[name] for o in others)
                join_s.append(last - t0)
                converge_s.append(last - registered)
                new.m.close(revoke=True)
                for o in others:
                    o.seen.pop(name, None)

            benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        finally:
            for o in others:
                o.m.close(revoke=True)
    record(benchmark, group="cluster-join", subject=SUBJECT, unit="s", samples=join_s, nodes=nodes,
           mode="membership")
    benchmark.extra_info["converge_samples_s"] = converge_s
    print(f"\nmembership x{nodes}: join {sorted(join_s)} s, converge {sorted(converge_s)} s")


@pytest.mark.parametrize("nodes", [3, 10])
def test_membership_converge(benchmark, nodes, tmp_path):
    """The converge figure alone (its own group, so the report draws it)."""
    converge_s = []
    with Etcd(workdir=tmp_path / "etcd") as etcd:
        prefix = f"/bench-{lab.uid()}/"
        others = [_Member(f"n{i}", i, [etcd.url], prefix) for i in range(nodes - 1)]
        for o in others:
            o.m.start()
        try:
            for o in others:
                o.m.wait_registered(10)

            def one_round():
                name = f"new-{lab.uid()}"
                new = _Member(name, nodes, [etcd.url], prefix)
                new.m.start()
                new.m.wait_registered(10)
                registered = new.registered_at
                deadline = registered + 10
                while not all(name in o.seen for o in others):
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{name} not seen by all within 10 s")
                    time.sleep(0.001)
                converge_s.append(max(o.seen[name] for o in others) - registered)
                new.m.close(revoke=True)
                for o in others:
                    o.seen.pop(name, None)

            benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
        finally:
            for o in others:
                o.m.close(revoke=True)
    record(benchmark, group="cluster-converge", subject=SUBJECT, unit="s", samples=converge_s, nodes=nodes,
           mode="membership")


def _traffic_skip():
    why = lab.kernel_unavailable()
    if why:
        return why
    from vswitch.datapath import Datapath
    if not hasattr(Datapath, "set_vtep"):
        return "needs VXLAN in the datapath (issue 13)"
    return None


@pytest.mark.integration
@pytest.mark.skipif(bool(_traffic_skip()), reason=_traffic_skip() or "")
def test_daemon_join(benchmark):
    import threading

    from vswitch.lab.etcdns import MemberCluster
    join_s = []
    with MemberCluster(2, pods_per_node=1, etcd_members=1, lease_ttl_s=3) as c:
        others = list(c.nodes)

        def reachable(ns, ip, timeout_s=30.0):
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if lab.nsexec(ns, "ping", "-c", "1", "-W", "0.2", ip, check=False).returncode == 0:
                    return time.monotonic()
            return None

        def one_round():
            t0 = time.monotonic()
            node = c.add_node()
            try:
                got = {}
                threads = [threading.Thread(target=lambda o=o: got.__setitem__(
                    o.name, reachable(o.pods[0].ns, node.pods[0].ip))) for o in others]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if not all(got.values()):
                    raise AssertionError(f"{node.name}'s pod not reachable from {got}")
                join_s.append(max(got.values()) - t0)
            finally:
                c.nodes.remove(node)
                node.close()
            deadline = time.monotonic() + 30
            while any(node.name in {n["name"] for n in o.daemon.call("nodes")["nodes"]} for o in others):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{node.name} not forgotten within 30 s")
                time.sleep(0.05)

        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    record(benchmark, group="cluster-join", subject=SUBJECT, unit="s", samples=join_s, nodes=3, mode="daemon",
           note="from vswitchd start until its pod answers a ping from every other node")
    print(f"\ndaemon x3: start -> pod reachable from the other nodes {sorted(join_s)} s")
