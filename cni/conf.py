"""Parse and validate everything a runtime hands the plugin, once, into typed values.

Theory of operation: a runtime passes the command and the container in ``CNI_*``
environment variables and the network configuration as JSON on stdin. This module turns
them into an :class:`Env` and a :class:`NetConf` or raises :class:`CniError` with the code
the spec asks for, in the order the reference skeleton (containernetworking/cni
``pkg/skel``) checks them:

1. environment: every missing variable named in one message (4); unknown command (4);
   invalid container id or interface name (4); ``CNI_ARGS`` pairs (4).
2. stdin: not JSON or not an object (6); ``name`` missing or invalid (7).
3. ``cniVersion``: missing means 0.1.0; anything outside SUPPORTED_VERSIONS (1); CHECK
   below 0.4.0 and GC/STATUS below 1.1.0 (1).
4. the plugin's own keys: wrong type or range (7, naming the key and value); a key the
   plugin does not implement (2, naming key and value).

runtimeConfig is read in the spellings runtimes really send: libcni users send the
capability keys in camelCase (``hostPort``), containerd marshals its Go structs without
JSON tags (``HostPort``, ``IngressRate``). Like Go's encoding/json, keys inside
portMappings and bandwidth entries match case-insensitively, an exact match first.

DEL is permissive (spec: clean up as much as possible and succeed): it needs only the
name, version, ``ipam`` and ``socket``; runtime values it does not use are not validated,
so a configuration that made ADD fail cannot make DEL fail too.

The values the daemon shares (port mappings, bandwidth, MACs, the default socket) are
``vswitch.cnitypes``'s: this module reads them from the runtime's spellings and turns their
``BadValue`` into CniError 7 (or 2 for a value vswitch does not implement).

Imports only the standard library and vswitch's stdlib-only modules (the plugin starts for
every pod), and not ``json``: JSON goes through ``vswitch.fastjson``.
"""
import os

from vswitch import fastjson
from vswitch.cnitypes import (DEFAULT_SOCKET, MAX_BURST_BITS, BadValue, Bandwidth,  # noqa: F401
                              PortMapping, canonical_ip, ip_family, parse_pod_mac, split_cidr)
from vswitch.cnitypes import parse_uint as _parse_uint

from .errors import (CniError, INCOMPATIBLE_VERSION, INVALID_CONFIG, INVALID_ENV,
                     INVALID_NETNS, DECODING_FAILURE, UNSUPPORTED_FIELD)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
CURRENT_VERSION = "1.1.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
DEFAULT_MTU = 1500

# Which variables each command needs (pkg/skel getCmdArgsFromEnv; GC and STATUS need only
# the command and CNI_PATH).
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}
_ENV_ORDER = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")

# CNI_ARGS keys the plugin understands (CONVENTIONS.md and the K8S_POD_* keys kubelet,
# containerd and CRI-O send).
_CNI_ARGS_KEYS = ("IgnoreUnknown", "K8S_POD_NAMESPACE", "K8S_POD_NAME",
                  "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID", "MAC", "IP")

# Top-level configuration keys: the spec's own, those libcni or runtimes inject, and ours.
_GENERIC_KEYS = frozenset((
    "cniVersion", "cniVersions", "name", "type", "ipam", "dns", "args", "runtimeConfig",
    "capabilities", "prevResult", "cni.dev/valid-attachments", "cni.dev/attachments",
    "disableCheck", "disableGC"))
_STATIC_BANDWIDTH_KEYS = ("ingressRate", "ingressBurst", "egressRate", "egressBurst")
_OWN_KEYS = frozenset(("socket", "mtu", "logFile", "ipMasq") + _STATIC_BANDWIDTH_KEYS)
# Kubernetes' bandwidth annotations accept 1 kbit/s .. 1 Pbit/s (ExtractPodBandwidthResources).
MIN_ANNOTATION_RATE_BPS = 1000
MAX_ANNOTATION_RATE_BPS = 10 ** 15
INGRESS_ANNOTATION = "kubernetes.io/ingress-bandwidth"
EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"
POD_ANNOTATIONS_KEY = "io.kubernetes.cri.pod-annotations"
# Burst for a rate that came from an annotation (the annotation has no burst): 100 ms at
# the rate, at least two 64 KiB offloaded segments so one always fits.
MIN_ANNOTATION_BURST_BITS = 2 * 65536 * 8


