"""Helpers of the CNI conformance suite: run the installed plugin as a runtime does.

Theory of operation: ``install_plugin`` writes the real ``vswitch`` plugin (vswitch_cni.install)
into a temporary bin dir; :class:`Runner` executes it with ``CNI_*`` variables and the
configuration on stdin, exactly like libcni's RawExec (CNI_PATH = that bin dir, then
Debian's /usr/lib/cni for host-local), and returns the exit status with stdout parsed;
unlike ``vswitch.lab.CniChain`` it runs one plugin and lets a test leave out or garble any
variable. The kernel plumbing is ``vswitch.lab``'s: :class:`Node` is ``lab.Daemon`` (with
--test-faults) in a node namespace created for the test, with its own socket and state
dir, and only the PID it started is ever signalled; :class:`Netns` is ``lab.Namespaces``
naming pod namespaces ``vc<role>`` plus the pid and a random suffix, with ``lo`` left
down as a runtime leaves it (the plugin must bring it up), removed in every outcome.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

from vswitch_cni.install import install
from vswitch import lab
from vswitch.lab import nsexec, sh, uid  # noqa: F401

SYSTEM_CNI = lab.SYSTEM_CNI_PATH
skip_reason = lab.kernel_unavailable


def host_local_missing():
    if not os.access(os.path.join(SYSTEM_CNI, "host-local"), os.X_OK):
        return ("needs host-local in /usr/lib/cni "
                "(apt-get install -y containernetworking-plugins)")
    return None


def install_plugin(bin_dir):
    """The relocatable plugin, pinned to this interpreter (``#!python -IS``, as
    ``install-cni --python`` writes it): the same archive as the default, without the
    PATH lookup of python3, which here may be a slow pyenv shim (tests/cni/test_zipapp.py
    runs the default one)."""
    exe, _ = install(str(bin_dir), str(Path(bin_dir).parent / "net.d"),
                     python=os.path.realpath(sys.executable))
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


class Netns(lab.Namespaces):
    """Pod namespaces ``vc<role><uid>``, ``lo`` down; ``cleanup`` removes them all."""

    def __init__(self):
        super().__init__("vc", lo_up=False)

    def new(self, prefix="p"):
        return super().new(prefix)


def links_in(ns):
    out = nsexec(ns, "ip", "-j", "link", "show").stdout
    return {link["ifname"]: link for link in json.loads(out or "[]")}


class Node(lab.Daemon):
    """vswitchd (with --test-faults) in a node namespace of its own."""

    def __init__(self, workdir, nets):
        self.nets = nets
        super().__init__(nets.new("n"), workdir, ["--test-faults"])
        self.subnet = f"10.{random.randrange(16, 250)}.{random.randrange(0, 250)}.0/24"

    def start(self, timeout_s=30.0):
        return super().start(timeout_s)

    def attachments(self):
        return self.call("list")["attachments"]

    def hostports(self):
        return self.call("hostports")["rules"]

    def stop(self):
        """SIGTERM; a daemon still running after 30 s is killed (-9) with a warning."""
        try:
            super().stop()
        except RuntimeError as exc:
            warnings.warn(str(exc))
