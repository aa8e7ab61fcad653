"""The packet loop's step trace (BatchIO.trace_start, the daemon's ``loop_trace`` op; docs/daemon.md
"Where a ping's microseconds go"): one ping between two pods on real TAPs leaves, in order and
with non-decreasing CLOCK_MONOTONIC times, the request's wakeup, read from A's port, datapath
to B's port and write, then the reply's wakeup, read from B, datapath to A and write; nothing
is recorded before start or after stop, and the Cython ring keeps its last rows."""
import time

import numpy as np
import pytest

from tests.integration.helpers import ping, running_cluster
from vswitch.daemon.ports import VNET_HDR_LEN

SLEEP, WAKE, READ, DP, WRITE = 1, 2, 3, 4, 5


def _ids(cluster, *pods):
    by_name = {p["name"]: p["port_id"] for p in cluster.daemon.call("show")["ports"]}
    return [by_name[p.port] for p in pods]


def _find(rows, start, step, a=None, b=None):
    for i in range(start, len(rows)):
        t, s, ra, rb = rows[i]
        if s == step and (a is None or ra == a) and (b is None or rb == b):
            return i
    raise AssertionError(f"no step {step} (a={a}, b={b}) after row {start}: {rows[start:]}")


@pytest.mark.parametrize("daemon_args", [(), ("--busy-poll",)], ids=["adaptive", "busy"])
def test_one_ping_leaves_its_steps_in_order(nss, tmp_path, daemon_args):
    with running_cluster(nss, tmp_path, daemon_args=daemon_args) as cluster:
        a, b = cluster.add_pod("a", 2), cluster.add_pod("b", 3)
        pa, pb = _ids(cluster, a, b)
        assert ping(a.ns, b.ip)["received"] == 3          # ARP and MAC learning done
        d = cluster.daemon
        assert d.call("loop_trace", action="rows")["workers"] == [[]]      # never started
        assert d.call("loop_trace", action="start", capacity=256)["tracing"] is True
        assert ping(a.ns, b.ip, count=1)["received"] == 1
        assert d.call("loop_trace", action="stop")["tracing"] is False
        r = d.call("loop_trace", action="rows")
        assert r["steps"] == {"1": "sleep", "2": "wake", "3": "read", "4": "datapath", "5": "write"}
        rows = r["workers"][0]
        # the request: woken, read from A, sent to B by the datapath, written
        i_read = _find(rows, 0, READ, pa, 1)
        i_wake = max(i for i in range(i_read) if rows[i][1] == WAKE)
        i_dp = _find(rows, i_read, DP, pb, 1)
        i_wr = _find(rows, i_dp, WRITE, pb, 1)
        assert i_wake < i_read < i_dp < i_wr
        if not daemon_args:
            assert rows[i_wake][2] == 1                 # after a blocking wait (idle before the ping)
        # the reply (B's stack answered inside our write): read from B, to A, written
        j_read = _find(rows, i_wr, READ, pb, 1)
        j_wake = max(i for i in range(j_read) if rows[i][1] == WAKE)
        j_dp = _find(rows, j_read, DP, pa, 1)
        j_wr = _find(rows, j_dp, WRITE, pa, 1)
        assert i_wr < j_wake < j_read < j_dp < j_wr
        times = [rows[i][0] for i in (i_wake, i_read, i_dp, i_wr, j_wake, j_read, j_dp, j_wr)]
        assert times == sorted(times)
        assert abs(times[0] - time.monotonic_ns()) < 60 * 10**9       # CLOCK_MONOTONIC, this boot
        n = len(rows)
        assert ping(a.ns, b.ip, count=1)["received"] == 1                 # stopped: nothing more
        assert len(d.call("loop_trace", action="rows")["workers"][0]) == n
        with pytest.raises(Exception, match="256 rows"):
            d.call("loop_trace", action="start", capacity=512)


def _one_port_loop():
    """(PacketIO, Switch, our end, the peer's end): a Cython loop with one port "p1" (id 1)
    on a SOCK_SEQPACKET pair, one message per frame."""
    import socket
    from vswitch.config import SwitchConfig
    from vswitch.daemon.ports import PacketIO, Port
    from vswitch.switch import Switch
    pio = PacketIO(max_ports=4, max_batch=16, impl="c")
    sw = Switch(SwitchConfig(vnet_hdr_len=VNET_HDR_LEN, max_ports=4), impl="c")
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    sw.add_port("p1", "uplink", port_id=1)
    pio.set_port(Port("p1", 1, ours.fileno()), 1)
    return pio, sw, ours, peer


def test_the_ring_keeps_the_last_rows():
    """The Cython BatchIO alone: rows past the capacity overwrite the oldest, oldest first."""
    pio, sw, ours, peer = _one_port_loop()
    try:
        b = pio.b
        assert b.trace_rows().shape == (0, 4) and not b.tracing
        b.trace_start(8)
        frame = bytes(VNET_HDR_LEN) + bytes([2, 0, 0, 0, 0, 9]) + bytes([2, 0, 0, 0, 0, 1]) + b"\x88\xb5" + bytes(46)
        for _ in range(5):                          # each: sleep, wake, read, datapath (flood: nowhere)
            peer.send(frame)
            pio.run(sw.dp, time.monotonic_ns() + 20_000_000, 0)
        rows = b.trace_rows()
        assert b.trace_n > 8 and rows.shape == (8, 4)
        assert (np.diff(rows[:, 0]) >= 0).all()     # oldest first across the wrap
        assert set(rows[:, 1].tolist()) <= {SLEEP, WAKE, READ, DP, WRITE}
        reads = rows[rows[:, 1] == READ]
        assert (reads[:, 2] == 1).all() and (reads[:, 3] == 1).all()
    finally:
        ours.close()
        peer.close()


@pytest.mark.parametrize("poll_ns", [0, 1_000_000])
def test_first_frame_first_after_idle(poll_ns):
    """Three frames waiting when run() starts: with polling, the first read takes one frame
    (no read() ending in EAGAIN before it is forwarded), the next wait the other two; with
    poll_ns 0 one read takes all three (ext/io.pxi "First frame first")."""
    pio, sw, ours, peer = _one_port_loop()
    try:
        pio.b.trace_start(64)
        frame = bytes(VNET_HDR_LEN) + bytes([2, 0, 0, 0, 0, 9]) + bytes([2, 0, 0, 0, 0, 1]) + b"\x88\xb5" + bytes(46)
        for _ in range(3):
            peer.send(frame)
        deadline = time.monotonic() + 10
        while pio.loop_stats()["frames"] < 3 and time.monotonic() < deadline:
            pio.run(sw.dp, time.monotonic_ns() + 20_000_000, poll_ns)
        reads = [r[3] for r in pio.b.trace_rows().tolist() if r[1] == READ]
        assert reads[:2 if poll_ns else 1] == ([1, 2] if poll_ns else [3])
    finally:
        ours.close()
        peer.close()
