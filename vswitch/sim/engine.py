"""The in-process simulation: the real Switch and Datapath, virtual ports, a virtual clock.

Theory of operation
-------------------
An ``Engine`` owns one ``vswitch.switch.Switch`` — the very object the daemon drives —
and replaces TAP devices by Python objects and the monotonic clock by an integer,
``sim.now`` (ns). Nothing waits: time jumps from one event to the next.

Ports and hosts
    ``host``: the switch's host port (the node: gateway ``.1`` of the subnet, plus any
    ``node_ips``); it answers ARP/ND and ICMP echo for the node addresses and routes IP
    between pods and externals (TTL − 1, MACs rewritten), like the node kernel behind
    ``vsw0``. ``add_pod`` adds a pod port; ``add_external`` adds a host beyond the node's
    uplink (all externals share the ``uplink`` port, one L2 segment). Simulated hosts
    answer ARP (and IPv6 neighbour solicitations) and ICMP echo for their addresses,
    answer SYN with SYN-ACK on listening TCP ports (RST-ACK on closed ones), ACK data,
    FIN-ACK a FIN (hosts keep no TCP state: other segments to closed ports are ignored,
    so a client does not reset the SYN-ACK it asked for), echo UDP on listening ports
    and ignore UDP to closed ones (for the same reason: no ICMP unreachable). A pod listens
    on the container ports of its hostPort mappings. Hosts never ARP: they resolve
    next hops from the simulation's own tables (on-link: the peer's MAC; else the gateway).

Events and batches
    ``send`` (``a.send``) queues ``(t_ns, port, frame)``; ``run``/``advance`` process the
    queue in time order (ties: the order of sending). All frames due at the same instant
    go to ``Datapath.process`` in one batch (up to ``batch_size``), with ``now_ns`` = that
    instant, each frame behind ``ENCAP_HEADROOM`` free bytes and its (zeroed) vnet header,
    as the daemon's read loops lay them out (VXLAN encapsulation writes into that room);
    whenever ``next_departure_ns()`` comes first, the shaping queues drain at exactly that
    time through ``Switch.drain_due`` (the daemon's loop), again at the same instant while
    packets are still due. Outputs are delivered at the batch's time: recorded on the port
    and handed to the host behind it, whose replies are queued at ``t + reply_delay_ns``.

Records and checks
    Every port records what it received (``received``) and everything seen on it in both
    directions (``write_pcap``), each up to ``capture_limit`` frames (older ones are
    dropped and counted: memory stays bounded). ``expect`` / ``expect_nothing`` are
    PTF-style checks decided at once on virtual time: the simulation runs to
    ``now + within_ns`` and then looks at what arrived; a match consumes it and every
    frame before it on that port.

Traffic sources and the engine protocol
    ``vswitch/sim/generators.py`` (``CBR``, ``Poisson``, ... ``schedule``, ``run_bulk``) is
    built on the engine and uses only the names in ``ENGINE_PROTOCOL``: the clock
    (``now``, ``set_clock``, ``next_event_ns``, ``run``), ports (``port_id``,
    ``port_names``), ``send``, ``deliver`` (outputs of a batch to their ports and hosts),
    ``capture_sent``, ``new_rng``, ``count_frames``, and ``switch``/``config``. The engine
    imports nothing of it; ``vswitch.sim.Simulation`` (``simulation.py``) is the engine
    with the generators' two entry points, ``generate`` and ``run_bulk``.

Determinism: MACs come from a hash of (seed, name), random generators from the seed; the
datapath is deterministic; so the same seed and inputs give byte-identical pcaps and
counters with either datapath implementation.
"""
from __future__ import annotations

import collections
import hashlib
import heapq
import ipaddress
import struct
from typing import Iterable, Mapping

import numpy as np

from vswitch.datapath import consts as C
from vswitch.sim import frames as F
from vswitch.config import Bandwidth, PortMapping, SwitchConfig, format_mac, parse_ip, parse_mac
from vswitch.switch import Switch

__all__ = ["Engine", "ENGINE_PROTOCOL", "Pod", "External", "Node", "Mask", "Trace", "ExpectationFailed"]

MAX_ROUNDS_PER_INSTANT = 100_000


class ExpectationFailed(AssertionError):
    """An ``expect`` / ``expect_nothing`` check failed; the message says what arrived."""


# =============================================================================== helpers

def _check_time(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer number of ns, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name}: {value} is negative; times are ns ≥ 0")
    return value


def _scapy_ether():
    """scapy's Ether with the IP layers bound (importing scapy.layers.l2 alone does not)."""
    import scapy.layers.inet  # noqa: F401
    import scapy.layers.inet6  # noqa: F401
    from scapy.layers.l2 import Ether
    return Ether


def _summary(frame: bytes) -> str:
    try:
        return _scapy_ether()(frame).summary()
    except Exception:  # scapy missing or a frame it cannot dissect
        return frame[:32].hex() + ("..." if len(frame) > 32 else "")


# =============================================================================== Mask

