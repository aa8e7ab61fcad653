"""etcd inside a namespace, and vswitchd nodes in cluster mode that reach it: the cluster-mode lab.

Theory of operation: ``lab.etcd.Etcd`` listens on the loopback of the caller's namespace,
which a daemon in a node namespace cannot reach. ``NsEtcd`` is the same member started with
``ip netns exec NS`` (which execs etcd itself, so the PID we signal is etcd's), listening
on an address of that namespace; its health is asked with ``curl`` from inside it.
``ClusterLab`` builds what a cluster needs: a ``lab.cluster.Underlay`` (a bridge in its own
namespace) with etcd on the bridge's address (the last host of the underlay range, like a
control-plane host on the node network), and node namespaces attached to the bridge by a
veth (``eth0``, the node's underlay address), each running ``lab.Daemon`` with the
cluster flags; the node IP is then the route source towards etcd, i.e. the node's
``eth0`` address. Everything is removed in every outcome: daemons stopped by their PIDs,
etcd killed by its PID, the namespaces deleted. Imports no pytest.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from vswitch import lab
from vswitch.lab.cluster import Underlay
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
        args = ["--cluster-cidr", self.cluster_cidr, "--node-subnet-size", self.node_subnet_size,
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
