"""Stage 4 state: conntrack states and timeouts, expiry, the bounded table and its early
drop (D40), the UDP flush, hostPort rule management."""
import pytest

from dp_helpers import (
    A4, A6, B4, CLIENT4, GW_MAC, MAC_A, NODE4, NODE6, NODE_MAC, POD_A, POD_B, ROUTER_MAC,
    UPLINK, gc, ip4, ip6, make_topo, send1, tcp, udp,
)
from vswitch.datapath import consts as C

SEC = 10**9


@pytest.fixture
def dp(dp_impl):
    return make_topo(dp_impl)


def c2s(dp, sport, flags, now, dport=8080):
    return send1(dp, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, sport, dport, flags=flags), UPLINK, now)


def s2c(dp, sport, flags, now):
    return send1(dp, tcp(MAC_A, GW_MAC, A4, CLIENT4, 80, sport, flags=flags), POD_A, now)


def entry(dp, sport=None):
    ct = dp.conntrack()
    if sport is not None:
        ct = ct[ct["orig_sport"] == sport]
    assert len(ct) == 1
    e = ct[0]
    return C.CT_STATE_NAMES[int(e["state"])], int(e["expires_ns"])


def test_tcp_handshake_and_orderly_close(dp):
    c2s(dp, 1000, "S", 1 * SEC)
    assert entry(dp) == ("SYN_SENT", 121 * SEC)
    c2s(dp, 1000, "S", 2 * SEC)
    assert entry(dp) == ("SYN_SENT", 122 * SEC)
    s2c(dp, 1000, "SA", 3 * SEC)                # the SYN-ACK: not established yet (Linux)
    assert entry(dp) == ("SYN_RECV", 63 * SEC)
    s2c(dp, 1000, "SA", 3 * SEC + 5)            # a retransmitted SYN-ACK
    assert entry(dp) == ("SYN_RECV", 63 * SEC + 5)
    c2s(dp, 1000, "A", 4 * SEC)                 # the handshake's final ACK
    assert entry(dp) == ("ESTABLISHED", 4 * SEC + 86400 * SEC)
    c2s(dp, 1000, "FA", 5 * SEC)
    assert entry(dp) == ("FIN", 125 * SEC)
    s2c(dp, 1000, "A", 6 * SEC)
    assert entry(dp) == ("FIN", 126 * SEC)
    s2c(dp, 1000, "FA", 7 * SEC)
    assert entry(dp) == ("CLOSE", 17 * SEC)
    c2s(dp, 1000, "A", 8 * SEC)
    assert entry(dp) == ("CLOSE", 18 * SEC)
    e = dp.conntrack()[0]
    assert int(e["packets"]) == 9


def test_only_the_originators_ack_after_a_syn_ack_establishes(dp):
    c2s(dp, 1000, "S", 0)
    s2c(dp, 1000, "SA", 1)
    assert entry(dp)[0] == "SYN_RECV"
    s2c(dp, 1000, "A", 2)                       # the server's ACK does not complete it
    c2s(dp, 1000, "S", 3)                       # nor a retransmitted SYN
    c2s(dp, 1000, "SA", 4)                      # nor anything with SYN from the client
    assert entry(dp) == ("SYN_RECV", 4 + 60 * SEC)
    c2s(dp, 1000, "PA", 5)                      # an ACK with data completes it (ACK, no SYN)
    assert entry(dp)[0] == "ESTABLISHED"


def test_syn_recv_timeout_is_its_own_key(dp_impl):
    dp = make_topo(dp_impl, tcp_syn_recv_timeout_ns=7, tcp_syn_timeout_ns=5)
    c2s(dp, 1000, "S", 100)
    assert entry(dp) == ("SYN_SENT", 105)
    s2c(dp, 1000, "SA", 101)
    assert entry(dp) == ("SYN_RECV", 108)
    out, f = s2c(dp, 1000, "A", 108)            # expired: gone, the reply passes untranslated
    assert out != POD_A and len(dp.conntrack()) == 0 and gc(dp, "ct_expired") == 1


def test_a_connection_picked_up_mid_stream_is_established_by_the_replys_ack(dp):
    # after a restart the tables are empty: the client's next segment creates the entry
    c2s(dp, 1000, "PA", 0)
    assert entry(dp)[0] == "SYN_SENT"
    s2c(dp, 1000, "A", 1)                       # the server acknowledges: a live connection
    assert entry(dp) == ("ESTABLISHED", 1 + 86400 * SEC)


