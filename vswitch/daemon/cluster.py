"""vswitchd in cluster mode: the node's subnet lease and the peer list, from etcd.

Theory of operation
-------------------
With ``--cluster-cidr`` the daemon runs one ``vswitch.cluster.membership.Membership``
(imported here, only in cluster mode: a daemon without it, and the CNI plugin, never load
the etcd client). The membership's two threads talk to etcd; this module is the glue
between them and the daemon's one loop thread:

* **Callbacks never touch the daemon.** ``on_subnets``, ``on_peers`` and ``on_fatal`` run
  on the membership's threads: they store what they were given under a lock and make the
  control server's wake-up eventfd readable, so the packet loop returns to Python.
  ``service`` (loop thread, from ``Daemon._control_events``) then applies it: new subnets
  go into the state (``state.cluster``: cluster CIDRs, node name, subnets) and the state
  file is written at once when no kernel operation is running (else at the next round: an
  operation's own snapshot, already taken, must not overwrite a newer one); a new peer
  list goes to ``_apply_peers``; a fatal error (the cluster CIDR is full) stops the daemon
  with exit status 3.
* **Restart keeps the subnet.** At start the saved subnets are handed to ``Membership`` as
  ``previous_subnets``, which claims them first (still ours from the lease of the killed
  run, or free: the same subnet; taken meanwhile: another one, and the log says so).
* **Fail static.** etcd unreachable never stops the daemon: forwarding goes on, the last
  peer list stays, ``status``/``nodes``/the metrics say ``connected: false`` and since
  when, and the membership re-registers and re-syncs by itself when etcd is back. With no
  lease yet (etcd down from the start) ``pod_cidr`` answers code 11, so the plugin's ADD
  fails with "try again later".
* **Defaults.** The node IP is the uplink's first IPv4 address, else the source address
  of the route to the first etcd endpoint (a UDP socket's ``connect``, which sends
  nothing), or ``--node-ip``. The VTEP MAC is the one the daemon gives ``start``: with
  ``--uplink`` (cluster mode implies VXLAN, which needs it) the NIC's own MAC, which the
  host port takes over and ``vswitch.daemon.vxlan`` programs as the datapath's VTEP MAC
  (unique per node); without an uplink, a locally administered MAC made from the node
  name (``0e:`` + 5 bytes of its SHA-256): the host port's default MAC comes from the
  switch name, the same ``vsw0`` on every node, and a VTEP MAC must be unique (a Linux
  peer's FDB is keyed by it).
* **Leaving.** A clean stop with pods still attached keeps the lease (the keys expire
  after the TTL unless the daemon is back sooner, re-claiming the same subnet); with no
  pod left it revokes the lease, so the others forget the node at once.

The peers seam: ``_apply_peers`` is the single place a new peer list arrives (loop thread).
It records and counts it, refuses the peers that cannot be routed to (below), and hands the
rest to the daemon's VXLAN peer table, ``Vxlan.replace("cluster", [dicts of name, node_ip,
pod_cidrs, vtep_mac])`` (``vswitch.daemon.vxlan``; set by ``attach_vxlan``): that source's
set is replaced, the datapath's remote-node table follows. Cluster mode implies VXLAN (the
daemon turns it on; it needs ``--uplink``), so the VTEP MAC announced in the record is the
one the datapath's VTEP uses (``start(vtep_mac)``).
A record is untrusted input (anyone with write access to the prefix can put one there), so
a peer is **refused** - left out, logged once per (name, revision), counted
(``peers_refused``) - when its node IP is not IPv4 (the VTEP is IPv4), a pod CIDR lies
outside the cluster CIDR of its family, overlaps one of this node's subnets, or overlaps a
CIDR of a peer accepted before it (the older record, by etcd ``mod_revision``, keeps it:
the subnet keys make a well-behaved node's subnet unique, so only a forged or stale record
collides). If the VXLAN table still refuses the list (``ValueError``), the previous table
stays (fail static) and the error is logged and counted (``peer_errors``).
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import threading
import time
import urllib.parse

from vswitch import rpc
from vswitch.rpc import RpcError

FATAL_EXIT_STATUS = 3
START_WAIT_S = 2.0          # how long start waits for a first answer (a fatal error shows at once)


def endpoint_host_port(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    if not u.hostname:
        raise ValueError(f"etcd endpoint {url!r} is not a URL like http://10.0.0.5:2379")
    return u.hostname, u.port or (443 if u.scheme == "https" else 2379)


def node_mac(node_name: str) -> str:
    """A locally administered unicast MAC of the node name (stable, distinct per name)."""
    h = hashlib.sha256(node_name.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x0e, *h[:5]))


def route_source(url: str) -> str:
    """The source address the kernel would use towards ``url``'s host (nothing is sent)."""
    host, port = endpoint_host_port(url)
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return s.getsockname()[0]


