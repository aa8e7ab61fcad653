"""Validated, frozen configuration values for the switch, with units in every name.

Theory of operation
-------------------
Configuration reaches vswitch from three places: the CNI runtime (``runtimeConfig``
``bandwidth`` and ``portMappings`` dicts, camelCase, or the Go field names when a tool
marshals the Go structs), the daemon's command line and state file, and the simulation's
keyword arguments. Each is turned, once and at the edge, into one of the frozen
dataclasses below; everything inside (``vswitch.switch.Switch``) trusts them.

- ``Bandwidth``: two token buckets per pod port. Rates in bit/s, bursts in bits, as the
  CNI bandwidth capability defines them; "ingress" is towards the pod. Per direction, rate
  and burst are both set or both zero (the reference bandwidth plugin's rule): a rate
  without a burst would let nothing through, a burst without a rate means nothing.
- ``PortMapping``: one hostPort rule. ``host_ip`` ``None`` means every node address.
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

from vswitch.datapath.consts import DEFAULTS

__all__ = ["Bandwidth", "PortMapping", "SwitchConfig", "parse_mac", "format_mac", "parse_ip"]

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


def parse_mac(value: Any, key: str = "mac") -> bytes:
    """A MAC as 6 bytes, from ``"aa:bb:cc:dd:ee:ff"`` (``-`` also accepted) or 6 bytes."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 6:
            raise ValueError(f"{key}: {bytes(value)!r} is {len(value)} bytes; a MAC is 6")
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a MAC like 'aa:bb:cc:dd:ee:ff', got {value!r}")
    parts = value.replace("-", ":").split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{key}: {value!r} is not a MAC; accepted: 'aa:bb:cc:dd:ee:ff'") from None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


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


def _pick(d: Mapping, names: tuple[str, ...], where: str):
    """The value of the first of ``names`` present in ``d`` (camelCase or Go spelling)."""
    found = [n for n in names if n in d]
    if len(found) > 1 and len({repr(d[n]) for n in found}) > 1:
        raise ValueError(f"{where}: conflicting keys {found} with values {[d[n] for n in found]}")
    return (found[0], d[found[0]]) if found else (None, None)


def _cni_kwargs(d: Mapping, cni_keys: dict, where: str, accepted: str, convert=lambda key, value: value) -> dict:
    """The constructor's keyword arguments from a CNI dict: ``cni_keys`` maps each attribute to
    its accepted spellings; an unknown key is an error; ``convert(key, value)`` per key found."""
    known = {k for keys in cni_keys.values() for k in keys}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} in {dict(d)!r}; accepted: {accepted}")
    kwargs = {}
    for attr, names in cni_keys.items():
        key, value = _pick(d, names, where)
        if key is not None:
            kwargs[attr] = convert(key, value)
    return kwargs


# --------------------------------------------------------------------------- Bandwidth