def test_fin_or_rst_before_the_handshake_completes(dp):
    c2s(dp, 1, "S", 0)
    s2c(dp, 1, "SA", 1)
    c2s(dp, 1, "FA", 2)                         # FIN from SYN_RECV: FIN, as from any state
    c2s(dp, 2, "S", 3)
    s2c(dp, 2, "R", 4)                          # the server refuses
    assert entry(dp, 1) == ("FIN", 2 + 120 * SEC) and entry(dp, 2) == ("CLOSE", 4 + 10 * SEC)


def test_fin_from_the_same_side_twice_is_not_close(dp):
    c2s(dp, 1000, "S", 0)
    s2c(dp, 1000, "SA", 1)
    c2s(dp, 1000, "FA", 2)
    c2s(dp, 1000, "FA", 3)
    assert entry(dp)[0] == "FIN"


@pytest.mark.parametrize("side", ["client", "server"])
def test_rst_closes(dp, side):
    c2s(dp, 1000, "S", 0)
    s2c(dp, 1000, "SA", 1)
    (c2s if side == "client" else s2c)(dp, 1000, "R", 2)
    assert entry(dp) == ("CLOSE", 2 + 10 * SEC)
    c2s(dp, 1000, "A", 3)          # CLOSE is final until expiry
    assert entry(dp) == ("CLOSE", 3 + 10 * SEC)


def test_first_packet_flags_apply_to_the_new_entry(dp):
    c2s(dp, 1, "FA", 0)
    c2s(dp, 2, "R", 0)
    c2s(dp, 3, "A", 0)
    assert entry(dp, 1)[0] == "FIN" and entry(dp, 2)[0] == "CLOSE" and entry(dp, 3)[0] == "SYN_SENT"


def test_udp_states(dp):
    send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7000, 5353), UPLINK, SEC)
    assert entry(dp) == ("UDP_NEW", 31 * SEC)
    send1(dp, udp(MAC_A, GW_MAC, A4, CLIENT4, 53, 7000), POD_A, 2 * SEC)
    assert entry(dp) == ("UDP_REPLIED", 122 * SEC)
    send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7000, 5353), UPLINK, 3 * SEC)
    assert entry(dp) == ("UDP_REPLIED", 123 * SEC)


def test_custom_timeouts(dp_impl):
    dp = make_topo(dp_impl, tcp_syn_timeout_ns=5, udp_timeout_ns=7)
    c2s(dp, 1, "S", 100)
    send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7000, 5353), UPLINK, 100)
    assert sorted(int(x) for x in dp.conntrack()["expires_ns"]) == [105, 107]


def test_an_expired_entry_is_deleted_when_found_and_the_packet_is_unmatched(dp):
    c2s(dp, 1000, "S", 0)
    assert entry(dp) == ("SYN_SENT", 120 * SEC)
    # a reply exactly at expiry: the entry is gone, the reply passes untranslated
    reply = tcp(MAC_A, GW_MAC, A4, CLIENT4, 80, 1000, flags="SA")
    out, f = send1(dp, reply, POD_A, 120 * SEC)
    assert f == reply and len(dp.conntrack()) == 0
    assert gc(dp, "ct_expired") == 1
    # an original packet after expiry creates a new entry
    c2s(dp, 1000, "S", 121 * SEC)
    assert entry(dp) == ("SYN_SENT", 241 * SEC)
    assert gc(dp, "ct_created") == 2


def test_conntrack_sweep(dp):
    c2s(dp, 1, "S", 0)                                       # expires 120 s
    send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7000, 5353), UPLINK, 0)   # 30 s
    assert dp.conntrack_sweep(30 * SEC - 1) == 0
    assert dp.conntrack_sweep(30 * SEC) == 1
    assert dp.conntrack_sweep(200 * SEC) == 1
    assert len(dp.conntrack()) == 0 and gc(dp, "ct_expired") == 2


def establish(dp, sport, now):
    """A complete handshake at now (3 packets): the entry is assured."""
    c2s(dp, sport, "S", now)
    s2c(dp, sport, "SA", now)
    c2s(dp, sport, "A", now)