class ClusterConfig:
    """The cluster flags, checked before anything starts (a bad value: ValueError naming it)."""

    def __init__(self, cluster_cidrs: str, node_subnet_size: str, etcd_endpoints: str, node_name: str,
                 node_ip: str | None = None, etcd_ca: str | None = None, etcd_cert: str | None = None,
                 etcd_key: str | None = None, prefix: str | None = None, lease_ttl_s: int | None = None):
        # subnets and records are pure (no etcd client): safe to import for validation
        from vswitch.cluster import records
        from vswitch.cluster.subnets import ClusterSpec
        self.spec = ClusterSpec.parse(cluster_cidrs, node_subnet_size)
        self.cluster_cidrs = [str(f.cluster_cidr) for f in self.spec.families]
        self.node_subnet_size = [f.node_prefix for f in self.spec.families]
        eps = [e.strip() for e in (etcd_endpoints or "").split(",") if e.strip()]
        if not eps:
            raise ValueError("--etcd-endpoints: give one or more etcd client URLs, like "
                             "http://10.0.0.5:2379,http://10.0.0.6:2379")
        for e in eps:
            if urllib.parse.urlsplit(e).scheme not in ("http", "https"):
                raise ValueError(f"--etcd-endpoints: {e!r} is not accepted: an http:// or https:// URL")
            endpoint_host_port(e)
        self.etcd_endpoints = eps
        self.node_name = records.check_node_name(node_name)
        self.node_ip = records.check_ip(node_ip) if node_ip else None
        tls = [etcd_ca, etcd_cert, etcd_key]
        if any(tls) and not (etcd_cert and etcd_key or etcd_ca and not etcd_cert and not etcd_key):
            raise ValueError("--etcd-cert and --etcd-key go together (with or without --etcd-ca)")
        for f in tls:
            if f and not os.path.isfile(f):
                raise ValueError(f"TLS file {f!r} does not exist")
        self.etcd_ca, self.etcd_cert, self.etcd_key = etcd_ca, etcd_cert, etcd_key
        self.prefix = prefix
        self.lease_ttl_s = lease_ttl_s


