"""The attachment record: one pod interface on the switch, validated once.

Theory of operation
-------------------
An ``attach`` request (``docs/control.md``) becomes a record by ``normalize_attach``:
every argument is checked and put in one canonical form (addresses as ``a.b.c.d/len``,
MACs lower-case, routes defaulted to one default route per family through the first
gateway, port mappings, bandwidth and the MAC through ``vswitch.cnitypes``, the plugin's own
definitions), and bad input raises
RpcError code 4 naming the value and what is accepted. The record is what the state file
stores and what ``list`` answers; attach then adds ``port`` and ``tap`` (names),
``port_id`` (the switch's). Keys starting with ``_`` are private to the daemon and never
leave it (``public``).

An attachment is keyed by (container id, ifname). Its names are derived from the key,
so they are the same after a restart: the switch port name ``vp`` + 11 hex digits of
sha1(container id/ifname) and, unless the request names one, a locally administered
MAC from the same hash. A second attach of the same key is compared with
``same_attach`` on the arguments that shape the pod.
"""
from __future__ import annotations

import hashlib
import ipaddress

from vswitch.datapath import consts as C
from vswitch import rpc
# ATTACH_STEPS: the steps of attach, in order (the names of --test-faults' injected faults)
from vswitch.cnitypes import ATTACH_STEPS, BadValue, parse_pod_mac
from vswitch.config import Bandwidth, PortMapping, format_mac, parse_cidr
from vswitch.rpc import RpcError

# the arguments a repeated attach of the same key must match
_COMPARED = ("netns", "mac", "ips", "routes", "mtu", "port_mappings", "bandwidth", "ip_masq")


def port_name_for(container_id: str, ifname: str) -> str:
    """The switch port name (and the TAP's name before it moves): stable per attachment."""
    return "vp" + hashlib.sha1(f"{container_id}/{ifname}".encode()).hexdigest()[:11]


def mac_for(container_id: str, ifname: str) -> str:
    """A unicast, locally administered MAC, stable per (container id, ifname)."""
    h = hashlib.sha1(f"mac/{container_id}/{ifname}".encode()).digest()
    return format_mac(bytes([(h[0] & 0xFE) | 0x02]) + h[1:6])


def public(rec: dict) -> dict:
    """An attachment record without its private (``_``-prefixed) keys."""
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def gateways_of(rec: dict) -> list[str]:
    """The gateway addresses (``gw/prefixlen``) the host port holds for this attachment."""
    out = []
    for e in rec["ips"]:
        if e.get("gateway"):
            cidr = f"{e['gateway']}/{ipaddress.ip_interface(e['address']).network.prefixlen}"
            if cidr not in out:
                out.append(cidr)
    return out


def same_attach(a: dict, b: dict) -> str | None:
    """None when ``b`` asks for what ``a`` is, else the first difference, named."""
    for k in _COMPARED:
        if a.get(k) != b.get(k):
            return f"{k}: stored {a.get(k)!r}, requested {b.get(k)!r}"
    return None


# --------------------------------------------------------------------------- validation

def need_str(req: dict, key: str, maxlen: int = 4096) -> str:
    v = req.get(key)
    if not isinstance(v, str) or not v or len(v) > maxlen:
        raise RpcError(rpc.E_BAD_ARGS, f"{key}: expected a non-empty string, got {v!r}")
    return v


def valid_ifname(name) -> str:
    if (not isinstance(name, str) or not 1 <= len(name) <= 15 or name in (".", "..")
            or any(c in name for c in "/:") or any(c.isspace() for c in name)):
        raise RpcError(rpc.E_BAD_ARGS, f"ifname: {name!r} is not a valid interface name "
                                       f"(1..15 characters, no '/', ':' or spaces)")
    return name


def attachment_key(req: dict) -> tuple[str, str]:
    """(container id, ifname) of a detach or check request."""
    return need_str(req, "container_id", 1024), valid_ifname(req.get("ifname"))


