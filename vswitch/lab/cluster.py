"""Several nodes on one underlay, in network namespaces of this machine: the multi-node lab.

Theory of operation
-------------------
An :class:`Underlay` is one namespace holding a Linux bridge (``br0``), the L2 segment
the nodes share, like the top-of-rack network of a real cluster. Each node namespace is
attached by one veth: ``eth0`` in the node (its underlay IPv4 address from the underlay
range, 10.200.0.0/24 by default; host part = the node's index) and ``n<index>`` on the
bridge. A bridge, not a veth mesh, because it takes N veths for N nodes instead of
N(N-1)/2 and N addresses per node, every node is one ARP away from every other as on a
real L2 segment, and each node's port is one place where a test captures everything the
node puts on the wire (:meth:`Underlay.capture`). The MTU (1500 by default) is set on
every underlay link; pods get that minus the 50 bytes of VXLAN (outer Ethernet 14 +
IPv4 20 + UDP 8 + VXLAN 8), as flannel does.

A node is anything with the interface of :class:`Node`: a namespace ``ns``, its
``underlay_ip``, a pod subnet ``pod_cidr`` (``10.244.<index>.0/24`` of the cluster CIDR
10.244.0.0/16 by default, flannel's default network), the pods' gateway (``.1``), the
VTEP's overlay address ``vtep_ip`` and MAC ``vtep_mac``, ``pods`` with ``add_pod`` and
``pod_ip(i)``, and ``add_peer``/``remove_peer`` for every other node. Two kinds:

- :class:`KernelNode` is built the way flannel's VXLAN backend (``pkg/backend/vxlan``,
  ``device.go`` and ``vxlan_network.go``) and its CNI delegate (the reference ``bridge``
  plugin) build a Linux node: a ``vxlan`` device ``flannel.<VNI>`` (``id VNI dev eth0
  local <underlay IP> dstport PORT nolearning``, a random locally administered MAC, MTU =
  underlay MTU - 50, IPv6 router advertisements off) holding the subnet's network address
  as ``/32`` (the VTEP IP: 10.244.1.0/32); a bridge ``cni0`` holding the gateway
  ``.1/24``, with a veth per pod (``eth0`` in the pod's namespace, the next free address,
  a default route via the gateway); IPv4 forwarding on. For each remote node, in
  flannel's order: one neighbour (remote VTEP IP -> remote VTEP MAC, ``nud permanent``
  on the vxlan device), one FDB entry (remote VTEP MAC -> ``dst`` remote underlay IP,
  ``self permanent``), and then one route (remote pod CIDR ``via`` remote VTEP IP
  ``dev flannel.<VNI> onlink``); removal deletes all three, going on past a failure.
  The destination port is a parameter: flannel's default on Linux is the kernel's 8472;
  ours is the IANA 4789 (RFC 7348) that issue 13 uses.
- :class:`VswitchNode` runs ``lab.Daemon`` in the node namespace with ``--uplink eth0``
  (the underlay address moves to the host port ``vsw0``) and attaches pods through the
  vswitch CNI plugin (``lab.CniChain``, host-local IPAM on the node's pod subnet, pod MTU
  = underlay MTU - 50). Its peers wiring waits for the datapath's VXLAN (issue 13.1) and
  the daemon's ``--vtep`` options and ``peers`` control op (issue 13.2): until then its
  ``add_peer``/``remove_peer`` and ``vtep_mac`` raise ``NotImplementedError`` saying so.

A :class:`Cluster` builds an underlay and N nodes of one kind (or a list of kinds) with
pods on each, and wires every pair as peers; as a context manager it removes everything
in every outcome, also when building fails half-way: daemons are stopped by the PIDs we
started, then every namespace we made is deleted, which takes the veths, bridges and vxlan
devices inside with it. Veth ends are created directly in their namespaces
(``lab.veth``), so nothing of ours ever exists in the caller's namespace.

Needs root, iproute2 (``ip``, ``bridge``), and for :meth:`Underlay.capture` tcpdump.
Imports no pytest and no scapy.
"""
from __future__ import annotations

import ipaddress
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vswitch import lab

