"""UDP GSO of VXLAN segments (docs/datapath.md D54; vswitch/datapath/gso.py "UDP GSO" is the
spec, ext/io.pxi the C version). The sender packs the wire segments of a tunnel GSO frame
(gso.segment_vxlan, inner TCP checksums completed) back to back into UDP GSO packets; the
kernel's cut of such a packet (gso_size pieces of UDP payload behind the outer headers with
lengths, ID and checksums rewritten) gives back exactly those segments. The receiver cuts a
UDP GSO frame it read whole into the same datagrams. Checked here: C == spec on random
frames (both directions, and on corrupted input), and, by scapy against RFCs 768/791/793
and the original frame, not against either implementation: each packet's outer lengths
and vnet header, and each datagram of the cut, whose UDP checksum (once completed as the
kernel completes NEEDS_CSUM) and inner TCP checksum are valid. The real kernel's side is
tests/integration/test_gso_kernel.py."""
import random
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP, in4_chksum
from scapy.layers.inet6 import IPv6, in6_chksum
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.utils import checksum

from tests.datapath.test_gso import core, random_case  # noqa: F401  (core: the module fixture)
from vswitch.datapath import gso


def _cases(seed, n):
    rng = random.Random(seed)
    return [random_case(rng) for _ in range(n)]


def test_core_equals_the_spec_on_random_frames(core):
    for hdr, frame, _ in _cases(5, 80):
        packets = gso.pack_udp_gso(hdr, frame)
        assert core.pack_udp_gso(hdr, frame) == packets
        for vh, packet in packets:
            if vh[1] == gso.VNET_GSO_UDP_L4:
                assert core.split_udp_gso(vh, packet) == gso.split_udp_gso(vh, packet)


def _complete(frame, start, offset):
    """The frame with the partial checksum at start + offset completed (NEEDS_CSUM)."""
    done = bytearray(frame)
    done[start + offset:start + offset + 2] = checksum(bytes(frame[start:])).to_bytes(2, "big")
    return bytes(done)


@pytest.mark.parametrize("impl", ["py", "c"])
def test_the_cut_packets_are_the_wire_segments_and_valid(impl, core):
    pack = gso.pack_udp_gso if impl == "py" else core.pack_udp_gso
    cut = gso.split_udp_gso if impl == "py" else core.split_udp_gso
    for hdr, frame, payload in _cases(768, 6):
        layout = gso.layout(hdr, frame)[1]
        udp, l4 = layout["udp"], layout["l4"]
        segments = gso.segment_vxlan(hdr, frame)
        packets = pack(hdr, frame)
        datagrams = []
        first = 0
        for vh, packet in packets:
            flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack_from("<BBHHHH", vh)
            assert (flags, hdr_len, csum_start, csum_offset) == (1, udp + 8, udp, 6)
            o = Ether(packet)
            assert o[IP].len == len(packet) - 14 <= 65535 and o[UDP].len == len(packet) - udp
            assert o[IP].id == (Ether(frame)[IP].id + first) & 0xFFFF
            assert checksum(packet[14:udp]) == 0                            # a valid IPv4 header checksum
            if gso_type == gso.VNET_GSO_UDP_L4:
                assert gso_size == len(segments[0][1]) - udp - 8
                pieces = [f for _, f in cut(vh, packet)]
            else:
                assert gso_type == 0 and gso_size == 0
                pieces = [packet]
            first += len(pieces)
            datagrams += pieces
        assert len(datagrams) == len(segments)
        got_payload = b""
        for k, (d, (_, seg)) in enumerate(zip(datagrams, segments)):
            wire = _complete(d, udp, 6)                        # as the kernel completes it
            o = Ether(wire)
            rebuilt = o.copy()
            rebuilt[UDP].chksum = None
            assert bytes(rebuilt[UDP])[6:8] == bytes(o[UDP])[6:8]          # a valid UDP checksum
            inner = o[VXLAN].payload
            v6 = IPv6 in inner
            tcp_bytes = bytes(inner[TCP])
            assert (in6_chksum if v6 else in4_chksum)(6, inner[IPv6 if v6 else IP], tcp_bytes) == 0
            # all but the outer UDP checksum equal the segment_vxlan wire frame, completed
            s = _complete(seg, l4, 16)
            assert wire[:udp + 6] == s[:udp + 6] and wire[udp + 8:] == s[udp + 8:]
            got_payload += bytes(inner[TCP].payload)
        assert got_payload == payload


@pytest.mark.parametrize("impl", ["py", "c"])
def test_the_cut_without_a_partial_checksum_keeps_data_valid_only(impl, core):
    cut = gso.split_udp_gso if impl == "py" else core.split_udp_gso
    hdr, frame, _ = _cases(11, 1)[0]
    vh, packet = [p for p in gso.pack_udp_gso(hdr, frame)][0]
    for flags, want in ((2, 2), (0, 0), (2 | 4, 2)):
        v = bytearray(vh)
        v[0] = flags
        for h, d in cut(bytes(v), packet):
            assert h == bytes([want]) + bytes(11)
            assert d[14 + 20 + 6:14 + 20 + 8] == b"\0\0"                 # IPv4 UDP: no checksum


@pytest.mark.parametrize("impl", ["py", "c"])
def test_random_bytes_never_crash_the_cut(impl, core):
    """Fuzz: truncations and byte flips of packed frames: datagrams or ValueError, both agree."""
    rng = random.Random(42)
    for hdr, frame, _ in _cases(43, 60):
        for vh, packet in gso.pack_udp_gso(hdr, frame):
            if vh[1] != gso.VNET_GSO_UDP_L4:
                continue
            vh, packet = bytearray(vh), bytearray(packet[:rng.randrange(0, len(packet) + 1)]
                                                  if rng.random() < 0.5 else packet)
            for _ in range(rng.randrange(0, 4)):
                if packet:
                    packet[rng.randrange(min(len(packet), 60))] = rng.randrange(256)
            if rng.random() < 0.3:
                vh[4:6] = rng.randrange(0, 200).to_bytes(2, "little")
            try:
                want = gso.split_udp_gso(bytes(vh), bytes(packet))
            except ValueError:
                want = None
            try:
                got = core.split_udp_gso(bytes(vh), bytes(packet))
            except ValueError:
                got = None
            assert got == want
