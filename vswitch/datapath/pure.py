"""The pure-Python datapath: the executable spec of docs/datapath.md.

Decisions beyond docs/datapath.md
=================================
The contract is silent on these points; both implementations follow them exactly.
(Numbered so the Cython side can cite them. D-numbers are stable; new ones are appended.)
Changes after the first version: D15/D16 (commit "drain releases each head at its own
departure time"): drain() refills a shaper at the head's t_dep, not at now_ns. D7/D36:
a GSO frame is charged the bytes its segments take on the wire (Linux's
qdisc_pkt_len_init), not its own length. D29/D37: ICMP errors about a tracked flow are
translated (they passed untranslated before). D38: a first fragment's UDP length may
exceed the fragment (it was malformed before). D11/D39: fragments of hostPort flows are
translated (they were never NAT-tracked before).

Arguments and validation
 D1  Constructor: keyword arguments exactly the keys of dpconst.DEFAULTS. max_ports in
     1..65535; mac_table_size, conntrack_size, max_hostports >= 1; vnet_hdr_len in {0, 10, 12};
     every *_ns value in 0..2**63-1. Otherwise ValueError naming the value.
 D2  process() validates the whole batch before touching any state: n in 0..len of every
     array; for i < n: in_ports[i] < max_ports, lengths[i] <= MAX_FRAME,
     offsets[i] >= vnet_hdr_len, offsets[i] + lengths[i] <= len(buf). Arrays of the wrong
     dtype or not 1-D, a buf that is not C-contiguous and writable, an out array that is
     not writable: ValueError. now_ns < 0, or now_ns smaller than
     the now_ns of an earlier process() or drain() call: ValueError. (trace() applies the
     same now_ns check but does not advance the clock; conntrack_sweep/mac_sweep accept any
     now_ns >= 0 and do not advance it either.)
 D3  A frame whose in port is not added (never added, or removed) is counted rx on that
     port's counter row and dropped `no_route` before parsing. A port that is down still
     receives normally: "up" only matters for output.
 D4  add_port: the new port starts UP, with its counter row zeroed, no binding, no shapers.
     remove_port keeps the counter row (readable until the id is added again).
     set_port_up / bind_port / set_antispoof / set_shaper / clear_shaper / shaper_state /
     remove_port on a port that is not added: ValueError.
 D5  Addresses are bytes-like (bytes, bytearray, memoryview) of length 4 (IPv4) or 16
     (IPv6); a 16-byte address is always IPv6, even if it is ::ffff:a.b.c.d. MACs are
     bytes-like of length 6. Anything else: ValueError. bind_port: at most MAX_IPS_PER_PORT
     items in `ips` (counted before removing duplicates). set_node_addresses: at most
     MAX_NODE_ADDRESSES (64) items; it replaces the whole set. set_gateway replaces all
     three values (None = unset). bind_port replaces the whole binding; ips=[] (bound to
     no address) is different from ips=None (IPs not checked).
 D6  Ports (host_port, container_port) must be 1..65535; proto 6 or 17; pod_port_id must be
     an added port; host_ip, when given, must have the same length as pod_ip.

Parsing
 D7  Checksums are never verified. csum_start/csum_offset/hdr_len of the vnet header are
     never read; flags bit 0 (NEEDS_CSUM) is read for NAT (D26), gso_type and gso_size
     only for the shaping cost (D36), and only when vnet_hdr_len > 0.
 D8  The VLAN id is TCI & 0x0FFF (0 when untagged; priority-tagged frames share vlan 0).
     An inner ethertype 0x8100 after one tag is "any other ethertype": L2 only. Ethertypes
     below 0x0600 (802.3 lengths) are "any other": L2 only. ARP's 28 bytes are counted after
     the tag.
 D9  IPv4: protocol 6/17/1 are TCP/UDP/ICMP (checked for malformation in unfragmented and
     first fragments); any other protocol: no L4. IPv6: next header 6/17/58 after the
     extension headers; anything else (59 included): no L4. ICMPv6 is only next header 58
     in IPv6, ICMP only protocol 1 in IPv4.
 D10 IPv6 extension headers: lengths are (hdr_ext_len+1)*8 for 0/43/60, (len+2)*4 for 51,
     8 for 44. "Truncated" = fewer than 2 bytes (8 for a fragment header) or fewer than the
     header's length left before the end of the IPv6 payload. At most 8 are examined; if
     the next header after the 8th is again an extension header it is not examined and the
     packet has no L4 (not malformed). A fragment header is first checked for truncation,
     then its offset: non-zero -> no L4 (the rest is not examined).
 D11 An IPv6 packet that has a fragment header (any offset, even 0 with M=0) is a
     fragment: its L4 is parsed and checked when the offset is 0. Fragments are
     NAT-tracked as D39 says (before D39: never).
 D38 The UDP length of a first fragment (IPv4 with MF set, or an IPv6 packet with a
     fragment header of offset 0) counts the whole datagram, so it may exceed the bytes
     available: only UDP length < 8 is malformed there. (Until this rule, the first
     fragment of every UDP datagram bigger than the MTU was dropped as malformed.)

Anti-spoofing
 D12 Applies to every frame of a port with anti-spoofing enabled and a binding (bind_port
     called with a mac or ips not None), non-IP frames included (MAC check only). IPv4
     non-first fragments are checked at L3 too (the IPv4 header is parsed). With ips
     bound: an IPv6 source must be bound, fe80::/10 or ::, even if only IPv4 addresses are
     bound.

Shaping
 D13 set_shaper with rate_bps == 0 is clear_shaper (queued packets dropped, counted
     queue_full on that port; shaper_state then returns None). clear_shaper of a direction
     without a shaper does nothing. rate_bps, burst_bits, queue_bytes in 0..2**63-1.
 D14 set_shaper on an existing shaper keeps credit (min(credit, burst_bits*10**9)),
     last_ns and the queue; the new rate applies from last_ns on. If the kept queue is
     above the new limit nothing is dropped; new packets are refused until it fits.
 D15 t_dep of a head = last_ns + max(0, ceil((cost - credit) / rate_bps)), computed
     without refilling. next_departure_ns() is the minimum over non-empty queues (it may
     be in the past). drain() releases a head at its own t_dep (<= now_ns): the refill
     that releases it is done at t_dep, not at now_ns, so last_ns becomes t_dep and the
     next head's t_dep follows from it; a late drain() thus releases the packets that
     were due by now_ns instead of losing the credit above the cap. Every packet that
     reaches a shaper in process() (or an ingress shaper in drain(), at stage 6) refills
     it at now_ns first, whatever then happens to the packet.
 D16 drain(): repeat { if emitted == max_pkts: stop; among non-empty queues whose head
     was not enqueued during this drain() call and has t_dep <= now_ns pick the smallest
     (t_dep, port id, direction EGRESS=0 before INGRESS=1); if out_off + L > len(out_buf)
     (out_off starts at H, header at out_off-H): stop, the packet stays queued; refill at
     its t_dep, credit -= cost, pop it; copy header+frame to out_buf; egress packets run
     stages 4-6 in out_buf (re-parsed, learnt with now_ns); if the ingress shaper queues
     it again it takes no slot and the loop goes on, otherwise it is emitted (a drop is
     emitted too, as OUT_DROP, and takes its slot) }. An ingress-queue packet is emitted
     with the out port decided before it was queued, even if that port is now down.
     max_pkts must be 0..len of each out array, else ValueError.
 D17 Egress shaping applies to every frame from the port that passed anti-spoofing
     (ARP, broadcast, everything). `queued` and `queue_full` count on the shaper's port
     (egress: the in port; ingress: the out port). The ingress shaper is applied to every
     unicast output, including NAT outputs and hairpin.
 D18 remove_port drops the packets of both its queues, counted queue_full on that port.
     Packets of other ports' queues that came from or were decided for it are untouched.

NAT / conntrack
 D19 "Any node address" rules are keyed per family: key = (proto, host_port, host_ip) for
     an exact rule and (proto, host_port, None, family of pod_ip) for an any rule, so a
     dual-stack pod may have both. remove_hostport(proto, host_port, None) removes the any
     rules of both families. Removing a rule that does not exist: ValueError.
 D20 The rule id returned by add_hostport is the smallest free slot 0..max_hostports-1;
     replacing an existing key keeps its id. hostports() returns dicts with keys id,
     proto, host_port, host_ip (bytes or None), pod_ip (bytes), container_port,
     pod_port_id, sorted by id.
 D21 The UDP flush runs on every add (new or replacing) and every remove of a rule, TCP
     or UDP (literal reading of the contract): every UDP entry whose orig_dport equals
     the host port goes, counted ct_deleted. remove_port removes the rules of its pod
     port the same way (with the flush), and every entry whose in_port or out_port is it
     (ct_deleted). Expired entries found by lookups, collision checks and sweeps count
     ct_expired.
 D22 One index holds both tuples of every entry. Lookup of the packet's 5-tuple:
     an original-tuple match or a reply-tuple match (they never coincide). The new entry's
     reply tuple "already exists" if it is in the index (an expired entry found there is
     deleted first, ct_expired, and does not collide) or equals the new original tuple.
     Order: collision check, then the table-full check (sweep, then table_full).
 D23 "At most once per second": the automatic sweep of a full table runs if it never ran
     or now_ns - last_auto_sweep_ns >= SWEEP_INTERVAL_NS, and sets last_auto_sweep_ns.
     One such clock for conntrack and another for the MAC table. conntrack_sweep() and
     mac_sweep() do not touch them.
 D24 Hairpin needs the gateway address of the packet's family; if it is unset the entry
     is created without SNAT (hairpin = 0). If the gateway MAC is unset the src MAC is left
     unchanged; if the pod port has no bound MAC the dst MAC is left unchanged. Both are
     read at each original-direction packet (current gateway MAC and binding). Everything
     else comes from the entry: the SNAT address is the one chosen at creation (its
     reply_dst), and the reply direction uses the MACs stored in the entry.
 D25 Fields written (always, even when the value does not change): original direction:
     dst address, dst port, and src address if hairpin; reply direction: src address,
     src port, and dst address if hairpin. MACs as in the contract.
 D26 Checksums (ones' complement, 16-bit big-endian words): the set of operands is
     ~HC, and ~m and m' for every 16-bit word of every written field (D25) that the
     checksum covers; the sum is folded with end-around carry (the result is 0 only when
     every operand is 0, otherwise in 1..0xFFFF, whatever the order) and complemented:
     HC' = ~fold(~HC + sum(~m) + sum(m')). IPv4 header checksum: address words only.
     L4 (TCP, UDP): address words (pseudo-header) and port words. With NEEDS_CSUM the
     L4 field is a partial sum: HC' = fold(HC + sum(~m) + sum(m')) over address words
     only, and neither UDP zero rule applies. Without NEEDS_CSUM: UDP over IPv4 with
     checksum 0 stays 0 (ports and addresses still rewritten); UDP (v4 or v6) whose new
     checksum is 0 gets 0xFFFF; an IPv6 UDP checksum of 0 is updated like any other.
 D27 TCP states (flags FIN 0x01, SYN 0x02, RST 0x04): a new entry starts SYN_SENT and
     the creating packet is then applied as an original-direction packet. Per packet: RST
     -> CLOSE; else FIN -> remember "FIN seen" for its direction, CLOSE if both directions
     have sent a FIN or the state was CLOSE, else FIN; else SYN_SENT + a reply-direction
     packet -> ESTABLISHED; else unchanged. CLOSE is final until the entry expires.
     UDP: UDP_NEW; a reply-direction packet -> UDP_REPLIED; final.
 D28 An entry's packets/bytes count every packet that matched or created it (bytes =
     frame length), even if a later stage drops it. nat_translated counts every
     translated packet (both directions). A packet dropped in stage 4 (nat_collision,
     table_full) is not learnt (stage 5 is not reached).
 D29 ICMP that is not an error about a tracked flow (D37) is never translated.
 D30 conntrack() ties on the original tuple (possible only between families) are broken
     by family.

L2
 D31 Any access (learn or lookup) to an aged MAC entry deletes it first; a learn then
     re-inserts it (mac_learned += 1, not a move). The capacity counts every entry,
     aged or not, until it is deleted. mac_sweep(now_ns) deletes every aged entry
     (now_ns - last_seen_ns > mac_aging_ns) and returns the count; no counter.
 D32 When NAT decided the out port, no FDB lookup is made; the out port may be the in
     port (hairpin) and is not a loop; a NAT out port that is down: drop no_route.
 D33 A flood goes to every added port that is up except the in port (VLANs are not
     membership-checked). `flooded` += 1 per flooded frame; tx counts on each port.

 D36 Shaping cost of a GSO frame (Linux's qdisc_pkt_len_init, net/core/dev.c): a shaper
     charges a packet its *charged length* C (cost C*8*10^9 bit*ns), which is the frame
     length L except for a GSO frame, which becomes several frames on the wire, each with
     its own headers. With vnet_hdr_len > 0, gso_type = header byte 1 & 0x7F (the ECN bit
     0x80 ignored), gso_size = bytes 4-5 (little endian) > 0, and the parser found L4
     (not an ICMP, not a non-first fragment), the header length h is:
       gso_type 1 (TCPV4) or 4 (TCPV6), L4 is TCP: L4 offset + TCP data offset * 4;
       gso_type 5 (UDP_L4, segmentation), L4 is UDP: L4 offset + 8;
       gso_type 3 (UDP, UFO: IP fragments, the UDP header only in the first), L4 is UDP:
         the L4 offset (Linux adds the UDP header only for UDP_L4);
     L4 offset = from the frame's first byte (802.1Q tag, IP options and IPv6 extension
     headers included). Then payload = L - h; if payload > 0:
       segs = ceil(payload / gso_size), C = min(L + (segs - 1) * h, 2 * L),
     otherwise (any other gso_type, a type that does not match the L4 protocol, payload
     <= 0) C = L. The cap 2*L is ours, not Linux's: it is above the wire length of every
     frame whose segments carry at least as much payload as headers (gso_size >= h, every
     real TSO/USO frame), and keeps a crafted header (gso_size 1 on a 64 KiB frame would
     be ~1 GB on the wire) from holding a shaper for minutes: a frame never costs more
     than twice its length, so C <= 2 * MAX_FRAME. Only the cost uses C: admission
     (credit >= cost), the cap's head cost (oversized packets), t_dep and the credit taken
     on release. Everything else stays in frame bytes: queue_bytes and the queue limit
     (memory), counters (rx/tx bytes, conntrack bytes). C is computed when the packet
     reaches the shaper (from its vnet header and the parse of that frame; NAT does not
     change it) and a queued packet keeps it. trace() uses an all-zero vnet header (D35),
     so it charges L.

 D37 ICMP errors about a tracked flow are translated with it (Linux conntrack's RELATED
     handling, nf_nat_icmp_reply_translation), so that, say, a client of a hostPort gets
     "port unreachable" from node:hostPort, not from an address it never contacted.
     A frame is such an error when it parsed to L4 as ICMP (IPv4, not a fragment; type
     3, 11 or 12) or ICMPv6 (not a fragment; type 1, 2, 3 or 4), with vnet_hdr_len 0 or
     NEEDS_CSUM clear, and the quoted packet, starting 8 bytes after the ICMP header's
     start and read only up to the outer IP total / payload length ("end"), is: IPv4
     (version 4, IHL >= 5, fragment offset 0 and MF clear) in an IPv4 error, or IPv6
     (version 6, next header directly TCP or UDP: no extension headers) in an ICMPv6
     error; protocol TCP or UDP; and at least 8 bytes of its L4 header before end. The
     quoted packet is one the error's sender received, so the error belongs to the
     reversed tuple: key = (family, proto, quoted dst, quoted src, quoted dport, quoted
     sport), looked up like D22 (an expired entry is deleted, ct_expired; nothing is
     ever created). Not found: untouched, the FDB decides. Found in direction d: the outer
     header is written as a packet of direction d (D25: d=0 dst := reply_src, and src :=
     reply_dst if hairpin; d=1 src := orig_dst, and dst := orig_src if hairpin), the
     quoted packet as one of the other direction mirrored (d=0: quoted src := reply_src,
     quoted sport := reply_sport, quoted dst := reply_dst if hairpin; d=1: quoted dst :=
     orig_dst, quoted dport := orig_dport, quoted src := orig_src if hairpin), MACs and
     the out port as for direction d (D24, D32). The entry itself does not change (no
     state, expiry or packet counts); nat_translated += 1. Checksums (D26 arithmetic,
     never partial): the quoted IPv4 header checksum over the quoted address words; the
     quoted L4 checksum, only when its field lies before end (UDP always, TCP when 18
     bytes are quoted), over quoted address and port words, with UDP's zero rules; the
     outer IPv4 header checksum over the outer address words; the ICMP checksum over
     every word written inside the ICMP message (quoted addresses, ports and both quoted
     checksums, old and new) and, for ICMPv6 (pseudo-header), the outer address words.
     trace: one "nat" stage whenever the lookup is made.

 D39 Fragments of hostPort flows are translated one by one, in arrival order, without
     reassembly (Linux conntrack reassembles first). A TCP/UDP first fragment (IPv4
     offset 0 with MF; IPv6 fragment header with offset 0 and M set) is NAT-tracked like
     an unfragmented packet (lookup, creation, translation; its L4 checksum covers the
     whole datagram, and the words NAT writes are all in this fragment, so D26 holds). If
     it was translated, the datagram's translation is remembered under the fragment key
     as received: (family, src, dst, fragment protocol, identification), where the
     protocol is IPv4's protocol field or the IPv6 fragment header's next header, and the
     identification is IPv4's 16 bits or the fragment header's 32 bits. Remembered: the
     direction, the outer addresses written (D25), the out port and, for direction 1, the
     entry's MACs; for FRAG_TIMEOUT_NS (30 s, Linux's ipfrag_time). A non-first fragment
     (IPv4 offset != 0; IPv6 fragment header offset != 0) whose key is remembered and
     not expired gets those addresses written (IPv4 header checksum patched, D26), its
     MACs as a packet of that direction (direction 0: the current gateway MAC and the out
     port's current bound MAC, D24) and that out port (D32); nat_translated += 1; the
     entry is not touched (D28 counts only the first fragment). Otherwise it is
     untouched: a non-first fragment that arrives before its first fragment is not
     translated. An IPv6 atomic fragment (offset 0, M clear) is NAT-tracked and nothing
     is remembered. The memory is FRAG_SLOTS (256) slots; a key's slot is
     ct_hash(key) & 255 (the Cython core's hash of the 40-byte conntrack key layout:
     src, dst, sport = id >> 16, dport = id & 0xFFFF, proto, family; _frag_slot), and a
     new datagram replaces whatever its slot held. trace: one "nat" stage for a
     translated non-first fragment.

Counters, trace
 D34 packets/bytes (global) and rx (per port) count each frame once, when process()
     receives it. tx counts when a frame is output (process or drain), never for
     OUT_QUEUED or OUT_DROP.
 D35 trace(frame, in_port, now_ns) runs the frame (with an all-zero vnet header) through
     the pipeline on a copy of the state. It returns a list of (stage, text) with stage in
     "rx", "parse", "antispoof", "egress_shaper", "nat", "l2", "ingress_shaper", "output";
     stages after a drop or a queueing are absent; the last item is always ("output",
     text) with text "port N", "flood", "queued" or "drop REASON" (REASON one of
     dpconst.DROP_REASONS). Only the stage names and the output text are part of the
     contract between implementations; the other texts are informative.

Theory of operation
===================
One class, ``Datapath``, one method per pipeline stage, one packet at a time, tables in
plain dicts. It is slow on purpose: every line should be obviously what docs/datapath.md
says, so that the Cython core (ext/) can be checked against it byte for byte
(tests/datapath/test_differential.py).

process() validates the whole batch, then runs ``_process_one`` for each packet in order:
rx counters, the in port must exist -> ``_parse`` (stage 1) -> ``_antispoof`` (2) -> the
egress shaper of the in port (3) -> ``_stage4_on``: ``_nat`` (4) -> ``_l2`` (5) -> the
ingress shaper of the out port (6) -> tx counters (7). A drop anywhere raises ``_Drop``,
which names the reason and the port it is counted on. Each packet sees the state left by
the ones before it (sequential semantics); drain() re-enters at ``_stage4_on``.

Malformed-frame rule. The parser reads headers from the first ``lengths[i]`` bytes only.
A frame is dropped and counted ``malformed`` when it is shorter than 14 bytes, or says
802.1Q / ARP / IPv4 / IPv6 and its headers are truncated or inconsistent (the exact list
is in docs/datapath.md, stage 1, and in ``_parse``). A frame that cannot be understood
further but is not inconsistent (other ethertypes, unknown IP protocols, non-first
fragments, more than 8 IPv6 extension headers) is switched at L2 only (non-first
fragments of a hostPort datagram are still translated, D39). Nothing is ever read past the frame's length, because
``_parse`` reads a ``bytes`` copy of exactly the frame and checks every length first.

Shaping. A token bucket per (port, direction) with credit in bit*ns (bits x 10^9, exact
Python ints): a packet costs C*8*10^9 where C is its charged length; refill adds
elapsed_ns * rate_bps. C is the frame length L, except for an offloaded GSO frame (a TSO
segment of up to 64 KiB from a TAP): on a wire it becomes ceil(payload / gso_size) frames,
each with its own Ethernet/IP/TCP headers, so it is charged those headers once per extra
segment, as Linux's qdiscs charge it (``_charged_len``, D36). Without that a shaped TCP
stream got 4-5% more than its rate on the wire. Queue limits and counters stay in frame
bytes. A packet leaves at once if its queue is empty and the credit covers it, otherwise
it waits in a FIFO bounded in (frame) bytes. Oversized packets (cost > burst): while such
a packet is the head of the queue the credit cap rises to its cost, so it leaves
(C*8 - burst)/rate seconds after the bucket was full, and the charged bytes released
still never exceed burst + rate*t. No packet stalls forever. drain() releases due heads
oldest departure first; an egress packet then continues at stage 4.

Conntrack. One entry per connection holds both directions (BESS nat.h style): one index
maps the original tuple and the reply tuple to the same entry, so a reply is found with
the same one lookup as an original packet. The first packet to a hostPort rule creates
the entry and fixes its translation (DNAT to the pod, plus SNAT to the gateway for
hairpin); later packets only replay it. Entries expire by TCP/UDP state (FIN/RST shorten
them); an expired entry found is deleted on the spot, and a full table is swept at most
once per second of now_ns before a new entry is refused (``table_full``).

Checksums are patched per RFC 1624 (``_csum_patch``), never recomputed; for frames with
NEEDS_CSUM the L4 field holds the pseudo-header sum and only the address words change it.
"""
import copy
import operator
from collections import deque

