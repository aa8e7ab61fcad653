# Connection tracking and hostPort DNAT (the pipeline's "nat" stage).
#
# Entries live in a fixed array (conntrack_size, free list). One open-addressing index
# (linear probing, power of two >= 4 * capacity slots, backward-shift deletion) holds
# both tuples of every entry: a slot refers to (entry, direction) and keeps the full
# 32-bit hash of its key so that most probes never touch an entry. A packet's 5-tuple
# (addresses as 16 bytes, IPv4 as ::ffff:a.b.c.d, plus family) found as an entry's
# original tuple is translated like the entry's first packet; found as its reply tuple
# it is translated back (BESS nat.h keeps both directions in one table the same way).
#
# ct_portcnt[port] counts the live entries whose original destination port or reply
# source port is `port`: a packet can match an original tuple only if its dport is
# counted, a reply tuple only if its sport is. rule_ports is a bitmap of the rules' host
# ports. nat_ports (8 KiB, stays in L1) is their union: a packet whose sport and dport
# are both clear there cannot be NAT'ed, so most non-NAT traffic skips the hash.
#
# Rules are found through a small open-addressing index rebuilt on every rule change:
# key (proto, host_port, family, any, host_ip). Exact host_ip rules win over "any node
# address" rules (twin's D19: any rules are keyed per family of the pod IP).
#
# Checksums follow the twin's D25/D26: every written field contributes ~m and m'.
#
# Early drop (D40, Linux's early_drop): the entries not yet assured (a TCP handshake not
# completed, a UDP flow not replied) are also on a doubly linked list in creation order
# (ct_ev_next / ct_ev_prev, arrays beside the entries). An entry leaves it when it becomes
# assured or is deleted; a new connection that finds the table full (after the sweep)
# evicts the list's head, the oldest unassured entry, in O(1). Assured entries are never
# evicted; with none unassured, the new connection is refused (table_full).

cdef inline uint32_t ct_hash(const CtKey *k) noexcept nogil:
    cdef uint64_t h = 0x243F6A8885A308D3ULL
    cdef const uint8_t *b = <const uint8_t *>k
    h = (h ^ load_u64(b)) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 29
    h = (h ^ load_u64(b + 8)) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 29
    h = (h ^ load_u64(b + 16)) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 29
    h = (h ^ load_u64(b + 24)) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 29
    h = (h ^ load_u64(b + 32)) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 32
    return <uint32_t>h

cdef inline bint ct_key_eq(const CtKey *a, const CtKey *b) noexcept nogil:
    cdef const uint8_t *x = <const uint8_t *>a
    cdef const uint8_t *y = <const uint8_t *>b
    return ((load_u64(x) ^ load_u64(y)) | (load_u64(x + 8) ^ load_u64(y + 8))
            | (load_u64(x + 16) ^ load_u64(y + 16)) | (load_u64(x + 24) ^ load_u64(y + 24))
            | (load_u64(x + 32) ^ load_u64(y + 32))) == 0

cdef inline uint32_t ct_find(Core *c, const CtKey *k, uint32_t h) noexcept nogil:
    # the slot ref ((entry << 1 | direction) + 1) whose key equals k, or 0
    cdef uint64_t i = h & c.ct_mask
    cdef CtSlot *s
    cdef CtEntry *e
    cdef uint32_t r
    while True:
        s = &c.ct_slots[i]
        if s.ref == 0:
            return 0
        if s.hash == h:
            r = s.ref - 1
            e = &c.ct[r >> 1]
            if ct_key_eq(k, &e.reply if (r & 1) else &e.orig):
                return s.ref
        i = (i + 1) & c.ct_mask

cdef inline void ct_slot_insert(Core *c, uint32_t h, uint32_t ref) noexcept nogil:
    cdef uint64_t i = h & c.ct_mask
    while c.ct_slots[i].ref != 0:
        i = (i + 1) & c.ct_mask
    c.ct_slots[i].ref = ref
    c.ct_slots[i].hash = h

cdef inline void ct_slot_remove(Core *c, uint32_t h, uint32_t ref) noexcept nogil:
    cdef uint64_t mask = c.ct_mask
    cdef uint64_t i = h & mask
    cdef uint64_t j, home
    while c.ct_slots[i].ref != ref:
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if c.ct_slots[j].ref == 0:
            break
        home = c.ct_slots[j].hash & mask
        if ((j - home) & mask) >= ((j - i) & mask):
            c.ct_slots[i] = c.ct_slots[j]
            i = j
    c.ct_slots[i].ref = 0
    c.ct_slots[i].hash = 0

cdef inline bint bit_test(const uint64_t *bits, uint16_t i) noexcept nogil:
    return (bits[i >> 6] >> (i & 63)) & 1

