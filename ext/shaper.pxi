# Token-bucket shapers with bounded queues (the pipeline's "egress_shaper" and "ingress_shaper" stages, and drain()).
#
# Credit is exact integer arithmetic in bit*ns (bits x 10^9) in an unsigned __int128:
# rate_bps < 2^63 times an elapsed time < 2^64 ns is < 2^127, and the cap
# max(burst_bits * 10^9, head cost) < 2^93, so nothing overflows. A packet costs
# C * 8 * 10^9 where C is its charged length (twin's D36): the frame length L, or for a
# GSO frame (virtio-net gso_type TCPV4/TCPV6/UDP/UDP_L4 with a gso_size, L4 parsed) the
# bytes its segments take on the wire, L + (segs - 1) * hdr_len with
# segs = ceil((L - hdr_len) / gso_size), capped at 2 * L -- Linux's qdisc_pkt_len_init.
# Refill at t: credit = min(cap, credit + (t - last_ns) * rate_bps), where cap is
# burst_bits * 10^9, raised to the head packet's cost while the queue holds a packet
# costlier than the burst (so an oversized packet leaves after (C*8 - burst)/rate more
# seconds instead of stalling).
#
# A packet passes at once when the queue is empty and the credit covers it; otherwise
# it is copied (virtio-net header included) into the shaper's FIFO if the queued frame
# bytes (L, not C) stay within queue_limit_bytes, else dropped (queue_full). The FIFO is
# one growable byte buffer of records [QRec][charged length, 8 bytes][vnet header][frame]
# padded to 8 bytes (the charged length sits after QRec because QRec, in defs.pxi, has no
# field for it; q_charged / q_data read it); it only grows up to about queue_limit_bytes
# plus the record headers, and compacts by moving the live records to the front when the
# tail reaches the end.
#
# The head leaves at t_dep = last_ns + max(0, ceil((cost - credit) / rate_bps)), which
# next_departure_ns() reports; drain() refills at each released head's own t_dep (not at
# its now_ns), so a late drain releases what was due instead of losing credit above the
# cap (twin's D15, D16).

cdef u128 NS_PER_S = 1000000000

cdef enum:
    # virtio-net header gso_type values (linux/virtio_net.h)
    VIRTIO_GSO_TCPV4 = 1
    VIRTIO_GSO_UDP = 3
    VIRTIO_GSO_TCPV6 = 4
    VIRTIO_GSO_UDP_L4 = 5
    VIRTIO_GSO_ECN = 0x80
    QREC_CHARGED_BYTES = 8        # the charged length after each QRec (a uint32 + padding)

cdef inline u128 pkt_cost(uint32_t length) noexcept nogil:
    # length: the charged length C
    return <u128>length * 8 * NS_PER_S

cdef inline uint32_t charged_len(const Pkt *k) noexcept nogil:
    # twin's D36: the frame length, or the wire bytes of a GSO frame's segments (capped at
    # 2 * len); k.vnet is NULL when vnet_hdr_len is 0
    cdef uint32_t gso_type, gso_size, hdr_len, payload, segs
    cdef uint64_t wire
    if k.vnet == NULL or not k.has_l4:
        return k.len
    gso_type = k.vnet[1] & ~(<uint32_t>VIRTIO_GSO_ECN) & 0xff
    gso_size = k.vnet[4] | (<uint32_t>k.vnet[5] << 8)
    if gso_size == 0:
        return k.len
    if (gso_type == VIRTIO_GSO_TCPV4 or gso_type == VIRTIO_GSO_TCPV6) and k.l4_proto == 6:
        hdr_len = k.l4_off + (k.p[k.l4_off + 12] >> 4) * 4
    elif gso_type == VIRTIO_GSO_UDP_L4 and k.l4_proto == 17:
        hdr_len = k.l4_off + 8
    elif gso_type == VIRTIO_GSO_UDP and k.l4_proto == 17:
        hdr_len = k.l4_off            # IP fragments: the UDP header only in the first
    else:
        return k.len
    if hdr_len >= k.len:
        return k.len
    payload = k.len - hdr_len
    segs = (payload + gso_size - 1) / gso_size
    wire = <uint64_t>k.len + <uint64_t>(segs - 1) * hdr_len
    if wire > 2 * <uint64_t>k.len:
        wire = 2 * <uint64_t>k.len
    return <uint32_t>wire

cdef inline QRec *q_head(Shaper *s) noexcept nogil:
    return <QRec *>(s.qbuf + s.qhead)

cdef inline uint32_t q_charged(QRec *r) noexcept nogil:
    return (<uint32_t *>((<uint8_t *>r) + sizeof(QRec)))[0]

cdef inline uint8_t *q_data(QRec *r) noexcept nogil:
    # the record's vnet header (then its frame)
    return (<uint8_t *>r) + sizeof(QRec) + QREC_CHARGED_BYTES

cdef inline void shaper_refill(Shaper *s, uint64_t now) noexcept nogil:
    cdef u128 cap, credit
    if not s.has_last:
        s.has_last = 1
        s.last_ns = now
        return
    cap = <u128>s.burst_bits * NS_PER_S
    if s.queue_packets > 0 and pkt_cost(q_charged(q_head(s))) > cap:
        cap = pkt_cost(q_charged(q_head(s)))
    credit = s.credit + <u128>(now - s.last_ns) * s.rate_bps     # now >= last_ns always
    s.credit = cap if credit > cap else credit
    s.last_ns = now

cdef inline uint64_t shaper_t_dep(Shaper *s) noexcept nogil:
    # departure time of the head packet (the queue must not be empty)
    cdef u128 cost = pkt_cost(q_charged(q_head(s)))
    cdef u128 need
    if s.credit >= cost:
        return s.last_ns
    need = cost - s.credit
    return s.last_ns + <uint64_t>((need + s.rate_bps - 1) / s.rate_bps)

cdef int q_push(Shaper *s, const uint8_t *vnet_and_frame, uint32_t hlen, uint32_t length,
                uint32_t charged, uint16_t in_port, int32_t out_port, uint64_t seq) noexcept nogil:
    # copies header + frame to the FIFO tail; 0, or -1 when memory runs out
    cdef uint64_t reclen = (sizeof(QRec) + QREC_CHARGED_BYTES + hlen + length + 7) & ~(<uint64_t>7)
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
    (<uint32_t *>(s.qbuf + s.qtail + sizeof(QRec)))[0] = charged
    (<uint32_t *>(s.qbuf + s.qtail + sizeof(QRec)))[1] = 0
    memcpy(q_data(r), vnet_and_frame, hlen + length)
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

# shaper_admit's verdicts SH_PASS / SH_QUEUE / SH_FULL: consts.SHAPER_VERDICTS (consts.pxi)
cdef inline int shaper_admit(Shaper *s, Pkt *k, uint32_t hlen, int32_t out_port, uint64_t now,
                             uint64_t seq) noexcept nogil:
    # refill, then pass / queue (copy) / refuse one packet
    cdef uint32_t charged = charged_len(k)
    cdef u128 cost = pkt_cost(charged)
    shaper_refill(s, now)
    if s.queue_packets == 0 and s.credit >= cost:
        s.credit -= cost
        return SH_PASS
    if s.queue_bytes + k.len <= s.queue_limit_bytes:
        if q_push(s, k.p - hlen, hlen, k.len, charged, k.in_port, out_port, seq) == 0:
            return SH_QUEUE
    return SH_FULL
