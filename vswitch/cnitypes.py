"""The CNI-facing values, defined once for the plugin and the control plane.

Theory of operation
-------------------
A pod's hostPort mappings, its bandwidth and its MAC travel from the runtime through the
plugin (``cni/``, which starts for every pod and imports only the standard library) to
vswitchd (``vswitch.config``, ``vswitch.daemon``). Both ends parse them with the types
here, so a value means the same on both sides of the control socket:

- :class:`PortMapping`: one hostPort rule. ``host_ip`` None means every node address;
  ``""``, ``"0.0.0.0"`` and ``"::"`` all say so (the last two also name a family, which
  ``family()`` keeps: the plugin, like portmap, skips a mapping of a family the pod lacks).
- :class:`Bandwidth`: one token bucket per direction, rates in bit/s, bursts in bits (at
  most ``MAX_BURST_BITS``, 2^32 bytes), 0/0 = that direction unshaped.
- :func:`parse_mac` (6 bytes, any MAC), :func:`parse_pod_mac` (a pod's: unicast, not zero).
- The constants both ends must agree on: ``DEFAULT_SOCKET`` (the protocol's, from
  ``vswitch.rpc``) and the fault-injection steps of ADD (``PLUGIN_FAULT_STEPS`` in the
  plugin, ``ATTACH_STEPS`` in the daemon).

Both types are immutable values (equal and hashable by their fields) and validate in the
constructor. ``from_cni(d, where, lookup)`` reads a CNI dict in one of two ways:

- ``lookup=None`` (the control protocol, the Python API): each key in its camelCase or Go
  spelling (``hostPort`` / ``HostPort``); an unknown key, or two spellings with different
  values, is an error;
- ``lookup=getter`` (the plugin reading what runtimes send): ``getter(d, name)`` finds each
  key (the plugin passes Go's case-insensitive matching) and other keys are ignored.

A bad value raises :class:`BadValue`, a ValueError whose message names the key (prefixed
with ``where``), the value and what is accepted; ``unsupported`` marks a well-formed value
that vswitch does not implement (the plugin answers CNI code 2 for it, 7 for the rest; the
daemon answers code 4 for all).

Imports only the standard library modules the plugin loads anyway (no ipaddress or
dataclasses, and not ``json``, ``socket`` or ``collections``: their import would show in
every pod's start-up): addresses go through ``_socket`` (``socket``'s C half), ``Mapping``
comes from ``_collections_abc`` (which ``os`` has loaded; ``collections.abc`` re-exports it).
"""
import _socket
from _collections_abc import Mapping

from vswitch import fastjson
from vswitch.rpc import DEFAULT_SOCKET

__all__ = ["DEFAULT_SOCKET", "PLUGIN_FAULT_STEPS", "ATTACH_STEPS", "MAX_BURST_BITS", "BadValue",
           "PortMapping", "Bandwidth", "parse_uint", "parse_mac", "parse_pod_mac", "format_mac",
           "ip_family", "canonical_ip", "split_cidr"]

# The steps of ADD where VSWITCH_CNI_TEST_FAULT may fail it: in the plugin, and in the
# daemon's attach, in order (sent as the request's ``fault``; vswitchd --test-faults only).
PLUGIN_FAULT_STEPS = ("after_ipam", "after_attach")
ATTACH_STEPS = ("tap_create", "netns_move", "link_config", "addresses", "routes",
                "switch_port", "hostports", "shaper", "state_save")

# Bursts up to 2^32 bytes are accepted (DESIGN.md: runtimes send huge bursts; containerd
# sends math.MaxUint32 bits when it derives bandwidth from pod annotations).
MAX_BURST_BITS = 8 << 32
MAX_RATE_BPS = (1 << 63) - 1


class BadValue(ValueError):
    """A CNI-facing value is wrong; ``str()`` names the key, the value and what is accepted."""

    def __init__(self, message, key=None, value=None, expected=None, unsupported=False):
        super().__init__(message)
        self.key = key
        self.value = value
        self.expected = expected
        self.unsupported = unsupported


def _bad(key, value, expected):
    return BadValue(f"{key}: {value!r} is invalid; expected {expected}", key, value, expected)


