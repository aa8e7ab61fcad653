"""Pod to pod across two nodes over VXLAN: vswitch nodes against the kernel's VXLAN node
pair as flannel builds it (issue 13), and our own same-node RTT in the same run.

Theory of operation
-------------------
Two nodes on one underlay (``vswitch.lab.cluster.Cluster``: an underlay namespace with a
Linux bridge, MTU 1500, node namespaces on veths), two pods on each, the two nodes peers
of each other:

- ``kernel-vxlan``: ``KernelNode`` x 2, each built as flannel's VXLAN backend builds a
  Linux node (a ``vxlan`` device with ``nolearning``, VNI 1, UDP port 4789; a ``cni0``
  bridge with veth pods, pod MTU 1450; one route, neighbour and FDB entry for the other
  node). This is the anchor the issue's goals are ratios of. Offloads as the kernel sets
  them: TSO segments cross the veths whole (UDP-tunnel GSO), as a NIC with tunnel offload
  would take them;
- ``vswitch``: ``VswitchNode`` x 2 (vswitchd with ``--uplink`` on the underlay, pods
  through the CNI plugin, peers through the ``peers`` op). An AF_PACKET uplink cannot send
  a UDP-tunnel GSO packet, but it takes a UDP GSO (USO) one: each 64 KiB segment leaves as
  two UDP GSO packets of ready VXLAN segments (docs/datapath.md D54), which cross the
  veths and the bridge whole; the peer's reader cuts them and its TAP writer merges the
  inner segments back into one TSO frame;
- ``vswitch-segments`` (TCP only): the same with ``--tunnel-gso segments`` (D51): each
  64 KiB segment leaves as ~45 wire-size frames, each crossing the underlay on its own;
- ``vswitch-busy`` (RTT only): the same with ``--busy-poll`` on both daemons (no wakeup on
  either node): the issue's second RTT goal, <= 3x the kernel pair. Its nodes exist only
  during its own test (two daemons that never sleep fill both cores of this machine);
- ``ovs-vxlan``: Open vSwitch's userspace datapath on each node (``pairs_ovs_vxlan``:
  a ``vxlan`` port on the pods' bridge, the underlay NIC on a second netdev bridge that
  holds the node's underlay address, OVS's userspace tunnelling), cross-node rows only;
  its two pods share one overlay subnet (an L2 overlay: a bare VXLAN port routes nothing).
  Userspace TSO is off: Open vSwitch 3.1 (Debian 12) drops every TSO packet headed into a
  tunnel ("Tunneling packets with HW offload flags is not supported: packet dropped") and
  TCP stalls, so the pods' kernels segment to the pod MTU (``userspace_tso`` in ``info``);
- ``c-floor`` (TCP and RTT): ``vxfloor`` (bench/vxfloor.c, bench/floor.py) on the same
  underlay: the least work this design (pod TAPs, an AF_PACKET uplink, a process per node)
  can do, with the inner checksums vswitchd computes. No MAC table, routing, checks,
  shaping or counters; its two pods share one overlay subnet. Where vswitch sits between
  c-floor and the kernel pair says whether a gap is our loop's or the design's;
- ``c-floor-nocsum`` (TCP only): the same without the inner TCP checksums (left 0: a wire
  that cuts the packets would deliver segments every receiver drops), the bound of any
  saving on them.

The underlay bridge stands for a physical L2 segment, which filters nothing: its
namespace gets ``net.bridge.bridge-nf-call-{iptables,ip6tables,arptables}=0``
(``br_netfilter`` is loaded on this machine and its hooks are on by default in every new
namespace, where perf put about a tenth of the vswitch sender's CPU per wire-size frame; the nodes'
own bridges keep them, as kube-proxy wants them on a Kubernetes node). Every subject runs
on the same underlay settings; ``underlay_bridge_nf`` in each row's ``info`` says so.

Measured with bench_real.py's ``measure_*`` functions and durations (the same code as the
same-node figures, so ``cross-node-*`` sits beside ``real-*`` of the same run):

- ``cross-node-tcp``: iperf3 from pod A (node 1) to pod B (node 2), 1 and 4 streams,
  Gbit/s counted by the receiver. vswitch rows add the daemons' loop counters and the
  receive coalescing effect to ``info``: ``wire_frames`` (VXLAN frames node 2 read from
  its uplink), ``tap_writes`` (skbs pod B's eth0 received) and ``frames_per_tap_write``;
- ``cross-node-rtt``: ping from A to B, every reply a sample (ms);
- ``same-node-rtt``: ping from A to the other pod A2 on node 1, the same way: the figure
  the cross-node RTT goal is a ratio of (issue 13: within 1.3x of our same-node RTT),
  measured on the same nodes in the same run; the kernel pair's row is its ``cni0``
  bridge;
- ``cross-node-udp-64B``: 60-byte frames (64 with the FCS) flat out from A to a UDP socket
  in B, counted at B's eth0 (Mpps).

Goals (issue 13): TCP >= 0.8x kernel-vxlan, 64-byte frames >= 1.0x kernel-vxlan,
cross-node RTT <= 1.3x vswitch's same-node RTT, and cross-node-rtt[vswitch-busy] <= 3x
kernel-vxlan. The report's ratio column gives the first two; the third is
cross-node-rtt[vswitch] / same-node-rtt[vswitch] of the same run, the fourth
cross-node-rtt[vswitch-busy] / cross-node-rtt[kernel-vxlan].

    python -m bench --files bench_crossnode.py     # as root: iperf3, ping
"""
from __future__ import annotations