cdef inline void portcnt_inc(Core *c, uint16_t port) noexcept nogil:
    c.ct_portcnt[port] += 1
    c.nat_ports[port >> 6] |= (<uint64_t>1) << (port & 63)

cdef inline void portcnt_dec(Core *c, uint16_t port) noexcept nogil:
    c.ct_portcnt[port] -= 1
    if c.ct_portcnt[port] == 0 and not bit_test(c.rule_ports, port):
        c.nat_ports[port >> 6] &= ~((<uint64_t>1) << (port & 63))

cdef inline void ct_ev_append(Core *c, uint32_t idx) noexcept nogil:
    # the new entry idx joins the early-drop list as its newest
    c.ct_ev_next[idx] = 0
    c.ct_ev_prev[idx] = c.ct_ev_tail
    if c.ct_ev_tail:
        c.ct_ev_next[c.ct_ev_tail - 1] = idx + 1
    else:
        c.ct_ev_head = idx + 1
    c.ct_ev_tail = idx + 1

cdef inline void ct_ev_unlink(Core *c, uint32_t idx) noexcept nogil:
    # entry idx leaves the early-drop list (assured or deleted); nothing if not on it
    cdef uint32_t nxt = c.ct_ev_next[idx]
    cdef uint32_t prv = c.ct_ev_prev[idx]
    if prv == 0 and c.ct_ev_head != idx + 1:
        return
    if prv:
        c.ct_ev_next[prv - 1] = nxt
    else:
        c.ct_ev_head = nxt
    if nxt:
        c.ct_ev_prev[nxt - 1] = prv
    else:
        c.ct_ev_tail = prv
    c.ct_ev_next[idx] = 0
    c.ct_ev_prev[idx] = 0

cdef void ct_delete(Core *c, uint32_t idx) noexcept nogil:
    cdef CtEntry *e = &c.ct[idx]
    ct_ev_unlink(c, idx)
    ct_slot_remove(c, ct_hash(&e.orig), (idx << 1) + 1)
    ct_slot_remove(c, ct_hash(&e.reply), (idx << 1 | 1) + 1)
    portcnt_dec(c, e.orig.dport)
    portcnt_dec(c, e.reply.sport)
    memset(e, 0, sizeof(CtEntry))
    e.next_free = c.ct_free
    c.ct_free = idx + 1
    c.ct_count -= 1

cdef uint64_t ct_sweep_c(Core *c, uint64_t now) noexcept nogil:
    # deletes every expired entry (counted ct_expired); returns the count
    cdef uint32_t i
    cdef uint64_t n = 0
    cdef uint32_t left = c.ct_count    # used entries not visited yet: the scan stops at 0
    for i in range(c.conntrack_size):
        if not left:
            break
        if c.ct[i].used:
            left -= 1
            if c.ct[i].expires_ns <= now:
                ct_delete(c, i)
                n += 1
    c.gc[GC_CT_EXPIRED] += n
    return n

cdef inline void set_addr16(uint8_t *to, const uint8_t *a, bint v4) noexcept nogil:
    # an address as a key holds it: IPv6 as is, IPv4 as ::ffff:a.b.c.d
    if v4:
        memset(to, 0, 10)
        to[10] = 0xff
        to[11] = 0xff
        memcpy(to + 12, a, 4)
    else:
        memcpy(to, a, 16)

cdef inline void ct_key_addrs(CtKey *k, Pkt *p) noexcept nogil:
    # the packet's addresses and family into k
    cdef const uint8_t *ip = p.p + p.l3_off
    cdef bint v4 = p.kind == K_IPV4
    set_addr16(k.src, ip + (12 if v4 else 8), v4)
    set_addr16(k.dst, ip + (16 if v4 else 24), v4)
    k.family = 4 if v4 else 6

cdef inline void ct_key_from_pkt(CtKey *k, Pkt *p) noexcept nogil:
    cdef const uint8_t *l4 = p.p + p.l4_off
    ct_key_addrs(k, p)
    k.sport = load_be16(l4)
    k.dport = load_be16(l4 + 2)
    k.proto = p.l4_proto
    k.pad[0] = 0
    k.pad[1] = 0

# ---------------------------------------------------------------- hostPort rules

cdef inline uint32_t rule_hash(uint8_t proto, uint16_t port, uint8_t family, uint8_t any_ip,
                               const uint8_t *ip) noexcept nogil:
    cdef uint64_t h = (<uint64_t>proto << 24) ^ (<uint64_t>port << 8) ^ (<uint64_t>family << 1) ^ any_ip
    h = (h ^ load_u64(ip)) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 29
    h = (h ^ load_u64(ip + 8)) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 32
    return <uint32_t>h

