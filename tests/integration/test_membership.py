"""Cluster membership (vswitch.cluster) against a real etcd v3 started by the test.

Every test starts its own etcd member(s) on loopback (vswitch.lab.etcd: unique ports, temp
data dir, only their own PIDs signalled) or shares one per module under a unique key
prefix, and closes every Membership it started. Bounds in time are generous invariants;
the figures (join-to-seen latency, expiry) are measured by the report, not asserted tight.
The first tests need no etcd: the subnet arithmetic and the record format against their
spec (literal CIDRs and values).
"""
from __future__ import annotations

import http.server
import ipaddress
import json
import logging
import socket
import threading
import time

import pytest

from vswitch.cluster.records import Peer
from vswitch.cluster.subnets import ClusterFull, ClusterSpec, pick_free
from vswitch.lab import uid
from vswitch.lab.etcd import Etcd, EtcdCluster, TlsFiles, etcd_unavailable

try:
    import etcd3gw  # noqa: F401
    from vswitch.cluster.membership import Membership, MembershipError
    from vswitch.cluster.store import Store
    _no_client = None
except ImportError as exc:          # the `cluster` extra is not installed
    _no_client = f"needs the etcd client of the cluster extra (etcd3gw): {exc}"

needs_etcd = pytest.mark.skipif(bool(etcd_unavailable() or _no_client),
                                reason=etcd_unavailable() or _no_client or "")

TTL_S = 3