def version_tuple(text):
    """``"1.0.0"`` -> ``(1, 0, 0)``; None when it is not three dot-separated integers."""
    if not isinstance(text, str):
        return None
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


# ---------------------------------------------------------------- environment

class Env:
    """The ``CNI_*`` variables of one invocation, validated."""

    __slots__ = ("command", "container_id", "netns", "ifname", "args_raw", "path",
                 "cni_args", "environ")

    def __init__(self, command, container_id, netns, ifname, args_raw, path, cni_args,
                 environ):
        self.command = command
        self.container_id = container_id
        self.netns = netns
        self.ifname = ifname
        self.args_raw = args_raw
        self.path = path            # list of directories from CNI_PATH
        self.cni_args = cni_args    # dict of the known CNI_ARGS keys present
        self.environ = environ      # the whole environment, passed on to IPAM


def parse_env(environ):
    """Validate the environment; :class:`CniError` 4 names every missing variable."""
    command = environ.get("CNI_COMMAND", "")
    required = ("CNI_COMMAND",) + _REQUIRED_ENV.get(command, ())
    missing = [name for name in _ENV_ORDER if name in required and not environ.get(name)]
    if missing:
        details = (f"CNI_COMMAND={command} needs " + ", ".join(required) if command
                   else "CNI_COMMAND is one of " + ", ".join(COMMANDS))
        raise CniError(INVALID_ENV, "required environment variables missing: "
                       + ", ".join(missing), details)
    if command not in COMMANDS:
        raise CniError(INVALID_ENV, f"unknown CNI_COMMAND {command!r}; accepted: "
                       + ", ".join(COMMANDS))
    container_id = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    if command in ("ADD", "CHECK", "DEL"):
        validate_container_id(container_id)
        validate_ifname(ifname)
    path = [p for p in environ.get("CNI_PATH", "").split(os.pathsep) if p]
    args_raw = environ.get("CNI_ARGS", "")
    cni_args = parse_cni_args(args_raw) if command in ("ADD", "CHECK", "DEL") else {}
    return Env(command, container_id, environ.get("CNI_NETNS", ""), ifname, args_raw, path,
               cni_args, environ)


def validate_container_id(container_id):
    """SPEC.md: not empty, an alphanumeric then alphanumerics, ``_``, ``.`` or ``-``."""
    ok = bool(container_id) and container_id[0].isascii() and container_id[0].isalnum()
    ok = ok and all(c.isascii() and (c.isalnum() or c in "_.-") for c in container_id)
    if not ok:
        raise CniError(INVALID_ENV, f"CNI_CONTAINERID {container_id!r} is invalid: it must "
                       "start with a letter or digit followed by letters, digits, "
                       "'_', '.' or '-'")


def validate_ifname(ifname):
    """SPEC.md: 1-15 bytes, not ``.`` or ``..``, no ``/``, ``:`` or whitespace."""
    problem = None
    if not ifname:
        problem = "is empty"
    elif len(ifname.encode()) > 15:
        problem = f"is {len(ifname.encode())} bytes long; at most 15 are allowed"
    elif ifname in (".", ".."):
        problem = "must not be '.' or '..'"
    elif any(c in "/:" or c.isspace() for c in ifname):
        problem = "must not contain '/', ':' or whitespace"
    if problem:
        raise CniError(INVALID_ENV, f"CNI_IFNAME {ifname!r} {problem}")


def _truthy(value):
    return value.lower() in ("1", "true")


def parse_cni_args(raw):
    """``"IgnoreUnknown=1;K8S_POD_NAME=x"`` -> dict of the known keys.

    A pair without ``=`` is an error (4); so is an unknown key unless ``IgnoreUnknown`` is
    true (as types.LoadArgs does). Empty segments (a trailing ``;``) are tolerated.
    """
    pairs = {}
    for part in raw.split(";"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENV, f"CNI_ARGS pair {part!r} is not KEY=VALUE",
                           f"CNI_ARGS={raw!r}")
        pairs[key] = value
    ignore_unknown = _truthy(pairs.get("IgnoreUnknown", ""))
    unknown = [k for k in pairs if k not in _CNI_ARGS_KEYS]
    if unknown and not ignore_unknown:
        raise CniError(INVALID_ENV, "CNI_ARGS has unknown keys "
                       + ", ".join(f"{k}={pairs[k]!r}" for k in unknown)
                       + " (add IgnoreUnknown=1 to ignore them)",
                       "known keys: " + ", ".join(_CNI_ARGS_KEYS))
    return {k: v for k, v in pairs.items() if k in _CNI_ARGS_KEYS}