import numpy as np

from vswitch.datapath.consts import (
    CT_CLOSE, CT_DTYPE, CT_ESTABLISHED, CT_FIN, CT_STATE_NAMES, CT_SYN_SENT, CT_UDP_NEW,
    CT_UDP_REPLIED, DEFAULTS, EGRESS, FDB_DTYPE, GC, GLOBAL_COUNTERS, INGRESS, MAX_FRAME,
    MAX_IPS_PER_PORT, MAX_IPV6_EXT_HEADERS, OUT_DROP, OUT_FLOOD, OUT_QUEUED, PC,
    PORT_COUNTERS, PORT_HOST, PORT_POD, PORT_UPLINK, SEC_NS, SWEEP_INTERVAL_NS,
    VNET_F_NEEDS_CSUM, FRAG_SLOTS, FRAG_TIMEOUT_NS,
)

__all__ = ["Datapath", "MAX_NODE_ADDRESSES"]

MAX_NODE_ADDRESSES = 64
_MAX_I63 = 2**63 - 1

ETH_P_8021Q = 0x8100
ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
FRAG_NONE, FRAG_FIRST, FRAG_LATER, FRAG_ATOMIC = 0, 1, 2, 3      # _Parsed.frag_kind (D39)
IPV6_EXT_HEADERS = (0, 43, 60, 44, 51)   # hop-by-hop, routing, dest opts, fragment, AH
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04
# virtio-net header gso_type values (linux/virtio_net.h); D36
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