def _json_text(value):
    try:
        return fastjson.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError):
        return repr(value)


def _prefix(where):
    return f"{where}." if where else ""


def parse_uint(value, key, maximum=None):
    """A non-negative integer (integral JSON floats accepted, bools not), at most ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(key, value, "a non-negative integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise _bad(key, value, "a non-negative integer")
        value = int(value)
    if value < 0 or (maximum is not None and value > maximum):
        rng = f"an integer 0..{maximum}" if maximum is not None else "a non-negative integer"
        raise _bad(key, value, rng)
    return value


# ---------------------------------------------------------------- addresses

def ip_family(text):
    """4 or 6 for an IP address string, None otherwise."""
    if not isinstance(text, str):
        return None
    for family, af in ((4, _socket.AF_INET), (6, _socket.AF_INET6)):
        try:
            _socket.inet_pton(af, text)
            return family
        except OSError:
            pass
    return None


def canonical_ip(text):
    """An address in its canonical text form (``::1``, not ``0::0:1``)."""
    af = _socket.AF_INET if ip_family(text) == 4 else _socket.AF_INET6
    return _socket.inet_ntop(af, _socket.inet_pton(af, text))


def split_cidr(text):
    """``"10.0.0.5/24"`` -> ``("10.0.0.5", 24, 4)``; a bare address gets the full prefix.

    Returns None when it is neither an address nor address/prefix.
    """
    if not isinstance(text, str):
        return None
    addr, sep, plen = text.partition("/")
    family = ip_family(addr)
    if family is None:
        return None
    bits = 32 if family == 4 else 128
    if not sep:
        return canonical_ip(addr), bits, family
    if not plen.isdigit() or int(plen) > bits:
        return None
    return canonical_ip(addr), int(plen), family


_MAC_EXPECTED = "a MAC address like \"02:00:00:00:00:01\""
_HEX = frozenset("0123456789abcdefABCDEF")


def parse_mac(value, key="mac"):
    """A MAC as 6 bytes, from ``"aa:bb:cc:dd:ee:ff"`` (``-`` also accepted) or 6 bytes."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 6:
            raise BadValue(f"{key}: {bytes(value)!r} is {len(value)} bytes; a MAC is 6",
                           key, value, "6 bytes")
        return bytes(value)
    if not isinstance(value, str):
        raise _bad(key, value, _MAC_EXPECTED)
    parts = value.replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 and p[0] in _HEX and p[1] in _HEX for p in parts):
        raise _bad(key, value, _MAC_EXPECTED)
    return bytes(int(p, 16) for p in parts)


def format_mac(mac):
    """6 bytes -> ``"aa:bb:cc:dd:ee:ff"``."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_pod_mac(value, key="mac"):
    """A pod interface's MAC: unicast and not zero, normalised to ``aa:bb:cc:dd:ee:ff``."""
    mac = parse_mac(value, key) if isinstance(value, str) else None
    if mac is None:
        raise _bad(key, value, _MAC_EXPECTED)
    if mac[0] & 1:
        raise BadValue(f"{key}: {value!r} is a multicast address; a pod interface needs a "
                       "unicast MAC (first octet even)", key, value, "a unicast MAC")
    if not any(mac):
        raise BadValue(f"{key}: {value!r} is the zero address", key, value, "a unicast MAC")
    return format_mac(mac)


# ---------------------------------------------------------------- reading CNI dicts

def _strict_get(d, spellings, where, accepted):
    """The strict reading: a getter over ``d`` after checking for unknown keys; each
    attribute's value is that of its one spelling present (two with different values:
    an error)."""
    known = {k for names in spellings.values() for k in names}
    unknown = sorted(k for k in d if k not in known)
    if unknown:
        raise BadValue(f"{where}: unknown key(s) {unknown} in {dict(d)!r}; accepted: {accepted}",
                       where, d, accepted)

    def get(_, name):
        found = [n for n in spellings[name] if n in d]
        if len(found) > 1 and len({repr(d[n]) for n in found}) > 1:
            raise BadValue(f"{where}: conflicting keys {found} with values "
                           f"{[d[n] for n in found]}", where, d, accepted)
        return d[found[0]] if found else None
    return get