cdef inline int32_t rule_find(Core *c, uint8_t proto, uint16_t port, uint8_t family, uint8_t any_ip,
                              const uint8_t *ip) noexcept nogil:
    # rule id of the key, or -1 (ip is ignored for any_ip rules: pass zeros)
    cdef uint64_t i = rule_hash(proto, port, family, any_ip, ip) & c.rule_mask
    cdef uint32_t s
    cdef HpRule *r
    while True:
        s = c.rule_slots[i]
        if s == 0:
            return -1
        r = &c.rules[s - 1]
        if (r.proto == proto and r.host_port == port and r.family == family and r.any_ip == any_ip
                and memcmp(r.host_ip, ip, 16) == 0):
            return <int32_t>(s - 1)
        i = (i + 1) & c.rule_mask

cdef void rules_reindex(Core *c) noexcept nogil:
    cdef uint32_t rid
    cdef uint64_t i
    cdef HpRule *r
    memset(c.rule_slots, 0, (c.rule_mask + 1) * sizeof(uint32_t))
    memset(c.rule_ports, 0, sizeof(c.rule_ports))
    for rid in range(c.max_hostports):
        r = &c.rules[rid]
        if not r.used:
            continue
        i = rule_hash(r.proto, r.host_port, r.family, r.any_ip, r.host_ip) & c.rule_mask
        while c.rule_slots[i] != 0:
            i = (i + 1) & c.rule_mask
        c.rule_slots[i] = rid + 1
        c.rule_ports[r.host_port >> 6] |= (<uint64_t>1) << (r.host_port & 63)
    memcpy(c.nat_ports, c.rule_ports, sizeof(c.nat_ports))
    for i in range(65536):
        if c.ct_portcnt[i]:
            c.nat_ports[i >> 6] |= (<uint64_t>1) << (i & 63)

cdef inline bint is_node_address(Core *c, uint8_t family, const uint8_t *ip) noexcept nogil:
    cdef uint32_t i
    for i in range(c.n_node):
        if c.node_family[i] == family and memcmp(c.node_ip[i], ip, 16) == 0:
            return True
    return False

cdef uint8_t ZERO16[16]
memset(ZERO16, 0, 16)

cdef inline int32_t rule_match(Core *c, CtKey *k) noexcept nogil:
    # the rule for a packet's (proto, dst, dport): exact host_ip first, then any node address
    cdef int32_t rid
    if not bit_test(c.rule_ports, k.dport):
        return -1
    rid = rule_find(c, k.proto, k.dport, k.family, 0, k.dst)
    if rid >= 0:
        return rid
    if is_node_address(c, k.family, k.dst):
        return rule_find(c, k.proto, k.dport, k.family, 1, ZERO16)
    return -1

# ---------------------------------------------------------------- rewriting

cdef inline uint32_t csum_delta(uint32_t acc, const uint8_t *old, const uint8_t *new, int nwords) noexcept nogil:
    # adds ~m + m' for nwords big-endian words
    cdef int i
    cdef uint32_t m, m2
    for i in range(nwords):
        m = (<uint32_t>old[2 * i] << 8) | old[2 * i + 1]
        m2 = (<uint32_t>new[2 * i] << 8) | new[2 * i + 1]
        acc += (m ^ 0xffff) + m2
    return acc

cdef inline void nat_rewrite(Pkt *k, bint needs_csum, const uint8_t *new_src, const uint8_t *new_dst,
                             int new_sport, int new_dport) noexcept nogil:
    # writes the given fields (NULL / -1: not written) and patches the checksums (D25, D26);
    # a packet without L4 (a non-first fragment, D39) gets its addresses and the IPv4 header
    # checksum only. new_src / new_dst are 16-byte addresses (IPv4: ::ffff:a.b.c.d)
    cdef uint8_t *ip = k.p + k.l3_off
    cdef uint8_t *l4 = k.p + k.l4_off
    cdef uint32_t addr_acc = 0, port_acc = 0
    cdef uint8_t *cs
    cdef uint16_t hc, nc
    cdef uint8_t pw[2]
    if k.kind == K_IPV4:
        if new_src != NULL:
            addr_acc = csum_delta(addr_acc, ip + 12, new_src + 12, 2)
        if new_dst != NULL:
            addr_acc = csum_delta(addr_acc, ip + 16, new_dst + 12, 2)
        hc = load_be16(ip + 10)
        nc = ~csum_fold((hc ^ 0xffff) + addr_acc)
        store_be16(ip + 10, nc)
        if new_src != NULL:
            memcpy(ip + 12, new_src + 12, 4)
        if new_dst != NULL:
            memcpy(ip + 16, new_dst + 12, 4)
    else:
        if new_src != NULL:
            addr_acc = csum_delta(addr_acc, ip + 8, new_src, 8)
            memcpy(ip + 8, new_src, 16)
        if new_dst != NULL:
            addr_acc = csum_delta(addr_acc, ip + 24, new_dst, 8)
            memcpy(ip + 24, new_dst, 16)
    if not k.has_l4:
        return
    if new_sport >= 0:
        store_be16(pw, <uint16_t>new_sport)
        port_acc = csum_delta(port_acc, l4, pw, 1)
        store_be16(l4, <uint16_t>new_sport)
    if new_dport >= 0:
        store_be16(pw, <uint16_t>new_dport)
        port_acc = csum_delta(port_acc, l4 + 2, pw, 1)
        store_be16(l4 + 2, <uint16_t>new_dport)
    cs = l4 + (16 if k.l4_proto == 6 else 6)
    hc = load_be16(cs)
    if needs_csum:
        store_be16(cs, csum_fold(hc + addr_acc))
        return
    if k.l4_proto == 17 and k.kind == K_IPV4 and hc == 0:
        return
    nc = ~csum_fold((hc ^ 0xffff) + addr_acc + port_acc)
    if nc == 0 and k.l4_proto == 17:
        nc = 0xffff
    store_be16(cs, nc)

