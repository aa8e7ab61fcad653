"""vswitch.config: CNI spellings accepted, bad values refused with the key and value named."""
import dataclasses

import pytest

from vswitch.config import Bandwidth, PortMapping, SwitchConfig, format_mac, parse_ip, parse_mac


# ----------------------------------------------------------------------------- Bandwidth

def test_bandwidth_from_cni_camel_case():
    bw = Bandwidth.from_cni({"ingressRate": 10_000_000, "ingressBurst": 100_000,
                             "egressRate": 20_000_000, "egressBurst": 200_000})
    assert bw == Bandwidth(10_000_000, 100_000, 20_000_000, 200_000)
    assert bw.to_cni() == {"ingressRate": 10_000_000, "ingressBurst": 100_000,
                           "egressRate": 20_000_000, "egressBurst": 200_000}


def test_bandwidth_from_cni_go_spelling_and_one_direction():
    bw = Bandwidth.from_cni({"EgressRate": 1000, "EgressBurst": 4294967295})
    assert bw.egress_rate_bps == 1000 and bw.egress_burst_bits == 4294967295
    assert bw.ingress_rate_bps == 0 and not bw.is_empty
    assert bw.to_cni() == {"egressRate": 1000, "egressBurst": 4294967295}


def test_bandwidth_huge_bursts_and_json_floats():
    bw = Bandwidth.from_cni({"ingressRate": 1e7, "ingressBurst": 2 ** 35})   # CRI-O sends ~2^35
    assert bw.ingress_rate_bps == 10_000_000 and isinstance(bw.ingress_rate_bps, int)
    assert bw.ingress_burst_bits == 2 ** 35


def test_bandwidth_empty_and_none():
    assert Bandwidth.from_cni(None).is_empty
    assert Bandwidth.from_cni({}).is_empty
    assert Bandwidth.from_cni({}).to_cni() == {}


@pytest.mark.parametrize("bad, words", [
    ({"ingressRate": 1000}, ["ingress", "1000", "both"]),
    ({"egressBurst": 1000}, ["egress", "1000"]),
    ({"ingressRate": -1, "ingressBurst": 10}, ["ingressRate", "-1"]),
    ({"ingressRate": "fast", "ingressBurst": 10}, ["ingressRate", "'fast'"]),
    ({"ingressRate": True, "ingressBurst": 10}, ["ingressRate", "True"]),
    ({"ingressRate": 1.5, "ingressBurst": 10}, ["ingressRate", "1.5"]),
    ({"ingressRate": 2 ** 63, "ingressBurst": 10}, ["ingressRate", str(2 ** 63)]),
    ({"ingressrate": 10, "ingressBurst": 10}, ["ingressrate", "unknown"]),
    ({"ingressRate": 10, "IngressRate": 20, "ingressBurst": 1}, ["conflicting"]),
    ([1, 2], ["bandwidth", "[1, 2]"]),
])
def test_bandwidth_bad_values_name_key_and_value(bad, words):
    with pytest.raises(ValueError) as ei:
        Bandwidth.from_cni(bad)
    for w in words:
        assert w in str(ei.value)


def test_bandwidth_is_frozen():
    bw = Bandwidth()
    with pytest.raises(dataclasses.FrozenInstanceError):
        bw.ingress_rate_bps = 5


# ----------------------------------------------------------------------------- PortMapping

def test_port_mapping_spellings():
    a = PortMapping.from_cni({"hostPort": 8080, "containerPort": 80, "protocol": "tcp"})
    b = PortMapping.from_cni({"HostPort": 8080, "ContainerPort": 80, "Protocol": "TCP", "HostIP": ""})
    assert a == b == PortMapping(8080, 80, "tcp", None)
    assert a.proto_number == 6
    c = PortMapping.from_cni({"hostPort": 53, "containerPort": 5353, "protocol": "udp", "hostIP": "192.0.2.1"})
    assert c.host_ip == "192.0.2.1" and c.proto_number == 17
    assert c.to_cni() == {"hostPort": 53, "containerPort": 5353, "protocol": "udp", "hostIP": "192.0.2.1"}
    assert PortMapping.from_cni({"hostPort": 1, "containerPort": 2}).protocol == "tcp"
    assert PortMapping(1, 2, host_ip="::").host_ip is None
    assert PortMapping(1, 2, host_ip="2001:db8::1").host_ip == "2001:db8::1"


@pytest.mark.parametrize("bad, words", [
    ({"hostPort": 0, "containerPort": 80}, ["hostPort", "0"]),
    ({"hostPort": 70000, "containerPort": 80}, ["hostPort", "70000"]),
    ({"hostPort": 80, "containerPort": "80"}, ["containerPort", "'80'"]),
    ({"hostPort": 80, "containerPort": 80, "protocol": "sctp"}, ["protocol", "'sctp'"]),
    ({"hostPort": 80, "containerPort": 80, "hostIP": "1.2.3"}, ["hostIP", "'1.2.3'"]),
    ({"containerPort": 80}, ["hostPort", "missing"]),
    ({"hostPort": 80, "containerPort": 80, "podPort": 1}, ["podPort"]),
    ("8080:80", ["portMapping", "8080:80"]),
])
def test_port_mapping_bad_values(bad, words):
    with pytest.raises(ValueError) as ei:
        PortMapping.from_cni(bad)
    for w in words:
        assert w in str(ei.value)


