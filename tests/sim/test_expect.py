"""PTF-style checks on virtual time: expect, expect_nothing, masks, failure messages."""
import pytest
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.l2 import Ether

from vswitch.sim import ExpectationFailed, Mask


def echo_reply_from(b, a, seq=1):
    """The reply a expects from b, built independently with scapy."""
    return (Ether(src=b.mac, dst=a.mac) / IP(src=b.ip, dst=a.ip, ttl=64, flags="DF", id=0)
            / ICMP(type=0, id=0x1234, seq=seq) / b"vswitch-sim")


def test_expect_exact_frame_returns_time_and_consumes(sim):
    a, b = sim["a"], sim["b"]
    a.send(a.ping(b, seq=1))
    t, frame = sim.expect("a", echo_reply_from(b, a), within_ns=0)
    assert t == 0 and Ether(frame)[ICMP].type == 0
    sim.expect_nothing("a")                       # consumed
    with pytest.raises(ExpectationFailed):
        sim.expect("a", echo_reply_from(b, a))    # it does not match twice


def test_expect_with_mask_ignoring_fields(sim):
    a, client = sim["a"], sim["client"]
    client.listen(53, "udp")
    a.send(a.udp_to(client, 53, b"m"))
    # the uplink first sees a flooded copy (the switch has not learnt the node's MAC yet),
    # then the frame the node routed: new MACs, TTL 63 (ignored here, with the checksum)
    routed = client.mac_bytes + sim.node.mac_bytes + a.udp_to(client, 53, b"m")[12:]
    want = Mask(routed, ignore=["IP.ttl", "IP.chksum"])
    t, frame = sim.expect("uplink", want, within_ns=1000)
    assert Ether(frame)[IP].ttl == 63
    exact = Mask(a.udp_to(client, 53, b"m"))
    a.send(a.udp_to(client, 53, b"m"))
    with pytest.raises(ExpectationFailed):
        sim.expect("uplink", exact, within_ns=1000)


def test_mask_ignore_bytes_and_bad_fields(sim):
    a, b = sim["a"], sim["b"]
    m = Mask(a.ping(b)).ignore_bytes(0, 12)
    assert m.matches(a.ping(b)) and m.matches(b"\x00" * 12 + a.ping(b)[12:])
    assert not m.matches(a.ping(b)[:-1])
    with pytest.raises(ValueError, match="TCP"):
        Mask(a.ping(b), ignore=["TCP.chksum"])
    with pytest.raises(ValueError, match="ttl2"):
        Mask(a.ping(b), ignore=["IP.ttl2"])
    # bit fields work too: IP flags (3 bits) and fragment offset (13 bits)
    m = Mask(a.ping(b), ignore=["IP.flags"])
    other = bytearray(a.ping(b))
    other[20] ^= 0x40                              # clear DF
    assert m.matches(bytes(other)) and not Mask(a.ping(b)).matches(bytes(other))


def test_failed_expect_says_what_arrived(sim):
    a, b = sim["a"], sim["b"]
    a.send(a.ping(b, seq=5))
    with pytest.raises(ExpectationFailed) as ei:
        sim.expect("a", echo_reply_from(b, a, seq=6), within_ns=1000)
    msg = str(ei.value)
    assert "port 'a'" in msg and "arrived instead" in msg and "echo-reply" in msg


def test_expect_within_window_on_virtual_time(make_sim):
    sim = make_sim(reply_delay_ns=50_000)
    a, b = sim.add_pod("a"), sim.add_pod("b")
    a.send(a.ping(b))
    with pytest.raises(ExpectationFailed, match="nothing"):
        sim.expect("a", echo_reply_from(b, a), within_ns=49_999)
    assert sim.now == 49_999
    t, _ = sim.expect("a", echo_reply_from(b, a), within_ns=1)
    assert t == 50_000 and sim.now == 50_000


def test_expect_nothing_instant_negative_check(sim):
    a, b = sim["a"], sim["b"]
    # a frame from a spoofed source is dropped: nothing anywhere, decided at once
    spoof = bytearray(a.ping(b))
    spoof[26:30] = bytes([10, 0, 0, 99])
    a.send(bytes(spoof))
    sim.expect_nothing(within_ns=10 ** 9)
    assert sim.counters()["ports"]["a"]["drop_spoofed"] == 1
    a.send(a.ping(b))
    with pytest.raises(ExpectationFailed) as ei:
        sim.expect_nothing("b", within_ns=0)
    assert "echo-request" in str(ei.value)
    assert sim.flush() >= 1
    sim.expect_nothing()


def test_expect_consumes_earlier_frames_too(sim):
    a, b = sim["a"], sim["b"]
    b.listen(80)
    a.send(a.ping(b, seq=1))
    a.send(a.tcp_syn(b, 80), at_ns=10)
    sa = Mask(b.tcp_to(a, 40000, sport=80, flags=0x12, seq=0, ack=0), ignore=["TCP.seq", "TCP.ack", "TCP.chksum"])
    t, f = sim.expect("a", sa, within_ns=100)
    assert t == 10 and Ether(f)[TCP].flags == "SA"
    sim.expect_nothing("a")                       # the echo reply before it is consumed as well
