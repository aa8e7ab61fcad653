"""PacketIO.poll, the daemon's wait-and-read step, with the Cython BatchIO and its Python
twin: frames of ready ports land in the batch with their port ids, the control fd is
reported, a port fd in error is reported as failed, and a forgotten port is not polled.
PacketIO.run (the whole loop in Cython: wait, read, datapath, write, drain shaping queues,
adaptive polling) forwards and floods, releases shaped frames, polls only after traffic,
and returns for the control fd, a failed port and the deadline.
Ports here are SOCK_SEQPACKET socket pairs (one frame per message), so no root is needed."""
import os
import socket
import threading
import time

import pytest

from vswitch import datapath
from vswitch.daemon.ports import VNET_HDR_LEN, PacketIO, Port


@pytest.fixture(params=["c", "py"])
def io(request):
    """PacketIO of one implementation, chosen through vswitch.datapath (a build without
    BatchIO fails here with BuildError: no skip, no fallback)."""
    pio = PacketIO(max_ports=8, max_batch=16, impl=request.param)
    assert pio.impl == request.param
    return pio


def _pair():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)        # like a TAP fd of the daemon: reads stop at EAGAIN
    return ours, peer


def _frame(i: int) -> bytes:
    return bytes(VNET_HDR_LEN) + bytes([0x02, 0, 0, 0, 0, i]) + bytes([0x02, 0, 0, 0, 0, 0x99]) + b"\x08\x00" + bytes(46)


def test_poll_reads_ready_ports_and_reports_control_and_failures(io):
    a_ours, a_peer = _pair()
    b_ours, b_peer = _pair()
    ctl_r, ctl_w = socket.socketpair()
    r_fd, w_fd = os.pipe()
    os.set_blocking(w_fd, False)
    try:
        io.set_port(Port("a", 1, a_ours.fileno()), 1)
        io.set_port(Port("b", 3, b_ours.fileno()), 3)
        io.set_port(Port("w", 5, w_fd), 5)
        io.watch_control(ctl_r.fileno())
        assert io.poll(0) == 0 and not io.control_ready and io.n_failed == 0

        a_peer.send(_frame(1))
        a_peer.send(_frame(2))
        b_peer.send(_frame(3))
        n = io.poll(1000)
        assert n == 3
        got = sorted((int(io.in_ports[i]), bytes(io.buf[io.offsets[i]:io.offsets[i] + io.lengths[i]]))
                     for i in range(n))
        assert got == sorted([(1, _frame(1)[VNET_HDR_LEN:]), (1, _frame(2)[VNET_HDR_LEN:]),
                              (3, _frame(3)[VNET_HDR_LEN:])])
        assert not io.control_ready

        ctl_w.send(b"x")
        os.close(r_fd)                       # the pipe's write end now reports EPOLLERR
        r_fd = -1
        assert io.poll(1000) == 0
        assert io.control_ready
        assert io.failed[:io.n_failed].tolist() == [5]

        io.set_port(None, 5)                 # forgotten: no longer polled
        ctl_r.recv(16)
        b_peer.send(_frame(4))
        assert io.poll(1000) == 1 and int(io.in_ports[0]) == 3 and io.n_failed == 0
    finally:
        for s in (a_ours, a_peer, b_ours, b_peer, ctl_r, ctl_w):
            s.close()
        os.close(w_fd)
        if r_fd >= 0:
            os.close(r_fd)


def test_poll_times_out_with_nothing_ready(io):
    ours, peer = _pair()
    try:
        io.set_port(Port("a", 0, ours.fileno()), 0)
        assert io.poll(20) == 0 and io.n_failed == 0 and not io.control_ready
    finally:
        ours.close()
        peer.close()


def test_watch_refuses_a_port_id_out_of_range(io):
    with pytest.raises(ValueError, match="port_id=8"):
        io.b.watch(0, 8)



# --------------------------------------------------------------------------- run(): the loop in Cython

