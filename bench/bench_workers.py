"""Packet workers and busy polling (vswitchd --workers N, --busy-poll) beside the kernel.

Theory of operation
-------------------
The ``real-*`` figures of ``bench_real.py`` and ``bench_hostport.py``, measured with their
own functions (same tools, same code), for vswitchd in several loop modes and, in the
same run, for the kernel's paths:

- ``vswitch`` with ``mode`` = ``w1`` (one packet thread, today's default), ``w<nproc>``
  (one worker per core the machine has, multi-queue TAPs and a PACKET_FANOUT uplink) and
  ``w1-busy`` / ``w<nproc>-busy`` (the same with ``--busy-poll``);
- ``bridge`` (the reference bridge plugin) for pod-to-pod rows, ``portmap`` (bridge +
  portmap) for the hostPort row.

Rows: ``real-tcp`` (1 and 4 streams), ``real-ping``, ``real-udp-64B`` and
``real-hostport`` (TCP stream from the pod to a client on the uplink through
node-IP:hostPort), each with ``mode`` and ``workers`` as parameters; ``scaling``: the
4-stream TCP figure against ``workers`` (adaptive mode). Shorter durations than the
full ``bench_real`` run (one round each) so that every mode fits in one run: side by side
is what these rows are for.

    python -m bench --files bench_workers.py        # as root, with iperf3 and the reference plugins
"""
from __future__ import annotations

import os
import sys
from typing import NamedTuple

import pytest

from vswitch import lab

from . import bench_hostport as hp
from . import nettools, podnet
from .bench_real import TOOLS, make_pair, measure_ping, measure_tcp, measure_udp
from .report import quick_mode, record

pytestmark = pytest.mark.integration

QUICK = quick_mode()
TCP_SECONDS, TCP_OMIT_S = (2, 0) if QUICK else (4, 1)
UDP_SECONDS = 1 if QUICK else 2
PING_COUNT, PING_INTERVAL_S = (100, 0.01) if QUICK else (500, 0.005)
NPROC = os.cpu_count() or 1
MODES = {"w1": (1, False), f"w{NPROC}": (NPROC, False), "w1-busy": (1, True), f"w{NPROC}-busy": (NPROC, True)}
if NPROC == 1:
    MODES = {"w1": (1, False), "w1-busy": (1, True)}
SUBJECTS = [*(f"vswitch-{m}" for m in MODES), "bridge"]


def _args(mode):
    workers, busy = MODES[mode]
    return ("--workers", str(workers), *(("--busy-poll",) if busy else ()))


def _params(subject):
    if subject == "bridge":
        return "bridge", {}
    mode = subject.split("-", 1)[1]
    return "vswitch", {"mode": mode, "workers": MODES[mode][0]}


def _busy(subject) -> bool:
    """Whether ``subject``'s daemon runs --busy-poll."""
    params = _params(subject)[1]
    return bool(params) and MODES[params["mode"]][1]


class _Made(NamedTuple):
    node: object
    pair: object


@pytest.fixture(scope="module")
def pairs():
    """One node per subject, made on first use and removed at the end, except busy-poll
    nodes: their daemons never sleep (a core each, on a 2-core machine), so one is removed
    as soon as another subject is measured and made again when its subject comes back.
    Nothing busy-polls beside a measurement that is not its own."""
    made, stack = {}, []

    def get(subject):
        for other in [o for o in made if o != subject and _busy(o)]:
            node = made.pop(other).node
            stack.remove(node)
            node.__exit__(None, None, None)
        if subject not in made:
            kind, params = _params(subject)
            podnet.require_subject(kind, tools=TOOLS)
            node = podnet.Node(kind, tag="bw", daemon_args=_args(params["mode"]) if params else ())
            node.__enter__()
            stack.append(node)
            made[subject] = _Made(node, make_pair(node))
        return made[subject].pair
    try:
        yield get
    finally:
        for node in stack:
            node.__exit__(None, None, None)


