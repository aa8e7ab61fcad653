"""Pod to pod across two nodes over VXLAN: the kernel's VXLAN node pair as flannel builds it,
and vswitch nodes beside it once the core encapsulates (issue 13).

Theory of operation
-------------------
Two nodes on one underlay (``vswitch.lab.cluster.Cluster``: an underlay namespace with a
Linux bridge, MTU 1500, node namespaces on veths), one pod on each, the two nodes peers of
each other:

- ``kernel-vxlan``: ``KernelNode`` x 2, each built as flannel's VXLAN backend builds a
  Linux node (a ``vxlan`` device with ``nolearning``, VNI 1, UDP port 4789; a ``cni0``
  bridge with a veth pod, pod MTU 1450; one route, neighbour and FDB entry for the other
  node). This is the anchor the issue's goals are ratios of. Offloads as the kernel sets
  them: TSO segments cross the veths whole (UDP-tunnel GSO), as a NIC would take them;
- ``vswitch``: ``VswitchNode`` x 2 (vswitchd with ``--uplink`` on the underlay, pods
  through the CNI plugin). Its peers cannot be wired until the core has VXLAN and the
  daemon a ``peers`` op (issue 13.1/13.2; ``VswitchNode.WAITS_FOR`` says so, and
  ``add_peer`` raises ``NotImplementedError``). Until then the ``vswitch`` subject is not
  collected at all, and every ``kernel-vxlan`` row carries the note why: a skipped
  subject would fail the whole run (the runner requires a row from every subject a file
  selects, issue 17), and a row without a measurement is never recorded. When
  ``WAITS_FOR`` becomes None the vswitch rows are measured with no change here; should
  building its pair still raise ``NotImplementedError``, that test skips with the reason.

Measured with bench_real.py's ``measure_*`` functions and durations (the same code as the
same-node figures, so ``cross-node-*`` sits beside ``real-*`` of the same run):

- ``cross-node-tcp``: iperf3 from pod A (node 1) to pod B (node 2), 1 and 4 streams,
  Gbit/s counted by the receiver;
- ``cross-node-rtt``: ping from A to B, every reply a sample (ms);
- ``cross-node-udp-64B``: 60-byte frames (64 with the FCS) flat out from A to a UDP socket
  in B, counted at B's eth0 (Mpps).

    python -m bench --files bench_crossnode.py bench_real.py     # as root: iperf3, ping
"""
from __future__ import annotations

import pytest

from vswitch.lab import cluster

from . import bench_real, nettools
from .bench_real import (PING_COUNT, PING_INTERVAL_S, TCP_OMIT_S, TCP_ROUNDS, TCP_SECONDS,
                         UDP_ROUNDS, UDP_SECONDS)

pytestmark = pytest.mark.integration

KINDS = {"vswitch": "vswitch", "kernel-vxlan": "kernel"}
NOT_YET = "the core has no VXLAN yet (issue 13.1)"
#: vswitch is measured once its nodes can be peers (see the module docstring)
SUBJECTS = ("kernel-vxlan",) if cluster.VswitchNode.WAITS_FOR else ("vswitch", "kernel-vxlan")
NOTE = (None if "vswitch" in SUBJECTS else
        f"vswitch not measured across nodes: {NOT_YET}; kernel-vxlan is the anchor")


def _noted(benchmark):
    if NOTE:
        benchmark.extra_info["note"] = NOTE


def _pair(subject):
    """Two nodes of ``subject``'s kind, a pod on each, peers; yields a connected PodPair."""
    nettools.require("iperf3", "ping")
    c = cluster.Cluster(2, kinds=KINDS[subject], pods_per_node=1, port=cluster.IANA_VXLAN_PORT)
    try:
        c.open()            # removes what it made if it fails
    except NotImplementedError as exc:
        pytest.skip(f"{NOT_YET}: {exc}")
    try:
        n1, n2 = c.nodes
        facts = {"nodes": 2, "kind": KINDS[subject], "vni": c.vni, "udp_port": c.port,
                 "underlay_mtu": c.mtu, "pod_mtu": n1.pod_mtu,
                 "datapath": "pod veth - cni0 - flannel.1 (vxlan) - eth0 veth - underlay bridge"
                 if subject == "kernel-vxlan" else "pod TAP - vswitchd - uplink AF_PACKET"}
        yield bench_real.connected_pair(n1.pods[0], n2.pods[0], facts)
    finally:
        c.close()


@pytest.fixture(scope="module")
def pair_vswitch():
    yield from _pair("vswitch")


@pytest.fixture(scope="module")
def pair_kernel_vxlan():
    yield from _pair("kernel-vxlan")


def _pair_of(request, subject):
    return request.getfixturevalue(f"pair_{subject.replace('-', '_')}")


@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("subject", SUBJECTS)
def test_cross_node_tcp(benchmark, request, subject, streams):
    """TCP goodput between pods on two nodes (Gbit/s, receiver side)."""
    pair = _pair_of(request, subject)
    bench_real.measure_tcp(benchmark, pair, "cross-node-tcp", subject, streams, TCP_SECONDS,
                           TCP_OMIT_S, TCP_ROUNDS)
    _noted(benchmark)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_cross_node_rtt(benchmark, request, subject):
    """ping RTT between pods on two nodes (ms): every reply is a sample."""
    pair = _pair_of(request, subject)
    bench_real.measure_ping(benchmark, pair, "cross-node-rtt", subject, PING_COUNT,
                            PING_INTERVAL_S)
    _noted(benchmark)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_cross_node_udp_64B(benchmark, request, subject):
    """64-byte UDP frames per second (Mpps) arriving at the pod on the other node."""
    pair = _pair_of(request, subject)
    bench_real.measure_udp(benchmark, pair, "cross-node-udp-64B", subject, UDP_SECONDS,
                           UDP_ROUNDS)
    _noted(benchmark)
