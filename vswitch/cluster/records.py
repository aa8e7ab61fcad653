"""The node record: what one node tells the others about itself, and how it is checked.

Theory of operation: every node writes one JSON object under ``<prefix>nodes/<node name>``,
bound to its etcd lease::

    {"name": "node-a", "node_ip": "192.0.2.10", "vtep_mac": "02:00:00:00:00:0a",
     "pod_cidrs": ["10.244.3.0/24", "fd00:10:244:3::/64"]}

``Peer.from_json`` is the only reader. The store is shared with other tools, so a value is
untrusted input: anything that is not a JSON object with exactly these four well-formed
fields (a name equal to the key's last segment, an IP address, a unicast MAC, one to two
CIDRs of distinct families) is refused with ``ValueError`` saying what was wrong, and the
caller ignores and logs it. Unknown extra fields are allowed (a newer writer), so the format
can grow. Values above 64 KiB are refused before parsing.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field

MAX_RECORD_BYTES = 64 * 1024
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


def check_node_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"node name {name!r} is not accepted: 1-253 characters of letters, digits, "
                         f"'.', '-', '_', beginning and ending with a letter or digit")
    return name


def check_mac(mac: str) -> str:
    m = mac.lower() if isinstance(mac, str) else mac
    if not isinstance(m, str) or not _MAC_RE.match(m):
        raise ValueError(f"VTEP MAC {mac!r} is not a MAC address like 02:00:00:00:00:0a")
    if int(m[:2], 16) & 1:
        raise ValueError(f"VTEP MAC {mac!r} is a multicast address; a unicast MAC is accepted")
    return m


def check_ip(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except (ValueError, TypeError):
        raise ValueError(f"node IP {ip!r} is not an IPv4 or IPv6 address") from None


def check_cidrs(cidrs) -> tuple[str, ...]:
    if not isinstance(cidrs, (list, tuple)) or not 1 <= len(cidrs) <= 2:
        raise ValueError(f"pod_cidrs {cidrs!r} must be a list of one or two CIDRs (one per family)")
    nets = []
    for c in cidrs:
        try:
            nets.append(ipaddress.ip_network(c, strict=True))
        except (ValueError, TypeError):
            raise ValueError(f"pod CIDR {c!r} is not a network address with prefix length") from None
    if len({n.version for n in nets}) != len(nets):
        raise ValueError(f"pod_cidrs {cidrs!r} gives one address family twice")
    return tuple(str(n) for n in sorted(nets, key=lambda n: n.version))


@dataclass(frozen=True, order=True)
class Peer:
    """Another node as the store describes it (what the daemon's ``peers`` op takes)."""
    name: str
    node_ip: str
    vtep_mac: str
    pod_cidrs: tuple[str, ...]
    # Where it came from in the store (not part of the record's value).
    lease_id: int = field(default=0, compare=False)
    mod_revision: int = field(default=0, compare=False)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "node_ip": self.node_ip, "vtep_mac": self.vtep_mac,
                           "pod_cidrs": list(self.pod_cidrs)}, sort_keys=True)

    def as_dict(self) -> dict:
        return {"name": self.name, "node_ip": self.node_ip, "vtep_mac": self.vtep_mac,
                "pod_cidrs": list(self.pod_cidrs)}

    @classmethod
    def from_json(cls, key_name: str, raw: bytes | str, *, lease_id: int = 0, mod_revision: int = 0) -> "Peer":
        if len(raw) > MAX_RECORD_BYTES:
            raise ValueError(f"record is {len(raw)} bytes; at most {MAX_RECORD_BYTES} are accepted")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"record is not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"record is JSON {type(obj).__name__}, a JSON object is accepted")
        missing = [k for k in ("name", "node_ip", "vtep_mac", "pod_cidrs") if k not in obj]
        if missing:
            raise ValueError(f"record lacks field(s) {', '.join(missing)}")
        name = check_node_name(obj["name"])
        if name != key_name:
            raise ValueError(f"record names node {name!r} but is stored under node key {key_name!r}")
        return cls(name=name, node_ip=check_ip(obj["node_ip"]), vtep_mac=check_mac(obj["vtep_mac"]),
                   pod_cidrs=check_cidrs(obj["pod_cidrs"]), lease_id=int(lease_id),
                   mod_revision=int(mod_revision))
