"""Stage 4 golden tables: hostPort DNAT, reply translation, hairpin, pod to pod via a node
address; TCP and UDP, IPv4 and IPv6; UDP's zero checksum; partial-checksum frames.

Each row is one packet through the same datapath, in order: the frame that goes in, the
out port and the exact frame that must come out. The expected frames are built by scapy
from scratch (checksums computed by scapy), so the incremental updates are checked byte
for byte; every output is also re-checked with ``checksums_ok`` (rebuild with
chksum=None and compare).
"""
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Dot1Q, Ether

from dp_helpers import (
    A4, A6, B4, B6, CLIENT4, CLIENT6, GW4, GW6, GW_MAC, MAC_A, MAC_B, NODE4, NODE6, NODE_MAC,
    POD_A, POD_B, ROUTER_MAC, UPLINK, checksums_ok, gc, ip4, ipb, make_topo, mac_str,
    pseudo_sum, send1, tcp, udp, vnet, with_l4_check,
)
from vswitch.datapath import consts as C


def pkt(kind, smac, dmac, src, dst, sport, dport, **kw):
    return (tcp if kind == "tcp" else udp)(smac, dmac, src, dst, sport, dport, **kw)


def run_table(dp, rows, now_ns=1000):
    for i, (name, in_port, frame_in, out_expected, frame_expected) in enumerate(rows):
        out, frame_out = send1(dp, frame_in, in_port, now_ns + i)
        assert out == out_expected, name
        assert frame_out == frame_expected, (
            f"{name}:\n got      {Ether(frame_out).summary()} {frame_out.hex()}\n"
            f" expected {Ether(frame_expected).summary()} {frame_expected.hex()}")
        assert checksums_ok(frame_out), name


@pytest.fixture
def dp(dp_impl):
    return make_topo(dp_impl)


FAMILIES = {4: dict(client=CLIENT4, node=NODE4, a=A4, b=B4, gw=GW4),
            6: dict(client=CLIENT6, node=NODE6, a=A6, b=B6, gw=GW6)}