class Mask:
    """An expected frame with don't-care bits (PTF's ``Mask``).

    ``Mask(frame, ignore=("IP.ttl", "IP.chksum", "TCP.chksum", "IP.id"))``: fields are
    "Layer.field" with scapy's layer and field names (or (layer, field) tuples); the
    first layer of that name is meant. ``ignore_bytes(start, stop)`` masks a byte range.
    A received frame matches if it has the same length and equal bytes under the mask.
    """

    def __init__(self, frame, ignore: Iterable = ()):
        self.frame = F.frame_bytes(frame, "Mask frame")
        self._care = bytearray(b"\xff" * len(self.frame))
        self.ignored: list[str] = []
        for item in ignore:
            if isinstance(item, str):
                layer, _, field = item.partition(".")
            else:
                layer, field = item
            self.ignore(layer, field)

    def ignore(self, layer: str, field: str) -> "Mask":
        """Don't care about ``field`` of the first ``layer`` (scapy names); chainable."""
        pkt = _scapy_ether()(self.frame)
        lay = pkt.getlayer(layer)
        if lay is None:
            layers = [l.__name__ for l in pkt.layers()]
            raise ValueError(f"Mask: layer {layer!r} is not in the frame (layers: {layers})")
        fld = next((f for f in lay.fields_desc if f.name == field), None)
        if fld is None:
            raise ValueError(f"Mask: {layer} has no field {field!r} "
                             f"(fields: {[f.name for f in lay.fields_desc]})")
        base = bytes(pkt)
        if base != self.frame:
            raise ValueError("Mask: scapy does not rebuild this frame byte for byte; use ignore_bytes")
        diff = 0
        for value in self._probe_values(fld):
            probe = pkt.copy()
            try:
                probe.getlayer(layer).setfieldval(field, value)
                raw = bytes(probe)
            except Exception:
                continue
            if len(raw) == len(base):
                diff |= int.from_bytes(raw, "big") ^ int.from_bytes(base, "big")
        if not diff:
            raise ValueError(f"Mask: cannot locate the bits of {layer}.{field}; use ignore_bytes")
        care = int.from_bytes(self._care, "big") & ~diff
        self._care = bytearray(care.to_bytes(len(self.frame), "big"))
        self.ignored.append(f"{layer}.{field}")
        return self

    @staticmethod
    def _probe_values(fld):
        from scapy.fields import IP6Field, IPField, MACField
        if isinstance(fld, MACField):
            return ("00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff")
        if isinstance(fld, IPField):
            return ("0.0.0.0", "255.255.255.255")
        if isinstance(fld, IP6Field):
            return ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
        bits = getattr(fld, "size", None)
        if not isinstance(bits, int):
            bits = getattr(fld, "sz", 0) * 8
        if bits <= 0:
            return (0, 1)
        return (0, (1 << bits) - 1)

    def ignore_bytes(self, start: int, stop: int) -> "Mask":
        for i in range(max(0, start), min(stop, len(self.frame))):
            self._care[i] = 0
        self.ignored.append(f"bytes[{start}:{stop}]")
        return self

    def matches(self, frame: bytes) -> bool:
        if len(frame) != len(self.frame):
            return False
        care = int.from_bytes(self._care, "big")
        return (int.from_bytes(frame, "big") ^ int.from_bytes(self.frame, "big")) & care == 0

    def __repr__(self):
        return f"Mask({_summary(self.frame)}, ignore={self.ignored})"


# =============================================================================== Trace

class Trace(list):
    """[(stage, decision), ...] of one frame through the pipeline; ``str()`` is a table."""

    def __str__(self):
        width = max((len(s) for s, _ in self), default=0)
        return "\n".join(f"{s:<{width}}  {d}" for s, d in self)

    @property
    def output(self) -> str:
        return self[-1][1] if self else ""


# =============================================================================== ports

class _PortRec:
    """What the simulation keeps per switch port: records and the host(s) behind it."""
    __slots__ = ("name", "port_id", "received", "capture", "pending", "rx_seen", "cap_seen",
                 "host", "seq")

    def __init__(self, name, port_id, limit):
        self.name, self.port_id = name, port_id
        self.received = collections.deque(maxlen=limit)   # (t_ns, frame) delivered to it
        self.capture = collections.deque(maxlen=limit)    # (t_ns, frame) both directions
        self.pending = collections.deque(maxlen=limit)    # (t_ns, frame) not yet expected
        self.rx_seen = 0
        self.cap_seen = 0
        self.host = None                                  # an Endpoint or the uplink segment


