"""process() as a batch: loop edges, sequential semantics, maximal frames with a vnet
header, counters, argument validation, and trace() changing nothing."""
import random

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Dot1Q, Ether

from dp_helpers import (
    A4, BCAST, CLIENT4, GW_MAC, HOST, MAC_A, MAC_B, MAC_C, NODE4, NODE_MAC, POD_A, POD_B, POD_C,
    ROUTER_MAC, UPLINK, Batch, checksums_ok, drain, gcounters, make_topo, mac_str, pcounters,
    pseudo_sum, send, send1, snapshot, tcp, udp, vnet, with_l4_check,
)
from vswitch.datapath import consts as C

SEC = 10**9


def mixed_frames(rng, count):
    """Known unicast, floods, hostPort DNAT and replies, malformed, spoofed, shaped (pod C)."""
    frames, ports = [], []
    for i in range(count):
        kind = rng.randrange(7)
        if kind == 0:
            f, p = udp(MAC_A, MAC_B, A4, "10.244.0.3", 1000 + i, 2000), POD_A
        elif kind == 1:
            f, p = bytes(Ether(src=mac_str(MAC_B), dst=mac_str(BCAST), type=0x88B5)) + bytes(46), POD_B
        elif kind == 2:
            f, p = tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 3000 + i % 5, 8080, flags="S"), UPLINK
        elif kind == 3:
            f, p = tcp(MAC_A, GW_MAC, A4, CLIENT4, 80, 3000 + i % 5, flags="SA"), POD_A
        elif kind == 4:
            f, p = bytes(rng.randrange(256) for _ in range(rng.randrange(40))), UPLINK
        elif kind == 5:
            f, p = udp(MAC_A, MAC_B, "10.9.9.9", "10.244.0.3", 1, 2), POD_A
        else:
            f, p = udp(MAC_C, MAC_A, "10.244.0.4", A4, 5, 6, payload=bytes(rng.randrange(1400))), POD_C
        frames.append(f)
        ports.append(p)
    return frames, ports


def shaped_topo(impl):
    dp = make_topo(impl)
    dp.set_shaper(POD_C, C.EGRESS, 1_000_000, 20_000)
    dp.set_shaper(POD_B, C.INGRESS, 2_000_000, 30_000)
    return dp


@pytest.mark.parametrize("size", [1, 3, 31, 32, 33, 257])
def test_a_batch_equals_the_same_packets_one_by_one(dp_impl, size):
    rng = random.Random(size)
    frames, ports = mixed_frames(rng, size)
    batched, single = shaped_topo(dp_impl), shaped_topo(dp_impl)
    b = Batch(frames, ports)
    outs = b.run(batched, 5 * SEC)
    assert [int(x) for x in b.out_ports[size:]] == [12345, 12345], "entries past n are untouched"
    outs1, frames1 = [], []
    for f, p in zip(frames, ports):
        o, g = send1(single, f, p, 5 * SEC)
        outs1.append(o)
        frames1.append(g)
    assert outs == outs1
    assert [b.frame(i) for i in range(size)] == frames1
    assert snapshot(batched) == snapshot(single)
    g = gcounters(batched)
    assert g["packets"] == size and g["bytes"] == sum(map(len, frames))
    assert drain(batched, 10 * SEC) == drain(single, 10 * SEC)
    assert snapshot(batched) == snapshot(single)


def test_n_zero_changes_nothing_but_the_clock(dp_impl):
    dp = make_topo(dp_impl)
    before = snapshot(dp)
    b = Batch([tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080)], [UPLINK])
    b.n = 0
    assert b.run(dp, 7) == []
    assert snapshot(dp) == before and int(b.out_ports[0]) == 12345


def _giant_tcp(src_mac, dst_mac, src, dst, sport, dport, total_len=65535, vlan=None):
    payload = bytes((i * 7) & 0xFF for i in range(total_len - 40))
    l2 = Ether(src=mac_str(src_mac), dst=mac_str(dst_mac))
    if vlan is not None:
        l2 = l2 / Dot1Q(vlan=vlan)
    f = bytes(l2 / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags="PA") / payload)
    return with_l4_check(f, pseudo_sum(bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))),
                                       6, total_len - 20))