def wait_for(cond, timeout_s: float, what: str, step_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class Node:
    """A Membership plus a log of every peers list it was given (with the time)."""

    def __init__(self, name, endpoints, *, prefix, i=None, cidrs="10.244.0.0/16", sizes="24",
                 ttl_s=TTL_S, previous=(), **kw):
        i = int(name.rsplit("-", 1)[-1]) if i is None else i
        self.name = name
        self.calls: list[tuple[float, list[str]]] = []
        self.m = Membership(cluster_cidrs=cidrs, node_subnet_size=sizes, node_name=name,
                            node_ip=f"192.0.2.{i + 1}", vtep_mac=f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
                            etcd_endpoints=endpoints, prefix=prefix, lease_ttl_s=ttl_s,
                            previous_subnets=previous, on_peers=self._on_peers, **kw)

    def _on_peers(self, peers):
        self.calls.append((time.monotonic(), [p.name for p in peers]))

    def names(self) -> set[str]:
        return {p.name for p in self.m.peers}

    def start(self):
        self.m.start()
        return self


@pytest.fixture
def nodes():
    made: list[Node] = []

    def make(*a, start=True, **kw):
        n = Node(*a, **kw)
        made.append(n)
        return n.start() if start else n
    yield make
    for n in made:
        n.m.close(revoke=True, timeout_s=3)


@pytest.fixture(scope="module")
def shared_etcd():
    if etcd_unavailable() or _no_client:
        pytest.skip(etcd_unavailable() or _no_client)
    with Etcd() as e:
        yield e


@pytest.fixture
def prefix():
    return f"/vswitch-test-{uid()}/"


# -- no etcd: the arithmetic and the record format ------------------------------------

def test_cluster_spec_refuses_a_node_subnet_larger_than_the_cluster_cidr():
    with pytest.raises(ValueError, match=r"node subnet size /16 is larger than cluster CIDR 10\.0\.0\.0/24"):
        ClusterSpec.parse("10.0.0.0/24", "16")
    with pytest.raises(ValueError, match="not a network address"):
        ClusterSpec.parse("10.0.0.1/24", "26")
    with pytest.raises(ValueError, match="same address family twice"):
        ClusterSpec.parse("10.0.0.0/16,10.1.0.0/16", "24,24")
    with pytest.raises(ValueError, match="one prefix length per cluster CIDR"):
        ClusterSpec.parse("10.0.0.0/16,fd00::/48", "24")
    spec = ClusterSpec.parse("fd00:10:244::/48,10.244.0.0/16", "64,24")
    assert [(str(f.cluster_cidr), f.node_prefix) for f in spec.families] == \
        [("10.244.0.0/16", 24), ("fd00:10:244::/48", 64)]
    assert spec.families[0].subnet_count == 256 and spec.families[1].subnet_count == 65536


def test_pick_free_prefers_previous_and_reports_a_full_cidr():
    fam = ClusterSpec.parse("10.9.0.0/28", "30").families[0]
    prev = ipaddress.ip_network("10.9.0.8/30")
    assert pick_free(fam, set(), prev) == prev
    taken = {ipaddress.ip_network(c) for c in ("10.9.0.0/30", "10.9.0.4/30", "10.9.0.8/30")}
    assert pick_free(fam, taken, prev) == ipaddress.ip_network("10.9.0.12/30")   # the only free one
    with pytest.raises(ClusterFull, match=r"10\.9\.0\.0/28 has no free /30 node subnet: all 4 are leased"):
        pick_free(fam, taken | {ipaddress.ip_network("10.9.0.12/30")})
    big = ClusterSpec.parse("fd00::/32", "64").families[0]     # 2**32 subnets: sampled, not listed
    s = pick_free(big, set())
    assert s.prefixlen == 64 and s.subnet_of(ipaddress.ip_network("fd00::/32"))


def test_peer_record_validation():
    good = {"name": "n-1", "node_ip": "192.0.2.1", "vtep_mac": "02:00:00:00:00:01",
            "pod_cidrs": ["fd00:1::/64", "10.244.1.0/24"], "future_field": 1}
    p = Peer.from_json("n-1", json.dumps(good))
    assert p.pod_cidrs == ("10.244.1.0/24", "fd00:1::/64")
    for raw, msg in ((b"{not json", "not valid JSON"), (b"[1]", "JSON list"),
                     (json.dumps({**good, "node_ip": "300.1.1.1"}), "not an IPv4 or IPv6"),
                     (json.dumps({k: v for k, v in good.items() if k != "vtep_mac"}), "lacks field"),
                     (json.dumps({**good, "vtep_mac": "01:00:5e:00:00:01"}), "multicast"),
                     (json.dumps({**good, "pod_cidrs": ["10.1.0.0/16", "10.2.0.0/16"]}), "family twice"),
                     (json.dumps({**good, "name": "other"}), "stored under node key")):
        with pytest.raises(ValueError, match=msg):
            Peer.from_json("n-1", raw)


# -- real etcd ------------------------------------------------------------------------

@needs_etcd
@pytest.mark.integration
def test_three_join_then_a_fourth_is_seen_by_all(shared_etcd, prefix, nodes):
    ns = [nodes(f"node-{i}", shared_etcd.url, prefix=prefix, cidrs="10.244.0.0/16,fd00:10:244::/48",
                sizes="24,64") for i in range(3)]
    subnets = [n.m.wait_registered(10) for n in ns]
    flat = [s for pair in subnets for s in pair]
    assert len(set(flat)) == 6
    for pair in subnets:
        assert ipaddress.ip_network(pair[0]).subnet_of(ipaddress.ip_network("10.244.0.0/16"))
        assert ipaddress.ip_network(pair[0]).prefixlen == 24
        assert ipaddress.ip_network(pair[1]).subnet_of(ipaddress.ip_network("fd00:10:244::/48"))
        assert ipaddress.ip_network(pair[1]).prefixlen == 64
    for n in ns:
        others = {m.name for m in ns} - {n.name}
        wait_for(lambda: n.names() == others, 5, f"{n.name} to see {others}")
        by_name = {p.name: p for p in n.m.peers}
        for m in ns:
            if m is not n:
                assert by_name[m.name].pod_cidrs == m.m.subnets
                assert by_name[m.name].vtep_mac == m.m.vtep_mac
    fourth = nodes("node-3", shared_etcd.url, prefix=prefix, cidrs="10.244.0.0/16,fd00:10:244::/48",
                   sizes="24,64")
    fourth.m.wait_registered(10)
    registered_at = time.monotonic()
    for n in ns:
        wait_for(lambda: "node-3" in n.names(), 2.0, f"{n.name} to see node-3 within 2 s")
    seen_after_s = max(next(t for t, names in n.calls if "node-3" in names) for n in ns) - registered_at
    assert seen_after_s < 2.0
    assert fourth.names() == {"node-0", "node-1", "node-2"}
    for n in ns:
        st = n.m.status()
        assert st["connected"] and st["registered"] and st["peers"] == 3 and st["last_revision"] > 0


@needs_etcd
@pytest.mark.integration
@pytest.mark.slow
def test_lease_expires_without_keepalive_then_the_node_reclaims_its_subnet(shared_etcd, prefix, nodes):
    a, b = (nodes(f"node-{i}", shared_etcd.url, prefix=prefix) for i in range(2))
    a.m.wait_registered(10)
    subnet_b = b.m.wait_registered(10)
    wait_for(lambda: a.names() == {"node-1"}, 5, "a to see b")
    # b crashes: its threads stop, nothing is revoked; the lease runs out after the TTL.
    b.m.close(revoke=False)
    stopped = time.monotonic()
    wait_for(lambda: a.names() == set(), TTL_S + 5, "a to drop b after b's lease expired")
    gone_after_s = time.monotonic() - stopped
    assert gone_after_s >= 0.5          # not before the lease had time to run out (TTL 3 s, renewed every 1 s)
    assert Store(shared_etcd.url).get(f"{prefix}nodes/node-1") is None
    # it restarts with the subnet it saved: same subnet, and a sees it again
    b2 = nodes("node-1", shared_etcd.url, prefix=prefix, previous=subnet_b)
    assert b2.m.wait_registered(10) == subnet_b
    wait_for(lambda: a.names() == {"node-1"}, 5, "a to see b again")
    # and a restart before the old lease ran out takes the subnet over from its own old lease
    b2.m.close(revoke=False)
    b3 = nodes("node-1", shared_etcd.url, prefix=prefix, previous=subnet_b)
    assert b3.m.wait_registered(10) == subnet_b
    time.sleep(TTL_S + 1.5)             # the crashed incarnation's lease expires meanwhile
    assert a.names() == {"node-1"}
    kv = Store(shared_etcd.url).get(f"{prefix}subnets/{subnet_b[0].replace('/', '-')}")
    assert kv is not None and kv["lease"] == b3.m.status()["lease_id"]


@needs_etcd
@pytest.mark.integration
def test_twenty_nodes_registering_at_once_get_twenty_distinct_subnets(shared_etcd, prefix, nodes):
    # /20 of /24s: 16 subnets would not do; 32 /25s... use 10.50.0.0/19 → 32 /24s for 20 nodes
    ns = [nodes(f"node-{i}", shared_etcd.url, prefix=prefix, cidrs="10.50.0.0/19", start=False)
          for i in range(20)]
    go = threading.Barrier(20)

    def start(n):
        go.wait()
        n.start()
    ts = [threading.Thread(target=start, args=(n,)) for n in ns]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    got = [n.m.wait_registered(20)[0] for n in ns]
    assert len(set(got)) == 20, sorted(got)
    rev, kvs = Store(shared_etcd.url).range_prefix(prefix + "subnets/")
    owners = {kv["key"].rsplit("/", 1)[1]: json.loads(kv["value"])["node"] for kv in kvs}
    assert len(owners) == 20 and set(owners.values()) == {n.name for n in ns}
    for n in ns:
        wait_for(lambda: len(n.names()) == 19, 10, f"{n.name} to see 19 peers")


@needs_etcd
@pytest.mark.integration
@pytest.mark.slow
def test_etcd_down_keeps_peers_then_resyncs_and_reregisters(prefix, nodes):
    with Etcd() as etcd:
        ns = [nodes(f"node-{i}", etcd.url, prefix=prefix) for i in range(3)]
        subnets = [n.m.wait_registered(10) for n in ns]
        for n in ns:
            wait_for(lambda: len(n.names()) == 2, 5, "full mesh")
        calls_before = [len(n.calls) for n in ns]
        etcd.stop()
        down_at = time.monotonic()
        wait_for(lambda: all(not n.m.status()["connected"] for n in ns), 5, "all to say disconnected")
        time.sleep(2 * TTL_S)           # down for longer than the lease TTL
        for n in ns:
            st = n.m.status()
            assert not st["connected"] and st["since"] >= time.time() - (time.monotonic() - down_at) - 1
            assert st["last_error"] and etcd.url in st["last_error"]
            assert len(n.names()) == 2                      # fail static
        assert [len(n.calls) for n in ns] == calls_before   # nobody was told a peer went away
        etcd.restart()
        for n in ns:
            wait_for(lambda: n.m.status()["connected"], 10, f"{n.name} to reconnect")
        late = nodes("node-3", etcd.url, prefix=prefix)
        late.m.wait_registered(10)
        for n in ns:
            wait_for(lambda: n.names() == {m.name for m in ns + [late]} - {n.name}, 5, "re-sync")
            assert n.m.subnets == subnets[ns.index(n)]
        # etcd comes back empty (restored from nothing): every node registers again, with the
        # same subnets, and they find each other again, without a restart
        regs = [n.m.status()["registrations"] for n in ns]
        etcd.restart(wipe=True)
        for n, r0 in zip(ns, regs):
            wait_for(lambda: n.m.status()["registrations"] > r0, 10, f"{n.name} to register again")
            assert n.m.subnets == subnets[ns.index(n)]
        for n in ns + [late]:
            wait_for(lambda: len(n.names()) == 3, 10, f"{n.name} to see the others after the wipe")
        assert Store(etcd.url).get(f"{prefix}nodes/node-0") is not None


@needs_etcd
@pytest.mark.integration
@pytest.mark.slow
def test_one_member_of_three_killed_is_not_noticed():
    prefix = f"/vswitch-test-{uid()}/"
    with EtcdCluster(3) as ec:
        made = [Node(f"node-{i}", ec.endpoints, prefix=prefix).start() for i in range(3)]
        try:
            for n in made:
                n.m.wait_registered(10)
            for n in made:
                wait_for(lambda: len(n.names()) == 2, 5, "full mesh")
            calls = [len(n.calls) for n in made]
            ec.members[0].kill9()       # the first endpoint of every node
            t_end = time.monotonic() + 2 * TTL_S + 1
            while time.monotonic() < t_end:
                for n in made:
                    assert len(n.names()) == 2
                time.sleep(0.05)
            assert [len(n.calls) for n in made] == calls     # no peer ever went away
            for n in made:
                assert n.m.status()["connected"]
                assert n.m.status()["registrations"] == 1    # the leases lived on
            late = Node("node-3", ec.endpoints, prefix=prefix).start()
            made.append(late)
            late.m.wait_registered(10)
            for n in made[:3]:
                wait_for(lambda: "node-3" in n.names(), 2, f"{n.name} to see node-3")
            ec.members[0].restart()
        finally:
            for n in made:
                n.m.close(timeout_s=3)


@needs_etcd
@pytest.mark.integration
@pytest.mark.slow
def test_watch_resumes_from_its_revision_and_relists_after_compaction():
    """A node cut off from etcd (its only endpoint is a member that is down) misses changes;
    on return it resumes from its last revision, or re-lists when that was compacted."""
    prefix = f"/vswitch-test-{uid()}/"
    with EtcdCluster(3) as ec:
        cut = Node("node-0", [ec.endpoints[0]], prefix=prefix, ttl_s=30).start()
        rest = [Node(f"node-{i}", ec.endpoints[1:], prefix=prefix).start() for i in (1, 2)]
        made = [cut, *rest]
        try:
            for n in made:
                n.m.wait_registered(10)
            wait_for(lambda: cut.names() == {"node-1", "node-2"}, 5, "cut to see the others")
            relists = cut.m.status()["relists"]
            # outage 1: node-2 leaves, node-3 joins; nothing compacted → resume, no re-list
            ec.members[0].kill9()
            wait_for(lambda: not cut.m.status()["connected"], 5, "cut to notice")
            rest[1].m.close(revoke=True)
            made.append(Node("node-3", ec.endpoints[1:], prefix=prefix).start())
            made[-1].m.wait_registered(10)
            assert cut.names() == {"node-1", "node-2"}          # fail static while cut off
            ec.members[0].restart()
            wait_for(lambda: cut.names() == {"node-1", "node-3"}, 10, "cut to catch up")
            assert cut.m.status()["relists"] == relists
            # outage 2: node-3 leaves, node-4 joins, and the history is compacted → re-list
            ec.members[0].kill9()
            wait_for(lambda: not cut.m.status()["connected"], 5, "cut to notice")
            made[-1].m.close(revoke=True)
            made.append(Node("node-4", ec.endpoints[1:], prefix=prefix).start())
            made[-1].m.wait_registered(10)
            store = Store(ec.endpoints[1:])
            rev, _ = store.range_prefix(prefix)
            store.compact(rev)
            ec.members[0].restart()
            wait_for(lambda: cut.names() == {"node-1", "node-4"}, 10, "cut to re-list")
            assert cut.m.status()["relists"] == relists + 1
            assert cut.m.status()["connected"]
        finally:
            for n in made:
                n.m.close(timeout_s=3)


@needs_etcd
@pytest.mark.integration
def test_foreign_invalid_records_are_ignored_and_logged(shared_etcd, prefix, nodes, caplog):
    caplog.set_level(logging.WARNING, logger="vswitch.cluster")
    a = nodes("node-0", shared_etcd.url, prefix=prefix)
    a.m.wait_registered(10)
    store = Store(shared_etcd.url)
    store.put(prefix + "nodes/intruder", b"\xff{not json")
    store.put(prefix + "nodes/half", json.dumps({"name": "half", "node_ip": "192.0.2.9"}))
    b = nodes("node-1", shared_etcd.url, prefix=prefix)     # lists them at start
    b.m.wait_registered(10)
    wait_for(lambda: a.m.status()["ignored_records"] == 2, 5, "a to count both foreign records")
    wait_for(lambda: b.m.status()["ignored_records"] == 2, 5, "b to count both foreign records")
    wait_for(lambda: a.names() == {"node-1"} and b.names() == {"node-0"}, 5, "a and b to see each other")
    text = caplog.text
    assert f"{prefix}nodes/intruder" in text and "not valid JSON" in text
    assert f"{prefix}nodes/half" in text and "lacks field(s) vtep_mac, pod_cidrs" in text
    # the nodes live on: a third one is seen, and a foreign write over a real record is ignored
    c = nodes("node-2", shared_etcd.url, prefix=prefix)
    c.m.wait_registered(10)
    wait_for(lambda: a.names() == {"node-1", "node-2"}, 5, "a to see c")
    assert a.m.status()["connected"] and b.m.status()["connected"]


@needs_etcd
@pytest.mark.integration
def test_a_full_cluster_cidr_is_fatal_and_says_so(shared_etcd, prefix, nodes):
    fatal = []
    a, b = (nodes(f"node-{i}", shared_etcd.url, prefix=prefix, cidrs="10.9.0.0/29", sizes="30")
            for i in range(2))
    assert {a.m.wait_registered(10)[0], b.m.wait_registered(10)[0]} == {"10.9.0.0/30", "10.9.0.4/30"}
    c = nodes("node-2", shared_etcd.url, prefix=prefix, cidrs="10.9.0.0/29", sizes="30", on_fatal=fatal.append)
    with pytest.raises(MembershipError, match=r"node-2: cluster CIDR 10\.9\.0\.0/29 has no free /30 node "
                                              r"subnet: all 2 are leased"):
        c.m.wait_registered(10)
    assert len(fatal) == 1 and c.m.status()["fatal"]
    # the others are untouched: a stays connected and comes to see b (its watch may still lag)
    deadline = time.monotonic() + 10
    while a.names() != {"node-1"} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert a.m.status()["connected"] and a.names() == {"node-1"}


@needs_etcd
@pytest.mark.integration
def test_bad_configuration_is_refused_at_construction(shared_etcd):
    common = dict(node_name="n", node_ip="192.0.2.1", vtep_mac="02:00:00:00:00:01", etcd_endpoints=shared_etcd.url)
    with pytest.raises(ValueError, match=r"node subnet size /16 is larger than cluster CIDR 10\.1\.0\.0/24"):
        Membership(cluster_cidrs="10.1.0.0/24", node_subnet_size=16, **common)
    with pytest.raises(ValueError, match="etcd endpoint 'etcd:2379' is not accepted"):
        Membership(cluster_cidrs="10.1.0.0/16", node_subnet_size=24, **{**common, "etcd_endpoints": "etcd:2379"})
    with pytest.raises(ValueError, match="VTEP MAC"):
        Membership(cluster_cidrs="10.1.0.0/16", node_subnet_size=24, **{**common, "vtep_mac": "zz"})
    with pytest.raises(ValueError, match="TLS CA file '/nonexistent/ca.pem' does not exist"):
        Membership(cluster_cidrs="10.1.0.0/16", node_subnet_size=24, etcd_ca="/nonexistent/ca.pem", **common)


class _NotEtcd:
    """A TCP listener on loopback: ``silent`` accepts and never answers; ``http`` answers every
    request with 404 (another web service on the port)."""

    def __init__(self, kind: str):
        self.kind = kind
        if kind == "http":
            class H(http.server.BaseHTTPRequestHandler):
                def do_GET(self):
                    self.send_error(404, "no such page")
                do_POST = do_GET

                def log_message(self, *a):
                    pass
            self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
            self.port = self.srv.server_address[1]
            threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        else:
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(64)
            self.port = self.sock.getsockname()[1]

    def close(self):
        if self.kind == "http":
            self.srv.shutdown()
            self.srv.server_close()
        else:
            self.sock.close()


@needs_etcd
@pytest.mark.integration
@pytest.mark.parametrize("kind", ["http", "silent"])
def test_an_endpoint_that_is_not_etcd_gives_a_clear_error(kind, prefix, nodes):
    fake = _NotEtcd(kind)
    try:
        url = f"http://127.0.0.1:{fake.port}"
        n = nodes("node-0", url, prefix=prefix, request_timeout_s=0.5)
        with pytest.raises(TimeoutError) as ei:
            n.m.wait_registered(3)
        msg = str(ei.value)
        assert url in msg
        assert ("is not an etcd v3 server" in msg) if kind == "http" else ("Timeout" in msg)
        st = n.m.status()
        assert not st["connected"] and not st["registered"] and st["fatal"] is None
        assert all(t.is_alive() for t in n.m._threads)       # retrying, not crashed
    finally:
        fake.close()


@needs_etcd
@pytest.mark.integration
def test_tls_endpoint_with_ca_and_client_certificate(tmp_path, prefix, nodes):
    tls = TlsFiles(tmp_path / "tls")
    with Etcd(tls=tls, workdir=tmp_path / "etcd") as etcd:
        assert etcd.url.startswith("https://")
        kw = dict(prefix=prefix, etcd_ca=str(tls.ca), etcd_cert=str(tls.client_cert), etcd_key=str(tls.client_key))
        a, b = (nodes(f"node-{i}", etcd.url, **kw) for i in range(2))
        a.m.wait_registered(10)
        b.m.wait_registered(10)
        wait_for(lambda: a.names() == {"node-1"} and b.names() == {"node-0"}, 5, "TLS peers")
        # without a client certificate the member refuses us, and the error says TLS
        c = nodes("node-2", etcd.url, prefix=prefix, etcd_ca=str(tls.ca), request_timeout_s=1)
        with pytest.raises(TimeoutError, match="SSL|certificate|handshake"):
            c.m.wait_registered(3)
        for n in (a, b):
            n.m.close()


@needs_etcd
@pytest.mark.integration
def test_a_deleted_own_record_is_written_again(shared_etcd, prefix, nodes):
    a, b = (nodes(f"node-{i}", shared_etcd.url, prefix=prefix) for i in range(2))
    subnet_a = a.m.wait_registered(10)
    b.m.wait_registered(10)
    wait_for(lambda: b.names() == {"node-0"}, 5, "b to see a")
    Store(shared_etcd.url).delete(f"{prefix}nodes/node-0")       # another tool removes it
    wait_for(lambda: Store(shared_etcd.url).get(f"{prefix}nodes/node-0") is not None, 5, "a to rewrite it")
    wait_for(lambda: b.names() == {"node-0"}, 5, "b to see a again")
    assert a.m.subnets == subnet_a and a.m.status()["registrations"] == 2