class Endpoint:
    """A simulated host: a MAC, IPs, listening ports; answers ARP, ND, ICMP echo, TCP, UDP."""
    kind = "endpoint"

    def __init__(self, sim: "Engine", name: str, mac: bytes, ips: list):
        self.sim = sim
        self.name = name
        self.mac_bytes = mac
        self.ips = [str(ip) for ip in ips]
        self._ip_bytes = {ipaddress.ip_address(ip).packed for ip in self.ips}
        self.listening: set[tuple[int, int]] = set()   # (proto number, port)
        self._received = collections.deque(maxlen=sim.capture_limit)
        self._isn = int.from_bytes(hashlib.blake2b(f"{sim.seed}/isn/{name}".encode(),
                                                   digest_size=4).digest(), "big")

    # ------------------------------------------------------------------ identity
    @property
    def mac(self) -> str:
        return format_mac(self.mac_bytes)

    @property
    def ip(self) -> str | None:
        """The first IPv4 address (or the first address)."""
        for ip in self.ips:
            if ":" not in ip:
                return ip
        return self.ips[0] if self.ips else None

    @property
    def ip6(self) -> str | None:
        return next((ip for ip in self.ips if ":" in ip), None)

    @property
    def port_name(self) -> str:
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} {self.mac} {' '.join(self.ips)}>"

    # ------------------------------------------------------------------ records
    @property
    def received(self) -> list:
        """[(t_ns, frame bytes)] delivered to this host, oldest first."""
        return list(self._received)

    def packets(self) -> list:
        """``received`` as scapy packets, each with ``.time`` = virtual seconds."""
        Ether = _scapy_ether()
        out = []
        for t, frame in self._received:
            p = Ether(frame)
            p.time = t / 1e9
            out.append(p)
        return out

    def clear(self) -> None:
        self._received.clear()

    def listen(self, port: int, protocol: str = "tcp") -> "Endpoint":
        proto = {"tcp": 6, "udp": 17}.get(str(protocol).lower())
        if proto is None:
            raise ValueError(f"listen: protocol {protocol!r}; accepted: 'tcp', 'udp'")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"listen: port {port!r}; accepted: 1 .. 65535")
        self.listening.add((proto, port))
        return self

    # ------------------------------------------------------------------ sending
    def send(self, frame, at_ns: int | None = None) -> bytes:
        """Send a frame (bytes or scapy) into the switch at ``at_ns`` (default: now)."""
        return self.sim.send(self.port_name, frame, at_ns=at_ns)

    # ------------------------------------------------------------------ frame helpers
    def _dst(self, dst, version=None) -> str:
        """An IP string for dst: an Endpoint (its address of the family), a name or an IP."""
        if isinstance(dst, Endpoint):
            ep = dst
        elif isinstance(dst, str) and dst in self.sim._endpoints:
            ep = self.sim._endpoints[dst]
        else:
            return str(parse_ip(dst, "destination"))
        if version is None:
            version = 4 if self.ip and ":" not in self.ip else 6
        ip = ep.ip6 if version == 6 else ep.ip
        if ip is None or (version == 4 and ":" in ip):
            raise ValueError(f"{ep.name} has no IPv{version} address (ips {ep.ips})")
        return ip

    def _src_for(self, dst_ip: str) -> str:
        v6 = ":" in dst_ip
        src = self.ip6 if v6 else self.ip
        if src is None or (":" in src) != v6:
            raise ValueError(f"{self.name} has no IPv{6 if v6 else 4} address to reach {dst_ip} (ips {self.ips})")
        return src

    def _ip_frame(self, dst_ip: str, ip_pkt: bytes) -> bytes:
        dst_mac = self.sim.next_hop_mac(self, dst_ip)
        return F.ether(dst_mac, self.mac_bytes, F.ethertype_of(ip_pkt), ip_pkt)

    def udp_to(self, dst, dport: int, payload: bytes = b"", sport: int = 40000) -> bytes:
        """A UDP frame to ``dst`` (an Endpoint, its name, or an IP)."""
        dip = self._dst(dst)
        src = self._src_for(dip)
        return self._ip_frame(dip, F.l4_packet(src, dip, 17, sport, dport, bytes(payload)))

    def tcp_syn(self, dst, dport: int, sport: int = 40000, seq: int | None = None) -> bytes:
        """A TCP SYN to ``dst`` (an Endpoint, its name, an IP: e.g. ``sim.node_ip``)."""
        dip = self._dst(dst)
        src = self._src_for(dip)
        seq = self._isn if seq is None else seq
        return self._ip_frame(dip, F.l4_packet(src, dip, 6, sport, dport, flags=F.TCP_SYN, seq=seq))

    def tcp_to(self, dst, dport: int, payload: bytes = b"", sport: int = 40000, *,
               flags: int = F.TCP_ACK | F.TCP_PSH, seq: int = 0, ack: int = 0) -> bytes:
        """Any TCP segment to ``dst`` (flags from ``vswitch.sim.frames``: TCP_SYN, TCP_ACK ...)."""
        dip = self._dst(dst)
        src = self._src_for(dip)
        return self._ip_frame(dip, F.l4_packet(src, dip, 6, sport, dport, bytes(payload),
                                               flags=flags, seq=seq, ack=ack))

    def ping(self, dst, seq: int = 1, ident: int = 0x1234, payload: bytes = b"vswitch-sim") -> bytes:
        """An ICMP (or ICMPv6, for an IPv6 address) echo request to ``dst``."""
        dip = self._dst(dst)
        src = self._src_for(dip)
        if ":" in dip:
            pkt = F.ipv6(F.ip_bytes(src), F.ip_bytes(dip), 58, F.icmp6_echo(src, dip, ident, seq, payload))
        else:
            pkt = F.ipv4(F.ip_bytes(src), F.ip_bytes(dip), 1, F.icmp_echo(ident, seq, payload))
        return self._ip_frame(dip, pkt)

    def arp_request(self, ip) -> bytes:
        """A broadcast ARP who-has ``ip``."""
        tpa = F.ip_bytes(self._dst(ip, 4))
        return F.arp_frame(1, self.mac_bytes, F.BROADCAST, self.mac_bytes,
                           F.ip_bytes(self._src_for("0.0.0.0")), b"\0" * 6, tpa)

    def neighbor_solicit(self, ip) -> bytes:
        """An IPv6 neighbour solicitation for ``ip`` (RFC 4861 4.3: to its solicited-node
        multicast group, hop limit 255, our MAC in the source link-layer option)."""
        tgt = F.ip_bytes(self._dst(ip, 6))
        src = F.ip_bytes(self._src_for("::"))
        grp, grp_mac = F.solicited_node(tgt)
        body = F.icmp6(src, grp, 135, 0, F.ns_body(tgt, self.mac_bytes))
        return F.ether(grp_mac, self.mac_bytes, F.ETH_IP6, F.ipv6(src, grp, 58, body, 255))

    # ------------------------------------------------------------------ answering
    def _accepts(self, frame: bytes) -> bool:
        d = frame[:6]
        return d == self.mac_bytes or bool(d[0] & 1)

    def _handle(self, t: int, frame: bytes) -> list:
        """Frames this host sends in answer to ``frame`` (delivered at ``t``)."""
        p = F.parse(frame)
        if p is None:
            return []
        if p.ethertype == F.ETH_ARP:
            if p.arp_op == 1 and p.arp_tpa in self._ip_bytes:
                return [F.arp_frame(2, self.mac_bytes, p.src_mac, self.mac_bytes, p.arp_tpa,
                                    p.arp_sha, p.arp_spa)]
            return []
        if p.ip_version == 0 or p.dst_mac != self.mac_bytes and p.proto != 58:
            return []
        if p.dst_ip not in self._ip_bytes:
            if p.ip_version == 6 and p.proto == 58 and p.icmp_type == 135:
                return self._answer_ns(p, frame)
            return self._not_mine(t, p, frame)
        return self._answer(p, frame)

    def _not_mine(self, t, p, frame) -> list:
        return []

    def _reply(self, p: F.Parsed, ip_pkt: bytes) -> bytes:
        dst_ip = str(ipaddress.ip_address(p.src_ip))
        return F.ether(self.sim.next_hop_mac(self, dst_ip, fallback=p.src_mac), self.mac_bytes,
                       F.ethertype_of(ip_pkt), ip_pkt)

    def _answer_ns(self, p, frame) -> list:
        seg = frame[p.l3_offset + 40:]
        if len(seg) < 24:
            return []
        target = seg[8:24]
        if target not in self._ip_bytes:
            return []
        src = target
        dst = p.src_ip if p.src_ip != b"\0" * 16 else bytes.fromhex("ff02" + "00" * 13 + "01")
        body = F.icmp6(src, dst, 136, 0, F.na_body(target, self.mac_bytes, p.src_ip != b"\0" * 16))
        return [F.ether(p.src_mac, self.mac_bytes, F.ETH_IP6, F.ipv6(src, dst, 58, body, 255))]

    def _answer(self, p: F.Parsed, frame: bytes) -> list:
        src, dst = p.dst_ip, p.src_ip
        if p.proto == 1 and p.icmp_type == 8 and p.ip_version == 4:
            return [self._reply(p, F.ipv4(src, dst, 1, F.icmp_echo(p.icmp_id, p.icmp_seq, p.payload, True)))]
        if p.proto == 58 and p.ip_version == 6:
            if p.icmp_type == 128:
                return [self._reply(p, F.ipv6(src, dst, 58, F.icmp6_echo(
                    src, dst, p.icmp_id, p.icmp_seq, p.payload, True)))]
            if p.icmp_type == 135:
                return self._answer_ns(p, frame)
            return []
        if p.proto == 6:
            return self._answer_tcp(p)
        if p.proto == 17:
            if (17, p.dport) in self.listening:
                return [self._reply(p, F.l4_packet(src, dst, 17, p.dport, p.sport, p.payload))]
        return []

    def _answer_tcp(self, p: F.Parsed) -> list:
        src, dst = p.dst_ip, p.src_ip
        flags = p.tcp_flags
        if flags & F.TCP_RST:
            return []
        listening = (6, p.dport) in self.listening
        if not listening:
            # a SYN to a closed port is refused; anything else there (e.g. the SYN-ACK of a
            # connection this host opened: hosts keep no client state) is ignored
            if flags & F.TCP_SYN and not flags & F.TCP_ACK:
                seg = F.l4_packet(src, dst, 6, p.dport, p.sport, flags=F.TCP_RST | F.TCP_ACK,
                                  seq=0, ack=p.seq + len(p.payload) + 1)
                return [self._reply(p, seg)]
            return []
        if flags & F.TCP_SYN and not flags & F.TCP_ACK:
            return [self._reply(p, F.l4_packet(src, dst, 6, p.dport, p.sport, flags=F.TCP_SYN | F.TCP_ACK,
                                               seq=self._isn, ack=p.seq + 1))]
        if flags & F.TCP_FIN:
            return [self._reply(p, F.l4_packet(src, dst, 6, p.dport, p.sport, flags=F.TCP_FIN | F.TCP_ACK,
                                               seq=p.ack, ack=p.seq + len(p.payload) + 1))]
        if p.payload:
            return [self._reply(p, F.l4_packet(src, dst, 6, p.dport, p.sport, flags=F.TCP_ACK,
                                               seq=p.ack, ack=p.seq + len(p.payload)))]
        return []


