"""Open vSwitch's userspace datapath with TAP ports, as a peer of vswitch and the bridge.

Theory of operation
-------------------
Open vSwitch (Debian ``openvswitch-switch``) is the established userspace switch. With
``datapath_type=netdev`` and ``type=tap`` ports it does what vswitchd does: it reads and
writes frames of pods' TAP devices in user space. With
``other_config:userspace-tso-enable=true`` it opens the TAPs with the virtio-net header
and TSO, the offloads that decide TCP throughput through a TAP switch
(/work/shared/PERFORMANCE-FACTS.md), so the comparison is fair.

The benchmark runs its own OVS, never the system's: a fresh database, ``ovsdb-server`` and
``ovs-vswitchd`` started as our child processes with their run directory, database,
sockets, pid files and logs in a temporary directory (``OVS_RUNDIR`` etc. point there
too), and stopped by the PIDs we started. ``ovs-vswitchd`` runs inside a node namespace of
our own, so the devices it makes (the netdev datapath's ``ovs-netdev`` and the bridge's
internal TAP, whose names are OVS's, not ours) land there and never meet those of another
OVS on the machine (two runs at once, or the system's). Two TAP devices are created
persistent in that namespace, added to
a netdev bridge as ``type=tap`` ports, then moved into two namespaces we create ("pods",
OVS keeps the file descriptors it opened; it logs that it can no longer query the devices
by name, which is harmless). Measurements are bench_real.py's own (``measure_*``, with
its durations): iperf3 TCP with 1 and 4 streams, ping RTT, 64-byte UDP frames per second
to a UDP socket in the receiving pod, counted at its interface. Rows use the figures
(``group``) and parameters of bench_real.py with subject ``ovs``, so the report puts them
beside vswitch and the bridge measured in the same run.

Skips with the reason when not root, /dev/net/tun is missing, or OVS, iperf3 or ping is
not installed.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from . import bench_real, nettools
from .bench_real import (PING_COUNT, PING_INTERVAL_S, TCP_OMIT_S, TCP_ROUNDS,
                              TCP_SECONDS, UDP_ROUNDS, UDP_SECONDS)
from vswitch import lab

pytestmark = pytest.mark.integration

OVS_BINARIES = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl")
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")



class OvsUserspace:
    """A private ovsdb-server + ovs-vswitchd under ``workdir``; ``stop()`` ends them."""

    def __init__(self, workdir, netns=None):
        self.dir = Path(workdir)
        self.netns = netns       # the namespace ovs-vswitchd runs in (its devices go there)
        self.db_sock = self.dir / "db.sock"
        self.env = dict(os.environ, OVS_RUNDIR=str(self.dir), OVS_DBDIR=str(self.dir),
                        OVS_LOGDIR=str(self.dir), OVS_SYSCONFDIR=str(self.dir))
        self.procs = []          # Popen objects of the daemons we started
        self.bridges = []

    def vsctl(self, *args, wait=True):
        cmd = ["ovs-vsctl", f"--db=unix:{self.db_sock}", "--timeout=20"]
        if not wait:
            cmd.append("--no-wait")
        out = subprocess.run([*cmd, *args], capture_output=True, text=True, env=self.env,
                             timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"ovs-vsctl {' '.join(args)}: {out.stderr.strip()} "
                               f"(logs in {self.dir})")
        return out.stdout

    def _spawn(self, name, cmd):
        if self.netns:           # ip netns exec execs: the PID is the daemon's own
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = open(self.dir / f"{name}.out", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                cwd=self.dir)
        log.close()
        self.procs.append(proc)
        return proc

    def start(self):
        subprocess.run(["ovsdb-tool", "create", str(self.dir / "conf.db"), str(SCHEMA)],
                       check=True, capture_output=True, env=self.env)
        server = self._spawn("ovsdb-server", [
            "ovsdb-server", str(self.dir / "conf.db"), f"--remote=punix:{self.db_sock}",
            f"--pidfile={self.dir / 'ovsdb-server.pid'}",
            f"--unixctl={self.dir / 'ovsdb-server.ctl'}",
            f"--log-file={self.dir / 'ovsdb-server.log'}"])
        deadline = time.monotonic() + 10
        while not self.db_sock.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ovsdb-server did not start: "
                                   f"{(self.dir / 'ovsdb-server.out').read_text()[-500:]}")
            time.sleep(0.05)
        self.vsctl("init", wait=False)
        self.vsctl("set", "Open_vSwitch", ".", "other_config:userspace-tso-enable=true",
                   wait=False)
        self._spawn("ovs-vswitchd", [
            "ovs-vswitchd", f"unix:{self.db_sock}",
            f"--pidfile={self.dir / 'ovs-vswitchd.pid'}",
            f"--unixctl={self.dir / 'ovs-vswitchd.ctl'}",
            f"--log-file={self.dir / 'ovs-vswitchd.log'}"])
        return self

    def add_bridge(self, name):
        self.vsctl("add-br", name, "--", "set", "bridge", name, "datapath_type=netdev")
        self.bridges.append(name)

    def add_tap_port(self, bridge, tap):
        self.vsctl("add-port", bridge, tap, "--", "set", "Interface", tap, "type=tap")

    def tso_enabled(self):
        """Whether ovs-vswitchd logged that userspace TSO is on."""
        log = self.dir / "ovs-vswitchd.log"
        return log.exists() and \
            "Userspace TCP Segmentation Offloading support enabled" in log.read_text()

    def stop(self):
        for br in reversed(self.bridges):
            try:
                self.vsctl("--if-exists", "del-br", br)
            except Exception:
                pass
        for proc in reversed(self.procs):       # vswitchd first, then the database
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for br in self.bridges:                  # a netdev bridge's internal TAP, if left
            subprocess.run(["ip", *(["-n", self.netns] if self.netns else []), "link", "del",
                            br], capture_output=True)


@pytest.fixture(scope="module")
def ovs_pods():
    nettools.require("iperf3", "ping", *OVS_BINARIES)
    if not SCHEMA.exists():
        pytest.skip(f"Open vSwitch schema {SCHEMA} missing (openvswitch-common)")
    u = lab.uid()
    workdir = tempfile.mkdtemp(prefix=f"bench-ovs-{u}-")
    nss = lab.Namespaces(prefix="bo")
    ovs = None
    bridge = f"bo{u}"
    net = random.randint(0, 255)
    made_taps = []                  # (tap, the namespace it is in, or None)
    try:
        node = nss.new("node")
        ovs = OvsUserspace(workdir, node)
        ovs.start()
        ovs.add_bridge(bridge)
        ends = []
        for side in "ab":
            tap, ip = f"to{side}{u}", f"10.233.{net}.{len(ends) + 1}"
            lab.nsexec(node, "ip", "tuntap", "add", "mode", "tap", "name", tap)
            made_taps.append((tap, node))
            ovs.add_tap_port(bridge, tap)
            ns = nss.new(side)
            lab.nsexec(node, "ip", "link", "set", tap, "netns", ns)
            made_taps[-1] = (tap, ns)
            lab.nsexec(ns, "ip", "addr", "add", f"{ip}/24", "dev", tap)
            lab.nsexec(ns, "ip", "link", "set", tap, "up")
            ends.append(bench_real.Endpoint(ns, ip, tap))
        lab.nsexec(node, "ip", "link", "set", bridge, "up", check=False)
        version = lab.sh("ovs-vswitchd", "--version").stdout.split("\n")[0]
        yield bench_real.connected_pair(*ends, {"ovs": version,
                                                "userspace_tso": ovs.tso_enabled()})
    finally:
        for tap, ns in made_taps:
            lab.sh("ip", "-n", ns, "link", "del", tap, check=False)
        try:
            if ovs is not None:
                ovs.stop()                  # before its namespace goes
        finally:
            nss.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("streams", [1, 4])
def test_ovs_tcp(benchmark, ovs_pods, streams):
    """Pod-to-pod TCP goodput (Gbit/s, receiver side) through OVS userspace with TSO."""
    bench_real.measure_tcp(benchmark, ovs_pods, "real-tcp", "ovs", streams, TCP_SECONDS,
                           TCP_OMIT_S, TCP_ROUNDS, target="tap-tcp")


def test_ovs_ping(benchmark, ovs_pods):
    """Pod-to-pod ping RTT (ms): every reply is a sample."""
    bench_real.measure_ping(benchmark, ovs_pods, "real-ping", "ovs", PING_COUNT,
                            PING_INTERVAL_S, target="ping-rtt")


def test_ovs_udp_64B(benchmark, ovs_pods):
    """64-byte UDP frames per second (Mpps) arriving at the receiving pod's interface."""
    bench_real.measure_udp(benchmark, ovs_pods, "real-udp-64B", "ovs", UDP_SECONDS,
                           UDP_ROUNDS, target="udp-64B")
