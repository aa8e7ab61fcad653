"""Switch: ports by name, and the configuration they imply, applied to one Datapath.

Theory of operation
-------------------
The datapath (``docs/datapath.md``) knows ports only as small integers and addresses
only as bytes. ``Switch`` is the one object above it that both the daemon and the
simulation drive; it does no I/O and reads no clock (``now_ns`` is always an argument).

- **Ports.** Each port has a unique name and an id chosen here (lowest free id, or an
  explicit one so a restarted daemon can re-adopt its pods with their old ids), a kind
  (``pod``, ``host``, ``uplink``), a MAC and IPs. A pod port is bound to its MAC and IPs
  (anti-spoofing on); the host port carries the gateway MAC and addresses
  (``Datapath.set_gateway``); the uplink port is the node's NIC.
- **Node addresses** are the gateways, ``SwitchConfig.node_addresses`` and whatever
  ``set_node_addresses`` adds: a hostPort rule without ``host_ip`` answers on all of them.
- **hostPort rules** come from ``PortMapping`` values. A rule needs the pod's IP of the
  rule's family: the family of ``host_ip`` when given, else one rule per family the pod
  has an address of. A (protocol, host port, host IP, family) key belongs to one pod: a
  second pod asking for it is refused (the datapath would silently replace the rule).
- **Shaping** comes from ``Bandwidth``: one datapath shaper per direction that is set.
- **Atomicity.** Every call validates all its arguments before touching the datapath,
  and undoes what it did if the datapath still refuses; a failed call changes nothing.
- **Views** (counters, fdb, conntrack, hostports) are plain dicts and lists with port
  names instead of ids and addresses as strings, ready for JSON.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping

from vswitch import datapath
from vswitch.datapath import consts as C
from vswitch.config import _NO_BANDWIDTH, Bandwidth, PortMapping, SwitchConfig, format_mac, parse_ip, parse_mac

__all__ = ["Switch", "Port", "PORT_KINDS"]

PORT_KINDS = tuple(C.PORT_KINDS)  # ("pod", "host", "uplink")


@dataclass(frozen=True)
class Port:
    """One switch port as the control plane sees it (a snapshot; Switch holds the truth)."""
    name: str
    port_id: int
    kind: str                         # "pod", "host" or "uplink"
    mac: str | None = None            # "aa:bb:cc:dd:ee:ff"
    ips: tuple[str, ...] = ()         # bound addresses (pods) or gateway addresses (host)
    up: bool = True
    antispoof: bool = False
    bandwidth: Bandwidth = Bandwidth()
    port_mappings: tuple[PortMapping, ...] = ()

    def ip_of_family(self, version: int) -> str | None:
        for ip in self.ips:
            if ipaddress.ip_address(ip).version == version:
                return ip
        return None

    def to_dict(self) -> dict:
        return {"name": self.name, "port_id": self.port_id, "kind": self.kind, "mac": self.mac,
                "ips": list(self.ips), "up": self.up, "antispoof": self.antispoof,
                "bandwidth": self.bandwidth.to_cni(),
                "port_mappings": [m.to_cni() for m in self.port_mappings]}


def _load_impl(impl):
    # None and "c"/"py" are decided by vswitch.datapath (the one place; BuildError there)
    if impl is None or isinstance(impl, str):
        if impl is not None and impl not in datapath.IMPLEMENTATIONS:
            raise ValueError(f"impl: {impl!r}; accepted: 'py', 'c', a module with a Datapath class, or None")
        return datapath.module(impl)
    if not hasattr(impl, "Datapath"):
        raise ValueError(f"impl: {impl!r} has no Datapath class")
    return impl


def _ip_text(raw) -> str:
    """Address bytes (4, 16, or 16 holding ::ffff:a.b.c.d) as text."""
    b = bytes(raw)
    if len(b) == 16 and b[:12] == b"\0" * 10 + b"\xff\xff":
        b = b[12:]
    return str(ipaddress.ip_address(b))


class Switch:
    """Ports by name over one ``Datapath``; see the module docstring."""

    def __init__(self, config: SwitchConfig | Mapping | None = None, impl=None):
        if config is None:
            config = SwitchConfig()
        elif isinstance(config, Mapping):
            config = SwitchConfig.from_dict(config)
        elif not isinstance(config, SwitchConfig):
            raise ValueError(f"config: expected a SwitchConfig or a dict, got {config!r}")
        self.config = config
        self.impl = _load_impl(impl)
        self.dp = self.impl.Datapath(**config.datapath_kwargs())
        self._ports: dict[str, Port] = {}
        self._by_id: dict[int, str] = {}
        self._next_id = 0
        # (proto, host_port, host_ip or None, family) -> (pod name, PortMapping)
        self._rules: dict[tuple, tuple[str, PortMapping]] = {}
        self._extra_node_addresses: tuple[str, ...] = ()
        self._pod_ips: dict[str, str] = {}    # pod IP -> port name (uniqueness, O(1))
        self._pod_macs: dict[str, str] = {}   # pod MAC -> port name
        self._apply_node_addresses()

    # ------------------------------------------------------------------ ports

    def add_port(self, name: str, kind: str = "pod", *, mac=None, ips: Iterable = (),
                 port_id: int | None = None, antispoof: bool | None = None, up: bool = True,
                 bandwidth: Bandwidth | Mapping | None = None,
                 port_mappings: Iterable[PortMapping | Mapping] = ()) -> Port:
        """Add a port; returns its snapshot. Nothing is changed if any argument is bad.

        ``kind="host"`` also makes this the gateway port: its MAC defaults to
        ``config.gateway_mac``, its IPs to the gateways, and the datapath learns them
        (``set_gateway``). ``antispoof`` defaults to on for pods, off otherwise; a pod's
        MAC and IPs are its anti-spoofing binding.
        """
        if not isinstance(name, str) or not name or len(name) > 64 or any(c.isspace() for c in name):
            raise ValueError(f"port name: {name!r}; accepted: a non-empty string without spaces, ≤ 64 chars")
        if name in self._ports:
            raise ValueError(f"port name: {name!r} already exists (port id {self._ports[name].port_id})")
        if kind not in C.PORT_KINDS:
            raise ValueError(f"port kind: {kind!r}; accepted: {', '.join(PORT_KINDS)}")
        if kind == "host":
            hosts = [p.name for p in self._ports.values() if p.kind == "host"]
            if hosts:
                raise ValueError(f"port {name!r}: the switch already has a host port, {hosts[0]!r}")
            if mac is None:
                mac = self.config.gateway_mac
            if not ips:
                ips = self.config.gateways
        mac_b = None if mac is None else parse_mac(mac, f"port {name!r} mac")
        if mac_b is not None and (mac_b[0] & 1):
            raise ValueError(f"port {name!r} mac: {format_mac(mac_b)} is a multicast address")
        if isinstance(ips, (str, bytes)):
            ips = (ips,)
        ip_objs = [parse_ip(ip, f"port {name!r} ips") for ip in ips]
        if len(ip_objs) > C.MAX_IPS_PER_PORT:
            raise ValueError(f"port {name!r}: {len(ip_objs)} IPs; at most {C.MAX_IPS_PER_PORT}")
        if len(set(ip_objs)) != len(ip_objs):
            raise ValueError(f"port {name!r}: duplicate IPs in {[str(i) for i in ip_objs]}")
        if kind == "pod":
            for ip in ip_objs:
                owner = self._ip_owner(str(ip))
                if owner is not None:
                    raise ValueError(f"port {name!r}: IP {ip} already belongs to port {owner!r}")
        if mac_b is not None and kind == "pod":
            owner = self._pod_macs.get(format_mac(mac_b))
            if owner is not None:
                raise ValueError(f"port {name!r}: MAC {format_mac(mac_b)} already belongs to port {owner!r}")
        if port_id is None:
            port_id = self._free_id()
        else:
            if isinstance(port_id, bool) or not isinstance(port_id, int) or not 0 <= port_id < self.config.max_ports:
                raise ValueError(f"port {name!r}: port_id {port_id!r}; accepted: 0 .. {self.config.max_ports - 1}")
            if port_id in self._by_id:
                raise ValueError(f"port {name!r}: port_id {port_id} is taken by {self._by_id[port_id]!r}")
        if antispoof is None:
            antispoof = kind == "pod"
        bw = Bandwidth.from_cni(bandwidth)
        if bw is not None and not bw.is_empty and kind != "pod":
            raise ValueError(f"port {name!r}: bandwidth applies to pod ports, not {kind!r}")
        mappings = tuple(PortMapping.from_cni(m) for m in (port_mappings or ()))
        port = Port(name=name, port_id=port_id, kind=kind,
                    mac=None if mac_b is None else format_mac(mac_b),
                    ips=tuple(str(i) for i in ip_objs), up=bool(up), antispoof=bool(antispoof),
                    bandwidth=bw, port_mappings=())
        rules = self._plan_rules(port, mappings)  # validates the mappings before any change

        dp = self.dp
        dp.add_port(port_id, C.PORT_KINDS[kind])
        try:
            if kind == "pod":
                dp.bind_port(port_id, mac=mac_b, ips=[i.packed for i in ip_objs] if ip_objs else None)
            elif mac_b is not None:
                dp.bind_port(port_id, mac=mac_b, ips=None)
            dp.set_antispoof(port_id, bool(antispoof))
            if not up:
                dp.set_port_up(port_id, False)
            self._apply_bandwidth(port_id, _NO_BANDWIDTH, bw)
            added = []
            try:
                for key, args in rules:
                    dp.add_hostport(*args)
                    added.append(key)
            except BaseException:
                self._remove_rules(added)
                raise
            if kind == "host":
                dp.set_gateway(mac_b, ipv4=self._packed_of(ip_objs, 4), ipv6=self._packed_of(ip_objs, 6))
        except BaseException:
            dp.remove_port(port_id)
            raise
        port = dataclasses.replace(port, port_mappings=mappings)
        self._ports[name] = port
        self._by_id[port_id] = name
        if port_id == self._next_id:
            self._next_id = (port_id + 1) % self.config.max_ports
        for key, _ in rules:
            self._rules[key] = (name, self._mapping_of_key(mappings, key))
        if kind == "pod":
            self._pod_ips.update((ip, name) for ip in port.ips)
            if port.mac is not None:
                self._pod_macs[port.mac] = name
        if kind == "host":
            self._apply_node_addresses()
        return port

    def remove_port(self, name: str) -> Port:
        """Remove a port with its MACs, conntrack entries, hostPort rules, shapers and queue."""
        port = self.port(name)
        self.dp.remove_port(port.port_id)
        del self._ports[name]
        del self._by_id[port.port_id]
        for key in [k for k, (owner, _) in self._rules.items() if owner == name]:
            del self._rules[key]
        if port.kind == "pod":
            for ip in port.ips:
                self._pod_ips.pop(ip, None)
            if port.mac is not None:
                self._pod_macs.pop(port.mac, None)
        if port.kind == "host":
            self.dp.set_gateway(parse_mac(self.config.gateway_mac), ipv4=None, ipv6=None)
            self._apply_node_addresses()
        return port

    def port(self, name_or_id: str | int) -> Port:
        """A port's snapshot by name or id; ``KeyError`` naming the value if unknown."""
        if isinstance(name_or_id, int) and not isinstance(name_or_id, bool):
            name = self._by_id.get(name_or_id)
            if name is None:
                raise KeyError(f"unknown port id {name_or_id!r}; known: {sorted(self._by_id)}")
            return self._ports[name]
        port = self._ports.get(name_or_id)
        if port is None:
            known = sorted(self._ports)
            shown = known if len(known) <= 20 else known[:20] + ["..."]
            raise KeyError(f"unknown port {name_or_id!r}; known: {shown}")
        return port

    def port_id(self, name: str) -> int:
        return self.port(name).port_id

    def port_name(self, port_id: int) -> str:
        return self.port(port_id).name

    def ports(self) -> list[Port]:
        """Every port, by id."""
        return [self._ports[self._by_id[i]] for i in sorted(self._by_id)]

    def __contains__(self, name) -> bool:
        return name in self._ports

    def __len__(self) -> int:
        return len(self._ports)

    @property
    def host_port(self) -> Port | None:
        for p in self._ports.values():
            if p.kind == "host":
                return p
        return None

    def set_port_up(self, name: str, up: bool) -> Port:
        port = self.port(name)
        self.dp.set_port_up(port.port_id, bool(up))
        port = self._ports[name] = dataclasses.replace(port, up=bool(up))
        return port

    def set_antispoof(self, name: str, enabled: bool) -> Port:
        port = self.port(name)
        self.dp.set_antispoof(port.port_id, bool(enabled))
        port = self._ports[name] = dataclasses.replace(port, antispoof=bool(enabled))
        return port

    def up_port_ids(self) -> list[int]:
        return sorted(p.port_id for p in self._ports.values() if p.up)

    # ------------------------------------------------------------------ node addresses

    @property
    def node_addresses(self) -> tuple[str, ...]:
        out = []
        host = self.host_port
        for ip in (host.ips if host else ()) + self.config.node_addresses + self._extra_node_addresses:
            if ip not in out:
                out.append(ip)
        return tuple(out)

    def set_node_addresses(self, ips: Iterable) -> tuple[str, ...]:
        """Node addresses besides the host port's and the config's (e.g. the uplink's)."""
        if isinstance(ips, (str, bytes)):
            ips = (ips,)
        parsed = tuple(str(parse_ip(ip, "node address")) for ip in ips)
        old = self._extra_node_addresses
        self._extra_node_addresses = parsed
        try:
            self._apply_node_addresses()
        except BaseException:
            self._extra_node_addresses = old
            raise
        return self.node_addresses

    def _apply_node_addresses(self):
        self.dp.set_node_addresses([ipaddress.ip_address(ip).packed for ip in self.node_addresses])

    # ------------------------------------------------------------------ hostPort rules

    def add_port_mapping(self, name: str, mapping: PortMapping | Mapping) -> PortMapping:
        """Add a hostPort rule to pod ``name`` (a ``PortMapping`` or a CNI portMappings entry)."""
        port = self.port(name)
        mapping = PortMapping.from_cni(mapping)
        if mapping in port.port_mappings:
            return mapping
        rules = self._plan_rules(port, (mapping,))
        added = []
        try:
            for key, args in rules:
                self.dp.add_hostport(*args)
                added.append(key)
        except BaseException:
            self._remove_rules(added)
            raise
        for key, _ in rules:
            self._rules[key] = (name, mapping)
        self._ports[name] = dataclasses.replace(port, port_mappings=port.port_mappings + (mapping,))
        return mapping

    def remove_port_mapping(self, name: str, mapping: PortMapping | Mapping) -> bool:
        """Remove a hostPort rule of pod ``name``; False if it had no such rule."""
        port = self.port(name)
        mapping = PortMapping.from_cni(mapping)
        if mapping not in port.port_mappings:
            return False
        keys = [k for k, (owner, m) in self._rules.items() if owner == name and m == mapping]
        self._remove_rules(keys)
        for key in keys:
            del self._rules[key]
        self._ports[name] = dataclasses.replace(
            port, port_mappings=tuple(m for m in port.port_mappings if m != mapping))
        return True

    def _plan_rules(self, port: Port, mappings: Iterable[PortMapping]) -> list:
        """[(key, add_hostport args)] for the mappings of ``port``; ValueError if any is bad."""
        if mappings and port.kind != "pod":
            raise ValueError(f"port {port.name!r}: port mappings apply to pod ports, not {port.kind!r}")
        plan, keys = [], set()
        for m in mappings:
            families = ([ipaddress.ip_address(m.host_ip).version] if m.host_ip
                        else sorted({ipaddress.ip_address(ip).version for ip in port.ips}))
            if not families:
                raise ValueError(f"port {port.name!r}: hostPort {m.host_port}/{m.protocol} needs a pod IP, "
                                 f"and the port has none")
            for fam in families:
                pod_ip = port.ip_of_family(fam)
                if pod_ip is None:
                    raise ValueError(f"port {port.name!r}: hostIP {m.host_ip} is IPv{fam} but the pod has "
                                     f"no IPv{fam} address (ips {list(port.ips)})")
                key = (m.proto_number, m.host_port, m.host_ip, fam)
                # one (proto, host port, host IP) belongs to one pod, whatever the family: the
                # datapath removes the "any address" rules of both families at once (D19)
                owners = {o for k, (o, _) in self._rules.items() if k[:3] == key[:3]}
                if owners or key[:3] in {k[:3] for k in keys if k[3] == fam}:
                    who = sorted(owners) or [port.name]
                    raise ValueError(f"hostPort {m.host_port}/{m.protocol} on "
                                     f"{m.host_ip or 'every node address'} is already "
                                     f"mapped, to port {who[0]!r}")
                keys.add(key)
                plan.append((key, (m.proto_number, m.host_port, ipaddress.ip_address(pod_ip).packed,
                                   m.container_port, port.port_id, self._host_ip_bytes(m.host_ip))))
        if len(self._rules) + len(plan) > self.config.max_hostports:
            raise ValueError(f"port {port.name!r}: {len(plan)} more hostPort rules would exceed "
                             f"max_hostports={self.config.max_hostports}")
        return plan

    def _remove_rules(self, keys):
        """Remove datapath rules; one call per (proto, host port, host IP) covers both families."""
        done = set()
        for key in keys:
            if key[:3] not in done:
                done.add(key[:3])
                self.dp.remove_hostport(key[0], key[1], self._host_ip_bytes(key[2]))

    @staticmethod
    def _mapping_of_key(mappings, key):
        for m in mappings:
            if (m.proto_number, m.host_port, m.host_ip) == key[:3]:
                return m
        raise AssertionError(key)

    @staticmethod
    def _host_ip_bytes(host_ip):
        return None if host_ip is None else ipaddress.ip_address(host_ip).packed

    @staticmethod
    def _packed_of(ip_objs, version):
        for ip in ip_objs:
            if ip.version == version:
                return ip.packed
        return None

    def _ip_owner(self, ip: str) -> str | None:
        return self._pod_ips.get(ip)

    def pod_of_ip(self, ip) -> str | None:
        """The name of the pod port bound to ``ip``, or None."""
        return self._pod_ips.get(str(parse_ip(ip)))

    def pod_of_mac(self, mac) -> str | None:
        return self._pod_macs.get(format_mac(parse_mac(mac)))

    def _free_id(self) -> int:
        n = self.config.max_ports
        if len(self._by_id) >= n:
            raise ValueError(f"no free port id: all {n} are in use (max_ports={n})")
        i = self._next_id
        while i in self._by_id:
            i = (i + 1) % n
        return i    # add_port moves self._next_id past it once the port exists

    # ------------------------------------------------------------------ shaping

    def set_bandwidth(self, name: str, bandwidth: Bandwidth | Mapping | None) -> Port:
        """Replace a pod's shaping (``None`` or ``{}``: none)."""
        port = self.port(name)
        bw = Bandwidth.from_cni(bandwidth)
        if not bw.is_empty and port.kind != "pod":
            raise ValueError(f"port {name!r}: bandwidth applies to pod ports, not {port.kind!r}")
        self._apply_bandwidth(port.port_id, port.bandwidth, bw)
        port = self._ports[name] = dataclasses.replace(port, bandwidth=bw)
        return port

    def _apply_bandwidth(self, port_id: int, old: Bandwidth, new: Bandwidth):
        q = self.config.shaper_queue_bytes
        for direction, rate, burst, old_rate in (
                (C.INGRESS, new.ingress_rate_bps, new.ingress_burst_bits, old.ingress_rate_bps),
                (C.EGRESS, new.egress_rate_bps, new.egress_burst_bits, old.egress_rate_bps)):
            if rate:
                self.dp.set_shaper(port_id, direction, rate, burst, q)
            elif old_rate:
                self.dp.clear_shaper(port_id, direction)

    def shaper_state(self, name: str) -> dict:
        """{"ingress": state or None, "egress": state or None} of a port."""
        pid = self.port_id(name)
        return {"ingress": self.dp.shaper_state(pid, C.INGRESS),
                "egress": self.dp.shaper_state(pid, C.EGRESS)}

    # ------------------------------------------------------------------ the data path

    def process(self, buf, offsets, lengths, in_ports, out_ports, n: int, now_ns: int) -> None:
        self.dp.process(buf, offsets, lengths, in_ports, out_ports, n, now_ns)

    def drain(self, now_ns, out_buf, out_offsets, out_lengths, out_in_ports, out_ports, max_pkts) -> int:
        return self.dp.drain(now_ns, out_buf, out_offsets, out_lengths, out_in_ports, out_ports, max_pkts)

    def drain_due(self, now_ns: int, out_buf, out_offsets, out_lengths, out_in_ports, out_ports,
                  max_pkts: int, deliver) -> int:
        """Release the shaping queues' packets due at ``now_ns`` and hand them on; returns the count.

        Calls ``drain`` (up to ``max_pkts`` packets into the ``out_*`` arrays) and then
        ``deliver(k)`` with the number ``k`` it released, again and again until a call
        releases fewer than ``max_pkts``: then nothing more is due, or what is due did not
        fit ``out_buf``, or entered a queue during that call (a frame that left an egress
        queue into an ingress queue); the caller's next drain releases those. The daemon
        and the simulation both drain through here; ``ext/io.pxi``'s ``_drain_due`` is the
        same loop in Cython without the GIL (it writes to the TAP devices itself).
        """
        total = 0
        while True:
            k = self.dp.drain(now_ns, out_buf, out_offsets, out_lengths, out_in_ports, out_ports, max_pkts)
            if k <= 0:
                return total
            total += k
            deliver(k)
            if k < max_pkts:
                return total

    def next_departure_ns(self) -> int:
        return self.dp.next_departure_ns()

    def trace(self, frame, in_port: str | int, now_ns: int) -> list[tuple[str, str]]:
        """Each pipeline stage's decision for ``frame`` arriving on ``in_port``; changes nothing."""
        port = self.port(in_port)
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ValueError(f"trace: frame must be bytes, got {type(frame).__name__}")
        stages = [tuple(s) for s in self.dp.trace(bytes(frame), port.port_id, now_ns)]
        return [(stage, self._name_ports(decision)) for stage, decision in stages]

    def _name_ports(self, text: str) -> str:
        """Append port names to 'port N' mentions in a trace decision."""
        import re

        def sub(m):
            name = self._by_id.get(int(m.group(1)))
            return f"{m.group(0)} ({name})" if name is not None else m.group(0)
        return re.sub(r"\bport (\d+)\b(?! \()", sub, str(text))

    # ------------------------------------------------------------------ views

    def counters(self, port: str | None = None) -> dict:
        """{"global": {counter: n}, "ports": {port name: {counter: n}}} (one port if asked)."""
        g = self.dp.global_counters()
        pc = self.dp.port_counters()
        names = [port] if port is not None else [self._by_id[i] for i in sorted(self._by_id)]
        ports = {}
        for name in names:
            row = pc[self.port(name).port_id]
            ports[name] = {c: int(row[i]) for i, c in enumerate(C.PORT_COUNTERS)}
        return {"global": {c: int(g[i]) for i, c in enumerate(C.GLOBAL_COUNTERS)}, "ports": ports}

    def fdb(self, now_ns: int | None = None) -> list[dict]:
        """The MAC table: [{"vlan", "mac", "port", "last_seen_ns", "static"(, "age_ns")}]; a
        static entry (a pod's bound MAC) never ages: last_seen_ns and age_ns 0."""
        out = []
        for e in self.dp.fdb():
            d = {"vlan": int(e["vlan"]), "mac": format_mac(bytes(e["mac"])),
                 "port": self._by_id.get(int(e["port"]), int(e["port"])),
                 "last_seen_ns": int(e["last_seen_ns"]), "static": bool(e["static"])}
            if now_ns is not None:
                d["age_ns"] = 0 if d["static"] else max(0, now_ns - d["last_seen_ns"])
            out.append(d)
        return out

    def conntrack(self) -> list[dict]:
        """Connection tracking entries with addresses as text and port names."""
        out = []
        for e in self.dp.conntrack():
            proto = int(e["proto"])
            out.append({
                "proto": {6: "tcp", 17: "udp"}.get(proto, proto),
                "state": C.CT_STATE_NAMES.get(int(e["state"]), int(e["state"])),
                "hairpin": bool(e["hairpin"]), "family": int(e["family"]),
                "orig_src": _ip_text(e["orig_src"]), "orig_dst": _ip_text(e["orig_dst"]),
                "orig_sport": int(e["orig_sport"]), "orig_dport": int(e["orig_dport"]),
                "reply_src": _ip_text(e["reply_src"]), "reply_dst": _ip_text(e["reply_dst"]),
                "reply_sport": int(e["reply_sport"]), "reply_dport": int(e["reply_dport"]),
                "in_port": self._by_id.get(int(e["in_port"]), int(e["in_port"])),
                "out_port": self._by_id.get(int(e["out_port"]), int(e["out_port"])),
                "orig_src_mac": format_mac(bytes(e["orig_src_mac"])),
                "orig_dst_mac": format_mac(bytes(e["orig_dst_mac"])),
                "expires_ns": int(e["expires_ns"]), "packets": int(e["packets"]),
                "bytes": int(e["bytes"]),
            })
        return out

    def hostports(self) -> list[dict]:
        """hostPort rules: [{"protocol", "host_port", "host_ip", "pod", "pod_ip", "container_port"}]."""
        out = []
        for (proto, host_port, host_ip, fam), (owner, m) in sorted(
                self._rules.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "", kv[0][3])):
            out.append({"protocol": m.protocol, "host_port": host_port,
                        "host_ip": host_ip, "family": fam, "pod": owner,
                        "pod_ip": self._ports[owner].ip_of_family(fam),
                        "container_port": m.container_port})
        return out

    def describe(self) -> dict:
        """Everything configured, for ``vswitchctl show`` and state files."""
        return {"config": self.config.to_dict(), "node_addresses": list(self.node_addresses),
                "ports": [p.to_dict() for p in self.ports()], "hostports": self.hostports()}
