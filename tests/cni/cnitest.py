"""Helpers of the CNI conformance suite: run the installed plugin as a runtime does.

Theory of operation: ``install_plugin`` writes the real ``vswitch`` launcher (cni.install)
into a temporary bin dir; :class:`Runner` executes it with ``CNI_*`` variables and the
configuration on stdin, exactly like libcni's RawExec (CNI_PATH = that bin dir, then
Debian's /usr/lib/cni for host-local), and returns the exit status with stdout parsed.
:class:`Node` is vswitchd in a node namespace created for the test, with its own socket
and state dir; only the PID it started is ever signalled. :class:`Netns` creates pod
namespaces with unique names and removes them in every outcome.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cni.install import install
from vswitch import rpc

REPO = Path(__file__).resolve().parents[2]
SYSTEM_CNI = "/usr/lib/cni"


def skip_reason():
    """Why the kernel-backed tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, TAP devices)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return None


def host_local_missing():
    if not os.access(os.path.join(SYSTEM_CNI, "host-local"), os.X_OK):
        return ("needs host-local in /usr/lib/cni "
                "(apt-get install -y containernetworking-plugins)")
    return None


def uid():
    return f"{os.getpid() % 10000}{random.randrange(36 ** 4):04x}"


def sh(*args, check=True, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=60, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {r.returncode} {r.stderr.strip()}")
    return r


def install_plugin(bin_dir):
    exe, _ = install(str(bin_dir), str(Path(bin_dir).parent / "net.d"))
    return exe


class Outcome:
    """One plugin run: ``rc``, ``out`` (parsed stdout or None), ``stdout``, ``stderr``."""

    def __init__(self, rc, stdout, stderr):
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr
        self.out = json.loads(stdout) if stdout.strip() else None

    @property
    def code(self):
        return self.out.get("code") if isinstance(self.out, dict) else None

    def __repr__(self):
        return f"Outcome(rc={self.rc}, stdout={self.stdout!r}, stderr={self.stderr[-1500:]!r})"


class Runner:
    """Executes the plugin like a runtime: env vars and stdin, nothing else."""

    def __init__(self, bin_dir, extra_path=(SYSTEM_CNI,)):
        self.bin_dir = str(bin_dir)
        self.exe = os.path.join(self.bin_dir, "vswitch")
        self.cni_path = os.pathsep.join([self.bin_dir, *extra_path])

    def env(self, command, cid=None, ifname="eth0", netns=None, args=None, **extra):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
               "CNI_PATH": self.cni_path}
        if cid is not None:
            env["CNI_CONTAINERID"] = cid
        if ifname is not None and command not in ("GC", "STATUS", "VERSION"):
            env["CNI_IFNAME"] = ifname
        if netns is not None:
            env["CNI_NETNS"] = netns
        if args is not None:
            env["CNI_ARGS"] = args
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def run_env(self, env, stdin):
        if isinstance(stdin, dict):
            stdin = json.dumps(stdin)
        if isinstance(stdin, str):
            stdin = stdin.encode()
        p = subprocess.run([self.exe], input=stdin, env=env, capture_output=True, timeout=120)
        return Outcome(p.returncode, p.stdout.decode(), p.stderr.decode())

    def run(self, command, conf, **kw):
        return self.run_env(self.env(command, **kw), conf)


def netconf(name, subnet, data_dir, version="1.0.0", socket=None, **extra):
    """One plugin configuration as libcni hands it to the plugin."""
    conf = {"cniVersion": version, "name": name, "type": "vswitch",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(data_dir)}}
    if socket:
        conf["socket"] = socket
    conf.update(extra)
    return conf


def reservations(data_dir, name):
    """host-local's reserved addresses of network ``name`` (its files named by IP)."""
    d = Path(data_dir) / name
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir()
                  if p.name[0].isdigit() and not p.name.startswith("last_reserved_ip"))


class Netns:
    """Pod namespaces with unique names; ``cleanup`` removes them all."""

    def __init__(self):
        self.names = []

    def new(self, prefix="p"):
        name = f"vc{prefix}{uid()}"
        sh("ip", "netns", "add", name)
        self.names.append(name)
        return name

    @staticmethod
    def path(name):
        return f"/run/netns/{name}"

    def delete(self, name):
        sh("ip", "netns", "del", name, check=False)
        if name in self.names:
            self.names.remove(name)

    def cleanup(self):
        for name in list(self.names):
            self.delete(name)


def nsexec(ns, *args, check=True):
    return sh("ip", "netns", "exec", ns, *args, check=check)


def links_in(ns):
    out = nsexec(ns, "ip", "-j", "link", "show").stdout
    return {link["ifname"]: link for link in json.loads(out or "[]")}


class Node:
    """vswitchd (with --test-faults) in a node namespace of its own."""

    def __init__(self, workdir, nets):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nets = nets
        self.ns = nets.new("n")
        self.socket = str(self.workdir / "vswitchd.sock")
        self.state_dir = str(self.workdir / "state")
        self.log_file = str(self.workdir / "vswitchd.log")
        self.subnet = f"10.{random.randrange(16, 250)}.{random.randrange(0, 250)}.0/24"
        self.proc = None

    def start(self, timeout_s=30.0):
        cmd = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "vswitch.daemon",
               "--socket", self.socket, "--state-dir", self.state_dir,
               "--log-file", self.log_file, "--test-faults"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self._stderr = open(self.workdir / "stderr.txt", "ab")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL,
                                     stderr=self._stderr)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vswitchd exited with {self.proc.returncode}:\n"
                                     f"{self.logs()}")
            try:
                rpc.call(self.socket, "status", timeout_s=2)
                return self
            except rpc.RpcError:
                time.sleep(0.05)
        raise AssertionError(f"vswitchd did not answer within {timeout_s} s:\n{self.logs()}")

    def call(self, op, **args):
        return rpc.call(self.socket, op, **args)

    def attachments(self):
        return self.call("list")["attachments"]

    def hostports(self):
        return self.call("hostports")["rules"]

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()

    def logs(self):
        out = []
        for f in (self.log_file, self.workdir / "stderr.txt"):
            try:
                out.append(Path(f).read_text()[-4000:])
            except OSError:
                pass
        return "\n".join(out)