def test_full_table_refuses_new_entries_and_sweeps_at_most_once_per_second(dp_impl):
    # every entry assured (ESTABLISHED): nothing may be evicted, new connections are refused
    dp = make_topo(dp_impl, conntrack_size=2, tcp_est_timeout_ns=10 * SEC)
    establish(dp, 1, 0)                             # expires 10 s
    establish(dp, 2, 1)                             # expires 10 s + 1
    assert c2s(dp, 3, "S", 5 * SEC)[0] == C.OUT_DROP    # full; the sweep at 5 s finds nothing
    assert gc(dp, "table_full") == 1 and dp.port_counters()[UPLINK, C.PC["drop_table_full"]] == 1
    assert c2s(dp, 3, "S", 10 * SEC + 1)[0] == POD_A    # a sweep may run again: both expired
    assert len(dp.conntrack()) == 1 and gc(dp, "ct_expired") == 2
    s2c(dp, 3, "SA", 10 * SEC + 1)
    c2s(dp, 3, "A", 10 * SEC + 1)                       # 3 assured, expires 20 s + 1
    establish(dp, 4, 10 * SEC + 2)                      # room for one more, expires 20 s + 2
    assert c2s(dp, 5, "S", 10 * SEC + 3)[0] == C.OUT_DROP   # full, last sweep < 1 s ago
    assert gc(dp, "table_full") == 2
    assert c2s(dp, 3, "A", 10 * SEC + 4)[0] == POD_A    # existing entries work while full
    assert c2s(dp, 5, "S", 20 * SEC + 3)[0] == POD_A    # sweep: entry 4 expired, 3 not yet
    assert sorted(int(x) for x in dp.conntrack()["orig_sport"]) == [3, 5]
    s2c(dp, 5, "SA", 20 * SEC + 3)
    c2s(dp, 5, "A", 20 * SEC + 3)
    assert c2s(dp, 6, "S", 20 * SEC + 5)[0] == C.OUT_DROP   # entry 3 expired, but no sweep yet
    assert c2s(dp, 6, "S", 21 * SEC + 3)[0] == POD_A    # one second later the sweep runs
    assert gc(dp, "table_full") == 3 and gc(dp, "ct_created") == 6
    assert gc(dp, "ct_early_drop") == 0


def test_a_full_table_evicts_the_oldest_unassured_entry_never_an_assured_one(dp_impl):
    dp = make_topo(dp_impl, conntrack_size=4)
    establish(dp, 1, 0)
    establish(dp, 2, 1)
    c2s(dp, 3, "S", 2)                                  # SYN_SENT
    c2s(dp, 4, "S", 3)
    s2c(dp, 4, "SA", 3)                                 # SYN_RECV
    for sport, gone in ((5, 3), (6, 4), (7, 5)):        # a SYN flood: each evicts the oldest
        assert c2s(dp, sport, "S", 10 + sport)[0] == POD_A
        ct = dp.conntrack()
        assert sorted(int(x) for x in ct["orig_sport"]) == [1, 2] + list(range(gone + 1, sport + 1))
    assert gc(dp, "ct_early_drop") == 3 and gc(dp, "table_full") == 0 and gc(dp, "ct_created") == 7
    # the evicted connection's SYN-ACK finds nothing: it passes untranslated, nothing created
    out, f = s2c(dp, 4, "SA", 20)
    assert f == tcp(MAC_A, GW_MAC, A4, CLIENT4, 80, 4, flags="SA") and len(dp.conntrack()) == 4
    # the assured ones still translate
    assert c2s(dp, 1, "A", 21)[0] == POD_A and c2s(dp, 2, "A", 21)[0] == POD_A
    # completing a handshake assures it: then only 7 may go, then nothing
    s2c(dp, 6, "SA", 22)
    c2s(dp, 6, "A", 22)
    assert c2s(dp, 8, "S", 23)[0] == POD_A and gc(dp, "ct_early_drop") == 4    # 7 evicted
    s2c(dp, 8, "SA", 24)
    c2s(dp, 8, "A", 24)
    assert c2s(dp, 9, "S", 25)[0] == C.OUT_DROP                               # all assured
    assert gc(dp, "table_full") == 1 and gc(dp, "ct_early_drop") == 4
    assert sorted(int(x) for x in dp.conntrack()["orig_sport"]) == [1, 2, 6, 8]


def test_udp_unreplied_entries_go_first(dp_impl):
    dp = make_topo(dp_impl, conntrack_size=3)
    send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7000, 5353), UPLINK, 1)   # replied below
    send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7001, 5353), UPLINK, 2)   # never replied
    send1(dp, udp(MAC_A, GW_MAC, A4, CLIENT4, 53, 7000), POD_A, 3)
    establish(dp, 1, 4)
    assert send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7002, 5353), UPLINK, 5)[0] == POD_A
    assert sorted(int(x) for x in dp.conntrack()["orig_sport"]) == [1, 7000, 7002]
    assert gc(dp, "ct_early_drop") == 1


