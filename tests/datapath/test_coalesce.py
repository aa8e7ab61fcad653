"""Receive coalescing in the TAP writer (vswitch/datapath/gso.py "receive coalescing", ext/io.pxi):
a run of one TCP flow's frames to a TAP port (12-byte vnet header) leaves as one GSO frame
written once, checked with scapy from the RFCs (lengths, seq, flags, payload, a valid IPv4
header checksum and a TCP checksum valid once the partial sum is completed) and the
virtio-net header spec (NEEDS_CSUM, TCPV4/TCPV6, gso_size, hdr_len, csum_start/offset);
what must not merge is written frame by frame; the C writer and its Python twin write the
same bytes on random batches. Ports are SOCK_SEQPACKET socket pairs (no root)."""
import random
import socket
import struct

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, in4_chksum
from scapy.layers.inet6 import IPv6, in6_chksum
from scapy.layers.l2 import Ether
from scapy.packet import Raw
from scapy.utils import checksum

from vswitch.datapath.consts import OUT_DROP
from vswitch.daemon.ports import VNET_HDR_LEN, PacketIO, Port

NEEDS_CSUM, DATA_VALID = 1, 2
ACK, PSH, FIN = 0x10, 0x08, 0x01
TAP, UPLINK = 1, 2


@pytest.fixture(params=["c", "py"])
def io(request):
    pio = PacketIO(max_ports=4, max_batch=128, impl=request.param)
    socks = {}
    for pid, hdr_len in ((TAP, 12), (UPLINK, 10)):
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (ours, peer):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        pio.set_port(Port(f"p{pid}", pid, ours.fileno(), hdr_len=hdr_len), pid)
        socks[pid] = (ours, peer)
    yield pio, {pid: peer for pid, (_, peer) in socks.items()}
    for pair in socks.values():
        for s in pair:
            s.close()


def seg(seq, size, v6=False, flags=ACK, sport=40000, vflags=DATA_VALID, ts=True, fill=None):
    """(vnet header, frame) of one wire segment of a flow, as decapsulation delivers it."""
    ip = IPv6(src="fd00:10:2::3", dst="fd00:10:1::2", hlim=62) if v6 else \
        IP(src="10.2.0.3", dst="10.1.0.2", ttl=62, flags="DF", id=seq & 0xFFFF)
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (7, 9))] if ts else []
    payload = bytes([(seq + i) & 0xFF for i in range(size)]) if fill is None else fill * size
    f = bytes(Ether(src="02:00:00:00:fe:01", dst="02:00:00:00:0a:01") / ip
              / TCP(sport=sport, dport=5201, seq=seq, ack=777, flags=flags, window=501, options=opts)
              / Raw(payload))
    return struct.pack("<BBHHHHH", vflags, 0, 0, 0, 0, 0, 0), f


def write_batch(pio, frames, outs):
    """Frames laid out as the read loop lays them (64 bytes of headroom each), written."""
    pos = 0
    for i, ((vh, f), out) in enumerate(zip(frames, outs)):
        at = pos + 64 + VNET_HDR_LEN
        pio.buf[at - VNET_HDR_LEN:at] = np.frombuffer(vh, np.uint8)
        pio.buf[at:at + len(f)] = np.frombuffer(f, np.uint8)
        pio.offsets[i], pio.lengths[i], pio.in_ports[i], pio.out_ports[i] = at, len(f), 0, out
        pos = (at + len(f) + 7) & ~7
    return pio.write(len(frames))


def recv_all(sock):
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