def netns_is_own(netns, own="/proc/self/ns/net"):
    """True when ``netns`` is the namespace ``own`` (default: this process's; skel's
    CheckNetNS)."""
    try:
        a = os.stat(netns)
        b = os.stat(own)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def check_netns(env, own="/proc/self/ns/net"):
    """ADD and CHECK need an existing namespace that is not the plugin's own (``own``: the
    process the runtime started; vswitchd running the plugin for the thin client gives the
    client's)."""
    if not os.path.exists(env.netns):
        raise CniError(INVALID_ENV, f"CNI_NETNS {env.netns!r} does not exist")
    if netns_is_own(env.netns, own):
        raise CniError(INVALID_NETNS, f"CNI_NETNS {env.netns!r} is the plugin's own network "
                       "namespace; pods need their own")


# ---------------------------------------------------------------- stdin

def load_stdin(data):
    """Bytes -> dict; 6 if not JSON or not an object, 7 for a missing or invalid name."""
    try:
        obj = fastjson.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CniError(DECODING_FAILURE, f"network configuration on stdin is not JSON: {exc}")
    if not isinstance(obj, dict):
        raise CniError(DECODING_FAILURE, "network configuration on stdin must be a JSON "
                       f"object, got {type(obj).__name__}")
    name = obj.get("name")
    if not name:
        raise CniError(INVALID_CONFIG, "network configuration has no 'name'")
    if not isinstance(name, str) or not _valid_name(name):
        raise CniError(INVALID_CONFIG, f"network name {name!r} is invalid: it must start with "
                       "a letter or digit followed by letters, digits, '_', '.' or '-'")
    return obj


def _valid_name(name):
    return (name[0].isascii() and name[0].isalnum()
            and all(c.isascii() and (c.isalnum() or c in "_.-") for c in name))


def requested_version(obj):
    """The ``cniVersion`` a configuration asks for, ``"0.1.0"`` when absent."""
    return obj.get("cniVersion", "0.1.0")


def check_version(obj, command):
    """The configuration's version if this command supports it, else :class:`CniError` 1."""
    version = requested_version(obj)
    if not isinstance(version, str):
        raise CniError(INVALID_CONFIG, f"cniVersion must be a string like \"1.0.0\", got "
                       f"{version!r}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"incompatible CNI version {version!r}; this "
                       "plugin supports " + ", ".join(SUPPORTED_VERSIONS))
    floor = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}.get(command)
    if floor and version_tuple(version) < version_tuple(floor):
        raise CniError(INCOMPATIBLE_VERSION, f"config version {version} does not allow "
                       f"{command}; it needs cniVersion {floor} or later")
    return version


# ---------------------------------------------------------------- value parsers

def _bad(key, value, expected):
    return CniError(INVALID_CONFIG, f"{key}: {value!r} is invalid; expected {expected}")


def _json_value(value):
    return fastjson.dumps(value, separators=(",", ":"))


def get_ci(obj, key):
    """``obj[key]`` with Go's encoding/json matching: exact key first, else case-insensitive."""
    if key in obj:
        return obj[key]
    low = key.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def _cni_error(exc):
    """A :class:`BadValue` of vswitch.cnitypes as the CniError the spec asks for."""
    if exc.unsupported:
        return CniError(UNSUPPORTED_FIELD, f"unsupported field {exc.key}="
                        f"{_json_value(exc.value)}: {exc.expected}")
    return CniError(INVALID_CONFIG, str(exc))


def parse_uint(value, key, maximum=None):
    """A non-negative integer (integral JSON floats accepted); 7 naming ``key`` otherwise."""
    try:
        return _parse_uint(value, key, maximum)
    except BadValue as exc:
        raise _cni_error(exc) from None


