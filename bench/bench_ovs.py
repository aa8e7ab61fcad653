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
too), and stopped by the PIDs we started. Two TAP devices are created persistent, added to
a netdev bridge as ``type=tap`` ports, then moved into two namespaces we create ("pods",
OVS keeps the file descriptors it opened; it logs that it can no longer query the devices
by name, which is harmless). Measurements are those of bench_real.py with the same tools
(``bench.nettools``): iperf3 TCP with 1 and 4 streams, ping RTT, 64-byte UDP frames per
second counted at the receiving pod's interface. Rows use the figures (``group``) and
parameters of bench_real.py with subject ``ovs``, so the report puts them beside
vswitch and the bridge measured in the same run.

Skips with the reason when not root, or OVS, iperf3 or ping is not installed.
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

from bench import nettools
from bench.report import quick_mode, record

pytestmark = pytest.mark.integration

OVS_BINARIES = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl")
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")

QUICK = quick_mode()
TCP_SECONDS, TCP_OMIT_S, TCP_ROUNDS = (2, 0, 1) if QUICK else (8, 1, 3)
UDP_SECONDS, UDP_ROUNDS = (1, 1) if QUICK else (3, 3)
PING_COUNT, PING_INTERVAL_S = (100, 0.01) if QUICK else (1000, 0.005)


class OvsUserspace:
    """A private ovsdb-server + ovs-vswitchd under ``workdir``; ``stop()`` ends them."""

    def __init__(self, workdir):
        self.dir = Path(workdir)
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
            subprocess.run(["ip", "link", "del", br], capture_output=True)


class Pods:
    """Two pods (namespaces) whose interfaces are TAP ports of one switch."""

    def __init__(self, ns_a, ns_b, if_a, if_b, ip_a, ip_b, facts=None):
        self.ns_a, self.ns_b, self.if_a, self.if_b = ns_a, ns_b, if_a, if_b
        self.ip_a, self.ip_b = ip_a, ip_b
        self.facts = facts or {}      # recorded in every row's info


@pytest.fixture(scope="module")
def ovs_pods():
    nettools.require("iperf3", "ping", *OVS_BINARIES)
    if not SCHEMA.exists():
        pytest.skip(f"Open vSwitch schema {SCHEMA} missing (openvswitch-common)")
    if not Path("/dev/net/tun").exists():
        pytest.skip("/dev/net/tun missing")
    u = nettools.uid()
    workdir = tempfile.mkdtemp(prefix=f"bench-ovs-{u}-")
    ovs = OvsUserspace(workdir)
    bridge, tap_a, tap_b = f"bo{u}", f"toa{u}", f"tob{u}"
    ns_a, ns_b = f"bench-ovs-a-{u}", f"bench-ovs-b-{u}"
    net = random.randint(0, 255)
    ip_a, ip_b = f"10.233.{net}.1", f"10.233.{net}.2"
    made_taps, made_ns = [], []
    try:
        ovs.start()
        ovs.add_bridge(bridge)
        for tap, ns, ip in ((tap_a, ns_a, ip_a), (tap_b, ns_b, ip_b)):
            nettools.run(["ip", "tuntap", "add", "mode", "tap", "name", tap])
            made_taps.append((tap, None))
            ovs.add_tap_port(bridge, tap)
            nettools.Netns(ns).__enter__()
            made_ns.append(ns)
            nettools.run(["ip", "link", "set", tap, "netns", ns])
            made_taps[-1] = (tap, ns)
            nettools.run(["ip", "addr", "add", f"{ip}/24", "dev", tap], ns=ns)
            nettools.run(["ip", "link", "set", tap, "up"], ns=ns)
        nettools.run(["ip", "link", "set", bridge, "up"], check=False)
        nettools.wait_reachable(ns_a, ip_b)
        nettools.wait_reachable(ns_b, ip_a)
        version = subprocess.run(["ovs-vswitchd", "--version"], capture_output=True,
                                 text=True).stdout.split("\n")[0]
        yield Pods(ns_a, ns_b, tap_a, tap_b, ip_a, ip_b,
                   facts={"ovs": version, "userspace_tso": ovs.tso_enabled()})
    finally:
        for tap, ns in made_taps:
            cmd = ["ip", "link", "del", tap]
            nettools.run(cmd if ns is None else ["ip", "-n", ns, *cmd[1:]], check=False)
        for ns in made_ns:
            nettools.run(["ip", "netns", "del", ns], check=False)
        ovs.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("streams", [1, 4])
def test_ovs_tcp(benchmark, ovs_pods, streams):
    """Pod-to-pod TCP goodput (Gbit/s, receiver side) through OVS userspace with TSO."""
    gbps = []
    record(benchmark, group="real-tcp", subject="ovs", unit="gbps", samples=gbps,
           target="tap-tcp", streams=streams,
           info={"seconds": TCP_SECONDS, "omit_s": TCP_OMIT_S, "tool": "iperf3 -R",
                 **ovs_pods.facts})

    def once():
        gbps.append(nettools.tcp_rate_bps(ovs_pods.ns_a, ovs_pods.ns_b, ovs_pods.ip_a,
                                          TCP_SECONDS, streams, TCP_OMIT_S) / 1e9)
    benchmark.pedantic(once, rounds=TCP_ROUNDS, iterations=1)


def test_ovs_ping(benchmark, ovs_pods):
    """Pod-to-pod ping RTT (ms): every reply is a sample."""
    rtts = []
    record(benchmark, group="real-ping", subject="ovs", unit="rtt_ms", samples=rtts,
           target="ping-rtt", info={"count": PING_COUNT, "interval_s": PING_INTERVAL_S,
                                    **ovs_pods.facts})

    def once():
        rtts.extend(nettools.ping_rtts_ms(ovs_pods.ns_a, ovs_pods.ip_b, PING_COUNT,
                                          PING_INTERVAL_S))
    benchmark.pedantic(once, rounds=1, iterations=1)


def test_ovs_udp_64B(benchmark, ovs_pods):
    """64-byte UDP frames per second (Mpps) arriving at the receiving pod's interface."""
    mpps, sent = [], []
    record(benchmark, group="real-udp-64B", subject="ovs", unit="mpps", samples=mpps,
           target="udp-64B", info={"seconds": UDP_SECONDS, "sent_mpps": sent,
                                   "frame_bytes": 60, "counted_at": "receiver interface",
                                   **ovs_pods.facts})

    def once():
        rx, tx = nettools.udp_flood_pps(ovs_pods.ns_a, ovs_pods.ns_b, ovs_pods.ip_b,
                                        ovs_pods.if_b, UDP_SECONDS)
        mpps.append(rx / 1e6)
        sent.append(round(tx / 1e6, 4))
    benchmark.pedantic(once, rounds=UDP_ROUNDS, iterations=1)