import shutil
import tempfile
import time

import pytest

from vswitch import lab
from vswitch.lab import cluster

from . import bench_real, floor, nettools
from .bench_ovs import OVS_BINARIES, SCHEMA, OvsUserspace
from .bench_real import (PING_COUNT, PING_INTERVAL_S, TCP_OMIT_S, TCP_ROUNDS, TCP_SECONDS,
                         UDP_ROUNDS, UDP_SECONDS)

pytestmark = pytest.mark.integration

KINDS = {"vswitch": "vswitch", "kernel-vxlan": "kernel", "vswitch-segments": "vswitch", "vswitch-busy": "vswitch"}
SUBJECTS = ("vswitch", "kernel-vxlan")
#: cross-node figures only: OVS has no routed pod subnets here, so no same-node row of ours
CROSS_SUBJECTS = (*SUBJECTS, "ovs-vxlan")
#: TCP also with vswitchd --tunnel-gso segments (D51: one write per wire segment) beside the
#: default UDP GSO packets (D54): issue 13 asks for both ways of sending TSO measured
TCP_SUBJECTS = (*CROSS_SUBJECTS, "vswitch-segments", "c-floor", "c-floor-nocsum")
DAEMON_ARGS = {"vswitch-segments": ("--tunnel-gso", "segments"), "vswitch-busy": ("--busy-poll",)}
#: RTT also with both daemons in --busy-poll (issue 13: cross-node RTT <= 3x the kernel pair
#: once a busy-poll mode exists); its nodes live for one test only (``pairs_vswitch_busy``)
RTT_SUBJECTS = (*CROSS_SUBJECTS, "vswitch-busy", "c-floor")
OVS_OVERLAY = "10.246.0.{}/24"          # the ovs-vxlan pods: one L2 segment across both nodes

def _pairs(subject, daemon_args=None):
    """Two nodes of ``subject``'s kind with two pods each, peers; yields
    {"cross": A -> B on the other node, "same": A -> A2 on A's node, "cluster": c}.
    ``daemon_args``: vswitchd's extra arguments (None: the subject's, DAEMON_ARGS)."""
    nettools.require("iperf3", "ping")
    if daemon_args is None:
        daemon_args = DAEMON_ARGS.get(subject, ())
    c = cluster.Cluster(2, kinds=KINDS[subject], pods_per_node=2, port=cluster.IANA_VXLAN_PORT,
                        node_kwargs={"vswitch": {"daemon_args": tuple(daemon_args)}})
    c.open()            # removes what it made if it fails
    try:
        bridge_nf = nettools.underlay_plain(c.underlay)
        n1, n2 = c.nodes
        facts = {"nodes": 2, "kind": KINDS[subject], "vni": c.vni, "udp_port": c.port,
                 "underlay_mtu": c.mtu, "pod_mtu": n1.pod_mtu, "underlay_bridge_nf": bridge_nf,
                 "daemon_args": " ".join(daemon_args),
                 "datapath": "pod veth - cni0 - flannel.1 (vxlan) - eth0 veth - underlay bridge"
                 if subject == "kernel-vxlan" else "pod TAP - vswitchd - uplink AF_PACKET"}
        same = {**facts, "path": "same node: pod veth - cni0 - pod veth" if subject == "kernel-vxlan"
                else "same node: pod TAP - vswitchd - pod TAP"}
        yield {"cross": bench_real.connected_pair(n1.pods[0], n2.pods[0], facts),
               "same": bench_real.connected_pair(n1.pods[0], n1.pods[1], same),
               "cluster": c}
    finally:
        c.close()


@pytest.fixture(scope="module")
def pairs_vswitch():
    yield from _pairs("vswitch")


@pytest.fixture(scope="module")
def pairs_vswitch_segments():
    yield from _pairs("vswitch-segments")