DEFAULT_UNDERLAY_CIDR = "10.200.0.0/24"
DEFAULT_CLUSTER_CIDR = "10.244.0.0/16"        # flannel's default network
DEFAULT_NODE_PREFIX = 24                     # flannel's default SubnetLen
DEFAULT_MTU = 1500
DEFAULT_VNI = 1                              # flannel's default
IANA_VXLAN_PORT = 4789                       # RFC 7348; flannel on Linux: the kernel's 8472
#: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8 (flannel's ``encapOverhead``)
VXLAN_OVERHEAD_BYTES = 50
UNDERLAY_IFNAME = "eth0"
POD_IFNAME = "eth0"
BRIDGE_NAME = "cni0"
MAX_VNI = 2 ** 24 - 1


def _check_int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r}: accepted is an integer {lo}..{hi}")
    return value


def random_vtep_mac() -> str:
    """A random locally administered unicast MAC, as flannel's ``mac.NewHardwareAddr``."""
    b = bytearray(random.getrandbits(8) for _ in range(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _ip_batch(ns: str, lines, tool: str = "ip") -> None:
    """Runs ``lines`` through ``ip -batch`` (or ``bridge -batch``) inside ``ns``: one process
    for many commands; the first failing line raises with its error."""
    text = "".join(line + "\n" for line in lines)
    if text:
        lab.sh(tool, "-n", ns, "-batch", "-", input=text)


@dataclass
class Pod:
    """A pod of a cluster node: its namespace, IPv4 address, interface and node's name."""
    name: str
    ns: str
    ip: str
    node: str
    ifname: str = POD_IFNAME
    container_id: str | None = None   # VswitchNode: the CNI container id
    result: dict | None = None         # VswitchNode: the CNI ADD result


# --------------------------------------------------------------------------- underlay


class Underlay:
    """A namespace with a Linux bridge; nodes attach by veth (``attach``)."""

    def __init__(self, cidr: str = DEFAULT_UNDERLAY_CIDR, mtu: int = DEFAULT_MTU,
                 prefix: str = "cu"):
        try:
            self.net = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise ValueError(f"underlay cidr={cidr!r}: accepted is an IPv4 network with prefix "
                             f"like 10.200.0.0/24 ({exc})") from None
        if self.net.num_addresses < 4:
            raise ValueError(f"underlay cidr={cidr!r}: too small, accepted is a prefix of /30 or "
                             f"shorter")
        self.mtu = _check_int("mtu", mtu, 68 + VXLAN_OVERHEAD_BYTES, 65535)
        self.nss = lab.Namespaces(prefix)
        self.ns: str | None = None
        self.ports: dict[str, str] = {}          # node name -> bridge port ifname

    def open(self) -> "Underlay":
        try:
            self.ns = self.nss.new("u")
            _ip_batch(self.ns, [f"link add br0 mtu {self.mtu} type bridge",
                                "link set br0 up"])
        except BaseException:
            self.close()
            raise
        return self

    def address(self, host: int) -> str:
        """The underlay address of host number ``host`` (1 = the first usable address)."""
        if not 1 <= host < self.net.num_addresses - 1:
            raise ValueError(f"host {host}: accepted is 1..{self.net.num_addresses - 2} in "
                             f"{self.net}")
        return str(self.net.network_address + host)

    def attach(self, node_name: str, node_ns: str, host: int) -> str:
        """A veth from the bridge to ``node_ns`` (``eth0`` there, up, MTU set, with the
        address of host ``host``); returns that address."""
        ip = self.address(host)
        port = f"n{host}"
        lab.veth(node_ns, UNDERLAY_IFNAME, f"{ip}/{self.net.prefixlen}", self.ns, port, None,
                 mtu=self.mtu)
        lab.nsexec(self.ns, "ip", "link", "set", port, "master", "br0")
        self.ports[node_name] = port
        return ip

    def capture(self, node: "Node", path, bpf: str = "", snaplen_bytes: int = 0) -> "Capture":
        """tcpdump on ``node``'s bridge port (everything the node sends or receives on the
        underlay) into the pcap ``path``, filtered by ``bpf``; a context manager.
        ``snaplen_bytes``: bytes kept per frame (0: all, up to 256 KiB; each frame then
        takes that much of tcpdump's 16 MiB buffer, so a fast flow is captured completely
        only with a snaplen near the MTU)."""
        return Capture(self.ns, self.ports[node.name], path, bpf, snaplen_bytes)

    def close(self) -> None:
        self.nss.cleanup()

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


class Capture:
    """tcpdump writing ``path`` inside ``ns`` on ``ifname`` while the ``with`` block runs.

    Entering returns once tcpdump listens. Leaving waits until the file has stopped
    growing (tcpdump has read what the kernel queued for it: it writes each packet at once,
    ``-U``), then stops it (SIGTERM to the PID we started: ``ip netns exec`` execs
    tcpdump); ``dropped`` is then what tcpdump reports the kernel dropped (0 for a
    complete capture)."""

    def __init__(self, ns: str, ifname: str, path, bpf: str = "", snaplen_bytes: int = 0):
        if shutil.which("tcpdump") is None:
            raise RuntimeError("tcpdump is not installed (Debian package tcpdump)")
        self.ns, self.ifname, self.path, self.bpf = ns, ifname, str(path), bpf
        self.snaplen_bytes = _check_int("snaplen_bytes", snaplen_bytes, 0, 262144)
        self.proc: subprocess.Popen | None = None
        self.stderr = ""
        self.dropped: int | None = None

    def __enter__(self):
        args = ["tcpdump", "-i", self.ifname, "-n", "-U", "--immediate-mode",
                "-s", str(self.snaplen_bytes), "-B", "16384", "-w", self.path]
        if self.bpf:
            args.append(self.bpf)
        self.proc = lab.nspopen(self.ns, *args, stdout=subprocess.DEVNULL)
        line = self.proc.stderr.readline()        # "listening on ..." once the socket is bound
        if "listening on" not in line:
            self._stop()
            raise RuntimeError(f"tcpdump on {self.ifname} in {self.ns} did not start: "
                               f"{line}{self.stderr}")
        return self

    def _settle(self, quiet_s=0.5, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        last = -1
        while time.monotonic() < deadline and self.proc.poll() is None:
            size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
            if size == last:
                return
            last = size
            time.sleep(quiet_s)

    def _stop(self):
        if self.proc.poll() is None:
            self._settle()
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.stderr = err or ""
        m = re.search(r"(\d+) packets? dropped by kernel", self.stderr)
        self.dropped = int(m.group(1)) if m else None

    def __exit__(self, *exc):
        self._stop()


# --------------------------------------------------------------------------- nodes


class Node:
    """What every node of a cluster offers; see the module docstring.

    Attributes set by every kind: ``name`` (``n<index>``), ``index``, ``ns`` (the node
    namespace), ``underlay_ip``, ``pod_cidr``, ``gateway_ip``, ``vtep_ip``, ``vni``,
    ``port`` (UDP destination port), ``mtu`` (underlay) and ``pod_mtu``, ``pods`` (list of
    :class:`Pod`), ``peers`` (name -> node)."""

    kind = "abstract"

    def __init__(self, underlay: Underlay, index: int, *, pod_cidr: str | None, vni: int = DEFAULT_VNI,
                 port: int = IANA_VXLAN_PORT):
        self.underlay = underlay
        self.index = _check_int("index", index, 1, 253)
        self.name = f"n{index}"
        self.vni = _check_int("vni", vni, 0, MAX_VNI)
        self.port = _check_int("port", port, 1, 65535)
        # pod_cidr None: leased at open (a node in cluster mode, vswitch.lab.etcdns)
        self.pod_net = self.pod_cidr = self.gateway_ip = self.vtep_ip = None
        if pod_cidr is not None:
            self._set_pod_cidr(pod_cidr)
        self.mtu = underlay.mtu
        self.pod_mtu = underlay.mtu - VXLAN_OVERHEAD_BYTES
        self.nss = lab.Namespaces(f"c{self.kind[0]}")
        self.ns: str | None = None
        self.underlay_ip: str | None = None
        self.pods: list[Pod] = []
        self.peers: dict[str, Node] = {}

    def _set_pod_cidr(self, pod_cidr: str) -> None:
        try:
            self.pod_net = ipaddress.IPv4Network(pod_cidr, strict=True)
        except ValueError as exc:
            raise ValueError(f"pod_cidr={pod_cidr!r}: accepted is an IPv4 network with prefix "
                             f"like 10.244.1.0/24 ({exc})") from None
        if self.pod_net.prefixlen > 29:
            raise ValueError(f"pod_cidr={pod_cidr!r}: accepted is a prefix of /29 or shorter")
        self.pod_cidr = str(self.pod_net)
        self.gateway_ip = str(self.pod_net.network_address + 1)
        # flannel puts the subnet's network address on the vxlan device as /32: the VTEP IP,
        # the next hop of the other nodes' routes to this subnet
        self.vtep_ip = str(self.pod_net.network_address)

    # -- the interface
    # (each kind implements these; the base class only names them)
    @property
    def vtep_mac(self) -> str:
        raise NotImplementedError(f"{type(self).__name__}.vtep_mac")

    def open(self) -> "Node":
        raise NotImplementedError(f"{type(self).__name__}.open")

    def add_pod(self, name: str | None = None) -> Pod:
        raise NotImplementedError(f"{type(self).__name__}.add_pod")

    def add_peer(self, peer: "Node") -> None:
        raise NotImplementedError(f"{type(self).__name__}.add_peer")

    def remove_peer(self, peer: "Node") -> None:
        raise NotImplementedError(f"{type(self).__name__}.remove_peer")

    def close(self) -> None:
        self.pods.clear()
        self.peers.clear()
        self.underlay.ports.pop(self.name, None)      # its veth goes with the namespace
        self.nss.cleanup()

    # -- shared
    def pod_ip(self, i: int) -> str:
        """The IPv4 address of this node's ``i``-th pod (0-based, in the order added)."""
        return self.pods[i].ip

    def wire_size_segments(self, on: bool = True) -> None:
        """``on``: every frame this node sends on the underlay is wire-size, as a NIC puts
        TSO segments on a cable (``gso_max_segs 1`` on its ``eth0``: the kernel segments
        in software before the veth); off (the default, 65535): GSO packets of up to 64 KiB
        cross the veth whole, which is faster and what the benchmarks measure."""
        lab.nsexec(self.ns, "ip", "link", "set", UNDERLAY_IFNAME, "gso_max_segs",
                   1 if on else 65535)

    def _open_node_ns(self) -> None:
        self.ns = self.nss.new(f"{self.index}n")
        self.underlay_ip = self.underlay.attach(self.name, self.ns, self.index)

    def _pod_name(self, name):
        return name or f"{self.name}p{len(self.pods)}"

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"<{type(self).__name__} {self.name} ns={self.ns} underlay={self.underlay_ip} "
                f"pods={self.pod_cidr} vtep={self.vtep_ip}>")


class KernelNode(Node):
    """A node built as flannel's VXLAN backend builds it with the Linux kernel."""

    kind = "kernel"

    def __init__(self, underlay: Underlay, index: int, *, pod_cidr: str, vni: int = DEFAULT_VNI,
                 port: int = IANA_VXLAN_PORT, vtep_mac: str | None = None):
        super().__init__(underlay, index, pod_cidr=pod_cidr, vni=vni, port=port)
        name = f"flannel.{self.vni}"
        self.vxlan_dev = name if len(name) <= 15 else f"vxlan{self.vni}"   # IFNAMSIZ
        self._vtep_mac = vtep_mac or random_vtep_mac()
        self._next_host = 2

    @property
    def vtep_mac(self) -> str:
        return self._vtep_mac

    def open(self) -> "KernelNode":
        try:
            self._open_node_ns()
            dev, ns = self.vxlan_dev, self.ns
            _ip_batch(ns, [
                # flannel's newVXLANDevice: id, dev, local, dstport, nolearning, MAC, MTU - 50
                f"link add {dev} address {self._vtep_mac} mtu {self.pod_mtu} type vxlan "
                f"id {self.vni} dev {UNDERLAY_IFNAME} local {self.underlay_ip} "
                f"dstport {self.port} nolearning",
                # configureDeviceIPv4: the subnet's network address as /32, then up
                f"addr add {self.vtep_ip}/32 dev {dev}",
                f"link set {dev} up",
                # the CNI bridge (flannel delegates to the bridge plugin: cni0, isGateway)
                f"link add {BRIDGE_NAME} mtu {self.pod_mtu} type bridge",
                f"addr add {self.gateway_ip}/{self.pod_net.prefixlen} dev {BRIDGE_NAME}",
                f"link set {BRIDGE_NAME} up",
            ])
            lab.nsexec(ns, "sysctl", "-qw", f"net/ipv6/conf/{dev}/accept_ra=0",
                       "net.ipv4.ip_forward=1")
            got = lab.nsexec(ns, "cat", f"/sys/class/net/{dev}/address").stdout.strip()
            if got != self._vtep_mac.lower():
                raise RuntimeError(f"{dev} in {ns} has MAC {got}, wanted {self._vtep_mac}")
        except BaseException:
            self.close()
            raise
        return self

    def add_pod(self, name: str | None = None) -> Pod:
        """A pod namespace with ``eth0`` on a veth to ``cni0``, the next free address of
        the pod subnet and a default route via the gateway."""
        host = self._next_host
        if host >= self.pod_net.num_addresses - 1:
            raise RuntimeError(f"pod subnet {self.pod_cidr} of {self.name} is full")
        self._next_host += 1
        ip = str(self.pod_net.network_address + host)
        ns = self.nss.new(f"{self.index}p")
        try:
            host_end = f"veth{host}"
            lab.veth(ns, POD_IFNAME, f"{ip}/{self.pod_net.prefixlen}", self.ns, host_end, None,
                     mtu=self.pod_mtu)
            _ip_batch(self.ns, [f"link set {host_end} master {BRIDGE_NAME}"])
            _ip_batch(ns, [f"route add default via {self.gateway_ip} dev {POD_IFNAME}"])
        except BaseException:
            self.nss.delete(ns)
            raise
        pod = Pod(self._pod_name(name), ns, ip, self.name)
        self.pods.append(pod)
        return pod

    def add_peer(self, peer: Node) -> None:
        """flannel's lease-added handling: neighbour, FDB entry, then route (``replace``:
        adding a peer twice leaves one of each)."""
        if peer is self:
            raise ValueError(f"{self.name} cannot be its own peer")
        dev = self.vxlan_dev
        _ip_batch(self.ns, [f"neigh replace {peer.vtep_ip} lladdr {peer.vtep_mac} dev {dev} "
                            f"nud permanent"])
        _ip_batch(self.ns, [f"fdb replace {peer.vtep_mac} dev {dev} dst {peer.underlay_ip} "
                            f"self permanent"], tool="bridge")
        _ip_batch(self.ns, [f"route replace {peer.pod_cidr} via {peer.vtep_ip} dev {dev} onlink"])
        self.peers[peer.name] = peer

    def remove_peer(self, peer: Node) -> None:
        """flannel's lease-removed handling: delete the neighbour, the FDB entry and the
        route, going on past a failure; raises the failures afterwards (an entry that is
        already gone is not a failure)."""
        dev = self.vxlan_dev
        errors = []
        for tool, cmd in (("ip", ["neigh", "del", peer.vtep_ip, "dev", dev]),
                          ("bridge", ["fdb", "del", peer.vtep_mac, "dev", dev, "dst",
                                      peer.underlay_ip, "self"]),
                          ("ip", ["route", "del", peer.pod_cidr, "via", peer.vtep_ip, "dev", dev])):
            r = lab.sh(tool, "-n", self.ns, *cmd, check=False)
            if r.returncode != 0 and not any(s in r.stderr for s in
                                             ("No such", "not found", "Cannot find")):
                errors.append(f"{tool} {' '.join(cmd)}: {r.stderr.strip()}")
        self.peers.pop(peer.name, None)
        if errors:
            raise RuntimeError(f"{self.name}: removing peer {peer.name}: " + "; ".join(errors))

    def forwarding_state(self) -> dict:
        """What the kernel holds for the peers, as text lines: ``routes`` (via the vxlan
        device), ``neighbours`` (permanent, on it) and ``fdb`` (its entries with a ``dst``)."""
        dev = self.vxlan_dev
        routes = lab.sh("ip", "-n", self.ns, "-4", "route", "show", "dev", dev).stdout
        neigh = lab.sh("ip", "-n", self.ns, "-4", "neigh", "show", "dev", dev, "nud",
                       "permanent").stdout
        fdb = lab.sh("bridge", "-n", self.ns, "fdb", "show", "dev", dev).stdout
        return {"routes": [l for l in routes.splitlines() if " via " in l],
                "neighbours": [l for l in neigh.splitlines() if l.strip()],
                "fdb": [l for l in fdb.splitlines() if " dst " in l]}


class VswitchNode(Node):
    """A node running vswitchd with ``--uplink eth0``, pods attached through the CNI plugin.

    Works today: the node namespace on the underlay, vswitchd owning the underlay NIC (the
    node's underlay address moves to ``vsw0``, so the node still reaches the underlay
    through the switch), pods added by the vswitch CNI plugin through ``lab.CniChain``
    with host-local IPAM on ``pod_cidr`` and MTU ``pod_mtu``; pods reach each other, the
    gateway and the node's addresses.

    VXLAN (issue 13): the daemon runs with ``--vtep-vni VNI --vtep-port PORT`` (VXLAN on,
    the VTEP on the underlay address); ``vtep_mac`` is read from its ``status`` (the
    uplink NIC's MAC, which the host port takes over). ``add_peer``/``remove_peer`` keep
    this node's list of peers (name, underlay IP, pod CIDR, VTEP MAC) and send all of it
    with the ``peers`` op (``replace``: the daemon's *control* source, kept in its state
    file, so ``restart`` after a kill has them again); ``add_peer`` then waits until the
    daemon has resolved the peer's underlay MAC. An AF_PACKET socket cannot receive a
    UDP-tunnel GSO packet, so a :class:`KernelNode` peer is switched to wire-size
    segments (``wire_size_segments``: its ``eth0`` then segments before the veth, as a NIC
    puts TSO segments on a cable); vswitch nodes segment tunnel GSO themselves.
    ``WAITS_FOR`` is None: bench/bench_crossnode.py measures vswitch."""

    kind = "vswitch"
    WAITS_FOR = None
    RESOLVE_TIMEOUT_S = 10.0

    def __init__(self, underlay: Underlay, index: int, *, pod_cidr: str, vni: int = DEFAULT_VNI,
                 port: int = IANA_VXLAN_PORT, daemon_args=(), cni_path=lab.SYSTEM_CNI_PATH):
        super().__init__(underlay, index, pod_cidr=pod_cidr, vni=vni, port=port)
        self.daemon_args = tuple(daemon_args)
        self.cni_path = str(cni_path)
        self.workdir: Path | None = None
        self.daemon: lab.Daemon | None = None
        self.chain: lab.CniChain | None = None
        self._vtep_mac: str | None = None
        self.peer_records: dict[str, dict] = {}      # name -> what the peers op was given

    @property
    def vtep_mac(self) -> str:
        if self._vtep_mac is None:
            self._vtep_mac = self.daemon.call("status")["vxlan"]["vtep_mac"]
        return self._vtep_mac

    def open(self) -> "VswitchNode":
        try:
            if not os.access(os.path.join(self.cni_path, "host-local"), os.X_OK):
                raise RuntimeError(f"{self.cni_path}/host-local not found "
                                   f"(containernetworking-plugins)")
            self.workdir = Path(tempfile.mkdtemp(prefix=f"vswitch-{self.name}-{lab.uid()}-"))
            self._open_node_ns()
            self.daemon = lab.Daemon(self.ns, self.workdir / "vswitchd",
                                     ["--uplink", UNDERLAY_IFNAME, "--vtep-vni", str(self.vni),
                                      "--vtep-port", str(self.port), *self.daemon_args])
            self.daemon.start(timeout_s=30)
            from vswitch_cni.install import install
            bin_dir = self.workdir / "bin"
            install(str(bin_dir), str(self.workdir / "net.d"), socket_path=self.daemon.socket)
            ipam = {"type": "host-local", "dataDir": str(self.workdir / "ipam"),
                    "ranges": [[{"subnet": self.pod_cidr, "gateway": self.gateway_ip}]],
                    "routes": [{"dst": "0.0.0.0/0"}]}
            plugin = {"type": "vswitch", "socket": self.daemon.socket, "mtu": self.pod_mtu,
                      "ipam": ipam}
            self.chain = lab.CniChain({"cniVersion": "1.0.0", "name": f"cluster-{self.name}",
                                       "plugins": [plugin]}, cni_path=(bin_dir, self.cni_path))
        except BaseException:
            self.close()
            raise
        return self

    def add_pod(self, name: str | None = None) -> Pod:
        """A pod namespace ADDed through the vswitch CNI plugin (a TAP ``eth0``)."""
        ns = self.nss.new(f"{self.index}p")
        cid = f"cluster-{ns}"
        try:
            result = self.chain.add(cid, lab.Namespaces.path(ns), POD_IFNAME)
        except BaseException:
            self.nss.delete(ns)
            raise
        ip = next((i["address"].split("/")[0] for i in (result or {}).get("ips", [])
                   if "." in i.get("address", "")), None)
        if ip is None:
            self.nss.delete(ns)
            raise RuntimeError(f"CNI ADD on {self.name} returned no IPv4 address: {result!r:.300}")
        pod = Pod(self._pod_name(name), ns, ip, self.name, container_id=cid, result=result)
        self.pods.append(pod)
        return pod

    @staticmethod
    def peer_record(peer: Node) -> dict:
        """``peer`` as the ``peers`` op and the ``--peers`` file take it."""
        return {"name": peer.name, "node_ip": peer.underlay_ip, "pod_cidrs": [peer.pod_cidr],
                "vtep_mac": peer.vtep_mac}

    def add_peer(self, peer: Node) -> None:
        """Adds ``peer`` to the daemon's peers (``peers`` replace) and waits until its
        underlay MAC is resolved (RuntimeError with the daemon's listing otherwise)."""
        if peer is self:
            raise ValueError(f"{self.name} cannot be its own peer")
        if peer.kind == "kernel":
            peer.wire_size_segments(True)
        self.peer_records[peer.name] = self.peer_record(peer)
        self._send_peers()
        self.peers[peer.name] = peer
        self.wait_resolved([peer.name])

    def remove_peer(self, peer: Node) -> None:
        self.peer_records.pop(peer.name, None)
        self._send_peers()
        self.peers.pop(peer.name, None)

    def _send_peers(self) -> dict:
        return self.daemon.call("peers", action="replace", peers=list(self.peer_records.values()))

    def wait_resolved(self, names=None, timeout_s: float | None = None) -> dict:
        """Waits until the peers ``names`` (default: all) are ``resolved``; their rows."""
        deadline = time.monotonic() + (timeout_s or self.RESOLVE_TIMEOUT_S)
        while True:
            rows = {r["name"]: r for r in self.daemon.call("peers")["peers"]}
            want = [n for n in (names or rows)]
            if all(n in rows and rows[n]["state"] == "resolved" for n in want):
                return {n: rows[n] for n in want}
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: peers {want} not resolved within "
                                   f"{timeout_s or self.RESOLVE_TIMEOUT_S} s: {rows}")
            time.sleep(0.05)

    def restart(self, timeout_s: float = 30.0) -> None:
        """Starts the daemon again (after ``daemon.kill9()`` or ``daemon.stop()``); its
        control-source peers come back from its state file."""
        self.daemon.start(timeout_s=timeout_s)

    def close(self) -> None:
        """Stops vswitchd (SIGTERM to the PID we started: it hands the underlay address back
        to ``eth0``), then deletes the namespaces and the work dir."""
        try:
            if self.daemon is not None:
                self.daemon.stop()
        finally:
            self.daemon = None
            super().close()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)


