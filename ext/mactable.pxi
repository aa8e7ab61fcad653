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

# mac_key() (parse.pxi: the parser computes both keys of every frame) packs a key.

cdef inline uint64_t mac_home(Core *c, uint64_t key) noexcept nogil:
    return (key * <uint64_t>0x9E3779B97F4A7C15ULL) >> c.mac_shift

cdef inline bint mac_aged(Core *c, MacEntry *e, uint64_t now) noexcept nogil:
    return now > e.last_seen_ns and now - e.last_seen_ns > c.mac_aging_ns

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

cdef inline void mac_delete(Core *c, uint64_t i) noexcept nogil:
    # empties slot i and shifts the rest of its cluster back
    cdef uint64_t j = i, h
    cdef uint64_t mask = c.mac_mask
    while True:
        j = (j + 1) & mask
        if c.mac[j].key == 0:
            break
        h = mac_home(c, c.mac[j].key)
        # the entry at j may move to i unless its home lies cyclically in (i, j]
        if ((j - h) & mask) >= ((j - i) & mask):
            c.mac[i] = c.mac[j]
            i = j
    c.mac[i].key = 0
    c.mac[i].last_seen_ns = 0
    c.mac[i].port = 0
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

cdef inline void mac_learn(Core *c, uint64_t key, uint16_t port, uint64_t now) noexcept nogil:
    cdef int64_t i = mac_find(c, key)
    cdef MacEntry *e
    cdef uint64_t j
    if i >= 0:
        e = &c.mac[i]
        if not mac_aged(c, e, now):
            if e.port != port:
                e.port = port
                c.gc[GC_MAC_MOVES] += 1
            e.last_seen_ns = now
            return
        mac_delete(c, <uint64_t>i)
    if c.mac_count >= c.mac_table_size:
        if not c.mac_swept or now - c.mac_sweep_ns >= C_SWEEP_INTERVAL_NS:
            c.mac_swept = 1
            c.mac_sweep_ns = now
            mac_sweep_c(c, now)
        if c.mac_count >= c.mac_table_size:
            c.gc[GC_MAC_TABLE_FULL] += 1
            return
    j = mac_home(c, key)
    while c.mac[j].key != 0:
        j = (j + 1) & c.mac_mask
    c.mac[j].key = key
    c.mac[j].last_seen_ns = now
    c.mac[j].port = port
    c.mac_count += 1
    c.gc[GC_MAC_LEARNED] += 1
