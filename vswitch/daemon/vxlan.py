"""vswitchd's VXLAN control plane: the VTEP, the peer table and its kernel side.

Theory of operation
-------------------
With ``--vxlan`` (implied by ``--vtep-vni``, ``--vtep-port``, ``--vtep-address`` and
``--peers``; all need ``--uplink``) the daemon programs the datapath's VTEP
(``dp.set_vtep``: the uplink, its primary IPv4 or ``--vtep-address``, the uplink MAC as
outer source MAC, the VTEP MAC, VNI, UDP port, the uplink MTU) and keeps the table of
*peers*, the other nodes: name, node IP (their VTEP address), VTEP MAC, pod CIDRs.

**Sources.** Three sources each hold their own set of peers and each ``replace`` swaps
only its own: ``file`` (``--peers FILE``, a JSON list of ``{"name", "node_ip",
"pod_cidrs", "vtep_mac"}``, read at start, on SIGHUP and by ``peers`` ``reload``),
``cluster`` (``vswitch.daemon.cluster``'s membership calls ``replace("cluster", peers)``)
and ``control`` (the ``peers`` op's ``replace``; kept in the state file, so a restarted
daemon has them again). The table is their union by name; a name in more than one source
takes the record of the strongest, ``control`` > ``cluster`` > ``file``. The union must
be consistent: names, node IPs and (identical) CIDRs unique, no node IP equal to our
VTEP address, no CIDR overlapping one of our own pod subnets (gateways, leased subnets),
at most ``max_peers`` peers and ``MAX_PEER_CIDRS`` CIDRs each; a ``replace`` that breaks
any of it raises ``ValueError`` naming the value and changes nothing (the op answers code
4; SIGHUP logs ``peers_reload_failed`` and keeps the previous file set).

**Threads.** Everything here runs on the daemon's loop thread, ``replace`` included (the
cluster glue calls it from ``ClusterMode.service``, never from a membership thread). The
kernel work runs on the ``KernelWorker`` as one *sync* operation queued on the control
server's queue of kernel operations (``ControlServer.submit_internal``): the loop thread
builds a plan (a snapshot), the kernel thread applies it (``kernel_sync``, iproute2 through
``ip -batch``), the loop thread applies the result to the datapath.

**The kernel side of a sync**, on the host port (``vsw0``, which holds the node IP):

1. *Underlay next hops.* ``ip route get NODE_IP`` per peer: the gateway, or the peer
   itself when on-link. Each next hop gets a neighbour entry with ``NTF_MANAGED``
   (``ip neigh replace NH dev vsw0 managed``; Linux >= 5.16 resolves it and keeps it
   resolved, probing through the switch); its MAC (``lladdr``, in any state but
   INCOMPLETE/FAILED) is the peer's ``underlay_mac``, pushed with ``dp.set_peer`` when it
   changes. A peer without one is ``unresolved``: the datapath drops its frames as
   ``vxlan_unresolved`` (counted per peer too), never silently.
2. *The node reaches remote pods* (Kubernetes: nodes reach every pod): per peer CIDR, a
   permanent neighbour for the CIDR's first address -> our VTEP MAC, then
   ``ip route replace CIDR via FIRST dev vsw0 onlink proto 118 [src GATEWAY]`` (the
   gateway address of that family, when one exists): the kernel sends such frames to our
   VTEP MAC and the datapath encapsulates them. Routes carry protocol 118 and the
   neighbours our VTEP MAC, which is how a restarted daemon finds and removes stale ones.

A sync runs after every change (it reconciles: adds, replaces, deletes), then every
``REFRESH_S`` re-reads the next hops and neighbours (every ``RECONCILE_S`` it reconciles
the routes again; sooner, backing off from ``UNRESOLVED_MIN_S``, while a peer is
unresolved). ``stop`` removes the routes and neighbours this daemon made.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time

from vswitch import rpc
from vswitch.datapath import consts as C
from vswitch.rpc import RpcError

SOURCES = ("control", "cluster", "file")     # the strongest first
PEER_KEYS = ("name", "node_ip", "pod_cidrs", "vtep_mac")
ROUTE_PROTO = 118                            # our routes on the host port (iproute2 "proto 118")
REFRESH_S = 1.0
RECONCILE_S = 10.0
UNRESOLVED_MIN_S = 0.1
UNRESOLVED_MAX_S = 2.0
RESOLVE_WAIT_S = 0.3                         # a sync waits this long for new next hops to resolve
MAX_NAME_LEN = 253
MAX_FILE_BYTES = 16 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_UNRESOLVED_STATES = {"INCOMPLETE", "FAILED", "NONE"}


# --------------------------------------------------------------------------- validation

def parse_mac(value, where: str) -> str:
    if not isinstance(value, str) or not _MAC_RE.match(value):
        raise ValueError(f"{where}: {value!r} is not a MAC; accepted: like 0e:12:34:56:78:9a")
    mac = value.lower()
    b = bytes.fromhex(mac.replace(":", ""))
    if b[0] & 1 or not any(b):
        raise ValueError(f"{where}: {value!r} is a multicast or zero MAC; accepted: a unicast MAC")
    return mac


def parse_peer(obj, where: str) -> dict:
    """One peer record, checked and normalised; ValueError naming the value otherwise."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: {obj!r:.80} is not an object; accepted: "
                         f'{{"name", "node_ip", "pod_cidrs", "vtep_mac"}}')
    unknown = sorted(set(obj) - set(PEER_KEYS))
    missing = [k for k in PEER_KEYS if k not in obj]
    if unknown or missing:
        raise ValueError(f"{where}: " + "; ".join(
            ([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) +
            ([f"missing key(s) {', '.join(missing)}"] if missing else [])) +
            f"; accepted keys: {', '.join(PEER_KEYS)}")
    name = obj["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN or not _NAME_RE.match(name):
        raise ValueError(f"{where}.name: {name!r:.80} is not accepted: 1..{MAX_NAME_LEN} of "
                         f"letters, digits and . _ : @ - (not first)")
    where = f"{where} ({name})"
    try:
        ip = ipaddress.IPv4Address(obj["node_ip"]) if isinstance(obj["node_ip"], str) else None
    except ValueError:
        ip = None
    if ip is None or ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip == ipaddress.IPv4Address(
            "255.255.255.255"):
        raise ValueError(f"{where}.node_ip: {obj['node_ip']!r:.60} is not accepted: a unicast IPv4 address")
    mac = parse_mac(obj["vtep_mac"], f"{where}.vtep_mac")
    cidrs = obj["pod_cidrs"]
    if not isinstance(cidrs, list) or not 1 <= len(cidrs) <= C.MAX_PEER_CIDRS:
        raise ValueError(f"{where}.pod_cidrs: {cidrs!r:.80} is not accepted: a list of 1..{C.MAX_PEER_CIDRS} "
                         f"CIDRs like \"10.244.2.0/24\"")
    nets = []
    for i, c in enumerate(cidrs):
        try:
            if not isinstance(c, str):
                raise ValueError("not a string")
            n = ipaddress.ip_network(c, strict=True)
        except ValueError as exc:
            raise ValueError(f"{where}.pod_cidrs[{i}]: {c!r:.60} is not accepted ({exc}): a network with "
                             f"host bits zero like 10.244.2.0/24 or fd00:10:244:2::/64") from None
        if n.is_multicast or n.prefixlen == 0:
            raise ValueError(f"{where}.pod_cidrs[{i}]: {c} is not accepted: a unicast network, not a default route")
        if n in nets:
            raise ValueError(f"{where}.pod_cidrs: {c} is listed twice")
        nets.append(n)
    return {"name": name, "node_ip": str(ip), "vtep_mac": mac, "pod_cidrs": [str(n) for n in nets]}


def parse_peers(objs, where: str) -> list[dict]:
    if not isinstance(objs, list):
        raise ValueError(f"{where}: {objs!r:.80} is not a list; accepted: a JSON list of "
                         f'{{"name", "node_ip", "pod_cidrs", "vtep_mac"}}')
    out, names = [], set()
    for i, o in enumerate(objs):
        p = parse_peer(o, f"{where}[{i}]")
        if p["name"] in names:
            raise ValueError(f"{where}[{i}]: name {p['name']!r} is listed twice")
        names.add(p["name"])
        out.append(p)
    return out


def read_peers_file(path: str) -> list[dict]:
    """The peers of a ``--peers`` file; ValueError saying what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"--peers {path}: cannot read it: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"--peers {path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        objs = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"--peers {path}: not JSON ({exc}); accepted: a JSON list of "
                         f'{{"name", "node_ip", "pod_cidrs", "vtep_mac"}}') from None
    return parse_peers(objs, f"--peers {path}")


class VtepConfig:
    """The VXLAN flags, checked before anything starts (ValueError naming the flag)."""

    def __init__(self, vni: int = 1, udp_port: int = C.VXLAN_PORT, address: str | None = None,
                 peers_file: str | None = None):
        if isinstance(vni, bool) or not isinstance(vni, int) or not 0 <= vni <= (1 << 24) - 1:
            raise ValueError(f"--vtep-vni {vni!r}: accepted an integer 0 .. {(1 << 24) - 1}")
        if isinstance(udp_port, bool) or not isinstance(udp_port, int) or not 1 <= udp_port <= 65535:
            raise ValueError(f"--vtep-port {udp_port!r}: accepted an integer 1 .. 65535")
        if address is not None:
            try:
                address = str(ipaddress.IPv4Address(address))
            except ValueError:
                raise ValueError(f"--vtep-address {address!r}: accepted an IPv4 address of the uplink") from None
        if peers_file is not None:
            peers_file = os.path.abspath(peers_file)
        self.vni, self.udp_port, self.address, self.peers_file = vni, udp_port, address, peers_file


# --------------------------------------------------------------------------- the kernel side

def _ip(args, input_text: str | None = None, netns: str | None = None) -> subprocess.CompletedProcess:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return subprocess.run(cmd, input=input_text, capture_output=True, text=True, timeout=30)


def _json_docs(text: str) -> list:
    """The JSON documents ``ip -j -batch`` printed one after another."""
    dec, out, i = json.JSONDecoder(), [], 0
    text = text.strip()
    while i < len(text):
        doc, j = dec.raw_decode(text, i)
        out.append(doc)
        i = j
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def _batch(lines: list[str], netns: str | None, json_out: bool = False):
    """``ip [-j] -force -batch -``: (parsed docs or stdout, stderr lines)."""
    if not lines:
        return ([] if json_out else ""), []
    r = _ip((["-j"] if json_out else []) + ["-force", "-batch", "-"], "".join(l + "\n" for l in lines), netns)
    errs = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("Command failed")]
    if json_out:
        try:
            return _json_docs(r.stdout), errs
        except ValueError:
            return [], errs + [f"unparsable ip output: {r.stdout[:200]!r}"]
    return r.stdout, errs


def read_kernel(dev: str, netns: str | None = None) -> dict:
    """What the host port holds: our routes (both families) and its neighbours."""
    docs, errs = _batch([f"neigh show dev {dev}", f"route show dev {dev} proto {ROUTE_PROTO}"], netns, True)
    r6 = _ip(["-j", "-6", "route", "show", "dev", dev, "proto", str(ROUTE_PROTO)], netns=netns)
    neigh = docs[0] if docs else []
    routes = (docs[1] if len(docs) > 1 else []) + (json.loads(r6.stdout) if r6.returncode == 0 and r6.stdout.strip()
                                                   else [])
    return {"neigh": neigh, "routes": routes, "errors": errs}


def _route_dst(r: dict) -> str:
    d = r.get("dst", "")
    if d == "default" or "/" in d:
        return d
    return d + ("/128" if ":" in d else "/32")


def kernel_sync(plan: dict) -> dict:
    """Kernel thread: make the host port hold ``plan`` and resolve the peers' next hops.

    ``plan``: ``dev``, ``netns``, ``vtep_mac``, ``routes`` ({cidr: {"via", "src"}}),
    ``neighs`` ({first address: vtep_mac}), ``resolve`` ([node IPs]), ``owned`` (next hops
    whose managed entries we made), ``full`` (reconcile routes, not only resolve).
    Returns ``resolved`` ({node_ip: {"next_hop", "mac", "state", "reason"}}), ``owned``
    and ``errors``."""
    dev, ns = plan["dev"], plan.get("netns")
    errors: list[str] = []
    # 1. next hops of the peers
    resolved, nhs = {}, {}
    if plan["resolve"]:
        docs, errs = _batch([f"route get {ip}" for ip in plan["resolve"]], ns, True)
        got = {}
        for d in docs:
            for r in d if isinstance(d, list) else []:
                got[r.get("dst")] = r
        for ip in plan["resolve"]:
            r = got.get(ip)
            if r is None:
                resolved[ip] = {"next_hop": None, "mac": None, "state": "unresolved", "reason": "no route"}
            elif r.get("dev") != dev:
                resolved[ip] = {"next_hop": r.get("gateway", ip), "mac": None, "state": "unresolved",
                                "reason": f"the route leaves by {r.get('dev')}, not {dev}"}
            else:
                nhs[ip] = r.get("gateway", ip)
    want_nh = set(nhs.values())
    have = read_kernel(dev, ns)
    errors += have["errors"]
    neigh = {n.get("dst"): n for n in have["neigh"]}
    lines, dels = [], []
    # 2. the managed next hops (new ones first), the permanent neighbours, then the routes
    for nh in sorted(want_nh):
        n = neigh.get(nh)
        if n is None or "managed" not in n:
            lines.append(f"neigh replace {nh} dev {dev} managed")
    for nh in sorted(set(plan["owned"]) - want_nh - set(plan["neighs"])):
        if nh in neigh:
            dels.append(f"neigh del {nh} dev {dev}")
    if plan["full"]:
        vmac = plan["vtep_mac"]
        for first, mac in sorted(plan["neighs"].items()):
            n = neigh.get(first)
            if n is None or n.get("lladdr") != mac or "PERMANENT" not in n.get("state", []):
                lines.append(f"neigh replace {first} lladdr {mac} dev {dev} nud permanent")
        routes = {_route_dst(r): r for r in have["routes"]}
        for cidr, want in sorted(plan["routes"].items()):
            r = routes.get(cidr)
            if r is None or r.get("gateway") != want["via"] or r.get("prefsrc") != want["src"]:
                lines.append(f"route replace {cidr} via {want['via']} dev {dev} onlink proto {ROUTE_PROTO}"
                             + (f" src {want['src']}" if want["src"] else ""))
        for cidr, r in sorted(routes.items()):
            if cidr not in plan["routes"]:
                dels.insert(0, f"route del {cidr} dev {dev} proto {ROUTE_PROTO}")
        for first, n in sorted(neigh.items()):
            if first not in plan["neighs"] and n.get("lladdr") == vmac and "PERMANENT" in n.get("state", []):
                dels.append(f"neigh del {first} dev {dev}")
    _, errs = _batch(dels + lines, ns)
    errors += errs
    # 3. the next hops' MACs (a new managed entry resolves within milliseconds)
    deadline = time.monotonic() + (RESOLVE_WAIT_S if any(l.endswith(" managed") for l in lines) else 0)
    while True:
        docs, errs = _batch([f"neigh show dev {dev}"], ns, True)
        neigh = {n.get("dst"): n for n in (docs[0] if docs else [])}
        pending = [nh for nh in want_nh if _mac_of(neigh.get(nh)) is None]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    errors += errs
    for ip, nh in nhs.items():
        n = neigh.get(nh)
        mac = _mac_of(n)
        resolved[ip] = {"next_hop": nh, "mac": mac, "state": "resolved" if mac else "unresolved",
                        "reason": None if mac else f"next hop {nh}: neighbour "
                                                   f"{'/'.join(n.get('state', [])) if n else 'missing'}"}
    return {"resolved": resolved, "owned": sorted(want_nh), "errors": errors}


def _mac_of(n: dict | None) -> str | None:
    if not n or not n.get("lladdr"):
        return None
    if _UNRESOLVED_STATES.intersection(n.get("state", [])):
        return None
    return n["lladdr"].lower()


def kernel_clear(dev: str, vtep_mac: str, owned, netns: str | None = None) -> list[str]:
    """Remove our routes, our permanent neighbours and the managed next hops we made."""
    plan = {"dev": dev, "netns": netns, "vtep_mac": vtep_mac, "routes": {}, "neighs": {}, "resolve": [],
            "owned": list(owned), "full": True}
    return kernel_sync(plan)["errors"]


# --------------------------------------------------------------------------- the peer table

def _ip_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def _mac_bytes(mac: str | None) -> bytes | None:
    return bytes.fromhex(mac.replace(":", "")) if mac else None


def _dp_cidrs(cidrs) -> list:
    return [(n.network_address.packed, n.prefixlen) for n in map(ipaddress.ip_network, cidrs)]


class Vxlan:
    """The VTEP and the peers of a running daemon; see the module docstring."""

    def __init__(self, conf: VtepConfig, switch, state, log, host_name: str, uplink_port_id: int = 1):
        self.conf = conf
        self.switch = switch
        self.dp = switch.dp
        self.state = state
        self.log = log
        self.host_name = host_name
        self.uplink_port_id = uplink_port_id
        self.submit = None               # ControlServer.submit_internal, set by the daemon
        self.netns = None                # tests: the namespace of the host port (None: ours)
        self.vtep: dict | None = None
        self.sources: dict[str, list[dict]] = {s: [] for s in SOURCES}
        self.peers: dict[str, dict] = {}             # name -> record (+ "source"), what the dp holds
        self.resolved: dict[str, dict] = {}          # node_ip -> kernel_sync's answer
        self.owned: set[str] = set()                 # next hops whose managed entries we made
        self.next_ns = 0
        self.backoff_s = UNRESOLVED_MIN_S
        self.last_full_ns = 0
        self.last_plan = None
        self._sync_queued = False
        self.max_peers = int(getattr(self.dp, "max_peers", 0) or C.DEFAULTS.get("max_peers", 4096))
        self.stats = {"replaces": 0, "rejected": 0, "syncs": 0, "sync_errors": 0, "mac_changes": 0}

    # ----------------------------------------------------------------- start / stop

    def start(self, uplink_addresses, outer_mac: str, vtep_mac: str, mtu: int):
        """Program the VTEP and the saved/file peers (loop thread, before the loop runs).
        A bad ``--vtep-address`` or ``--peers`` file stops the daemon (SystemExit)."""
        ips = [str(ipaddress.ip_interface(a).ip) for a in uplink_addresses
               if ipaddress.ip_interface(a).version == 4]
        addr = self.conf.address or (ips[0] if ips else None)
        if addr is None:
            raise SystemExit("vswitchd: --vxlan: the uplink has no IPv4 address to be the VTEP; "
                             "give it one, or --vtep-address")
        if addr not in ips:
            raise SystemExit(f"vswitchd: --vtep-address {addr}: not an address of the uplink "
                             f"(it has {', '.join(ips) or 'none'})")
        try:
            self.dp.set_vtep(self.uplink_port_id, _ip_bytes(addr), _mac_bytes(outer_mac), _mac_bytes(vtep_mac),
                             self.conf.vni, self.conf.udp_port, mtu)
        except ValueError as exc:
            raise SystemExit(f"vswitchd: --vxlan: {exc}") from None
        self.vtep = {"ip": addr, "vtep_mac": vtep_mac, "outer_mac": outer_mac, "vni": self.conf.vni,
                     "udp_port": self.conf.udp_port, "mtu": mtu, "port": self.uplink_port_id,
                     "peers_file": self.conf.peers_file}
        saved = self.state.data.get("vxlan") or {}
        self.owned = set(saved.get("owned", []))
        self.sources["control"] = saved.get("control", [])
        if self.conf.peers_file:
            try:
                self.sources["file"] = read_peers_file(self.conf.peers_file)
            except ValueError as exc:
                raise SystemExit(f"vswitchd: {exc}") from None
        try:
            self._program(self._merged(self.sources))
        except ValueError as exc:
            raise SystemExit(f"vswitchd: peers: {exc}") from None
        self._save_record()
        self.log("vxlan", **self.vtep, peers=len(self.peers))

    def stop(self):
        """At shutdown (the kernel thread has stopped): remove our routes and neighbours."""
        if self.vtep is None:
            return
        try:
            errors = kernel_clear(self.host_name, self.vtep["vtep_mac"], self.owned, self.netns)
        except (OSError, subprocess.SubprocessError) as exc:
            errors = [repr(exc)]
        if errors:
            self.log("vxlan_clear_failed", level="warning", errors=errors[:10])
        self.owned = set()
        self._save_record()

    # ----------------------------------------------------------------- sources

    def replace(self, source: str, peers) -> dict:
        """Replace ``source``'s set of peers (``"file"``, ``"cluster"``, ``"control"``) with
        ``peers``: a list of dicts with exactly ``name``, ``node_ip``, ``pod_cidrs``,
        ``vtep_mac``. Loop thread only (``ClusterMode.service`` calls it there). Programs
        the datapath at once and queues a sync of the kernel side; returns the listing.
        ValueError naming what is wrong, and nothing changes."""
        if source not in SOURCES:
            raise ValueError(f"source {source!r}: accepted {', '.join(SOURCES)}")
        try:
            parsed = parse_peers(list(peers) if isinstance(peers, tuple) else peers, f"{source} peers")
            sources = dict(self.sources, **{source: parsed})
            self._program(self._merged(sources))
        except ValueError:
            self.stats["rejected"] += 1
            raise
        self.sources = sources
        self.stats["replaces"] += 1
        if source == "control":
            self._save_record()
        self.log("peers", source=source, peers=len(parsed), table=len(self.peers))
        self.request_sync()
        return self.listing()

    def reload_file(self) -> dict:
        if not self.conf.peers_file:
            raise RpcError(rpc.E_INVALID_CONFIG, "vswitchd runs without --peers FILE: nothing to reload")
        return self.replace("file", read_peers_file(self.conf.peers_file))

    def _own_subnets(self) -> list:
        nets = [ipaddress.ip_interface(g).network for g in self.state.host.get("gateways", [])]
        nets += [ipaddress.ip_network(s, strict=False) for s in (self.state.cluster or {}).get("subnets", [])]
        return nets

    def _merged(self, sources) -> dict[str, dict]:
        table: dict[str, dict] = {}
        for src in reversed(SOURCES):            # the weakest first: the stronger overwrite
            for p in sources[src]:
                table[p["name"]] = dict(p, source=src)
        if len(table) > self.max_peers:
            raise ValueError(f"{len(table)} peers: too many; accepted at most {self.max_peers} (max_peers)")
        ips, cidrs = {}, {}
        own = self._own_subnets()
        for name, p in sorted(table.items()):
            if self.vtep is not None and p["node_ip"] == self.vtep["ip"]:
                raise ValueError(f"peer {name} ({p['source']}): node_ip {p['node_ip']} is this node's "
                                 f"own VTEP address")
            if p["node_ip"] in ips:
                raise ValueError(f"peer {name} ({p['source']}): node_ip {p['node_ip']} is also peer "
                                 f"{ips[p['node_ip']]}'s; accepted: one peer per node IP")
            ips[p["node_ip"]] = name
            for c in p["pod_cidrs"]:
                if c in cidrs:
                    raise ValueError(f"peer {name} ({p['source']}): pod CIDR {c} is also peer {cidrs[c]}'s; "
                                     f"accepted: each CIDR on one peer")
                cidrs[c] = name
                n = ipaddress.ip_network(c)
                for o in own:
                    if o.version == n.version and o.overlaps(n):
                        raise ValueError(f"peer {name} ({p['source']}): pod CIDR {c} overlaps this node's "
                                         f"own pod subnet {o}")
        return table

    def _program(self, new: dict[str, dict]):
        """Make the datapath hold ``new`` (remove first what would conflict); on a
        datapath refusal, the old table is put back and ValueError raised."""
        old = self.peers
        holders = {c: p["node_ip"] for p in old.values() for c in p["pod_cidrs"]}
        remove = {p["node_ip"] for n, p in old.items() if n not in new or new[n]["node_ip"] != p["node_ip"]}
        for p in new.values():
            for c in p["pod_cidrs"]:
                h = holders.get(c)
                if h is not None and h != p["node_ip"]:
                    remove.add(h)
        old_by_ip = {p["node_ip"]: p for p in old.values()}
        try:
            for ip in sorted(remove):
                self.dp.remove_peer(_ip_bytes(ip))
            for name, p in sorted(new.items()):
                o = old_by_ip.get(p["node_ip"])
                if o is None or p["node_ip"] in remove or o["vtep_mac"] != p["vtep_mac"] \
                        or o["pod_cidrs"] != p["pod_cidrs"]:
                    self._set_dp(p)
        except ValueError:
            self._restore(old)
            raise
        self.peers = new

    def _restore(self, old):
        have = {bytes(d["ip"]) for d in self.dp.peers()}
        for b in have:
            self.dp.remove_peer(b)
        for p in old.values():
            try:
                self._set_dp(p)
            except ValueError as exc:   # noqa: PERF203 - cannot happen: it was programmed before
                self.log("peer_restore_failed", level="error", peer=p["name"], error=str(exc))

    def _set_dp(self, p):
        r = self.resolved.get(p["node_ip"]) or {}
        self.dp.set_peer(_ip_bytes(p["node_ip"]), _mac_bytes(p["vtep_mac"]), _mac_bytes(r.get("mac")),
                         _dp_cidrs(p["pod_cidrs"]))

    def _save_record(self):
        """Into the state (written with the next save): the control peers, the next hops we own."""
        self.state.data["vxlan"] = {"control": self.sources["control"], "owned": sorted(self.owned)}

    # ----------------------------------------------------------------- syncs

    @property
    def timer_ns(self) -> int:
        return self.next_ns

    def tick(self, now_ns: int):
        """The refresh timer (loop thread): queue a sync unless one is queued."""
        if now_ns >= self.next_ns:
            self.next_ns = now_ns + int(REFRESH_S * 1e9)   # pushed on when the sync ends
            self.request_sync()

    def request_sync(self):
        if self._sync_queued or self.submit is None or self.vtep is None:
            return
        self._sync_queued = True
        self.submit(self.sync(), "vxlan_sync")

    def _plan(self, full: bool) -> dict:
        gw = {}
        for g in self.state.host.get("gateways", []):
            i = ipaddress.ip_interface(g)
            gw.setdefault(i.version, str(i.ip))
        routes, neighs = {}, {}
        for p in self.peers.values():
            for c in p["pod_cidrs"]:
                n = ipaddress.ip_network(c)
                first = str(n.network_address)
                routes[c] = {"via": first, "src": gw.get(n.version)}
                neighs[first] = self.vtep["vtep_mac"]
        return {"dev": self.host_name, "netns": self.netns, "vtep_mac": self.vtep["vtep_mac"], "routes": routes,
                "neighs": neighs, "resolve": sorted({p["node_ip"] for p in self.peers.values()}),
                "owned": sorted(self.owned), "full": full}

    def sync(self):
        """Generator (a kernel operation): plan, ``kernel_sync`` on the kernel thread, apply."""
        self._sync_queued = False
        now = time.monotonic_ns()
        plan = self._plan(True)
        key = json.dumps([plan["routes"], plan["neighs"]], sort_keys=True)
        plan["full"] = key != self.last_plan or now - self.last_full_ns >= RECONCILE_S * 1e9
        try:
            res = yield (kernel_sync, plan)
        except (OSError, subprocess.SubprocessError) as exc:
            self.stats["sync_errors"] += 1
            self.log("vxlan_sync_failed", level="warning", error=repr(exc))
            self.next_ns = time.monotonic_ns() + int(UNRESOLVED_MAX_S * 1e9)
            return {}
        self.stats["syncs"] += 1
        if plan["full"]:
            self.last_plan, self.last_full_ns = key, now
        if res["errors"]:
            self.stats["sync_errors"] += 1
            self.log("vxlan_sync_errors", level="warning", errors=res["errors"][:10])
        if set(res["owned"]) != self.owned:
            self.owned = set(res["owned"])
            self._save_record()
        self._apply(res["resolved"])
        unresolved = any(r["mac"] is None for r in self.resolved.values())
        if unresolved:
            wait_s, self.backoff_s = self.backoff_s, min(self.backoff_s * 2, UNRESOLVED_MAX_S)
        else:
            wait_s, self.backoff_s = REFRESH_S, UNRESOLVED_MIN_S
        self.next_ns = time.monotonic_ns() + int(wait_s * 1e9)
        return {}

    def _apply(self, resolved: dict):
        """New next-hop MACs into the datapath (loop thread)."""
        for p in self.peers.values():
            ip = p["node_ip"]
            new = resolved.get(ip)
            if new is None:
                continue
            old = self.resolved.get(ip)
            self.resolved[ip] = new
            if old is None or old.get("mac") != new["mac"]:
                self._set_dp(p)
                self.stats["mac_changes"] += 1
                self.log("peer_underlay", peer=p["name"], node_ip=ip, next_hop=new["next_hop"], mac=new["mac"],
                         state=new["state"], reason=new["reason"])
        known = {p["node_ip"] for p in self.peers.values()}
        for ip in list(self.resolved):
            if ip not in known:
                del self.resolved[ip]

    # ----------------------------------------------------------------- the op and listings

    def op_peers(self, req):
        """Generator: the ``peers`` op (``action``: list, replace, reload)."""
        action = req.get("action", "list")
        if action not in ("list", "replace", "reload"):
            raise RpcError(rpc.E_BAD_ARGS, f"peers: action {action!r:.40}; accepted: list, replace, reload")
        if action != "list":
            try:
                if action == "replace":
                    if "peers" not in req:
                        raise ValueError("replace needs peers: a list of {name, node_ip, pod_cidrs, vtep_mac}")
                    self.replace("control", req["peers"])
                else:
                    self.reload_file()
            except ValueError as exc:
                raise RpcError(rpc.E_BAD_ARGS, f"peers {action}: {exc}") from None
            if action == "replace":
                yield self.state.job()
            yield from self.sync()
        return self.listing()

    def listing(self) -> dict:
        counters = {ipaddress.IPv4Address(bytes(d["ip"])).exploded: d for d in self.dp.peers()}
        rows = []
        for name, p in sorted(self.peers.items()):
            r = self.resolved.get(p["node_ip"]) or {}
            c = counters.get(p["node_ip"], {})
            rows.append({"name": name, "node_ip": p["node_ip"], "vtep_mac": p["vtep_mac"],
                         "underlay_mac": r.get("mac"), "next_hop": r.get("next_hop"),
                         "state": "resolved" if r.get("mac") else "unresolved", "reason": r.get("reason"),
                         "pod_cidrs": p["pod_cidrs"], "source": p["source"],
                         **{k: int(c.get(k, 0)) for k in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes",
                                                          "drop_unresolved")}})
        return {"vtep": self.vtep, "peers": rows,
                "sources": {s: len(v) for s, v in self.sources.items()}, "stats": dict(self.stats)}

    def status(self) -> dict:
        rows = self.listing()["peers"]
        return {**(self.vtep or {}), "peers": len(rows),
                "unresolved": sum(1 for r in rows if r["state"] != "resolved"), **self.stats}

    def metrics_lines(self) -> list[str]:
        rows = self.listing()["peers"]
        out = ["# HELP vswitch_vxlan_peers Peers in the VXLAN table.", "# TYPE vswitch_vxlan_peers gauge",
               f"vswitch_vxlan_peers {len(rows)}",
               "# HELP vswitch_vxlan_peers_unresolved Peers whose underlay next hop has no MAC.",
               "# TYPE vswitch_vxlan_peers_unresolved gauge",
               f"vswitch_vxlan_peers_unresolved {sum(1 for r in rows if r['state'] != 'resolved')}"]
        out += ["# HELP vswitch_peer_resolved 1 while the peer's underlay next hop has a MAC.",
                "# TYPE vswitch_peer_resolved gauge"]
        out += [f'vswitch_peer_resolved{{peer="{r["name"]}",node_ip="{r["node_ip"]}"}} '
                f'{int(r["state"] == "resolved")}' for r in rows]
        for k, help_ in (("tx_packets", "Frames encapsulated to the peer."),
                         ("tx_bytes", "Outer bytes encapsulated to the peer."),
                         ("rx_packets", "Frames decapsulated from the peer."),
                         ("rx_bytes", "Outer bytes decapsulated from the peer."),
                         ("drop_unresolved", "Frames to the peer dropped: no underlay MAC.")):
            out += [f"# HELP vswitch_peer_{k}_total {help_}", f"# TYPE vswitch_peer_{k}_total counter"]
            out += [f'vswitch_peer_{k}_total{{peer="{r["name"]}",node_ip="{r["node_ip"]}"}} {r[k]}' for r in rows]
        return out