class ClusterMode:
    """The membership of a running daemon; see the module docstring."""

    def __init__(self, conf: ClusterConfig, state, log):
        self.conf = conf
        self.state = state
        self.log = log
        self.membership = None
        self._wake_fd: int | None = None
        self._lock = threading.Lock()
        self._leave: threading.Thread | None = None     # begin_leave's thread
        self._closed = False
        self._new_subnets: tuple[str, ...] | None = None
        self._new_peers: list | None = None
        self._fatal: Exception | None = None
        self._write_pending = False
        self.node_ip: str | None = None
        self.vtep_mac: str | None = None
        # the peer table as the daemon holds it (what _apply_peers was last given)
        self.peers: dict[str, dict] = {}
        self.peer_updates = 0       # peer lists applied
        self.peers_joined = 0
        self.peers_left = 0
        self.peers_refused = 0      # peers left out of the VXLAN table (see the module docstring)
        self.peer_errors = 0        # peer lists the VXLAN table refused (the previous one kept)
        self.refused: dict[str, str] = {}     # peer name -> why it was left out (last list)
        self._refusals_logged: set[tuple[str, int]] = set()
        self.vxlan = None           # vswitch.daemon.vxlan.Vxlan (attach_vxlan)

    # ------------------------------------------------------------------ start / stop

    def attach_vxlan(self, vxlan) -> None:
        """The daemon's VXLAN peer table: every peer list from now on is programmed into it
        (``vxlan.replace("cluster", peers)``, on the loop thread); the last list, if one
        arrived before, is programmed at once."""
        self.vxlan = vxlan
        if self.peers:
            self._program(list(self.peers.values()))

    def start(self, vtep_mac: str | None) -> None:
        """Start the membership (threads; returns at once). Raises SystemExit on a value
        etcd is never asked about (e.g. no route to the endpoint to take a node IP from)."""
        from vswitch.cluster.membership import DEFAULT_LEASE_TTL_S, DEFAULT_PREFIX, Membership
        c = self.conf
        self.node_ip = c.node_ip or self._default_node_ip()
        self.vtep_mac = vtep_mac = vtep_mac or node_mac(c.node_name)
        saved = self.state.cluster or {}
        previous = saved.get("subnets", []) if saved.get("node_name") == c.node_name else []
        self.membership = Membership(
            cluster_cidrs=c.cluster_cidrs, node_subnet_size=c.node_subnet_size, node_name=c.node_name,
            node_ip=self.node_ip, vtep_mac=vtep_mac, etcd_endpoints=c.etcd_endpoints,
            etcd_ca=c.etcd_ca, etcd_cert=c.etcd_cert, etcd_key=c.etcd_key,
            prefix=c.prefix or DEFAULT_PREFIX, lease_ttl_s=c.lease_ttl_s or DEFAULT_LEASE_TTL_S,
            previous_subnets=previous, on_peers=self._on_peers, on_subnets=self._on_subnets,
            on_fatal=self._on_fatal)
        self.log("cluster_start", node=c.node_name, node_ip=self.node_ip, vtep_mac=vtep_mac,
                 cluster_cidrs=c.cluster_cidrs, endpoints=c.etcd_endpoints, previous_subnets=previous)
        self.membership.start()

    def _default_node_ip(self) -> str:
        up = self.state.uplink or {}
        for a in up.get("addresses", []):
            ip = ipaddress.ip_interface(a).ip
            if ip.version == 4:
                return str(ip)
        try:
            return route_source(self.conf.etcd_endpoints[0])
        except OSError as exc:
            raise SystemExit(f"vswitchd: cluster: no node IP: no uplink IPv4 and no route to "
                             f"{self.conf.etcd_endpoints[0]} ({exc}); give --node-ip") from None

    def wait_start(self, timeout_s: float = START_WAIT_S) -> None:
        """Give registration a moment: a fatal answer (full cluster CIDR) stops the start
        (SystemExit); no answer (etcd down) does not: the daemon runs without a lease.
        With an uplink (always, in cluster mode with VXLAN) nothing is waited for: the node's
        address is on the host port, so its packets to etcd cross the switch, which forwards
        only once the loop runs (waiting would only cost the request timeout); a fatal
        answer then stops the running daemon from the loop (``service``: exit status 3)."""
        from vswitch.cluster.membership import MembershipError
        if self.state.uplink:
            timeout_s = 0.0
        if timeout_s <= 0:
            with self._lock:
                fatal = self._fatal
            if fatal is not None:
                raise SystemExit(f"vswitchd: cluster: {fatal}")
            return
        try:
            self.membership.wait_registered(timeout_s)
        except MembershipError as exc:
            raise SystemExit(f"vswitchd: cluster: {exc}") from None
        except TimeoutError as exc:
            self.log("cluster_not_registered", level="warning", msg=str(exc))

    def set_wake(self, fd: int) -> None:
        """The eventfd that brings the loop back to Python (the control server's)."""
        self._wake_fd = fd
        self._wake()

    def begin_leave(self, pods_left: int) -> None:
        """Start leaving (close() in a thread) while the daemon's loop still forwards: the
        lease revoke reaches etcd through our own switch (vsw0 -> uplink), so it must be sent
        before the loop stops. The thread wakes the loop when it is done (leave_pending)."""
        if self._leave is not None or self.membership is None:
            return

        def leave():
            try:
                self.close(pods_left)
            finally:
                self._wake()
        self._leave = threading.Thread(target=leave, name="cluster-leave", daemon=True)
        self._leave.start()

    def leave_pending(self) -> bool:
        """begin_leave's thread still runs."""
        return self._leave is not None and self._leave.is_alive()

    def close(self, pods_left: int) -> None:
        with self._lock:
            if self.membership is None or self._closed:
                return
            self._closed = True
        revoke = pods_left == 0
        revoked = self.membership.close(revoke=revoke)
        self.log("cluster_stop", revoke=revoke, revoked=revoked, pods=pods_left)

    # ------------------------------------------------------------------ membership threads

    def _wake(self) -> None:
        fd = self._wake_fd
        if fd is not None:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    def _on_subnets(self, subnets) -> None:
        with self._lock:
            self._new_subnets = tuple(subnets)
        self._wake()

    def _on_peers(self, peers) -> None:
        with self._lock:
            self._new_peers = list(peers)
        self._wake()

    def _on_fatal(self, exc) -> None:
        with self._lock:
            self._fatal = exc
        self._wake()

    # ------------------------------------------------------------------ the loop thread

    def service(self, kernel_idle: bool) -> str | None:
        """Apply what the membership threads handed over; the fatal message, if any."""
        with self._lock:
            subnets, self._new_subnets = self._new_subnets, None
            peers, self._new_peers = self._new_peers, None
            fatal = self._fatal
        if subnets is not None:
            self.state.cluster = {"node_name": self.conf.node_name, "cluster_cidrs": self.conf.cluster_cidrs,
                                  "subnets": list(subnets)}
            self.log("cluster_lease", node=self.conf.node_name, subnets=list(subnets))
            self._write_pending = True
        if self._write_pending and kernel_idle and self.state.adopted:
            self.state.save()
            self._write_pending = False
        if peers is not None:
            self._apply_peers(peers)
        if fatal is not None:
            return f"cluster: {fatal}"
        return None

    def _apply_peers(self, peers) -> None:
        """The one place a new list of the other nodes (``vswitch.cluster.records.Peer``,
        sorted by name) arrives: recorded (``nodes``, ``status``, metrics), counted, and
        programmed into the VXLAN peer table (``_program``)."""
        now = time.time()
        new = {}
        for p in peers:
            old = self.peers.get(p.name)
            new[p.name] = {"name": p.name, "node_ip": p.node_ip, "vtep_mac": p.vtep_mac,
                           "pod_cidrs": list(p.pod_cidrs), "lease_id": f"{p.lease_id:x}",
                           "mod_revision": p.mod_revision,
                           "since": old["since"] if old else now}
        joined = sorted(set(new) - set(self.peers))
        left = sorted(set(self.peers) - set(new))
        self.peers = new
        self.peer_updates += 1
        self.peers_joined += len(joined)
        self.peers_left += len(left)
        self.log("cluster_peers", peers=len(new), joined=joined, left=left)
        self._program(list(new.values()))

    def usable_peers(self, peers: list[dict]) -> tuple[list[dict], dict[str, str]]:
        """``peers`` split into those that can be routed to and {name: why not} for the rest
        (the rules are in the module docstring)."""
        clusters = [ipaddress.ip_network(c) for c in self.conf.cluster_cidrs]
        taken = [ipaddress.ip_network(s) for s in self.subnets]       # ours first
        ok, refused = [], {}
        for p in sorted(peers, key=lambda p: (p.get("mod_revision", 0), p["name"])):
            why = None
            if ipaddress.ip_address(p["node_ip"]).version != 4:
                why = f"node IP {p['node_ip']} is not IPv4 (the VXLAN underlay is IPv4)"
            nets = [ipaddress.ip_network(c) for c in p["pod_cidrs"]]
            for n in nets:
                if why:
                    break
                fam = [c for c in clusters if c.version == n.version]
                if not fam or not n.subnet_of(fam[0]):
                    why = f"pod CIDR {n} is outside the cluster CIDR(s) {', '.join(self.conf.cluster_cidrs)}"
                    break
                clash = next((t for t in taken if t.version == n.version and t.overlaps(n)), None)
                if clash is not None:
                    whose = "this node's subnet" if str(clash) in self.subnets else "an older peer's CIDR"
                    why = f"pod CIDR {n} overlaps {whose} {clash}"
            if why:
                refused[p["name"]] = why
                continue
            taken.extend(nets)
            ok.append(p)
        return sorted(ok, key=lambda p: p["name"]), refused

    def _program(self, peers: list[dict]) -> None:
        usable, refused = self.usable_peers(peers)
        self.refused = refused
        for name, why in refused.items():
            key = (name, next((p.get("mod_revision", 0) for p in peers if p["name"] == name), 0))
            if key not in self._refusals_logged:
                self._refusals_logged.add(key)
                self.peers_refused += 1
                self.log("cluster_peer_refused", level="warning", peer=name, why=why)
        if self.vxlan is None:
            return
        try:
            self.vxlan.replace("cluster", [{"name": p["name"], "node_ip": p["node_ip"],
                                            "pod_cidrs": list(p["pod_cidrs"]), "vtep_mac": p["vtep_mac"]}
                                           for p in usable])
        except ValueError as exc:
            self.peer_errors += 1
            self.log("cluster_peers_refused", level="error", msg=str(exc), peers=[p["name"] for p in usable])

    # ------------------------------------------------------------------ the ops

    @property
    def subnets(self) -> tuple[str, ...]:
        return self.membership.subnets if self.membership is not None else ()

    def op_pod_cidr(self, req) -> dict:
        """The node's leased subnets (IPv4 first), or code 11 while there is none."""
        subnets = self.subnets
        if not subnets:
            st = self.membership.status() if self.membership is not None else {}
            raise RpcError(rpc.E_TRY_AGAIN, f"node {self.conf.node_name} holds no subnet lease yet "
                                            f"(etcd connected: {st.get('connected')}); try again later",
                           str(st.get("last_error") or st.get("fatal") or ""))
        return {"pod_cidrs": list(subnets), "node_name": self.conf.node_name,
                "cluster_cidrs": self.conf.cluster_cidrs}

    def status(self) -> dict:
        st = self.membership.status() if self.membership is not None else {}
        return {"node_name": self.conf.node_name, "node_ip": self.node_ip, "vtep_mac": self.vtep_mac,
                "cluster_cidrs": self.conf.cluster_cidrs, "node_subnet_size": self.conf.node_subnet_size,
                "etcd_endpoints": self.conf.etcd_endpoints, "connected": st.get("connected", False),
                "since": st.get("since"), "registered": st.get("registered", False),
                "pod_cidrs": st.get("subnets", []), "lease_id": f"{st.get('lease_id', 0):x}",
                "lease_ttl_s": st.get("lease_ttl_s", 0), "last_revision": st.get("last_revision", 0),
                "peers": len(self.peers), "peer_updates": self.peer_updates,
                "peers_joined": self.peers_joined, "peers_left": self.peers_left,
                "peers_refused": self.peers_refused, "peer_errors": self.peer_errors,
                "refused": dict(self.refused), "registrations": st.get("registrations", 0), "relists": st.get("relists", 0),
                "ignored_records": st.get("ignored_records", 0), "last_error": st.get("last_error"),
                "fatal": st.get("fatal")}

    def op_nodes(self, req) -> dict:
        st = self.status()
        me = {"name": self.conf.node_name, "node_ip": self.node_ip, "vtep_mac": self.vtep_mac,
              "pod_cidrs": st["pod_cidrs"], "lease_id": st["lease_id"], "lease_ttl_s": st["lease_ttl_s"],
              "self": True}
        nodes = [me] + [dict(p, self=False) for p in sorted(self.peers.values(), key=lambda p: p["name"])]
        return {"cluster": st, "nodes": nodes}

    def metrics_lines(self) -> list[str]:
        st = self.status()
        out = []

        def gauge(name, help_, value, labels=""):
            out.extend([f"# HELP vswitch_cluster_{name} {help_}", f"# TYPE vswitch_cluster_{name} gauge",
                        f"vswitch_cluster_{name}{labels} {value}"])

        def counter(name, help_, value):
            out.extend([f"# HELP vswitch_cluster_{name}_total {help_}",
                        f"# TYPE vswitch_cluster_{name}_total counter", f"vswitch_cluster_{name}_total {value}"])

        gauge("connected", "1 while etcd answers (lease kept alive and watch running).", int(bool(st["connected"])))
        gauge("connected_since_seconds", "Unix time of the last connected/disconnected change.",
              f"{st['since'] or 0:.3f}")
        gauge("registered", "1 once this node holds its subnet lease.", int(bool(st["registered"])))
        gauge("lease_ttl_seconds", "The lease TTL etcd gave at the last keep-alive.", st["lease_ttl_s"])
        gauge("last_revision", "The last etcd revision of the node records seen.", st["last_revision"])
        gauge("peers", "Other nodes known.", st["peers"])
        counter("peer_updates", "Peer lists applied.", st["peer_updates"])
        counter("peers_joined", "Nodes that appeared.", st["peers_joined"])
        counter("peers_left", "Nodes that disappeared.", st["peers_left"])
        counter("peers_refused", "Peer records left out of the VXLAN table (overlapping or foreign CIDRs).",
                st["peers_refused"])
        counter("peer_errors", "Peer lists the VXLAN table refused (the previous table was kept).",
                st["peer_errors"])
        counter("registrations", "Registrations with etcd (the first and every re-registration).",
                st["registrations"])
        counter("relists", "Full listings of the node records.", st["relists"])
        counter("ignored_records", "Node records ignored as invalid.", st["ignored_records"])
        out.append("# HELP vswitch_cluster_node_info This node and every known peer (value 1).")
        out.append("# TYPE vswitch_cluster_node_info gauge")
        for n in self.op_nodes(None)["nodes"]:
            out.append(f'vswitch_cluster_node_info{{node="{n["name"]}",node_ip="{n["node_ip"]}",'
                       f'vtep_mac="{n["vtep_mac"]}",pod_cidrs="{",".join(n["pod_cidrs"])}",'
                       f'self="{str(n["self"]).lower()}"}} 1')
        return out
