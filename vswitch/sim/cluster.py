"""``Cluster``: N simulated vswitch nodes joined by VXLAN over one virtual underlay.

Theory of operation
-------------------
Each node is a ``ClusterNode``: a whole ``Simulation`` (the real ``Switch`` and datapath,
a host port with the node behind it, pods) plus an ``uplink`` port whose far side is the
cluster's *underlay*, one simulated L2 segment joining every node's uplink. The cluster
gives node k (1-based) the underlay address ``underlay + k``, the pod subnet number k of
``pod_cidr`` (``/node_prefix``; with ``pod_cidr6``, also subnet k of it), and MACs of its
own derived from (seed, node name): the gateway MAC, the VTEP MAC (the inner MAC of VXLAN
frames, like flannel.1's) and the uplink MAC (the outer MAC). It programs each node's
datapath as vswitchd does (docs/datapath.md, the VXLAN spec): ``set_vtep`` on the uplink
and one ``set_peer`` per other node with its VTEP address, VTEP MAC, pod CIDRs and — as
if ARP had resolved it — its uplink MAC as the underlay next hop (``set_resolved(...,
False)`` models a peer whose MAC is not resolved). Nothing of VXLAN is simulated here:
the datapath encapsulates and decapsulates; the cluster only carries frames.

One clock
    Every node keeps its own event queue; the cluster keeps them in step. ``run`` finds
    the earliest thing due anywhere (a queued frame, a shaper departure, a frame injected
    onto the underlay), runs every live node up to that instant (``Engine.run``), and
    repeats. A frame a node outputs on its uplink is recorded on the underlay at that
    instant and queued into each node it is for (outer destination MAC = that node's
    uplink MAC, or a group address) at ``t + latency`` (``latency_ns``, or per ordered
    pair with ``set_latency``). Nodes run in the order they were added, so the same seed
    and inputs give the same bytes, with either datapath implementation. A node's own
    ``run``/``advance``/``expect`` run the whole cluster.

Failures
    ``kill(node)`` stops a node's engine: it processes nothing, frames for it are lost
    (``counters()["underlay"]["lost"]``) and its peers keep sending to it (they do not
    know). ``revive(node)`` starts it again at the cluster's time; what was queued for
    it while it was down is discarded. ``remove_node`` / ``add_node`` change membership:
    every other node's peer table follows, at run time. ``remove_peer`` / ``add_peer``
    change one node's view only (a peers file on that node).

Not modelled: ARP on the underlay (peers' MACs are programmed, resolved or not), IP
fragmentation, and GSO — the simulation writes zeroed vnet headers, so no frame carries a
GSO type and none needs tunnel segmentation (``vswitch/datapath/gso.py``). Pods get no
MTU: an inner packet above ``mtu - 50`` bytes is the datapath's ``too_big`` drop.
"""
from __future__ import annotations

import collections
import hashlib
import heapq
import os
import ipaddress
from typing import Iterable

from vswitch.datapath import consts as C
from vswitch.sim import frames as F
from vswitch.sim.engine import Engine, Pod, _check_time, _Segment, write_pcap
from vswitch.sim.simulation import Simulation
from vswitch.config import format_mac

__all__ = ["Cluster", "ClusterNode", "UNDERLAY"]

UNDERLAY = "underlay"
MAX_ROUNDS_PER_INSTANT = 100_000


def _derive_mac(seed: int, what: str) -> bytes:
    return b"\x02" + hashlib.blake2b(f"{seed}/cluster/{what}".encode(), digest_size=5).digest()


class _UplinkWire(_Segment):
    """The far side of a node's uplink port: puts every frame the node outputs there onto
    the cluster's underlay (hosts beyond the uplink are not used on a cluster node)."""

    def __init__(self, cluster: "Cluster", node: "ClusterNode"):
        super().__init__()
        self.cluster, self.node = cluster, node

    def _handle(self, t, frame):
        self.cluster._underlay_put(t, frame, self.node)
        return []