_ZERO4 = bytes(4)
_ZERO16 = bytes(16)
_V4MAPPED = bytes(10) + b"\xff\xff"


# --------------------------------------------------------------------------- helpers

def _be16(b, i):
    return (b[i] << 8) | b[i + 1]


def _np16(buf, i):
    """A big-endian 16-bit word of a numpy uint8 buffer, as a Python int."""
    return (int(buf[i]) << 8) | int(buf[i + 1])


def _addr16(raw):
    """An address as the 16 bytes of the conntrack key (IPv4 as ::ffff:a.b.c.d)."""
    return _V4MAPPED + raw if len(raw) == 4 else raw


def _index(value, what, lo, hi):
    """An int in lo..hi, else ValueError naming the value."""
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{what} must be in {lo}..{hi}, got {v}")
    return v


def _bytes_of(value, what, lengths):
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what} must be bytes of length {' or '.join(map(str, lengths))}, got {value!r}")
    b = bytes(value)
    if len(b) not in lengths:
        raise ValueError(f"{what} must be {' or '.join(map(str, lengths))} bytes long, got {len(b)} bytes: {b.hex()}")
    return b


def _ip(value, what):
    return _bytes_of(value, what, (4, 16))


def _mac(value, what):
    return _bytes_of(value, what, (6,))


def _addr_items(ips, or_none, limit, noun):
    """list(ips), refusing a non-iterable and more than ``limit`` items."""
    try:
        items = list(ips)
    except TypeError:
        raise ValueError(f"ips must be an iterable of addresses{or_none}, got {ips!r}") from None
    if len(items) > limit:
        raise ValueError(f"at most {limit} {noun}, got {len(items)}")
    return items


def _words(raw):
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, len(raw), 2)]


def _fold(s):
    """Ones' complement fold with end-around carry: 0 only if s == 0, else 1..0xFFFF."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum_patch(hc, old_words, new_words, partial=False):
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'); partial (pseudo-header sum): HC + ~m + m'."""
    s = hc if partial else (~hc & 0xFFFF)
    for m in old_words:
        s += ~m & 0xFFFF
    for m in new_words:
        s += m
    s = _fold(s)
    return s if partial else (~s & 0xFFFF)


def _is_linklocal6(a):
    return a[0] == 0xFE and (a[1] & 0xC0) == 0x80


# --------------------------------------------------------------------------- stage 1: parse

class _Parsed:
    """What the parser found in one frame. Offsets are relative to the frame start."""
    __slots__ = ("vlan", "ethertype", "l3", "family", "src", "dst", "is_arp",
                 "l4", "l4_proto", "fragment", "sport", "dport", "tcp_flags",
                 "frag_kind", "frag_id", "frag_proto")

    def __init__(self):
        self.vlan = 0
        self.ethertype = 0
        self.l3 = 14
        self.family = 0          # 4, 6 or 0 (no IP)
        self.src = None          # raw source address (4 or 16 bytes)
        self.dst = None
        self.is_arp = False
        self.l4 = -1             # offset of the L4 header, -1 = no L4
        self.l4_proto = 0        # 6, 17, 1, 58 when l4 >= 0
        self.fragment = False    # any fragment
        self.frag_kind = FRAG_NONE   # D39: FRAG_FIRST (more follow), FRAG_LATER, FRAG_ATOMIC
        self.frag_id = 0         # identification (IPv4 16 bits, IPv6 32 bits)
        self.frag_proto = 0      # IPv4 protocol / the IPv6 fragment header's next header
        self.sport = 0
        self.dport = 0
        self.tcp_flags = 0

    def describe(self):
        parts = [f"vlan {self.vlan}"]
        if self.is_arp:
            parts.append("arp")
        elif self.family:
            parts.append(f"ipv{self.family} {self.src.hex()} > {self.dst.hex()}")
            if self.fragment:
                parts.append("fragment")
            if self.l4 >= 0:
                parts.append({6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}[self.l4_proto])
                if self.l4_proto in (6, 17):
                    parts.append(f"{self.sport} > {self.dport}")
            else:
                parts.append("no l4")
        else:
            parts.append(f"ethertype 0x{self.ethertype:04x} (l2 only)")
        return " ".join(parts)


def _parse_l4(b, p, proto, start, end, icmp_proto):
    """Checks the L4 header at b[start:end] (end = end of the IP payload). None or a reason.
    icmp_proto: the family's ICMP (1 in IPv4, 58 in IPv6; D9)."""
    avail = end - start
    if proto == IPPROTO_TCP:
        if avail < 20:
            return "tcp header truncated"
        doff = b[start + 12] >> 4
        if doff < 5:
            return "tcp data offset < 5"
        if doff * 4 > avail:
            return "tcp data offset beyond the packet"
        p.sport, p.dport, p.tcp_flags = _be16(b, start), _be16(b, start + 2), b[start + 13]
    elif proto == IPPROTO_UDP:
        if avail < 8:
            return "udp header truncated"
        ulen = _be16(b, start + 4)
        if ulen < 8 or (ulen > avail and not p.fragment):   # D38
            return "udp length inconsistent"
        p.sport, p.dport = _be16(b, start), _be16(b, start + 2)
    elif proto == icmp_proto:
        if avail < 4:
            return "icmp header truncated"
    else:
        return None
    p.l4, p.l4_proto = start, proto
    return None


