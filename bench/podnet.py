"""Pod networks on a node namespace, for the real-network benchmarks: vswitch or the
reference chain, pods added and removed as a container runtime does.

Theory of operation
-------------------
A :class:`Node` is a network namespace we create (never the machine's own) holding one
pod network of one subject:

- ``vswitch``: vswitchd (``vswitch.lab.Daemon``) runs in the node namespace, and pods are
  added through the vswitch CNI plugin (installed into a temporary bin directory by
  ``vswitch_cni.install``) with host-local IPAM from the reference directory;
- ``bridge``: the reference ``bridge`` plugin (isGateway, hairpin, no ipMasq) with
  host-local IPAM: a Linux bridge and a veth per pod; with ``portmap=True`` the reference
  ``portmap`` plugin follows it (iptables DNAT), with ``bandwidth=True`` the ``bandwidth``
  plugin (tc tbf, ifb).

With ``ipv6=True`` the node is dual-stack as Kubernetes configures host-local: two
``ranges`` (the IPv4 subnet and ``fd00:<octet>::/64``) and a default route per family;
each pod then has ``ip6`` besides ``ip``.

Either chain runs through ``vswitch.lab.CniChain`` (ADD in order with ``prevResult`` and
the runtimeConfig of the declared capabilities, DEL in reverse), with the calling thread
inside the node namespace (``in_netns``: setns(2) of this thread only), so the bridge, the
veths' host ends, the ifb devices and the iptables chains the reference plugins make land
in the node namespace, and vanish with it. Pod namespaces are made with
``vswitch.lab.Namespaces`` (unique names: prefix, pid, random suffix). ``close()`` stops
vswitchd (the PID we started) and deletes every namespace we made, whatever happened
before; a ``setup(node)`` callback runs in between creating the node namespace and
starting the daemon (e.g. an uplink veth to a client namespace made with ``node.nss``).

Imports pytest only in :func:`require_subject`, which turns a missing tool or plugin into a
skip with the reason.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vswitch import lab

REF_CNI = Path(os.environ.get("VSWITCH_BENCH_CNI_PATH", lab.SYSTEM_CNI_PATH))
CLONE_NEWNET = 0x40000000
SUBJECTS = ("vswitch", "bridge")
POD_IFNAME = "eth0"


def require_subject(subject, *, portmap=False, bandwidth=False, tools=()):
    """Skip the calling test (with the reason) unless ``subject`` can run here."""
    import pytest
    from . import nettools
    nettools.require(*tools)
    needed = ["host-local"]
    if subject == "bridge":
        needed.append("bridge")
        if portmap:
            needed.append("portmap")
        if bandwidth:
            needed.append("bandwidth")
    for plugin in needed:
        if not os.access(REF_CNI / plugin, os.X_OK):
            pytest.skip(f"reference CNI plugin {REF_CNI / plugin} not installed "
                        f"(containernetworking-plugins)")
    if subject == "bridge" and portmap and shutil.which("iptables") is None:
        pytest.skip("not installed: iptables (the portmap plugin needs it)")


def _setns(fd, what):
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name):
    """This thread (and threads and processes it starts) inside network namespace
    ``name`` until exit."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        path = lab.Namespaces.path(name)
        fd = os.open(path, os.O_RDONLY)
        try:
            _setns(fd, path)
        finally:
            os.close(fd)
        try:
            yield
        finally:
            _setns(own, "back to this thread's own namespace")
    finally:
        os.close(own)


@dataclass
class Pod:
    """A pod added through a chain: its namespace, IPv4 address (and IPv6 one on a
    dual-stack node), the CNI result and how long the ADD took (ms)."""
    ns: str
    ip: str
    container_id: str
    runtime_config: dict | None
    result: dict
    add_ms: float
    ifname: str = POD_IFNAME
    ip6: str | None = None


def _ipv4_of(result):
    for ip in (result or {}).get("ips", []):
        addr = ip.get("address", "")
        if "." in addr:
            return addr.split("/")[0]
    raise RuntimeError(f"CNI result has no IPv4 address: {result!r:.300}")


def _ipv6_of(result):
    for ip in (result or {}).get("ips", []):
        addr = ip.get("address", "")
        if ":" in addr:
            return addr.split("/")[0]
    return None