NODE_KINDS = {"kernel": KernelNode, "vswitch": VswitchNode}


# --------------------------------------------------------------------------- cluster


@dataclass
class Cluster:
    """An underlay and nodes on it, every pair wired as peers, pods on each node.

    ``kinds``: one kind for all ``nodes`` (``"kernel"`` or ``"vswitch"``) or a list with one
    kind per node. Node ``i`` (1-based) has underlay host ``i`` and the ``i``-th subnet of
    ``node_prefix`` bits of ``cluster_cidr``. Use as a context manager (or ``open`` and
    ``close``): everything is removed in every outcome. ``add_node`` joins one more node
    at run time. Cluster mode (nodes registering in etcd instead of wired peers) is the
    subclass ``vswitch.lab.etcdns.MemberCluster``, through the hooks ``_open_services``,
    ``_make_node`` and ``_close_services``."""
    nodes_count: int = 3
    kinds: object = "kernel"
    pods_per_node: int = 2
    underlay_cidr: str = DEFAULT_UNDERLAY_CIDR
    cluster_cidr: str = DEFAULT_CLUSTER_CIDR
    node_prefix: int = DEFAULT_NODE_PREFIX
    mtu: int = DEFAULT_MTU
    vni: int = DEFAULT_VNI
    port: int = IANA_VXLAN_PORT
    node_kwargs: dict = field(default_factory=dict)     # extra keyword arguments per node kind
    wire_peers: bool = True
    underlay: Underlay | None = field(default=None, init=False)
    nodes: list = field(default_factory=list, init=False)

    def __post_init__(self):
        _check_int("nodes_count", self.nodes_count, 1, 253)
        _check_int("pods_per_node", self.pods_per_node, 0, 250)
        kinds = ([self.kinds] * self.nodes_count if isinstance(self.kinds, str)
                 else list(self.kinds))
        if len(kinds) != self.nodes_count or any(k not in NODE_KINDS for k in kinds):
            raise ValueError(f"kinds={self.kinds!r}: accepted is one of {', '.join(NODE_KINDS)} or "
                             f"a list of {self.nodes_count} of them")
        self._kinds = kinds
        try:
            net = ipaddress.IPv4Network(self.cluster_cidr, strict=True)
            self._subnets = net.subnets(new_prefix=self.node_prefix)
        except ValueError as exc:
            raise ValueError(f"cluster_cidr={self.cluster_cidr!r} with node_prefix="
                             f"{self.node_prefix!r}: accepted is an IPv4 network and a longer "
                             f"prefix, like 10.244.0.0/16 and 24 ({exc})") from None
        next(self._subnets)     # the cluster's first subnet is left out, as flannel's SubnetMin

    def open(self) -> "Cluster":
        if self.underlay is not None:
            raise RuntimeError("this Cluster was opened already: open() or `with`, not both")
        try:
            self.underlay = Underlay(self.underlay_cidr, self.mtu).open()
            self._open_services()
            for kind in self._kinds:
                self._new_node(kind)
            if self.wire_peers:
                for node in self.nodes:
                    for peer in self.nodes:
                        if peer is not node:
                            node.add_peer(peer)
        except BaseException:
            self.close()
            raise
        return self

    def _open_services(self) -> None:
        """Hook: what the nodes need on the underlay before they start (nothing here)."""

    def _close_services(self) -> None:
        """Hook: undoes ``_open_services`` (after the nodes are gone)."""

    def _make_node(self, index: int, kind: str) -> Node:
        """Hook: node number ``index`` of ``kind`` (not opened): the next subnet of the cluster CIDR."""
        try:
            cidr = str(next(self._subnets))
        except StopIteration:
            raise ValueError(f"cluster_cidr {self.cluster_cidr} has no room for "
                             f"{index} /{self.node_prefix} subnets") from None
        return NODE_KINDS[kind](self.underlay, index, pod_cidr=cidr, vni=self.vni, port=self.port,
                                **self.node_kwargs.get(kind, {}))

    def _new_node(self, kind: str) -> Node:
        node = self._make_node(len(self.nodes) + 1, kind)
        self.nodes.append(node)
        node.open()
        for _ in range(self.pods_per_node):
            node.add_pod()
        return node

    def add_node(self, kind: str = "vswitch") -> Node:
        """One more node at run time, with ``pods_per_node`` pods; in cluster mode it
        registers by itself, otherwise it is wired as a peer of every node (if ``wire_peers``)."""
        if kind not in NODE_KINDS:
            raise ValueError(f"kind={kind!r}: accepted is one of {', '.join(NODE_KINDS)}")
        node = self._new_node(kind)
        if self.wire_peers:
            for other in self.nodes:
                if other is not node:
                    other.add_peer(node)
                    node.add_peer(other)
        return node

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no node {name!r}; nodes: {', '.join(n.name for n in self.nodes)}")

    @property
    def pods(self) -> list[Pod]:
        return [p for n in self.nodes for p in n.pods]

    def namespaces(self) -> list[str]:
        """Every namespace this cluster made and still holds."""
        out = list(self.underlay.nss.names) if self.underlay else []
        for n in self.nodes:
            out += n.nss.names
        return out

    def isolate(self, node: Node) -> None:
        """Removes ``node`` from every other node's peers and them from its (a node that left)."""
        for other in self.nodes:
            if other is not node:
                other.remove_peer(node)
                node.remove_peer(other)

    def rejoin(self, node: Node) -> None:
        """Adds ``node`` and every other node back as peers of each other."""
        for other in self.nodes:
            if other is not node:
                other.add_peer(node)
                node.add_peer(other)

    def close(self) -> None:
        """Stops and removes every node (daemons first, by their PIDs), then the underlay;
        goes on past a failure and raises the first one at the end."""
        first = None
        for node in reversed(self.nodes):
            try:
                node.close()
            except BaseException as exc:      # noqa: BLE001 - the others must go too
                first = first or exc
        self.nodes.clear()
        try:
            self._close_services()
        except BaseException as exc:      # noqa: BLE001
            first = first or exc
        if self.underlay is not None:
            try:
                self.underlay.close()
            except BaseException as exc:      # noqa: BLE001
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
