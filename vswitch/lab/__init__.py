"""A node on this machine, for the demo, the kernel-backed tests and the benchmarks.

Theory of operation: everything here runs real things and cleans up after itself.
``Namespaces`` creates network namespaces with unique names (a prefix, the pid and a
random suffix), with ``lo`` up unless asked not to (a test of a plugin that must bring
``lo`` up itself), and deletes every one it made in ``cleanup`` (also as a context
manager). ``Daemon`` is vswitchd as a subprocess inside a node namespace (or, with
``ns=None``, in the namespace of the caller), with its own socket, state dir and log
under a work dir; only the PID it started is ever signalled. ``CniChain`` runs
a CNI network configuration list as libcni does (ADD through every plugin in order with
``prevResult`` and the runtimeConfig of the capabilities each declares; DEL in reverse),
executing the plugin binaries found in its CNI path with ``CNI_*`` variables and the
configuration on stdin, exactly like a container runtime. ``ping`` and ``iperf3`` wrap
the real tools inside namespaces.

Needs root, ``ip`` (iproute2), and for the probes ping and iperf3. Imports no pytest.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from vswitch import rpc

REPO = Path(__file__).resolve().parents[2]
SYSTEM_CNI_PATH = "/usr/lib/cni"


def kernel_unavailable() -> str | None:
    """Why namespaces and TAP devices cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if not any(os.access(os.path.join(d, "ip"), os.X_OK) for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")):
        return "needs iproute2 (ip)"
    return None


_UID_COUNTER = itertools.count(random.randrange(16 ** 3))


def uid() -> str:
    """A short name suffix (at most 7 characters, so interface names stay within 15):
    the pid and a per-process counter starting at a random value, so no two calls of one
    process collide for 4096 calls, and processes rarely do."""
    return f"{os.getpid() % 10000}{next(_UID_COUNTER) % 16 ** 3:03x}"


def sh(*args, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({r.returncode}): "
                           f"{r.stderr.strip()} {r.stdout.strip()}")
    return r


def nsexec(ns: str, *args, **kw) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, **kw)


def nspopen(ns: str, *args, **kw) -> subprocess.Popen:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(["ip", "netns", "exec", ns, *map(str, args)], text=True, **kw)


class Namespaces:
    """Creates network namespaces; ``cleanup`` (or leaving the ``with`` block) deletes them.

    ``lo_up=False`` leaves each new namespace's ``lo`` down, as a container runtime does.
    """

    def __init__(self, prefix: str = "vs", lo_up: bool = True):
        self.prefix = prefix
        self.lo_up = lo_up
        self.names: list[str] = []

    def new(self, role: str) -> str:
        name = f"{self.prefix}{role}{uid()}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        if self.lo_up:
            nsexec(name, "ip", "link", "set", "lo", "up")
        return name

    @staticmethod
    def path(name: str) -> str:
        return f"/run/netns/{name}"

    def delete(self, name: str) -> None:
        sh("ip", "netns", "del", name, check=False)
        if name in self.names:
            self.names.remove(name)

    def cleanup(self) -> None:
        for name in reversed(list(self.names)):
            self.delete(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cleanup()


def veth(ns_a: str, name_a: str, addr_a: str | None, ns_b: str, name_b: str, addr_b: str | None,
         mtu: int | None = None) -> None:
    """A veth pair between two namespaces, up, with optional addresses ("198.18.0.1/24")
    and MTU. Each end is created directly in its namespace under its final name (one
    netlink request), so nothing is ever left in the caller's namespace."""
    sh("ip", "link", "add", name_a, "netns", ns_a, *(("mtu", mtu) if mtu else ()), "type", "veth",
       "peer", "name", name_b, "netns", ns_b, *(("mtu", mtu) if mtu else ()))
    for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
        if addr:
            nsexec(ns, "ip", "addr", "add", addr, "dev", name)
        nsexec(ns, "ip", "link", "set", name, "up")


class Daemon:
    """vswitchd in the node namespace ``ns``: start, call, kill -9, stop (SIGTERM).

    ``ns=None`` runs it in the caller's own namespace (a node that is this machine).
    """

    def __init__(self, ns: str | None, workdir: Path, extra_args=(), env=None):
        self.ns = ns
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.socket = str(self.workdir / "vswitchd.sock")
        self.state_dir = str(self.workdir / "state")
        self.log_file = str(self.workdir / "vswitchd.log")
        self.extra_args = [str(a) for a in extra_args]
        self.env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> "Daemon":
        netns = ["ip", "netns", "exec", self.ns] if self.ns is not None else []
        cmd = [*netns, sys.executable, "-m", "vswitch.daemon",
               "--socket", self.socket, "--state-dir", self.state_dir, "--log-file", self.log_file,
               *self.extra_args]
        with open(self.workdir / "stderr.txt", "ab") as err:
            self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=self.env, stdout=subprocess.DEVNULL,
                                         stderr=err)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vswitchd exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                rpc.call(self.socket, "status", timeout_s=2)
                return self
            except rpc.RpcError:
                time.sleep(0.05)
        raise RuntimeError(f"vswitchd did not answer within {timeout_s} s:\n{self.logs()}")

    def call(self, op: str, **args) -> dict:
        return rpc.call(self.socket, op, **args)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise RuntimeError(f"vswitchd did not exit on SIGTERM within {timeout_s} s") from None

    def logs(self) -> str:
        out = []
        for f in (self.log_file, self.workdir / "stderr.txt"):
            try:
                out.append(Path(f).read_text()[-6000:])
            except OSError:
                pass
        return "\n".join(out)


