"""Validated, frozen configuration values for the switch, with units in every name.

Theory of operation
-------------------
Configuration reaches vswitch from three places: the CNI runtime (``runtimeConfig``
``bandwidth`` and ``portMappings`` dicts, camelCase, or the Go field names when a tool
marshals the Go structs), the daemon's command line and state file, and the simulation's
keyword arguments. Each is turned, once and at the edge, into one of the frozen
values below; everything inside (``vswitch.switch.Switch``) trusts them.

- ``Bandwidth``, ``PortMapping``, ``parse_mac``, ``format_mac``: the CNI-facing values,
  defined once in ``vswitch.cnitypes`` (stdlib only, shared with the CNI plugin) and
  re-exported here. Bandwidth: two token buckets per pod port, rates in bit/s, bursts in
  bits, "ingress" towards the pod; per direction rate and burst are both set or both zero
  (the reference bandwidth plugin's rule). PortMapping: one hostPort rule, ``host_ip``
  ``None`` meaning every node address.
- ``parse_ip``, ``parse_cidr``: addresses (``ipaddress`` objects) for the control plane.
- ``SwitchConfig``: the subnet and gateway of the host port, table sizes and timeouts
  handed to the datapath constructor, and the virtio-net header length.

Every constructor validates; a bad value (wrong type included: these values come from
JSON) raises ``ValueError`` whose message names the key, the value and what is accepted. Nothing is
coerced silently except integral floats (JSON numbers like ``1e7``) and the case of a
protocol name.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Any, Mapping

from vswitch.cnitypes import NO_BANDWIDTH, Bandwidth, PortMapping, format_mac, parse_mac
from vswitch.datapath.consts import DEFAULTS

__all__ = ["Bandwidth", "PortMapping", "SwitchConfig", "parse_mac", "format_mac", "parse_ip",
           "parse_cidr"]

U63 = (1 << 63) - 1


# --------------------------------------------------------------------------- helpers

def _int(key: str, value: Any, *, lo: int = 0, hi: int = U63) -> int:
    """An integer in [lo, hi]; integral floats (JSON ``1e7``) are accepted, bools are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{key}: {value!r} is out of range; accepted: {lo} .. {hi}")
    return value


