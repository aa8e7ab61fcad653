"""The VXLAN control plane's peer table (vswitch.daemon.vxlan) on both datapaths: sources and
their precedence, validation (a refusal changes nothing), the datapath programming, the
``peers`` op, and the --peers file. The kernel side is tests/integration/test_vxlan_kernel.py."""
import ipaddress
import json

import pytest

from vswitch.config import SwitchConfig
from vswitch.daemon import vxlan as V
from vswitch.daemon.state import State
from vswitch.datapath import consts as C
from vswitch.rpc import RpcError
from vswitch.switch import Switch

NIC_MAC = "02:aa:00:00:00:01"


def peer(i, **kw):
    p = {"name": f"n{i}", "node_ip": f"10.200.0.{i}", "pod_cidrs": [f"10.244.{i}.0/24"],
         "vtep_mac": f"0e:00:00:00:00:{i:02x}"}
    p.update(kw)
    return p


class Log(list):
    def __call__(self, event, **kw):
        self.append((event, kw))


@pytest.fixture
def vx(dp_impl, tmp_path):
    sw = Switch(SwitchConfig(subnet="10.244.1.0/24", gateway="10.244.1.1", gateway_mac=NIC_MAC, max_ports=8),
                impl=dp_impl)
    sw.add_port("vsw0", "host", mac=NIC_MAC, ips=["10.244.1.1"], port_id=0)
    sw.add_port("eth0", "uplink", port_id=1)
    st = State(str(tmp_path / "state"))
    st.load()
    st.host.update(name="vsw0", mac=NIC_MAC, gateways=["10.244.1.1/24"])
    v = V.Vxlan(V.VtepConfig(vni=7, udp_port=4789), sw, st, Log(), "vsw0")
    v.start(["10.200.0.1/24"], outer_mac=NIC_MAC, vtep_mac=NIC_MAC, mtu=1500)
    return v


def dp_table(v):
    return {str(ipaddress.IPv4Address(bytes(d["ip"]))): (bytes(d["vtep_mac"]).hex(":"),
                                                         d["underlay_mac"] and bytes(d["underlay_mac"]).hex(":"),
                                                         [str(ipaddress.ip_network((bytes(a), n))) for a, n in d["cidrs"]])
            for d in v.dp.peers()}


def test_start_programs_the_vtep(vx):
    t = vx.dp.vtep()
    assert t is not None
    assert bytes(t["ip"]) == bytes([10, 200, 0, 1]) and t["vni"] == 7 and t["udp_port"] == 4789
    assert t["mtu"] == 1500 and t["port"] == 1
    assert bytes(t["vtep_mac"]).hex(":") == NIC_MAC and bytes(t["outer_mac"]).hex(":") == NIC_MAC


def test_replace_programs_peers_unresolved_until_a_mac_is_known(vx):
    vx.replace("control", [peer(2), peer(3, pod_cidrs=["10.244.3.0/24", "fd00:0:0:3::/64"])])
    assert dp_table(vx) == {"10.200.0.2": ("0e:00:00:00:00:02", None, ["10.244.2.0/24"]),
                            "10.200.0.3": ("0e:00:00:00:00:03", None, ["10.244.3.0/24", "fd00:0:0:3::/64"])}
    rows = {r["name"]: r for r in vx.listing()["peers"]}
    assert rows["n2"]["state"] == "unresolved" and rows["n2"]["underlay_mac"] is None
    # the kernel thread's answer arrives: pushed into the datapath
    vx._apply({"10.200.0.2": {"next_hop": "10.200.0.2", "mac": "02:bb:00:00:00:02", "state": "resolved",
                              "reason": None}})
    assert dp_table(vx)["10.200.0.2"][1] == "02:bb:00:00:00:02"
    assert dp_table(vx)["10.200.0.3"][1] is None
    rows = {r["name"]: r for r in vx.listing()["peers"]}
    assert rows["n2"]["state"] == "resolved" and rows["n3"]["state"] == "unresolved"
    # a replace keeps a known underlay MAC (the peer's next hop did not change)
    vx.replace("control", [peer(2, pod_cidrs=["10.244.2.0/24", "10.245.2.0/24"])])
    assert dp_table(vx) == {"10.200.0.2": ("0e:00:00:00:00:02", "02:bb:00:00:00:02",
                                           ["10.244.2.0/24", "10.245.2.0/24"])}