# ---------------------------------------------------------------- the NAT stage

cdef enum:
    NAT_NONE = -1        # no NAT decision: the FDB decides
    NAT_OUT = -2         # translated; *out holds the port

# ---------------------------------------------------------------- fragments (D39)
# A translated first fragment leaves its datagram's translation in c.frags; later fragments
# are translated from it. At most C_FRAG_SLOTS datagrams are remembered; a new one takes a
# free or expired record, else the oldest one's (FIFO, by c.frag_seq), exactly what the
# twin's dict does. Records are found by a scan of their hashes (c.frag_hash), skipped
# entirely while nothing remembered is still live (c.frag_live_until_ns).

cdef inline void frag_key_ids(CtKey *fk, Pkt *k) noexcept nogil:
    # a fragment key's non-address fields: sport, dport = the identification, proto
    fk.sport = <uint16_t>(k.frag_id >> 16)
    fk.dport = <uint16_t>(k.frag_id & 0xffff)
    fk.proto = k.frag_proto
    fk.pad[0] = 0
    fk.pad[1] = 0

cdef inline int frag_find(Core *c, const CtKey *fk, uint32_t h, uint64_t now) noexcept nogil:
    # the index of the live record of key fk, or -1
    cdef int i
    if now >= c.frag_live_until_ns:
        return -1
    for i in range(C_FRAG_SLOTS):
        if (c.frag_hash[i] == h and c.frags[i].used and c.frags[i].expires_ns > now
                and ct_key_eq(&c.frags[i].key, fk)):
            return i
    return -1

cdef inline int frag_slot_for(Core *c, const CtKey *fk, uint32_t h, uint64_t now) noexcept nogil:
    # where to remember key fk: its live record, else a free or expired one, else the oldest
    cdef int i, oldest = 0
    cdef int i_found = frag_find(c, fk, h, now)
    if i_found >= 0:
        return i_found
    for i in range(C_FRAG_SLOTS):
        if not c.frags[i].used or c.frags[i].expires_ns <= now:
            return i
        if c.frags[i].seq < c.frags[oldest].seq:
            oldest = i
    return oldest

cdef inline void frag_remember(Core *c, Pkt *k, CtEntry *e, int d, uint64_t now) noexcept nogil:
    # k.ct_key holds the first fragment's tuple as received (NAT has rewritten the frame)
    cdef CtKey fk = k.ct_key
    cdef FragRec *r
    cdef uint32_t h
    cdef int i
    frag_key_ids(&fk, k)
    h = ct_hash(&fk)
    i = frag_slot_for(c, &fk, h, now)
    r = &c.frags[i]
    c.frag_hash[i] = h
    c.frag_seq += 1
    r.seq = c.frag_seq
    r.key = fk
    r.used = 1
    r.expires_ns = now + C_FRAG_TIMEOUT_NS
    if r.expires_ns > c.frag_live_until_ns:
        c.frag_live_until_ns = r.expires_ns
    r.direction = d
    if d == 0:
        r.out_port = e.out_port
        r.has_src = e.hairpin
        memcpy(r.new_src, e.reply.dst, 16)
        r.has_dst = 1
        memcpy(r.new_dst, e.reply.src, 16)
    else:
        r.out_port = e.in_port
        r.has_src = 1
        memcpy(r.new_src, e.orig.dst, 16)
        r.has_dst = e.hairpin
        memcpy(r.new_dst, e.orig.src, 16)
        memcpy(r.src_mac, e.orig_dst_mac, 6)
        memcpy(r.dst_mac, e.orig_src_mac, 6)

