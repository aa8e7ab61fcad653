"""Issue 11 findings 1-3 at the datapath: bound MACs are static, unknown unicast never
reaches a pod, flood copies pass the receiver's ingress shaper, a full MAC table evicts
fairly and learning is rate-limited per port (docs/datapath.md D41-D44). Both implementations."""
import numpy as np
import pytest
from scapy.layers.l2 import Ether

from dp_helpers import BCAST, gc, mac_str, pc, send1
from vswitch.datapath import consts as C

SEC = 10**9
HOST, UPLINK, POD_A, POD_B, POD_C = 0, 1, 2, 3, 4


def mac(i):
    return bytes([2, 0, 0, (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff])


MAC_A, MAC_B, MAC_C, OUTSIDE = mac(0xa1), mac(0xb1), mac(0xc1), mac(0x99)


def frame(src, dst, size=60):
    b = bytes(Ether(src=mac_str(src), dst=mac_str(dst), type=0x88B5))
    return b + bytes(size - len(b))


def make(dp_impl, **kw):
    dp = dp_impl.Datapath(max_ports=8, **kw)
    for p, kind in ((HOST, C.PORT_HOST), (UPLINK, C.PORT_UPLINK), (POD_A, C.PORT_POD), (POD_B, C.PORT_POD),
                    (POD_C, C.PORT_POD)):
        dp.add_port(p, kind)
    for p, m in ((POD_A, MAC_A), (POD_B, MAC_B), (POD_C, MAC_C)):
        dp.bind_port(p, m)
    return dp


def rows(dp):
    return {bytes(r["mac"]): (int(r["port"]), int(r["static"])) for r in dp.fdb()}


def tx(dp):
    return [pc(dp, p, "tx_packets") for p in range(5)]


# ---------------------------------------------------------------- finding 1: static pod MACs

def test_a_bound_mac_is_known_before_any_traffic_and_never_ages(dp_impl):
    dp = make(dp_impl, mac_aging_ns=10 * SEC)
    assert rows(dp) == {MAC_A: (POD_A, 1), MAC_B: (POD_B, 1), MAC_C: (POD_C, 1)}
    # the tables are empty of learned entries (a restarted switch): A -> B is unicast at once
    assert send1(dp, frame(MAC_A, MAC_B), POD_A, 1)[0] == POD_B
    assert tx(dp) == [0, 0, 0, 1, 0]
    assert dp.mac_sweep(1000 * SEC) == 0
    assert send1(dp, frame(OUTSIDE, MAC_C), UPLINK, 1000 * SEC)[0] == POD_C
    assert rows(dp)[MAC_C] == (POD_C, 1) and gc(dp, "flooded") == 0


def test_unknown_unicast_goes_to_host_and_uplink_only(dp_impl):
    dp = make(dp_impl)
    out, _ = send1(dp, frame(MAC_A, mac(0x77)), POD_A, 1)
    assert out == C.OUT_FLOOD_UNKNOWN
    assert tx(dp) == [1, 1, 0, 0, 0]              # no pod gets it
    assert gc(dp, "flooded") == 1
    out, _ = send1(dp, frame(OUTSIDE, mac(0x77)), UPLINK, 2)
    assert out == C.OUT_FLOOD_UNKNOWN and tx(dp) == [2, 1, 0, 0, 0]
    fc = dp.flood_classes()
    assert list(fc[:5]) == [3, 3, 1, 1, 1] and not fc.flags.writeable
    dp.set_port_up(UPLINK, False)
    assert list(fc[:5]) == [3, 0, 1, 1, 1]       # a live view


def test_broadcast_and_multicast_still_reach_every_pod(dp_impl):
    dp = make(dp_impl)
    for i, dst in enumerate((BCAST, bytes.fromhex("333300000001"))):
        assert send1(dp, frame(MAC_A, dst), POD_A, 1 + i)[0] == C.OUT_FLOOD
    assert tx(dp) == [2, 2, 0, 2, 2]


@pytest.mark.parametrize("port", [UPLINK, HOST, POD_B])
def test_another_port_cannot_take_a_bound_mac(dp_impl, port):
    dp = make(dp_impl)
    dp.set_antispoof(POD_B, False)               # even unchecked, a pod cannot steal
    before = rows(dp)
    out, _ = send1(dp, frame(MAC_A, mac(0x77)), port, 1)
    assert out == C.OUT_DROP
    assert pc(dp, port, "drop_mac_stolen") == 1 and gc(dp, "mac_stolen") == 1
    assert rows(dp) == before and gc(dp, "mac_moves") == 0
    assert send1(dp, frame(OUTSIDE, MAC_A), UPLINK, 2)[0] == POD_A


def test_binding_replaces_and_removal_forgets_the_static_entry(dp_impl):
    dp = make(dp_impl)
    send1(dp, frame(mac(0x55), BCAST), UPLINK, 1)           # learned on the uplink
    dp.bind_port(POD_A, mac(0x55))                          # the binding wins over learning
    assert rows(dp)[mac(0x55)] == (POD_A, 1) and MAC_A not in rows(dp)
    dp.bind_port(POD_A, None)
    assert mac(0x55) not in rows(dp)
    dp.bind_port(POD_A, MAC_A)
    dp.remove_port(POD_A)
    assert MAC_A not in rows(dp)
    dp.add_port(POD_A, C.PORT_POD)
    assert MAC_A not in rows(dp)


# ---------------------------------------------------------------- finding 2: floods are shaped

def drain_all(dp, now, out_ports_seen):
    n_tot = 0
    while True:
        buf = np.zeros(1 << 16, np.uint8)
        offs, lens = np.zeros(64, np.uint32), np.zeros(64, np.uint32)
        ins, outs = np.zeros(64, np.uint16), np.zeros(64, np.int32)
        k = dp.drain(now, buf, offs, lens, ins, outs, 64)
        out_ports_seen += [(int(outs[i]), int(lens[i])) for i in range(k)]
        n_tot += k
        if k < 64:
            return n_tot


def test_a_flood_copy_for_a_shaped_pod_passes_its_ingress_shaper(dp_impl):
    dp = make(dp_impl)
    rate, burst = 8_000_000, 8 * 2000            # 1 MB/s, 2000-byte burst
    dp.set_shaper(POD_B, C.INGRESS, rate, burst, 1 << 20)
    assert dp.flood_classes()[POD_B] == 0
    # 200 broadcasts of 1000 bytes at t=0 from pod A: 200 kB offered
    for i in range(200):
        assert send1(dp, frame(MAC_A, BCAST, 1000), POD_A, 1)[0] == C.OUT_FLOOD
    assert pc(dp, POD_B, "tx_packets") == 0 and pc(dp, POD_B, "queued") == 200
    assert pc(dp, POD_C, "tx_packets") == 200   # unshaped pods: directly
    seen = []
    for t_ms in range(0, 101, 10):
        drain_all(dp, 1 + t_ms * 10**6, seen)
        got = sum(n for o, n in seen if o == POD_B)
        # bytes released to B by time t never exceed burst + rate * t
        assert got * 8 <= burst + rate * t_ms // 1000, (t_ms, got)
    assert all(o == POD_B for o, _ in seen)
    assert pc(dp, POD_B, "tx_packets") == len(seen) >= 99


def test_unknown_unicast_copy_for_a_shaped_host_port_is_queued(dp_impl):
    dp = make(dp_impl)
    dp.set_shaper(HOST, C.INGRESS, 8_000_000, 80_000)
    assert send1(dp, frame(MAC_A, mac(0x77)), POD_A, 1)[0] == C.OUT_FLOOD_UNKNOWN
    assert tx(dp) == [0, 1, 0, 0, 0] and pc(dp, HOST, "queued") == 1
    seen = []
    drain_all(dp, 1, seen)
    assert seen == [(HOST, 60)]


# ---------------------------------------------------------------- finding 3: pressure

def test_a_learning_storm_evicts_its_own_oldest_entries_not_others(dp_impl):
    dp = make(dp_impl, mac_table_size=64, mac_learn_rate_per_s=0)
    for i in range(10):
        send1(dp, frame(mac(0x1000 + i), BCAST), HOST, 1)
    for i in range(1000):
        send1(dp, frame(mac(0x20000 + i), BCAST), UPLINK, 2)
    r = rows(dp)
    assert len(r) == 64
    assert all(mac(0x1000 + i) in r for i in range(10))              # the host's entries kept
    assert all(m in r for m in (MAC_A, MAC_B, MAC_C))                 # static kept
    assert sorted(m for m, (p, _) in r.items() if p == UPLINK) == [mac(0x20000 + i) for i in range(949, 1000)]
    assert gc(dp, "mac_evicted") == 1013 - 64 and gc(dp, "mac_table_full") == 0
    # the pods still get their unicast only
    assert send1(dp, frame(OUTSIDE, MAC_B), UPLINK, 3)[0] == POD_B


def test_the_port_holding_most_entries_is_the_victim(dp_impl):
    dp = make(dp_impl, mac_table_size=23, mac_learn_rate_per_s=0)
    for i in range(15):
        send1(dp, frame(mac(0x20000 + i), BCAST), UPLINK, 1)
    for i in range(5):
        send1(dp, frame(mac(0x1000 + i), BCAST), HOST, 2)   # full: 3 static + 15 + 5
    send1(dp, frame(mac(0x1005), BCAST), HOST, 3)           # evicts the uplink's oldest
    r = rows(dp)
    assert mac(0x20000) not in r and mac(0x1005) in r and all(mac(0x1000 + i) in r for i in range(5))
    assert gc(dp, "mac_evicted") == 1


def test_learning_is_rate_limited_per_port_and_frames_still_forwarded(dp_impl):
    dp = make(dp_impl, mac_learn_rate_per_s=1000, mac_learn_burst=1000)
    outs = [send1(dp, frame(mac(0x20000 + i), MAC_A), UPLINK, 5 * SEC)[0] for i in range(1500)]
    assert outs == [POD_A] * 1500
    assert gc(dp, "mac_learned") == 1000 and gc(dp, "mac_learn_limited") == 500
    # another port has its own bucket
    send1(dp, frame(mac(0x1000), MAC_A), HOST, 5 * SEC)
    assert gc(dp, "mac_learned") == 1001
    # 0.25 s later: 250 more tokens
    for i in range(300):
        send1(dp, frame(mac(0x30000 + i), MAC_A), UPLINK, 5 * SEC + SEC // 4)
    assert gc(dp, "mac_learned") == 1251 and gc(dp, "mac_learn_limited") == 550


@pytest.mark.parametrize("kw", [dict(mac_learn_rate_per_s=-1), dict(mac_learn_rate_per_s=10**9 + 1),
                                dict(mac_learn_burst=0), dict(mac_learn_burst="x")])
def test_learning_limit_arguments_are_checked(dp_impl, kw):
    with pytest.raises(ValueError, match=list(kw)[0]):
        dp_impl.Datapath(**kw)


def test_a_table_of_bound_macs_only_refuses_another_binding(dp_impl):
    dp = dp_impl.Datapath(max_ports=8, mac_table_size=2)
    for p in range(3):
        dp.add_port(p, C.PORT_POD)
    dp.bind_port(0, mac(1))
    dp.bind_port(1, mac(2))
    with pytest.raises(ValueError, match="only bound MACs"):
        dp.bind_port(2, mac(3))
    assert set(rows(dp)) == {mac(1), mac(2)}