def test_the_sweep_comes_before_an_early_drop(dp_impl):
    dp = make_topo(dp_impl, conntrack_size=2, tcp_est_timeout_ns=5)
    establish(dp, 1, 0)                                 # expires at 5
    c2s(dp, 2, "S", 1)                                  # unassured
    assert c2s(dp, 3, "S", 10)[0] == POD_A              # the expired one goes, not 2
    assert sorted(int(x) for x in dp.conntrack()["orig_sport"]) == [2, 3]
    assert gc(dp, "ct_expired") == 1 and gc(dp, "ct_early_drop") == 0


def test_trace_on_a_full_table_evicts_nothing(dp_impl):
    dp = make_topo(dp_impl, conntrack_size=1)
    c2s(dp, 1, "S", 0)
    steps = dp.trace(tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 2, 8080), UPLINK, 1)
    assert steps[-1] == ("output", f"port {POD_A}")
    assert [int(x) for x in dp.conntrack()["orig_sport"]] == [1] and gc(dp, "ct_early_drop") == 0
    assert c2s(dp, 2, "S", 1)[0] == POD_A and gc(dp, "ct_early_drop") == 1


def test_removed_entries_leave_the_eviction_order(dp_impl):
    # entries deleted by remove_port, the UDP flush or expiry are never evicted later, and
    # what is left keeps its order
    dp = make_topo(dp_impl, conntrack_size=3)
    send1(dp, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 9090), UPLINK, 0)          # to pod B
    send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7000, 5353), UPLINK, 1)
    c2s(dp, 2, "S", 2)
    dp.remove_port(POD_B)
    dp.remove_hostport(17, 5353)
    c2s(dp, 3, "S", 3)
    c2s(dp, 4, "S", 4)
    assert c2s(dp, 5, "S", 5)[0] == POD_A               # evicts 2, the oldest left
    assert sorted(int(x) for x in dp.conntrack()["orig_sport"]) == [3, 4, 5]
    assert c2s(dp, 6, "S", 6)[0] == POD_A               # then 3
    assert sorted(int(x) for x in dp.conntrack()["orig_sport"]) == [4, 5, 6]
    assert gc(dp, "ct_early_drop") == 2


def test_an_expired_entry_found_by_lookup_makes_room(dp_impl):
    dp = make_topo(dp_impl, conntrack_size=1, tcp_syn_timeout_ns=10)
    c2s(dp, 1, "S", 0)
    assert c2s(dp, 1, "S", 10)[0] == POD_A        # the same tuple: the expired entry is replaced
    assert gc(dp, "ct_expired") == 1 and gc(dp, "table_full") == 0


def test_adding_or_removing_a_rule_flushes_udp_entries_of_that_host_port(dp):
    for sport in (7000, 7001):
        send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, sport, 5353), UPLINK, 1)
    send1(dp, udp(ROUTER_MAC, NODE_MAC, "2001:db8:1::7", NODE6, 7000, 5353), UPLINK, 1)
    c2s(dp, 5353, "S", 1)                                      # TCP from port 5353: kept
    c2s(dp, 1, "S", 1)
    assert len(dp.conntrack()) == 5
    # the pod moved: the rule is replaced; the stale UDP flows must go (portmap #123/#1190)
    dp.add_hostport(17, 5353, ip4(B4), 53, POD_B)
    ct = dp.conntrack()
    assert len(ct) == 2 and set(int(x) for x in ct["proto"]) == {6}
    assert gc(dp, "ct_deleted") == 3
    # now traffic to 5353 goes to B
    out, _ = send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7000, 5353), UPLINK, 2)
    assert out == POD_B
    dp.remove_hostport(17, 5353)               # any rules of both families: v4 and v6
    assert len(dp.conntrack()) == 2 and gc(dp, "ct_deleted") == 4
    out, _ = send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 7000, 5353), UPLINK, 3)
    assert out == C.OUT_FLOOD_UNKNOWN           # unknown unicast: host and uplink only (D41)
    assert [h["host_port"] for h in dp.hostports()] == [8080, 8080, 9090]