class _Value:
    """Immutable, equal and hashable by its fields (``__slots__``)."""

    __slots__ = ()

    def _fields(self):
        return tuple(getattr(self, f) for f in self.__slots__)

    def __setattr__(self, name, value):
        from dataclasses import FrozenInstanceError   # the error path only
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        from dataclasses import FrozenInstanceError
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self):       # copy and pickle through the constructor
        return type(self), self._args()

    def _args(self):
        return self._fields()

    def _set(self, name, value):
        object.__setattr__(self, name, value)

    def __eq__(self, other):
        return type(other) is type(self) and other._fields() == self._fields()

    def __hash__(self):
        return hash(self._fields())

    def __repr__(self):
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self.__slots__)
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------- Bandwidth

class Bandwidth(_Value):
    """Shaping of one pod port. Rates in bit/s, bursts in bits; 0/0 = that direction off."""

    __slots__ = ("ingress_rate_bps", "ingress_burst_bits", "egress_rate_bps", "egress_burst_bits")
    # attribute -> CNI key; the strict reading also accepts the Go field name (IngressRate)
    CNI_KEYS = dict(zip(__slots__, ("ingressRate", "ingressBurst", "egressRate", "egressBurst")))
    _SPELLINGS = {cni: (cni, cni[0].upper() + cni[1:]) for cni in CNI_KEYS.values()}
    _ACCEPTED = "ingressRate, ingressBurst, egressRate, egressBurst (bits/s, bits)"

    def __init__(self, ingress_rate_bps=0, ingress_burst_bits=0, egress_rate_bps=0,
                 egress_burst_bits=0, *, where=""):
        p = _prefix(where)
        given = (ingress_rate_bps, ingress_burst_bits, egress_rate_bps, egress_burst_bits)
        for attr, value in zip(self.__slots__, given):
            cni = self.CNI_KEYS[attr]
            maximum = MAX_RATE_BPS if cni.endswith("Rate") else None
            self._set(attr, 0 if value is None else parse_uint(value, p + cni, maximum))
        for d in ("ingress", "egress"):
            rate, burst = getattr(self, f"{d}_rate_bps"), getattr(self, f"{d}_burst_bits")
            if rate and not burst:
                raise BadValue(f"{p}{d}Rate is {rate} but {p}{d}Burst is not set; set both or "
                               "neither", f"{p}{d}Burst", burst, "a burst > 0 with a rate")
            if burst and not rate:
                raise BadValue(f"{p}{d}Burst is {burst} but {p}{d}Rate is not set; set both or "
                               "neither", f"{p}{d}Rate", rate, "a rate > 0 with a burst")
            if burst > MAX_BURST_BITS:
                raise BadValue(f"{p}{d}Burst {burst} bits exceeds {MAX_BURST_BITS} bits (4 GiB)",
                               f"{p}{d}Burst", burst, f"at most {MAX_BURST_BITS} bits")

    @classmethod
    def from_cni(cls, d, where="bandwidth", lookup=None):
        """From a ``runtimeConfig.bandwidth`` dict (see the module docstring for ``lookup``);
        None or ``{}`` is no shaping."""
        if isinstance(d, Bandwidth):
            return d
        if d is None or (isinstance(d, Mapping) and not d):
            return NO_BANDWIDTH
        if not isinstance(d, Mapping):
            raise _bad(where, d, "an object with ingressRate, ingressBurst, egressRate, "
                       "egressBurst")
        get = lookup or _strict_get(d, cls._SPELLINGS, where, cls._ACCEPTED)
        return cls(*(get(d, cni) for cni in cls.CNI_KEYS.values()), where=where)

    def to_cni(self):
        """The camelCase dict, only the directions that are set."""
        out = {}
        if self.ingress_rate_bps:
            out.update(ingressRate=self.ingress_rate_bps, ingressBurst=self.ingress_burst_bits)
        if self.egress_rate_bps:
            out.update(egressRate=self.egress_rate_bps, egressBurst=self.egress_burst_bits)
        return out

    @property
    def is_empty(self):
        return not (self.ingress_rate_bps or self.egress_rate_bps)