@pytest.mark.parametrize("vlan", [None, 9])
@pytest.mark.parametrize("hdr_len", [10, 12])
def test_65535_byte_packets_with_a_vnet_header_pass_and_are_natted(dp_impl, vlan, hdr_len):
    dp = make_topo(dp_impl, vnet_hdr_len=hdr_len)
    dp.set_shaper(POD_A, C.INGRESS, 10**9, 8 * 70000)
    hdr = vnet(needs_csum=True, gso_type=1, hdr_len=hdr_len)      # TSO segment, partial checksum
    f_in = _giant_tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 40000, 8080, vlan=vlan)
    assert len(f_in) == 65535 + 14 + (4 if vlan else 0)
    expected = _giant_tcp(GW_MAC, MAC_A, CLIENT4, A4, 40000, 80, vlan=vlan)
    b = Batch([f_in, f_in[:100]], [UPLINK, UPLINK], vnet_hdr_len=hdr_len, vnet_hdrs=[hdr, hdr])
    outs = b.run(dp, 1)
    assert outs[0] == POD_A and b.frame(0) == expected and b.header(0) == hdr
    assert outs[1] == C.OUT_DROP                  # its IP total length says 65535: malformed
    # a second one waits in pod A's ingress queue and leaves with its header
    b2 = Batch([f_in], [UPLINK], vnet_hdr_len=hdr_len, vnet_hdrs=[hdr])
    assert b2.run(dp, 2) == [C.OUT_QUEUED]
    got = drain(dp, dp.next_departure_ns(), vnet_hdr_len=hdr_len)
    assert [(i, o, f, h) for i, o, f, h in got] == [(UPLINK, POD_A, expected, hdr)]


def test_frames_above_max_frame_and_outside_buf_are_refused(dp_impl):
    dp = make_topo(dp_impl, vnet_hdr_len=12)
    before = snapshot(dp)
    b = Batch([bytes(C.MAX_FRAME + 1)], [UPLINK], vnet_hdr_len=12)
    with pytest.raises(ValueError, match=str(C.MAX_FRAME + 1)):
        b.run(dp, 1)
    ok = Batch([bytes(60), bytes(60)], [UPLINK, UPLINK], vnet_hdr_len=12)
    ok.offsets[1] = 5                     # its vnet header would start before buf
    with pytest.raises(ValueError):
        ok.run(dp, 1)
    ok.offsets[1] = len(ok.buf) - 59      # its end is past buf
    with pytest.raises(ValueError):
        ok.run(dp, 1)
    assert snapshot(dp) == before


@pytest.mark.parametrize("what", ["buf dtype", "offsets dtype", "lengths dtype", "in_ports dtype",
                                  "out_ports dtype", "2-D buf", "read-only out", "n too big",
                                  "negative now", "in_port too big", "non-contiguous buf"])
def test_bad_batches_raise_value_error_and_change_nothing(dp_impl, what):
    dp = make_topo(dp_impl)
    send1(dp, bytes(60), UPLINK, 100)
    before = snapshot(dp)
    b = Batch([tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080)] * 2, [UPLINK] * 2)
    args = [b.buf, b.offsets, b.lengths, b.in_ports, b.out_ports, 2, 200]
    if what == "buf dtype":
        args[0] = b.buf.astype(np.int8)
    elif what == "offsets dtype":
        args[1] = b.offsets.astype(np.int64)
    elif what == "lengths dtype":
        args[2] = b.lengths.astype(np.uint16)
    elif what == "in_ports dtype":
        args[3] = b.in_ports.astype(np.uint32)
    elif what == "out_ports dtype":
        args[4] = b.out_ports.astype(np.int64)
    elif what == "2-D buf":
        args[0] = b.buf.reshape(1, -1)
    elif what == "read-only out":
        args[4] = b.out_ports.copy()
        args[4].flags.writeable = False
    elif what == "n too big":
        args[5] = len(b.offsets) + 1
    elif what == "negative now":
        args[6] = -1
    elif what == "in_port too big":
        b.in_ports[1] = 4000
    elif what == "non-contiguous buf":
        big = np.zeros(len(b.buf) * 2, np.uint8)
        big[::2] = b.buf
        args[0] = big[::2]
    with pytest.raises(ValueError):
        dp.process(*args)
    assert snapshot(dp) == before


