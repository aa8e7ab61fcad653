"""The pure-Python datapath: the executable spec of docs/datapath.md.

Decisions beyond docs/datapath.md
=================================
The contract is silent on these points; both implementations follow them exactly.
(Numbered so the Cython side can cite them. D-numbers are stable; new ones are appended.)

Arguments and validation
 D1  Constructor: keyword arguments exactly the keys of dpconst.DEFAULTS. max_ports in
     1..65535; mac_table_size, conntrack_size, max_hostports >= 1; vnet_hdr_len in {0, 10, 12};
     every *_ns value in 0..2**63-1. Otherwise ValueError naming the value.
 D2  process() validates the whole batch before touching any state: n in 0..len of every
     array; for i < n: in_ports[i] < max_ports, lengths[i] <= MAX_FRAME,
     offsets[i] >= vnet_hdr_len, offsets[i] + lengths[i] <= len(buf). Wrong dtype / ndim /
     not C-contiguous / not writable arrays: ValueError. now_ns < 0, or now_ns smaller than
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
 D7  Checksums are never verified. csum_start/csum_offset and gso_type of the vnet header
     are never read; only flags bit 0 (NEEDS_CSUM), and only when vnet_hdr_len > 0.
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
     fragment: its L4 is parsed and checked when the offset is 0, but it is never
     NAT-tracked, exactly like an IPv4 first fragment.

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
     be in the past). The refill that releases a packet in drain() is done at drain's
     now_ns.
 D16 drain(): repeat { if emitted == max_pkts: stop; among non-empty queues whose head
     was not enqueued during this drain() call and has t_dep <= now_ns pick the smallest
     (t_dep, port id, direction EGRESS=0 before INGRESS=1); if out_off + L > len(out_buf)
     (out_off starts at H, header at out_off-H): stop, the packet stays queued; refill at
     now_ns, credit -= cost, pop it; copy header+frame to out_buf; egress packets run
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
     read at each packet (current gateway and binding), as is nothing else: the reply
     direction uses the MACs stored in the entry.
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
 D29 ICMP is never translated (ICMP errors about a NATed flow pass untranslated).
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

(Theory of operation follows.)
"""