cdef inline int nat_fragment(Core *c, Pkt *k, uint64_t now, int32_t *out) noexcept nogil:
    # NAT_NONE, or NAT_OUT with *out set: a non-first fragment of a remembered datagram
    cdef CtKey fk
    cdef FragRec *r
    cdef int i
    if now >= c.frag_live_until_ns:
        return NAT_NONE
    ct_key_addrs(&fk, k)
    frag_key_ids(&fk, k)
    i = frag_find(c, &fk, ct_hash(&fk), now)
    if i < 0:
        return NAT_NONE
    r = &c.frags[i]
    nat_rewrite(k, False, r.new_src if r.has_src else NULL, r.new_dst if r.has_dst else NULL, -1, -1)
    nat_finish(c, k, r.direction, r.out_port, r.src_mac, r.dst_mac, out)
    tr_add(c, TR_NAT_FRAGMENT, r.direction, 0)
    return NAT_OUT

cdef inline void ct_apply(Core *c, CtEntry *e, int direction, Pkt *k, uint64_t now) noexcept nogil:
    # state machine (twin's D27), assurance (D40), expiry, counters for one packet of the entry
    cdef uint8_t flags, syn_ack
    if e.orig.proto == 6:
        flags = k.p[k.l4_off + 13]
        syn_ack = flags & (TCP_SYN | TCP_ACK)
        if flags & TCP_RST:
            e.state = C_CT_CLOSE
        elif flags & TCP_FIN:
            e.fin_seen |= <uint8_t>(1 << direction)
            if e.fin_seen == 3 or e.state == C_CT_CLOSE:
                e.state = C_CT_CLOSE
            else:
                e.state = C_CT_FIN
        elif e.state == C_CT_SYN_SENT and direction == 1 and syn_ack == (TCP_SYN | TCP_ACK):
            e.state = C_CT_SYN_RECV
        elif ((e.state == C_CT_SYN_SENT and direction == 1 and syn_ack == TCP_ACK)
                or (e.state == C_CT_SYN_RECV and direction == 0 and syn_ack == TCP_ACK)):
            e.state = C_CT_ESTABLISHED
            ct_ev_unlink(c, <uint32_t>(e - c.ct))
    elif direction == 1:
        if e.state == C_CT_UDP_NEW:
            ct_ev_unlink(c, <uint32_t>(e - c.ct))
        e.state = C_CT_UDP_REPLIED
    e.expires_ns = now + c.ct_timeout[e.state]
    e.packets += 1
    e.bytes += k.len

cdef inline void nat_finish(Core *c, Pkt *k, int direction, uint16_t out_port, const uint8_t *src_mac,
                            const uint8_t *dst_mac, int32_t *out) noexcept nogil:
    # the MACs and out port of a translated packet of that direction (D24, D32): direction
    # 0 the gateway MAC and the out port's bound MAC, direction 1 the MACs given
    cdef PortState *ps
    if direction == 0:
        if c.gw_mac_set:
            memcpy(k.p + 6, c.gw_mac, 6)
        ps = &c.ports[out_port]
        if ps.present and ps.mac_bound:
            memcpy(k.p, ps.mac, 6)
    else:
        memcpy(k.p + 6, src_mac, 6)
        memcpy(k.p, dst_mac, 6)
    out[0] = out_port
    c.gc[GC_NAT_TRANSLATED] += 1

cdef inline void ct_translate_macs(Core *c, CtEntry *e, int direction, Pkt *k, int32_t *out) noexcept nogil:
    nat_finish(c, k, direction, e.out_port if direction == 0 else e.in_port, e.orig_dst_mac,
               e.orig_src_mac, out)

cdef inline void ct_translate(Core *c, CtEntry *e, int direction, Pkt *k, int32_t *out) noexcept nogil:
    cdef bint needs_csum = k.vnet != NULL and (k.vnet[0] & C_VNET_F_NEEDS_CSUM)
    if direction == 0:
        nat_rewrite(k, needs_csum, e.reply.dst if e.hairpin else NULL, e.reply.src, -1, e.reply.sport)
    else:
        nat_rewrite(k, needs_csum, e.orig.dst, e.orig.src if e.hairpin else NULL, e.orig.dport, -1)
    ct_translate_macs(c, e, direction, k, out)

cdef inline void nat_hit(Core *c, CtEntry *e, int d, Pkt *k, uint64_t now, int32_t *out, bint tr) noexcept nogil:
    # a packet of entry e in direction d: state and expiry, translation, fragment memory
    ct_apply(c, e, d, k, now)
    ct_translate(c, e, d, k, out)
    tr_at(c, tr, TR_NAT_HIT, d, e.state)
    if k.frag == FRAG_FIRST:
        frag_remember(c, k, e, d, now)

