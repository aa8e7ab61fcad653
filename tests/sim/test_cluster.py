"""The simulated cluster (issue 13 item 6): N nodes, each the real datapath, joined by VXLAN
over a virtual underlay. Every test runs on both implementations (``dp_impl``).

Expected values come from the VXLAN spec (/work/notes/vxlan-spec.md, RFC 7348), computed
here independently of the datapath: outer header fields, the UDP source port from the
FNV-1a flow hash, TTLs 64 → 63 (on the wire) → 62 (at the pod), checksums recomputed.
"""
import itertools
import os
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether

from vswitch.datapath import consts as C
from vswitch.sim import CBR, Cluster, Poisson
from vswitch.sim import frames as F


# ------------------------------------------------------------------ independent references

def inet_sum_ok(data: bytes) -> bool:
    """RFC 1071: the one's complement sum over a header with its checksum is 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s == 0xFFFF


def fnv1a32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def expected_sport(inner: bytes) -> int:
    """49152 + fold(FNV-1a(src, dst, proto[, sport, dport])) & 0x3FFF (the spec's flow hash)."""
    if inner[12:14] == b"\x08\x00":
        ihl = (inner[14] & 0xF) * 4
        key = inner[26:34] + inner[23:24]
        proto, l4 = inner[23], 14 + ihl
    else:
        key = inner[22:54] + inner[20:21]
        proto, l4 = inner[20], 54
    if proto in (6, 17):
        key += inner[l4:l4 + 4]
    h = fnv1a32(key)
    h ^= h >> 16
    return 49152 + (h & 0x3FFF)


def check_outer(frame: bytes, src, dst, vni: int = 1, udp_port: int = 4789) -> bytes:
    """Assert the 50 outer bytes are what the spec says for src → dst; return the inner frame."""
    assert frame[0:6] == dst.uplink_mac and frame[6:12] == src.uplink_mac
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:34]
    vihl, tos, total, ident, flags, ttl, proto = struct.unpack("!BBHHHBB", ip[:10])
    assert (vihl, tos, total, ident, flags, ttl, proto) == (0x45, 0, len(frame) - 14, 0, 0x4000, 64, 17)
    assert inet_sum_ok(ip)
    assert ip[12:16] == F.ip_bytes(src.ip) and ip[16:20] == F.ip_bytes(dst.ip)
    sport, dport, ulen, ucsum = struct.unpack("!HHHH", frame[34:42])
    inner = frame[50:]
    assert (dport, ulen, ucsum) == (udp_port, len(frame) - 34, 0)
    assert sport == expected_sport(inner)
    assert frame[42:50] == bytes([0x08, 0, 0, 0]) + vni.to_bytes(3, "big") + b"\0"
    assert inner[0:6] == dst.vtep_mac and inner[6:12] == src.vtep_mac
    return inner


# ------------------------------------------------------------------ fixtures

@pytest.fixture
def make_cluster(dp_impl):
    def make(**kw):
        kw.setdefault("seed", 0)
        return Cluster(impl=dp_impl, **kw)
    return make


def three_by_two(make, **kw):
    """3 nodes × 2 pods (p1a p1b on n1, ...), each listening on TCP 80 and UDP 53."""
    c = make(nodes=3, **kw)
    for k, node in enumerate(c.nodes.values(), 1):
        for s in "ab":
            node.add_pod(f"p{k}{s}", listen=[80, (53, "udp")])
    return c


# ------------------------------------------------------------------ topology