class ClusterNode(Simulation):
    """One node of a ``Cluster``: a ``Simulation`` whose uplink is the underlay.

    ``name``, ``index``, ``ip`` (underlay/VTEP address), ``uplink_mac``, ``vtep_mac``,
    ``cidrs`` (its pod subnets), ``alive``. Its clock is the cluster's: ``run``,
    ``advance`` and ``expect`` run every node.
    """

    def __init__(self, cluster: "Cluster", name: str, index: int, ip: str, cidrs: list,
                 uplink_mac: bytes, vtep_mac: bytes, gateway_mac: bytes, **kw):
        self.cluster = cluster
        self.name, self.index, self.ip = name, index, ip
        self.cidrs = cidrs                  # [ipaddress network], IPv4 first
        self.uplink_mac, self.vtep_mac = uplink_mac, vtep_mac
        self.alive = True
        v4 = [c for c in cidrs if c.version == 4]
        v6 = [c for c in cidrs if c.version == 6]
        super().__init__(subnet=str(v4[0]), subnet6=str(v6[0]) if v6 else None,
                         node_ips=[ip], gateway_mac=format_mac(gateway_mac), **kw)
        port = self.switch.add_port(self.uplink_name, "uplink")
        self.uplink = _UplinkWire(cluster, self)
        self._attach(port.port_id, self.uplink_name, self.uplink)

    def __repr__(self):
        return f"<ClusterNode {self.name} {self.ip} {' '.join(map(str, self.cidrs))}" \
               f"{'' if self.alive else ' (killed)'}>"

    @property
    def uplink_id(self) -> int:
        return self.port_id(self.uplink_name)

    def add_pod(self, name: str, **kw) -> Pod:
        """A pod on this node (``Simulation.add_pod``); its name is unique in the cluster."""
        owner = self.cluster._pod_node.get(name)
        if owner is not None or name in self.cluster._nodes:
            raise ValueError(f"name: {name!r} is already used in the cluster"
                             + (f" (a pod on {owner})" if owner else " (a node)"))
        pod = super().add_pod(name, **kw)
        self.cluster._pod_node[name] = self.name
        return pod

    def remove_pod(self, name: str) -> None:
        super().remove_pod(name)
        self.cluster._pod_node.pop(name, None)

    def add_external(self, name, ip, **kw):
        raise ValueError(f"add_external: node {self.name!r} is a cluster node, its uplink is the "
                         "underlay; put frames on the underlay with Cluster.inject")

    def resume_at(self, now_ns: int) -> int:
        """Come back to life at ``now_ns``: frames queued before it are discarded (returns how
        many), the clock jumps there. ``Cluster.revive`` calls this."""
        kept = [e for e in self._events if e[0] >= now_ns]
        discarded = len(self._events) - len(kept)
        heapq.heapify(kept)
        self._events[:] = kept
        self.set_clock(now_ns)
        self.alive = True
        return discarded

    def run(self, until_ns: int | None = None) -> int:
        """Run the whole cluster (``Cluster.run``): every node shares this clock."""
        return self.cluster.run(until_ns)

    def run_bulk(self, *args, **kw):
        raise ValueError("run_bulk: not available on a cluster node (its outputs would not reach "
                         "the underlay); use generate(), which queues the frames as events")