def parse_mac(value, key):
    """A unicast Ethernet MAC, normalised to ``aa:bb:cc:dd:ee:ff``; 7 naming ``key`` otherwise."""
    try:
        return parse_pod_mac(value, key)
    except BadValue as exc:
        raise _cni_error(exc) from None


_DECIMAL_SUFFIX = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12,
                   "P": 15, "E": 18}
_BINARY_SUFFIX = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}


def parse_quantity(text, key="quantity"):
    """A Kubernetes resource quantity (``"10M"``, ``"1Gi"``, ``"1.5e6"``) -> integer, rounded up.

    Follows k8s.io/apimachinery resource.Quantity: a decimal number, then a decimal SI
    suffix (n u m k M G T P E), a binary one (Ki Mi Gi Ti Pi Ei) or an exponent (e3, E-2).
    """
    from decimal import Decimal, InvalidOperation, ROUND_CEILING
    if not isinstance(text, str) or not text.strip():
        raise _bad(key, text, "a quantity such as \"10M\" or \"1Gi\"")
    s = text.strip()
    i = 0
    if s[:1] in "+-":
        i = 1
    while i < len(s) and (s[i].isdigit() or s[i] == "."):
        i += 1
    number, suffix = s[:i], s[i:]
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise _bad(key, text, "a quantity such as \"10M\" or \"1Gi\"") from None
    if suffix in _DECIMAL_SUFFIX:
        value = value.scaleb(_DECIMAL_SUFFIX[suffix])
    elif suffix in _BINARY_SUFFIX:
        value = value * (1 << _BINARY_SUFFIX[suffix])
    elif suffix[:1] in ("e", "E") and suffix[1:].lstrip("+-").isdigit():
        value = value.scaleb(int(suffix[1:]))
    else:
        raise _bad(key, text, "a quantity such as \"10M\" or \"1Gi\" (suffixes n u m k M G T "
                   "P E, Ki Mi Gi Ti Pi Ei, or an exponent e3)")
    return int(value.to_integral_value(rounding=ROUND_CEILING))


# ---------------------------------------------------------------- the configuration

class NetConf:
    """The validated network configuration of one invocation."""

    __slots__ = ("raw", "version", "name", "type", "ipam_type", "socket_path", "mtu", "mtu_given",
                 "log_file", "dns", "mac", "port_mappings", "bandwidth", "bandwidth_source",
                 "requested_ips", "ip_masq", "prev_result", "valid_attachments", "pod")

    def __init__(self, **kw):
        for k in self.__slots__:
            setattr(self, k, kw.get(k))