def test_nodes_get_addresses_subnets_and_peers(make_cluster):
    c = make_cluster(nodes=3)
    n1, n2, n3 = c.nodes.values()
    assert [(n.name, n.ip, [str(x) for x in n.cidrs]) for n in (n1, n2, n3)] == [
        ("n1", "192.168.0.1", ["10.244.1.0/24"]), ("n2", "192.168.0.2", ["10.244.2.0/24"]),
        ("n3", "192.168.0.3", ["10.244.3.0/24"])]
    p = c.add_pod("n2", "x")
    assert p.ip == "10.244.2.2" and n2.gateway == "10.244.2.1"
    assert len({n1.uplink_mac, n1.vtep_mac, n1.node.mac_bytes, n2.uplink_mac, n2.vtep_mac}) == 5
    vt = n1.switch.dp.vtep()
    assert (vt["port"], vt["ip"], vt["outer_mac"], vt["vtep_mac"], vt["vni"], vt["udp_port"], vt["mtu"]) == (
        n1.uplink_id, bytes([192, 168, 0, 1]), n1.uplink_mac, n1.vtep_mac, 1, 4789, 1500)
    rows = c.peers("n1")
    assert [(r["name"], r["ip"], r["vtep_mac"], r["underlay_mac"], r["cidrs"]) for r in rows] == [
        ("n2", bytes([192, 168, 0, 2]), n2.vtep_mac, n2.uplink_mac, [(bytes([10, 244, 2, 0]), 24)]),
        ("n3", bytes([192, 168, 0, 3]), n3.vtep_mac, n3.uplink_mac, [(bytes([10, 244, 3, 0]), 24)])]
    with pytest.raises(ValueError, match="already used in the cluster"):
        c.add_pod("n1", "x")
    with pytest.raises(ValueError, match="nodes"):
        make_cluster(nodes=0)
    with pytest.raises(ValueError, match="vni"):
        make_cluster(nodes=1, vni=1 << 24)


# ------------------------------------------------------------------ every pair, three protocols

KINDS = ("icmp", "tcp", "udp")


def request(src, dst, kind, seq):
    if kind == "icmp":
        return src.ping(dst, seq=seq)
    if kind == "tcp":
        return src.tcp_syn(dst, 80, sport=20000 + seq)
    return src.udp_to(dst, 53, b"query-%d" % seq, sport=20000 + seq)


def test_every_pod_reaches_every_other_pod_icmp_tcp_udp(make_cluster):
    c = three_by_two(make_cluster)
    pods = list(c.pods.values())
    seq = 0
    for src, dst, kind in itertools.product(pods, pods, KINDS):
        if src is dst:
            continue
        seq += 1
        sn, dn = c.node_of(src), c.node_of(dst)
        under0 = len(c.underlay_frames())
        src.clear()
        dst.clear()
        sent = src.send(request(src, dst, kind, seq))
        c.run()
        # the request as the destination pod saw it
        (_, got), = dst.received
        g = Ether(got)
        cross = sn is not dn
        assert g.dst == dst.mac
        assert g.src == (dn.node.mac if cross else src.mac)     # routed: from the gateway MAC
        assert g[IP].ttl == (62 if cross else 64)
        assert (g[IP].src, g[IP].dst) == (src.ip, dst.ip)
        assert bytes(g[IP].payload) == bytes(Ether(sent)[IP].payload)   # L4 untouched
        assert inet_sum_ok(got[14:34])
        # the answer came back to the source
        (_, back), = src.received
        b = Ether(back)
        assert (b[IP].src, b[IP].dst, b[IP].ttl) == (dst.ip, src.ip, 62 if cross else 64)
        if kind == "icmp":
            assert b[ICMP].type == 0 and b[ICMP].seq == seq
        elif kind == "tcp":
            assert str(b[TCP].flags) == "SA" and b[TCP].sport == 80
        else:
            assert bytes(b[UDP].payload) == b"query-%d" % seq
        # on the underlay: the request and the answer, encapsulated node to node
        wire = c.underlay_frames()[under0:]
        if not cross:
            assert wire == []
            continue
        assert len(wire) == 2
        inner = check_outer(wire[0][1], sn, dn)
        i = Ether(inner)
        assert i[IP].ttl == 63 and (i[IP].src, i[IP].dst) == (src.ip, dst.ip)
        assert inet_sum_ok(inner[14:34])
        assert bytes(i[IP].payload) == bytes(Ether(sent)[IP].payload)
        check_outer(wire[1][1], dn, sn)
    assert seq == 30 * 3
    g = {n: c.counters()["nodes"][n]["global"] for n in c.nodes}
    # each node encapsulates 2 pods × 4 remote pods × 3 kinds requests + as many answers
    assert all(g[n]["vxlan_encap"] == 48 and g[n]["vxlan_decap"] == 48 for n in c.nodes)
    row = {r["name"]: r for r in c.peers("n1")}
    assert row["n2"]["tx_packets"] == 24 and row["n2"]["rx_packets"] == 24