KINDS = {"tcp": (8080, 80, dict(flags="S"), dict(flags="SA"), dict(flags="A", payload=b"GET / HTTP/1.0\r\n")),
         "udp": (5353, 53, dict(payload=b"query"), dict(payload=b"answer!"), dict(payload=b"q2"))}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_dnat_and_reply_translation_from_an_outside_client(dp, kind, family):
    f = FAMILIES[family]
    hport, cport, first, reply, more = KINDS[kind]
    rows = [
        ("client -> node:hostPort is DNATed to the pod", UPLINK,
         pkt(kind, ROUTER_MAC, NODE_MAC, f["client"], f["node"], 40000, hport, **first),
         POD_A, pkt(kind, GW_MAC, MAC_A, f["client"], f["a"], 40000, cport, **first)),
        ("pod reply is translated back to the client", POD_A,
         pkt(kind, MAC_A, GW_MAC, f["a"], f["client"], cport, 40000, **reply),
         UPLINK, pkt(kind, NODE_MAC, ROUTER_MAC, f["node"], f["client"], hport, 40000, **reply)),
        ("next original packet replays the translation", UPLINK,
         pkt(kind, ROUTER_MAC, NODE_MAC, f["client"], f["node"], 40000, hport, **more),
         POD_A, pkt(kind, GW_MAC, MAC_A, f["client"], f["a"], 40000, cport, **more)),
        ("another source port is another connection", UPLINK,
         pkt(kind, ROUTER_MAC, NODE_MAC, f["client"], f["node"], 40001, hport, **first),
         POD_A, pkt(kind, GW_MAC, MAC_A, f["client"], f["a"], 40001, cport, **first)),
    ]
    run_table(dp, rows)
    ct = dp.conntrack()
    assert len(ct) == 2 and gc(dp, "ct_created") == 2 and gc(dp, "nat_translated") == 4
    e = ct[0]
    assert int(e["family"]) == family and int(e["proto"]) == (6 if kind == "tcp" else 17)
    assert (int(e["orig_sport"]), int(e["orig_dport"]), int(e["reply_sport"]), int(e["reply_dport"])) == \
        (40000, hport, cport, 40000)
    assert int(e["in_port"]) == UPLINK and int(e["out_port"]) == POD_A and int(e["hairpin"]) == 0
    assert bytes(e["orig_src_mac"]) == ROUTER_MAC and bytes(e["orig_dst_mac"]) == NODE_MAC
    assert int(e["packets"]) == 3
    mapped = (lambda s: bytes(10) + b"\xff\xff" + ipb(s)) if family == 4 else ipb
    assert bytes(e["orig_src"]) == mapped(f["client"]) and bytes(e["orig_dst"]) == mapped(f["node"])
    assert bytes(e["reply_src"]) == mapped(f["a"]) and bytes(e["reply_dst"]) == mapped(f["client"])
    # learning used the original source MACs, not the rewritten ones
    learnt = {bytes(r["mac"]): int(r["port"]) for r in dp.fdb() if not r["static"]}
    assert learnt == {ROUTER_MAC: UPLINK}             # A's and B's MACs are bound: static entries


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_hairpin_is_snatted_to_the_gateway(dp, kind, family):
    f = FAMILIES[family]
    hport, cport, first, reply, more = KINDS[kind]
    rows = [
        ("pod A -> node:hostPort of its own: DNAT + SNAT to the gateway, back to port A", POD_A,
         pkt(kind, MAC_A, GW_MAC, f["a"], f["node"], 33333, hport, **first),
         POD_A, pkt(kind, GW_MAC, MAC_A, f["gw"], f["a"], 33333, cport, **first)),
        ("pod A answers the gateway; translated back to node:hostPort -> A", POD_A,
         pkt(kind, MAC_A, GW_MAC, f["a"], f["gw"], cport, 33333, **reply),
         POD_A, pkt(kind, GW_MAC, MAC_A, f["node"], f["a"], hport, 33333, **reply)),
        ("again in the original direction", POD_A,
         pkt(kind, MAC_A, GW_MAC, f["a"], f["node"], 33333, hport, **more),
         POD_A, pkt(kind, GW_MAC, MAC_A, f["gw"], f["a"], 33333, cport, **more)),
    ]
    run_table(dp, rows)
    e = dp.conntrack()[0]
    assert int(e["hairpin"]) == 1 and int(e["in_port"]) == POD_A == int(e["out_port"])
    assert gc(dp, "loop") == 0


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_pod_b_reaches_pod_a_through_a_node_address(dp, kind, family):
    f = FAMILIES[family]
    hport, cport, first, reply, more = KINDS[kind]
    rows = [
        ("pod B -> node:hostPort goes to pod A, source kept", POD_B,
         pkt(kind, MAC_B, GW_MAC, f["b"], f["node"], 44444, hport, **first),
         POD_A, pkt(kind, GW_MAC, MAC_A, f["b"], f["a"], 44444, cport, **first)),
        ("pod A replies to B directly on L2; translated to come from node:hostPort", POD_A,
         pkt(kind, MAC_A, MAC_B, f["a"], f["b"], cport, 44444, **reply),
         POD_B, pkt(kind, GW_MAC, MAC_B, f["node"], f["b"], hport, 44444, **reply)),
    ]
    run_table(dp, rows)
    assert int(dp.conntrack()[0]["hairpin"]) == 0


def test_exact_host_ip_rule_matches_only_that_address(dp):
    dp.set_node_addresses([ip4(NODE4), ip4("192.168.1.11")])
    rows = [
        ("9090 on 192.168.1.10 -> pod B:90", UPLINK,
         tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1234, 9090), POD_B,
         tcp(GW_MAC, MAC_B, CLIENT4, B4, 1234, 90)),
        ("9090 on 192.168.1.11: no rule, untouched (unknown MAC: host and uplink only)", UPLINK,
         tcp(ROUTER_MAC, NODE_MAC, CLIENT4, "192.168.1.11", 1234, 9090), C.OUT_FLOOD_UNKNOWN,
         tcp(ROUTER_MAC, NODE_MAC, CLIENT4, "192.168.1.11", 1234, 9090)),
        ("8080 on the second node address -> pod A", UPLINK,
         tcp(ROUTER_MAC, NODE_MAC, CLIENT4, "192.168.1.11", 1235, 8080), POD_A,
         tcp(GW_MAC, MAC_A, CLIENT4, A4, 1235, 80)),
        ("8080 on a non-node address: untouched", UPLINK,
         tcp(ROUTER_MAC, NODE_MAC, CLIENT4, "192.168.1.99", 1236, 8080), C.OUT_FLOOD_UNKNOWN,
         tcp(ROUTER_MAC, NODE_MAC, CLIENT4, "192.168.1.99", 1236, 8080)),
    ]
    run_table(dp, rows)


