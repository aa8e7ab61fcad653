"""Tunnel GSO against the real kernel (docs/datapath.md "VXLAN", the I/O layer).

A veth pair in a namespace of this test: the uplink's socket (``open_uplink_socket``: AF_PACKET
with PACKET_VNET_HDR, as vswitchd opens it) on one end, a plain AF_PACKET capture on the
other. A VXLAN-encapsulated TSO frame (what the core makes of a pod's 64 KiB segment)
written through BatchIO (and its Python twin) arrives as wire-size frames whose outer and
inner IPv4 checksums and whose TCP checksum are valid: the writer hands each segment to the
kernel with NEEDS_CSUM, and the kernel completes the checksum (tx checksumming is off on
the sending veth, so it does so in software before the frame leaves, as for a NIC without
the offload). And the reason we segment at all: AF_PACKET's vnet header refuses a gso_type
with the UDP-tunnel bit (Linux 6.18: EINVAL). If this kernel ever accepts it, the test
says so: then the uplink should hand whole frames to the kernel instead."""
import ctypes
import errno
import fcntl
import os
import random
import socket
import struct
import time

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP, in4_chksum
from scapy.layers.inet6 import IPv6, in6_chksum
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import checksum

from tests.datapath.test_gso import TCPV4, TCPV6, TUNNEL, encapsulated, random_inner, vnet_hdr
from vswitch.daemon.netlink import netns_entered
from vswitch.daemon.ports import VNET_HDR_LEN, PacketIO, UplinkPort, open_uplink_socket, set_tunnel_gso, tunnel_gso
from vswitch.datapath import gso
from vswitch.datapath.consts import ENCAP_HEADROOM
from vswitch.lab import Namespaces, nsexec, veth

SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM = 0x16, 0x17
ETH_P_ALL = 0x0003
PAYLOAD_BYTES = 60000


def _ethtool_value(sock, ifname, cmd, value=0):
    """struct ethtool_value {u32 cmd, data} through SIOCETHTOOL; returns data."""
    ev = (ctypes.c_uint32 * 2)(cmd, value)
    ifr = struct.pack("16sP", ifname.encode(), ctypes.addressof(ev)) + bytes(16)
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifr)
    return ev[1]


@pytest.fixture
def link(nss):
    """(namespace, uplink socket on gsoa, capture socket on gsob): tx checksumming off on gsoa."""
    ns = nss.new("gso")
    veth(ns, "gsoa", None, ns, "gsob", None, mtu=1500)
    with netns_entered(Namespaces.path(ns)):
        up = open_uplink_socket("gsoa")
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            cap.bind(("gsob", ETH_P_ALL))
            cap.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            _ethtool_value(up, "gsoa", ETHTOOL_STXCSUM, 0)
            assert _ethtool_value(up, "gsoa", ETHTOOL_GTXCSUM) == 0
        except BaseException:
            up.close()
            cap.close()
            raise
    try:
        yield ns, up, cap
    finally:
        up.close()
        cap.close()


def _captured_vxlan(cap, want, timeout_s=5.0):
    """The VXLAN frames (UDP to 4789) captured on the other end, until `want` or a quiet timeout."""
    got = []
    cap.settimeout(0.5)
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        try:
            f = cap.recv(70000)
        except socket.timeout:
            continue
        if len(f) >= 42 and f[12:14] == b"\x08\x00" and f[23] == 17 and f[36:38] == (4789).to_bytes(2, "big"):
            got.append(f)
    return got


def _tso_frame(v6):
    """(vnet header, encapsulated frame, payload, mss): a pod's TSO frame at pod MTU 1450
    (the uplink's 1500 - 50), so each segment is a 1500-byte outer IP packet."""
    rng = random.Random(13)
    inner, payload = random_inner(rng, v6)
    hdrs = inner[:len(inner) - len(payload)]
    mss = 1450 - (len(hdrs) - 14)
    payload = random.Random(14).randbytes(PAYLOAD_BYTES)
    return vnet_hdr((TCPV6 if v6 else TCPV4) | TUNNEL, mss), encapsulated(hdrs + payload), payload, mss


def _write_through_uplink(up, impl, hdr, frame):
    """Write one frame (behind its 12-byte vnet header) to the uplink socket `up` through
    the BatchIO writer of `impl`, as the daemon's loop does: written, no tx error."""
    pio = PacketIO(max_ports=4, max_batch=4, impl=impl)
    pio.set_port(UplinkPort("up", 1, up.fileno(), sock=None), 1)
    at = ENCAP_HEADROOM + VNET_HDR_LEN
    pio.buf[at - VNET_HDR_LEN:at] = np.frombuffer(hdr, np.uint8)
    pio.buf[at:at + len(frame)] = np.frombuffer(frame, np.uint8)
    pio.offsets[0], pio.lengths[0], pio.in_ports[0], pio.out_ports[0] = at, len(frame), 0, 1
    assert pio.write(1) == 1 and int(pio.tx_errors[1]) == 0