def test_time_must_not_go_backwards(dp_impl):
    dp = make_topo(dp_impl)
    send1(dp, bytes(60), UPLINK, 100)
    with pytest.raises(ValueError, match="99"):
        send1(dp, bytes(60), UPLINK, 99)
    with pytest.raises(ValueError):
        drain(dp, 99)
    with pytest.raises(ValueError):
        dp.trace(bytes(60), UPLINK, 99)
    send1(dp, bytes(60), UPLINK, 100)             # the same time is fine
    assert dp.conntrack_sweep(0) == 0 and dp.mac_sweep(0) == 0     # sweeps take any time


@pytest.mark.parametrize("kw", [dict(max_ports=0), dict(max_ports=70000), dict(vnet_hdr_len=11),
                                dict(mac_table_size=0), dict(conntrack_size=0), dict(max_hostports=0),
                                dict(udp_timeout_ns=-1), dict(mac_aging_ns=2**63)])
def test_constructor_rejects_bad_values(dp_impl, kw):
    with pytest.raises(ValueError):
        dp_impl.Datapath(**kw)


def test_constructor_takes_exactly_the_defaults_keys(dp_impl):
    dp = dp_impl.Datapath(**C.DEFAULTS)
    assert dp.port_counters().shape == (C.DEFAULTS["max_ports"], len(C.PORT_COUNTERS))
    assert dp.port_counters().dtype == np.uint64 and dp.global_counters().dtype == np.uint64
    assert dp.global_counters().shape == (len(C.GLOBAL_COUNTERS),)
    with pytest.raises(TypeError):
        dp_impl.Datapath(no_such_option=1)


def test_counters_per_port_and_global(dp_impl):
    dp = make_topo(dp_impl)
    dp.set_shaper(POD_B, C.INGRESS, 8000, 0, queue_bytes=100)
    frames = [
        (bytes(Ether(src=mac_str(MAC_B), dst=mac_str(BCAST), type=0x88B5)) + bytes(50), POD_B),  # flood, 64 B
        (tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 5, 8080), UPLINK),                           # NAT -> A
        (udp(MAC_A, MAC_B, A4, "10.244.0.3", 1, 2, payload=bytes(10)), POD_A),                  # -> B queued
        (udp(MAC_A, MAC_B, A4, "10.244.0.3", 1, 2, payload=bytes(60)), POD_A),                  # queue full
        (bytes(10), UPLINK),                                                                     # malformed
        (udp(MAC_A, MAC_B, "1.1.1.1", "10.244.0.3", 1, 2), POD_A),                              # spoofed
        (udp(MAC_B, MAC_B, "10.244.0.3", A4, 1, 2), POD_B),                                     # loop
    ]
    outs, _ = send(dp, [f for f, _ in frames], [p for _, p in frames], 1)
    assert outs == [C.OUT_FLOOD, POD_A, C.OUT_QUEUED, C.OUT_DROP, C.OUT_DROP, C.OUT_DROP, C.OUT_DROP]
    L = [len(f) for f, _ in frames]
    pa, pb, up, host = (pcounters(dp, p) for p in (POD_A, POD_B, UPLINK, HOST))
    assert (pa["rx_packets"], pa["rx_bytes"]) == (3, L[2] + L[3] + L[5])
    assert (pa["tx_packets"], pa["tx_bytes"]) == (2, L[0] + L[1])
    assert (pb["rx_packets"], pb["rx_bytes"]) == (2, L[0] + L[6])
    assert (pb["tx_packets"], pb["queued"], pb["drop_queue_full"], pb["drop_loop"]) == (0, 1, 1, 1)
    assert (pa["drop_spoofed"], up["drop_malformed"], up["rx_packets"]) == (1, 1, 2)
    assert (host["tx_packets"], host["tx_bytes"], host["rx_packets"]) == (1, L[0], 0)
    g = gcounters(dp)
    assert (g["ct_created"], g["nat_translated"], g["mac_learned"]) == (1, 1, 1)   # A, B bound: static (D42)
    assert (g["malformed"], g["spoofed"], g["queue_full"], g["loop"], g["queued"], g["flooded"]) == (1, 1, 1, 1, 1, 1)
    pcs = dp.port_counters()
    for reason in C.DROP_REASONS:
        assert int(pcs[:, C.PC["drop_" + reason]].sum()) == g[reason]
    # the queued packet is counted tx when it leaves
    got = drain(dp, dp.next_departure_ns())
    assert [(i, o) for i, o, _, _ in got] == [(POD_A, POD_B)]
    assert pcounters(dp, POD_B)["tx_packets"] == 1 and pcounters(dp, POD_B)["tx_bytes"] == L[2]
    assert gcounters(dp)["packets"] == 7


