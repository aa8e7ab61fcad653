"""The kernel side of the VXLAN control plane (vswitch.daemon.vxlan.kernel_sync) in a real
namespace: a host port ``vsw0`` (one end of a veth) with the node IP and a gateway, a peer
namespace on the other end. Routes to remote pod CIDRs with their permanent neighbours, the
peers' next hops as managed neighbour entries resolved by the kernel, unresolved ones
reported, and everything removed again."""
import json

from vswitch import lab
from vswitch.daemon import vxlan as V

VTEP_MAC = "0e:00:00:00:00:01"


def _state(ns):
    routes = json.loads(lab.nsexec(ns, "ip", "-j", "route", "show", "dev", "vsw0", "proto", "118").stdout or "[]")
    routes6 = json.loads(lab.nsexec(ns, "ip", "-j", "-6", "route", "show", "dev", "vsw0", "proto", "118").stdout
                         or "[]")
    neigh = json.loads(lab.nsexec(ns, "ip", "-j", "neigh", "show", "dev", "vsw0").stdout or "[]")
    return routes + routes6, {n["dst"]: n for n in neigh}


def test_kernel_sync_routes_neighbours_and_next_hops():
    with lab.Namespaces("vk") as nss:
        a, b = nss.new("a"), nss.new("b")
        lab.veth(a, "vsw0", "10.200.0.1/24", b, "eth0", "10.200.0.2/24")
        lab.nsexec(a, "ip", "addr", "add", "10.244.1.1/24", "dev", "vsw0")
        lab.nsexec(a, "ip", "route", "add", "10.201.0.0/24", "via", "10.200.0.2")
        b_mac = lab.nsexec(b, "cat", "/sys/class/net/eth0/address").stdout.strip()
        plan = {"dev": "vsw0", "netns": a, "vtep_mac": VTEP_MAC, "full": True, "owned": [],
                "routes": {"10.244.2.0/24": {"via": "10.244.2.0", "src": "10.244.1.1"},
                           "fd00:0:0:2::/64": {"via": "fd00:0:0:2::", "src": None}},
                "neighs": {"10.244.2.0": VTEP_MAC, "fd00:0:0:2::": VTEP_MAC},
                # on-link, absent (never answers), behind a gateway
                "resolve": ["10.200.0.2", "10.200.0.9", "10.201.0.5"]}
        res = V.kernel_sync(plan)
        assert res["errors"] == []
        r = res["resolved"]
        assert r["10.200.0.2"] == {"next_hop": "10.200.0.2", "mac": b_mac, "state": "resolved", "reason": None}
        assert r["10.201.0.5"]["next_hop"] == "10.200.0.2" and r["10.201.0.5"]["mac"] == b_mac
        assert r["10.200.0.9"]["mac"] is None and r["10.200.0.9"]["state"] == "unresolved"
        assert "10.200.0.9" in r["10.200.0.9"]["reason"]
        assert res["owned"] == ["10.200.0.2", "10.200.0.9"]
        routes, neigh = _state(a)
        by_dst = {x["dst"]: x for x in routes}
        assert by_dst["10.244.2.0/24"]["gateway"] == "10.244.2.0" and by_dst["10.244.2.0/24"]["prefsrc"] == "10.244.1.1"
        assert "onlink" in by_dst["10.244.2.0/24"]["flags"]
        assert by_dst["fd00:0:0:2::/64"]["gateway"] == "fd00:0:0:2::"
        assert neigh["10.244.2.0"]["lladdr"] == VTEP_MAC and "PERMANENT" in neigh["10.244.2.0"]["state"]
        assert neigh["fd00:0:0:2::"]["lladdr"] == VTEP_MAC
        assert "managed" in neigh["10.200.0.2"] and "managed" in neigh["10.200.0.9"]
        # the node's own traffic to a remote pod leaves vsw0 for our VTEP MAC, from the gateway
        got = json.loads(lab.nsexec(a, "ip", "-j", "route", "get", "10.244.2.7").stdout)[0]
        assert got["gateway"] == "10.244.2.0" and got["prefsrc"] == "10.244.1.1" and got["dev"] == "vsw0"

        # a peer leaves: its route, neighbour and next hop go; the other stays
        plan2 = dict(plan, owned=res["owned"], routes={"fd00:0:0:2::/64": plan["routes"]["fd00:0:0:2::/64"]},
                     neighs={"fd00:0:0:2::": VTEP_MAC}, resolve=["10.201.0.5"])
        res2 = V.kernel_sync(plan2)
        assert res2["errors"] == [] and res2["owned"] == ["10.200.0.2"]
        routes, neigh = _state(a)
        assert [x["dst"] for x in routes] == ["fd00:0:0:2::/64"]
        assert "10.244.2.0" not in neigh and "10.200.0.9" not in neigh and "10.200.0.2" in neigh
        # a stale route of ours (a killed daemon's) is removed by the next full sync
        lab.nsexec(a, "ip", "route", "add", "10.244.9.0/24", "via", "10.244.9.0", "dev", "vsw0", "onlink",
                   "proto", "118")
        V.kernel_sync(dict(plan2, owned=res2["owned"]))
        assert [x["dst"] for x in _state(a)[0]] == ["fd00:0:0:2::/64"]
        # stop: nothing of ours is left, the routes we did not make stay
        assert V.kernel_clear("vsw0", VTEP_MAC, res2["owned"], a) == []
        routes, neigh = _state(a)
        assert routes == [] and not any(n.get("lladdr") == VTEP_MAC for n in neigh.values())
        assert "10.200.0.2" not in neigh
        assert "10.201.0.0/24 via 10.200.0.2" in lab.nsexec(a, "ip", "route").stdout
