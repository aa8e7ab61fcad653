"""The CNI plugin chains the runtime tests run against: the reference one, and ours.

Theory of operation: a chain is a CNI bin dir plus a conf dir holding one conflist, and
whatever process the chain needs, all under one temporary directory. Runtimes are pointed
at ``bin_dir`` and ``conf_dir``; the tests only ask the chain for its network name, its
subnet and gateway, where its IPAM keeps leases, and ``leftovers(pod)``: what of a removed
pod is still on the node.

- ``reference``: Debian's containernetworking-plugins (``/usr/lib/cni``) as a conflist of
  bridge (a bridge named per test, gateway, ipMasq, hairpin) + host-local + portmap +
  bandwidth. The bin dir holds symlinks to every reference plugin.
- ``vswitch``: ``python -m vswitch.daemon --socket S --state-dir D`` started from the
  repository in the node's own namespace (``vswitch.lab.Daemon`` with ``ns=None``, which
  waits until the daemon answers on its socket), with ``--uplink`` on the node end of the
  client link when one is given (the daemon serves hostPorts only for traffic that
  crosses the switch), and
  ``python -m vswitch.cli install-cni --bin-dir B --conf-dir C --socket S --subnet N``
  writing the relocatable plugin and ``05-vswitch.conflist`` (``dual_stack``: a second
  ``--subnet`` of a random fdXX::/64, so host-local gets two ``ranges``; the reference
  chain gets the same second range and a ``::/0`` route). The reference plugins are
  linked into the same bin dir, since the conflist delegates IPAM to host-local. Its
  ``leftovers`` also asks the daemon (``list``) for attachments still holding the pod IP.

``CHAIN_NAMES`` lists them; ``vswitch_unavailable()`` gives the precise reason the vswitch
chain cannot run yet (missing entry points), or None.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import warnings

import pytest

from vswitch import lab

REFERENCE_BIN_DIR = lab.SYSTEM_CNI_PATH
REPO_ROOT = str(lab.REPO)
CHAIN_NAMES = ("reference", "vswitch")
DEFAULT_HOST_LOCAL_DIR = "/var/lib/cni/networks"


def vswitch_unavailable() -> str | None:
    """Why the vswitch chain cannot run here, or None when its entry points exist."""
    missing = [p for p in ("vswitch/daemon/main.py", "vswitch/cli.py", "cni/plugin.py")
               if not os.path.isfile(os.path.join(REPO_ROOT, p))]
    if missing:
        return ("the vswitch chain needs " + ", ".join(missing) +
                " (python -m vswitch.daemon, python -m vswitch.cli install-cni, the plugin),"
                " which the repository does not have yet")
    return None


def free_subnet(prefix_len: int = 24) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no route on the node overlaps."""
    routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"],
                            capture_output=True, text=True).stdout
    used = []
    for line in routes.splitlines():
        word = line.split()[0] if line.split() else ""
        if word in ("local", "broadcast", "unreachable", "blackhole", "prohibit"):
            word = line.split()[1]
        try:
            used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    rng = random.Random()
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randrange(64, 250)}.{rng.randrange(0, 256)}.0/"
                                   f"{prefix_len}")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet found among the node's routes")


def free_subnet6() -> ipaddress.IPv6Network:
    """A random fdXX:XXXX:XXXX:XXXX::/64 (a ULA) that no IPv6 route on the node overlaps."""
    routes = subprocess.run(["ip", "-6", "route", "show", "table", "all"],
                            capture_output=True, text=True).stdout
    used = []
    for line in routes.splitlines():
        words = line.split()
        word = words[0] if words else ""
        if word in ("local", "anycast", "multicast", "unreachable", "blackhole", "prohibit") \
                and len(words) > 1:
            word = words[1]
        try:
            used.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            continue
    rng = random.Random()
    for _ in range(200):
        net = ipaddress.ip_network(f"fd{rng.randrange(256):02x}:{rng.randrange(65536):x}:"
                                   f"{rng.randrange(65536):x}:{rng.randrange(65536):x}::/64")
        if not any(net.overlaps(u) for u in used if u.version == 6 and u.prefixlen > 0):
            return net
    raise RuntimeError("no free fdXX::/64 subnet found among the node's IPv6 routes")


def _link_reference_plugins(bin_dir: str) -> None:
    os.makedirs(bin_dir, exist_ok=True)
    if not os.path.isdir(REFERENCE_BIN_DIR):
        raise FileNotFoundError(f"{REFERENCE_BIN_DIR} is missing: install the Debian package "
                                "containernetworking-plugins")
    for name in os.listdir(REFERENCE_BIN_DIR):
        dst = os.path.join(bin_dir, name)
        if not os.path.lexists(dst):
            os.symlink(os.path.join(REFERENCE_BIN_DIR, name), dst)


