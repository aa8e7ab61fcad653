"""Real-kernel helpers for the daemon's integration and fault tests.

Everything here creates namespaces and interfaces with unique names (pid + random suffix)
and removes them in every outcome (fixtures with finally), like pyroute2's own fixtures.
The daemon runs as a subprocess we started, inside a node namespace the test created,
with its own socket and state dir under the test's tmp dir; we only ever signal its PID.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vswitch import rpc

REPO = Path(__file__).resolve().parents[2]


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


def uid() -> str:
    return f"{os.getpid() % 10000}{random.randrange(36 ** 3):03x}"


def sh(*args, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()} {r.stdout.strip()}")
    return r


def nsexec(ns: str, *args, **kw) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *args, **kw)


def nspopen(ns: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


class Namespaces:
    """Creates network namespaces; ``cleanup`` removes every one of them."""

    def __init__(self):
        self.names: list[str] = []

    def new(self, prefix: str) -> str:
        name = f"vt{prefix}{uid()}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        nsexec(name, "ip", "link", "set", "lo", "up")
        return name

    @staticmethod
    def path(name: str) -> str:
        return f"/run/netns/{name}"

    def cleanup(self):
        for name in reversed(self.names):
            sh("ip", "netns", "del", name, check=False)
        self.names.clear()


class Daemon:
    """vswitchd in the node namespace ``ns``: start, call, kill -9, restart, stop."""

    def __init__(self, ns: str, workdir: Path, extra_args=(), env=None):
        self.ns = ns
        self.workdir = workdir
        self.socket = str(workdir / "vswitchd.sock")
        self.state_dir = str(workdir / "state")
        self.log_file = str(workdir / "vswitchd.log")
        self.extra_args = list(extra_args)
        self.env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0):
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "vswitch.daemon",
               "--socket", self.socket, "--state-dir", self.state_dir, "--log-file", self.log_file,
               *self.extra_args]
        self.stderr = open(self.workdir / "stderr.txt", "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=self.stderr)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vswitchd exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                rpc.call(self.socket, "status", timeout_s=2)
                return self
            except rpc.RpcError:
                time.sleep(0.05)
        raise AssertionError(f"vswitchd did not answer within {timeout_s} s:\n{self.logs()}")

    def call(self, op: str, **args) -> dict:
        return rpc.call(self.socket, op, **args)

    def request(self, req: dict) -> dict:
        with rpc.Client(self.socket) as c:
            return c.request(req)

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError("vswitchd did not exit on SIGTERM within 30 s")

    def logs(self) -> str:
        out = []
        for f in (self.log_file, self.workdir / "stderr.txt"):
            try:
                out.append(Path(f).read_text()[-6000:])
            except OSError:
                pass
        return "\n".join(out)

    def ctl(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
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


def ping(ns: str, ip: str, count: int = 3, interval: float = 0.2, timeout: int = 30) -> dict:
    r = nsexec(ns, "ping", "-c", str(count), "-i", str(interval), "-W", "2", ip, check=False, timeout=timeout)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", r.stdout)
    sent, received = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    return {"sent": sent, "received": received, "out": r.stdout}


def wait_listening(ns: str, port: int, proto: str = "tcp", timeout_s: float = 10.0):
    flag = "-ltnH" if proto == "tcp" else "-lunH"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = nsexec(ns, "ss", flag, f"sport = :{port}", check=False)
        if r.stdout.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {proto} port {port} in {ns}")


def iperf3(server_ns: str, server_ip: str, client_ns: str, seconds: int = 3, streams: int = 1,
           reverse: bool = False, omit: int = 0, port: int = 5201) -> dict:
    """Run an iperf3 TCP test; returns the client's JSON result."""
    srv = nspopen(server_ns, "iperf3", "-s", "-1", "-p", str(port))
    try:
        wait_listening(server_ns, port)
        args = ["iperf3", "-c", server_ip, "-p", str(port), "-t", str(seconds), "-P", str(streams), "--json"]
        if reverse:
            args.append("-R")
        if omit:
            args += ["-O", str(omit)]
        r = nsexec(client_ns, *args, check=False, timeout=seconds + 60)
        try:
            res = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise AssertionError(f"iperf3 failed: {r.stderr} {r.stdout[-2000:]}") from None
        if "error" in res:
            raise AssertionError(f"iperf3 failed: {res['error']}")
        return res
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(10)


def received_bps(res: dict) -> float:
    return res["end"]["sum_received"]["bits_per_second"]


requires_kernel = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