def test_ipv6_pods_across_nodes(make_cluster):
    c = make_cluster(nodes=2, pod_cidr6="fd00:244::/48")
    assert [str(x) for x in c.nodes["n2"].cidrs] == ["10.244.2.0/24", "fd00:244:0:2::/64"]
    a, b = c.add_pod("n1", "a"), c.add_pod("n2", "b")
    a.send(a.ping(b.ip6, seq=7))
    c.run()
    got = b.packets()[-1]
    assert got[IPv6].hlim == 62 and got[ICMPv6EchoRequest].seq == 7 and got.src == c.nodes["n2"].node.mac
    assert a.packets()[-1][ICMPv6EchoReply].seq == 7
    frame = c.underlay_frames()[0][1]
    inner = check_outer(frame, c.nodes["n1"], c.nodes["n2"])
    assert Ether(inner)[IPv6].hlim == 63


def test_a_pod_pings_another_nodes_gateway(make_cluster):
    """Decapsulated to the gateway address: to the host port; the node answers through VXLAN."""
    c = make_cluster(nodes=2)
    a = c.add_pod("n1", "a")
    n2 = c.nodes["n2"]
    a.send(a.ping(n2.gateway, seq=3))
    c.run()
    reply = a.packets()[-1]
    assert reply[IP].src == n2.gateway and reply[ICMP].type == 0 and reply[ICMP].seq == 3


def test_latency_on_the_underlay(make_cluster):
    c = make_cluster(nodes=3, latency_ns=1_000)
    c.set_latency("n1", "n3", 50_000)
    a, b, d = c.add_pod("n1", "a"), c.add_pod("n2", "b"), c.add_pod("n3", "d")
    a.send(a.ping(b))
    a.send(a.ping(d, seq=2))
    c.run()
    assert [t for t, _ in b.received] == [1_000] and [t for t, _ in d.received] == [50_000]
    assert sorted(t for t, _ in a.received) == [2_000, 100_000]
    assert c.now == 100_000 and all(n.now == 100_000 for n in c.nodes.values())


# ------------------------------------------------------------------ failures and membership

def test_a_killed_node_loses_its_traffic_and_the_rest_flows(make_cluster):
    c = three_by_two(make_cluster)
    p1a, p2a, p3a = c["p1a"], c["p2a"], c["p3a"]
    c.kill("n3")
    p1a.send(p1a.ping(p3a, seq=1))              # to the dead node: encapsulated, then lost
    p1a.send(p1a.ping(p2a, seq=2))              # between live nodes: flows
    p2a.send(p2a.udp_to(c["p1b"], 53, b"alive", sport=999))
    c.advance(1_000_000)
    assert [Ether(f)[ICMP].seq for _, f in p2a.received if Ether(f).haslayer(ICMP)] == [2]
    assert p3a.received == []
    assert [Ether(f)[ICMP].seq for _, f in p1a.received] == [2]
    assert bytes(p2a.packets()[-1][UDP].payload) == b"alive"
    u = c.counters()["underlay"]
    assert u["lost"] == 1
    assert c.counters()["nodes"]["n3"]["sim"].get("frames_in", 0) == 0
    p3a.send(p3a.ping(p1a, seq=9))              # the dead node's pods send nothing
    c.advance(1_000_000)
    assert c.counters()["nodes"]["n3"]["sim"].get("frames_in", 0) == 0 and len(p1a.received) == 1
    c.revive("n3")
    assert c.counters()["underlay"]["discarded_at_revive"] == 1     # p3a's ping, sent while dead
    p1a.send(p1a.ping(p3a, seq=4))
    c.run()
    assert Ether(p3a.received[-1][1])[ICMP].seq == 4 and Ether(p1a.received[-1][1])[ICMP].seq == 4


