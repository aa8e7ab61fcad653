"""Results and errors as JSON, in the shape of each CNI version.

Theory of operation: the plugin works on one canonical result (the 1.1.0 shape, plain
dicts): ``interfaces`` (name, mac, mtu, sandbox), ``ips`` (address, gateway, interface
index), ``routes`` (dst, gw and 1.1.0's optional mtu/advmss/priority/table/scope) and
``dns``. :func:`parse_result` reads any supported version into it (IPAM output,
prevResult); :func:`format_result` writes it out for the requested version:

======== ==================================================================
0.3.x,   ips carry ``"version": "4"|"6"``; interfaces have name, mac, sandbox
0.4.0    (types/040)
1.0.0    no ``version`` in ips (types/100)
1.1.0    interfaces may carry ``mtu``; routes may carry the new attributes
======== ==================================================================

Empty optional fields are omitted as Go's ``omitempty`` does, except ``dns``, which the
reference plugins always print (a Go struct is never "empty").
"""
from vswitch import fastjson

from .conf import CURRENT_VERSION, SUPPORTED_VERSIONS, ip_family, split_cidr, version_tuple
from .errors import CniError, INVALID_CONFIG

_ROUTE_EXTRA_1_1 = ("mtu", "advmss", "priority", "table", "scope")


def version_info():
    """The VERSION command's output."""
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def error_json(version, err):
    """The error object for :class:`CniError` ``err``."""
    out = {"cniVersion": version if version in SUPPORTED_VERSIONS else CURRENT_VERSION,
           "code": err.code, "msg": err.msg}
    if err.details:
        out["details"] = err.details
    return out


def dumps(obj):
    return fastjson.dumps(obj, indent=4)


def parse_result(obj, where):
    """Any supported version's result -> the canonical shape. ``where`` names it in errors
    (e.g. ``"prevResult"`` or ``"IPAM plugin host-local"``)."""
    if not isinstance(obj, dict):
        raise CniError(INVALID_CONFIG, f"{where}: result must be an object, got {obj!r}")
    out = {"interfaces": [], "ips": [], "routes": [], "dns": {}}
    for i, itf in enumerate(obj.get("interfaces") or []):
        if not isinstance(itf, dict) or not isinstance(itf.get("name"), str):
            raise CniError(INVALID_CONFIG, f"{where}.interfaces[{i}]: {itf!r} has no name")
        entry = {"name": itf["name"]}
        for k in ("mac", "sandbox", "mtu", "socketPath", "pciID"):
            if itf.get(k):
                entry[k] = itf[k]
        out["interfaces"].append(entry)
    for i, ip in enumerate(obj.get("ips") or []):
        if not isinstance(ip, dict) or split_cidr(ip.get("address")) is None \
                or "/" not in ip.get("address", ""):
            raise CniError(INVALID_CONFIG, f"{where}.ips[{i}]: {ip!r} has no address in CIDR form")
        entry = {"address": ip["address"]}
        if ip.get("gateway"):
            if ip_family(ip["gateway"]) is None:
                raise CniError(INVALID_CONFIG, f"{where}.ips[{i}].gateway: {ip['gateway']!r} is not an IP")
            entry["gateway"] = ip["gateway"]
        if ip.get("interface") is not None:
            idx = ip["interface"]
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise CniError(INVALID_CONFIG, f"{where}.ips[{i}].interface: {idx!r} is not an index")
            entry["interface"] = idx
        out["ips"].append(entry)
    for i, r in enumerate(obj.get("routes") or []):
        if not isinstance(r, dict) or split_cidr(r.get("dst")) is None:
            raise CniError(INVALID_CONFIG, f"{where}.routes[{i}]: {r!r} has no dst")
        entry = {"dst": r["dst"]}
        if r.get("gw"):
            entry["gw"] = r["gw"]
        for k in _ROUTE_EXTRA_1_1:
            if r.get(k) is not None:
                entry[k] = r[k]
        out["routes"].append(entry)
    dns = obj.get("dns") or {}
    if not isinstance(dns, dict):
        raise CniError(INVALID_CONFIG, f"{where}.dns: {dns!r} is not an object")
    out["dns"] = {k: v for k, v in dns.items() if v}
    return out


def format_result(result, version):
    """The canonical result as printed for ``version``."""
    vt = version_tuple(version)
    with_ip_version = vt < (1, 0, 0)
    with_1_1 = vt >= (1, 1, 0)
    interfaces = []
    for itf in result.get("interfaces", ()):
        entry = {"name": itf["name"]}
        if itf.get("mac"):
            entry["mac"] = itf["mac"]
        if with_1_1:
            for k in ("mtu", "socketPath", "pciID"):
                if itf.get(k):
                    entry[k] = itf[k]
        if itf.get("sandbox"):
            entry["sandbox"] = itf["sandbox"]
        interfaces.append(entry)
    ips = []
    for ip in result.get("ips", ()):
        entry = {}
        if with_ip_version:
            entry["version"] = "6" if ":" in ip["address"] else "4"
        if ip.get("interface") is not None:
            entry["interface"] = ip["interface"]
        entry["address"] = ip["address"]
        if ip.get("gateway"):
            entry["gateway"] = ip["gateway"]
        ips.append(entry)
    routes = []
    for r in result.get("routes", ()):
        entry = {"dst": r["dst"]}
        if r.get("gw"):
            entry["gw"] = r["gw"]
        if with_1_1:
            for k in _ROUTE_EXTRA_1_1:
                if r.get(k) is not None:
                    entry[k] = r[k]
        routes.append(entry)
    out = {"cniVersion": version}
    if interfaces:
        out["interfaces"] = interfaces
    if ips:
        out["ips"] = ips
    if routes:
        out["routes"] = routes
    out["dns"] = dict(result.get("dns") or {})
    return out