@pytest.fixture
def segments_mode(request):
    """D51's one write per segment (the "segments" mode) for both implementations, then "udp"."""
    set_tunnel_gso("segments")
    set_tunnel_gso("segments", "py")
    yield
    set_tunnel_gso("udp")
    set_tunnel_gso("udp", "py")


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("v6", [False, True], ids=["inner4", "inner6"])
def test_a_tso_frame_leaves_as_wire_frames_with_valid_checksums(link, impl, v6, segments_mode):
    ns, up, cap = link
    hdr, frame, payload, mss = _tso_frame(v6)
    _write_through_uplink(up, impl, hdr, frame)

    n = -(-PAYLOAD_BYTES // mss)
    got = _captured_vxlan(cap, n)
    assert len(got) == n
    hdr_end = len(frame) - PAYLOAD_BYTES
    assert [len(f) for f in got] == [hdr_end + mss] * (n - 1) + [hdr_end + PAYLOAD_BYTES - (n - 1) * mss]
    assert len(got[0]) - 14 == 1500                                    # the underlay MTU
    data = b""
    for k, f in enumerate(got):
        p = Ether(f)
        assert p[IP].len == len(f) - 14 and checksum(f[14:34]) == 0     # outer IPv4, valid checksum
        assert p[IP].id == k and p[UDP].len == len(f) - 34 and p[UDP].chksum == 0
        inner = p[VXLAN].payload
        l3 = inner[IPv6] if v6 else inner[IP]
        if not v6:
            assert checksum(bytes(l3)[:l3.ihl * 4]) == 0                # inner IPv4 checksum valid
        tcp_bytes = bytes(l3[TCP])
        assert (in6_chksum if v6 else in4_chksum)(6, l3, tcp_bytes) == 0   # completed by the kernel
        data += bytes(l3[TCP].payload)
    assert data == payload


def test_af_packet_refuses_the_udp_tunnel_gso_type(link):
    """Why the I/O layer segments: the uplink's vnet header does not take tunnel GSO."""
    ns, up, cap = link
    hdr, frame, _, mss = _tso_frame(False)
    hdr_end = len(frame) - PAYLOAD_BYTES
    inner_l3 = 14 + 20 + 16 + 14
    l4 = inner_l3 + (frame[inner_l3] & 15) * 4
    tunnel = struct.pack("<BBHHHH", 1, TCPV4 | TUNNEL, hdr_end, mss, l4, 16)  # as the core writes it
    try:
        os.writev(up.fileno(), [tunnel, frame[:hdr_end + 10 * mss]])
        answer = "accepted"
    except OSError as e:
        answer = errno.errorcode.get(e.errno, str(e.errno))
    assert answer == "EINVAL", (
        f"AF_PACKET {answer} gso_type 0x21 (UDP tunnel): tell the lead, this kernel may take tunnel GSO")
    assert _captured_vxlan(cap, 1, timeout_s=1.0) == []
    # the control: the same socket takes the frame's first segment as plain NEEDS_CSUM
    plain = struct.pack("<BBHHHH", 1, 0, 0, 0, l4, 16)
    assert os.writev(up.fileno(), [plain, frame[:hdr_end + mss]]) == 10 + hdr_end + mss


def test_a_kernel_vxlan_peer_delivers_whole_gso_frames_to_the_uplink_socket(nss):
    """The other direction (recorded for decapsulation): a kernel `vxlan` device (a node built
    as flannel builds it) sending a GSO datagram over a veth underlay does not segment it: the
    uplink's AF_PACKET socket reads one frame of the whole datagram, outer lengths set for
    it, and a vnet header that names the inner GSO type (here UDP_L4; TCPV4 for TCP) without
    the tunnel bit, csum_start at the inner L4 header. Decapsulation meets such frames."""
    a, b = nss.new("gxa"), nss.new("gxb")
    veth(a, "gxua", "192.168.77.1/24", b, "gxub", "192.168.77.2/24")
    nsexec(a, "ip", "link", "add", "gxvx", "type", "vxlan", "id", "1", "remote", "192.168.77.2",
           "dstport", "4789", "dev", "gxua")
    nsexec(a, "ip", "addr", "add", "10.99.0.1/24", "dev", "gxvx")
    nsexec(a, "ip", "link", "set", "gxvx", "up")
    nsexec(a, "ip", "neigh", "add", "10.99.0.2", "lladdr", "02:00:00:00:99:02", "dev", "gxvx")
    with netns_entered(Namespaces.path(b)):
        up = open_uplink_socket("gxub")
    try:
        with netns_entered(Namespaces.path(a)):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.setsockopt(socket.SOL_UDP, 103, 1400)                   # UDP_SEGMENT: one 14000-byte GSO send
            s.sendto(bytes(14000), ("10.99.0.2", 9))
        deadline = time.monotonic() + 5
        big = None
        while big is None and time.monotonic() < deadline:
            try:
                got = os.read(up.fileno(), 70000)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            if len(got) > 10 + 1514:
                big = got
        assert big is not None, "no whole GSO frame arrived: the kernel segmented it (then decap sees wire frames)"
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("<BBHHHH", big)
        f = big[10:]
        inner_udp = 50 + 14 + 20
        assert len(f) == 50 + 14 + 20 + 8 + 14000
        assert (flags, gso_type, gso_size, csum_start, csum_offset) == (1, 5, 1400, inner_udp, 6)
        assert int.from_bytes(f[16:18], "big") == len(f) - 14                  # outer IPv4 length of the whole
        assert int.from_bytes(f[38:40], "big") == len(f) - 34                  # outer UDP length
        assert int.from_bytes(f[36:38], "big") == 4789
    finally:
        up.close()


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("v6", [False, True], ids=["inner4", "inner6"])
def test_udp_gso_packets_cross_a_veth_whole_and_a_socket_gets_the_wire_segments(nss, impl, v6):
    """D54 against the kernel: the uplink writes a pod's 60,000-byte TSO frame as UDP GSO
    packets (AF_PACKET takes gso_type UDP_L4); on the other end of the veth a packet socket
    (as a peer vswitchd's uplink) reads each packet whole, and a plain UDP socket on port
    4789 (as a kernel VTEP's) gets the datagrams the kernel cut from them: exactly the wire
    segments' UDP payloads (VXLAN + inner frame), inner TCP checksums valid, so the kernel
    also found every outer UDP checksum it completed valid. The peer's reader cuts the
    whole packets into the same datagrams."""
    a, b = nss.new("usa"), nss.new("usb")
    veth(a, "usoa", None, b, "usob", None, mtu=1500)
    nsexec(b, "ip", "link", "set", "usob", "address", "02:00:00:00:bb:01")
    nsexec(b, "ip", "addr", "add", "192.168.50.2/24", "dev", "usob")
    with netns_entered(Namespaces.path(a)):
        up = open_uplink_socket("usoa")
    with netns_entered(Namespaces.path(b)):
        peer = open_uplink_socket("usob")
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("0.0.0.0", 4789))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.settimeout(2.0)
        assert tunnel_gso(impl) == "udp"
        hdr, frame, payload, mss = _tso_frame(v6)
        _write_through_uplink(up, impl, hdr, frame)
        assert tunnel_gso(impl) == "udp"                                # the kernel took them

        layout = gso.layout(hdr, frame)[1]
        udp, l4 = layout["udp"], layout["l4"]
        want = [gso.complete_tcp_checksum(seg, l4)[udp + 8:] for _, seg in gso.segment_vxlan(hdr, frame)]
        assert len(want) == -(-PAYLOAD_BYTES // mss)
        got = []
        while len(got) < len(want):
            try:
                got.append(rx.recv(70000))
            except socket.timeout:
                break
        assert got == want
        data = b""
        for d in got:
            inner = VXLAN(d).payload
            l3 = inner[IPv6] if v6 else inner[IP]
            assert (in6_chksum if v6 else in4_chksum)(6, l3, bytes(l3[TCP])) == 0
            data += bytes(l3[TCP].payload)
        assert data == payload

        # the peer's packet socket read the packets whole (65,535 bytes of IPv4 at most each)
        sent = gso.pack_udp_gso(hdr, frame)
        assert len(sent) == 2 and sent[0][0][1] == gso.VNET_GSO_UDP_L4
        packets = []
        deadline = time.monotonic() + 5
        while len(packets) < len(sent) and time.monotonic() < deadline:
            try:
                w = os.read(peer.fileno(), 70000)
            except BlockingIOError:
                time.sleep(0.05)
                continue
            if (len(w) > 10 + 14 + 20 and w[10 + 12:10 + 14] == b"\x08\x00" and w[10 + 23] == 17
                    and w[10 + 36:10 + 38] == (4789).to_bytes(2, "big")):
                packets.append(w)
        assert [p[10:] for p in packets] == [p for _, p in sent]
        # flags, gso_type, gso_size, csum_start, csum_offset as sent (hdr_len is the kernel's)
        fields = lambda h: struct.unpack_from("<BBxxHHH", h)                       # noqa: E731
        assert [fields(p) for p in packets] == [fields(vh) for vh, _ in sent]
        cut = [f for p in packets for _, f in (gso.split_udp_gso(p[:10], p[10:]) if p[1] else [(p[:10], p[10:])])]
        assert [c[udp + 8:] for c in cut] == want
    finally:
        up.close()
        peer.close()
        rx.close()