def test_peers_removed_and_added_at_run_time(make_cluster):
    c = three_by_two(make_cluster)
    p1a, p2a, p3a = c["p1a"], c["p2a"], c["p3a"]
    c.remove_peer("n1", "n2")                  # n1 forgets n2 (a peers file on n1)
    assert [r["name"] for r in c.peers("n1")] == ["n3"]
    under0 = len(c.underlay_frames())
    p1a.send(p1a.ping(p2a, seq=1))
    c.run()
    assert p2a.received == [] and len(c.underlay_frames()) == under0   # no route: not encapsulated
    assert c.counters()["nodes"]["n1"]["global"]["vxlan_encap"] == 0
    p3a.send(p3a.ping(p1a, seq=2))             # n1 ↔ n3 unaffected
    c.run()
    assert Ether(p3a.received[-1][1])[ICMP].seq == 2
    c.add_peer("n1", "n2")
    p1a.send(p1a.ping(p2a, seq=3))
    c.run()
    assert Ether(p1a.received[-1][1])[ICMP].seq == 3

    # an unresolved underlay MAC: counted drop, then flows once resolved
    c.set_resolved("n1", "n2", False)
    p1a.send(p1a.ping(p2a, seq=5))
    c.run()
    assert p2a.received[-1:] and Ether(p2a.received[-1][1])[ICMP].seq == 3
    assert c.counters()["nodes"]["n1"]["ports"]["p1a"]["drop_vxlan_unresolved"] == 1
    row = {r["name"]: r for r in c.peers("n1")}["n2"]
    assert row["underlay_mac"] is None and row["drop_unresolved"] == 1
    c.set_resolved("n1", "n2", True)
    p1a.send(p1a.ping(p2a, seq=6))
    c.run()
    assert Ether(p2a.received[-1][1])[ICMP].seq == 6

    # a node joins at run time: everyone learns it; it leaves: everyone forgets it
    n4 = c.add_node()
    assert n4.name == "n4" and [str(x) for x in n4.cidrs] == ["10.244.4.0/24"]
    q = n4.add_pod("q", listen=[80])
    for p in (p1a, p2a, p3a):
        p.send(p.tcp_syn(q, 80, sport=4444))
    c.run()
    assert sorted(Ether(f)[IP].src for _, f in q.received) == sorted([p1a.ip, p2a.ip, p3a.ip])
    assert all(str(p.packets()[-1][TCP].flags) == "SA" for p in (p1a, p2a, p3a))
    c.remove_node("n4")
    assert all("n4" not in [r["name"] for r in c.peers(n)] for n in c.nodes)
    before = len(c.underlay_frames())
    p1a.send(p1a.ping("10.244.4.2", seq=8))
    c.run()
    assert len(c.underlay_frames()) == before and len(q.received) == 3


# ------------------------------------------------------------------ hostile underlay