def _parse(b):
    """Stage 1. b: the frame's bytes. Returns a _Parsed, or a str: why it is malformed."""
    n = len(b)
    p = _Parsed()
    if n < 14:
        return "shorter than 14 bytes"
    et = _be16(b, 12)
    l3 = 14
    if et == ETH_P_8021Q:
        if n < 18:
            return "802.1Q tag truncated"
        p.vlan = _be16(b, 14) & 0x0FFF
        et = _be16(b, 16)
        l3 = 18
    p.ethertype, p.l3 = et, l3
    avail = n - l3
    if et == ETH_P_ARP:
        if avail < 28:
            return "arp truncated"
        if _be16(b, l3) != 1 or _be16(b, l3 + 2) != ETH_P_IP or b[l3 + 4] != 6 or b[l3 + 5] != 4:
            return "arp not ethernet/ipv4"
        p.is_arp = True
    elif et == ETH_P_IP:
        if avail < 20:
            return "ipv4 header truncated"
        if b[l3] >> 4 != 4:
            return "ipv4 version != 4"
        ihl = (b[l3] & 0x0F) * 4
        if ihl < 20:
            return "ipv4 ihl < 5"
        total = _be16(b, l3 + 2)
        if total < ihl:
            return "ipv4 total length < header length"
        if total > avail:
            return "ipv4 total length beyond the frame"
        p.family, p.src, p.dst = 4, b[l3 + 12:l3 + 16], b[l3 + 16:l3 + 20]
        frag = _be16(b, l3 + 6)
        offset, more = frag & 0x1FFF, frag & 0x2000
        p.fragment = bool(offset or more)
        p.frag_kind = FRAG_LATER if offset else FRAG_FIRST if more else FRAG_NONE
        p.frag_id, p.frag_proto = _be16(b, l3 + 4), b[l3 + 9]
        if offset == 0:
            return _parse_l4(b, p, b[l3 + 9], l3 + ihl, l3 + total, IPPROTO_ICMP) or p
    elif et == ETH_P_IPV6:
        if avail < 40:
            return "ipv6 header truncated"
        if b[l3] >> 4 != 6:
            return "ipv6 version != 6"
        plen = _be16(b, l3 + 4)
        if plen > avail - 40:
            return "ipv6 payload length beyond the frame"
        p.family, p.src, p.dst = 6, b[l3 + 8:l3 + 24], b[l3 + 24:l3 + 40]
        nh, pos, end = b[l3 + 6], l3 + 40, l3 + 40 + plen
        for _ in range(MAX_IPV6_EXT_HEADERS):
            if nh not in IPV6_EXT_HEADERS:
                break
            left = end - pos
            if nh == 44:
                if left < 8:
                    return "ipv6 fragment header truncated"
                p.fragment = True
                p.frag_id, p.frag_proto = int.from_bytes(b[pos + 4:pos + 8], "big"), b[pos]
                if _be16(b, pos + 2) >> 3:
                    p.frag_kind = FRAG_LATER
                    return p                       # non-first fragment: no L4
                p.frag_kind = FRAG_FIRST if _be16(b, pos + 2) & 1 else FRAG_ATOMIC
                hlen = 8
            else:
                if left < 2:
                    return "ipv6 extension header truncated"
                hlen = (b[pos + 1] + 2) * 4 if nh == 51 else (b[pos + 1] + 1) * 8
                if left < hlen:
                    return "ipv6 extension header truncated"
            nh, pos = b[pos], pos + hlen
        else:
            if nh in IPV6_EXT_HEADERS:
                return p                           # more than 8 extension headers: no L4
        if nh in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6):
            return _parse_l4(b, p, nh, pos, end, IPPROTO_ICMPV6) or p
    return p


ICMP_ERROR_TYPES = {4: (3, 11, 12), 6: (1, 2, 3, 4)}   # D37

_M64 = (1 << 64) - 1


def _ct_hash(key40):
    """The Cython core's conntrack hash (ext/conntrack.pxi ct_hash) of a 40-byte key."""
    h = 0x243F6A8885A308D3
    for i in range(5):
        h = ((h ^ int.from_bytes(key40[8 * i:8 * i + 8], "little")) * 0x9E3779B97F4A7C15) & _M64
        h ^= h >> (29 if i < 4 else 32)
    return h & 0xFFFFFFFF


def _frag_key(family, src, dst, proto, ident):
    """D39: a datagram's fragment key, laid out as the core's 40-byte conntrack key."""
    return (_addr16(src) + _addr16(dst) + (ident >> 16).to_bytes(2, "little")
            + (ident & 0xFFFF).to_bytes(2, "little") + bytes([proto, family, 0, 0]))


def _frag_slot(key40):
    return _ct_hash(key40) & (FRAG_SLOTS - 1)


def _icmp_quoted(b, p):
    """D37: the packet an ICMP error quotes, as (quoted l3, quoted l4, end, proto, src,
    dst, sport, dport) with offsets from the frame start, or None. p: b's _Parsed, an
    ICMP / ICMPv6 packet with L4 and not a fragment."""
    l3, l4 = p.l3, p.l4
    end = l3 + _be16(b, l3 + 2) if p.family == 4 else l3 + 40 + _be16(b, l3 + 4)
    if b[l4] not in ICMP_ERROR_TYPES[p.family]:
        return None
    q3 = l4 + 8
    if p.family == 4:
        if end - q3 < 20 or b[q3] >> 4 != 4:
            return None
        ihl = (b[q3] & 0x0F) * 4
        if ihl < 20 or _be16(b, q3 + 6) & 0x3FFF:
            return None
        proto, src, dst, q4 = b[q3 + 9], b[q3 + 12:q3 + 16], b[q3 + 16:q3 + 20], q3 + ihl
    else:
        if end - q3 < 40 or b[q3] >> 4 != 6:
            return None
        proto, src, dst, q4 = b[q3 + 6], b[q3 + 8:q3 + 24], b[q3 + 24:q3 + 40], q3 + 40
    if proto not in (IPPROTO_TCP, IPPROTO_UDP) or end - q4 < 8:
        return None
    return q3, q4, end, proto, src, dst, _be16(b, q4), _be16(b, q4 + 2)


# --------------------------------------------------------------------------- state records

class _Port:
    __slots__ = ("kind", "up", "antispoof", "mac", "ips", "shapers")

    def __init__(self, kind):
        self.kind = kind
        self.up = True
        self.antispoof = kind == PORT_POD
        self.mac = None          # bound MAC or None
        self.ips = None          # frozenset of raw addresses, or None (IPs not checked)
        self.shapers = [None, None]   # indexed by EGRESS / INGRESS


