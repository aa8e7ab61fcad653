"""vswitch.switch.Switch over both datapath implementations: ports, rules, shapers, views."""
import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from vswitch.datapath import consts as C
from vswitch.config import Bandwidth, PortMapping, SwitchConfig
from vswitch.switch import Switch

MAC_A, MAC_B, MAC_X = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:99"
GW_MAC = "02:00:00:00:00:01"


@pytest.fixture
def sw(dp_impl):
    s = Switch(SwitchConfig(subnet="10.0.0.0/24", node_addresses=["192.0.2.1"], max_ports=16,
                            max_hostports=8), impl=dp_impl)
    s.add_port("host", "host")
    return s


def one(sw, frame, in_port, now_ns=0):
    """Process one frame; returns (out port name or FLOOD/DROP/QUEUED, rewritten bytes)."""
    data = bytes(frame)
    buf = np.zeros(len(data) + 64, np.uint8)
    buf[:len(data)] = np.frombuffer(data, np.uint8)
    offsets, lengths = np.array([0], np.uint32), np.array([len(data)], np.uint32)
    ins, outs = np.array([sw.port_id(in_port)], np.uint16), np.zeros(1, np.int32)
    sw.process(buf, offsets, lengths, ins, outs, 1, now_ns)
    o = int(outs[0])
    name = sw.port_name(o) if o >= 0 else {C.OUT_FLOOD: "FLOOD", C.OUT_DROP: "DROP", C.OUT_QUEUED: "QUEUED"}[o]
    return name, buf[:len(data)].tobytes()


def test_ports_ids_kinds_and_lookup(sw):
    a = sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"])
    b = sw.add_port("b", mac=MAC_B, ips=["10.0.0.3"])
    assert (sw.port("host").port_id, a.port_id, b.port_id) == (0, 1, 2)
    assert a.kind == "pod" and a.antispoof and sw.port("host").antispoof is False
    assert sw.port(1) == a and sw.port_name(2) == "b" and sw.port_id("a") == 1
    assert [p.name for p in sw.ports()] == ["host", "a", "b"]
    assert sw.pod_of_ip("10.0.0.3") == "b" and sw.pod_of_mac(MAC_A) == "a"
    assert sw.host_port.ips == ("10.0.0.1",) and sw.host_port.mac == GW_MAC
    assert sw.node_addresses == ("10.0.0.1", "192.0.2.1")
    with pytest.raises(KeyError, match="'nope'"):
        sw.port("nope")
    with pytest.raises(KeyError, match="99"):
        sw.port(99)


def test_explicit_port_id_and_reuse_after_remove(sw):
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"], port_id=7)
    assert sw.port_id("a") == 7
    sw.remove_port("a")
    assert "a" not in sw
    # the id, name, MAC and IP are free again
    assert sw.add_port("a2", mac=MAC_A, ips=["10.0.0.2"], port_id=7).port_id == 7


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="a", mac=MAC_B, ips=["10.0.0.9"]), ["'a'", "already exists"]),
    (dict(name="c", mac=MAC_A, ips=["10.0.0.9"]), [MAC_A, "'a'"]),
    (dict(name="c", mac=MAC_X, ips=["10.0.0.2"]), ["10.0.0.2", "'a'"]),
    (dict(name="c", mac="01:00:5e:00:00:01", ips=["10.0.0.9"]), ["multicast"]),
    (dict(name="c", mac="nope", ips=["10.0.0.9"]), ["'nope'"]),
    (dict(name="c", mac=MAC_X, ips=["10.0.0.300"]), ["10.0.0.300"]),
    (dict(name="c", mac=MAC_X, ips=["10.0.0.9"], port_id=1), ["port_id 1", "'a'"]),
    (dict(name="c", mac=MAC_X, ips=["10.0.0.9"], port_id=16), ["16"]),
    (dict(name="c", kind="bridge"), ["'bridge'"]),
    (dict(name="c", kind="host"), ["host port", "'host'"]),
    (dict(name="", mac=MAC_X), ["''"]),
    (dict(name="c", mac=MAC_X, ips=["10.0.0.9"], bandwidth={"ingressRate": 5}), ["ingress", "5"]),
    (dict(name="c", mac=MAC_X, ips=["10.0.0.9"],
          port_mappings=[{"hostPort": 8080, "containerPort": 80, "hostIP": "2001:db8::1"}]), ["IPv6"]),
    (dict(name="c", mac=MAC_X, ips=["10.0.0.9"],
          port_mappings=[{"hostPort": 8080, "containerPort": 80}]), ["8080", "'a'"]),
    (dict(name="c", kind="uplink", bandwidth={"ingressRate": 5, "ingressBurst": 5}), ["pod ports"]),
])
def test_bad_add_port_changes_nothing(sw, kwargs, words):
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"], port_mappings=[{"hostPort": 8080, "containerPort": 80}])
    before = (sw.describe(), sw.counters(), sw.hostports())
    with pytest.raises(ValueError) as ei:
        sw.add_port(**kwargs)
    for w in words:
        assert w in str(ei.value)
    assert (sw.describe(), sw.counters(), sw.hostports()) == before
    # the datapath did not keep a port either: the next free id is still usable
    c = sw.add_port("c", mac=MAC_X, ips=["10.0.0.9"])
    assert c.port_id == 2
    # a's MAC is bound: a static entry from add_port on (docs/datapath.md D42), no learning needed
    assert one(sw, Ether(src=MAC_X, dst=MAC_A) / IP(src="10.0.0.9", dst="10.0.0.2") / UDP(), "c")[0] == "a"