def _ips(ips_in) -> list[dict]:
    if not isinstance(ips_in, list) or len(ips_in) > C.MAX_IPS_PER_PORT:
        raise RpcError(rpc.E_BAD_ARGS, f"ips: expected a list of at most {C.MAX_IPS_PER_PORT} "
                                       f"{{'address': 'a.b.c.d/len', 'gateway': ...}}, got {ips_in!r}")
    ips = []
    for e in ips_in:
        if not isinstance(e, dict) or "address" not in e:
            raise RpcError(rpc.E_BAD_ARGS, f"ips: entry {e!r} needs an 'address' like '10.0.0.5/24'")
        try:
            iface = parse_cidr(e["address"]) if isinstance(e["address"], str) else None
        except ValueError:
            iface = None
        if iface is None or iface.network.prefixlen == iface.max_prefixlen:
            raise RpcError(rpc.E_BAD_ARGS, f"ips: address {e['address']!r} must be an address with a "
                                           f"prefix shorter than the full length, like '10.0.0.5/24'")
        gw = e.get("gateway")
        if gw is not None:
            try:
                gwa = ipaddress.ip_address(gw)
            except (ValueError, TypeError):
                raise RpcError(rpc.E_BAD_ARGS, f"ips: gateway {gw!r} is not an IP address") from None
            if gwa not in iface.network or gwa == iface.ip:
                raise RpcError(rpc.E_BAD_ARGS, f"ips: gateway {gw} is not another address of {iface.network}")
            gw = str(gwa)
        ips.append({"address": str(iface), "gateway": gw})
    return ips


def _routes(routes_in, ips: list[dict]) -> list[dict]:
    if routes_in is None:       # a default route through the first gateway of each family
        routes = [{"dst": "0.0.0.0/0" if ipaddress.ip_interface(e["address"]).version == 4 else "::/0",
                   "gw": e["gateway"]} for e in ips if e["gateway"]]
        return list({r["dst"]: r for r in reversed(routes)}.values())[::-1]
    if not isinstance(routes_in, list):
        raise RpcError(rpc.E_BAD_ARGS, f"routes: expected a list of {{'dst', 'gw'}}, got {routes_in!r}")
    routes = []
    for r in routes_in:
        if not isinstance(r, dict) or not isinstance(r.get("dst"), str):
            raise RpcError(rpc.E_BAD_ARGS, f"routes: entry {r!r} needs 'dst' like '0.0.0.0/0'")
        try:
            dst = str(ipaddress.ip_network(r["dst"], strict=False))
            gw = str(ipaddress.ip_address(r["gw"])) if r.get("gw") else None
        except (ValueError, TypeError):
            raise RpcError(rpc.E_BAD_ARGS, f"routes: entry {r!r} has a bad dst or gw") from None
        routes.append({"dst": dst, "gw": gw})
    return routes


def _mac(mac, cid: str, ifname: str) -> str:
    if mac in (None, ""):
        return mac_for(cid, ifname)
    try:
        return parse_pod_mac(mac, "mac")
    except BadValue as exc:
        raise RpcError(rpc.E_BAD_ARGS, str(exc)) from None


def normalize_attach(req: dict, test_faults: bool) -> dict:
    """Validate an attach request; returns the attachment record (without port/tap) with
    the private ``_fault`` (the step to fail at, or None)."""
    cid = need_str(req, "container_id", 1024)
    ifname = valid_ifname(req.get("ifname"))
    netns = need_str(req, "netns")
    ips = _ips(req.get("ips", []))
    routes = _routes(req.get("routes"), ips)
    mac = _mac(req.get("mac"), cid, ifname)
    mtu = req.get("mtu", 1500)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 68 <= mtu <= 65521:
        raise RpcError(rpc.E_BAD_ARGS, f"mtu: {mtu!r}; accepted: an integer 68 .. 65521")
    pm_in = req.get("port_mappings") or []
    if not isinstance(pm_in, list):
        raise RpcError(rpc.E_BAD_ARGS, f"port_mappings: expected a list, got {pm_in!r}")
    try:
        mappings = [PortMapping.from_cni(m).to_cni() for m in pm_in]
        bandwidth = Bandwidth.from_cni(req.get("bandwidth") or None).to_cni()
    except ValueError as exc:
        raise RpcError(rpc.E_BAD_ARGS, str(exc)) from None
    ip_masq = req.get("ip_masq", False)
    if not isinstance(ip_masq, bool):
        raise RpcError(rpc.E_BAD_ARGS, f"ip_masq: expected true or false, got {ip_masq!r}")
    network = req.get("network", "")
    pod = req.get("pod", {})
    if not isinstance(network, str) or not isinstance(pod, dict):
        raise RpcError(rpc.E_BAD_ARGS, f"network must be a string and pod an object, got {network!r}, {pod!r}")
    fault = req.get("fault")
    if fault is not None:
        if not test_faults:
            raise RpcError(rpc.E_BAD_ARGS, "fault: only accepted when vswitchd runs with --test-faults")
        if fault not in ATTACH_STEPS:
            raise RpcError(rpc.E_BAD_ARGS, f"fault: {fault!r}; accepted: {', '.join(ATTACH_STEPS)}")
    return {"container_id": cid, "ifname": ifname, "netns": netns, "mac": mac, "ips": ips,
            "routes": routes, "mtu": mtu, "port_mappings": mappings, "bandwidth": bandwidth,
            "ip_masq": ip_masq, "network": network, "pod": pod, "_fault": fault}
