"""Real-kernel helpers for the daemon's integration and fault tests.

Theory of operation: the plumbing (unique namespaces, vswitchd as a subprocess in a node
namespace, ping, iperf3, ``ss`` waits) is ``vswitch.lab``'s, shared with the demo and the
benchmarks; this module re-exports it under the names the tests use and adds what only
these tests need: ``Daemon.request`` (a raw protocol request, error replies included) and
``Daemon.ctl`` (vswitchctl against this daemon), and ``Cluster``, a node namespace with a
daemon whose pods are attached through the control API. Namespaces are named ``vt<role>``
plus the pid and a random suffix and are removed in every outcome (fixtures with finally);
only the daemon's own PID is ever signalled. Failures of the plumbing raise RuntimeError
with the command and its output, which fails the test like an assertion.
"""
from __future__ import annotations

import contextlib
import random
import sys
from pathlib import Path

from vswitch import lab, rpc
from vswitch.lab import REPO, Namespaces, nsexec, nspopen, ping, received_bps, sh, uid, wait_listening  # noqa: F401

NS_PREFIX = "vt"
skip_reason = lab.kernel_unavailable


class Daemon(lab.Daemon):
    """``lab.Daemon`` plus a raw request and vswitchctl against its socket."""

    def request(self, req: dict) -> dict:
        with rpc.Client(self.socket) as c:
            return c.request(req)

    def ctl(self, *args, check=True, timeout=60):
        return sh(sys.executable, "-m", "vswitch.cli", "--socket", self.socket, *args, check=check,
                  timeout=timeout, cwd=str(REPO), env=self.env)


class Pod:
    def __init__(self, name, ns, ip, cid, ifname="eth0"):
        self.name, self.ns, self.ip, self.cid, self.ifname = name, ns, ip, cid, ifname
        self.attachment = None

    @property
    def port(self):
        return self.attachment["port"]


class Cluster:
    """A node namespace with a daemon, and pods attached through the control API."""

    def __init__(self, nss: Namespaces, workdir: Path, subnet_octet: int | None = None, daemon_args=(),
                 node_ns: str | None = None):
        self.nss = nss
        self.node = node_ns or nss.new("n")
        self.octet = subnet_octet if subnet_octet is not None else random.randrange(16, 250)
        self.gateway = f"10.{self.octet}.0.1"
        self.daemon = Daemon(self.node, workdir, daemon_args)
        self.pods: dict[str, Pod] = {}

    def add_pod(self, name: str, host: int, **attach) -> Pod:
        ns = self.nss.new("p" + name)
        pod = Pod(name, ns, f"10.{self.octet}.0.{host}", f"ctr-{name}-{uid()}")
        r = self.daemon.call("attach", container_id=pod.cid, ifname="eth0", netns=Namespaces.path(ns),
                             ips=[{"address": f"{pod.ip}/24", "gateway": self.gateway}], **attach)
        pod.attachment = r["attachment"]
        self.pods[name] = pod
        return pod

    def detach_all(self):
        for pod in self.pods.values():
            self.daemon.call("detach", container_id=pod.cid, ifname="eth0")


def iperf3(server_ns: str, server_ip: str, client_ns: str, seconds: int = 3, streams: int = 1,
           reverse: bool = False, omit: int = 0, port: int = 5201) -> dict:
    """``lab.iperf3`` (TCP) with the tests' keyword ``omit`` (seconds left out at the start)."""
    return lab.iperf3(server_ns, server_ip, client_ns, seconds=seconds, streams=streams,
                      reverse=reverse, omit_s=omit, port=port)


@contextlib.contextmanager
def running_cluster(nss: Namespaces, workdir: Path, daemon_args=()):
    """A started ``Cluster``; its daemon is stopped (SIGTERM) in every outcome."""
    c = Cluster(nss, workdir, daemon_args=daemon_args)
    c.daemon.start()
    try:
        yield c
    finally:
        rc = c.daemon.stop()
        if rc not in (0, None, -9):
            print(c.daemon.logs())


UPLINK_NODE_IP = "192.0.2.1"
UPLINK_CLIENT_IP = "192.0.2.10"


def uplinked_cluster(nss: Namespaces, workdir: Path, daemon_args=()) -> Cluster:
    """A started ``Cluster`` whose daemon runs ``--uplink`` on a veth to a client namespace.

    The node holds ``UPLINK_NODE_IP``/24 on the NIC (``c.nic``), the client ``UPLINK_CLIENT_IP``
    on its end (``c.peer``) in ``c.client``. The caller stops the daemon."""
    node = nss.new("n")
    client = nss.new("c")
    nic, peer = f"up{node[-7:]}", f"cl{node[-7:]}"
    sh("ip", "link", "add", nic, "netns", node, "type", "veth", "peer", "name", peer, "netns", client)
    nsexec(node, "ip", "addr", "add", f"{UPLINK_NODE_IP}/24", "dev", nic)
    nsexec(node, "ip", "link", "set", nic, "up")
    nsexec(client, "ip", "addr", "add", f"{UPLINK_CLIENT_IP}/24", "dev", peer)
    nsexec(client, "ip", "link", "set", peer, "up")
    c = Cluster(nss, workdir, node_ns=node, daemon_args=["--uplink", nic, *daemon_args])
    c.client, c.nic, c.peer = client, nic, peer
    c.daemon.start()
    return c


@contextlib.contextmanager
def uplinked_node(nss: Namespaces, workdir: Path, daemon_args=()):
    """``uplinked_cluster`` with a ``procs`` list: those processes are killed and the daemon
    stopped in every outcome."""
    c = uplinked_cluster(nss, workdir, daemon_args)
    c.procs = []
    try:
        yield c
    finally:
        for p in c.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        c.daemon.stop()