@dataclass
class Node:
    """A node namespace with one pod network of ``subject`` (see the module docstring)."""
    subject: str
    portmap: bool = False
    bandwidth: bool = False
    daemon_args: tuple = ()
    setup: object = None            # callable(node) run before the daemon starts
    tag: str = "bn"                 # namespace name prefix (short: IFNAMSIZ is not involved)
    ipv6: bool = False              # dual stack: an IPv6 range and default route too
    pods: list = field(default_factory=list)

    def __post_init__(self):
        if self.subject not in SUBJECTS:
            raise ValueError(f"subject {self.subject!r}: accepted are {', '.join(SUBJECTS)}")
        self.u = lab.uid()
        self.nss = lab.Namespaces(prefix=self.tag)
        self.workdir = None
        self.daemon = None
        self.chain = None
        self.node = None
        self.made = 0                   # pod namespaces made so far
        self.octet = random.randrange(16, 250)
        self.subnet = f"10.{self.octet}.0.0/16"
        self.gateway = f"10.{self.octet}.0.1"
        self.subnet6 = f"fd00:{self.octet:x}::/64"
        self.gateway6 = f"fd00:{self.octet:x}::1"

    # ------------------------------------------------------------------ life cycle

    def open(self):
        try:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.subject}-{self.u}-"))
            self.node = self.nss.new("node")
            if self.setup is not None:
                self.setup(self)
            ipam = {"type": "host-local", "dataDir": str(self.workdir / "ipam"),
                    "ranges": [[{"subnet": self.subnet}]], "routes": [{"dst": "0.0.0.0/0"}]}
            if self.ipv6:
                ipam["ranges"].append([{"subnet": self.subnet6}])
                ipam["routes"].append({"dst": "::/0"})
            caps = {}
            if self.portmap:
                caps["portMappings"] = True
            if self.bandwidth:
                caps["bandwidth"] = True
            if self.subject == "vswitch":
                self.daemon = lab.Daemon(self.node, self.workdir / "vswitchd",
                                         self.daemon_args).start(timeout_s=30)
                from vswitch_cni.install import install
                bin_dir = self.workdir / "bin"
                # pinned to this interpreter: python3 on PATH may be a slow pyenv shim here
                install(str(bin_dir), str(self.workdir / "net.d"), socket_path=self.daemon.socket,
                        python=os.path.realpath(sys.executable))
                plugin = {"type": "vswitch", "socket": self.daemon.socket, "ipam": ipam}
                if caps:
                    plugin["capabilities"] = caps
                self.chain = lab.CniChain({"cniVersion": "1.0.0", "name": f"bvs{self.u}",
                                           "plugins": [plugin]}, cni_path=(bin_dir, REF_CNI))
            else:
                plugins = [{"type": "bridge", "bridge": f"br{self.u}", "isGateway": True,
                            "ipMasq": False, "hairpinMode": True, "ipam": ipam}]
                if self.portmap:
                    plugins.append({"type": "portmap", "capabilities": {"portMappings": True},
                                    "snat": True})
                if self.bandwidth:
                    plugins.append({"type": "bandwidth", "capabilities": {"bandwidth": True}})
                self.chain = lab.CniChain({"cniVersion": "1.0.0", "name": f"bbr{self.u}",
                                           "plugins": plugins}, cni_path=(REF_CNI,))
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        """Stops vswitchd and deletes every namespace made (pods and node), whatever the
        state; pods are not DELeted one by one (their namespaces go, and the node's with
        the bridge, the veths' host ends, iptables chains and ifb devices in it)."""
        try:
            if self.daemon is not None:
                self.daemon.stop()
        finally:
            self.pods.clear()
            self.nss.cleanup()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ pods

    def new_pod_ns(self):
        # a counter in the name: lab.uid()'s random part alone collides among hundreds
        self.made += 1
        return self.nss.new(f"p{self.made}x")

    def add_pod(self, runtime_config=None, ns=None):
        """A new pod (its namespace made first, outside the timing), ADDed through the
        chain in the node namespace; ``add_ms`` is the ADD alone."""
        ns = ns or self.new_pod_ns()
        cid = f"bench-{ns}"
        try:
            with in_netns(self.node):
                t0 = time.perf_counter()
                result = self.chain.add(cid, lab.Namespaces.path(ns), POD_IFNAME, runtime_config)
                add_ms = (time.perf_counter() - t0) * 1e3
        except BaseException:
            self.nss.delete(ns)
            raise
        pod = Pod(ns, _ipv4_of(result), cid, runtime_config, result, add_ms, ip6=_ipv6_of(result))
        self.pods.append(pod)
        return pod

    def remove_pod(self, pod):
        """DEL through the chain, then the pod's namespace; returns the DEL's ms."""
        try:
            with in_netns(self.node):
                t0 = time.perf_counter()
                self.chain.delete(pod.container_id, lab.Namespaces.path(pod.ns), pod.ifname,
                                  pod.runtime_config, pod.result)
                return (time.perf_counter() - t0) * 1e3
        finally:
            if pod in self.pods:
                self.pods.remove(pod)
            self.nss.delete(pod.ns)

    def facts(self):
        """What a row should say about this node (datapath and I/O of vswitchd)."""
        if self.daemon is None:
            return {"path": "reference bridge plugin: Linux bridge + veth"}
        st = self.daemon.call("status")
        return {"datapath": st.get("datapath"), "io": st.get("io"),
                "vswitchd": st.get("version")}