@dataclass(frozen=True)
class Bandwidth:
    """Shaping of one pod port. Rates in bit/s, bursts in bits; 0/0 = that direction off."""
    ingress_rate_bps: int = 0     # towards the pod
    ingress_burst_bits: int = 0
    egress_rate_bps: int = 0      # from the pod
    egress_burst_bits: int = 0

    _CNI_KEYS = {  # attribute -> accepted dict keys (CNI JSON camelCase, Go field names)
        "ingress_rate_bps": ("ingressRate", "IngressRate"),
        "ingress_burst_bits": ("ingressBurst", "IngressBurst"),
        "egress_rate_bps": ("egressRate", "EgressRate"),
        "egress_burst_bits": ("egressBurst", "EgressBurst"),
    }

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _int(f.name, getattr(self, f.name)))
        for d in ("ingress", "egress"):
            rate, burst = getattr(self, f"{d}_rate_bps"), getattr(self, f"{d}_burst_bits")
            if (rate == 0) != (burst == 0):
                raise ValueError(
                    f"bandwidth: {d} rate {rate} bit/s and burst {burst} bits: set both or neither "
                    f"(a rate needs a burst > 0 and a burst needs a rate > 0)")

    @classmethod
    def from_cni(cls, d: Mapping | "Bandwidth" | None) -> "Bandwidth":
        """From the CNI ``runtimeConfig.bandwidth`` dict (``ingressRate`` ... or ``IngressRate`` ...)."""
        if isinstance(d, Bandwidth):
            return d
        if d is None or (isinstance(d, Mapping) and not d):
            return _NO_BANDWIDTH
        if not isinstance(d, Mapping):
            raise ValueError(f"bandwidth: expected a dict like {{'ingressRate': 10000000, "
                            f"'ingressBurst': 100000}}, got {d!r}")
        return cls(**_cni_kwargs(d, cls._CNI_KEYS, "bandwidth",
                                 "ingressRate, ingressBurst, egressRate, egressBurst (bits/s, bits)",
                                 lambda key, value: _int(f"bandwidth {key}", value)))

    def to_cni(self) -> dict:
        """The camelCase dict, only the directions that are set."""
        out = {}
        if self.ingress_rate_bps:
            out.update(ingressRate=self.ingress_rate_bps, ingressBurst=self.ingress_burst_bits)
        if self.egress_rate_bps:
            out.update(egressRate=self.egress_rate_bps, egressBurst=self.egress_burst_bits)
        return out

    @property
    def is_empty(self) -> bool:
        return not (self.ingress_rate_bps or self.egress_rate_bps)


_NO_BANDWIDTH = Bandwidth()


# --------------------------------------------------------------------------- PortMapping

@dataclass(frozen=True)
class PortMapping:
    """One hostPort rule: (host_ip or every node address, protocol, host_port) → container_port."""
    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: str | None = None    # None: every node address

    _CNI_KEYS = {
        "host_port": ("hostPort", "HostPort"),
        "container_port": ("containerPort", "ContainerPort"),
        "protocol": ("protocol", "Protocol"),
        "host_ip": ("hostIP", "HostIP", "hostIp"),
    }

    def __post_init__(self):
        object.__setattr__(self, "host_port", _int("hostPort", self.host_port, lo=1, hi=65535))
        object.__setattr__(self, "container_port",
                           _int("containerPort", self.container_port, lo=1, hi=65535))
        proto = self.protocol
        if not isinstance(proto, str) or proto.lower() not in ("tcp", "udp"):
            raise ValueError(f"protocol: {proto!r} is not supported; accepted: 'tcp', 'udp'")
        object.__setattr__(self, "protocol", proto.lower())
        hip = self.host_ip
        if hip in (None, "", "0.0.0.0", "::"):
            hip = None  # the wildcard spellings all mean "every node address"
        else:
            hip = str(parse_ip(hip, "hostIP"))
        object.__setattr__(self, "host_ip", hip)

    @classmethod
    def from_cni(cls, d: Mapping | "PortMapping") -> "PortMapping":
        """From one ``runtimeConfig.portMappings`` entry (``hostPort`` ... or ``HostPort`` ...)."""
        if isinstance(d, PortMapping):
            return d
        if not isinstance(d, Mapping):
            raise ValueError(f"portMapping: expected a dict like {{'hostPort': 8080, "
                            f"'containerPort': 80, 'protocol': 'tcp'}}, got {d!r}")
        kwargs = _cni_kwargs(d, cls._CNI_KEYS, "portMapping", "hostPort, containerPort, protocol, hostIP")
        for attr, cni in (("host_port", "hostPort"), ("container_port", "containerPort")):
            if attr not in kwargs:
                raise ValueError(f"portMapping: {cni} is missing in {dict(d)!r}")
        return cls(**kwargs)

    def to_cni(self) -> dict:
        out = {"hostPort": self.host_port, "containerPort": self.container_port,
               "protocol": self.protocol}
        if self.host_ip is not None:
            out["hostIP"] = self.host_ip
        return out

    @property
    def proto_number(self) -> int:
        return 6 if self.protocol == "tcp" else 17


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
                  "conntrack_size": (1, 1 << 26), "max_hostports": (1, 1 << 20)}
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


