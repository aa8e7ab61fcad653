"""bench/vxfloor.c, the design's floor that bench_crossnode.py measures as ``c-floor``, does
the wire work vswitchd does, so its figures are a fair bound: pods on two nodes reach each
other across its tunnel and a TCP transfer arrives with next to no retransmission; its
TSO segments leave as UDP GSO packets of VXLAN datagrams (VNI 1, port 4789, DF) whose
inner TCP checksums are complete with ``--csum`` (as vswitchd's) and left 0 without;
its same-node pair carries TCP too. The same with ``--tx-ring`` (TSO segments read straight
into a PACKET_TX_RING's frames and sent from there)."""
import contextlib

import pytest
from scapy.all import IP, TCP, UDP, rdpcap
from scapy.layers.vxlan import VXLAN

from vswitch import lab
from vswitch.lab import cluster

from bench import floor

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(lab.kernel_unavailable() is not None, reason=lab.kernel_unavailable() or "")]

BYTES = 8 << 20


def _inner_tcp_segments(path):
    """(packet, inner IP, inner TCP) of the first 400 captured frames that are VXLAN
    datagrams carrying TCP payload (a UDP GSO packet: its first datagram, the capture keeps
    2 KiB)."""
    out = []
    for p in rdpcap(str(path), count=400):
        if UDP in p and p[UDP].dport == cluster.IANA_VXLAN_PORT and VXLAN in p:
            inner = p[VXLAN].payload
            if IP in inner and TCP in inner and len(inner[TCP].payload) > 0:
                out.append((p, inner[IP], inner[TCP]))
    return out


@pytest.mark.parametrize("csum,tx_ring", [(True, False), (False, False), (True, True)],
                         ids=["csum", "no-csum", "csum-tx-ring"])
def test_floor_carries_tcp_across_its_tunnel_with_the_wire_format(tmp_path, csum, tx_ring):
    pcap = tmp_path / "underlay.pcap"
    with contextlib.contextmanager(floor.floor_pairs)(csum=csum, tx_ring=tx_ring) as pairs:
        a, b = pairs["cross"].a, pairs["cross"].b
        assert lab.nsexec(a.ns, "ping", "-c", "2", "-W", "5", b.ip, check=False).returncode == 0
        with cluster.Capture(pairs["underlay"].ns, "n1", pcap, f"udp port {cluster.IANA_VXLAN_PORT}",
                             snaplen_bytes=2048):
            res = lab.iperf3(b.ns, b.ip, a.ns, seconds=2)
        ring, copied = pairs["tso_sent"]()[0].values()     # node 1: A's segments
        assert (ring > copied) if tx_ring else (ring == 0 and copied > 0), (ring, copied)
        sent = res["end"]["sum_sent"]
        assert res["end"]["sum_received"]["bytes"] > BYTES
        # TCP retransmits a tail loss probe now and then on any path; a floor that lost
        # frames (a datagram dropped in the merge) retransmits a tenth of what it sends
        assert sent["retransmits"] < sent["bytes"] // 1398 // 1000, sent
        s1, s2 = pairs["same"].a, pairs["same"].b
        same = lab.iperf3(s2.ns, s2.ip, s1.ns, seconds=1)
        assert same["end"]["sum_received"]["bytes"] > BYTES
    segs = _inner_tcp_segments(pcap)
    assert segs, "no VXLAN datagram with TCP data on the underlay"
    # a UDP GSO packet (outer IPv4 longer than the underlay MTU); a lone frame's inner
    # checksum stays partial (the pod's vnet header asked for it: nobody on a veth fills it)
    gso = [(p, ip, tcp) for p, ip, tcp in segs if p[IP].len > 1500]
    assert gso, "no UDP GSO packet: every TSO segment left cut"
    for p, ip, tcp in gso:
        assert p[VXLAN].vni == cluster.DEFAULT_VNI and p[IP].flags.DF
        assert ip.src == a.ip and ip.dst == b.ip
        if csum:
            rebuilt = IP(bytes(ip)[:ip.len])
            del rebuilt[TCP].chksum                         # scapy computes it again
            assert tcp.chksum == IP(bytes(rebuilt))[TCP].chksum
        else:
            assert tcp.chksum == 0