# ----------------------------------------------------------------------------- SwitchConfig

def test_switch_config_defaults_and_datapath_kwargs():
    c = SwitchConfig()
    assert c.subnet == "10.0.0.0/24" and c.gateway == "10.0.0.1"
    kw = c.datapath_kwargs()
    from vswitch.datapath.consts import DEFAULTS
    assert kw == DEFAULTS
    assert c.gateways == ("10.0.0.1",)


def test_switch_config_dual_stack_and_round_trip():
    c = SwitchConfig(subnet="10.1.0.0/16", subnet6="fd00::/64", node_addresses=["192.0.2.1"])
    assert c.gateway == "10.1.0.1" and c.gateway6 == "fd00::1"
    assert c.node_addresses == ("192.0.2.1",)
    assert SwitchConfig.from_dict(c.to_dict()) == c
    assert c.replace(max_ports=10).max_ports == 10


@pytest.mark.parametrize("kw, words", [
    (dict(subnet="10.0.0.0/31"), ["subnet", "10.0.0.0/31"]),
    (dict(subnet="fd00::/64"), ["subnet", "fd00::/64"]),
    (dict(subnet="banana"), ["subnet", "banana"]),
    (dict(gateway="10.0.1.1"), ["gateway", "10.0.1.1"]),
    (dict(gateway="10.0.0.0"), ["gateway", "10.0.0.0"]),
    (dict(gateway6="fd00::1"), ["gateway6", "without subnet6"]),
    (dict(gateway_mac="zz"), ["gateway_mac", "'zz'"]),
    (dict(vnet_hdr_len=11), ["vnet_hdr_len", "11"]),
    (dict(max_ports=0), ["max_ports", "0"]),
    (dict(max_ports=70000), ["max_ports", "70000"]),
    (dict(mac_aging_ns=-5), ["mac_aging_ns", "-5"]),
    (dict(node_addresses="192.0.2.1"), ["node_addresses"]),
])
def test_switch_config_bad_values(kw, words):
    with pytest.raises(ValueError) as ei:
        SwitchConfig(**kw)
    for w in words:
        assert w in str(ei.value)


def test_switch_config_from_dict_unknown_key():
    with pytest.raises(ValueError, match="max_port"):
        SwitchConfig.from_dict({"max_port": 3})


def test_mac_and_ip_helpers():
    assert parse_mac("AA-bb-cc-dd-ee-ff") == bytes.fromhex("aabbccddeeff")
    assert format_mac(bytes(range(6))) == "00:01:02:03:04:05"
    assert str(parse_ip("10.0.0.5/24")) == "10.0.0.5"
    assert str(parse_ip(bytes([10, 0, 0, 1]))) == "10.0.0.1"
    with pytest.raises(ValueError, match="aa:bb"):
        parse_mac("aa:bb")
    with pytest.raises(ValueError, match="'x'"):
        parse_ip("x")


# ----------------------------------------------------------------------------- one definition

def test_plugin_and_control_plane_share_one_definition():
    import vswitch.cnitypes as T
    from vswitch import rpc
    from vswitch.daemon import attachment
    from vswitch_cni import conf as plugin_conf, plugin
    assert PortMapping is T.PortMapping is plugin_conf.PortMapping
    assert Bandwidth is T.Bandwidth is plugin_conf.Bandwidth
    assert plugin_conf.DEFAULT_SOCKET == rpc.DEFAULT_SOCKET == "/run/vswitch/vswitchd.sock"
    assert plugin.DAEMON_FAULT_STEPS is attachment.ATTACH_STEPS is T.ATTACH_STEPS


def test_values_hash_copy_and_pickle_by_value():
    import copy
    import pickle
    pm = PortMapping.from_cni({"hostPort": 80, "containerPort": 8080, "hostIP": "0.0.0.0"})
    bw = Bandwidth(1000, 2000)
    for v in (pm, bw):
        assert copy.deepcopy(v) == v and pickle.loads(pickle.dumps(v)) == v
        assert {v: 1}[copy.copy(v)] == 1
    assert copy.deepcopy(pm).family() == 4          # the wildcard's family survives a copy
    assert PortMapping(80, 8080) != PortMapping(80, 8081)
    assert Bandwidth(1000, 2000) != Bandwidth(0, 0, 1000, 2000)


def test_bursts_above_2_to_the_32_bytes_are_refused():
    assert Bandwidth(1, 8 << 32).ingress_burst_bits == 8 << 32
    with pytest.raises(ValueError, match="exceeds"):
        Bandwidth(1, (8 << 32) + 1)


@pytest.mark.parametrize("module", ["vswitch.config", "vswitch.rpc", "vswitch.cnitypes",
                                    "vswitch.daemon.attachment"])
def test_imports_neither_numpy_nor_pyroute2(module):
    """10.5: only the modules that use numpy (the datapath) or pyroute2 (daemon.netlink)
    import them; a fresh interpreter shows what importing ``module`` loaded."""
    import json
    import subprocess
    import sys
    code = ("import sys, json, importlib; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numpy', 'pyroute2', 'scapy') or m == 'vswitch.daemon.netlink')))")
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out) == []
    # the check can fire: importing the netlink module does load pyroute2
    if module == "vswitch.daemon.attachment":
        out = subprocess.run([sys.executable, "-c", code, "vswitch.daemon.netlink"],
                             capture_output=True, text=True, check=True).stdout
        assert "pyroute2" in json.loads(out)