def require_tools(*names: str) -> None:
    """Fails the test (does not skip it) naming the Debian package when a tool is missing."""
    packages = {"containerd": "containerd", "ctr": "containerd", "runc": "runc",
                "podman": "podman", "go": "golang-go", "busybox": "busybox-static",
                "iptables-save": "iptables", "ip6tables-save": "iptables", "tc": "iproute2"}
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.fail("missing " + ", ".join(f"{n} (Debian package {packages.get(n, n)})"
                                           for n in missing) +
                    ": run scripts/setup-runtimes.sh as root")


class Chain:
    """Common shape: ``start()``, ``stop()``, dirs, network facts and leftover checks."""
    name = ""
    infra_ifnames: frozenset = frozenset()   # node interfaces of the chain, not of a pod
    # A CHECK failure the chain shows on every healthy pod (a known bug), or None.
    known_check_failure: str | None = None

    def __init__(self, base_dir: str, suffix: str, uplink: str | None = None,
                 dual_stack: bool = False):
        self.base_dir = base_dir
        self.suffix = suffix
        self.uplink = uplink
        self.bin_dir = os.path.join(base_dir, "cni-bin")
        self.conf_dir = os.path.join(base_dir, "cni-conf")
        self.subnet = free_subnet()
        self.gateway = str(next(self.subnet.hosts()))
        # Dual stack: a second host-local range of IPv6, as Kubernetes configures it.
        self.subnet6 = free_subnet6() if dual_stack else None
        self.gateway6 = str(next(self.subnet6.hosts())) if dual_stack else None

    @property
    def conflist_path(self) -> str:
        names = sorted(n for n in os.listdir(self.conf_dir)
                       if n.endswith((".conflist", ".conf", ".json")))
        if not names:
            raise FileNotFoundError(f"no CNI configuration in {self.conf_dir}")
        return os.path.join(self.conf_dir, names[0])

    def conflist(self) -> dict:
        with open(self.conflist_path) as f:
            return json.load(f)

    @property
    def network_name(self) -> str:
        return self.conflist()["name"]

    def ipam_data_dir(self) -> str:
        """Where host-local keeps this network's leases (one file per IP)."""
        for plugin in self.conflist()["plugins"]:
            ipam = plugin.get("ipam") or {}
            if ipam.get("type") == "host-local":
                return os.path.join(ipam.get("dataDir", DEFAULT_HOST_LOCAL_DIR),
                                    self.network_name)
        raise ValueError(f"no host-local IPAM in {self.conflist_path}")

    def leased_ips(self) -> set[str]:
        d = self.ipam_data_dir()
        if not os.path.isdir(d):
            return set()
        out = set()
        for name in os.listdir(d):
            try:
                out.add(str(ipaddress.ip_address(name)))
            except ValueError:
                continue  # last_reserved_ip.0, lock
        return out

    def leftovers(self, pod_ip: str, host_ifnames: list[str]) -> list[str]:
        """What of a removed pod is still on the node (empty: nothing)."""
        problems = []
        if pod_ip in self.leased_ips():
            problems.append(f"host-local still leases {pod_ip} in {self.ipam_data_dir()}")
        for ifname in host_ifnames:
            if subprocess.run(["ip", "link", "show", "dev", ifname],
                              capture_output=True).returncode == 0:
                problems.append(f"host interface {ifname} still exists")
        save = "ip6tables-save" if ipaddress.ip_address(pod_ip).version == 6 else "iptables-save"
        rules = subprocess.run([save], capture_output=True, text=True).stdout
        hits = [line for line in rules.splitlines()
                if f"{pod_ip}/" in line or f"{pod_ip}:" in line or line.endswith(pod_ip)]
        if hits:
            problems.append(f"iptables rules still name {pod_ip}: {hits}")
        return problems

    def pod_links(self) -> list[str]:
        """The node's interfaces that belong to pods (none where pods hold their own)."""
        return []

    def describe(self) -> str:
        subnets = f"{self.subnet}" + (f" and {self.subnet6}" if self.subnet6 else "")
        return f"{self.name} chain, network {self.network_name}, subnets {subnets}"


class ReferenceChain(Chain):
    name = "reference"
    # portmap 1.1.1 (Debian 12) CHECK looks for an IPv6 DNAT chain on IPv4-only pods:
    # containernetworking/plugins#819 (closed upstream; Debian 12 ships 1.1.1).
    known_check_failure = "could not check ipv6 dnat"

    def __init__(self, base_dir, suffix, uplink=None, dual_stack=False):
        super().__init__(base_dir, suffix, uplink, dual_stack)
        self.bridge = f"vsrtbr{suffix}"[:15]
        self.infra_ifnames = frozenset({self.bridge})

    def start(self) -> "ReferenceChain":
        _link_reference_plugins(self.bin_dir)
        os.makedirs(self.conf_dir, exist_ok=True)
        ranges = [[{"subnet": str(self.subnet), "gateway": self.gateway}]]
        routes = [{"dst": "0.0.0.0/0"}]
        if self.subnet6 is not None:
            ranges.append([{"subnet": str(self.subnet6), "gateway": self.gateway6}])
            routes.append({"dst": "::/0"})
        conf = {
            "cniVersion": "1.0.0",
            "name": f"vsrt-ref-{self.suffix}",
            "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": True,
                 "hairpinMode": True,
                 "ipam": {"type": "host-local",
                          "ranges": ranges,
                          "routes": routes,
                          "dataDir": os.path.join(self.base_dir, "ipam")}},
                {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
                {"type": "bandwidth", "capabilities": {"bandwidth": True}},
            ],
        }
        with open(os.path.join(self.conf_dir, "10-reference.conflist"), "w") as f:
            json.dump(conf, f, indent=2)
        return self

    def pod_links(self) -> list[str]:
        """The node's interfaces that belong to pods: the veths on the bridge."""
        out = subprocess.run(["ip", "-o", "link", "show", "master", self.bridge],
                             capture_output=True, text=True).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]

    def stop(self) -> None:
        # The bridge is the chain's, not a pod's: the bridge plugin never deletes it.
        subprocess.run(["ip", "link", "del", "dev", self.bridge], capture_output=True)


