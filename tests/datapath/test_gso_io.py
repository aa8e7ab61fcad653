"""The I/O layer's part of VXLAN (docs/datapath.md "VXLAN"), with the Cython BatchIO and its
Python twin: every read slot leaves ENCAP_HEADROOM (64) bytes before its vnet header that
belong to no other frame (8-byte aligned), and the writers write a frame whose vnet header
carries VNET_GSO_UDP_TUNNEL_IPV4 as its wire segments (the frames of gso.segment_vxlan, each
behind its own vnet header cut to the port's header length) while an unsegmentable one is
a tx error with nothing written. Ports are SOCK_SEQPACKET socket pairs (one message per
frame), so no root is needed; the real kernel is in tests/integration/test_gso_kernel.py."""
import random
import socket

import numpy as np
import pytest

from tests.datapath.test_gso import TCPV4, TCPV6, TUNNEL, encapsulated, random_inner, vnet_hdr
from vswitch.datapath import gso
from vswitch.datapath.consts import ENCAP_HEADROOM
from vswitch.daemon.ports import VNET_HDR_LEN, PacketIO, Port, set_tunnel_gso, tunnel_gso


@pytest.fixture(params=["c", "py"])
def io(request):
    pio = PacketIO(max_ports=4, max_batch=16, impl=request.param)
    assert pio.impl == request.param
    return pio


@pytest.fixture
def pair():
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    peer.setblocking(False)
    for s in (ours, peer):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    yield ours, peer
    ours.close()
    peer.close()


