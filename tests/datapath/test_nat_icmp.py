"""ICMP errors about hostPort flows (twin's D37): translated with their flow, like Linux
conntrack's RELATED packets, so a client of node:hostPort hears "port unreachable" from
node:hostPort and a pod hears about its replies from the address it replied to.

Golden rows as in test_nat.py: the error that goes in (quoting the packet its sender
received, as Linux quotes it), the out port and the exact frame that must come out, built
by scapy from scratch (every checksum computed by scapy: outer IPv4 header, ICMP, and the
quoted packet's own IPv4 header and TCP/UDP checksums inside the ICMP payload).
"""
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6PacketTooBig, IPv6
from scapy.packet import Raw

from dp_helpers import (
    A4, A6, CLIENT4, CLIENT6, GW4, GW6, GW_MAC, MAC_A, NODE4, NODE6, NODE_MAC, POD_A,
    ROUTER_MAC, UPLINK, eth, gc, l3, send1, vnet,
)
from vswitch.datapath import consts as C

from test_nat import dp, run_table  # noqa: F401  (dp: the topology fixture)

FAM = {4: dict(client=CLIENT4, node=NODE4, a=A4, gw=GW4), 6: dict(client=CLIENT6, node=NODE6, a=A6, gw=GW6)}


def ip_pkt(src, dst, l4):
    """The IP packet (no Ethernet) as bytes, every checksum computed by scapy."""
    return bytes(l3(src, dst) / l4)


def error(smac, dmac, src, dst, quoted, family, kind="unreach"):
    """An ICMP error frame quoting `quoted` (bytes of an IP packet)."""
    if family == 4:
        icmp = ICMP(type=3, code=3) if kind == "unreach" else ICMP(type=11, code=0)
    else:
        icmp = ICMPv6DestUnreach(code=4) if kind == "unreach" else ICMPv6PacketTooBig(mtu=1280)
    return bytes(eth(smac, dmac) / l3(src, dst) / icmp / Raw(quoted))


def check(dp, frame_in, in_port, out_expected, frame_expected, now_ns):
    """One golden row (test_nat.run_table: out port, exact frame, scapy's checksums)."""
    run_table(dp, [("icmp error", in_port, frame_in, out_expected, frame_expected)], now_ns)


@pytest.mark.parametrize("family", [4, 6])
def test_port_unreachable_from_the_pod_reaches_the_client_as_from_node_hostport(dp, family):
    f = FAM[family]
    query = UDP(sport=40000, dport=5353) / b"query"
    out, seen = send1(dp, bytes(eth(ROUTER_MAC, NODE_MAC) / l3(f["client"], f["node"]) / query), UPLINK, 10)
    assert out == POD_A
    entry = dp.conntrack()[0]
    # the pod has nothing on port 53: it answers with an error quoting what it received
    as_received = ip_pkt(f["client"], f["a"], UDP(sport=40000, dport=53) / b"query")
    assert seen[14:] == as_received
    as_sent = ip_pkt(f["client"], f["node"], query)
    check(dp, error(MAC_A, GW_MAC, f["a"], f["client"], as_received, family), POD_A,
          UPLINK, error(NODE_MAC, ROUTER_MAC, f["node"], f["client"], as_sent, family), 20)
    assert gc(dp, "nat_translated") == 2 and gc(dp, "ct_created") == 1
    after = dp.conntrack()[0]
    # the error does not touch the entry: no state change, no packet, same expiry
    assert (after["state"], after["packets"], after["expires_ns"]) == \
        (entry["state"], entry["packets"], entry["expires_ns"])


@pytest.mark.parametrize("family", [4, 6])
def test_an_error_from_the_client_side_about_a_reply_reaches_the_pod(dp, family):
    """Direction 0: the client's side quotes the (translated) reply it got, from
    node:hostPort; the pod gets it about the reply it sent, from its own port 53."""
    f = FAM[family]
    send1(dp, bytes(eth(ROUTER_MAC, NODE_MAC) / l3(f["client"], f["node"]) / UDP(sport=40000, dport=5353)),
          UPLINK, 10)
    out, reply = send1(dp, bytes(eth(MAC_A, GW_MAC) / l3(f["a"], f["client"]) / UDP(sport=53, dport=40000)
                                 / b"answer"), POD_A, 11)
    assert out == UPLINK
    got_by_client = reply[14:]
    sent_by_pod = ip_pkt(f["a"], f["client"], UDP(sport=53, dport=40000) / b"answer")
    check(dp, error(ROUTER_MAC, NODE_MAC, f["client"], f["node"], got_by_client, family, "other"), UPLINK,
          POD_A, error(GW_MAC, MAC_A, f["client"], f["a"], sent_by_pod, family, "other"), 20)


@pytest.mark.parametrize("family", [4, 6])
def test_a_truncated_tcp_quote_gets_its_ports_and_addresses_but_no_checksum(dp, family):
    """RFC 792 quotes the IP header and 8 bytes: the TCP checksum is not in the quote, so
    only the addresses, ports and (IPv4) the quoted header checksum change."""
    f = FAM[family]
    syn = TCP(sport=40000, dport=8080, flags="S", seq=7)
    send1(dp, bytes(eth(ROUTER_MAC, NODE_MAC) / l3(f["client"], f["node"]) / syn), UPLINK, 10)
    hdr = 20 if family == 4 else 40
    as_received = ip_pkt(f["client"], f["a"], TCP(sport=40000, dport=80, flags="S", seq=7))[:hdr + 8]
    as_sent = ip_pkt(f["client"], f["node"], syn)[:hdr + 8]
    check(dp, error(MAC_A, GW_MAC, f["a"], f["client"], as_received, family), POD_A,
          UPLINK, error(NODE_MAC, ROUTER_MAC, f["node"], f["client"], as_sent, family), 20)