def test_sources_union_by_name_control_over_cluster_over_file(vx):
    vx.replace("file", [peer(2), peer(3)])
    vx.replace("cluster", [peer(3, vtep_mac="0e:00:00:00:01:03"), peer(4)])
    assert {r["name"]: r["source"] for r in vx.listing()["peers"]} == {"n2": "file", "n3": "cluster", "n4": "cluster"}
    assert dp_table(vx)["10.200.0.3"][0] == "0e:00:00:00:01:03"
    vx.replace("control", [peer(3, node_ip="10.200.0.33", vtep_mac="0e:00:00:00:02:03")])
    assert dp_table(vx)["10.200.0.33"][0] == "0e:00:00:00:02:03" and "10.200.0.3" not in dp_table(vx)
    vx.replace("control", [])                  # the cluster's n3 is back
    assert dp_table(vx)["10.200.0.3"][0] == "0e:00:00:00:01:03"
    vx.replace("cluster", [])
    assert sorted(dp_table(vx)) == ["10.200.0.2", "10.200.0.3"]
    assert dp_table(vx)["10.200.0.3"][0] == "0e:00:00:00:00:03"


def test_a_cidr_moves_between_peers_in_one_replace(vx):
    vx.replace("control", [peer(2), peer(3)])
    vx.replace("control", [peer(2, pod_cidrs=["10.244.3.0/24"]), peer(3, pod_cidrs=["10.244.2.0/24"])])
    assert dp_table(vx)["10.200.0.2"][2] == ["10.244.3.0/24"]
    assert dp_table(vx)["10.200.0.3"][2] == ["10.244.2.0/24"]


BAD = [
    ([peer(2, pod_cidrs=["10.244.2.1/24"])], "host bits"),
    ([peer(2, pod_cidrs=["10.244.2.0/33"])], "pod_cidrs[0]"),
    ([peer(2, pod_cidrs=[])], "1..8"),
    ([peer(2, pod_cidrs=[f"10.{i}.0.0/16" for i in range(9)])], "1..8"),
    ([peer(2, pod_cidrs=["10.244.1.0/24"])], "own pod subnet 10.244.1.0/24"),
    ([peer(2, pod_cidrs=["10.244.0.0/16"])], "own pod subnet"),
    ([peer(2), peer(3, pod_cidrs=["10.244.2.0/24"])], "also peer n2"),
    ([peer(2), peer(3, node_ip="10.200.0.2")], "one peer per node IP"),
    ([peer(2, node_ip="10.200.0.1")], "own VTEP address"),
    ([peer(2), peer(2)], "listed twice"),
    ([peer(2, node_ip="fd00::2")], "node_ip"),
    ([peer(2, node_ip="224.0.0.1")], "node_ip"),
    ([peer(2, vtep_mac="01:00:5e:00:00:01")], "multicast"),
    ([peer(2, vtep_mac="zz")], "vtep_mac"),
    ([peer(2, name="")], "name"),
    ([peer(2, name="a b")], "name"),
    ([dict(peer(2), extra=1)], "unknown key"),
    ([{"name": "n2"}], "missing key"),
    (["n2"], "not an object"),
    ({"name": "n2"}, "not a list"),
]


@pytest.mark.parametrize("peers,words", BAD, ids=[w for _, w in BAD])
def test_bad_input_is_refused_and_nothing_changes(vx, peers, words):
    vx.replace("file", [peer(5)])
    vx.replace("control", [peer(6)])
    before, listing = dp_table(vx), vx.listing()
    with pytest.raises(ValueError) as e:
        vx.replace("control", peers)
    assert words in str(e.value)
    assert dp_table(vx) == before and vx.listing()["peers"] == listing["peers"]
    assert vx.sources["control"] == [V.parse_peer(peer(6), "x")]


def test_conflict_between_sources_is_refused(vx):
    vx.replace("file", [peer(2)])
    with pytest.raises(ValueError, match="10.244.2.0/24 is also peer n2"):
        vx.replace("cluster", [peer(3, pod_cidrs=["10.244.2.0/24"])])
    assert sorted(dp_table(vx)) == ["10.200.0.2"]