@pytest.fixture()
def pairs_vswitch_busy():
    """Function scope: two daemons polling without sleep take both cores of a 2-core
    machine, so they must not outlive the test that measures them (nor run beside it)."""
    yield from _pairs("vswitch-busy")


@pytest.fixture(scope="module")
def pairs_c_floor():
    yield from floor.floor_pairs(csum=True)


@pytest.fixture(scope="module")
def pairs_c_floor_nocsum():
    yield from floor.floor_pairs(csum=False)


@pytest.fixture(scope="module")
def pairs_kernel_vxlan():
    yield from _pairs("kernel-vxlan")


class _OvsNoTso(OvsUserspace):
    """OVS userspace with userspace TSO off: Open vSwitch 3.1 drops every TSO packet
    headed into a tunnel port ("vxlan_sys_4789: Tunneling packets with HW offload flags is
    not supported: packet dropped" in ovs-vswitchd.log, and TCP stalls), so with a VXLAN
    port it only works without TSO: the pods' TAPs without the virtio-net header, their
    kernels segmenting to the pod MTU."""

    def vsctl(self, *args, wait=True):
        args = tuple("other_config:userspace-tso-enable=false"
                     if a == "other_config:userspace-tso-enable=true" else a for a in args)
        return super().vsctl(*args, wait=wait)