class VswitchChain(Chain):
    name = "vswitch"

    def __init__(self, base_dir, suffix, uplink=None, dual_stack=False):
        super().__init__(base_dir, suffix, uplink, dual_stack)
        self.switch_name = f"vsw{suffix}"[:15]
        self.infra_ifnames = frozenset({self.switch_name})
        args = ["--switch", self.switch_name] + (["--uplink", uplink] if uplink else [])
        self.daemon = lab.Daemon(None, base_dir, args)   # in the node's own namespace
        self.socket = self.daemon.socket

    def start(self) -> "VswitchChain":
        reason = vswitch_unavailable()
        if reason:
            raise RuntimeError(reason)
        _link_reference_plugins(self.bin_dir)
        os.makedirs(self.conf_dir, exist_ok=True)
        try:
            self.daemon.start(timeout_s=30)
        except RuntimeError:
            self.stop()
            raise
        args = ["--bin-dir", self.bin_dir, "--conf-dir", self.conf_dir,
                "--socket", self.socket, "--subnet", str(self.subnet)]
        if self.subnet6 is not None:
            args += ["--subnet", str(self.subnet6)]
        install = [sys.executable, "-m", "vswitch.cli", "install-cni", *args]
        res = subprocess.run(install, cwd=REPO_ROOT, env=self.daemon.env, capture_output=True,
                             text=True)
        if res.returncode != 0 and "invalid choice: 'install-cni'" in res.stderr:
            # vswitchctl does not route install-cni yet; vswitch_cni.install is the same code.
            warnings.warn("vswitchctl has no install-cni subcommand yet: the vswitch chain "
                          "was installed with python -m vswitch_cni.install")
            install = [sys.executable, "-m", "vswitch_cni.install", *args]
            res = subprocess.run(install, cwd=REPO_ROOT, env=self.daemon.env,
                                 capture_output=True, text=True)
        if res.returncode != 0:
            self.stop()
            raise RuntimeError(f"{' '.join(install)} failed ({res.returncode}): "
                               f"{res.stdout}{res.stderr}")
        self.install_cmd = install
        # Isolation from other users of the node: a network name of our own and the IPAM
        # leases under our directory. Nothing else of the installed conflist is changed.
        conf = self.conflist()
        conf["name"] = f"vsrt-vsw-{self.suffix}"
        for plugin in conf["plugins"]:
            if (plugin.get("ipam") or {}).get("type") == "host-local":
                plugin["ipam"]["dataDir"] = os.path.join(self.base_dir, "ipam")
        with open(self.conflist_path, "w") as f:
            json.dump(conf, f, indent=2)
        ipam = next((p.get("ipam") for p in conf["plugins"] if p.get("ipam")), {}) or {}
        for rng in (r for rs in ipam.get("ranges", []) for r in rs):
            if rng.get("gateway"):
                if ipaddress.ip_address(rng["gateway"]).version == 6:
                    self.gateway6 = rng["gateway"]
                else:
                    self.gateway = rng["gateway"]
        return self

    def stop(self) -> None:
        """SIGTERM to the daemon (SIGKILL after 15 s, with a warning), then its switch link."""
        try:
            self.daemon.stop(timeout_s=15)
        except RuntimeError as exc:
            warnings.warn(str(exc))
        subprocess.run(["ip", "link", "del", "dev", self.switch_name], capture_output=True)

    def leftovers(self, pod_ip: str, host_ifnames: list[str]) -> list[str]:
        problems = super().leftovers(pod_ip, host_ifnames)
        attachments = self.daemon.call("list").get("attachments", [])
        stale = [a for a in attachments if pod_ip in json.dumps(a)]
        if stale:
            problems.append(f"vswitchd still holds attachments with {pod_ip}: {stale}")
        return problems


def make_chain(name: str, base_dir: str, suffix: str, uplink: str | None = None,
               dual_stack: bool = False) -> Chain:
    if name == "reference":
        return ReferenceChain(base_dir, suffix, uplink, dual_stack)
    if name == "vswitch":
        return VswitchChain(base_dir, suffix, uplink, dual_stack)
    raise ValueError(f"unknown CNI chain {name!r}; known: {', '.join(CHAIN_NAMES)}")