RUN_CONTROL, RUN_FAILED, RUN_DEADLINE = 1, 2, 4       # BatchIO.run's reasons (ext/io.pxi)


@pytest.fixture
def loop():
    """A Cython BatchIO with a Switch (C datapath, 12-byte vnet header) of the same size;
    a missing or partial build fails here (BuildError)."""
    from vswitch.config import SwitchConfig
    from vswitch.switch import Switch
    pio = PacketIO(max_ports=8, max_batch=16, impl="c")
    sw = Switch(SwitchConfig(vnet_hdr_len=VNET_HDR_LEN, max_ports=8), impl="c")
    assert pio.run is not None and type(sw.dp).__module__ == "vswitch.datapath._core"
    return pio, sw


def _run_until(pio, sw, done, poll_ns=0, limit_s=10.0):
    """Calls run() with short deadlines until done() holds (or limit_s passes)."""
    deadline = time.monotonic() + limit_s
    while not done() and time.monotonic() < deadline:
        pio.run(sw.dp, time.monotonic_ns() + 20_000_000, poll_ns)


def _recv_all(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def test_run_forwards_floods_and_returns_at_the_deadline(loop):
    pio, sw = loop
    socks = {pid: _pair() for pid in (1, 2, 3)}
    try:
        for pid, (ours, peer) in socks.items():
            sw.add_port(f"p{pid}", "uplink", port_id=pid)
            pio.set_port(Port(f"p{pid}", pid, ours.fileno()), pid)
            peer.setblocking(False)
        bcast = bytes(VNET_HDR_LEN) + b"\xff" * 6 + bytes([2, 0, 0, 0, 0, 1]) + b"\x88\xb5" + bytes(46)
        socks[1][1].send(bcast)
        got = {2: [], 3: []}
        _run_until(pio, sw, lambda: all(got[p] or got[p].extend(_recv_all(socks[p][1])) for p in (2, 3)))
        assert got == {2: [bcast], 3: [bcast]}          # flooded, not back to port 1
        assert _recv_all(socks[1][1]) == []
        # port 1's MAC was learned: a unicast reply from port 3 goes to port 1 only
        reply = bytes(VNET_HDR_LEN) + bytes([2, 0, 0, 0, 0, 1]) + bytes([2, 0, 0, 0, 0, 3]) + b"\x88\xb5" + bytes(46)
        socks[3][1].send(reply)
        got1 = []
        _run_until(pio, sw, lambda: got1 or got1.extend(_recv_all(socks[1][1])))
        assert got1 == [reply] and _recv_all(socks[2][1]) == []
        st = pio.loop_stats()
        assert st["frames"] == 2 and st["batches"] == 2
        assert pio.run(sw.dp, time.monotonic_ns(), 0) == RUN_DEADLINE       # a deadline already passed
        assert not pio.control_ready and pio.n_failed == 0
        assert sw.counters()["ports"]["p1"]["rx_packets"] == 1
    finally:
        for ours, peer in socks.values():
            ours.close()
            peer.close()


def test_run_returns_for_the_control_fd_and_a_failed_port(loop):
    pio, sw = loop
    ours, peer = _pair()
    ctl_r, ctl_w = socket.socketpair()
    r_fd, w_fd = os.pipe()
    try:
        sw.add_port("p1", "uplink", port_id=1)
        pio.set_port(Port("p1", 1, ours.fileno()), 1)
        pio.set_port(Port("w", 5, w_fd), 5)
        pio.watch_control(ctl_r.fileno())
        far = time.monotonic_ns() + 60 * 10**9
        threading.Timer(0.05, ctl_w.send, (b"x",)).start()       # while run() blocks
        assert pio.run(sw.dp, far, 0) == RUN_CONTROL
        assert pio.control_ready and pio.n_failed == 0
        ctl_r.recv(16)
        os.close(r_fd)                       # the pipe's write end reports EPOLLERR
        r_fd = -1
        assert pio.run(sw.dp, far, 0) == RUN_FAILED
        assert pio.failed[:pio.n_failed].tolist() == [5] and not pio.control_ready
    finally:
        for s in (ours, peer, ctl_r, ctl_w):
            s.close()
        os.close(w_fd)
        if r_fd >= 0:
            os.close(r_fd)


def test_run_polls_only_after_traffic(loop):
    """Adaptive polling: no poll while idle, whatever poll_ns; polls after a batch."""
    pio, sw = loop
    ours, peer = _pair()
    try:
        sw.add_port("p1", "uplink", port_id=1)
        pio.set_port(Port("p1", 1, ours.fileno()), 1)
        assert pio.run(sw.dp, time.monotonic_ns() + 30_000_000, 10_000_000) == RUN_DEADLINE
        assert pio.loop_stats()["polls"] == 0
        peer.send(_frame(1))
        _run_until(pio, sw, lambda: pio.loop_stats()["frames"] == 1, poll_ns=5_000_000)
        st = pio.loop_stats()
        assert st["batches"] == 1 and st["polls"] >= 1
        assert pio.run(sw.dp, time.monotonic_ns() + 30_000_000, 0) == RUN_DEADLINE
        assert pio.loop_stats()["polls"] == st["polls"]       # poll_ns=0: never polls
    finally:
        ours.close()
        peer.close()


def test_run_releases_shaped_frames(loop):
    """Frames queued by an egress shaper leave through run(), in order, at their time."""
    pio, sw = loop
    socks = {pid: _pair() for pid in (1, 2)}
    try:
        sw.add_port("p1", "pod", port_id=1, antispoof=False,
                    bandwidth={"egressRate": 8_000_000, "egressBurst": 600_000})
        sw.add_port("p2", "uplink", port_id=2)
        for pid, (o, p) in socks.items():
            pio.set_port(Port(f"p{pid}", pid, o.fileno()), pid)
            p.setblocking(False)
        frames = [bytes(VNET_HDR_LEN) + b"\xff" * 6 + bytes([2, 0, 0, 0, 0, 1]) + b"\x88\xb5" + bytes([i]) * 1486
                  for i in range(60)]                        # 90 KB at 1 MB/s: most are queued
        for f in frames:
            socks[1][1].send(f)
        got = []
        _run_until(pio, sw, lambda: len(got) == len(frames) or got.extend(_recv_all(socks[2][1])))
        assert got == frames
        assert pio.loop_stats()["drained"] > 0
    finally:
        for o, p in socks.values():
            o.close()
            p.close()


def test_run_refuses_a_datapath_of_another_layout(loop):
    pio, _ = loop
    Datapath = datapath.module("c").Datapath
    with pytest.raises(ValueError, match="vnet_hdr_len is 0"):
        pio.run(Datapath(max_ports=8, vnet_hdr_len=0), 0, 0)
    with pytest.raises(ValueError, match="the datapath only 4"):
        pio.run(Datapath(max_ports=4, vnet_hdr_len=VNET_HDR_LEN), 0, 0)
    with pytest.raises(ValueError, match="poll_ns=-1"):
        pio.run(Datapath(max_ports=8, vnet_hdr_len=VNET_HDR_LEN), 0, -1)


def test_run_widens_the_polling_window_for_late_answers(loop):
    """Adaptive window: a batch arriving a gap g after the previous one, with poll_ns < g <=
    poll_max_ns, widens the window after each batch to 1.25 g (at most poll_max_ns); with
    poll_max_ns == poll_ns the window stays poll_ns (ext/io.pxi "Adaptive window")."""
    pio, sw = loop
    ours, peer = _pair()
    b = pio.b
    try:
        sw.add_port("p1", "uplink", port_id=1)
        pio.set_port(Port("p1", 1, ours.fileno()), 1)
        poll_ns, poll_max_ns = 50_000, 10 * 10**9
        for fixed in (True, False):
            frames = pio.loop_stats()["frames"]
            for k in range(2):
                if k:
                    time.sleep(0.003)               # the second batch comes >= 3 ms after the first
                peer.send(_frame(1))
                deadline = time.monotonic() + 10
                while pio.loop_stats()["frames"] < frames + k + 1 and time.monotonic() < deadline:
                    pio.run(sw.dp, time.monotonic_ns() + 1_000_000, poll_ns,
                            poll_max_ns=poll_ns if fixed else poll_max_ns)
            assert pio.loop_stats()["frames"] == frames + 2
            if fixed:
                assert b.loop_window_ns == poll_ns and b.poll_max_ns == poll_ns
            else:
                assert 3_750_000 <= b.loop_window_ns <= poll_max_ns
        with pytest.raises(ValueError, match="poll_max_ns"):
            pio.run(sw.dp, time.monotonic_ns(), 100, poll_max_ns=99)
    finally:
        ours.close()
        peer.close()


def test_run_does_not_poll_after_a_bulk_batch_across_the_wire(loop):
    """Bulk batches (ext/io.pxi): a batch of at least poll_bulk_bytes with a frame from (or
    to) an AF_PACKET port (10-byte header: the uplink) opens no polling window and teaches
    the adaptive window no gap; a smaller one still polls, and so does a bulk batch between
    TAP ports (12-byte header: pods of this node); poll_bulk_bytes=0 polls after every
    batch."""
    pio, sw = loop
    wire, wire_peer = _pair()
    tap, tap_peer = _pair()
    b = pio.b
    small, big = _frame(1), _frame(2) + bytes(1400)          # 72 and 1472 bytes (12-byte header)
    poll_ns, poll_max_ns, bulk = 2_000_000, 10 * 10**9, 1000

    def one(peer, frame, bulk_bytes):
        """Sends ``frame`` through ``peer`` and runs until it was forwarded and the window
        (if any) closed; returns (polls, bulk) added meanwhile."""
        st0 = pio.loop_stats()
        peer.send(frame[2:] if peer is wire_peer else frame)   # the wire's header is 10 bytes
        deadline = time.monotonic() + 10
        while pio.loop_stats()["frames"] == st0["frames"] and time.monotonic() < deadline:
            pio.run(sw.dp, time.monotonic_ns() + 20_000_000, poll_ns, poll_max_ns=poll_max_ns,
                    poll_bulk_bytes=bulk_bytes)
        pio.run(sw.dp, time.monotonic_ns() + 3 * poll_ns, poll_ns, poll_max_ns=poll_max_ns,
                poll_bulk_bytes=bulk_bytes)           # the rest of the window, if one was opened
        st = pio.loop_stats()
        assert st["frames"] == st0["frames"] + 1
        return st["polls"] - st0["polls"], st["bulk"] - st0["bulk"]

    try:
        sw.add_port("p1", "uplink", port_id=1)
        sw.add_port("p2", "uplink", port_id=2)
        pio.set_port(Port("p1", 1, wire.fileno(), hdr_len=10), 1)
        pio.set_port(Port("p2", 2, tap.fileno()), 2)
        assert one(wire_peer, big, bulk) == (0, 1)      # bulk across the wire: blocked at once
        polls, n_bulk = one(wire_peer, small, bulk)
        assert polls >= 1 and n_bulk == 0               # a small batch polls
        assert b.loop_window_ns == poll_ns
        time.sleep(0.01)                                # a late bulk batch 10 ms after it ...
        assert one(wire_peer, big, bulk) == (0, 1)
        assert b.loop_window_ns == poll_ns and b.poll_bulk_bytes == bulk   # ... widened nothing
        polls, n_bulk = one(tap_peer, big, bulk)        # between TAPs: polls
        assert polls >= 1 and n_bulk == 0
        polls, n_bulk = one(wire_peer, big, 0)          # off: polls
        assert polls >= 1 and n_bulk == 0
        with pytest.raises(ValueError, match="poll_bulk_bytes"):
            pio.run(sw.dp, time.monotonic_ns(), 100, poll_bulk_bytes=-1)
    finally:
        for s_ in (wire, wire_peer, tap, tap_peer):
            s_.close()
