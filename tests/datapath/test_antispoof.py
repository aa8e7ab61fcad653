"""Stage 2: anti-spoofing of pod ports (MAC, IPv4, IPv6, ARP sender MAC and IP)."""
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether

from dp_helpers import (
    A4, A6, B4, GW4, HOST, MAC_A, MAC_B, POD_A, POD_C, UPLINK, gc, ip4, ip6,
    make_topo, mac_str, pc, send1,
)
from vswitch.datapath import consts as C

SA, SB = mac_str(MAC_A), mac_str(MAC_B)
SX = "02:00:00:00:00:e1"     # bound to no port (a bound MAC from another port is mac_stolen, D42)


def arp(hwsrc_eth, hwsrc, psrc, pdst=GW4):
    return bytes(Ether(src=hwsrc_eth, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=hwsrc, psrc=psrc, pdst=pdst))


def v4(src_mac, src, dst=GW4):
    return bytes(Ether(src=src_mac, dst="02:00:00:00:fe:01") / IP(src=src, dst=dst) / UDP(sport=1, dport=2))


def v6(src_mac, src, dst="fd00::1"):
    return bytes(Ether(src=src_mac, dst="33:33:00:00:00:01") / IPv6(src=src, dst=dst) / UDP(sport=1, dport=2))


CASES = [
    # (name, frame sent by pod A, spoofed?)
    ("good ipv4", v4(SA, A4), False),
    ("good ipv6", v6(SA, A6), False),
    ("ipv6 link-local", v6(SA, "fe80::1234"), False),
    ("ipv6 link-local fe bf", v6(SA, "febf::1"), False),
    ("ipv6 unspecified (DAD)", bytes(Ether(src=SA, dst="33:33:ff:00:00:02") / IPv6(src="::", dst="ff02::1:ff00:2")
                                     / ICMPv6ND_NS(tgt=A6)), False),
    ("ipv4 0.0.0.0 (DHCP)", v4(SA, "0.0.0.0", "255.255.255.255"), False),
    ("good arp", arp(SA, SA, A4), False),
    ("arp probe", arp(SA, SA, "0.0.0.0", A4), False),
    ("tagged good ipv4", bytes(Ether(src=SA, dst=SB) / Dot1Q(vlan=5) / IP(src=A4, dst=B4) / UDP()), False),
    ("non-ip from the bound MAC", bytes(Ether(src=SA, dst=SB, type=0x88B5) / (b"x" * 46)), False),
    ("wrong source MAC", v4(SX, A4), True),
    ("wrong source MAC, non-ip", bytes(Ether(src=SX, dst=SB, type=0x88B5) / (b"x" * 46)), True),
    ("wrong ipv4 source", v4(SA, B4), True),
    ("ipv4 source of another family member", v4(SA, "10.244.0.200"), True),
    ("wrong ipv6 source", v6(SA, "fd00::3"), True),
    ("ipv6 fec0 is not link-local", v6(SA, "fec0::1"), True),
    ("arp sender MAC", arp(SA, SB, A4), True),
    ("arp sender IP", arp(SA, SA, B4), True),
    ("tagged wrong ipv4", bytes(Ether(src=SA, dst=SB) / Dot1Q(vlan=5) / IP(src=B4, dst=A4) / UDP()), True),
    ("ipv4 non-first fragment from a wrong source", bytes(Ether(src=SA, dst=SB) / IP(src=B4, dst=A4, frag=10)
                                                         / b"xxxxxxxx"), True),
]


@pytest.fixture
def dp(dp_impl):
    return make_topo(dp_impl)


@pytest.mark.parametrize("name,frame,spoofed", CASES, ids=[c[0] for c in CASES])
def test_pod_port_bound_to_mac_and_ips(dp, name, frame, spoofed):
    out, _ = send1(dp, frame, POD_A, 1)
    assert (out == C.OUT_DROP) == spoofed
    assert gc(dp, "spoofed") == pc(dp, POD_A, "drop_spoofed") == int(spoofed)
    assert pc(dp, POD_A, "rx_packets") == 1


@pytest.mark.parametrize("name,frame,spoofed", CASES, ids=[c[0] for c in CASES])
def test_host_and_uplink_ports_are_never_checked(dp, name, frame, spoofed):
    for port in (HOST, UPLINK):
        dp.bind_port(port, MAC_A, [ip4(A4)])      # even with a binding: off by default
        out, _ = send1(dp, frame, port, 1)
        assert out != C.OUT_DROP
    assert gc(dp, "spoofed") == 0