NO_BANDWIDTH = Bandwidth()


# ---------------------------------------------------------------- PortMapping

def _port(value, key):
    if parse_uint(value, key, 65535) == 0:
        raise _bad(key, value, "a port 1..65535")
    return int(value)


class PortMapping(_Value):
    """One hostPort rule: (host_ip or every node address, protocol, host_port) → container_port."""

    __slots__ = ("host_port", "container_port", "protocol", "host_ip", "_family")
    _SPELLINGS = {"hostPort": ("hostPort", "HostPort"),
                  "containerPort": ("containerPort", "ContainerPort"),
                  "protocol": ("protocol", "Protocol"),
                  "hostIP": ("hostIP", "HostIP", "hostIp")}
    _ACCEPTED = "hostPort, containerPort, protocol, hostIP"

    def __init__(self, host_port, container_port, protocol="tcp", host_ip=None, *, where=""):
        p = _prefix(where)
        self._set("host_port", _port(host_port, p + "hostPort"))
        self._set("container_port", _port(container_port, p + "containerPort"))
        if protocol is None or protocol == "":
            protocol = "tcp"
        if not isinstance(protocol, str):
            raise _bad(f"{p}protocol", protocol, "\"tcp\" or \"udp\"")
        if protocol.lower() not in ("tcp", "udp"):
            raise BadValue(f"{p}protocol: {protocol!r} is not supported; vswitch maps tcp and "
                           "udp", f"{p}protocol", protocol, "vswitch maps tcp and udp",
                           unsupported=True)
        self._set("protocol", protocol.lower())
        family = None
        if host_ip is not None and host_ip != "":
            family = ip_family(host_ip)
            if family is None:
                raise _bad(f"{p}hostIP", host_ip, "an IP address or \"\" for any")
            host_ip = canonical_ip(host_ip)
        if host_ip in ("", "0.0.0.0", "::"):
            host_ip = None          # the wildcard spellings all mean "every node address"
        self._set("host_ip", host_ip)
        self._set("_family", family)

    def _fields(self):
        return (self.host_port, self.container_port, self.protocol, self.host_ip)

    def _args(self):
        host_ip = self.host_ip
        if host_ip is None:
            host_ip = {4: "0.0.0.0", 6: "::"}.get(self._family)
        return (self.host_port, self.container_port, self.protocol, host_ip)

    def __repr__(self):
        return (f"PortMapping(host_port={self.host_port}, container_port={self.container_port}, "
                f"protocol={self.protocol!r}, host_ip={self.host_ip!r})")

    @classmethod
    def from_cni(cls, d, where="portMapping", lookup=None):
        """From one ``runtimeConfig.portMappings`` entry (see the module docstring for
        ``lookup``); hostPort and containerPort are required, protocol defaults to tcp."""
        if isinstance(d, PortMapping):
            return d
        if not isinstance(d, Mapping):
            raise _bad(where, d, "an object with hostPort, containerPort, protocol, hostIP")
        get = lookup or _strict_get(d, cls._SPELLINGS, where, cls._ACCEPTED)
        values = {cni: get(d, cni) for cni in cls._SPELLINGS}
        for cni in ("hostPort", "containerPort"):      # each: present, then valid
            key = _prefix(where) + cni
            if values[cni] is None:
                raise BadValue(f"{key} is missing in {_json_text(dict(d))}", key, None,
                               "a port 1..65535")
            _port(values[cni], key)
        return cls(values["hostPort"], values["containerPort"], values["protocol"],
                   values["hostIP"], where=where)

    def to_cni(self):
        """The camelCase dict; ``hostIP`` only when the rule is for one address."""
        out = {"hostPort": self.host_port, "containerPort": self.container_port,
               "protocol": self.protocol}
        if self.host_ip is not None:
            out["hostIP"] = self.host_ip
        return out

    def family(self):
        """4 or 6 when the hostIP named a family (an address, or 0.0.0.0 / ::), else None."""
        return self._family

    @property
    def proto_number(self):
        return 6 if self.protocol == "tcp" else 17