def parse_netconf(obj, env):
    """Build a :class:`NetConf` from the loaded stdin object (after :func:`check_version`)."""
    command = env.command
    strict = command in ("ADD", "CHECK")
    version = obj["cniVersion"]
    ptype = obj.get("type")
    if not isinstance(ptype, str) or not ptype:
        raise _bad("type", ptype, "the plugin type, \"vswitch\"")
    if strict:
        unknown = sorted(k for k in obj if k not in _GENERIC_KEYS and k not in _OWN_KEYS)
        if unknown:
            k = unknown[0]
            raise CniError(UNSUPPORTED_FIELD, f"unsupported field {k}={_json_value(obj[k])}: "
                           "the vswitch plugin does not implement it",
                           "plugin keys: " + ", ".join(sorted(_OWN_KEYS)))

    ipam = obj.get("ipam")
    ipam_type = None
    if ipam is not None or strict:
        if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str) \
                or not ipam.get("type"):
            if strict or ipam is not None:
                raise _bad("ipam", ipam, "an object naming the IPAM plugin, e.g. "
                           "{\"type\": \"host-local\", \"ranges\": [...]}")
        else:
            ipam_type = ipam["type"]
        if ipam_type and ("/" in ipam_type or ipam_type in (".", "..")):
            raise _bad("ipam.type", ipam_type, "a plugin name found in CNI_PATH, not a path")

    sock = obj.get("socket", DEFAULT_SOCKET)
    if not isinstance(sock, str) or not sock.startswith("/"):
        raise _bad("socket", sock, "the absolute path of vswitchd's control socket")

    log_file = obj.get("logFile")
    if log_file is not None and (not isinstance(log_file, str) or not log_file.startswith("/")):
        raise _bad("logFile", log_file, "an absolute file path")

    conf = NetConf(raw=obj, version=version, name=obj["name"], type=ptype,
                   ipam_type=ipam_type, socket_path=sock, log_file=log_file, mtu=DEFAULT_MTU,
                   dns={}, mac=None, port_mappings=(), bandwidth=None, requested_ips=(),
                   ip_masq=False, prev_result=None, valid_attachments=None,
                   pod=_pod_from_args(env.cni_args))

    prev = obj.get("prevResult")
    if prev is not None:
        if not isinstance(prev, dict):
            raise _bad("prevResult", prev, "the result object of the previous plugin")
        conf.prev_result = prev

    if command == "GC":
        conf.valid_attachments = _parse_attachments(obj)
    if not strict:
        return conf

    mtu = obj.get("mtu", DEFAULT_MTU)
    # mtu_given: only a configured mtu is sent; without one the daemon picks (the uplink's
    # MTU - 50 with VXLAN, else 1500)
    conf.mtu_given = "mtu" in obj
    conf.mtu = parse_uint(mtu, "mtu", 65535)
    if conf.mtu < 68:
        raise _bad("mtu", mtu, "an integer 68..65535")
    conf.dns = _parse_dns(obj.get("dns"))
    ip_masq = obj.get("ipMasq", False)
    if not isinstance(ip_masq, bool):
        raise _bad("ipMasq", ip_masq, "true or false")
    conf.ip_masq = ip_masq

    rc = obj.get("runtimeConfig", {})
    if not isinstance(rc, dict):
        raise _bad("runtimeConfig", rc, "an object")
    conf.mac = _parse_mac_sources(obj, rc, env.cni_args)
    conf.port_mappings = _parse_port_mappings(rc.get("portMappings"))
    conf.bandwidth, conf.bandwidth_source = _parse_bandwidth(obj, rc)
    conf.requested_ips = _parse_requested_ips(obj, rc, env.cni_args)
    return conf


def _pod_from_args(cni_args):
    pod = {}
    for key, field in (("K8S_POD_NAMESPACE", "namespace"), ("K8S_POD_NAME", "name"),
                       ("K8S_POD_UID", "uid")):
        if cni_args.get(key):
            pod[field] = cni_args[key]
    return pod


def _parse_attachments(obj):
    """GC's valid attachments: ``cni.dev/valid-attachments`` (or the older ``cni.dev/attachments``)."""
    key = "cni.dev/valid-attachments"
    if key not in obj and "cni.dev/attachments" in obj:
        key = "cni.dev/attachments"
    value = obj.get(key, [])
    if value is None:
        value = []
    expected = "a list of {\"containerID\": ..., \"ifname\": ...}"
    if not isinstance(value, list):
        raise _bad(key, value, expected)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str) \
                or not isinstance(item.get("ifname"), str):
            raise _bad(f"{key}[{i}]", item, expected)
        out.append({"containerID": item["containerID"], "ifname": item["ifname"]})
    return out


def _parse_dns(dns):
    if dns is None:
        return {}
    if not isinstance(dns, dict):
        raise _bad("dns", dns, "an object with nameservers, domain, search, options")
    out = {}
    for key in ("nameservers", "search", "options"):
        if key in dns and dns[key] is not None:
            v = dns[key]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise _bad(f"dns.{key}", v, "a list of strings")
            if v:
                out[key] = list(v)
    if dns.get("domain"):
        if not isinstance(dns["domain"], str):
            raise _bad("dns.domain", dns["domain"], "a string")
        out["domain"] = dns["domain"]
    for ns in out.get("nameservers", ()):
        if ip_family(ns) is None:
            raise _bad("dns.nameservers", ns, "IP addresses")
    return out