def test_too_many_peers(vx):
    assert vx.max_peers == C.DEFAULTS["max_peers"] == 4096
    vx.max_peers = 3
    vx.replace("cluster", [peer(2), peer(3)])
    with pytest.raises(ValueError, match="4 peers: too many; accepted at most 3"):
        vx.replace("control", [peer(4), peer(5)])
    assert sorted(dp_table(vx)) == ["10.200.0.2", "10.200.0.3"]


def test_control_peers_are_kept_in_the_state(vx, dp_impl, tmp_path):
    vx.replace("control", [peer(2)])
    vx.replace("cluster", [peer(3)])
    vx.state.save()
    st = State(vx.state.dir)
    st.load()
    sw = Switch(SwitchConfig(max_ports=8), impl=dp_impl)
    sw.add_port("eth0", "uplink", port_id=1)
    again = V.Vxlan(V.VtepConfig(), sw, st, Log(), "vsw0")
    again.start(["10.200.0.1/24"], outer_mac=NIC_MAC, vtep_mac=NIC_MAC, mtu=1500)
    assert sorted(dp_table(again)) == ["10.200.0.2"]     # the cluster's come from etcd again


def _run(gen):
    """Drive a kernel-op generator without a kernel thread: a job's result is None."""
    try:
        job = next(gen)
        while True:
            job = gen.send(None if job[0] is not V.kernel_sync else {"resolved": {}, "owned": [], "errors": []})
    except StopIteration as done:
        return done.value


def test_the_peers_op(vx):
    out = _run(vx.op_peers({"action": "replace", "peers": [peer(2)]}))
    assert [r["name"] for r in out["peers"]] == ["n2"] and out["vtep"]["vni"] == 7
    row = out["peers"][0]
    assert row["node_ip"] == "10.200.0.2" and row["pod_cidrs"] == ["10.244.2.0/24"] and row["source"] == "control"
    assert row["tx_packets"] == row["rx_packets"] == row["drop_unresolved"] == 0
    assert _run(vx.op_peers({}))["peers"] == out["peers"]
    with pytest.raises(RpcError) as e:
        _run(vx.op_peers({"action": "replace", "peers": [peer(3, pod_cidrs=["10.244.3.7/24"])]}))
    assert e.value.code == 4 and "10.244.3.7/24" in e.value.msg
    with pytest.raises(RpcError) as e:
        _run(vx.op_peers({"action": "reload"}))
    assert e.value.code == 7 and "--peers" in e.value.msg
    with pytest.raises(RpcError) as e:
        _run(vx.op_peers({"action": "drop"}))
    assert e.value.code == 4
    assert [r["name"] for r in vx.listing()["peers"]] == ["n2"]


def test_peers_file(tmp_path):
    f = tmp_path / "peers.json"
    f.write_text(json.dumps([peer(2), peer(3)]))
    assert [p["name"] for p in V.read_peers_file(str(f))] == ["n2", "n3"]
    for text, words in (("[", "not JSON"), ('{"a": 1}', "not a list"),
                        (json.dumps([peer(2, pod_cidrs=["x"])]), "pod_cidrs[0]")):
        f.write_text(text)
        with pytest.raises(ValueError, match=words.replace("[", r"\[")):
            V.read_peers_file(str(f))
    with pytest.raises(ValueError, match="cannot read it"):
        V.read_peers_file(str(tmp_path / "missing.json"))


@pytest.mark.parametrize("kw,words", [({"vni": 1 << 24}, "--vtep-vni"), ({"vni": -1}, "--vtep-vni"),
                                      ({"udp_port": 0}, "--vtep-port"), ({"udp_port": 65536}, "--vtep-port"),
                                      ({"address": "fd00::1"}, "--vtep-address")])
def test_vtep_config_refuses_bad_flags(kw, words):
    with pytest.raises(ValueError, match=words):
        V.VtepConfig(**kw)


def test_vtep_address_must_be_the_uplinks(dp_impl, tmp_path):
    sw = Switch(SwitchConfig(max_ports=8), impl=dp_impl)
    sw.add_port("eth0", "uplink", port_id=1)
    v = V.Vxlan(V.VtepConfig(address="10.9.9.9"), sw, State(str(tmp_path)), Log(), "vsw0")
    with pytest.raises(SystemExit, match="not an address of the uplink"):
        v.start(["10.200.0.1/24"], outer_mac=NIC_MAC, vtep_mac=NIC_MAC, mtu=1500)
    assert sw.dp.vtep() is None