def _recv_all(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


@pytest.mark.parametrize("hdr_len", [12, 10])
def test_read_slots_leave_the_encap_headroom_before_each_header(io, pair, hdr_len):
    ours, peer = pair
    io.set_port(Port("a", 1, ours.fileno(), hdr_len=hdr_len), 1)
    io.buf[:] = 0xEE                                    # what a read did not write stays 0xEE
    sizes = [60, 61, 1514, 67, 9000, 63]
    # headers of distinct bytes whose gso_type byte is 0x40 + i: none means UDP_L4 (5, cut: D54)
    frames = [bytes([i + 1, 0x40 + i]) + bytes([i + 1]) * (hdr_len - 2) + bytes([0x10 + i]) * n
              for i, n in enumerate(sizes)]
    for f in frames:
        peer.send(f)
    n = io.poll(1000)
    assert n == len(frames)
    offsets, lengths = io.offsets[:n].tolist(), io.lengths[:n].tolist()
    assert offsets[0] == ENCAP_HEADROOM + VNET_HDR_LEN
    assert lengths == sizes
    end = 0
    for off, length, f in zip(offsets, lengths, frames):
        assert (off - VNET_HDR_LEN) % 8 == 0                          # the header 8-byte aligned
        assert off - VNET_HDR_LEN - ENCAP_HEADROOM >= end              # 64 bytes that are no frame's
        assert bytes(io.buf[off - VNET_HDR_LEN:off - VNET_HDR_LEN + hdr_len]) == f[:hdr_len]
        assert bytes(io.buf[off:off + length]) == f[hdr_len:]
        end = off + length
    # the headroom of the first slot was never written by the read
    assert bytes(io.buf[:ENCAP_HEADROOM]) == b"\xEE" * ENCAP_HEADROOM


def _tso_frame(v6, payload_len, gso_size, seed=1):
    rng = random.Random(seed)
    inner, payload = random_inner(rng, v6)
    while len(payload) < 64:
        inner, payload = random_inner(rng, v6)
    hdrs = inner[:len(inner) - len(payload)]
    frame = encapsulated(hdrs + bytes(random.Random(seed).randbytes(payload_len)))
    return vnet_hdr((TCPV6 if v6 else TCPV4) | TUNNEL, gso_size), frame


def _place(io, i, at, hdr, frame, out):
    """Frame i of the batch at buffer offset `at` (its header 12 bytes before), to port `out`."""
    io.buf[at - VNET_HDR_LEN:at] = np.frombuffer(hdr, np.uint8)
    io.buf[at:at + len(frame)] = np.frombuffer(frame, np.uint8)
    io.offsets[i], io.lengths[i], io.in_ports[i], io.out_ports[i] = at, len(frame), 0, out


@pytest.fixture(params=["udp", "segments"])
def mode(request, io):
    """The tunnel GSO mode of the io's implementation (D54), restored to "udp" after."""
    set_tunnel_gso(request.param, io.impl)
    assert tunnel_gso(io.impl) == request.param
    yield request.param
    set_tunnel_gso("udp", io.impl)


@pytest.mark.parametrize("hdr_len", [12, 10])
@pytest.mark.parametrize("v6", [False, True], ids=["inner4", "inner6"])
def test_the_writer_writes_a_tunnel_gso_frame_as_its_segments(io, pair, hdr_len, v6, mode):
    """To a 12-byte-header port (never an uplink) and in "segments" mode: one write per wire
    segment (D51); to an AF_PACKET port (10-byte header) in "udp" mode: UDP GSO packets of
    those segments (D54), here one packet."""
    ours, peer = pair
    io.set_port(Port("up", 2, ours.fileno(), hdr_len=hdr_len), 2)
    hdr, frame = _tso_frame(v6, 20000, 1398)
    plain = bytes(VNET_HDR_LEN) + bytes(60)                      # an ordinary frame after it
    _place(io, 0, 128, hdr, frame, 2)
    _place(io, 1, 128 + len(frame) + 128, plain[:VNET_HDR_LEN], plain[VNET_HDR_LEN:], 2)
    assert io.write(2) == 2
    got = _recv_all(peer)
    if hdr_len == 10 and mode == "udp":
        want = [vh[:hdr_len] + packet for vh, packet in gso.pack_udp_gso(hdr, frame)]
        assert len(want) == 1 and want[0][1] == gso.VNET_GSO_UDP_L4
    else:
        want = [vh[:hdr_len] + seg for vh, seg in gso.segment_vxlan(hdr, frame)]
        assert len(want) == 15                                   # ceil(20000 / 1398)
    assert got == want + [plain[:hdr_len] + plain[VNET_HDR_LEN:]]
    assert int(io.tx_errors[2]) == 0


def test_a_64k_frame_leaves_as_two_udp_gso_packets(io, pair, mode):
    """A pod's 64 KiB segment repacked with its per-segment headers exceeds 65535 bytes of
    IPv4: it leaves as two UDP GSO packets whose segments are, in order, the wire segments."""
    ours, peer = pair
    io.set_port(Port("up", 2, ours.fileno(), hdr_len=10), 2)
    hdr, frame = _tso_frame(False, 65000, 1398, seed=7)
    _place(io, 0, 128, hdr, frame, 2)
    assert io.write(1) == 1
    got = _recv_all(peer)
    segs = gso.segment_vxlan(hdr, frame)
    if mode == "segments":
        assert got == [vh[:10] + s for vh, s in segs]
        return
    packets = gso.pack_udp_gso(hdr, frame)
    assert got == [vh[:10] + p for vh, p in packets]
    assert len(packets) == 2 and all(len(p) - 14 <= 65535 for _, p in packets)
    l4 = gso.layout(hdr, frame)[1]["l4"]
    cut = [f for vh, p in packets for _, f in gso.split_udp_gso(vh, p)]
    whole = [gso.complete_tcp_checksum(s, l4) for _, s in segs]
    assert [c[:40] + c[42:] for c in cut] == [w[:40] + w[42:] for w in whole]   # all but the UDP checksum


def test_the_reader_cuts_a_udp_gso_frame_into_its_datagrams(io, pair):
    """An AF_PACKET port (10-byte header) that hands over a UDP GSO frame whole (a veth does):
    the reader cuts it into the datagrams of gso.split_udp_gso, each in a slot of D50's
    layout; ordinary frames before and after are read as before, and a frame that cannot
    be cut (gso_size 0, more than 64 datagrams) is one rx error and takes no slot."""
    ours, peer = pair
    io.set_port(Port("up", 2, ours.fileno(), hdr_len=10), 2)
    hdr, frame = _tso_frame(False, 12000, 1398, seed=3)
    (vh, packet), = gso.pack_udp_gso(hdr[:10], frame)
    plain = bytes(10) + bytes(range(60))
    bad_zero = bytearray(vh)
    bad_zero[4:6] = b"\0\0"
    bad_many = bytearray(vh)
    bad_many[4:6] = (100).to_bytes(2, "little")                   # 130 datagrams
    for m in (bytes(bad_zero) + packet, vh + packet, bytes(bad_many) + packet, plain):
        peer.send(m)
    want = gso.split_udp_gso(vh, packet)
    assert len(want) == 9                                         # ceil(12000 / 1398)
    # the batch (16) has room for 9 but not for a cut of 64 more: bad_many waits (peeked)
    assert io.poll(1000) == len(want)
    assert int(io.rx_errors[2]) == 1                              # bad_zero
    offsets, lengths = io.offsets[:len(want)].tolist(), io.lengths[:len(want)].tolist()
    got = [(bytes(io.buf[o - VNET_HDR_LEN:o]), bytes(io.buf[o:o + ln])) for o, ln in zip(offsets, lengths)]
    assert got == want
    assert offsets[0] == ENCAP_HEADROOM + VNET_HDR_LEN
    assert all((o - VNET_HDR_LEN) % 8 == 0 for o in offsets)
    assert all(b - a >= ENCAP_HEADROOM + VNET_HDR_LEN + ln for a, b, ln in zip(offsets, offsets[1:], lengths))
    assert io.in_ports[:len(want)].tolist() == [2] * len(want)
    assert io.poll(1000) == 1                                     # bad_many refused, then the plain frame
    assert int(io.rx_errors[2]) == 2
    o = int(io.offsets[0])
    assert bytes(io.buf[o:o + int(io.lengths[0])]) == plain[10:]


def test_an_unsegmentable_tunnel_frame_is_a_tx_error_and_nothing_is_written(io, pair):
    ours, peer = pair
    io.set_port(Port("up", 2, ours.fileno(), hdr_len=10), 2)
    hdr, frame = _tso_frame(False, 5000, 1398)
    bad_type = bytearray(hdr)
    bad_type[1] = 5 | TUNNEL                                        # UDP_L4 with the tunnel bit
    tiny = bytearray(hdr)
    tiny[4:6] = (1).to_bytes(2, "little")                           # gso_size 1: 5000 writes refused
    plain = bytes(60)
    _place(io, 0, 128, bytes(bad_type), frame, 2)
    _place(io, 1, 128 + 8192, bytes(tiny), frame, 2)
    _place(io, 2, 128 + 2 * 8192, bytes(VNET_HDR_LEN), plain, 2)
    assert io.write(3) == 1
    assert _recv_all(peer) == [bytes(10) + plain]
    assert int(io.tx_errors[2]) == 2


def test_drained_frames_are_segmented_too(io, pair):
    """write_drained (frames released by a shaper) goes through the same writer."""
    ours, peer = pair
    io.set_port(Port("up", 1, ours.fileno(), hdr_len=12), 1)
    hdr, frame = _tso_frame(True, 4000, 1000, seed=4)
    at = ENCAP_HEADROOM + VNET_HDR_LEN
    io.dbuf[at - VNET_HDR_LEN:at] = np.frombuffer(hdr, np.uint8)
    io.dbuf[at:at + len(frame)] = np.frombuffer(frame, np.uint8)
    io.doffsets[0], io.dlengths[0], io.din_ports[0], io.dout_ports[0] = at, len(frame), 0, 1
    assert io.write_drained(1) == 1
    assert _recv_all(peer) == [vh + seg for vh, seg in gso.segment_vxlan(hdr, frame)]
