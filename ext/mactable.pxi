# MAC table (the pipeline's "l2" stage): (vlan, MAC) -> port, with aging.
#
# Open addressing with linear probing over a power-of-two array of MacEntry slots, at
# least twice the capacity, so probes stay short and an insert below capacity always
# finds a free slot. The key packs the VLAN id and the MAC into one 64-bit word with the
# top bit set (0 marks an empty slot); the home slot is a multiplicative (Fibonacci) hash
# of that word. Deletion shifts the following cluster back (no tombstones), so lookups
# of unknown MACs stop at the first empty slot.
#
# Aging is lazy (twin's D31): an entry older than mac_aging_ns is deleted when a learn or
# a lookup touches it, by mac_sweep(), or by the automatic sweep of a full table (at most
# once per SWEEP_INTERVAL_NS of now_ns, D23). An aged entry still counts against the
# capacity until it is deleted.
#
# Static entries (D42) are the bound MACs (bind_port): never aged, evicted or moved; a
# frame from another port with that source MAC is refused (mac_learn returns -1, the
# caller drops it mac_stolen). Learned entries are also linked, per port, in a doubly
# linked list oldest first (MacEntry.prev/next hold slot + 1; MacPort.head/tail); the
# backward shift of mac_delete re-points the neighbours of every entry it moves. A full
# table evicts the oldest learned entry of the port holding the most (D43), found in
# O(max_ports); a per-port token bucket limits new MACs per second (D44).

# mac_key() (parse.pxi: the parser computes both keys of every frame) packs a key.

cdef inline uint64_t mac_home(Core *c, uint64_t key) noexcept nogil:
    return (key * <uint64_t>0x9E3779B97F4A7C15ULL) >> c.mac_shift

cdef inline bint mac_aged(Core *c, MacEntry *e, uint64_t now) noexcept nogil:
    return not e.static and now > e.last_seen_ns and now - e.last_seen_ns > c.mac_aging_ns

cdef inline void lrn_link(Core *c, uint64_t i) noexcept nogil:
    # appends learned slot i to its port's list (newest)
    cdef MacEntry *e = &c.mac[i]
    cdef MacPort *mp = &c.mac_ports[e.port]
    e.prev = mp.tail
    e.next = 0
    if mp.tail:
        c.mac[mp.tail - 1].next = <uint32_t>(i + 1)
    else:
        mp.head = <uint32_t>(i + 1)
    mp.tail = <uint32_t>(i + 1)
    mp.n += 1

cdef inline void lrn_unlink(Core *c, uint64_t i) noexcept nogil:
    cdef MacEntry *e = &c.mac[i]
    cdef MacPort *mp = &c.mac_ports[e.port]
    if e.prev:
        c.mac[e.prev - 1].next = e.next
    else:
        mp.head = e.next
    if e.next:
        c.mac[e.next - 1].prev = e.prev
    else:
        mp.tail = e.prev
    e.prev = 0
    e.next = 0
    mp.n -= 1

cdef inline void lrn_moved(Core *c, uint64_t i) noexcept nogil:
    # the learned entry now at slot i came from another slot: re-point its neighbours
    cdef MacEntry *e = &c.mac[i]
    cdef MacPort *mp = &c.mac_ports[e.port]
    if e.prev:
        c.mac[e.prev - 1].next = <uint32_t>(i + 1)
    else:
        mp.head = <uint32_t>(i + 1)
    if e.next:
        c.mac[e.next - 1].prev = <uint32_t>(i + 1)
    else:
        mp.tail = <uint32_t>(i + 1)

cdef inline int64_t mac_find(Core *c, uint64_t key) noexcept nogil:
    # slot index of key, or -1
    cdef uint64_t i = mac_home(c, key)
    cdef uint64_t k
    while True:
        k = c.mac[i].key
        if k == key:
            return <int64_t>i
        if k == 0:
            return -1
        i = (i + 1) & c.mac_mask

cdef void mac_delete(Core *c, uint64_t i) noexcept nogil:
    # empties slot i and shifts the rest of its cluster back
    cdef uint64_t j = i, h
    cdef uint64_t mask = c.mac_mask
    if not c.mac[i].static:
        lrn_unlink(c, i)
    while True:
        j = (j + 1) & mask
        if c.mac[j].key == 0:
            break
        h = mac_home(c, c.mac[j].key)
        # the entry at j may move to i unless its home lies cyclically in (i, j]
        if ((j - h) & mask) >= ((j - i) & mask):
            c.mac[i] = c.mac[j]
            if not c.mac[i].static:
                lrn_moved(c, i)
            i = j
    memset(&c.mac[i], 0, sizeof(MacEntry))
    c.mac_count -= 1