cdef inline bint reply_key(Core *c, Pkt *k, HpRule *r, CtKey *rkey) noexcept nogil:
    # the tuple replies of k's new connection to rule r carry; True when it is hairpin
    # (the source is the rule's pod: SNAT to the gateway of its family, when that is set)
    cdef bint hairpin = memcmp(k.ct_key.src, r.pod_ip, 16) == 0
    if hairpin:
        if k.ct_key.family == 4 and c.gw_ip4_set:
            memcpy(rkey.dst, c.gw_ip4, 16)
        elif k.ct_key.family == 6 and c.gw_ip6_set:
            memcpy(rkey.dst, c.gw_ip6, 16)
        else:
            hairpin = False
    if not hairpin:
        memcpy(rkey.dst, k.ct_key.src, 16)
    memcpy(rkey.src, r.pod_ip, 16)
    rkey.sport = r.container_port
    rkey.dport = k.ct_key.sport
    rkey.proto = k.ct_key.proto
    rkey.family = k.ct_key.family
    rkey.pad[0] = 0
    rkey.pad[1] = 0
    return hairpin

cdef inline int ct_create(Core *c, Pkt *k, int32_t rid, uint64_t now, CtEntry **created) noexcept nogil:
    # a new entry for k by rule rid in *created: -1, or a drop reason (DR_NAT_COLLISION when
    # its reply tuple is taken, DR_TABLE_FULL when neither a sweep nor an early drop frees one)
    cdef CtKey rkey
    cdef HpRule *r = &c.rules[rid]
    cdef bint hairpin = reply_key(c, k, r, &rkey)
    cdef uint32_t rh, ref, idx
    cdef CtEntry *e
    if ct_key_eq(&rkey, &k.ct_key):
        return DR_NAT_COLLISION
    rh = ct_hash(&rkey)
    ref = ct_find(c, &rkey, rh)
    if ref:
        idx = (ref - 1) >> 1
        if c.ct[idx].expires_ns <= now:
            ct_delete(c, idx)
            c.gc[GC_CT_EXPIRED] += 1
        else:
            return DR_NAT_COLLISION
    if c.ct_count >= c.conntrack_size:
        if not c.ct_swept or now - c.ct_sweep_ns >= C_SWEEP_INTERVAL_NS:
            c.ct_swept = 1
            c.ct_sweep_ns = now
            ct_sweep_c(c, now)
        if c.ct_count >= c.conntrack_size:
            if c.ct_ev_head == 0:
                return DR_TABLE_FULL
            ct_delete(c, c.ct_ev_head - 1)          # early drop: the oldest unassured (D40)
            c.gc[GC_CT_EARLY_DROP] += 1
    idx = c.ct_free - 1
    e = &c.ct[idx]
    c.ct_free = e.next_free
    e.next_free = 0
    e.orig = k.ct_key
    e.reply = rkey
    e.expires_ns = 0
    e.packets = 0
    e.bytes = 0
    e.in_port = k.in_port
    e.out_port = r.pod_port_id
    memcpy(e.orig_dst_mac, k.p, 6)
    memcpy(e.orig_src_mac, k.p + 6, 6)
    e.state = C_CT_SYN_SENT if k.ct_key.proto == 6 else C_CT_UDP_NEW
    e.hairpin = hairpin
    e.fin_seen = 0
    e.used = 1
    ct_slot_insert(c, k.ct_hash, (idx << 1) + 1)
    ct_slot_insert(c, rh, (idx << 1 | 1) + 1)
    ct_ev_append(c, idx)
    portcnt_inc(c, k.ct_key.dport)
    portcnt_inc(c, rkey.sport)
    c.ct_count += 1
    c.gc[GC_CT_CREATED] += 1
    tr_add(c, TR_NAT_NEW, rid, hairpin)
    created[0] = e
    return -1

cdef inline int nat_stage(Core *c, Pkt *k, uint64_t now, int32_t *out, bint tr) noexcept nogil:
    # a TCP/UDP packet: NAT_NONE, NAT_OUT (out set) or a drop reason DR_*
    cdef uint32_t ref, idx
    cdef CtEntry *e
    cdef const uint8_t *l4 = k.p + k.l4_off
    cdef uint16_t sport = load_be16(l4)
    cdef uint16_t dport = load_be16(l4 + 2)
    if not (bit_test(c.nat_ports, sport) or bit_test(c.nat_ports, dport)):
        tr_at(c, tr, TR_NAT_NONE, 0, 0)
        return NAT_NONE
    if not k.ct_ready:                  # (the batch loop may have done this ahead)
        ct_key_from_pkt(&k.ct_key, k)
        k.ct_hash = ct_hash(&k.ct_key)
        k.ct_ready = 1
    ref = ct_find(c, &k.ct_key, k.ct_hash) if (c.ct_portcnt[sport] | c.ct_portcnt[dport]) else 0
    if ref:
        idx = (ref - 1) >> 1
        e = &c.ct[idx]
        if e.expires_ns > now:
            nat_hit(c, e, (ref - 1) & 1, k, now, out, tr)
            return NAT_OUT
        ct_delete(c, idx)
        c.gc[GC_CT_EXPIRED] += 1
    return nat_new(c, k, now, out)