def test_an_exact_rule_wins_over_an_any_rule(dp):
    dp.add_hostport(6, 8080, ip4(B4), 8081, POD_B, host_ip=ip4(NODE4))
    run_table(dp, [("exact first", UPLINK, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080), POD_B,
                    tcp(GW_MAC, MAC_B, CLIENT4, B4, 1, 8081))])


def test_tcp_over_ipv4_with_options_and_a_vlan_tag(dp):
    opts = b"\x01\x01\x01\x00"   # NOP NOP NOP EOL
    def frame(smac, dmac, src, dst, sport, dport):
        return bytes(Ether(src=mac_str(smac), dst=mac_str(dmac)) / Dot1Q(vlan=3)
                     / IP(src=src, dst=dst, options=opts, ttl=9) / TCP(sport=sport, dport=dport, flags="PA")
                     / b"payload")
    run_table(dp, [
        ("tagged, with IP options", UPLINK, frame(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 5555, 8080),
         POD_A, frame(GW_MAC, MAC_A, CLIENT4, A4, 5555, 80)),
        ("reply", POD_A, frame(MAC_A, GW_MAC, A4, CLIENT4, 80, 5555),
         UPLINK, frame(NODE_MAC, ROUTER_MAC, NODE4, CLIENT4, 8080, 5555)),
    ])


def test_udp_over_ipv4_with_zero_checksum_stays_zero(dp):
    rows = [
        ("client sends no checksum", UPLINK,
         udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7000, 5353, chksum=0), POD_A,
         udp(GW_MAC, MAC_A, CLIENT4, A4, 7000, 53, chksum=0)),
        ("pod replies with no checksum", POD_A,
         udp(MAC_A, GW_MAC, A4, CLIENT4, 53, 7000, chksum=0), UPLINK,
         udp(NODE_MAC, ROUTER_MAC, NODE4, CLIENT4, 5353, 7000, chksum=0)),
        ("hairpin with no checksum", POD_A,
         udp(MAC_A, GW_MAC, A4, NODE4, 7001, 5353, chksum=0), POD_A,
         udp(GW_MAC, MAC_A, GW4, A4, 7001, 53, chksum=0)),
    ]
    run_table(dp, rows)


def _sport_for_zero_udp_sum(src, dst, dport, payload):
    """A source port for which the translated UDP packet's checksum computes to 0 (so it
    must be written 0xFFFF): UDP's sum is linear in the source port."""
    base = bytes(IP(src=src, dst=dst) / UDP(sport=0, dport=dport) / payload)
    c0 = int.from_bytes(base[26:28], "big")
    s = (~c0) & 0xFFFF                     # folded sum with sport = 0
    sport = (0xFFFF - s) % 0xFFFF          # makes the folded sum 0xFFFF, i.e. checksum 0
    return sport or 0xFFFF


@pytest.mark.parametrize("family", [4, 6])
def test_a_computed_udp_checksum_of_zero_is_written_ffff(dp, family):
    f = FAMILIES[family]
    payload = b"abcd"
    if family == 4:
        sport = _sport_for_zero_udp_sum(f["client"], f["a"], 53, payload)
    else:
        base = bytes(IPv6(src=f["client"], dst=f["a"]) / UDP(sport=0, dport=53) / payload)
        s = (~int.from_bytes(base[46:48], "big")) & 0xFFFF
        sport = ((0xFFFF - s) % 0xFFFF) or 0xFFFF
    expected = udp(GW_MAC, MAC_A, f["client"], f["a"], sport, 53, payload=payload)
    assert Ether(expected)[UDP].chksum == 0xFFFF      # scapy writes 0xFFFF for a zero sum too
    run_table(dp, [("translated sum is zero", UPLINK,
                    udp(ROUTER_MAC, NODE_MAC, f["client"], f["node"], sport, 5353, payload=payload),
                    POD_A, expected)])