cdef inline int mac_lookup(Core *c, uint64_t key, uint64_t now) noexcept nogil:
    # port of key, or -1 when unknown (an aged entry is deleted and unknown)
    cdef int64_t i = mac_find(c, key)
    if i < 0:
        return -1
    if mac_aged(c, &c.mac[i], now):
        mac_delete(c, <uint64_t>i)
        return -1
    return c.mac[i].port

cdef uint64_t mac_sweep_c(Core *c, uint64_t now) noexcept nogil:
    # deletes every aged entry; returns the count
    cdef uint64_t i = 0, n = 0
    while i <= c.mac_mask:
        if c.mac[i].key != 0 and mac_aged(c, &c.mac[i], now):
            mac_delete(c, i)
            n += 1
            continue            # slot i now holds a shifted entry (or nothing): look again
        i += 1
    return n

cdef uint64_t mac_remove_port(Core *c, uint16_t port) noexcept nogil:
    # deletes every entry learnt on port; returns the count
    cdef uint64_t i = 0, n = 0
    while i <= c.mac_mask:
        if c.mac[i].key != 0 and c.mac[i].port == port:
            mac_delete(c, i)
            n += 1
            continue
        i += 1
    return n

cdef bint mac_evict(Core *c, int learner) noexcept nogil:
    # D43: deletes the oldest learned entry of the port holding the most learned entries
    # (learner if it is one of them, else the lowest such id); 0 when none is learned
    cdef uint32_t p, most = 0, victim = 0
    for p in range(c.max_ports):
        if c.mac_ports[p].n > most:
            most = c.mac_ports[p].n
            victim = p
    if most == 0:
        return 0
    if learner >= 0 and c.mac_ports[learner].n == most:
        victim = <uint32_t>learner
    mac_delete(c, c.mac_ports[victim].head - 1)
    c.gc[GC_MAC_EVICTED] += 1
    return 1

cdef inline bint mac_learn_token(Core *c, uint16_t port, uint64_t now) noexcept nogil:
    # D44: one token of the port's new-MAC bucket; 0 when empty
    cdef MacPort *mp = &c.mac_ports[port]
    cdef u128 t
    cdef uint64_t cap
    if c.mac_learn_rate == 0:
        return 1
    cap = c.mac_learn_burst * <uint64_t>C_SEC_NS
    if mp.has_last:
        t = <u128>mp.tokens + <u128>(now - mp.last_ns) * c.mac_learn_rate
        mp.tokens = cap if t > cap else <uint64_t>t
    mp.has_last = 1
    mp.last_ns = now
    if mp.tokens < C_SEC_NS:
        return 0
    mp.tokens -= C_SEC_NS
    return 1

cdef inline int64_t mac_insert(Core *c, uint64_t key, uint16_t port, uint64_t now) noexcept nogil:
    # puts a new key (below capacity) in its slot; returns the slot
    cdef uint64_t j = mac_home(c, key)
    while c.mac[j].key != 0:
        j = (j + 1) & c.mac_mask
    memset(&c.mac[j], 0, sizeof(MacEntry))
    c.mac[j].key = key
    c.mac[j].last_seen_ns = now
    c.mac[j].port = port
    c.mac_count += 1
    return <int64_t>j

cdef inline int mac_learn(Core *c, uint64_t key, uint16_t port, uint64_t now) noexcept nogil:
    # 0, or -1 when key is another port's static entry (the caller drops: mac_stolen)
    cdef int64_t i = mac_find(c, key)
    cdef MacEntry *e
    if i >= 0:
        e = &c.mac[i]
        if e.static:
            return 0 if e.port == port else -1
        if not mac_aged(c, e, now):
            if e.port != port:
                lrn_unlink(c, <uint64_t>i)      # a move is a new learn on port (D43)
                e.port = port
                lrn_link(c, <uint64_t>i)
                c.gc[GC_MAC_MOVES] += 1
            e.last_seen_ns = now
            return 0
        mac_delete(c, <uint64_t>i)
    return mac_learn_new(c, key, port, now)

cdef int mac_learn_new(Core *c, uint64_t key, uint16_t port, uint64_t now) noexcept nogil:
    # mac_learn of a key the table does not hold (or held aged): D44's token, the capacity
    # (sweep, D43 eviction), the insert; 0. Not inline: it keeps mac_learn's hit path small
    if not mac_learn_token(c, port, now):
        c.gc[GC_MAC_LEARN_LIMITED] += 1
        return 0
    if c.mac_count >= c.mac_table_size:
        if not c.mac_swept or now - c.mac_sweep_ns >= C_SWEEP_INTERVAL_NS:
            c.mac_swept = 1
            c.mac_sweep_ns = now
            mac_sweep_c(c, now)
        if c.mac_count >= c.mac_table_size and not mac_evict(c, port):
            c.gc[GC_MAC_TABLE_FULL] += 1
            return 0
    lrn_link(c, <uint64_t>mac_insert(c, key, port, now))
    c.gc[GC_MAC_LEARNED] += 1
    return 0
