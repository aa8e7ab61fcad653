"""PacketIO.poll, the daemon's wait-and-read step, with the Cython BatchIO and its Python
twin: frames of ready ports land in the batch with their port ids, the control fd is
reported, a port fd in error is reported as failed, and a forgotten port is not polled.
Ports here are SOCK_SEQPACKET socket pairs (one frame per message), so no root is needed."""
import os
import socket

import pytest

from vswitch.ports import VNET_HDR_LEN, PacketIO, Port


@pytest.fixture(params=["c", "py"])
def io(request, monkeypatch):
    monkeypatch.setenv("VSWITCH_PURE_PYTHON_IO", "1" if request.param == "py" else "0")
    pio = PacketIO(max_ports=8, max_batch=16)
    if pio.impl != request.param:
        pytest.skip("the Cython build has no BatchIO")
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