def test_malformed_and_foreign_underlay_frames_are_dropped_and_counted(make_cluster):
    c = three_by_two(make_cluster)
    n1, n2 = c.nodes["n1"], c.nodes["n2"]
    p1a, p2a = c["p1a"], c["p2a"]
    good = F.ether(n2.vtep_mac, n1.vtep_mac, F.ETH_IP4,
                   F.ipv4(F.ip_bytes(p1a.ip), F.ip_bytes(p2a.ip), 17,
                          F.udp(p1a.ip, p2a.ip, 7, 53, b"inj")))
    # a hand-built frame n1 → n2 is accepted (the reference for the bad ones below)
    c.inject(c.vxlan_frame("n1", "n2", good))
    c.run()
    assert bytes(p2a.packets()[-1][UDP].payload) == b"inj"
    p2a.clear()
    bad = {
        "vxlan_bad_vni": c.vxlan_frame("n1", "n2", good, vni=77),
        "vxlan_unknown_peer": c.vxlan_frame("192.168.0.99", "n2", good),
        "vxlan_not_ours": c.vxlan_frame("n1", "n2", F.ether(b"\x02\0\0\0\0\x09", good[6:12], 0x0800,
                                                             good[14:])),
        "vxlan_no_route": c.vxlan_frame("n1", "n2", F.ether(
            good[:6], good[6:12], 0x0800, F.ipv4(F.ip_bytes(p1a.ip), F.ip_bytes("10.244.2.99"), 17,
                                                 F.udp(p1a.ip, "10.244.2.99", 7, 53, b"x")))),
        "ttl_expired": c.vxlan_frame("n1", "n2", good[:14] + F.ipv4(
            F.ip_bytes(p1a.ip), F.ip_bytes(p2a.ip), 17, F.udp(p1a.ip, p2a.ip, 7, 53, b"t"), ttl=1)),
    }
    malformed = [
        c.vxlan_frame("n1", "n2", good, flags=0x00),            # no I bit
        c.vxlan_frame("n1", "n2", good[:20]),                    # UDP length < 8 + 8 + 14
        c.vxlan_frame("n1", "n2", good[:30]),                    # inner IPv4 header cut short
    ]
    rounds = 5
    for k in range(rounds):                     # a stream of them, while real traffic goes on
        for f in list(bad.values()) + malformed:
            c.inject(f, at_ns=c.now + k * 1000)
        p1a.send(p1a.ping(p2a, seq=k), at_ns=c.now + k * 1000 + 500)
    c.run()
    assert [Ether(f)[ICMP].seq for _, f in p2a.received] == list(range(rounds))
    assert [Ether(f)[ICMP].seq for _, f in p1a.received if ICMP in Ether(f)] == list(range(rounds))
    up = c.counters()["nodes"]["n2"]["ports"]["uplink"]
    for reason in bad:
        assert up["drop_" + reason] == rounds, reason
    assert up["drop_vxlan_malformed"] == rounds * len(malformed)
    assert c.counters()["nodes"]["n2"]["global"]["vxlan_decap"] == 1 + rounds
    assert all(p.received == [] for p in (c["p2b"], c["p1b"], c["p3a"], c["p3b"]))


def test_a_pod_frame_with_ttl_1_to_another_node_is_dropped(make_cluster):
    c = three_by_two(make_cluster)
    p1a, p2a = c["p1a"], c["p2a"]
    f = bytearray(p1a.udp_to(p2a, 53, b"x"))
    f[14 + 8] = 1
    f[24:26] = b"\0\0"
    f[24:26] = struct.pack("!H", F.csum(bytes(f[14:34])))
    p1a.send(bytes(f))
    c.run()
    assert p2a.received == [] and c.underlay_frames() == []
    assert c.counters()["nodes"]["n1"]["ports"]["p1a"]["drop_ttl_expired"] == 1


# ------------------------------------------------------------------ batches leave headroom