def parse_ip(value: Any, key: str = "ip") -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4 or IPv6 address from a string (a ``/prefix`` suffix is ignored) or 4/16 bytes."""
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return value
    if isinstance(value, (bytes, bytearray)) and len(value) in (4, 16):
        return ipaddress.ip_address(bytes(value))
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected an IP address string, got {value!r}")
    try:
        if "/" not in value:
            return ipaddress.ip_address(value)
        return ipaddress.ip_interface(value).ip
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not an IPv4 or IPv6 address") from None


def parse_cidr(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """'10.0.0.5/24' -> IPv4Interface; raises ValueError naming the value."""
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise ValueError(f"not an address with prefix: {text!r} (expected like 10.0.0.5/24)") from None


_NO_BANDWIDTH = NO_BANDWIDTH


# --------------------------------------------------------------------------- SwitchConfig

_DP_KEYS = tuple(DEFAULTS)  # the datapath constructor's keyword arguments


@dataclass(frozen=True)
class SwitchConfig:
    """The switch: host-port addressing and the datapath's table sizes and timeouts."""
    subnet: str = "10.0.0.0/24"               # the pods' IPv4 subnet
    gateway: str | None = None                # the host port's IPv4 address; default: first host
    subnet6: str | None = None                # optional IPv6 subnet
    gateway6: str | None = None               # default: first host of subnet6
    gateway_mac: str = "02:00:00:00:00:01"    # the host port's MAC
    node_addresses: tuple = ()                # node addresses besides the gateways (hostPort "any")
    shaper_queue_bytes: int = 0               # per shaper queue; 0 = the datapath's default rule
    max_ports: int = DEFAULTS["max_ports"]
    mac_table_size: int = DEFAULTS["mac_table_size"]
    conntrack_size: int = DEFAULTS["conntrack_size"]
    max_hostports: int = DEFAULTS["max_hostports"]
    vnet_hdr_len: int = DEFAULTS["vnet_hdr_len"]
    mac_aging_ns: int = DEFAULTS["mac_aging_ns"]
    tcp_syn_timeout_ns: int = DEFAULTS["tcp_syn_timeout_ns"]
    tcp_est_timeout_ns: int = DEFAULTS["tcp_est_timeout_ns"]
    tcp_fin_timeout_ns: int = DEFAULTS["tcp_fin_timeout_ns"]
    tcp_close_timeout_ns: int = DEFAULTS["tcp_close_timeout_ns"]
    udp_timeout_ns: int = DEFAULTS["udp_timeout_ns"]
    udp_replied_timeout_ns: int = DEFAULTS["udp_replied_timeout_ns"]
    tcp_syn_recv_timeout_ns: int = DEFAULTS["tcp_syn_recv_timeout_ns"]
    mac_learn_rate_per_s: int = DEFAULTS["mac_learn_rate_per_s"]   # new MACs/s per port; 0 = no limit
    mac_learn_burst: int = DEFAULTS["mac_learn_burst"]
    max_peers: int = DEFAULTS["max_peers"]          # VXLAN peers (remote nodes)

    def __post_init__(self):
        try:
            net = ipaddress.ip_network(self.subnet, strict=False) if isinstance(self.subnet, str) else None
        except ValueError:
            net = None
        if net is None or net.version != 4 or net.prefixlen > 30:
            raise ValueError(f"subnet: {self.subnet!r} is not an IPv4 subnet with room for hosts "
                             f"(accepted: e.g. '10.0.0.0/24', prefix /30 or shorter)")
        object.__setattr__(self, "subnet", str(net))
        gw = self._gateway("gateway", self.gateway, net)
        object.__setattr__(self, "gateway", gw)
        if self.subnet6 is not None:
            try:
                net6 = ipaddress.ip_network(self.subnet6, strict=False)
            except (ValueError, TypeError):
                net6 = None
            if net6 is None or net6.version != 6 or net6.prefixlen > 126:
                raise ValueError(f"subnet6: {self.subnet6!r} is not an IPv6 subnet (e.g. 'fd00::/64')")
            object.__setattr__(self, "subnet6", str(net6))
            object.__setattr__(self, "gateway6", self._gateway("gateway6", self.gateway6, net6))
        elif self.gateway6 is not None:
            raise ValueError(f"gateway6: {self.gateway6!r} given without subnet6")
        object.__setattr__(self, "gateway_mac", format_mac(parse_mac(self.gateway_mac, "gateway_mac")))
        if isinstance(self.node_addresses, (str, bytes)):
            raise ValueError(f"node_addresses: expected a list of addresses, got {self.node_addresses!r}")
        addrs = tuple(str(parse_ip(a, "node_addresses")) for a in self.node_addresses)
        object.__setattr__(self, "node_addresses", addrs)
        object.__setattr__(self, "shaper_queue_bytes", _int("shaper_queue_bytes", self.shaper_queue_bytes))
        limits = {"max_ports": (1, 65535), "mac_table_size": (1, 1 << 26),
                  "conntrack_size": (1, 1 << 26), "max_hostports": (1, 1 << 20),
                  "mac_learn_rate_per_s": (0, 10**9), "mac_learn_burst": (1, 10**9),
                  "max_peers": (1, 1 << 20)}
        for key in _DP_KEYS:
            lo, hi = limits.get(key, (0, U63))
            object.__setattr__(self, key, _int(key, getattr(self, key), lo=lo, hi=hi))
        if self.vnet_hdr_len not in (0, 10, 12):
            raise ValueError(f"vnet_hdr_len: {self.vnet_hdr_len!r}; accepted: 0, 10, 12")

    @staticmethod
    def _gateway(key, value, net):
        if value is None:
            return str(next(net.hosts()))
        ip = parse_ip(value, key)
        if ip not in net or ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"{key}: {value!r} is not a host address of the subnet {net}")
        return str(ip)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SwitchConfig":
        """From a plain dict (a config file, keyword arguments); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"switch config: unknown key(s) {unknown}; accepted: {sorted(names)}")
        d = dict(d)
        if "node_addresses" in d and isinstance(d["node_addresses"], list):
            d["node_addresses"] = tuple(d["node_addresses"])
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "SwitchConfig":
        return dataclasses.replace(self, **changes)

    def datapath_kwargs(self) -> dict:
        """The keyword arguments of ``Datapath(...)``."""
        return {k: getattr(self, k) for k in _DP_KEYS}

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(self.subnet)

    @property
    def network6(self) -> ipaddress.IPv6Network | None:
        return ipaddress.ip_network(self.subnet6) if self.subnet6 else None

    @property
    def gateways(self) -> tuple[str, ...]:
        return tuple(g for g in (self.gateway, self.gateway6) if g)