def _partial(frame, src, dst):
    """frame with its L4 checksum field replaced by the pseudo-header sum (NEEDS_CSUM)."""
    pkt = Ether(frame)
    l4 = TCP if TCP in pkt else UDP
    proto = 6 if l4 is TCP else 17
    return with_l4_check(frame, pseudo_sum(ipb(src), ipb(dst), proto, len(pkt[l4])))


@pytest.mark.parametrize("vnet_len", [10, 12])
@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_partial_checksum_frames_only_get_the_pseudo_header_change(dp_impl, kind, family, vnet_len):
    dp = make_topo(dp_impl, vnet_hdr_len=vnet_len)
    f = FAMILIES[family]
    hport, cport, first, reply, _ = KINDS[kind]
    hdr = vnet(needs_csum=True, hdr_len=vnet_len)
    rows = [
        # (in port, frame in, out port, frame out); src/dst of the pseudo header per frame
        (UPLINK, _partial(pkt(kind, ROUTER_MAC, NODE_MAC, f["client"], f["node"], 40000, hport, **first),
                          f["client"], f["node"]),
         POD_A, _partial(pkt(kind, GW_MAC, MAC_A, f["client"], f["a"], 40000, cport, **first),
                         f["client"], f["a"])),
        (POD_A, _partial(pkt(kind, MAC_A, GW_MAC, f["a"], f["client"], cport, 40000, **reply),
                         f["a"], f["client"]),
         UPLINK, _partial(pkt(kind, NODE_MAC, ROUTER_MAC, f["node"], f["client"], hport, 40000, **reply),
                          f["node"], f["client"])),
        (POD_A, _partial(pkt(kind, MAC_A, GW_MAC, f["a"], f["node"], 33333, hport, **first),
                         f["a"], f["node"]),
         POD_A, _partial(pkt(kind, GW_MAC, MAC_A, f["gw"], f["a"], 33333, cport, **first),
                         f["gw"], f["a"])),
        (POD_A, _partial(pkt(kind, MAC_A, GW_MAC, f["a"], f["gw"], cport, 33333, **reply),
                         f["a"], f["gw"]),
         POD_A, _partial(pkt(kind, GW_MAC, MAC_A, f["node"], f["a"], hport, 33333, **reply),
                         f["node"], f["a"])),
    ]
    for i, (in_port, frame_in, out_expected, frame_expected) in enumerate(rows):
        out, frame_out = send1(dp, frame_in, in_port, 1000 + i, vnet_hdr_len=vnet_len, vnet_hdrs=[hdr])
        assert out == out_expected
        assert frame_out == frame_expected, f"row {i}: {frame_out.hex()} != {frame_expected.hex()}"
        if family == 4:     # the IPv4 header checksum is a real one, fully updated
            p = Ether(frame_out)
            q = p.copy()
            q[IP].chksum = None
            assert bytes(q)[:34] == frame_out[:34]


def test_without_needs_csum_a_vnet_frame_gets_a_full_update(dp_impl):
    dp = make_topo(dp_impl, vnet_hdr_len=12)
    frame = tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 40000, 8080)
    out, frame_out = send1(dp, frame, UPLINK, 1, vnet_hdr_len=12, vnet_hdrs=[vnet(gso_type=1)])
    assert out == POD_A and frame_out == tcp(GW_MAC, MAC_A, CLIENT4, A4, 40000, 80)