def test_antispoof_binding_is_applied(sw):
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"])
    sw.add_port("b", mac=MAC_B, ips=["10.0.0.3"])
    good = Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.0.2", dst="10.0.0.3") / UDP()
    assert one(sw, good, "a")[0] in ("FLOOD", "b")
    bad_ip = Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.0.77", dst="10.0.0.3") / UDP()
    bad_mac = Ether(src=MAC_X, dst=MAC_B) / IP(src="10.0.0.2", dst="10.0.0.3") / UDP()
    assert one(sw, bad_ip, "a")[0] == "DROP"
    assert one(sw, bad_mac, "a")[0] == "DROP"
    c = sw.counters()
    assert c["ports"]["a"]["drop_spoofed"] == 2 and c["global"]["spoofed"] == 2
    assert c["ports"]["a"]["rx_packets"] == 3
    sw.set_antispoof("a", False)
    assert sw.port("a").antispoof is False
    assert one(sw, bad_ip, "a")[0] != "DROP"


def test_counters_and_fdb_by_name(sw):
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"])
    sw.add_port("b", mac=MAC_B, ips=["10.0.0.3"])
    one(sw, Ether(src=MAC_B, dst=MAC_A) / IP(src="10.0.0.3", dst="10.0.0.2") / UDP(), "b", 5)
    assert one(sw, Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.0.2", dst="10.0.0.3") / UDP(), "a", 7)[0] == "b"
    c = sw.counters()
    assert set(c) == {"global", "ports"} and set(c["ports"]) == {"host", "a", "b"}
    assert set(c["ports"]["a"]) == set(C.PORT_COUNTERS) and set(c["global"]) == set(C.GLOBAL_COUNTERS)
    assert c["ports"]["b"]["tx_packets"] == 1 and c["global"]["packets"] == 2
    assert sw.counters("a")["ports"].keys() == {"a"}
    one(sw, Ether(src=MAC_X, dst="ff:ff:ff:ff:ff:ff") / IP(src="10.0.0.1", dst="10.0.0.255") / UDP(), "host", 8)
    fdb = {e["mac"]: e for e in sw.fdb(now_ns=10)}
    assert fdb[MAC_A]["port"] == "a" and fdb[MAC_B]["port"] == "b"
    assert fdb[MAC_B]["static"] and fdb[MAC_B]["last_seen_ns"] == 0 and fdb[MAC_B]["age_ns"] == 0   # bound
    assert fdb[MAC_X]["port"] == "host" and not fdb[MAC_X]["static"]                                   # learned
    assert fdb[MAC_X]["last_seen_ns"] == 8 and fdb[MAC_X]["age_ns"] == 2


def test_port_mapping_dnat_conntrack_view_and_removal(sw):
    sw.add_port("uplink", "uplink")
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"])
    m = sw.add_port_mapping("a", {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
    assert m == PortMapping(8080, 80)
    assert sw.add_port_mapping("a", m) == m        # the same mapping again: no change
    assert sw.port("a").port_mappings == (m,)
    assert sw.hostports() == [{"protocol": "tcp", "host_port": 8080, "host_ip": None, "family": 4,
                               "pod": "a", "pod_ip": "10.0.0.2", "container_port": 80}]
    syn = Ether(src=MAC_X, dst=GW_MAC) / IP(src="192.0.2.10", dst="192.0.2.1") / TCP(sport=4000, dport=8080)
    out, data = one(sw, syn, "uplink")
    assert out == "a"
    got = Ether(data)
    assert (got[IP].dst, got[TCP].dport, got.dst) == ("10.0.0.2", 80, MAC_A)
    (ct,) = sw.conntrack()
    assert (ct["proto"], ct["state"], ct["in_port"], ct["out_port"]) == ("tcp", "SYN_SENT", "uplink", "a")
    assert (ct["orig_src"], ct["orig_dst"], ct["reply_src"]) == ("192.0.2.10", "192.0.2.1", "10.0.0.2")
    assert sw.remove_port_mapping("a", m) is True
    assert sw.remove_port_mapping("a", m) is False
    assert sw.hostports() == [] and sw.port("a").port_mappings == ()
    syn2 = Ether(src=MAC_X, dst=GW_MAC) / IP(src="192.0.2.10", dst="192.0.2.1") / TCP(sport=4001, dport=8080)
    assert one(sw, syn2, "uplink")[0] != "a"


def test_port_mapping_conflicts_and_families(sw):
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2", "fd00::2"])
    sw.add_port("b", mac=MAC_B, ips=["10.0.0.3"])
    sw.add_port_mapping("a", PortMapping(8080, 80))
    rules = sw.hostports()
    assert [(r["family"], r["pod_ip"]) for r in rules] == [(4, "10.0.0.2"), (6, "fd00::2")]
    with pytest.raises(ValueError, match="8080.*'a'"):
        sw.add_port_mapping("b", PortMapping(8080, 81))
    with pytest.raises(ValueError, match="8080"):
        sw.add_port_mapping("a", PortMapping(8080, 81))     # same key, other container port
    sw.add_port_mapping("b", PortMapping(8080, 80, "udp"))  # other protocol: fine
    with pytest.raises(ValueError, match="IPv6"):
        sw.add_port_mapping("b", PortMapping(9090, 80, host_ip="2001:db8::1"))
    assert len(sw.hostports()) == 3
    sw.remove_port_mapping("a", PortMapping(8080, 80))     # both families go
    assert [r["pod"] for r in sw.hostports()] == ["b"]
    sw.remove_port("b")
    assert sw.hostports() == []


def test_max_hostports_refused_before_any_change(sw):
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"])
    for p in range(8):
        sw.add_port_mapping("a", PortMapping(1000 + p, 80))
    with pytest.raises(ValueError, match="max_hostports=8"):
        sw.add_port_mapping("a", PortMapping(2000, 80))
    assert len(sw.hostports()) == 8 and len(sw.port("a").port_mappings) == 8


def test_bandwidth_applied_replaced_and_cleared(sw):
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"], bandwidth={"ingressRate": 1_000_000, "ingressBurst": 80_000})
    st = sw.shaper_state("a")
    assert st["egress"] is None
    assert (st["ingress"]["rate_bps"], st["ingress"]["burst_bits"]) == (1_000_000, 80_000)
    sw.set_bandwidth("a", Bandwidth(egress_rate_bps=2_000_000, egress_burst_bits=16_000))
    st = sw.shaper_state("a")
    assert st["ingress"] is None and st["egress"]["rate_bps"] == 2_000_000
    assert sw.port("a").bandwidth.egress_burst_bits == 16_000
    with pytest.raises(ValueError, match="egressBurst"):
        sw.set_bandwidth("a", {"egressRate": 1, "egressBurst": -1})
    assert sw.shaper_state("a")["egress"]["rate_bps"] == 2_000_000     # unchanged
    sw.set_bandwidth("a", None)
    assert sw.shaper_state("a") == {"ingress": None, "egress": None}
    assert sw.port("a").bandwidth.is_empty


def test_set_port_up_and_node_addresses(sw):
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"])
    sw.add_port("b", mac=MAC_B, ips=["10.0.0.3"])
    sw.set_port_up("b", False)
    assert sw.port("b").up is False and sw.up_port_ids() == [0, 1]
    assert sw.set_node_addresses(["198.51.100.7"]) == ("10.0.0.1", "192.0.2.1", "198.51.100.7")
    with pytest.raises(ValueError, match="'bogus'"):
        sw.set_node_addresses(["bogus"])
    assert sw.node_addresses == ("10.0.0.1", "192.0.2.1", "198.51.100.7")


def test_trace_names_ports_and_changes_nothing(sw):
    sw.add_port("a", mac=MAC_A, ips=["10.0.0.2"])
    sw.add_port("b", mac=MAC_B, ips=["10.0.0.3"])
    one(sw, Ether(src=MAC_B, dst=MAC_A) / IP(src="10.0.0.3", dst="10.0.0.2") / UDP(), "b")
    before = sw.counters()
    stages = sw.trace(bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="10.0.0.2", dst="10.0.0.3") / UDP()), "a", 1)
    assert stages[0][0] == "rx" and stages[-1] == ("output", f"port {sw.port_id('b')} (b)")
    assert sw.counters() == before
    with pytest.raises(ValueError, match="str"):
        sw.trace("not bytes", "a", 1)


def test_impl_argument_forms(dp_impl):
    assert Switch(impl=dp_impl).impl is dp_impl
    with pytest.raises(ValueError, match="'rust'"):
        Switch(impl="rust")
    with pytest.raises(ValueError, match="config"):
        Switch(config=42)
    assert Switch({"max_ports": 4}, impl=dp_impl).config.max_ports == 4