def _wait_link(ns, ifname, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while lab.nsexec(ns, "ip", "link", "show", ifname, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{ifname} did not appear in {ns} within {timeout_s} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pairs_ovs_vxlan():
    """Two OVS userspace nodes on the cluster's underlay, one pod (TAP) on each, VXLAN
    between them, as OVS's userspace tunnelling is set up: ``brphy`` (netdev) holding the
    underlay NIC as a port and the node's underlay address on its internal port (OVS
    routes and ARPs the tunnel through it), ``brint`` (netdev, NORMAL) with the pod's TAP
    and a ``vxlan`` port (``remote_ip`` the other node, key = VNI 1, port 4789). The pods
    share one overlay subnet (an L2 overlay, what a bare OVS VXLAN port gives; no routing
    between pod subnets), MTU 1450."""
    nettools.require("iperf3", "ping", *OVS_BINARIES)
    if not SCHEMA.exists():
        pytest.skip(f"Open vSwitch schema {SCHEMA} missing (openvswitch-common)")
    underlay = cluster.Underlay().open()
    nss = lab.Namespaces(prefix="cw")
    ovss, workdirs, pods = [], [], []
    try:
        nodes = []
        for i in (1, 2):
            ns = nss.new(f"{i}n")
            nodes.append((ns, underlay.attach(f"n{i}", ns, i)))
        for i, (ns, ip) in enumerate(nodes):
            workdirs.append(tempfile.mkdtemp(prefix=f"bench-ovsvx-{lab.uid()}-"))
            ovs = _OvsNoTso(workdirs[-1], ns)
            ovss.append(ovs)
            ovs.start()
            ovs.add_bridge("brphy")
            ovs.add_bridge("brint")
            _wait_link(ns, "brphy")
            _wait_link(ns, "brint")
            ovs.vsctl("add-port", "brphy", cluster.UNDERLAY_IFNAME)
            lab.nsexec(ns, "ip", "addr", "flush", "dev", cluster.UNDERLAY_IFNAME)
            lab.nsexec(ns, "ip", "addr", "add", f"{ip}/{underlay.net.prefixlen}", "dev", "brphy")
            for dev in ("brphy", "brint"):
                lab.nsexec(ns, "ip", "link", "set", dev, "up")
            ovs.vsctl("add-port", "brint", "vx0", "--", "set", "interface", "vx0", "type=vxlan",
                      f"options:remote_ip={nodes[1 - i][1]}", f"options:local_ip={ip}",
                      f"options:key={cluster.DEFAULT_VNI}",
                      f"options:dst_port={cluster.IANA_VXLAN_PORT}")
            tap = f"to{i}{lab.uid()}"
            lab.nsexec(ns, "ip", "tuntap", "add", "mode", "tap", "name", tap)
            ovs.add_tap_port("brint", tap)
            pod_ns = nss.new(f"{i}p")
            lab.nsexec(ns, "ip", "link", "set", tap, "netns", pod_ns)
            pod_ip = OVS_OVERLAY.format(i + 1)
            lab.nsexec(pod_ns, "ip", "link", "set", tap, "mtu",
                       underlay.mtu - cluster.VXLAN_OVERHEAD_BYTES)
            lab.nsexec(pod_ns, "ip", "addr", "add", pod_ip, "dev", tap)
            lab.nsexec(pod_ns, "ip", "link", "set", tap, "up")
            pods.append(bench_real.Endpoint(pod_ns, pod_ip.split("/")[0], tap))
        version = lab.sh("ovs-vswitchd", "--version").stdout.split("\n")[0]
        facts = {"nodes": 2, "kind": "ovs", "ovs": version, "vni": cluster.DEFAULT_VNI,
                 "udp_port": cluster.IANA_VXLAN_PORT, "underlay_mtu": underlay.mtu,
                 "pod_mtu": underlay.mtu - cluster.VXLAN_OVERHEAD_BYTES,
                 "userspace_tso": any(o.tso_enabled() for o in ovss),
                 "underlay_bridge_nf": nettools.underlay_plain(underlay),
                 "datapath": "pod TAP - ovs-vswitchd brint - vxlan port - brphy - eth0 AF_PACKET"}
        yield {"cross": bench_real.connected_pair(pods[0], pods[1], facts)}
    finally:
        try:
            for ovs in ovss:
                ovs.stop()              # before their namespaces go
        finally:
            nss.cleanup()
            underlay.close()
            for d in workdirs:
                shutil.rmtree(d, ignore_errors=True)


def _pairs_of(request, subject):
    return request.getfixturevalue(f"pairs_{subject.replace('-', '_')}")


def _rx_packets(ns, ifname) -> int:
    """Packets (skbs: a GSO frame counts once) ``ifname`` in namespace ``ns`` received."""
    return int(lab.nsexec(ns, "cat", f"/sys/class/net/{ifname}/statistics/rx_packets").stdout)


class _VswitchCounters:
    """The daemons' loop counters and the receive coalescing effect over one measurement
    (vswitch rows only): added to the row's ``info``."""

    def __init__(self, pairs):
        c = pairs["cluster"]
        self.nodes = c.nodes
        self.pod_b = pairs["cross"].b
        self.uplink = cluster.UNDERLAY_IFNAME

    def _snap(self):
        loops = [n.daemon.call("status")["loop"] for n in self.nodes]
        up_rx = self.nodes[1].daemon.call("counters")["ports"][self.uplink]["rx_packets"]
        return loops, up_rx, _rx_packets(self.pod_b.ns, self.pod_b.ifname)

    def __enter__(self):
        self.before = self._snap()
        return self

    def __exit__(self, *exc):
        self.after = self._snap()

    def info(self) -> dict:
        (l0, u0, t0), (l1, u1, t1) = self.before, self.after
        out = {f"loop_node{i + 1}": {k: b[k] - a[k] for k in b} for i, (a, b) in enumerate(zip(l0, l1))}
        out["wire_frames"], out["tap_writes"] = u1 - u0, t1 - t0
        out["frames_per_tap_write"] = round((u1 - u0) / (t1 - t0), 2) if t1 > t0 else None
        return out


@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("subject", TCP_SUBJECTS)
def test_cross_node_tcp(benchmark, request, subject, streams):
    """TCP goodput between pods on two nodes (Gbit/s, receiver side)."""
    pairs = _pairs_of(request, subject)
    if not subject.startswith("vswitch"):
        bench_real.measure_tcp(benchmark, pairs["cross"], "cross-node-tcp", subject, streams,
                               TCP_SECONDS, TCP_OMIT_S, TCP_ROUNDS)
        return
    with _VswitchCounters(pairs) as counted:
        bench_real.measure_tcp(benchmark, pairs["cross"], "cross-node-tcp", subject, streams,
                               TCP_SECONDS, TCP_OMIT_S, TCP_ROUNDS)
    benchmark.extra_info["info"].update(counted.info())


@pytest.mark.parametrize("subject", RTT_SUBJECTS)
def test_cross_node_rtt(benchmark, request, subject):
    """ping RTT between pods on two nodes (ms): every reply is a sample."""
    bench_real.measure_ping(benchmark, _pairs_of(request, subject)["cross"], "cross-node-rtt",
                            subject, PING_COUNT, PING_INTERVAL_S)


@pytest.mark.parametrize("subject", (*SUBJECTS, "vswitch-busy", "c-floor"))
def test_same_node_rtt(benchmark, request, subject):
    """ping RTT between two pods on one node of the same cluster (ms): what cross-node-rtt
    is compared with (issue 13: vswitch's cross-node RTT within 1.3x of its same-node RTT)."""
    bench_real.measure_ping(benchmark, _pairs_of(request, subject)["same"], "same-node-rtt",
                            subject, PING_COUNT, PING_INTERVAL_S)


@pytest.mark.parametrize("subject", CROSS_SUBJECTS)
def test_cross_node_udp_64B(benchmark, request, subject):
    """64-byte UDP frames per second (Mpps) arriving at the pod on the other node."""
    bench_real.measure_udp(benchmark, _pairs_of(request, subject)["cross"], "cross-node-udp-64B",
                           subject, UDP_SECONDS, UDP_ROUNDS)