TRACE_FRAMES = [
    ("nat new entry", tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 9, 8080), UPLINK),
    ("nat existing", tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080, flags="A"), UPLINK),
    ("reply", tcp(MAC_A, GW_MAC, A4, CLIENT4, 80, 1, flags="SA"), POD_A),
    ("learn new mac", bytes(Ether(src="02:00:00:00:77:77", dst=mac_str(BCAST), type=0x88B5)) + bytes(46), HOST),
    ("known unicast", udp(MAC_B, MAC_A, "10.244.0.3", A4, 1, 2), POD_B),
    ("egress shaped", udp(MAC_C, MAC_A, "10.244.0.4", A4, 1, 2, payload=bytes(1000)), POD_C),
    ("malformed", bytes(20), UPLINK),
    ("spoofed", udp(MAC_A, MAC_B, "9.9.9.9", "10.244.0.3", 1, 2), POD_A),
    ("not added", bytes(60), 9),
    ("table full", tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 10, 8080), UPLINK),
]


@pytest.mark.parametrize("name,frame,in_port", TRACE_FRAMES, ids=[t[0] for t in TRACE_FRAMES])
def test_trace_changes_no_state_and_predicts_the_output(dp_impl, name, frame, in_port):
    dp = make_topo(dp_impl, conntrack_size=2)
    send1(dp, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 8080), UPLINK, 1)   # entry for sport 1
    if name == "table full":
        send1(dp, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 2, 8080), UPLINK, 1)
    send1(dp, bytes(Ether(src=mac_str(MAC_A), dst=mac_str(BCAST), type=0x88B5)) + bytes(46), POD_A, 1)
    dp.set_shaper(POD_C, C.EGRESS, 8000, 8000)
    send1(dp, udp(MAC_C, MAC_A, "10.244.0.4", A4, 1, 2, payload=bytes(900)), POD_C, 1)   # uses the burst
    before = snapshot(dp)
    steps = dp.trace(frame, in_port, 2 * SEC)
    assert snapshot(dp) == before
    assert isinstance(steps, list) and all(isinstance(s, tuple) and len(s) == 2 for s in steps)
    stages = [s for s, _ in steps]
    assert set(stages) <= {"rx", "parse", "antispoof", "egress_shaper", "nat", "l2", "ingress_shaper", "output"}
    assert stages[-1] == "output" and stages.count("output") == 1
    out, _ = send1(dp, frame, in_port, 2 * SEC)
    expected = {C.OUT_FLOOD: "flood", C.OUT_QUEUED: "queued"}.get(out, f"port {out}")
    if out == C.OUT_DROP:
        reasons = [r for r in C.DROP_REASONS if gcounters(dp)[r] > int(np.frombuffer(before["gc"], np.uint64)[C.GC[r]])]
        expected = f"drop {reasons[0]}"
    assert steps[-1] == ("output", expected)
    # a second trace of the same frame still changes nothing
    after = snapshot(dp)
    dp.trace(frame, in_port, 2 * SEC)
    assert snapshot(dp) == after


def test_trace_rejects_bad_arguments(dp_impl):
    dp = make_topo(dp_impl)
    with pytest.raises(ValueError):
        dp.trace(bytes(C.MAX_FRAME + 1), UPLINK, 1)
    with pytest.raises(ValueError):
        dp.trace(bytes(60), 70000, 1)
    with pytest.raises(ValueError):
        dp.trace("not bytes", UPLINK, 1)


def test_every_output_checksum_is_valid_in_a_random_nat_mix(dp_impl):
    rng = random.Random(99)
    dp = make_topo(dp_impl)
    frames, ports = [], []
    for i in range(120):
        sport = 20000 + rng.randrange(30)
        if rng.random() < 0.5:
            frames.append(tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, sport, 8080, flags=rng.choice("SAFPR"),
                              payload=bytes(rng.randrange(50)), seq=rng.randrange(2**32)))
            ports.append(UPLINK)
        else:
            frames.append(udp(MAC_A, GW_MAC, A4, CLIENT4, 53, sport, payload=bytes(rng.randrange(50))))
            ports.append(POD_A)
    b = Batch(frames, ports)
    b.run(dp, 1)
    for i in range(len(frames)):
        assert checksums_ok(b.frame(i))