@pytest.mark.parametrize("name,frame,spoofed", CASES, ids=[c[0] for c in CASES])
def test_set_antispoof_off_and_on(dp, name, frame, spoofed):
    dp.set_antispoof(POD_A, False)
    assert send1(dp, frame, POD_A, 1)[0] != C.OUT_DROP
    dp.set_antispoof(POD_A, True)
    assert (send1(dp, frame, POD_A, 2)[0] == C.OUT_DROP) == spoofed
    dp.set_antispoof(UPLINK, True)
    dp.bind_port(UPLINK, MAC_A, [ip4(A4), ip6(A6)])
    assert (send1(dp, frame, UPLINK, 3)[0] == C.OUT_DROP) == spoofed


def test_unbound_pod_port_checks_nothing(dp):
    # pod C has anti-spoofing on but no binding
    assert send1(dp, v4(SX, "1.2.3.4"), POD_C, 1)[0] != C.OUT_DROP
    dp.bind_port(POD_C, None, None)
    assert send1(dp, v4(SX, "1.2.3.4"), POD_C, 1)[0] != C.OUT_DROP
    assert gc(dp, "spoofed") == 0


def test_mac_only_binding_checks_no_ip(dp):
    dp.bind_port(POD_C, MAC_B, None)
    assert send1(dp, v4(SB, "1.2.3.4"), POD_C, 1)[0] != C.OUT_DROP
    assert send1(dp, arp(SB, SB, "1.2.3.4"), POD_C, 1)[0] != C.OUT_DROP
    assert send1(dp, v4(SA, "1.2.3.4"), POD_C, 1)[0] == C.OUT_DROP
    assert send1(dp, arp(SB, SA, "1.2.3.4"), POD_C, 1)[0] == C.OUT_DROP
    assert pc(dp, POD_C, "drop_spoofed") == 2


def test_ip_only_binding_checks_no_mac(dp):
    dp.bind_port(POD_C, None, [ip4("10.244.0.4")])
    assert send1(dp, v4(SX, "10.244.0.4"), POD_C, 1)[0] != C.OUT_DROP
    assert send1(dp, v4(SA, "10.244.0.5"), POD_C, 1)[0] == C.OUT_DROP


def test_bound_to_no_ips_allows_only_the_unspecified_and_link_local(dp):
    dp.bind_port(POD_C, MAC_B, [])
    assert send1(dp, v4(SB, "0.0.0.0"), POD_C, 1)[0] != C.OUT_DROP
    assert send1(dp, v6(SB, "fe80::1"), POD_C, 1)[0] != C.OUT_DROP
    assert send1(dp, v4(SB, "10.244.0.3"), POD_C, 1)[0] == C.OUT_DROP
    assert send1(dp, v6(SB, "fd00::3"), POD_C, 1)[0] == C.OUT_DROP


def test_spoofed_frames_are_not_learnt_and_reach_no_other_stage(dp):
    dp.set_shaper(POD_A, C.EGRESS, 8000, 8000)
    send1(dp, v4(SX, A4), POD_A, 1)
    fdb = dp.fdb()
    assert len(fdb) == 2 and all(fdb["static"] == 1)      # only the bound MACs of A and B
    assert dp.shaper_state(POD_A, C.EGRESS)["credit"] == 8000 * 10**9


@pytest.mark.parametrize("bad", [
    dict(mac=b"\x01" * 5), dict(mac="02:00:00:00:00:01"), dict(ips=[b"\x01\x02\x03"]),
    dict(ips=[ip4(A4)] * 9), dict(ips=5), dict(ips=["10.0.0.1"]),
])
def test_bind_port_rejects_bad_arguments_and_changes_nothing(dp, bad):
    with pytest.raises(ValueError):
        dp.bind_port(POD_A, **{"mac": MAC_A, "ips": [ip4(A4)], **bad})
    # the old binding still holds
    assert send1(dp, v4(SA, A4), POD_A, 1)[0] != C.OUT_DROP
    assert send1(dp, v4(SA, "10.9.9.9"), POD_A, 1)[0] == C.OUT_DROP


def test_port_calls_on_unknown_ports_raise(dp):
    for call in (lambda: dp.bind_port(99, MAC_A, None), lambda: dp.set_antispoof(99, True),
                 lambda: dp.set_port_up(99, True), lambda: dp.remove_port(99),
                 lambda: dp.bind_port(10**6, MAC_A, None), lambda: dp.add_port(-1, C.PORT_POD),
                 lambda: dp.add_port(POD_A, C.PORT_POD), lambda: dp.add_port(20, 7)):
        with pytest.raises(ValueError):
            call()