class Cluster:
    """N simulated vswitch nodes, one virtual clock, one virtual underlay; see the module doc.

    ``Cluster(nodes=3, seed=0, impl=None, underlay="192.168.0.0/24",
    pod_cidr="10.244.0.0/16", node_prefix=24, pod_cidr6=None, node_prefix6=64, vni=1,
    udp_port=4789, mtu=1500, latency_ns=0, **sim_options)``: ``nodes`` is a count (names
    n1, n2, ...) or a list of names; ``sim_options`` go to every node's ``Simulation``
    (``reply_delay_ns``, ``capture_limit``, ``vnet_hdr_len``, ``max_ports``, ...).
    """

    def __init__(self, nodes: int | Iterable[str] = 3, seed: int = 0, *, impl=None,
                 underlay: str = "192.168.0.0/24", pod_cidr: str = "10.244.0.0/16",
                 node_prefix: int = 24, pod_cidr6: str | None = None, node_prefix6: int = 64,
                 vni: int = 1, udp_port: int = C.VXLAN_PORT, mtu: int = 1500,
                 latency_ns: int = 0, **sim_options):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: {seed!r}; accepted: an integer ≥ 0")
        self.seed, self.impl = seed, impl
        self.underlay = self._net(underlay, "underlay", 4)
        self.pod_cidr = self._net(pod_cidr, "pod_cidr", 4)
        self.pod_cidr6 = None if pod_cidr6 is None else self._net(pod_cidr6, "pod_cidr6", 6)
        for name, v, net in (("node_prefix", node_prefix, self.pod_cidr),
                             ("node_prefix6", node_prefix6, self.pod_cidr6)):
            if net is None:
                continue
            top = 30 if net.version == 4 else 126
            if isinstance(v, bool) or not isinstance(v, int) or not net.prefixlen < v <= top:
                raise ValueError(f"{name}: {v!r}; accepted: {net.prefixlen + 1} .. {top} "
                                 f"(a subnet of {net} per node)")
        self.node_prefix, self.node_prefix6 = node_prefix, node_prefix6
        for name, v, lo, hi in (("vni", vni, 0, (1 << 24) - 1), ("udp_port", udp_port, 1, 65535),
                                ("mtu", mtu, 68, 65535)):
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name}: {v!r}; accepted: {lo} .. {hi}")
        self.vni, self.udp_port, self.mtu = vni, udp_port, mtu
        self.latency_ns = _check_time("latency_ns", latency_ns)
        self._latency: dict[tuple[str, str], int] = {}
        self._sim_options = sim_options
        self._nodes: dict[str, ClusterNode] = {}
        self._pod_node: dict[str, str] = {}
        self._unresolved: set[tuple[str, str]] = set()     # (node, peer): peer MAC not resolved
        self._now = 0
        self._events: list = []           # heap of (t_ns, seq, frame): injected onto the underlay
        self._seq = 0
        self.capture_limit = sim_options.get("capture_limit", 100_000)
        self._capture = collections.deque(maxlen=self.capture_limit)   # (t_ns, frame) on the underlay
        self._stats = collections.Counter()
        if isinstance(nodes, bool) or not isinstance(nodes, int):
            names = list(nodes) if not isinstance(nodes, str) else [nodes]
        else:
            if not 1 <= nodes <= 250:
                raise ValueError(f"nodes: {nodes!r}; accepted: 1 .. 250, or a list of names")
            names = [f"n{k}" for k in range(1, nodes + 1)]
        for name in names:
            self.add_node(name)

    @staticmethod
    def _net(text, what, version):
        try:
            net = ipaddress.ip_network(text)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{what}: {text!r} is not a network ({exc})") from None
        if net.version != version:
            raise ValueError(f"{what}: {text!r} is not IPv{version}")
        return net

    @staticmethod
    def _subnet(net, prefix, k):
        """Subnet number ``k`` of ``net`` with prefix length ``prefix`` (IndexError: none)."""
        if k >= 1 << (prefix - net.prefixlen):
            raise IndexError(k)
        size = 1 << (net.max_prefixlen - prefix)
        return ipaddress.ip_network((int(net.network_address) + k * size, prefix))

    # ------------------------------------------------------------------ membership
    @property
    def nodes(self) -> dict[str, ClusterNode]:
        """{name: node} in the order added."""
        return dict(self._nodes)

    def node(self, name) -> ClusterNode:
        if isinstance(name, ClusterNode):
            return name
        node = self._nodes.get(name)
        if node is None:
            raise KeyError(f"unknown node {name!r}; nodes: {list(self._nodes)}")
        return node

    def __getitem__(self, name):
        """A node by name, or a pod by its (cluster-unique) name."""
        if name in self._nodes:
            return self._nodes[name]
        if name in self._pod_node:
            return self._nodes[self._pod_node[name]][name]
        raise KeyError(f"no node or pod {name!r}; nodes: {list(self._nodes)}")

    def node_of(self, pod) -> ClusterNode:
        """The node a pod (or a pod's name) lives on."""
        name = pod.name if isinstance(pod, Pod) else pod
        if name not in self._pod_node:
            raise KeyError(f"no pod {name!r} in the cluster; pods: {sorted(self._pod_node)[:20]}")
        return self._nodes[self._pod_node[name]]

    @property
    def pods(self) -> dict[str, Pod]:
        return {p: self._nodes[n][p] for p, n in self._pod_node.items()}

    def add_pod(self, node, name: str, **kw) -> Pod:
        """A pod on ``node`` (``Simulation.add_pod`` keywords); names are unique in the cluster."""
        return self.node(node).add_pod(name, **kw)

    def add_node(self, name: str | None = None) -> ClusterNode:
        """A new node (at run time too): the next free index; every other node learns it as a peer."""
        used = {n.index for n in self._nodes.values()}
        k = 1
        while k in used:
            k += 1
        if name is None:
            name = f"n{k}"
        if not isinstance(name, str) or not name or name in self._nodes or name in self._pod_node:
            raise ValueError(f"node name: {name!r}; accepted: a new non-empty string "
                             f"(nodes: {list(self._nodes)})")
        try:
            ip = self.underlay.network_address + k
            if ip not in self.underlay or ip == self.underlay.broadcast_address:
                raise IndexError
            cidrs = [self._subnet(self.pod_cidr, self.node_prefix, k)]
            if self.pod_cidr6 is not None:
                cidrs.append(self._subnet(self.pod_cidr6, self.node_prefix6, k))
        except IndexError:
            raise ValueError(f"add_node: no room for node number {k} in underlay {self.underlay} "
                             f"or pod_cidr {self.pod_cidr}/{self.node_prefix}") from None
        opts = dict(self._sim_options)
        node = ClusterNode(self, name, k, str(ip), cidrs,
                           uplink_mac=_derive_mac(self.seed, f"{name}/uplink"),
                           vtep_mac=_derive_mac(self.seed, f"{name}/vtep"),
                           gateway_mac=_derive_mac(self.seed, f"{name}/gateway"),
                           seed=self.seed, impl=self.impl, **opts)
        node.switch.dp.set_vtep(node.uplink_id, ipaddress.ip_address(node.ip).packed, node.uplink_mac,
                                node.vtep_mac, self.vni, self.udp_port, self.mtu)
        node.set_clock(self._now)
        self._nodes[name] = node
        for other in self._nodes.values():
            if other is not node:
                self.add_peer(node, other)
                self.add_peer(other, node)
        return node

    def remove_node(self, name) -> None:
        """Take a node out of the cluster: every other node forgets it; it stops."""
        node = self.node(name)
        for other in self._nodes.values():
            if other is not node and self._has_peer(other, node):
                self.remove_peer(other, node)
        del self._nodes[node.name]
        for pod in [p for p, n in self._pod_node.items() if n == node.name]:
            del self._pod_node[pod]
        self._unresolved = {(a, b) for a, b in self._unresolved if node.name not in (a, b)}
        node.alive = False

    def kill(self, name) -> None:
        """Stop a node's engine: it processes nothing; frames for it are lost."""
        self.node(name).alive = False

    def revive(self, name) -> None:
        """Start a killed node again at the cluster's time; frames queued for it meanwhile are
        discarded (counted in ``counters()["underlay"]["discarded_at_revive"]``)."""
        node = self.node(name)
        if node.alive:
            return
        self._stats["discarded_at_revive"] += node.resume_at(self._now)

    # ------------------------------------------------------------------ peers
    def _peer_args(self, node: ClusterNode, peer: ClusterNode):
        mac = None if (node.name, peer.name) in self._unresolved else peer.uplink_mac
        return (ipaddress.ip_address(peer.ip).packed, peer.vtep_mac, mac,
                [(c.network_address.packed, c.prefixlen) for c in peer.cidrs])

    def _has_peer(self, node: ClusterNode, peer: ClusterNode) -> bool:
        ip = ipaddress.ip_address(peer.ip).packed
        return any(p["ip"] == ip for p in node.switch.dp.peers())

    def add_peer(self, node, peer) -> None:
        """Program ``peer`` into ``node``'s datapath (``set_peer``; replaces an existing entry)."""
        node, peer = self.node(node), self.node(peer)
        if node is peer:
            raise ValueError(f"add_peer: {node.name!r} cannot be its own peer")
        node.switch.dp.set_peer(*self._peer_args(node, peer))

    def remove_peer(self, node, peer) -> None:
        """``node`` forgets ``peer`` (``remove_peer``): its traffic to that node's pods stops."""
        node, peer = self.node(node), self.node(peer)
        node.switch.dp.remove_peer(ipaddress.ip_address(peer.ip).packed)

    def set_resolved(self, node, peer, resolved: bool) -> None:
        """Model ARP for ``peer``'s underlay MAC on ``node``: unresolved → its frames to that
        peer are dropped ``vxlan_unresolved``; resolved → they flow again."""
        node, peer = self.node(node), self.node(peer)
        key = (node.name, peer.name)
        if resolved:
            self._unresolved.discard(key)
        else:
            self._unresolved.add(key)
        if self._has_peer(node, peer):
            node.switch.dp.set_peer(*self._peer_args(node, peer))

    def peers(self, node) -> list[dict]:
        """``node``'s peer table (``Datapath.peers()``), each row with the peer's ``name``."""
        node = self.node(node)
        by_ip = {ipaddress.ip_address(n.ip).packed: n.name for n in self._nodes.values()}
        return [dict(p, name=by_ip.get(p["ip"])) for p in node.switch.dp.peers()]

    def set_latency(self, a, b, ns: int, symmetric: bool = True) -> None:
        """The underlay latency from node ``a`` to node ``b`` (and back, if ``symmetric``)."""
        a, b = self.node(a).name, self.node(b).name
        ns = _check_time("latency ns", ns)
        self._latency[(a, b)] = ns
        if symmetric:
            self._latency[(b, a)] = ns

    # ------------------------------------------------------------------ the underlay
    def _underlay_put(self, t: int, frame: bytes, sender: ClusterNode | None) -> None:
        """A frame on the underlay at ``t``: recorded, queued into every node it is for."""
        self._capture.append((t, frame))
        self._stats["frames"] += 1
        dst = frame[:6]
        group = bool(dst[0] & 1)
        claimed = False
        for node in self._nodes.values():
            if node is sender or not (group or dst == node.uplink_mac):
                continue
            claimed = True
            if not node.alive:
                self._stats["lost"] += 1
                continue
            lat = self.latency_ns if sender is None else self._latency.get((sender.name, node.name),
                                                                            self.latency_ns)
            node.send(node.uplink_name, frame, at_ns=t + lat)
        if not claimed:
            self._stats["unclaimed"] += 1

    def inject(self, frame, at_ns: int | None = None) -> bytes:
        """Put a frame on the underlay at ``at_ns`` (default: now), as a host on it would."""
        data = F.frame_bytes(frame)
        if not 14 <= len(data) <= C.MAX_FRAME:
            raise ValueError(f"frame: {len(data)} bytes; accepted: 14 .. {C.MAX_FRAME}")
        t = self._now if at_ns is None else _check_time("at_ns", at_ns)
        if t < self._now:
            raise ValueError(f"at_ns: {t} is before the current time {self._now}")
        heapq.heappush(self._events, (t, self._seq, data))
        self._seq += 1
        return data

    def vxlan_frame(self, src, dst, inner, *, vni: int | None = None, sport: int = 49152,
                    dport: int | None = None, flags: int = 0x08) -> bytes:
        """An underlay VXLAN frame from node ``src`` (or an IPv4 address: a stranger with a
        MAC of its own) to node ``dst`` carrying the Ethernet frame ``inner`` as given."""
        d = self.node(dst)
        if isinstance(src, str) and src not in self._nodes:
            src_ip, src_mac = src, _derive_mac(self.seed, f"stranger/{src}")
        else:
            s = self.node(src)
            src_ip, src_mac = s.ip, s.uplink_mac
        return F.vxlan(d.uplink_mac, src_mac, src_ip, d.ip, self.vni if vni is None else vni,
                       F.frame_bytes(inner), sport=sport,
                       dport=self.udp_port if dport is None else dport, flags=flags)

    # ------------------------------------------------------------------ the clock
    @property
    def now(self) -> int:
        return self._now

    now_ns = now

    def _next_ns(self) -> int | None:
        times = [self._events[0][0]] if self._events else []
        for node in self._nodes.values():
            if not node.alive:
                continue
            t = node.next_event_ns()
            if t is not None:
                times.append(t)
            nd = node.switch.next_departure_ns()
            if nd >= 0:
                times.append(max(nd, node.now))
        return min(times) if times else None

    def run(self, until_ns: int | None = None) -> int:
        """Run every live node and the underlay to ``until_ns`` (default: until idle)."""
        if until_ns is not None:
            until_ns = _check_time("until_ns", until_ns)
            if until_ns < self._now:
                raise ValueError(f"until_ns: {until_ns} is before the current time {self._now}")
        processed = 0
        rounds, last_t = 0, -1
        while True:
            t = self._next_ns()
            if t is None or (until_ns is not None and t > until_ns):
                break
            t = max(t, self._now)
            if t == last_t:
                rounds += 1
                if rounds > MAX_ROUNDS_PER_INSTANT:
                    raise RuntimeError(f"cluster stuck at t={t} ns: {rounds} rounds at one instant "
                                       "(a forwarding loop between nodes?)")
            else:
                rounds, last_t = 0, t
            self._now = t
            while self._events and self._events[0][0] <= t:
                _, _, frame = heapq.heappop(self._events)
                self._underlay_put(t, frame, None)
            for node in list(self._nodes.values()):
                if node.alive:
                    processed += Engine.run(node, until_ns=t)
        if until_ns is not None:
            self._now = until_ns
            for node in self._nodes.values():
                if node.alive:
                    Engine.run(node, until_ns=until_ns)
        return processed

    def advance(self, ns: int) -> int:
        return self.run(until_ns=self._now + _check_time("ns", ns))

    # ------------------------------------------------------------------ records
    def counters(self) -> dict:
        """{"nodes": {name: node.counters()}, "underlay": {frames, lost, unclaimed, ...}}."""
        u = dict(sorted(self._stats.items()))
        for k in ("frames", "lost", "unclaimed", "discarded_at_revive"):
            u.setdefault(k, 0)
        u["capture_dropped"] = max(0, u["frames"] - len(self._capture))
        return {"nodes": {n: node.counters() for n, node in self._nodes.items()}, "underlay": u}

    def underlay_frames(self) -> list:
        """[(t_ns, frame)] every frame put on the underlay, oldest first (``capture_limit``)."""
        return list(self._capture)

    def write_pcap(self, where: str, path) -> int:
        """Write a pcap of ``"underlay"`` or of ``"node/port"`` (e.g. ``"n1/uplink"``)."""
        if where == UNDERLAY:
            return write_pcap(path, self._capture)
        node, sep, port = str(where).partition("/")
        if not sep:
            raise ValueError(f"write_pcap: {where!r}; accepted: {UNDERLAY!r} or 'node/port' "
                             f"(nodes: {list(self._nodes)})")
        return self.node(node).write_pcap(port, path)

    def write_pcaps(self, directory) -> list[str]:
        """Every port of every node (``node-port.pcap``) and ``underlay.pcap`` into ``directory``."""
        os.makedirs(directory, exist_ok=True)
        paths = [os.path.join(directory, f"{UNDERLAY}.pcap")]
        self.write_pcap(UNDERLAY, paths[0])
        for name, node in self._nodes.items():
            for port in node.port_names().values():
                p = os.path.join(directory, f"{name}-{port}.pcap")
                node.write_pcap(port, p)
                paths.append(p)
        return paths