class CniError(RuntimeError):
    """A plugin of the chain failed: ``code`` and ``msg`` from its error JSON."""

    def __init__(self, plugin, command, rc, stdout, stderr):
        self.plugin, self.command, self.rc = plugin, command, rc
        try:
            err = json.loads(stdout)
        except ValueError:
            err = {}
        self.code, self.msg = err.get("code"), err.get("msg", "")
        super().__init__(f"CNI {plugin} {command} failed (exit {rc}): {stdout.strip() or stderr.strip()}")


class CniChain:
    """Runs a CNI network configuration list the way libcni does."""

    def __init__(self, conflist: dict, cni_path=(SYSTEM_CNI_PATH,)):
        self.conflist = conflist
        self.cni_path = [str(p) for p in ([cni_path] if isinstance(cni_path, (str, Path)) else cni_path)]

    def _binary(self, plugin_type: str) -> str:
        for d in self.cni_path:
            p = os.path.join(d, plugin_type)
            if os.access(p, os.X_OK):
                return p
        raise FileNotFoundError(f"CNI plugin {plugin_type!r} not found in {':'.join(self.cni_path)}")

    def exec_plugin(self, plugin: dict, command: str, container_id: str, netns: str, ifname: str,
                    runtime_config: dict | None = None, prev: dict | None = None,
                    args: str | None = None) -> dict | None:
        conf = dict(plugin)
        conf["cniVersion"] = self.conflist["cniVersion"]
        conf["name"] = self.conflist["name"]
        caps = {k for k, on in plugin.get("capabilities", {}).items() if on}
        rc = {k: v for k, v in (runtime_config or {}).items() if k in caps}
        if rc:
            conf["runtimeConfig"] = rc
        if prev is not None:
            conf["prevResult"] = prev
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
               "CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
               "CNI_IFNAME": ifname, "CNI_PATH": ":".join(self.cni_path)}
        if args:
            env["CNI_ARGS"] = args
        proc = subprocess.run([self._binary(plugin["type"])], input=json.dumps(conf), capture_output=True,
                              text=True, env=env, timeout=120)
        if proc.returncode != 0:
            raise CniError(plugin["type"], command, proc.returncode, proc.stdout, proc.stderr)
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def add(self, container_id: str, netns: str, ifname: str = "eth0", runtime_config=None, args=None):
        prev = None
        for plugin in self.conflist["plugins"]:
            prev = self.exec_plugin(plugin, "ADD", container_id, netns, ifname, runtime_config, prev, args)
        return prev

    def check(self, container_id: str, netns: str, ifname: str = "eth0", runtime_config=None, result=None):
        for plugin in self.conflist["plugins"]:
            self.exec_plugin(plugin, "CHECK", container_id, netns, ifname, runtime_config, result)

    def delete(self, container_id: str, netns: str, ifname: str = "eth0", runtime_config=None, result=None):
        errors = []
        for plugin in reversed(self.conflist["plugins"]):
            try:
                self.exec_plugin(plugin, "DEL", container_id, netns, ifname, runtime_config, result)
            except (CniError, OSError, subprocess.SubprocessError) as exc:   # DEL goes on, like libcni
                errors.append(str(exc))
        if errors:
            raise RuntimeError("; ".join(errors))


def ping(ns: str, ip: str, count: int = 3, interval_s: float = 0.2, timeout_s: int = 30) -> dict:
    """ping from a namespace: sent, received and the average RTT in ms (None if none came back)."""
    r = nsexec(ns, "ping", "-c", count, "-i", interval_s, "-W", 2, ip, check=False, timeout=timeout_s)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", r.stdout)
    return {"sent": sent, "received": received, "rtt_avg_ms": float(rtt.group(1)) if rtt else None,
            "out": r.stdout}


def wait_listening(ns: str, port: int, proto: str = "tcp", timeout_s: float = 10.0) -> None:
    flag = "-ltnH" if proto == "tcp" else "-lunH"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if nsexec(ns, "ss", flag, f"sport = :{port}", check=False).stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {proto} port {port} in {ns}")


def iperf3(server_ns: str, server_ip: str, client_ns: str, seconds: float = 3, streams: int = 1,
           reverse: bool = False, omit_s: int = 0, port: int = 5201, udp_bps: int | None = None,
           length: int | None = None) -> dict:
    """One iperf3 run between namespaces; the client's JSON result."""
    # the server's output is not read: DEVNULL, so a long run never blocks on a full pipe
    srv = nspopen(server_ns, "iperf3", "-s", "-1", "-p", port, stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
    try:
        wait_listening(server_ns, port)
        args = ["iperf3", "-c", server_ip, "-p", port, "-t", seconds, "-P", streams, "--json"]
        if reverse:
            args.append("-R")
        if omit_s:
            args += ["-O", omit_s]
        if udp_bps is not None:
            args += ["-u", "-b", udp_bps]
        if length is not None:
            args += ["-l", length]
        r = nsexec(client_ns, *args, check=False, timeout=seconds + 60)
        try:
            res = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"iperf3 failed: {r.stderr} {r.stdout[-2000:]}") from None
        if "error" in res:
            raise RuntimeError(f"iperf3 failed: {res['error']}")
        return res
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(10)


def received_bps(res: dict) -> float:
    """The receiver's rate of an iperf3 TCP result, bit/s."""
    return res["end"]["sum_received"]["bits_per_second"]