cdef int nat_new(Core *c, Pkt *k, uint64_t now, int32_t *out) noexcept nogil:
    # nat_stage for a packet of no live entry: a rule's new connection, or NAT_NONE. Not
    # inline: it keeps nat_stage's hit path small
    cdef int32_t rid
    cdef int why
    cdef CtEntry *e
    rid = rule_match(c, &k.ct_key)
    if rid < 0:
        tr_add(c, TR_NAT_NONE, 0, 0)
        return NAT_NONE
    why = ct_create(c, k, rid, now, &e)
    if why >= 0:
        return why
    nat_hit(c, e, 0, k, now, out, True)
    return NAT_OUT

# ---------------------------------------------------------------- ICMP errors (twin's D37)

cdef inline uint32_t put_field(uint8_t *at, const uint8_t *value, int nwords, uint32_t *acc) noexcept nogil:
    # writes nwords big-endian words at `at` and adds ~m + m' of each to *acc (also returned)
    acc[0] = csum_delta(acc[0], at, value, nwords)
    memcpy(at, value, nwords * 2)
    return acc[0]

cdef inline void put_csum(uint8_t *at, uint32_t delta, bint udp_rules, bint v4, uint32_t *icmp_acc) noexcept nogil:
    # patches the checksum at `at` by delta (D26, not partial) and adds the change to icmp_acc
    cdef uint16_t hc = load_be16(at)
    cdef uint16_t nc
    cdef uint8_t w[2]
    if udp_rules and v4 and hc == 0:
        return
    nc = ~csum_fold((hc ^ 0xffff) + delta)
    if udp_rules and nc == 0:
        nc = 0xffff
    store_be16(w, nc)
    icmp_acc[0] = csum_delta(icmp_acc[0], at, w, 1)
    store_be16(at, nc)

ctypedef struct IcmpQuote:
    # where an ICMP error's quoted packet and its own addresses lie (pointers into the frame)
    uint8_t *q3           # the quoted IP header
    uint8_t *q4           # the quoted L4 header (at least 8 bytes of it in the frame)
    uint8_t *q_src        # the quoted source / destination address
    uint8_t *q_dst
    uint8_t *o_src        # the error's own (outer) source / destination address
    uint8_t *o_dst
    int alen              # address length: 4 or 16
    uint8_t proto         # the quoted protocol: 6 or 17

cdef inline bint icmp_quote(Pkt *k, IcmpQuote *q, CtKey *key) noexcept nogil:
    # True when k is an ICMP error (D37) quoting a TCP/UDP packet that is not a fragment:
    # fills q and key, the reversed quoted tuple (the flow the error belongs to)
    cdef bint v4 = k.kind == K_IPV4
    cdef uint8_t *ip = k.p + k.l3_off
    cdef uint8_t *icmp = k.p + k.l4_off
    cdef uint8_t *end = k.p + k.l3_end
    cdef uint8_t t = icmp[0]
    cdef uint32_t ihl
    if k.vnet != NULL and (k.vnet[0] & C_VNET_F_NEEDS_CSUM):
        return False
    if v4:
        if t != 3 and t != 11 and t != 12:
            return False
    elif t < 1 or t > 4:
        return False
    q.q3 = icmp + 8
    if v4:
        if end < q.q3 + 20 or (q.q3[0] >> 4) != 4:
            return False
        ihl = (q.q3[0] & 15) * 4
        if ihl < 20 or (load_be16(q.q3 + 6) & 0x3fff) != 0:
            return False
        q.proto = q.q3[9]
        q.q_src = q.q3 + 12
        q.q_dst = q.q3 + 16
        q.q4 = q.q3 + ihl
        q.o_src = ip + 12
        q.o_dst = ip + 16
        q.alen = 4
    else:
        if end < q.q3 + 40 or (q.q3[0] >> 4) != 6:
            return False
        q.proto = q.q3[6]
        q.q_src = q.q3 + 8
        q.q_dst = q.q3 + 24
        q.q4 = q.q3 + 40
        q.o_src = ip + 8
        q.o_dst = ip + 24
        q.alen = 16
    if (q.proto != 6 and q.proto != 17) or end < q.q4 + 8:
        return False
    set_addr16(key.src, q.q_dst, v4)
    set_addr16(key.dst, q.q_src, v4)
    key.family = 4 if v4 else 6
    key.proto = q.proto
    key.sport = load_be16(q.q4 + 2)
    key.dport = load_be16(q.q4)
    key.pad[0] = 0
    key.pad[1] = 0
    return True