@pytest.mark.parametrize("streams", [1, 4])
@pytest.mark.parametrize("subject", SUBJECTS)
def test_workers_tcp(benchmark, pairs, subject, streams):
    kind, params = _params(subject)
    measure_tcp(benchmark, pairs(subject), "real-tcp", kind, streams, TCP_SECONDS, TCP_OMIT_S, 1, **params)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_workers_ping(benchmark, pairs, subject):
    kind, params = _params(subject)
    measure_ping(benchmark, pairs(subject), "real-ping", kind, PING_COUNT, PING_INTERVAL_S, **params)


@pytest.mark.parametrize("subject", SUBJECTS)
def test_workers_udp_64B(benchmark, pairs, subject):
    kind, params = _params(subject)
    measure_udp(benchmark, pairs(subject), "real-udp-64B", kind, UDP_SECONDS, 1, **params)


@pytest.mark.parametrize("workers", sorted({1, NPROC}))
def test_workers_scaling(benchmark, pairs, workers):
    """4-stream pod-to-pod TCP (Gbit/s) against the number of workers (adaptive polling)."""
    measure_tcp(benchmark, pairs(f"vswitch-w{workers}"), "scaling", "vswitch", 4, TCP_SECONDS, TCP_OMIT_S, 1,
                workers=workers)


HP_SUBJECTS = [*(f"vswitch-{m}" for m in MODES), "portmap"]


@pytest.mark.parametrize("subject", HP_SUBJECTS)
def test_workers_hostport(benchmark, subject):
    """TCP goodput (Gbit/s) from the pod to the uplink's client through node-IP:hostPort."""
    kind = "bridge" if subject == "portmap" else "vswitch"
    podnet.require_subject(kind, portmap=True, tools=("iperf3",))
    params = {} if subject == "portmap" else _params(subject)[1]
    args = ("--uplink", hp.UPLINK, *(_args(params["mode"]) if params else ()))
    gbps = []
    with podnet.Node(kind, portmap=True, daemon_args=args, setup=hp._uplinked, tag="bwh") as node:
        pod = node.add_pod({"portMappings": hp.PORT_MAPPINGS})
        record(benchmark, group="real-hostport", subject="portmap" if subject == "portmap" else "vswitch",
               unit="gbps", samples=gbps, traffic="tcp-stream", **params,
               info={"seconds": TCP_SECONDS, "omit_s": TCP_OMIT_S, "streams": 1,
                     "tool": "iperf3 -R to node-IP:hostPort", **node.facts()})

        def once():
            server = nettools.start_iperf_server(pod.ns, hp.IPERF_PORT)
            try:
                data = nettools.iperf_client(node.client, hp.NODE_IP, hp.IPERF_HOSTPORT, TCP_SECONDS,
                                             ["-P", "1", "-O", str(TCP_OMIT_S)])
            finally:
                nettools.stop_process(server)
            gbps.append(nettools.goodput_bps(data) / 1e9)
        benchmark.pedantic(once, rounds=1, iterations=1)


def idle_cpu_share(args, seconds=5.0) -> float:
    """CPU share (1.0 = one core) of an idle vswitchd with two pods, from /proc/<pid>/stat
    (utime + stime) over ``seconds``; the daemon is ours (started here, by PID)."""
    import time
    with podnet.Node("vswitch", tag="bi", daemon_args=args) as node:
        make_pair(node)
        time.sleep(1.0)
        pid = lab.nsexec(node.node, "pgrep", "-P", str(node.daemon.proc.pid), check=False).stdout.split()
        pid = int(pid[0]) if pid else node.daemon.proc.pid      # ip netns exec may exec in place
        hz = os.sysconf("SC_CLK_TCK")

        def ticks():
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return int(f[11]) + int(f[12])
        t0, c0 = time.monotonic(), ticks()
        time.sleep(seconds)
        return (ticks() - c0) / hz / (time.monotonic() - t0)


if __name__ == "__main__":          # python -m bench.bench_workers: the idle CPU of each mode
    for mode in MODES:
        print(f"{mode}: idle CPU {idle_cpu_share(_args(mode)):.3f} of a core over 5 s", file=sys.stderr)
