"""etcd inside a namespace, and vswitchd nodes in cluster mode that reach it: the cluster-mode lab.

Theory of operation: ``lab.etcd.Etcd`` listens on the loopback of the caller's namespace,
which a daemon in a node namespace cannot reach. ``NsEtcd`` is the same member started with
``ip netns exec NS`` (which execs etcd itself, so the PID we signal is etcd's), listening
on an address of that namespace; its health is asked with ``curl`` from inside it.
``ClusterLab`` builds what a cluster needs: a ``lab.cluster.Underlay`` (a bridge in its own
namespace) with etcd on the bridge's address (the last host of the underlay range, like a
control-plane host on the node network), and node namespaces attached to the bridge by a
veth (``eth0``, the node's underlay address), each running ``lab.Daemon`` with the
cluster flags and ``--uplink eth0`` (cluster mode implies VXLAN, which needs the uplink);
the node IP is then the uplink's address, the node's ``eth0`` address. Everything is removed in every outcome: daemons stopped by their PIDs,
etcd killed by its PID, the namespaces deleted. Imports no pytest.

For the multi-node lab with traffic, ``MemberCluster`` (a ``lab.cluster.Cluster`` whose
nodes register in etcd instead of being wired as peers; ``etcd_members`` 1 or 3):
``UnderlayEtcd`` runs one or three members in the underlay namespace, on the last host
addresses of the underlay range (added to ``br0``), and ``MemberNode`` is a
``lab.cluster.VswitchNode`` in cluster mode: its vswitchd gets ``--uplink eth0`` and the
cluster flags, registers itself (its subnet is leased at ``open``, which waits for the
``pod_cidr`` op to answer, and read back into ``pod_cidr``), learns the other nodes from
etcd (no peer files, no ``add_peer``), and its pods are ADDed through the CNI plugin with
host-local on ``"subnet": "usePodCidr"`` and the ``portMappings``/``bandwidth``
capabilities.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vswitch import lab, rpc
from vswitch.lab.cluster import POD_IFNAME, Cluster, Pod, Underlay, VswitchNode
from vswitch.lab.etcd import Etcd

CLIENT_PORT = 2379
PEER_PORT = 2380


class NsEtcd(Etcd):
    """One etcd member in namespace ``ns`` on ``address``; see the module docstring."""

    def __init__(self, ns: str, address: str, **kw):
        self.ns, self.address = ns, address
        super().__init__(client_port=CLIENT_PORT, peer_port=PEER_PORT, **kw)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{self.peer_port}"

    def _argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *super()._argv()]

    def healthy(self) -> bool:
        r = subprocess.run(["ip", "netns", "exec", self.ns, "curl", "-s", "-m", "1", self.url + "/health"],
                           capture_output=True, text=True, timeout=10)
        return '"health":"true"' in r.stdout.replace(" ", "")


class ClusterLab:
    """An underlay with etcd on it, and vswitchd nodes in cluster mode (``add_node``)."""

    def __init__(self, cluster_cidr: str = "10.244.0.0/16", node_subnet_size: str = "24",
                 lease_ttl_s: int = 3, underlay_cidr: str = "10.201.0.0/24", workdir: Path | None = None):
        self.cluster_cidr, self.node_subnet_size, self.lease_ttl_s = cluster_cidr, node_subnet_size, lease_ttl_s
        self.underlay = Underlay(underlay_cidr, prefix="ce")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vswitch-clab-"))
        self.nss = lab.Namespaces("cn")
        self.etcd: NsEtcd | None = None
        self.daemons: dict[str, lab.Daemon] = {}
        self.node_ns: dict[str, str] = {}
        self._hosts = 0

    def open(self) -> "ClusterLab":
        try:
            self.underlay.open()
            host = self.underlay.net.num_addresses - 2
            addr = self.underlay.address(host)
            lab.nsexec(self.underlay.ns, "ip", "addr", "add", f"{addr}/{self.underlay.net.prefixlen}", "dev", "br0")
            self.etcd = NsEtcd(self.underlay.ns, addr, workdir=self.workdir / "etcd")
            self.etcd.start(timeout_s=30)
        except BaseException:
            self.close()
            raise
        return self

    def node_args(self, name: str, **extra) -> list[str]:
        # cluster mode implies VXLAN, which needs the uplink: the node's underlay NIC
        args = ["--uplink", "eth0", "--cluster-cidr", self.cluster_cidr, "--node-subnet-size", self.node_subnet_size,
                "--etcd-endpoints", self.etcd.url, "--node-name", name, "--lease-ttl-s", str(self.lease_ttl_s)]
        for k, v in extra.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        return args

    def add_node(self, name: str, start: bool = True, args=None, daemon_cls=lab.Daemon) -> lab.Daemon:
        """A node namespace on the underlay and its daemon (started unless ``start=False``)."""
        ns = self.nss.new("n")
        self._hosts += 1
        self.underlay.attach(name, ns, self._hosts)
        d = daemon_cls(ns, self.workdir / name, args if args is not None else self.node_args(name))
        self.daemons[name] = d
        self.node_ns[name] = ns
        if start:
            d.start()
        return d

    def close(self) -> None:
        for d in self.daemons.values():
            try:
                d.stop(timeout_s=20)
            except Exception:
                pass
        if self.etcd is not None:
            self.etcd.kill9()
        self.nss.cleanup()
        self.underlay.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ClusterLab":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()


def wait_for(cond, timeout_s: float, what: str, step_s: float = 0.02):
    """``cond()``'s first true value within ``timeout_s``, else AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(step_s)


