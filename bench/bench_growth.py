"""Growth: the real-network figures against the number of pods on the node, vswitch
against the Linux bridge, same run.

Theory of operation
-------------------
One node per subject (``bench.podnet.Node``: vswitchd + the vswitch CNI plugin, or the
reference bridge plugin; host-local IPAM for both), kept for the whole module and grown
pod by pod through its CNI chain, as a runtime would. At each point of the grid the node
holds exactly ``pods`` pods (grown, or shrunk by DEL when ``-k`` picked an odd order),
and the figures are measured there:

- ``cni-add-growth`` (ms per pod): the CNI ADD of one more pod when ``pods`` are attached,
  ``PROBES`` times (each probe pod DELeted again, its DEL time in ``info``), at
  1, 10, 100, 250 pods (quick: 1, 10);
- ``real-tcp-growth`` (Gbit/s, 1 stream), ``real-ping-growth`` (every reply's RTT) and
  ``real-udp-64B-growth`` (Mpps counted at the receiver), between the first two pods
  while the others sit attached, at 2, 10, 100, 250 pods (quick: 2, 10; traffic needs two
  pods, so the grid starts at 2). The tools are bench_real.py's (``measure_*``), with
  shorter runs.

These are separate figures from bench_real.py's ``real-*`` (which have no ``pods``
parameter, and whose peers include OVS): the x-axis here is ``pods``. The cases run in
one order, pods ascending and the subjects alternating at each point, so both are
measured at nearly the same time on a noisy machine. Both nodes are removed at the end
whatever happens (vswitchd stopped by its PID, every namespace deleted).

    python -m bench --files bench_growth.py
"""
from __future__ import annotations

import statistics

import pytest

from . import podnet
from .bench_real import connected_pair, measure_ping, measure_tcp, measure_udp
from .report import quick_mode, record

pytestmark = pytest.mark.integration

QUICK = quick_mode()
ATTACH_GRID = (1, 10) if QUICK else (1, 10, 100, 250)
TRAFFIC_GRID = (2, 10) if QUICK else (2, 10, 100, 250)
PROBES = 3 if QUICK else 5
TCP_SECONDS, TCP_OMIT_S, TCP_ROUNDS = (2, 0, 1) if QUICK else (5, 1, 2)
UDP_SECONDS, UDP_ROUNDS = (1, 1) if QUICK else (2, 2)
PING_COUNT, PING_INTERVAL_S = (100, 0.01) if QUICK else (500, 0.005)
TOOLS = ("iperf3", "ping")
FIGURES = ("attach", "tcp", "ping", "udp")


def _cases():
    out = []
    for pods in sorted(set(ATTACH_GRID) | set(TRAFFIC_GRID)):
        for subject in podnet.SUBJECTS:
            for figure in FIGURES:
                grid = ATTACH_GRID if figure == "attach" else TRAFFIC_GRID
                if pods in grid:
                    out.append((subject, pods, figure))
    return out


CASES = _cases()


class Growth:
    """Both subjects' nodes, opened on first use, grown or shrunk to a pod count."""

    def __init__(self):
        self.nodes = {}
        self.pairs = {}

    def node(self, subject):
        if subject not in self.nodes:
            podnet.require_subject(subject, tools=TOOLS)
            self.nodes[subject] = podnet.Node(subject, tag="bg" + subject[0]).open()
        return self.nodes[subject]

    def at(self, subject, pods):
        """The node of ``subject`` holding exactly ``pods`` pods; returns (node, ADD ms of
        the pods added to get there)."""
        node = self.node(subject)
        added = []
        while len(node.pods) > pods:
            node.remove_pod(node.pods[-1])
        if len(node.pods) < 2:
            self.pairs.pop(subject, None)
        while len(node.pods) < pods:
            added.append(node.add_pod().add_ms)
        return node, added

    def pair(self, subject, pods):
        node, added = self.at(subject, pods)
        if subject not in self.pairs:
            self.pairs[subject] = connected_pair(node.pods[0], node.pods[1], node.facts())
        return self.pairs[subject]

    def close(self):
        errors = []
        for node in self.nodes.values():
            try:
                node.close()
            except Exception as exc:      # the other node is removed all the same
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(scope="module")
def growth():
    g = Growth()
    try:
        yield g
    finally:
        g.close()


def _attach(benchmark, growth, subject, pods):
    node, grown_ms = growth.at(subject, pods)
    add_ms, del_ms = [], []

    def once():
        pod = node.add_pod()
        add_ms.append(pod.add_ms)
        del_ms.append(round(node.remove_pod(pod), 3))
    benchmark.pedantic(once, rounds=PROBES, iterations=1)
    info = {"probes": PROBES, "del_ms": del_ms, "what": "CNI ADD of one more pod "
            "(plugin + host-local), its namespace made beforehand", **node.facts()}
    if grown_ms:
        info["grow_add_ms_median"] = round(statistics.median(grown_ms), 3)
        info["grown_by"] = len(grown_ms)
    record(benchmark, group="cni-add-growth", subject=subject, unit="ms", samples=add_ms,
           info=info, pods=pods)


@pytest.mark.parametrize("subject,pods,figure", CASES,
                         ids=[f"{s}-{p}pods-{f}" for s, p, f in CASES])
def test_growth(benchmark, growth, subject, pods, figure):
    """One figure at one pod count for one subject (see the module docstring)."""
    if figure == "attach":
        _attach(benchmark, growth, subject, pods)
        return
    pair = growth.pair(subject, pods)
    if figure == "tcp":
        measure_tcp(benchmark, pair, "real-tcp-growth", subject, 1, TCP_SECONDS, TCP_OMIT_S,
                    TCP_ROUNDS, pods=pods)
    elif figure == "ping":
        measure_ping(benchmark, pair, "real-ping-growth", subject, PING_COUNT,
                     PING_INTERVAL_S, pods=pods)
    else:
        measure_udp(benchmark, pair, "real-udp-64B-growth", subject, UDP_SECONDS, UDP_ROUNDS,
                    pods=pods)
