"""Which peer records cluster mode hands to the VXLAN table (vswitch.daemon.cluster.usable_peers).

A record in etcd is untrusted input: the rules of the module docstring decide, before the
VXLAN table sees the list. No etcd here: ClusterMode without a started membership (this
node holds no subnet), the cluster CIDRs from its configuration.
"""
from vswitch.daemon.cluster import ClusterConfig, ClusterMode


def _mode():
    conf = ClusterConfig("10.244.0.0/16,fd00:10:244::/48", "24,64", "http://127.0.0.1:2379", "me")
    return ClusterMode(conf, state=None, log=lambda *a, **k: None)


def _peer(name, ip, cidrs, rev):
    return {"name": name, "node_ip": ip, "vtep_mac": "02:00:00:00:00:01", "pod_cidrs": cidrs,
            "mod_revision": rev}


def test_good_peers_pass_sorted_by_name():
    ok, refused = _mode().usable_peers([_peer("b", "10.0.0.2", ["10.244.2.0/24"], 5),
                                        _peer("a", "10.0.0.1", ["10.244.1.0/24", "fd00:10:244:1::/64"], 9)])
    assert [p["name"] for p in ok] == ["a", "b"] and refused == {}


def test_ipv6_node_ip_and_foreign_cidrs_are_refused_with_the_reason():
    ok, refused = _mode().usable_peers([
        _peer("v6", "fd00::1", ["10.244.3.0/24"], 1),
        _peer("outside", "10.0.0.4", ["10.99.0.0/24"], 2),
        _peer("outside6", "10.0.0.5", ["10.244.5.0/24", "fd00:99::/64"], 3),
        _peer("good", "10.0.0.6", ["10.244.6.0/24"], 4)])
    assert [p["name"] for p in ok] == ["good"]
    assert "not IPv4" in refused["v6"]
    assert "10.99.0.0/24 is outside the cluster CIDR" in refused["outside"]
    assert "fd00:99::/64 is outside" in refused["outside6"]


def test_the_older_record_keeps_a_contested_cidr_whatever_the_names():
    ok, refused = _mode().usable_peers([_peer("aaa-forger", "10.0.0.9", ["10.244.7.0/25"], 20),
                                        _peer("zzz-owner", "10.0.0.7", ["10.244.7.0/24"], 10)])
    assert [p["name"] for p in ok] == ["zzz-owner"]
    assert refused == {"aaa-forger": "pod CIDR 10.244.7.0/25 overlaps an older peer's CIDR 10.244.7.0/24"}