class Pod(Endpoint):
    """A pod: one switch port, bound (anti-spoofing) to its MAC and IPs."""
    kind = "pod"

    @property
    def port_name(self) -> str:
        return self.name


class External(Endpoint):
    """A host beyond the node's uplink; every external shares the ``uplink`` port."""
    kind = "external"

    @property
    def port_name(self) -> str:
        return self.sim.uplink_name


class Node(Endpoint):
    """The node behind the host port: gateway and node addresses; routes pods ↔ externals."""
    kind = "node"

    @property
    def port_name(self) -> str:
        return self.sim.host_name

    def _not_mine(self, t, p, frame) -> list:
        """Route an IP packet addressed to the node's MAC but not to its addresses."""
        if p.dst_mac != self.mac_bytes:
            return []
        sim = self.sim
        if p.ttl <= 1:
            sim._stats["node_ttl_expired"] += 1
            return []
        dst_mac = sim._route_mac(str(ipaddress.ip_address(p.dst_ip)))
        if dst_mac is None:
            sim._stats["node_no_route"] += 1
            return []
        out = bytearray(frame)
        out[0:6], out[6:12] = dst_mac, self.mac_bytes
        off = p.l3_offset
        if p.ip_version == 4:
            out[off + 8] -= 1
            out[off + 10:off + 12] = b"\0\0"
            ihl = (out[off] & 0xF) * 4
            out[off + 10:off + 12] = struct.pack("!H", F.csum(bytes(out[off:off + ihl])))
        else:
            out[off + 7] -= 1
        sim._stats["node_routed"] += 1
        return [bytes(out)]


class _Segment:
    """The L2 segment behind the uplink port: hands each frame to the externals it is for."""

    def __init__(self):
        self.externals: list[External] = []

    def _handle(self, t, frame):
        replies = []
        for ext in self.externals:
            if ext._accepts(frame):
                ext._received.append((t, frame))
                replies.extend(ext._handle(t, frame))
        return replies


# =============================================================================== Engine

# What a traffic source built on the engine (``vswitch/sim/generators.py``) may use of it;
# tests/sim/test_engine_protocol.py holds generators.py to these names.
ENGINE_PROTOCOL = ("now", "config", "switch", "port_id", "port_names", "send", "run",
                   "next_event_ns", "set_clock", "deliver", "capture_sent", "new_rng",
                   "count_frames")