def check_merged(msg, parts, v6):
    """msg (12-byte header + frame) is the GSO frame of `parts` (their frames), by the RFCs."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, nbuf = struct.unpack_from("<BBHHHHH", msg)
    frame = msg[12:]
    first = Ether(parts[0])
    hdr_end = len(parts[0]) - len(first[TCP].payload)
    l4 = 54 if v6 else 34
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, nbuf) == \
        (NEEDS_CSUM, 4 if v6 else 1, hdr_end, len(first[TCP].payload), l4, 16, 0)
    p = Ether(frame)
    if v6:
        assert p[IPv6].plen == len(frame) - 54
    else:
        assert p[IP].len == len(frame) - 14 and checksum(frame[14:34]) == 0 and p[IP].id == first[IP].id
    assert p[TCP].seq == first[TCP].seq and p[TCP].ack == first[TCP].ack
    assert int(p[TCP].flags) == ACK | (int(Ether(parts[-1])[TCP].flags) & PSH)
    assert bytes(p[TCP].payload) == b"".join(bytes(Ether(f)[TCP].payload) for f in parts)
    keep = [(0, 18), (20, l4 + 4)] if v6 else [(0, 16), (18, 24), (26, l4 + 4)]   # all but lengths, checksum
    assert all(frame[lo:hi] == parts[0][lo:hi] for lo, hi in keep)
    done = bytearray(frame)
    done[l4 + 16:l4 + 18] = checksum(bytes(frame[l4:])).to_bytes(2, "big")
    l3 = Ether(bytes(done))[IPv6 if v6 else IP]
    assert (in6_chksum if v6 else in4_chksum)(6, l3, bytes(done[l4:])) == 0


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_a_run_of_one_flow_is_written_as_one_gso_frame(io, v6):
    pio, peers = io
    frames = [seg(1000 + k * 1398, 1398, v6) for k in range(9)] + [seg(1000 + 9 * 1398, 500, v6, flags=ACK | PSH)]
    assert write_batch(pio, frames, [TAP] * 10) == 10
    got = recv_all(peers[TAP])
    assert len(got) == 1                                       # 10 frames, one write
    check_merged(got[0], [f for _, f in frames], v6)


def test_what_must_not_merge_is_written_frame_by_frame(io):
    pio, peers = io
    a = [seg(100 + k * 1000, 1000) for k in range(3)]
    cases = [
        ("seq gap", [a[0], seg(100 + 1000 + 1, 1000)], [2]),             # not contiguous: 2 writes
        ("other flow", [a[0], seg(1100, 1000, sport=40001)], [2]),
        ("FIN", [a[0], seg(1100, 1000, flags=ACK | FIN)], [2]),
        ("unverified checksum", [a[0], seg(1100, 1000, vflags=0)], [2]),
        ("shorter in the middle", [a[0], seg(1100, 500), seg(1600, 500)], [(1100, 2), (1600, 1)]),
        ("PSH ends the run", [seg(100, 1000, flags=ACK | PSH), a[1]], [2]),
        ("longer than the first", [seg(100, 500), seg(600, 1000)], [2]),
        ("other options", [a[0], seg(1100, 1000, ts=False)], [2]),
        ("IPv4 then IPv6", [a[0], seg(1100, 1000, v6=True)], [2]),
    ]
    for name, frames, _ in cases:
        write_batch(pio, frames, [TAP] * len(frames))
        got = recv_all(peers[TAP])
        if name == "shorter in the middle":                        # the first two merge, the third alone
            assert len(got) == 2 and got[0][1] == 1 and got[1][12:] == frames[2][1], name
        else:
            assert [m[12:] for m in got] == [f for _, f in frames], name
            assert all(m[:12] == vh for m, (vh, _) in zip(got, frames)), name


def test_runs_end_at_another_port_skip_drops_and_stop_at_64(io):
    pio, peers = io
    frames = [seg((k - (k > 5)) * 100, 100) for k in range(70)]
    frames[5] = seg(7, 100, sport=1)
    outs = [TAP] * 70
    outs[5] = OUT_DROP                                          # another flow's frame, dropped: skipped
    outs[10] = UPLINK                                          # ends the run
    assert write_batch(pio, frames, outs) == 69
    got = recv_all(peers[TAP])
    sizes = [(struct.unpack_from("<H", m, 4)[0], (len(m) - 12 - 66) // 100) for m in got]
    # frames 0-9 minus the dropped one (9 frames), then 11..69 (59 frames, under 64)
    assert [n for _, n in sizes] == [9, 59]
    assert len(recv_all(peers[UPLINK])) == 1                   # the AF_PACKET-like port: never merged
    frames = [seg(k * 100, 100) for k in range(70)]
    assert write_batch(pio, frames, [TAP] * 70) == 70
    assert [(len(m) - 12 - 66) // 100 for m in recv_all(peers[TAP])] == [64, 6]


def test_core_and_twin_write_the_same_bytes_on_random_batches():
    rng = random.Random(2026)
    outputs = {}
    for impl in ("c", "py"):
        pio = PacketIO(max_ports=4, max_batch=128, impl=impl)
        pairs = {}
        for pid in (TAP, 3):
            ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            for s in (ours, peer):
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            pio.set_port(Port(f"p{pid}", pid, ours.fileno()), pid)
            pairs[pid] = (ours, peer)
        rng.seed(2026)
        got = []
        try:
            for _ in range(40):
                seqs = {40000: rng.randrange(2**32), 40001: rng.randrange(2**32)}
                frames, outs = [], []
                for _ in range(rng.randrange(1, 100)):
                    sport = rng.choice([40000, 40000, 40000, 40001])
                    size = rng.choice([1000, 1000, 1000, 1000, rng.randrange(1, 1000)])
                    flags = rng.choice([ACK] * 8 + [ACK | PSH, ACK | FIN])
                    seq = seqs[sport] + (rng.random() < 0.05)
                    frames.append(seg(seq & 0xFFFFFFFF, size, v6=sport == 40001, flags=flags, sport=sport,
                                      vflags=rng.choice([DATA_VALID, DATA_VALID, NEEDS_CSUM, 0])))
                    seqs[sport] = (seq + size) & 0xFFFFFFFF
                    outs.append(rng.choice([TAP] * 6 + [3, OUT_DROP]))
                got.append((write_batch(pio, frames, outs), recv_all(pairs[TAP][1]), recv_all(pairs[3][1])))
        finally:
            for pair in pairs.values():
                for s in pair:
                    s.close()
        outputs[impl] = got
    assert outputs["c"] == outputs["py"]
    merged = sum(1 for _, tap, _ in outputs["c"] for m in tap if m[1] in (1, 4))
    assert merged > 20                                          # the random batches did exercise merging
