# Token-bucket shapers with bounded queues (pipeline stages 3 and 6, and drain()).
#
# Credit is exact integer arithmetic in bit*ns (bits x 10^9) in an unsigned __int128:
# rate_bps < 2^63 times an elapsed time < 2^64 ns is < 2^127, and the cap
# max(burst_bits * 10^9, head cost) < 2^93, so nothing overflows. A packet of L bytes
# costs L * 8 * 10^9. Refill at t: credit = min(cap, credit + (t - last_ns) * rate_bps),
# where cap is burst_bits * 10^9, raised to the head packet's cost while the queue holds
# a packet bigger than the burst (so an oversized packet leaves after (L*8 - burst)/rate
# more seconds instead of stalling).
#
# A packet passes at once when the queue is empty and the credit covers it; otherwise
# it is copied (virtio-net header included) into the shaper's FIFO if the queued frame
# bytes stay within queue_limit_bytes, else dropped (queue_full). The FIFO is one
# growable byte buffer of records [QRec][vnet header][frame] padded to 8 bytes; it only
# grows up to about queue_limit_bytes plus the record headers, and compacts by moving
# the live records to the front when the tail reaches the end.
#
# The head leaves at t_dep = last_ns + max(0, ceil((cost - credit) / rate_bps)), which
# next_departure_ns() reports; drain() refills at each released head's own t_dep (not at
# its now_ns), so a late drain releases what was due instead of losing credit above the
# cap (twin's D15, D16).

cdef u128 NS_PER_S = 1000000000

cdef inline u128 pkt_cost(uint32_t length) noexcept nogil:
    return <u128>length * 8 * NS_PER_S

cdef inline QRec *q_head(Shaper *s) noexcept nogil:
    return <QRec *>(s.qbuf + s.qhead)

cdef inline void shaper_refill(Shaper *s, uint64_t now) noexcept nogil:
    cdef u128 cap, credit
    if not s.has_last:
        s.has_last = 1
        s.last_ns = now
        return
    cap = <u128>s.burst_bits * NS_PER_S
    if s.queue_packets > 0 and pkt_cost(q_head(s).len) > cap:
        cap = pkt_cost(q_head(s).len)
    credit = s.credit + <u128>(now - s.last_ns) * s.rate_bps     # now >= last_ns always
    s.credit = cap if credit > cap else credit
    s.last_ns = now

cdef inline uint64_t shaper_t_dep(Shaper *s) noexcept nogil:
    # departure time of the head packet (the queue must not be empty)
    cdef u128 cost = pkt_cost(q_head(s).len)
    cdef u128 need
    if s.credit >= cost:
        return s.last_ns
    need = cost - s.credit
    return s.last_ns + <uint64_t>((need + s.rate_bps - 1) / s.rate_bps)

cdef int q_push(Shaper *s, const uint8_t *vnet_and_frame, uint32_t hlen, uint32_t length,
                uint16_t in_port, int32_t out_port, uint64_t seq) noexcept nogil:
    # copies header + frame to the FIFO tail; 0, or -1 when memory runs out
    cdef uint64_t reclen = (sizeof(QRec) + hlen + length + 7) & ~(<uint64_t>7)
    cdef uint64_t live = s.qtail - s.qhead
    cdef uint64_t newcap
    cdef uint8_t *nb
    cdef QRec *r
    if s.qtail + reclen > s.qcap:
        if live + reclen <= s.qcap and s.qhead >= s.qcap // 2:
            memmove(s.qbuf, s.qbuf + s.qhead, live)
        else:
            newcap = s.qcap * 2
            if newcap < live + reclen:
                newcap = live + reclen
            if newcap < 4096:
                newcap = 4096
            nb = <uint8_t *>malloc(newcap)
            if nb == NULL:
                return -1
            if live:
                memcpy(nb, s.qbuf + s.qhead, live)
            free(s.qbuf)
            s.qbuf = nb
            s.qcap = newcap
        s.qhead = 0
        s.qtail = live
    r = <QRec *>(s.qbuf + s.qtail)
    r.len = length
    r.in_port = in_port
    r.pad = 0
    r.out_port = out_port
    r.reclen = <uint32_t>reclen
    r.seq = seq
    memcpy(s.qbuf + s.qtail + sizeof(QRec), vnet_and_frame, hlen + length)
    s.qtail += reclen
    s.queue_bytes += length
    s.queue_packets += 1
    return 0

cdef inline void q_pop(Shaper *s) noexcept nogil:
    cdef QRec *r = q_head(s)
    s.queue_bytes -= r.len
    s.queue_packets -= 1
    s.qhead += r.reclen
    if s.qhead == s.qtail:
        s.qhead = 0
        s.qtail = 0

cdef inline void q_clear(Shaper *s) noexcept nogil:
    s.queue_bytes = 0
    s.queue_packets = 0
    s.qhead = 0
    s.qtail = 0

cdef enum:
    SH_PASS = 0
    SH_QUEUED = 1
    SH_FULL = 2

cdef inline int shaper_admit(Shaper *s, Pkt *k, uint32_t hlen, int32_t out_port, uint64_t now,
                             uint64_t seq) noexcept nogil:
    # refill, then pass / queue (copy) / refuse one packet
    cdef u128 cost = pkt_cost(k.len)
    shaper_refill(s, now)
    if s.queue_packets == 0 and s.credit >= cost:
        s.credit -= cost
        return SH_PASS
    if s.queue_bytes + k.len <= s.queue_limit_bytes:
        if q_push(s, k.p - hlen, hlen, k.len, k.in_port, out_port, seq) == 0:
            return SH_QUEUED
    return SH_FULL