def write_pcap(path, frames: Iterable) -> int:
    """Write ``[(t_ns, frame)]`` to a pcap at ``path`` (Ethernet, nanosecond timestamps
    from the virtual clock); returns the number of frames written. The one pcap writer of
    the simulation (``Engine.write_pcap``, ``Cluster.write_pcap``)."""
    from scapy.utils import RawPcapWriter
    frames = list(frames)
    w = RawPcapWriter(str(path), linktype=1, nano=True, endianness="<", snaplen=262144, sync=False)
    try:
        w.write_header(None)
        for t, frame in frames:
            w.write_packet(frame, sec=t // C.SEC_NS, usec=t % C.SEC_NS)
    finally:
        w.close()
    return len(frames)


class Engine:
    """A switch with virtual ports and a virtual clock; see the module docstring.

    ``vswitch.sim.Simulation`` is this class plus ``generate`` and ``run_bulk``.
    """

    def __init__(self, subnet: str = "10.0.0.0/24", seed: int = 0, *, impl=None,
                 subnet6: str | None = None, node_ips: Iterable[str] = (), reply_delay_ns: int = 0,
                 capture_limit: int = 100_000, batch_size: int = 256,
                 host_name: str = "host", uplink_name: str = "uplink", **switch_config):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: {seed!r}; accepted: an integer ≥ 0")
        self.seed = seed
        self.reply_delay_ns = _check_time("reply_delay_ns", reply_delay_ns)
        if isinstance(capture_limit, bool) or not isinstance(capture_limit, int) or capture_limit < 1:
            raise ValueError(f"capture_limit: {capture_limit!r}; accepted: an integer ≥ 1 (frames per port)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 65536:
            raise ValueError(f"batch_size: {batch_size!r}; accepted: 1 .. 65536")
        self.capture_limit = capture_limit
        self.batch_size = batch_size
        self.host_name, self.uplink_name = host_name, uplink_name
        if isinstance(node_ips, str):
            node_ips = (node_ips,)
        config = SwitchConfig(subnet=subnet, subnet6=subnet6, node_addresses=tuple(node_ips),
                              **switch_config)
        self.switch = Switch(config, impl=impl)
        self.config = config
        self._now = 0
        self._events: list = []          # heap of (t_ns, seq, port_id, frame)
        self._seq = 0
        self._ports: dict[int, _PortRec] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._macs: set[bytes] = set()
        self._ip_owner: dict[str, Endpoint] = {}
        self._flood_targets: list[int] | None = None
        self._stats = collections.Counter()
        self._gen_count = 0
        self._net = config.network
        self._net6 = config.network6
        self._cursor = {4: 1, 6: 1}      # next address offset to try, per family
        self._hdr = config.vnet_hdr_len
        self._buf = np.zeros(0, np.uint8)
        self._out = None
        self.uplink: _Segment | None = None
        host_mac = parse_mac(config.gateway_mac)
        port = self.switch.add_port(host_name, "host", mac=host_mac)
        self.node = Node(self, host_name, host_mac, list(self.switch.node_addresses))
        self._macs.add(host_mac)
        for ip in self.node.ips:
            self._ip_owner[ip] = self.node
        self._attach(port.port_id, host_name, self.node)

    # ------------------------------------------------------------------ clock
    @property
    def now(self) -> int:
        """The virtual time in ns."""
        return self._now

    now_ns = now

    @property
    def node_ip(self) -> str:
        """The node's first address besides the gateway if any (e.g. its uplink address)."""
        extra = [ip for ip in self.node.ips if ip not in self.config.gateways]
        return extra[0] if extra else self.config.gateway

    @property
    def gateway(self) -> str:
        return self.config.gateway

    @property
    def gateway6(self) -> str | None:
        """The IPv6 gateway (first address of ``subnet6``), or None without ``subnet6``."""
        return self.config.gateway6

    @property
    def node_ip6(self) -> str | None:
        """The node's first IPv6 address besides the gateway (e.g. its uplink's), or None."""
        extra = [ip for ip in self.node.ips if ":" in ip and ip not in self.config.gateways]
        return extra[0] if extra else None

    # ------------------------------------------------------------------ topology
    def _derive_mac(self, name: str) -> bytes:
        for i in range(1000):
            h = hashlib.blake2b(f"{self.seed}/{name}/{i}".encode(), digest_size=5).digest()
            mac = b"\x02" + h
            if mac not in self._macs:
                return mac
        raise RuntimeError(f"could not derive a free MAC for {name!r}")  # pragma: no cover

    def _check_name(self, name):
        if not isinstance(name, str) or not name:
            raise ValueError(f"name: {name!r}; accepted: a non-empty string")
        if name in self._endpoints or name in self.switch or name in (self.host_name, self.uplink_name):
            raise ValueError(f"name: {name!r} is already used")

    def _next_free(self, version, what) -> tuple[str, int]:
        """(the next free address of the pod subnet of that family, the cursor after it)."""
        net = self._net if version == 4 else self._net6
        k = self._cursor[version]
        last = net.num_addresses - (1 if version == 4 else 0)
        base = int(net.network_address)
        while k < last:
            s = str(ipaddress.ip_address(base + k))
            k += 1
            if s not in self._ip_owner and s not in self.config.gateways:
                return s, k
        raise ValueError(f"{what}: the subnet {net} has no free address left; pass ip=... or a larger subnet")

    def _attach(self, port_id, name, host):
        rec = _PortRec(name, port_id, self.capture_limit)
        rec.host = host
        self._ports[port_id] = rec
        self._flood_targets = None

    def add_pod(self, name: str, *, ip: str | None = None, ip6: str | None = None, mac=None,
                bandwidth: Mapping | Bandwidth | None = None,
                port_mappings: Iterable = (), listen: Iterable = ()) -> Pod:
        """A pod with a port of its own. IP from the subnet unless ``ip=``; MAC from the seed.

        ``bandwidth``: the CNI dict (bits/s, bits); ``port_mappings``: CNI portMappings
        entries; ``listen``: [(port, "tcp"|"udp"), ...] or ports (TCP). Nothing is added
        if any argument is bad.
        """
        self._check_name(name)
        ips = []
        cursor = dict(self._cursor)
        if ip is None:
            a, cursor[4] = self._next_free(4, f"pod {name!r}")
            ips.append(a)
        else:
            a = parse_ip(ip, f"pod {name!r} ip")
            if a.version != 4:
                raise ValueError(f"pod {name!r} ip: {ip!r} is not IPv4 (use ip6=)")
            if str(a) in self._ip_owner or str(a) in self.config.gateways:
                raise ValueError(f"pod {name!r} ip: {a} is already in use")
            ips.append(str(a))
        if ip6 is not None:
            a = parse_ip(ip6, f"pod {name!r} ip6")
            if a.version != 6:
                raise ValueError(f"pod {name!r} ip6: {ip6!r} is not IPv6")
            if str(a) in self._ip_owner:
                raise ValueError(f"pod {name!r} ip6: {a} is already in use")
            ips.append(str(a))
        elif self._net6 is not None:
            a, cursor[6] = self._next_free(6, f"pod {name!r}")
            ips.append(a)
        mac_b = self._derive_mac(name) if mac is None else parse_mac(mac, f"pod {name!r} mac")
        if mac_b in self._macs:
            raise ValueError(f"pod {name!r} mac: {format_mac(mac_b)} is already in use")
        listen_list = [(p, "tcp") if isinstance(p, int) else tuple(p) for p in listen]
        pod = Pod(self, name, mac_b, ips)
        for port, proto in listen_list:
            pod.listen(port, proto)
        port = self.switch.add_port(name, "pod", mac=mac_b, ips=ips, bandwidth=bandwidth,
                                    port_mappings=port_mappings)
        for m in port.port_mappings:
            pod.listen(m.container_port, m.protocol)
        self._cursor = cursor
        self._macs.add(mac_b)
        for a in ips:
            self._ip_owner[a] = pod
        self._endpoints[name] = pod
        self._attach(port.port_id, name, pod)
        return pod

    def remove_pod(self, name: str) -> None:
        pod = self._endpoint(name)
        if not isinstance(pod, Pod):
            raise ValueError(f"remove_pod: {name!r} is not a pod")
        port = self.switch.remove_port(name)
        del self._ports[port.port_id]
        del self._endpoints[name]
        self._macs.discard(pod.mac_bytes)
        for ip in pod.ips:
            self._ip_owner.pop(ip, None)
        self._flood_targets = None

    def add_external(self, name: str, ip: str, *, mac=None, listen: Iterable = ()) -> External:
        """A host beyond the uplink (created with the first external), e.g. a client."""
        self._check_name(name)
        a = parse_ip(ip, f"external {name!r} ip")
        if str(a) in self._ip_owner or str(a) in self.config.gateways:
            raise ValueError(f"external {name!r} ip: {a} is already in use")
        if a in self._net or (self._net6 is not None and a in self._net6):
            raise ValueError(f"external {name!r} ip: {a} is inside the pod subnet; externals sit beyond the uplink")
        mac_b = self._derive_mac(name) if mac is None else parse_mac(mac, f"external {name!r} mac")
        if mac_b in self._macs:
            raise ValueError(f"external {name!r} mac: {format_mac(mac_b)} is already in use")
        ext = External(self, name, mac_b, [str(a)])
        for item in listen:
            port, proto = (item, "tcp") if isinstance(item, int) else item
            ext.listen(port, proto)
        if self.uplink is None:
            port = self.switch.add_port(self.uplink_name, "uplink")
            self.uplink = _Segment()
            self._attach(port.port_id, self.uplink_name, self.uplink)
        self.uplink.externals.append(ext)
        self._macs.add(mac_b)
        self._ip_owner[str(a)] = ext
        self._endpoints[name] = ext
        return ext

    def add_port_mapping(self, pod: str | Pod, mapping: Mapping | PortMapping | None = None, *,
                         host_port: int | None = None, container_port: int | None = None,
                         protocol: str = "tcp", host_ip: str | None = None) -> PortMapping:
        """A hostPort rule for a pod: keywords, or a CNI portMappings dict. The pod listens on it."""
        name = pod.name if isinstance(pod, Endpoint) else pod
        ep = self._endpoint(name)
        if not isinstance(ep, Pod):
            raise ValueError(f"add_port_mapping: {name!r} is not a pod")
        if mapping is None:
            if host_port is None or container_port is None:
                raise ValueError("add_port_mapping: give a CNI dict or host_port= and container_port=")
            mapping = PortMapping(host_port=host_port, container_port=container_port,
                                  protocol=protocol, host_ip=host_ip)
        m = self.switch.add_port_mapping(name, mapping)
        ep.listen(m.container_port, m.protocol)
        return m

    def remove_port_mapping(self, pod: str | Pod, mapping) -> bool:
        name = pod.name if isinstance(pod, Endpoint) else pod
        return self.switch.remove_port_mapping(name, mapping)

    def set_bandwidth(self, pod: str | Pod, bandwidth) -> None:
        name = pod.name if isinstance(pod, Endpoint) else pod
        self.switch.set_bandwidth(name, bandwidth)

    def set_port_up(self, name: str, up: bool) -> None:
        self.switch.set_port_up(name, up)
        self._flood_targets = None

    def _endpoint(self, name) -> Endpoint:
        if isinstance(name, Endpoint):
            return name
        ep = self._endpoints.get(name)
        if ep is None:
            if name == self.host_name:
                return self.node
            raise KeyError(f"unknown pod or external {name!r}; known: {sorted(self._endpoints)[:20]}")
        return ep

    def __getitem__(self, name) -> Endpoint:
        return self._endpoint(name)

    @property
    def pods(self) -> dict[str, Pod]:
        return {n: e for n, e in self._endpoints.items() if isinstance(e, Pod)}

    @property
    def externals(self) -> dict[str, External]:
        return {n: e for n, e in self._endpoints.items() if isinstance(e, External)}

    # ------------------------------------------------------------------ resolution
    def next_hop_mac(self, src: Endpoint, dst_ip: str, fallback: bytes | None = None) -> bytes:
        """The MAC a host sends to for ``dst_ip``: the peer's if on its link, else the gateway's."""
        owner = self._ip_owner.get(dst_ip)
        if owner is not None:
            same_link = (owner.kind == "external") == (src.kind == "external") or owner.kind == "node" \
                or src.kind == "node"
            if same_link:
                return owner.mac_bytes
        if src.kind == "node":
            mac = self._route_mac(dst_ip)
            if mac is not None:
                return mac
        if fallback is not None and owner is None and src.kind == "external":
            return fallback
        return self.node.mac_bytes

    def _route_mac(self, dst_ip: str) -> bytes | None:
        owner = self._ip_owner.get(dst_ip)
        if owner is None or owner is self.node:
            return None
        return owner.mac_bytes

    # ------------------------------------------------------------------ sending and running
    def port_id(self, port) -> int:
        """The switch port id of a port name, a host's name (an external: the uplink) or a host."""
        if isinstance(port, str) and port in self._endpoints:
            port = self._endpoints[port]
        if isinstance(port, Endpoint):
            port = port.port_name
        if isinstance(port, str):
            return self.switch.port(port).port_id
        raise KeyError(f"unknown port {port!r}; give a port name (a pod, {self.host_name!r}, {self.uplink_name!r})")

    def send(self, port, frame, at_ns: int | None = None) -> bytes:
        """Queue ``frame`` into the switch on ``port`` (a name or an Endpoint) at ``at_ns``."""
        data = F.frame_bytes(frame)
        if len(data) > C.MAX_FRAME:
            raise ValueError(f"frame: {len(data)} bytes; at most {C.MAX_FRAME}")
        t = self._now if at_ns is None else _check_time("at_ns", at_ns)
        if t < self._now:
            raise ValueError(f"at_ns: {t} is before the current time {self._now}")
        pid = self.port_id(port)
        heapq.heappush(self._events, (t, self._seq, pid, data))
        self._seq += 1
        return data

    def run(self, until_ns: int | None = None) -> int:
        """Process events and shaper departures up to ``until_ns`` (default: until idle).

        Returns the number of frames processed. The clock ends at ``until_ns`` when given.
        """
        if until_ns is not None:
            until_ns = _check_time("until_ns", until_ns)
            if until_ns < self._now:
                raise ValueError(f"until_ns: {until_ns} is before the current time {self._now}")
        processed = 0
        rounds, last_t = 0, -1
        sw = self.switch
        while True:
            t_ev = self._events[0][0] if self._events else None
            nd = sw.next_departure_ns()
            nd = None if nd < 0 else max(nd, self._now)
            if t_ev is None and nd is None:
                break
            t = min(x for x in (t_ev, nd) if x is not None)
            if until_ns is not None and t > until_ns:
                break
            if t == last_t:
                rounds += 1
                if rounds > MAX_ROUNDS_PER_INSTANT:
                    raise RuntimeError(f"simulation stuck at t={t} ns: {rounds} rounds at one instant "
                                       f"(a reply loop, or a shaper that never releases)")
            else:
                rounds, last_t = 0, t
            self._now = t
            if nd is not None and (t_ev is None or nd <= t_ev):
                processed += self._drain(t)
            else:
                processed += self._process_due(t)
        if until_ns is not None:
            self._now = until_ns
        return processed

    def advance(self, ns: int) -> int:
        """Run for ``ns`` more nanoseconds of virtual time."""
        return self.run(until_ns=self._now + _check_time("ns", ns))

    def _ensure_buf(self, nbytes):
        if len(self._buf) < nbytes:
            self._buf = np.zeros(max(nbytes, 1 << 16), np.uint8)
        return self._buf

    def _process_due(self, t: int) -> int:
        ev = self._events
        batch = []
        while ev and ev[0][0] == t and len(batch) < self.batch_size:
            batch.append(heapq.heappop(ev))
        n = len(batch)
        H = self._hdr
        R = C.ENCAP_HEADROOM + H           # headroom + vnet header before every frame (VXLAN encap)
        buf = self._ensure_buf(sum(len(b[3]) + R for b in batch) + R)
        offsets = np.empty(n, np.uint32)
        lengths = np.empty(n, np.uint32)
        in_ports = np.empty(n, np.uint16)
        out_ports = np.empty(n, np.int32)
        off = R
        for i, (_, _, pid, data) in enumerate(batch):
            L = len(data)
            buf[off - R:off] = 0
            buf[off:off + L] = np.frombuffer(data, np.uint8)
            offsets[i], lengths[i], in_ports[i] = off, L, pid
            off += L + R
            rec = self._ports.get(pid)
            if rec is not None:
                rec.capture.append((t, data))
                rec.cap_seen += 1
        self.switch.process(buf, offsets, lengths, in_ports, out_ports, n, t)
        self._stats["frames_in"] += n
        self.deliver(t, buf, offsets, lengths, in_ports, out_ports, n)
        return n

    def _drain(self, t: int) -> int:
        if self._out is None:
            H = self._hdr
            cap = 256
            self._out = (np.zeros(max(1 << 20, 2 * (C.MAX_FRAME + H)), np.uint8), np.empty(cap, np.uint32),
                         np.empty(cap, np.uint32), np.empty(cap, np.uint16), np.empty(cap, np.int32), cap)
        buf, offs, lens, ins, outs, cap = self._out
        total = self.switch.drain_due(t, buf, offs, lens, ins, outs, cap,
                                      lambda k: self.deliver(t, buf, offs, lens, ins, outs, k))
        self._stats["drained"] += total
        return total

    def _flood(self) -> list[int]:
        if self._flood_targets is None:
            self._flood_targets = [p.port_id for p in self.switch.ports() if p.up and p.port_id in self._ports]
        return self._flood_targets

    def deliver(self, t, buf, offsets, lengths, in_ports, out_ports, n) -> None:
        """Hand the first ``n`` outputs of a ``process``/``drain`` at time ``t`` to their ports.

        Each frame (``buf[offsets[i]:][:lengths[i]]``) is recorded on its output port (a
        flood: every up port of its flood class but its input) and given to the host behind it, whose replies
        are queued at ``t + reply_delay_ns``.
        """
        outs = out_ports[:n].tolist()
        offs = offsets[:n].tolist()
        lens = lengths[:n].tolist()
        ins = in_ports[:n].tolist()
        delay = self.reply_delay_ns
        for i in range(n):
            o = outs[i]
            if o < 0 and o != C.OUT_FLOOD and o != C.OUT_FLOOD_UNKNOWN:
                continue
            frame = buf[offs[i]:offs[i] + lens[i]].tobytes()
            if o >= 0:
                targets = (o,)
            else:
                # the datapath's flood classes (D41): unknown unicast to host/uplink ports only;
                # a port with an ingress shaper gets its copy from its queue (drain)
                member = C.FLOOD_MEMBER if o == C.OUT_FLOOD else C.FLOOD_UNKNOWN_MEMBER
                fc = self.switch.dp.flood_classes()
                targets = [p for p in self._flood() if p != ins[i] and fc[p] & member]
            for pid in targets:
                rec = self._ports.get(pid)
                if rec is None:
                    continue
                rec.received.append((t, frame))
                rec.capture.append((t, frame))
                rec.pending.append((t, frame))
                rec.rx_seen += 1
                rec.cap_seen += 1
                host = rec.host
                if host is None:
                    continue
                if isinstance(host, Endpoint):
                    if not host._accepts(frame):
                        continue
                    host._received.append((t, frame))
                replies = host._handle(t, frame)
                for r in replies:
                    heapq.heappush(self._events, (t + delay, self._seq, pid, r))
                    self._seq += 1
                    self._stats["replies"] += 1

    # ------------------------------------------------------------------ engine protocol
    # For traffic sources built on the engine (vswitch/sim/generators.py): see ENGINE_PROTOCOL.

    def port_names(self) -> dict[int, str]:
        """{port id: port name} of every port the simulation attached, in the order added."""
        return {pid: rec.name for pid, rec in self._ports.items()}

    def next_event_ns(self) -> int | None:
        """The time of the earliest queued event (a sent frame, a reply), or None."""
        return self._events[0][0] if self._events else None

    def set_clock(self, now_ns: int) -> None:
        """Move the clock to ``now_ns`` without processing anything (a source that calls the
        switch itself, at that time, does the processing). ValueError if it is in the past."""
        if type(now_ns) is int and now_ns >= self._now:     # the bulk engine's case, once per batch
            self._now = now_ns
            return
        now_ns = _check_time("now_ns", now_ns)
        if now_ns < self._now:
            raise ValueError(f"now_ns: {now_ns} is before the current time {self._now}")
        self._now = now_ns

    def capture_sent(self, t, buf, offsets, lengths, in_ports, n) -> None:
        """Record the first ``n`` frames of a batch in the captures of their input ports at ``t``."""
        ports = self._ports
        offs, lens, ins = offsets[:n].tolist(), lengths[:n].tolist(), in_ports[:n].tolist()
        for i in range(n):
            rec = ports.get(ins[i])
            if rec is not None:
                rec.capture.append((t, buf[offs[i]:offs[i] + lens[i]].tobytes()))
                rec.cap_seen += 1

    def new_rng(self) -> np.random.Generator:
        """A numpy random Generator seeded from (seed, how many were made before this one)."""
        self._gen_count += 1
        return np.random.default_rng([self.seed, self._gen_count])

    def count_frames(self, frames_in: int, drained: int) -> None:
        """Add frames a source put through the switch itself to ``counters()["sim"]``."""
        self._stats["frames_in"] += frames_in
        self._stats["drained"] += drained

    # ------------------------------------------------------------------ records
    def _rec(self, port) -> _PortRec:
        return self._ports[self.port_id(port)]

    def received(self, port) -> list:
        """[(t_ns, frame)] delivered to a switch port (for a pod: ``pod.received``)."""
        return list(self._rec(port).received)

    def write_pcap(self, port, path) -> int:
        """Write every frame seen at ``port`` (both directions) to a pcap, virtual ns timestamps.

        Returns the number of frames written. Frames older than ``capture_limit`` are gone.
        """
        return write_pcap(path, self._rec(port).capture)

    def counters(self) -> dict:
        """{"global": {...}, "ports": {name: {...}}, "sim": {...}}: datapath and simulation."""
        c = self.switch.counters()
        sim = dict(sorted(self._stats.items()))
        sim["now_ns"] = self._now
        sim["capture_dropped"] = sum(max(0, r.cap_seen - len(r.capture)) for r in self._ports.values())
        c["sim"] = sim
        return c

    def fdb(self) -> list:
        return self.switch.fdb(self._now)

    def conntrack(self) -> list:
        return self.switch.conntrack()

    def hostports(self) -> list:
        return self.switch.hostports()

    def trace(self, frame, in_port) -> Trace:
        """Each pipeline stage's decision for ``frame`` arriving on ``in_port`` now (no state change)."""
        data = F.frame_bytes(frame)
        name = in_port.port_name if isinstance(in_port, Endpoint) else in_port
        return Trace(self.switch.trace(data, name, self._now))

    # ------------------------------------------------------------------ expectations
    def expect(self, port, frame_or_mask, within_ns: int = 0) -> tuple[int, bytes]:
        """Run to ``now + within_ns``; a frame matching must have arrived at ``port`` by then.

        ``frame_or_mask``: bytes, a scapy packet (exact match) or a ``Mask``. The match and
        every frame before it on that port are consumed. Returns (t_ns, frame). On failure
        raises ``ExpectationFailed`` listing what did arrive.
        """
        within_ns = _check_time("within_ns", within_ns)
        want = frame_or_mask if isinstance(frame_or_mask, Mask) else Mask(frame_or_mask) \
            if not isinstance(frame_or_mask, (bytes, bytearray)) else None
        exact = bytes(frame_or_mask) if want is None else None
        rec = self._rec(port)
        deadline = self._now + within_ns
        self.run(until_ns=deadline)
        pend = rec.pending
        for i, (t, f) in enumerate(pend):
            if t > deadline:
                break
            if (f == exact) if want is None else want.matches(f):
                for _ in range(i + 1):
                    pend.popleft()
                return t, f
        expected = _summary(exact) if want is None else repr(want)
        arrived = [(t, f) for t, f in pend if t <= deadline]
        lines = [f"  t={t} ns  {_summary(f)}" for t, f in arrived[:20]]
        if len(arrived) > 20:
            lines.append(f"  ... and {len(arrived) - 20} more")
        got = "\n".join(lines) if lines else "  nothing"
        raise ExpectationFailed(f"expected at port {rec.name!r} by t={deadline} ns: {expected}\n"
                                f"arrived instead (not yet consumed):\n{got}")

    def expect_nothing(self, port=None, within_ns: int = 0) -> None:
        """Run to ``now + within_ns``; no unconsumed frame may have arrived at ``port``
        (every port if None). Raises ``ExpectationFailed`` listing what did arrive."""
        within_ns = _check_time("within_ns", within_ns)
        recs = list(self._ports.values()) if port is None else [self._rec(port)]
        deadline = self._now + within_ns
        self.run(until_ns=deadline)
        bad = [(r.name, t, f) for r in recs for t, f in r.pending if t <= deadline]
        if bad:
            lines = [f"  {n}: t={t} ns  {_summary(f)}" for n, t, f in bad[:20]]
            if len(bad) > 20:
                lines.append(f"  ... and {len(bad) - 20} more")
            where = "any port" if port is None else f"port {recs[0].name!r}"
            raise ExpectationFailed(f"expected nothing at {where} by t={deadline} ns; arrived:\n"
                                    + "\n".join(lines))

    def flush(self, port=None) -> int:
        """Consume every frame received so far (at ``port``, or everywhere); returns the count."""
        recs = list(self._ports.values()) if port is None else [self._rec(port)]
        n = 0
        for r in recs:
            n += len(r.pending)
            r.pending.clear()
        return n