def _parse_mac_sources(obj, rc, cni_args):
    """CNI_ARGS MAC, then args.cni.mac, then runtimeConfig.mac: the last one set wins
    (the reference bridge plugin's order)."""
    mac = None
    if cni_args.get("MAC"):
        mac = parse_mac(cni_args["MAC"], "CNI_ARGS MAC")
    args = obj.get("args")
    if isinstance(args, dict) and isinstance(args.get("cni"), dict) and args["cni"].get("mac"):
        mac = parse_mac(args["cni"]["mac"], "args.cni.mac")
    if rc.get("mac"):
        mac = parse_mac(rc["mac"], "runtimeConfig.mac")
    return mac


def _parse_port_mappings(value):
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _bad("runtimeConfig.portMappings", value, "a list of port mappings")
    out = []
    seen = set()
    for i, m in enumerate(value):
        key = f"runtimeConfig.portMappings[{i}]"
        try:
            pm = PortMapping.from_cni(m, key, lookup=get_ci)
        except BadValue as exc:
            raise _cni_error(exc) from None
        ident = (pm.host_port, pm.protocol, pm.host_ip)
        if ident in seen:
            raise CniError(INVALID_CONFIG, f"{key} repeats hostPort {pm.host_port}/{pm.protocol} "
                           f"on host IP {pm.host_ip or 'any'}")
        seen.add(ident)
        out.append(pm)
    return tuple(out)


def _static_get(obj, key):
    return obj.get(key)


def _parse_bandwidth(obj, rc):
    """(Bandwidth or None, where it came from). Static keys in the plugin config win over
    runtimeConfig.bandwidth (as the reference bandwidth plugin does); with neither, the
    pod's bandwidth annotations."""
    try:
        if any(k in obj for k in _STATIC_BANDWIDTH_KEYS):
            return Bandwidth.from_cni(obj, "", _static_get), "plugin configuration"
        if rc.get("bandwidth") is not None:
            return (Bandwidth.from_cni(rc["bandwidth"], "runtimeConfig.bandwidth", get_ci),
                    "runtimeConfig.bandwidth")
    except BadValue as exc:
        raise _cni_error(exc) from None
    annotations = rc.get(POD_ANNOTATIONS_KEY)
    if annotations is None:
        return None, None
    if not isinstance(annotations, dict):
        raise _bad(f"runtimeConfig.{POD_ANNOTATIONS_KEY}", annotations, "an object")
    rates = []
    for ann in (INGRESS_ANNOTATION, EGRESS_ANNOTATION):
        text = annotations.get(ann)
        if text is None:
            rates.append(0)
            continue
        key = f"annotation {ann}"
        rate = parse_quantity(text, key)
        if rate < MIN_ANNOTATION_RATE_BPS or rate > MAX_ANNOTATION_RATE_BPS:
            raise CniError(INVALID_CONFIG, f"{key}: {text!r} is {rate} bit/s; accepted 1k "
                           "(1 kbit/s) to 1P (1 Pbit/s)")
        rates.append(rate)
    if not any(rates):
        return None, None
    ir, er = rates

    def burst(rate):   # 100 ms at the rate, within MIN_ANNOTATION_BURST_BITS..MAX_BURST_BITS
        return min(max(rate // 10, MIN_ANNOTATION_BURST_BITS), MAX_BURST_BITS) if rate else 0
    return Bandwidth(ir, burst(ir), er, burst(er)), "pod annotations"


def _parse_requested_ips(obj, rc, cni_args):
    """Addresses the runtime asked for (CNI_ARGS IP, args.cni.ips, runtimeConfig.ips); the
    IPAM plugin allocates them, the plugin checks that it did."""
    out = []
    sources = []
    if cni_args.get("IP"):
        sources.append(("CNI_ARGS IP", [s.strip() for s in cni_args["IP"].split(",")]))
    args = obj.get("args")
    if isinstance(args, dict) and isinstance(args.get("cni"), dict) \
            and args["cni"].get("ips") is not None:
        sources.append(("args.cni.ips", args["cni"]["ips"]))
    if rc.get("ips") is not None:
        sources.append(("runtimeConfig.ips", rc["ips"]))
    for key, values in sources:
        if not isinstance(values, list):
            raise _bad(key, values, "a list of IP addresses (optionally with /prefix)")
        for v in values:
            parsed = split_cidr(v)
            if parsed is None:
                raise _bad(key, v, "an IP address, optionally with /prefix")
            out.append(parsed[0])
    return tuple(out)