def test_gateway_and_pod_mac_are_read_at_each_original_packet(dp):
    send1(dp, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080), UPLINK, 1)
    new_gw = bytes.fromhex("02000000fe99")
    dp.set_gateway(new_gw, ip4("10.244.0.254"))
    _, f = send1(dp, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080, flags="A"), UPLINK, 2)
    assert Ether(f).src == mac_str(new_gw) and Ether(f)[IP].dst == A4
    dp.bind_port(POD_A, None, None)           # no bound MAC: dst MAC left as it came
    _, f = send1(dp, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080, flags="A"), UPLINK, 3)
    assert Ether(f).dst == mac_str(NODE_MAC)
    # the SNAT address of an existing hairpin entry is the one chosen at creation (D24)


def test_hairpin_without_a_gateway_address_is_not_snatted(dp_impl):
    dp = make_topo(dp_impl)
    dp.set_gateway(GW_MAC, None, None)
    out, f = send1(dp, tcp(MAC_A, GW_MAC, A4, NODE4, 2000, 8080), POD_A, 1)
    assert out == POD_A and f == tcp(GW_MAC, MAC_A, A4, A4, 2000, 80)
    assert int(dp.conntrack()[0]["hairpin"]) == 0


def test_icmp_and_other_traffic_to_a_node_address_is_untouched(dp):
    from scapy.layers.inet import ICMP
    frame = bytes(Ether(src=mac_str(ROUTER_MAC), dst=mac_str(NODE_MAC)) / IP(src=CLIENT4, dst=NODE4) / ICMP())
    out, f = send1(dp, frame, UPLINK, 1)
    assert f == frame and out == C.OUT_FLOOD_UNKNOWN and len(dp.conntrack()) == 0
    other_port = tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8081)
    assert send1(dp, other_port, UPLINK, 2)[1] == other_port
    wrong_proto = udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080)
    assert send1(dp, wrong_proto, UPLINK, 3)[1] == wrong_proto
    assert gc(dp, "nat_translated") == 0


def test_nat_out_port_down_is_no_route_and_the_entry_stays(dp):
    dp.set_port_up(POD_A, False)
    out, _ = send1(dp, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080), UPLINK, 1)
    assert out == C.OUT_DROP and gc(dp, "no_route") == 1
    assert len(dp.conntrack()) == 1


def test_collision_of_reply_tuples_is_dropped(dp):
    """The host itself (gateway address) talking to node:8080 from port 33333 has the same
    reply tuple as pod A's hairpin from 33333."""
    assert send1(dp, tcp(MAC_A, GW_MAC, A4, NODE4, 33333, 8080), POD_A, 1)[0] == POD_A
    out, f = send1(dp, tcp(GW_MAC, NODE_MAC, GW4, NODE4, 33333, 8080), 0, 2)
    assert out == C.OUT_DROP
    assert gc(dp, "nat_collision") == 1 and dp.port_counters()[0, C.PC["drop_nat_collision"]] == 1
    assert len(dp.conntrack()) == 1


def test_reply_tuple_equal_to_the_original_is_a_collision(dp_impl):
    """pod A from port 80 to gateway:80 where the gateway address is a node address and
    hostPort 80 -> A:80: the reply tuple (A:80 -> gw:80) equals the original."""
    dp = make_topo(dp_impl)
    dp.set_node_addresses([ip4(GW4)])
    dp.add_hostport(6, 80, ip4(A4), 80, POD_A)
    dp.set_gateway(GW_MAC, ip4(A4))          # hairpin SNAT address = A itself
    out, _ = send1(dp, tcp(MAC_A, GW_MAC, A4, GW4, 80, 80), POD_A, 1)
    # original (A:80 -> gw:80), reply (A:80 -> A:80): different, allowed
    assert out == POD_A
    dp2 = make_topo(dp_impl)
    dp2.set_node_addresses([ip4(GW4)])
    dp2.add_hostport(6, 80, ip4(A4), 80, POD_A, host_ip=ip4(GW4))
    dp2.set_gateway(GW_MAC, ip4(GW4))
    out, _ = send1(dp2, tcp(MAC_A, GW_MAC, A4, GW4, 80, 80), POD_A, 1)
    assert out == C.OUT_DROP and gc(dp2, "nat_collision") == 1