class UnderlayEtcd:
    """``members`` (1 or 3) etcd members in ``underlay``'s namespace, on its last host
    addresses (``br0`` gets them); ``endpoints`` are their client URLs."""

    def __init__(self, underlay: Underlay, members: int = 1, workdir: Path | None = None):
        if members not in (1, 3):
            raise ValueError(f"etcd members={members!r}: accepted is 1 or 3")
        self.underlay = underlay
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="vswitch-uetcd-"))
        top = underlay.net.num_addresses - 2
        self.hosts = [top - k for k in range(members)]
        addrs = [underlay.address(h) for h in self.hosts]
        initial = ",".join(f"m{k}=http://{a}:{PEER_PORT}" for k, a in enumerate(addrs))
        token = f"vswitch-lab-{lab.uid()}"
        self.members = [NsEtcd(underlay.ns, a, name=f"m{k}", workdir=self.workdir, initial_cluster=initial,
                               cluster_token=token) for k, a in enumerate(addrs)]

    @property
    def endpoints(self) -> list[str]:
        return [m.url for m in self.members]

    @property
    def first_host(self) -> int:
        """The lowest underlay host number taken by etcd (nodes must stay below it)."""
        return min(self.hosts)

    def start(self, timeout_s: float = 30.0) -> "UnderlayEtcd":
        try:
            for m in self.members:
                lab.nsexec(self.underlay.ns, "ip", "addr", "add", f"{m.address}/{self.underlay.net.prefixlen}",
                           "dev", "br0")
            for m in self.members:
                m.spawn()
            for m in self.members:
                m.wait_healthy(timeout_s)
        except BaseException:
            self.cleanup()
            raise
        return self

    def cleanup(self) -> None:
        for m in self.members:
            m.kill9()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class MemberNode(VswitchNode):
    """A vswitch node in cluster mode; see the module docstring. ``pod_cidr`` is None until
    ``open`` has the lease."""

    def __init__(self, underlay: Underlay, index: int, *, etcd_endpoints, cluster_cidr: str,
                 node_subnet_size, lease_ttl_s: int = 10, register_timeout_s: float = 30.0, daemon_args=(),
                 **kw):
        cluster_args = ["--cluster-cidr", cluster_cidr, "--node-subnet-size", str(node_subnet_size),
                        "--etcd-endpoints", ",".join(etcd_endpoints), "--node-name", f"n{index}",
                        "--lease-ttl-s", str(lease_ttl_s)]
        super().__init__(underlay, index, pod_cidr=None, daemon_args=[*cluster_args, *daemon_args], **kw)
        self.register_timeout_s = register_timeout_s

    def open(self) -> "MemberNode":
        super().open()
        try:
            self.wait_lease(self.register_timeout_s)
            plugin = dict(self.chain.conflist["plugins"][0])
            plugin["ipam"] = dict(plugin["ipam"], ranges=[[{"subnet": "usePodCidr"}]])
            plugin["capabilities"] = {"portMappings": True, "bandwidth": True}
            self.chain.conflist["plugins"][0] = plugin
        except BaseException:
            self.close()
            raise
        return self

    def wait_lease(self, timeout_s: float) -> str:
        """Waits until the daemon holds its subnet lease (``pod_cidr`` answers) and takes it
        as ``pod_cidr``; TimeoutError with the daemon's last etcd error otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                cidrs = self.daemon.call("pod_cidr")["pod_cidrs"]
                v4 = next(c for c in cidrs if ":" not in c)
                if self.pod_cidr is not None and v4 != self.pod_cidr:
                    raise RuntimeError(f"{self.name} leased {v4}, held {self.pod_cidr} before")
                self._set_pod_cidr(v4)
                return v4
            except rpc.RpcError as exc:
                if exc.code != rpc.E_TRY_AGAIN or time.monotonic() > deadline:
                    st = self.daemon.call("status").get("cluster") if exc.code == rpc.E_TRY_AGAIN else None
                    raise TimeoutError(f"{self.name}: no subnet lease after {timeout_s} s ({exc}); "
                                       f"cluster status {st}") from None
            time.sleep(0.05)

    def add_pod(self, name: str | None = None, runtime_config: dict | None = None) -> Pod:
        """A pod ADDed through the plugin (usePodCidr), with ``runtime_config`` (e.g.
        ``portMappings``) as a runtime passes it."""
        ns = self.nss.new(f"{self.index}p")
        cid = f"cluster-{ns}"
        try:
            result = self.chain.add(cid, lab.Namespaces.path(ns), POD_IFNAME, runtime_config=runtime_config)
            ip = next(i["address"].split("/")[0] for i in result["ips"] if "." in i["address"])
        except BaseException:
            self.nss.delete(ns)
            raise
        pod = Pod(self._pod_name(name), ns, ip, self.name, container_id=cid, result=result)
        self.pods.append(pod)
        return pod

    def restart(self, timeout_s: float = 30.0) -> None:
        """Starts the daemon again (after ``daemon.kill9()`` or ``daemon.stop()``) and waits for
        its lease, which must be the subnet it held."""
        self.daemon.start(timeout_s=timeout_s)
        self.wait_lease(self.register_timeout_s)


@dataclass
class MemberCluster(Cluster):
    """A ``lab.cluster.Cluster`` in cluster mode: ``etcd_members`` (1 or 3) etcd members in
    the underlay namespace (``etcd``: ``UnderlayEtcd``), every node a ``MemberNode`` that
    leases its subnet of ``cluster_cidr`` (``node_prefix`` bits) and learns its peers from
    etcd (lease TTL ``lease_ttl_s``); nothing is wired by the lab."""
    kinds: object = "vswitch"
    wire_peers: bool = False
    etcd_members: int = 1
    lease_ttl_s: int = 10
    etcd: UnderlayEtcd | None = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        if self.etcd_members not in (1, 3) or set(self._kinds) != {"vswitch"} or self.wire_peers:
            raise ValueError(f"etcd_members={self.etcd_members!r}, kinds={self.kinds!r}, wire_peers="
                             f"{self.wire_peers!r}: accepted is 1 or 3 members, vswitch nodes only (kernel "
                             f"nodes do not register in etcd), peers not wired")

    def _open_services(self) -> None:
        self.etcd = UnderlayEtcd(self.underlay, self.etcd_members).start()

    def _close_services(self) -> None:
        if self.etcd is not None:
            self.etcd.cleanup()
            self.etcd = None

    def _make_node(self, index: int, kind: str) -> MemberNode:
        if index >= self.etcd.first_host:
            raise ValueError(f"underlay {self.underlay_cidr} has no host number left for node {index}")
        return MemberNode(self.underlay, index, etcd_endpoints=self.etcd.endpoints, cluster_cidr=self.cluster_cidr,
                          node_subnet_size=self.node_prefix, lease_ttl_s=self.lease_ttl_s, vni=self.vni,
                          port=self.port, **self.node_kwargs.get(kind, {}))

    def add_node(self, kind: str = "vswitch") -> MemberNode:
        if kind != "vswitch":
            raise ValueError(f"kind={kind!r}: a cluster-mode node is a vswitch node")
        return super().add_node(kind)