cdef inline void icmp_error_rewrite(Pkt *k, IcmpQuote *q, CtEntry *e, int d) noexcept nogil:
    # D37's writes for an error about entry e's direction d: the outer header as a packet
    # of direction d, the quoted packet as one of the other direction mirrored, and every
    # checksum involved (outer IPv4 header, ICMP / ICMPv6, quoted IPv4 header, quoted L4)
    cdef bint v4 = q.alen == 4
    cdef uint8_t *ip = k.p + k.l3_off
    cdef uint8_t *icmp = k.p + k.l4_off
    cdef uint8_t *end = k.p + k.l3_end
    cdef int alen = q.alen
    cdef const uint8_t *w_osrc = NULL
    cdef const uint8_t *w_odst = NULL
    cdef const uint8_t *w_qsrc = NULL
    cdef const uint8_t *w_qdst = NULL
    cdef int w_qsport = -1, w_qdport = -1
    cdef uint32_t qa = 0, qp = 0, oa = 0, icmp_acc = 0
    cdef uint8_t pw[2]
    if d == 0:
        w_odst = e.reply.src
        w_qsrc = e.reply.src
        w_qsport = e.reply.sport
        if e.hairpin:
            w_osrc = e.reply.dst
            w_qdst = e.reply.dst
    else:
        w_osrc = e.orig.dst
        w_qdst = e.orig.dst
        w_qdport = e.orig.dport
        if e.hairpin:
            w_odst = e.orig.src
            w_qsrc = e.orig.src
    # the quoted packet (IPv4 addresses are the last 4 of an entry's 16 bytes)
    if w_qsrc != NULL:
        put_field(q.q_src, w_qsrc + 16 - alen, alen // 2, &qa)
    if w_qdst != NULL:
        put_field(q.q_dst, w_qdst + 16 - alen, alen // 2, &qa)
    if w_qsport >= 0:
        store_be16(pw, <uint16_t>w_qsport)
        put_field(q.q4, pw, 1, &qp)
    if w_qdport >= 0:
        store_be16(pw, <uint16_t>w_qdport)
        put_field(q.q4 + 2, pw, 1, &qp)
    icmp_acc = qa + qp
    if v4:
        put_csum(q.q3 + 10, qa, False, v4, &icmp_acc)
    if q.proto == 6:
        if q.q4 + 18 <= end:
            put_csum(q.q4 + 16, qa + qp, False, v4, &icmp_acc)
    else:
        put_csum(q.q4 + 6, qa + qp, True, v4, &icmp_acc)
    # the outer header
    if w_osrc != NULL:
        put_field(q.o_src, w_osrc + 16 - alen, alen // 2, &oa)
    if w_odst != NULL:
        put_field(q.o_dst, w_odst + 16 - alen, alen // 2, &oa)
    if v4:
        store_be16(ip + 10, ~csum_fold((load_be16(ip + 10) ^ 0xffff) + oa))
    else:
        icmp_acc += oa                   # ICMPv6 covers the pseudo-header
    store_be16(icmp + 2, ~csum_fold((load_be16(icmp + 2) ^ 0xffff) + icmp_acc))

cdef inline int nat_icmp_error(Core *c, Pkt *k, uint64_t now, int32_t *out) noexcept nogil:
    # NAT_NONE, or NAT_OUT with *out set: an ICMP error about a tracked flow is translated
    # with it (D37); nothing is created and the entry does not change
    cdef IcmpQuote q
    cdef CtKey key
    cdef CtEntry *e
    cdef uint32_t ref, idx
    cdef int d
    if not icmp_quote(k, &q, &key):
        return NAT_NONE
    ref = ct_find(c, &key, ct_hash(&key))
    if ref:
        idx = (ref - 1) >> 1
        e = &c.ct[idx]
        if e.expires_ns <= now:
            ct_delete(c, idx)
            c.gc[GC_CT_EXPIRED] += 1
            ref = 0
    if not ref:
        tr_add(c, TR_NAT_ICMP_NONE, 0, 0)
        return NAT_NONE
    d = (ref - 1) & 1
    icmp_error_rewrite(k, &q, e, d)
    ct_translate_macs(c, e, d, k, out)
    tr_add(c, TR_NAT_ICMP, d, 0)
    return NAT_OUT