def test_every_batch_leaves_encap_headroom_before_each_vnet_header(make_cluster):
    """The spec's contract: ENCAP_HEADROOM bytes before each frame's vnet header belong to
    no other frame of the batch, in the event engine's batches and the bulk engine's."""
    c = make_cluster(nodes=2, vnet_hdr_len=12)
    a, b = c.add_pod("n1", "a"), c.add_pod("n2", "b")
    n1 = c.nodes["n1"]
    seen = []
    real = n1.switch.process

    def recording(buf, offsets, lengths, in_ports, out_ports, n, now_ns):
        spans = sorted((int(offsets[i]), int(lengths[i])) for i in range(n))
        seen.append(spans)
        end = 0
        for off, length in spans:
            assert off - 12 - C.ENCAP_HEADROOM >= end
            end = off + length
        real(buf, offsets, lengths, in_ports, out_ports, n, now_ns)

    n1.switch.process = recording
    for k in range(5):
        a.send(a.udp_to(b, 53, b"x" * (k * 37), sport=1000 + k))     # one batch of 5
    c.run()
    assert len(b.received) == 5 and [len(s) for s in seen] == [5]
    from vswitch.sim import Simulation
    s = Simulation(impl=c.impl, vnet_hdr_len=12)
    x, y = s.add_pod("x"), s.add_pod("y")
    real = s.switch.process
    seen.clear()
    s.switch.process = recording
    s.run_bulk([("x", CBR([x.udp_to(y, 9, b"p" * n) for n in (1, 500, 1400)], rate_pps=10**6, count=300))])
    assert sum(len(v) for v in seen) == 300


# ------------------------------------------------------------------ determinism

def scenario(impl, seed, directory):
    """A bit of everything: pairs across nodes, Poisson traffic, latency, a kill, peers changed."""
    c = Cluster(nodes=3, seed=seed, impl=impl, latency_ns=2_000, vnet_hdr_len=12)
    pods = []
    for k, node in enumerate(c.nodes.values(), 1):
        for s in "ab":
            pods.append(node.add_pod(f"p{k}{s}", listen=[80, (53, "udp")]))
    for i, (src, dst) in enumerate(itertools.permutations(pods, 2)):
        src.send(request(src, dst, KINDS[i % 3], i))
    c.nodes["n1"].generate("p1a", Poisson(pods[0].udp_to(pods[3], 53, b"poisson"), rate_pps=20_000,
                                          count=40))
    c.advance(500_000)
    c.kill("n2")
    pods[4].send(pods[4].ping(pods[2]))
    pods[0].send(pods[0].ping(pods[2]))
    c.advance(100_000)
    c.revive("n2")
    c.remove_peer("n3", "n1")
    pods[5].send(pods[5].ping(pods[0]))        # n3 has no route to n1's pods for a while
    c.advance(10_000)
    c.add_peer("n3", "n1")
    pods[5].send(pods[5].ping(pods[1], seq=2), at_ns=c.now + 10_000)
    c.inject(c.vxlan_frame("n1", "n3", b"\0" * 40, vni=9))
    c.run()
    return c, c.write_pcaps(directory)


def test_both_implementations_write_identical_pcaps(both_impls, tmp_path):
    py, cy = both_impls
    c_py, paths_py = scenario(py, 7, tmp_path / "py")
    c_c, paths_c = scenario(cy, 7, tmp_path / "c")
    names = [os.path.basename(p) for p in paths_py]
    assert names == [os.path.basename(p) for p in paths_c]
    assert "underlay.pcap" in names and "n1-uplink.pcap" in names and "n3-p3b.pcap" in names
    assert len(names) == 1 + 3 * 4
    for p, q in zip(paths_py, paths_c):
        assert open(p, "rb").read() == open(q, "rb").read(), os.path.basename(p)
    assert c_py.counters() == c_c.counters()
    u = c_py.counters()["underlay"]
    assert u["frames"] > 100 and u["lost"] > 0 and u["discarded_at_revive"] == 0
    # and a different seed gives different bytes (MACs, ISNs come from the seed)
    _, paths_other = scenario(py, 8, tmp_path / "other")
    assert open(paths_other[0], "rb").read() != open(paths_py[0], "rb").read()


def test_run_bulk_is_refused_on_a_cluster_node(make_cluster):
    c = make_cluster(nodes=2)
    a, b = c.add_pod("n1", "a"), c.add_pod("n2", "b")
    with pytest.raises(ValueError, match="run_bulk"):
        c.nodes["n1"].run_bulk([("a", CBR(a.udp_to(b, 9), rate_pps=10, count=1))])