def _charged_len(vnet, b, p):
    """D36: the bytes a shaper charges for a frame. vnet: its virtio-net header (b"" when
    vnet_hdr_len is 0), b: the frame, p: its _Parsed."""
    length = len(b)
    if not vnet or p.l4 < 0:
        return length
    gso_type = vnet[1] & ~VIRTIO_NET_HDR_GSO_ECN
    gso_size = vnet[4] | (vnet[5] << 8)
    if gso_size == 0:
        return length
    if gso_type in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) and p.l4_proto == IPPROTO_TCP:
        hdr_len = p.l4 + (b[p.l4 + 12] >> 4) * 4
    elif gso_type == VIRTIO_NET_HDR_GSO_UDP_L4 and p.l4_proto == IPPROTO_UDP:
        hdr_len = p.l4 + 8
    elif gso_type == VIRTIO_NET_HDR_GSO_UDP and p.l4_proto == IPPROTO_UDP:
        hdr_len = p.l4                     # IP fragments: the UDP header only in the first
    else:
        return length
    payload = length - hdr_len
    if payload <= 0:
        return length
    segs = -(-payload // gso_size)
    return min(length + (segs - 1) * hdr_len, 2 * length)


class _Queued:
    __slots__ = ("data", "length", "charged", "in_port", "out_port", "fresh")

    def __init__(self, data, length, charged, in_port, out_port, fresh):
        self.data = data         # vnet header + frame, as bytes
        self.length = length     # frame length (header excluded)
        self.charged = charged   # the length the shaper charges (D36)
        self.in_port = in_port
        self.out_port = out_port  # ingress queues: the decided out port
        self.fresh = fresh       # enqueued during the current drain() call


class _Shaper:
    """A token bucket with a FIFO; credit in bit*ns."""
    __slots__ = ("rate_bps", "burst_bits", "credit", "last_ns", "queue", "queue_bytes",
                 "queue_limit_bytes")

    def __init__(self, rate_bps, burst_bits, queue_limit_bytes):
        self.rate_bps = rate_bps
        self.burst_bits = burst_bits
        self.credit = burst_bits * SEC_NS      # a new shaper starts full
        self.last_ns = None                    # unset until the first packet or drain
        self.queue = deque()
        self.queue_bytes = 0
        self.queue_limit_bytes = queue_limit_bytes

    def cap(self):
        cap = self.burst_bits * SEC_NS
        if self.queue:
            cap = max(cap, self.queue[0].charged * 8 * SEC_NS)
        return cap

    def refill(self, now_ns):
        if self.last_ns is not None:
            self.credit = min(self.cap(), self.credit + (now_ns - self.last_ns) * self.rate_bps)
        self.last_ns = now_ns

    def head_departure_ns(self):
        cost = self.queue[0].charged * 8 * SEC_NS
        need = cost - self.credit
        wait = -(-need // self.rate_bps) if need > 0 else 0
        return self.last_ns + wait

    def offer(self, now_ns, length, charged):
        """'pass' (credit taken), 'queue' (caller appends) or 'full'. length: frame bytes
        (the queue limit), charged: the bytes the credit pays for (D36)."""
        self.refill(now_ns)
        cost = charged * 8 * SEC_NS
        if not self.queue and self.credit >= cost:
            self.credit -= cost
            return "pass"
        if self.queue_bytes + length <= self.queue_limit_bytes:
            return "queue"
        return "full"

    def append(self, item):
        self.queue.append(item)
        self.queue_bytes += item.length

    def release(self):
        """Pops the head at its departure time (D15)."""
        self.refill(self.head_departure_ns())
        item = self.queue.popleft()
        self.credit -= item.charged * 8 * SEC_NS
        self.queue_bytes -= item.length
        return item


class _Rule:
    __slots__ = ("id", "proto", "host_port", "host_ip", "pod_ip", "container_port", "pod_port_id")

    def __init__(self, rid, proto, host_port, host_ip, pod_ip, container_port, pod_port_id):
        self.id, self.proto, self.host_port, self.host_ip = rid, proto, host_port, host_ip
        self.pod_ip, self.container_port, self.pod_port_id = pod_ip, container_port, pod_port_id

    def key(self):
        return _rule_key(self.proto, self.host_port, self.host_ip, 4 if len(self.pod_ip) == 4 else 6)

    def as_dict(self):
        return dict(id=self.id, proto=self.proto, host_port=self.host_port, host_ip=self.host_ip,
                    pod_ip=self.pod_ip, container_port=self.container_port,
                    pod_port_id=self.pod_port_id)


def _rule_key(proto, host_port, host_ip, family):
    return (proto, host_port, host_ip) if host_ip is not None else (proto, host_port, None, family)


class _Entry:
    """One connection, both directions. Raw addresses are 4 or 16 bytes (the family's)."""
    __slots__ = ("proto", "state", "hairpin", "family", "orig_src", "orig_dst", "orig_sport",
                 "orig_dport", "reply_src", "reply_dst", "reply_sport", "reply_dport",
                 "in_port", "out_port", "orig_src_mac", "orig_dst_mac", "expires_ns",
                 "packets", "bytes", "fin_seen")

    def tuple_orig(self):
        return (self.family, self.proto, _addr16(self.orig_src), _addr16(self.orig_dst),
                self.orig_sport, self.orig_dport)

    def tuple_reply(self):
        return (self.family, self.proto, _addr16(self.reply_src), _addr16(self.reply_dst),
                self.reply_sport, self.reply_dport)


class _FdbEntry:
    __slots__ = ("port", "last_seen_ns")

    def __init__(self, port, last_seen_ns):
        self.port, self.last_seen_ns = port, last_seen_ns


class _Drop(Exception):
    """Raised inside the pipeline: the packet is dropped for `reason`, counted on `port`."""

    def __init__(self, reason, port, why):
        super().__init__(reason)
        self.reason, self.port, self.why = reason, port, why


# --------------------------------------------------------------------------- the datapath

class Datapath:
    """See the module docstring and docs/datapath.md."""

    def __init__(self, *, max_ports=DEFAULTS["max_ports"], mac_table_size=DEFAULTS["mac_table_size"],
                 conntrack_size=DEFAULTS["conntrack_size"], max_hostports=DEFAULTS["max_hostports"],
                 vnet_hdr_len=DEFAULTS["vnet_hdr_len"], mac_aging_ns=DEFAULTS["mac_aging_ns"],
                 tcp_syn_timeout_ns=DEFAULTS["tcp_syn_timeout_ns"],
                 tcp_est_timeout_ns=DEFAULTS["tcp_est_timeout_ns"],
                 tcp_fin_timeout_ns=DEFAULTS["tcp_fin_timeout_ns"],
                 tcp_close_timeout_ns=DEFAULTS["tcp_close_timeout_ns"],
                 udp_timeout_ns=DEFAULTS["udp_timeout_ns"],
                 udp_replied_timeout_ns=DEFAULTS["udp_replied_timeout_ns"]):
        self.max_ports = _index(max_ports, "max_ports", 1, 65535)
        self.mac_table_size = _index(mac_table_size, "mac_table_size", 1, _MAX_I63)
        self.conntrack_size = _index(conntrack_size, "conntrack_size", 1, _MAX_I63)
        self.max_hostports = _index(max_hostports, "max_hostports", 1, _MAX_I63)
        self.vnet_hdr_len = _index(vnet_hdr_len, "vnet_hdr_len", 0, 12)
        if self.vnet_hdr_len not in (0, 10, 12):
            raise ValueError(f"vnet_hdr_len must be 0, 10 or 12, got {vnet_hdr_len}")
        self.mac_aging_ns = _index(mac_aging_ns, "mac_aging_ns", 0, _MAX_I63)
        self._timeouts = {
            CT_SYN_SENT: _index(tcp_syn_timeout_ns, "tcp_syn_timeout_ns", 0, _MAX_I63),
            CT_ESTABLISHED: _index(tcp_est_timeout_ns, "tcp_est_timeout_ns", 0, _MAX_I63),
            CT_FIN: _index(tcp_fin_timeout_ns, "tcp_fin_timeout_ns", 0, _MAX_I63),
            CT_CLOSE: _index(tcp_close_timeout_ns, "tcp_close_timeout_ns", 0, _MAX_I63),
            CT_UDP_NEW: _index(udp_timeout_ns, "udp_timeout_ns", 0, _MAX_I63),
            CT_UDP_REPLIED: _index(udp_replied_timeout_ns, "udp_replied_timeout_ns", 0, _MAX_I63),
        }
        self._ports = {}                       # port id -> _Port
        self._pc = [[0] * len(PORT_COUNTERS) for _ in range(self.max_ports)]
        self._gc = [0] * len(GLOBAL_COUNTERS)
        self._gw_mac = None
        self._gw_ip = {4: None, 6: None}
        self._node_ips = frozenset()
        self._fdb = {}                         # (vlan, mac bytes) -> _FdbEntry
        self._fdb_auto_sweep_ns = None
        self._rules = {}                       # rule key -> _Rule
        self._rule_ids = {}                    # rule id -> _Rule
        self._ct = {}                          # tuple -> (_Entry, 0 original | 1 reply)
        self._ct_entries = set()               # every live _Entry (by identity)
        self._frags = {}                       # D39: slot -> a fragmented datagram's translation
        self._ct_auto_sweep_ns = None
        self._now_ns = 0                       # the latest now_ns of process() / drain()
        self._draining = False

    # ------------------------------------------------------------------ ports

    def _port(self, port_id):
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        port = self._ports.get(pid)
        if port is None:
            raise ValueError(f"port {pid} is not added")
        return pid, port

    def add_port(self, port_id, kind):
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        if pid in self._ports:
            raise ValueError(f"port {pid} is already added")
        if kind not in (PORT_POD, PORT_HOST, PORT_UPLINK) or isinstance(kind, bool):
            raise ValueError(f"port kind must be PORT_POD, PORT_HOST or PORT_UPLINK (0, 1, 2), got {kind!r}")
        self._ports[pid] = _Port(kind)
        self._pc[pid] = [0] * len(PORT_COUNTERS)

    def remove_port(self, port_id):
        pid, port = self._port(port_id)
        for direction in (EGRESS, INGRESS):
            self._drop_shaper(pid, direction)
        for key in [k for k, e in self._fdb.items() if e.port == pid]:
            del self._fdb[key]
        for rule in sorted((r for r in self._rules.values() if r.pod_port_id == pid), key=lambda r: r.id):
            self._remove_rule(rule)
        for entry in [e for e in self._ct_entries if pid in (e.in_port, e.out_port)]:
            self._ct_delete(entry, "ct_deleted")
        del self._ports[pid]

    def set_port_up(self, port_id, up):
        _, port = self._port(port_id)
        port.up = bool(up)

    def bind_port(self, port_id, mac=None, ips=None):
        _, port = self._port(port_id)
        mac_b = None if mac is None else _mac(mac, "mac")
        ips_set = None
        if ips is not None:
            items = _addr_items(ips, " or None", MAX_IPS_PER_PORT, "ips per port")
            ips_set = frozenset(_ip(a, "ip") for a in items)
        port.mac, port.ips = mac_b, ips_set

    def set_antispoof(self, port_id, enabled):
        _, port = self._port(port_id)
        port.antispoof = bool(enabled)

    def set_gateway(self, mac, ipv4=None, ipv6=None):
        mac_b = _mac(mac, "gateway mac")
        v4 = None if ipv4 is None else _bytes_of(ipv4, "gateway ipv4", (4,))
        v6 = None if ipv6 is None else _bytes_of(ipv6, "gateway ipv6", (16,))
        self._gw_mac, self._gw_ip = mac_b, {4: v4, 6: v6}

    def set_node_addresses(self, ips):
        items = _addr_items(ips, "", MAX_NODE_ADDRESSES, "node addresses")
        self._node_ips = frozenset(_ip(a, "node address") for a in items)

    # ------------------------------------------------------------------ shapers

    def set_shaper(self, port_id, direction, rate_bps, burst_bits, queue_bytes=0):
        pid, port = self._port(port_id)
        if direction not in (EGRESS, INGRESS) or isinstance(direction, bool):
            raise ValueError(f"direction must be EGRESS (0) or INGRESS (1), got {direction!r}")
        rate = _index(rate_bps, "rate_bps", 0, _MAX_I63)
        burst = _index(burst_bits, "burst_bits", 0, _MAX_I63)
        qbytes = _index(queue_bytes, "queue_bytes", 0, _MAX_I63)
        if rate == 0:
            self._drop_shaper(pid, direction)
            return
        limit = qbytes or max(131106, rate // 320, min(burst // 8, 16777216))
        shaper = port.shapers[direction]
        if shaper is None:
            port.shapers[direction] = _Shaper(rate, burst, limit)
        else:
            shaper.rate_bps, shaper.burst_bits, shaper.queue_limit_bytes = rate, burst, limit
            shaper.credit = min(shaper.credit, burst * SEC_NS)

    def clear_shaper(self, port_id, direction):
        pid, _ = self._port(port_id)
        if direction not in (EGRESS, INGRESS) or isinstance(direction, bool):
            raise ValueError(f"direction must be EGRESS (0) or INGRESS (1), got {direction!r}")
        self._drop_shaper(pid, direction)

    def _drop_shaper(self, pid, direction):
        port = self._ports[pid]
        shaper = port.shapers[direction]
        if shaper is None:
            return
        for _ in shaper.queue:
            self._count_drop("queue_full", pid)
        port.shapers[direction] = None

    def shaper_state(self, port_id, direction):
        _, port = self._port(port_id)
        if direction not in (EGRESS, INGRESS) or isinstance(direction, bool):
            raise ValueError(f"direction must be EGRESS (0) or INGRESS (1), got {direction!r}")
        s = port.shapers[direction]
        if s is None:
            return None
        return dict(rate_bps=s.rate_bps, burst_bits=s.burst_bits, credit=s.credit,
                    queue_bytes=s.queue_bytes, queue_packets=len(s.queue),
                    queue_limit_bytes=s.queue_limit_bytes)

    def next_departure_ns(self):
        times = [s.head_departure_ns() for port in self._ports.values()
                 for s in port.shapers if s is not None and s.queue]
        return min(times) if times else -1

    # ------------------------------------------------------------------ hostPort rules

    def add_hostport(self, proto, host_port, pod_ip, container_port, pod_port_id, host_ip=None):
        if proto not in (IPPROTO_TCP, IPPROTO_UDP) or isinstance(proto, bool):
            raise ValueError(f"proto must be 6 (TCP) or 17 (UDP), got {proto!r}")
        hport = _index(host_port, "host_port", 1, 65535)
        cport = _index(container_port, "container_port", 1, 65535)
        pod = _ip(pod_ip, "pod_ip")
        host = None if host_ip is None else _ip(host_ip, "host_ip")
        if host is not None and len(host) != len(pod):
            raise ValueError(f"host_ip {host.hex()} and pod_ip {pod.hex()} are of different families")
        pid, _ = self._port(pod_port_id)
        key = _rule_key(proto, hport, host, 4 if len(pod) == 4 else 6)
        old = self._rules.get(key)
        if old is not None:
            rid = old.id
        else:
            if len(self._rules) >= self.max_hostports:
                raise ValueError(f"hostPort table full: at most {self.max_hostports} rules")
            rid = min(set(range(len(self._rules) + 1)) - set(self._rule_ids))
        rule = _Rule(rid, proto, hport, host, pod, cport, pid)
        self._rules[key] = rule
        self._rule_ids[rid] = rule
        self._flush_udp(hport)
        return rid

    def remove_hostport(self, proto, host_port, host_ip=None):
        if proto not in (IPPROTO_TCP, IPPROTO_UDP) or isinstance(proto, bool):
            raise ValueError(f"proto must be 6 (TCP) or 17 (UDP), got {proto!r}")
        hport = _index(host_port, "host_port", 1, 65535)
        host = None if host_ip is None else _ip(host_ip, "host_ip")
        if host is not None:
            keys = [(proto, hport, host)]
        else:
            keys = [(proto, hport, None, 4), (proto, hport, None, 6)]
        rules = [self._rules[k] for k in keys if k in self._rules]
        if not rules:
            where = host.hex() if host is not None else "any node address"
            raise ValueError(f"no hostPort rule for proto {proto} port {hport} on {where}")
        for rule in rules:
            self._remove_rule(rule)

    def _remove_rule(self, rule):
        del self._rules[rule.key()]
        del self._rule_ids[rule.id]
        self._flush_udp(rule.host_port)

    def _flush_udp(self, host_port):
        for entry in [e for e in self._ct_entries if e.proto == IPPROTO_UDP and e.orig_dport == host_port]:
            self._ct_delete(entry, "ct_deleted")

    def hostports(self):
        return [self._rule_ids[rid].as_dict() for rid in sorted(self._rule_ids)]

    # ------------------------------------------------------------------ counters

    def _count_drop(self, reason, port_id):
        self._pc[port_id][PC["drop_" + reason]] += 1
        self._gc[GC[reason]] += 1

    def _count_tx(self, port_id, length):
        self._pc[port_id][PC["tx_packets"]] += 1
        self._pc[port_id][PC["tx_bytes"]] += length

    def _count_queued(self, port_id):
        self._pc[port_id][PC["queued"]] += 1
        self._gc[GC["queued"]] += 1

    def port_counters(self):
        return np.array(self._pc, dtype=np.uint64).reshape(self.max_ports, len(PORT_COUNTERS))

    def global_counters(self):
        return np.array(self._gc, dtype=np.uint64)

    # ------------------------------------------------------------------ batch entry points

    def _check_now(self, now_ns):
        now = _index(now_ns, "now_ns", 0, _MAX_I63)
        if now < self._now_ns:
            raise ValueError(f"now_ns went backwards: {now} < {self._now_ns}")
        return now

    @staticmethod
    def _array(a, name, dtype, writable=False):
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1:
            got = f"{a.dtype}[{a.ndim}-D]" if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{name} must be a 1-D {np.dtype(dtype)} numpy array, got {got}")
        if writable and not a.flags.writeable:
            raise ValueError(f"{name} must be writable")
        return a

    def _check_buf(self, buf, name):
        self._array(buf, name, np.uint8, writable=True)
        if not buf.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")

    def process(self, buf, offsets, lengths, in_ports, out_ports, n, now_ns):
        self._check_buf(buf, "buf")
        self._array(offsets, "offsets", np.uint32)
        self._array(lengths, "lengths", np.uint32)
        self._array(in_ports, "in_ports", np.uint16)
        self._array(out_ports, "out_ports", np.int32, writable=True)
        n = _index(n, "n", 0, min(len(offsets), len(lengths), len(in_ports), len(out_ports)))
        now = self._check_now(now_ns)
        H = self.vnet_hdr_len
        for i in range(n):
            off, length, in_port = int(offsets[i]), int(lengths[i]), int(in_ports[i])
            if in_port >= self.max_ports:
                raise ValueError(f"in_ports[{i}] = {in_port} is not below max_ports {self.max_ports}")
            if length > MAX_FRAME:
                raise ValueError(f"lengths[{i}] = {length} exceeds MAX_FRAME {MAX_FRAME}")
            if off < H or off + length > len(buf):
                raise ValueError(f"packet {i} (offset {off}, length {length}, vnet header {H}) "
                                 f"does not lie inside buf of {len(buf)} bytes")
        self._now_ns = now
        for i in range(n):
            out_ports[i] = self._process_one(buf, int(offsets[i]), int(lengths[i]),
                                             int(in_ports[i]), now, None)

    def drain(self, now_ns, out_buf, out_offsets, out_lengths, out_in_ports, out_ports, max_pkts):
        self._check_buf(out_buf, "out_buf")
        self._array(out_offsets, "out_offsets", np.uint32, writable=True)
        self._array(out_lengths, "out_lengths", np.uint32, writable=True)
        self._array(out_in_ports, "out_in_ports", np.uint16, writable=True)
        self._array(out_ports, "out_ports", np.int32, writable=True)
        max_pkts = _index(max_pkts, "max_pkts", 0,
                          min(len(out_offsets), len(out_lengths), len(out_in_ports), len(out_ports)))
        now = self._check_now(now_ns)
        self._now_ns = now
        H = self.vnet_hdr_len
        emitted, off = 0, H
        self._draining = True
        try:
            while emitted < max_pkts:
                best = None
                for pid in sorted(self._ports):
                    for direction in (EGRESS, INGRESS):
                        s = self._ports[pid].shapers[direction]
                        if s is None or not s.queue or s.queue[0].fresh:
                            continue
                        t_dep = s.head_departure_ns()
                        if t_dep <= now and (best is None or (t_dep, pid, direction) < best[0]):
                            best = ((t_dep, pid, direction), s)
                if best is None:
                    break
                (_, pid, direction), shaper = best
                if off + shaper.queue[0].length > len(out_buf):
                    break
                item = shaper.release()
                length = item.length
                out_buf[off - H:off + length] = np.frombuffer(item.data, dtype=np.uint8)
                if direction == EGRESS:
                    out = self._stage4_on(out_buf, off, length, item.in_port, None, now, None)
                    if out == OUT_QUEUED:
                        continue
                else:
                    out = item.out_port
                    self._count_tx(out, length)
                out_offsets[emitted], out_lengths[emitted] = off, length
                out_in_ports[emitted], out_ports[emitted] = item.in_port, out
                emitted += 1
                off += length + H
        finally:
            self._draining = False
            for port in self._ports.values():
                for s in port.shapers:
                    if s is not None:
                        for item in s.queue:
                            item.fresh = False
        return emitted

    def trace(self, frame, in_port, now_ns):
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ValueError(f"frame must be bytes, got {type(frame).__name__}")
        frame = bytes(frame)
        if len(frame) > MAX_FRAME:
            raise ValueError(f"frame of {len(frame)} bytes exceeds MAX_FRAME {MAX_FRAME}")
        pid = _index(in_port, "in_port", 0, self.max_ports - 1)
        now = self._check_now(now_ns)
        H = self.vnet_hdr_len
        buf = np.zeros(H + len(frame), dtype=np.uint8)
        buf[H:] = np.frombuffer(frame, dtype=np.uint8)
        shadow = copy.deepcopy(self)
        steps = []
        shadow._process_one(buf, H, len(frame), pid, now, steps)
        return steps

    # ------------------------------------------------------------------ the pipeline

    def _process_one(self, buf, off, length, in_port, now, tr):
        """Stages 1-7 for one received packet; returns its out_ports value."""
        pc = self._pc[in_port]
        pc[PC["rx_packets"]] += 1
        pc[PC["rx_bytes"]] += length
        self._gc[GC["packets"]] += 1
        self._gc[GC["bytes"]] += length
        if tr is not None:
            tr.append(("rx", f"port {in_port}, {length} bytes"))
        try:
            port = self._ports.get(in_port)
            if port is None:
                raise _Drop("no_route", in_port, "the in port is not added")
            # 1. parse
            b = buf[off:off + length].tobytes()
            p = _parse(b)
            if isinstance(p, str):
                raise _Drop("malformed", in_port, p)
            if tr is not None:
                tr.append(("parse", p.describe()))
            # 2. anti-spoofing
            why = self._antispoof(port, b, p)
            if why:
                raise _Drop("spoofed", in_port, why)
            if tr is not None and port.antispoof and (port.mac is not None or port.ips is not None):
                tr.append(("antispoof", "pass"))
            # 3. egress shaping
            shaper = port.shapers[EGRESS]
            if shaper is not None:
                charged = self._charged_len(buf, off, b, p)
                verdict = shaper.offer(now, length, charged)
                if verdict == "full":
                    raise _Drop("queue_full", in_port, "egress queue full")
                if tr is not None:
                    tr.append(("egress_shaper", verdict))
                if verdict == "queue":
                    H = self.vnet_hdr_len
                    shaper.append(_Queued(buf[off - H:off + length].tobytes(), length, charged, in_port,
                                          -1, self._draining))
                    self._count_queued(in_port)
                    if tr is not None:
                        tr.append(("output", "queued"))
                    return OUT_QUEUED
        except _Drop as drop:
            return self._dropped(drop, tr)
        return self._stage4_on(buf, off, length, in_port, p, now, tr)

    def _charged_len(self, buf, off, b, p):
        """D36 for the frame b at buf[off:]; its vnet header is the H bytes before it."""
        H = self.vnet_hdr_len
        return _charged_len(buf[off - H:off].tobytes() if H else b"", b, p)

    def _dropped(self, drop, tr):
        self._count_drop(drop.reason, drop.port)
        if tr is not None:
            tr.append(("output", f"drop {drop.reason}"))
        return OUT_DROP

    def _stage4_on(self, buf, off, length, in_port, p, now, tr):
        """Stages 4-7 (also where a packet released from an egress queue continues)."""
        try:
            if p is None:
                p = _parse(buf[off:off + length].tobytes())
            src_mac = buf[off + 6:off + 12].tobytes()     # learning uses the original source MAC
            # 4. NAT / conntrack
            nat_out = self._nat(buf, off, length, in_port, p, now, tr)
            # 5. L2
            out = self._l2(buf, off, in_port, p.vlan, src_mac, nat_out, now, tr)
        except _Drop as drop:
            return self._dropped(drop, tr)
        # 6. ingress shaping (unicast only) and 7. output
        if out == OUT_FLOOD:
            self._gc[GC["flooded"]] += 1
            for pid in sorted(self._ports):
                if pid != in_port and self._ports[pid].up:
                    self._count_tx(pid, length)
            if tr is not None:
                tr.append(("output", "flood"))
            return OUT_FLOOD
        shaper = self._ports[out].shapers[INGRESS]
        if shaper is not None:
            charged = self._charged_len(buf, off, buf[off:off + length].tobytes(), p)
            verdict = shaper.offer(now, length, charged)
            if tr is not None:
                tr.append(("ingress_shaper", verdict))
            if verdict == "full":
                return self._dropped(_Drop("queue_full", out, "ingress queue full"), tr)
            if verdict == "queue":
                H = self.vnet_hdr_len
                shaper.append(_Queued(buf[off - H:off + length].tobytes(), length, charged, in_port,
                                      out, self._draining))
                self._count_queued(out)
                if tr is not None:
                    tr.append(("output", "queued"))
                return OUT_QUEUED
        self._count_tx(out, length)
        if tr is not None:
            tr.append(("output", f"port {out}"))
        return out

    # ------------------------------------------------------------------ stage 2

    @staticmethod
    def _antispoof(port, b, p):
        """None if the frame may leave this port, else why not."""
        if not port.antispoof or (port.mac is None and port.ips is None):
            return None
        if port.mac is not None:
            if b[6:12] != port.mac:
                return "source MAC not bound"
            if p.is_arp and b[p.l3 + 8:p.l3 + 14] != port.mac:
                return "ARP sender MAC not bound"
        if port.ips is not None:
            if p.is_arp:
                spa = b[p.l3 + 14:p.l3 + 18]
                if spa != _ZERO4 and spa not in port.ips:
                    return "ARP sender IP not bound"
            elif p.family == 4:
                if p.src != _ZERO4 and p.src not in port.ips:
                    return "IPv4 source not bound"
            elif p.family == 6:
                if p.src != _ZERO16 and not _is_linklocal6(p.src) and p.src not in port.ips:
                    return "IPv6 source not bound"
        return None

    # ------------------------------------------------------------------ stage 4

    def _nat(self, buf, off, length, in_port, p, now, tr):
        """Returns the out port NAT decided, or None (untouched). Raises _Drop."""
        if p.frag_kind == FRAG_LATER:
            return self._nat_fragment(buf, off, p, now, tr)
        if p.l4 < 0:
            return None
        if p.l4_proto in (IPPROTO_ICMP, IPPROTO_ICMPV6):
            return None if p.fragment else self._nat_icmp_error(buf, off, length, p, now, tr)
        if p.l4_proto not in (IPPROTO_TCP, IPPROTO_UDP):
            return None
        key = (p.family, p.l4_proto, _addr16(p.src), _addr16(p.dst), p.sport, p.dport)
        found = self._ct_lookup(key, now)
        if found is not None:
            entry, direction = found
        else:
            entry = self._ct_create(key, buf, off, in_port, p, now, tr)
            if entry is None:
                if tr is not None:
                    tr.append(("nat", "no entry, no rule"))
                return None
            direction = 0
        self._ct_update(entry, direction, p, length, now)
        self._translate(buf, off, p, entry, direction)
        self._gc[GC["nat_translated"]] += 1
        if p.frag_kind == FRAG_FIRST:
            self._frag_remember(p, entry, direction, now)
        if tr is not None:
            tr.append(("nat", f"{'original' if direction == 0 else 'reply'} direction, "
                              f"{CT_STATE_NAMES[entry.state]}"))
        return entry.out_port if direction == 0 else entry.in_port

    def _ct_lookup(self, key, now):
        found = self._ct.get(key)
        if found is not None and found[0].expires_ns <= now:
            self._ct_delete(found[0], "ct_expired")
            return None
        return found

    def _ct_delete(self, entry, counter):
        del self._ct[entry.tuple_orig()]
        del self._ct[entry.tuple_reply()]
        self._ct_entries.discard(entry)
        self._gc[GC[counter]] += 1

    def _find_rule(self, p):
        rule = self._rules.get((p.l4_proto, p.dport, p.dst))
        if rule is None and p.dst in self._node_ips:
            rule = self._rules.get((p.l4_proto, p.dport, None, p.family))
        return rule

    def _ct_create(self, key, buf, off, in_port, p, now, tr):
        rule = self._find_rule(p)
        if rule is None:
            return None
        gw = self._gw_ip[p.family]
        hairpin = p.src == rule.pod_ip and gw is not None
        new_src = gw if hairpin else p.src
        reply_key = (p.family, p.l4_proto, _addr16(rule.pod_ip), _addr16(new_src),
                     rule.container_port, p.sport)
        if reply_key == key or self._ct_lookup(reply_key, now) is not None:
            raise _Drop("nat_collision", in_port, "the reply tuple is in use")
        if len(self._ct_entries) >= self.conntrack_size:
            if self._ct_auto_sweep_ns is None or now - self._ct_auto_sweep_ns >= SWEEP_INTERVAL_NS:
                self._ct_auto_sweep_ns = now
                self.conntrack_sweep(now)
            if len(self._ct_entries) >= self.conntrack_size:
                raise _Drop("table_full", in_port, "conntrack table full")
        e = _Entry()
        e.proto, e.family, e.hairpin = p.l4_proto, p.family, int(hairpin)
        e.state = CT_SYN_SENT if p.l4_proto == IPPROTO_TCP else CT_UDP_NEW
        e.orig_src, e.orig_dst, e.orig_sport, e.orig_dport = p.src, p.dst, p.sport, p.dport
        e.reply_src, e.reply_dst = rule.pod_ip, new_src
        e.reply_sport, e.reply_dport = rule.container_port, p.sport
        e.in_port, e.out_port = in_port, rule.pod_port_id
        e.orig_dst_mac = buf[off:off + 6].tobytes()
        e.orig_src_mac = buf[off + 6:off + 12].tobytes()
        e.packets = e.bytes = 0
        e.fin_seen = [False, False]
        e.expires_ns = 0
        self._ct[key] = (e, 0)
        self._ct[reply_key] = (e, 1)
        self._ct_entries.add(e)
        self._gc[GC["ct_created"]] += 1
        if tr is not None:
            tr.append(("nat", f"new entry from rule {rule.id}{' (hairpin)' if hairpin else ''}"))
        return e

    def _ct_update(self, e, direction, p, length, now):
        if e.proto == IPPROTO_TCP:
            flags = p.tcp_flags
            if flags & TCP_RST:
                e.state = CT_CLOSE
            elif flags & TCP_FIN:
                e.fin_seen[direction] = True
                if e.state == CT_CLOSE or all(e.fin_seen):
                    e.state = CT_CLOSE
                else:
                    e.state = CT_FIN
            elif e.state == CT_SYN_SENT and direction == 1:
                e.state = CT_ESTABLISHED
        elif direction == 1:
            e.state = CT_UDP_REPLIED
        e.expires_ns = now + self._timeouts[e.state]
        e.packets += 1
        e.bytes += length

    def _translate(self, buf, off, p, e, direction):
        """Rewrites addresses, ports, checksums and MACs in place (D24-D26)."""
        if direction == 0:
            self._rewrite(buf, off, p, src=e.reply_dst if e.hairpin else None,
                          dst=e.reply_src, dport=e.reply_sport)
        else:
            self._rewrite(buf, off, p, src=e.orig_dst, sport=e.orig_dport,
                          dst=e.orig_src if e.hairpin else None)
        self._entry_macs(buf, off, e, direction)

    def _entry_macs(self, buf, off, e, direction):
        self._set_macs(buf, off, direction, e.out_port, e.orig_dst_mac, e.orig_src_mac)

    def _set_macs(self, buf, off, direction, out_port, src_mac, dst_mac):
        """D24: the MACs of a translated packet of that direction: direction 0 the gateway
        MAC and the out port's bound MAC, direction 1 src_mac and dst_mac."""
        if direction == 0:
            if self._gw_mac is not None:
                buf[off + 6:off + 12] = np.frombuffer(self._gw_mac, dtype=np.uint8)
            port = self._ports.get(out_port)
            if port is not None and port.mac is not None:
                buf[off:off + 6] = np.frombuffer(port.mac, dtype=np.uint8)
        else:
            buf[off + 6:off + 12] = np.frombuffer(src_mac, dtype=np.uint8)
            buf[off:off + 6] = np.frombuffer(dst_mac, dtype=np.uint8)

    def _frag_remember(self, p, e, d, now):
        """D39: a translated first fragment's translation, for the rest of its datagram."""
        key = _frag_key(p.family, p.src, p.dst, p.frag_proto, p.frag_id)
        if d == 0:
            rec = (key, now + FRAG_TIMEOUT_NS, 0, e.out_port, e.reply_dst if e.hairpin else None,
                   e.reply_src, None, None)
        else:
            rec = (key, now + FRAG_TIMEOUT_NS, 1, e.in_port, e.orig_dst,
                   e.orig_src if e.hairpin else None, e.orig_dst_mac, e.orig_src_mac)
        self._frags[_frag_slot(key)] = rec

    def _nat_fragment(self, buf, off, p, now, tr):
        """D39: a non-first fragment is translated as its datagram's first fragment was."""
        key = _frag_key(p.family, p.src, p.dst, p.frag_proto, p.frag_id)
        rec = self._frags.get(_frag_slot(key))
        if rec is None or rec[0] != key or rec[1] <= now:
            return None
        _, _, d, out_port, new_src, new_dst, src_mac, dst_mac = rec
        self._rewrite(buf, off, p, src=new_src, dst=new_dst)
        self._set_macs(buf, off, d, out_port, src_mac, dst_mac)
        self._gc[GC["nat_translated"]] += 1
        if tr is not None:
            tr.append(("nat", f"fragment, {'original' if d == 0 else 'reply'} direction"))
        return out_port

    def _nat_icmp_error(self, buf, off, length, p, now, tr):
        """D37: an ICMP error about a tracked flow is translated with it."""
        H = self.vnet_hdr_len
        if H and buf[off - H] & VNET_F_NEEDS_CSUM:
            return None
        quoted = _icmp_quoted(buf[off:off + length].tobytes(), p)
        if quoted is None:
            return None
        proto, q_src, q_dst, q_sport, q_dport = quoted[3:]
        found = self._ct_lookup((p.family, proto, _addr16(q_dst), _addr16(q_src), q_dport, q_sport), now)
        if found is None:
            if tr is not None:
                tr.append(("nat", "icmp error, no entry"))
            return None
        e, d = found
        if d == 0:
            outer = dict(src=e.reply_dst if e.hairpin else None, dst=e.reply_src)
            inner = dict(src=e.reply_src, sport=e.reply_sport, dst=e.reply_dst if e.hairpin else None)
        else:
            outer = dict(src=e.orig_dst, dst=e.orig_src if e.hairpin else None)
            inner = dict(dst=e.orig_dst, dport=e.orig_dport, src=e.orig_src if e.hairpin else None)
        self._rewrite_icmp_error(buf, off, p, quoted[:3], proto, outer, inner)
        self._entry_macs(buf, off, e, d)
        self._gc[GC["nat_translated"]] += 1
        if tr is not None:
            tr.append(("nat", f"icmp error, {'original' if d == 0 else 'reply'} direction"))
        return e.out_port if d == 0 else e.in_port

    def _rewrite_icmp_error(self, buf, off, p, where, proto, outer, inner):
        """D37's writes and checksums. where: (quoted l3, quoted l4, end), frame offsets."""
        q3, q4, end = (off + x for x in where)
        l3, l4 = off + p.l3, off + p.l4
        alen = 4 if p.family == 4 else 16
        icmp_old, icmp_new = [], []          # every word written inside the ICMP message

        def put(at, nbytes, value, old, new):
            old += _words(buf[at:at + nbytes].tobytes())
            new += _words(value)
            buf[at:at + nbytes] = np.frombuffer(value, dtype=np.uint8)

        # the quoted packet: addresses, ports, its IPv4 header checksum, its L4 checksum
        q_src_at, q_dst_at = (q3 + 12, q3 + 16) if p.family == 4 else (q3 + 8, q3 + 24)
        qa_old, qa_new, qp_old, qp_new = [], [], [], []
        for at, value in ((q_src_at, inner.get("src")), (q_dst_at, inner.get("dst"))):
            if value is not None:
                put(at, alen, value, qa_old, qa_new)
        for at, value in ((q4, inner.get("sport")), (q4 + 2, inner.get("dport"))):
            if value is not None:
                put(at, 2, value.to_bytes(2, "big"), qp_old, qp_new)
        icmp_old += qa_old + qp_old
        icmp_new += qa_new + qp_new
        if p.family == 4:
            hc = _np16(buf, q3 + 10)
            nc = _csum_patch(hc, qa_old, qa_new)
            put(q3 + 10, 2, nc.to_bytes(2, "big"), icmp_old, icmp_new)
        at = q4 + (16 if proto == IPPROTO_TCP else 6)
        if at + 2 <= end:
            hc = _np16(buf, at)
            if not (proto == IPPROTO_UDP and p.family == 4 and hc == 0):
                nc = _csum_patch(hc, qa_old + qp_old, qa_new + qp_new)
                if proto == IPPROTO_UDP and nc == 0:
                    nc = 0xFFFF
                put(at, 2, nc.to_bytes(2, "big"), icmp_old, icmp_new)
        # the outer header
        src_at, dst_at = (l3 + 12, l3 + 16) if p.family == 4 else (l3 + 8, l3 + 24)
        oa_old, oa_new = [], []
        for at, value in ((src_at, outer.get("src")), (dst_at, outer.get("dst"))):
            if value is not None:
                put(at, alen, value, oa_old, oa_new)
        if p.family == 4:
            hc = _np16(buf, l3 + 10)
            nc = _csum_patch(hc, oa_old, oa_new)
            buf[l3 + 10], buf[l3 + 11] = nc >> 8, nc & 0xFF
        else:                                # ICMPv6 covers the pseudo-header
            icmp_old += oa_old
            icmp_new += oa_new
        hc = _np16(buf, l4 + 2)
        nc = _csum_patch(hc, icmp_old, icmp_new)
        buf[l4 + 2], buf[l4 + 3] = nc >> 8, nc & 0xFF

    def _rewrite(self, buf, off, p, src=None, dst=None, sport=None, dport=None):
        """Writes the given addresses and ports and patches the checksums, in one step (D26);
        a packet without L4 (a non-first fragment, D39) gets its addresses and the IPv4
        header checksum only."""
        l3, l4 = off + p.l3, off + p.l4
        H = self.vnet_hdr_len
        partial = H > 0 and bool(buf[off - H] & VNET_F_NEEDS_CSUM)
        old_addr, new_addr, old_port, new_port = [], [], [], []
        if p.family == 4:
            src_at, dst_at, alen = l3 + 12, l3 + 16, 4
        else:
            src_at, dst_at, alen = l3 + 8, l3 + 24, 16
        for at, value in ((src_at, src), (dst_at, dst)):
            if value is not None:
                old_addr += _words(buf[at:at + alen].tobytes())
                new_addr += _words(value)
                buf[at:at + alen] = np.frombuffer(value, dtype=np.uint8)
        for at, value in ((l4, sport), (l4 + 2, dport)):
            if value is not None:
                old_port.append(_np16(buf, at))
                new_port.append(value)
                buf[at], buf[at + 1] = value >> 8, value & 0xFF
        if p.family == 4 and old_addr:
            hc = _np16(buf, l3 + 10)
            hc = _csum_patch(hc, old_addr, new_addr)
            buf[l3 + 10], buf[l3 + 11] = hc >> 8, hc & 0xFF
        if p.l4 < 0:
            return
        at = l4 + (16 if p.l4_proto == IPPROTO_TCP else 6)
        hc = _np16(buf, at)
        if partial:
            hc = _csum_patch(hc, old_addr, new_addr, partial=True)
        else:
            if p.l4_proto == IPPROTO_UDP and p.family == 4 and hc == 0:
                return
            hc = _csum_patch(hc, old_addr + old_port, new_addr + new_port)
            if p.l4_proto == IPPROTO_UDP and hc == 0:
                hc = 0xFFFF
        buf[at], buf[at + 1] = hc >> 8, hc & 0xFF

    # ------------------------------------------------------------------ stage 5

    def _l2(self, buf, off, in_port, vlan, src_mac, nat_out, now, tr):
        self._learn(vlan, src_mac, in_port, now)
        if nat_out is not None:
            port = self._ports.get(nat_out)
            if port is None or not port.up:
                raise _Drop("no_route", in_port, f"NAT out port {nat_out} is down")
            if tr is not None:
                tr.append(("l2", f"NAT decided port {nat_out}"))
            return nat_out
        dst = buf[off:off + 6].tobytes()
        if dst[0] & 1:
            if tr is not None:
                tr.append(("l2", "multicast/broadcast"))
            return OUT_FLOOD
        entry = self._fdb_get((vlan, dst), now)
        if entry is None:
            if tr is not None:
                tr.append(("l2", "unknown unicast"))
            return OUT_FLOOD
        if entry.port == in_port:
            raise _Drop("loop", in_port, "destination MAC is on the in port")
        port = self._ports.get(entry.port)
        if port is None or not port.up:
            raise _Drop("no_route", in_port, f"port {entry.port} is down")
        if tr is not None:
            tr.append(("l2", f"known unicast on port {entry.port}"))
        return entry.port

    def _fdb_get(self, key, now):
        entry = self._fdb.get(key)
        if entry is not None and now - entry.last_seen_ns > self.mac_aging_ns:
            del self._fdb[key]
            return None
        return entry

    def _learn(self, vlan, mac, in_port, now):
        if mac[0] & 1:
            return
        key = (vlan, mac)
        entry = self._fdb_get(key, now)
        if entry is not None:
            if entry.port != in_port:
                entry.port = in_port
                self._gc[GC["mac_moves"]] += 1
            entry.last_seen_ns = now
            return
        if len(self._fdb) >= self.mac_table_size:
            if self._fdb_auto_sweep_ns is None or now - self._fdb_auto_sweep_ns >= SWEEP_INTERVAL_NS:
                self._fdb_auto_sweep_ns = now
                self.mac_sweep(now)
            if len(self._fdb) >= self.mac_table_size:
                self._gc[GC["mac_table_full"]] += 1
                return
        self._fdb[key] = _FdbEntry(in_port, now)
        self._gc[GC["mac_learned"]] += 1

    # ------------------------------------------------------------------ sweeps and snapshots

    def mac_sweep(self, now_ns):
        now = _index(now_ns, "now_ns", 0, _MAX_I63)
        aged = [k for k, e in self._fdb.items() if now - e.last_seen_ns > self.mac_aging_ns]
        for k in aged:
            del self._fdb[k]
        return len(aged)

    def conntrack_sweep(self, now_ns):
        now = _index(now_ns, "now_ns", 0, _MAX_I63)
        expired = [e for e in self._ct_entries if e.expires_ns <= now]
        for e in expired:
            self._ct_delete(e, "ct_expired")
        return len(expired)

    def fdb(self):
        out = np.zeros(len(self._fdb), dtype=FDB_DTYPE)
        for i, ((vlan, mac), e) in enumerate(sorted(self._fdb.items(), key=lambda kv: kv[0])):
            out[i] = (vlan, tuple(mac), e.port, e.last_seen_ns)
        return out

    def conntrack(self):
        entries = sorted(self._ct_entries, key=lambda e: (e.tuple_orig()[1:], e.family))
        out = np.zeros(len(entries), dtype=CT_DTYPE)
        for i, e in enumerate(entries):
            out[i] = (e.proto, e.state, e.hairpin, e.family,
                      tuple(_addr16(e.orig_src)), tuple(_addr16(e.orig_dst)), e.orig_sport, e.orig_dport,
                      tuple(_addr16(e.reply_src)), tuple(_addr16(e.reply_dst)), e.reply_sport,
                      e.reply_dport, e.in_port, e.out_port, tuple(e.orig_src_mac), tuple(e.orig_dst_mac),
                      e.expires_ns, e.packets, e.bytes)
        return out