@pytest.mark.parametrize("family", [4, 6])
def test_hairpin_error_goes_back_to_the_pod_from_node_hostport(dp, family):
    """Pod A probes its own hostPort (SNAT to the gateway); its own error about the probe
    comes back to it from node:hostPort, with the MACs stored in the entry."""
    f = FAM[family]
    probe = UDP(sport=33333, dport=5353) / b"x"
    out, seen = send1(dp, bytes(eth(MAC_A, GW_MAC) / l3(f["a"], f["node"]) / probe), POD_A, 10)
    assert out == POD_A and seen[14:] == ip_pkt(f["gw"], f["a"], UDP(sport=33333, dport=53) / b"x")
    check(dp, error(MAC_A, GW_MAC, f["a"], f["gw"], seen[14:], family), POD_A,
          POD_A, error(GW_MAC, MAC_A, f["node"], f["a"], ip_pkt(f["a"], f["node"], probe), family), 20)
    assert gc(dp, "loop") == 0


def test_errors_that_belong_to_no_flow_pass_untouched(dp):
    send1(dp, bytes(eth(ROUTER_MAC, NODE_MAC) / IP(src=CLIENT4, dst=NODE4) / UDP(sport=40000, dport=5353)),
          UPLINK, 10)
    quoted = ip_pkt(CLIENT4, A4, UDP(sport=40001, dport=53))            # another source port
    frames = [
        error(MAC_A, GW_MAC, A4, CLIENT4, quoted, 4),
        bytes(eth(MAC_A, GW_MAC) / IP(src=A4, dst=CLIENT4) / ICMP(type=8) / Raw(quoted)),   # not an error
        error(MAC_A, GW_MAC, A4, CLIENT4,                                      # the quote is a fragment
              bytes(IP(src=CLIENT4, dst=A4, flags="MF") / UDP(sport=40000, dport=53)), 4),
        error(MAC_A, GW_MAC, A4, CLIENT4, ip_pkt(CLIENT4, A4, UDP(sport=40000, dport=53))[:27], 4),  # 7 L4 bytes
        bytes(eth(MAC_A, GW_MAC) / IPv6(src=A6, dst=CLIENT6) / ICMPv6EchoRequest()),
    ]
    for i, frame in enumerate(frames):
        out, got = send1(dp, frame, POD_A, 20 + i)
        assert got == frame, i
    assert gc(dp, "nat_translated") == 1


def test_an_error_with_needs_csum_is_not_translated(dp_impl):
    from dp_helpers import make_topo
    dp = make_topo(dp_impl, vnet_hdr_len=12)
    query = bytes(eth(ROUTER_MAC, NODE_MAC) / IP(src=CLIENT4, dst=NODE4) / UDP(sport=40000, dport=5353))
    _, seen = send1(dp, query, UPLINK, 10, vnet_hdr_len=12, vnet_hdrs=[vnet()])
    frame = error(MAC_A, GW_MAC, A4, CLIENT4, seen[14:], 4)
    out, got = send1(dp, frame, POD_A, 20, vnet_hdr_len=12, vnet_hdrs=[vnet(needs_csum=True)])
    assert got == frame and gc(dp, "nat_translated") == 1
    out, got = send1(dp, frame, POD_A, 21, vnet_hdr_len=12, vnet_hdrs=[vnet()])
    assert out == UPLINK and got != frame and gc(dp, "nat_translated") == 2


def test_an_error_about_an_expired_flow_deletes_it_and_passes(dp):
    send1(dp, bytes(eth(ROUTER_MAC, NODE_MAC) / IP(src=CLIENT4, dst=NODE4) / UDP(sport=40000, dport=5353)),
          UPLINK, 10)
    late = 10 + C.DEFAULTS["udp_timeout_ns"]
    frame = error(MAC_A, GW_MAC, A4, CLIENT4, ip_pkt(CLIENT4, A4, UDP(sport=40000, dport=53)), 4)
    out, got = send1(dp, frame, POD_A, late)
    assert got == frame and len(dp.conntrack()) == 0
    assert gc(dp, "ct_expired") == 1 and gc(dp, "nat_translated") == 1


def test_trace_shows_the_translation(dp):
    send1(dp, bytes(eth(ROUTER_MAC, NODE_MAC) / IP(src=CLIENT4, dst=NODE4) / UDP(sport=40000, dport=5353)),
          UPLINK, 10)
    frame = error(MAC_A, GW_MAC, A4, CLIENT4, ip_pkt(CLIENT4, A4, UDP(sport=40000, dport=53)), 4)
    stages = dp.trace(frame, POD_A, 20)
    assert [s for s, _ in stages if s == "nat"] == ["nat"] and stages[-1] == ("output", f"port {UPLINK}")
    assert gc(dp, "nat_translated") == 1                       # trace changed nothing