def test_tcp_entries_survive_rule_changes(dp):
    c2s(dp, 1, "S", 1)
    dp.remove_hostport(6, 8080)
    assert len(dp.conntrack()) == 1
    assert c2s(dp, 1, "A", 2)[0] == POD_A          # the connection goes on
    assert c2s(dp, 2, "S", 3)[0] == C.OUT_FLOOD_UNKNOWN     # a new one finds no rule


def test_hostports_listing_ids_and_replacement(dp):
    rules = dp.hostports()
    assert [r["id"] for r in rules] == [0, 1, 2, 3, 4]
    assert rules[0] == dict(id=0, proto=6, host_port=8080, host_ip=None, pod_ip=ip4(A4),
                            container_port=80, pod_port_id=POD_A)
    assert rules[4]["host_ip"] == ip4(NODE4)
    dp.remove_hostport(17, 5353)               # ids 1 and 3
    assert [r["id"] for r in dp.hostports()] == [0, 2, 4]
    assert dp.add_hostport(17, 6000, ip4(A4), 60, POD_A) == 1
    assert dp.add_hostport(6, 8080, ip4(B4), 81, POD_B) == 0          # replaces, keeps id
    r0 = dp.hostports()[0]
    assert (r0["pod_ip"], r0["container_port"], r0["pod_port_id"]) == (ip4(B4), 81, POD_B)
    assert dp.add_hostport(6, 8080, ip6(A6), 80, POD_A) == 2          # v6 any rule: separate key
    assert len(dp.hostports()) == 4


def test_rule_table_is_bounded(dp_impl):
    dp = make_topo(dp_impl, max_hostports=5)
    with pytest.raises(ValueError, match="5"):
        dp.add_hostport(6, 1, ip4(A4), 1, POD_A)
    dp.add_hostport(6, 8080, ip4(A4), 81, POD_A)      # replacing is still fine
    assert len(dp.hostports()) == 5


@pytest.mark.parametrize("args,kw", [
    ((7, 80, ip4(A4), 80, POD_A), {}),
    ((6, 0, ip4(A4), 80, POD_A), {}),
    ((6, 65536, ip4(A4), 80, POD_A), {}),
    ((6, 80, ip4(A4), 0, POD_A), {}),
    ((6, 80, b"\x01\x02", 80, POD_A), {}),
    ((6, 80, ip4(A4), 80, 99), {}),
    ((6, 80, ip4(A4), 80, POD_A), dict(host_ip=ip6(A6))),
    ((6, 80, "10.0.0.1", 80, POD_A), {}),
])
def test_add_hostport_rejects_bad_arguments_and_changes_nothing(dp, args, kw):
    before = dp.hostports()
    with pytest.raises(ValueError):
        dp.add_hostport(*args, **kw)
    assert dp.hostports() == before


def test_remove_hostport_of_an_absent_rule_raises(dp):
    with pytest.raises(ValueError):
        dp.remove_hostport(6, 1234)
    with pytest.raises(ValueError):
        dp.remove_hostport(6, 9090)                 # exists only with host_ip
    dp.remove_hostport(6, 9090, ip4(NODE4))


def test_remove_port_forgets_its_rules_and_entries(dp):
    c2s(dp, 1, "S", 1)
    send1(dp, tcp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 9090), UPLINK, 1)   # to pod B
    dp.remove_port(POD_A)
    assert [r["pod_port_id"] for r in dp.hostports()] == [POD_B]
    ct = dp.conntrack()
    assert len(ct) == 1 and int(ct[0]["out_port"]) == POD_B
    assert gc(dp, "ct_deleted") == 1
    dp.remove_port(UPLINK)                          # the in port of the remaining entry
    assert len(dp.conntrack()) == 0


def test_conntrack_snapshot_is_sorted_by_the_original_tuple(dp):
    for sport in (9, 3, 7):
        c2s(dp, sport, "S", 1)
    send1(dp, udp(ROUTER_MAC, NODE_MAC, CLIENT4, NODE4, 1, 5353), UPLINK, 1)
    send1(dp, tcp(ROUTER_MAC, NODE_MAC, "2001:db8:1::7", NODE6, 1, 8080), UPLINK, 1)
    ct = dp.conntrack()
    assert ct.dtype == C.CT_DTYPE
    keys = [(int(e["proto"]), bytes(e["orig_src"]), bytes(e["orig_dst"]), int(e["orig_sport"]),
             int(e["orig_dport"])) for e in ct]
    assert keys == sorted(keys) and len(keys) == 5
