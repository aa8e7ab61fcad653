# Parsing (the pipeline's "parse" stage) and checksum patching.
#
# parse_frame() fills a Pkt from a frame and returns 0, or -1 for a malformed frame. The
# rule (docs/datapath.md, "Parse"): a frame is malformed when it is shorter than 14
# bytes, or its ethertype says ARP / IPv4 / IPv6 (after at most one 802.1Q tag) and the
# headers are truncated or inconsistent; other ethertypes, IPv4 non-first fragments and
# IPv6 packets whose extension-header chain cannot be followed are switched at L2 only.
# Nothing is ever read at or beyond p[len], nor beyond the IP total / payload length
# for the L4 header.
#
# Checksums are patched, never recomputed (RFC 1624, HC' = ~(~HC + ~m + m')): csum_fold
# sums 16-bit one's complement terms; for a frame whose virtio-net header says
# NEEDS_CSUM the L4 field holds the uncomplemented pseudo-header sum, so address changes
# are added without complement and port changes leave it alone.

cdef inline uint64_t mac_key(uint16_t vlan, const uint8_t *mac) noexcept nogil:
    # the MAC table's key (mactable.pxi): top bit set, VLAN id, the 48-bit MAC
    return (<uint64_t>1 << 63) | (<uint64_t>vlan << 48) | mac48(mac)

cdef inline int parse_frame(Pkt *k, uint8_t *p, uint32_t length) noexcept nogil:
    # the Ethernet header (at most one 802.1Q tag), then ARP, IPv4 or IPv6; 0 or -1
    cdef uint32_t l3, avail
    cdef uint16_t et
    k.p = p
    k.len = length
    k.vlan = 0
    k.kind = K_L2
    k.has_l4 = 0
    k.nat_ok = 0
    k.icmp_ok = 0
    k.frag = FRAG_NONE
    k.l4_proto = 0
    k.ct_ready = 0
    k.l4_off = 0
    k.l3_end = length
    if length < 14:
        return -1
    if length > C_MAX_FRAME:
        return -1
    et = load_be16(p + 12)
    l3 = 14
    if et == 0x8100:
        if length < 18:
            return -1
        k.vlan = load_be16(p + 14) & 0x0fff
        et = load_be16(p + 16)
        l3 = 18
    k.l3_off = l3
    k.src_key = mac_key(k.vlan, p + 6)
    k.dst_key = mac_key(k.vlan, p)
    avail = length - l3
    if et == 0x0806:
        if avail < 28:
            return -1
        if load_be16(p + l3) != 1 or load_be16(p + l3 + 2) != 0x0800 or p[l3 + 4] != 6 or p[l3 + 5] != 4:
            return -1
        k.kind = K_ARP
        return 0
    if et == 0x0800:
        return parse_ipv4(k, p, l3, avail)
    if et == 0x86dd:
        return parse_ipv6(k, p, l3, avail)
    return 0


cdef inline int parse_ipv4(Pkt *k, uint8_t *p, uint32_t l3, uint32_t avail) noexcept nogil:
    # the IPv4 header at l3 (avail bytes left in the frame) and its L4 header; 0 or -1
    cdef uint32_t ihl, tot
    cdef uint16_t frag
    cdef uint8_t b0
    if avail < 20:
        return -1
    b0 = p[l3]
    if (b0 >> 4) != 4:
        return -1
    ihl = (b0 & 15) * 4
    if ihl < 20:
        return -1
    tot = load_be16(p + l3 + 2)
    if tot < ihl or tot > avail:
        return -1
    k.kind = K_IPV4
    k.l3_end = l3 + tot
    frag = load_be16(p + l3 + 6)
    if frag & 0x3fff:                 # a fragment (the fragment key is read only then)
        k.frag_id = load_be16(p + l3 + 4)
        k.frag_proto = p[l3 + 9]
        if (frag & 0x1fff) != 0:
            k.frag = FRAG_LATER
            return 0                  # non-first fragment: no L4
        k.frag = FRAG_FIRST
    k.l4_proto = p[l3 + 9]
    k.l4_off = l3 + ihl
    if parse_l4(k, 4, (frag & 0x2000) != 0) < 0:
        return -1
    if k.has_l4:
        if k.l4_proto == 6 or k.l4_proto == 17:
            k.nat_ok = 1              # first fragments too (D39)
        elif k.l4_proto == 1 and k.frag == FRAG_NONE:
            k.icmp_ok = 1
    return 0


cdef inline int parse_ipv6(Pkt *k, uint8_t *p, uint32_t l3, uint32_t avail) noexcept nogil:
    # the IPv6 header at l3, its extension headers (D10) and its L4 header; 0 or -1
    cdef uint32_t plen, off, l4avail, hlen
    cdef uint8_t nh
    cdef int next_count = 0
    cdef bint is_frag = 0
    if avail < 40:
        return -1
    if (p[l3] >> 4) != 6:
        return -1
    plen = load_be16(p + l3 + 4)
    if plen > avail - 40:
        return -1
    k.kind = K_IPV6
    k.l3_end = l3 + 40 + plen
    nh = p[l3 + 6]
    off = l3 + 40
    while nh == 0 or nh == 43 or nh == 60 or nh == 44 or nh == 51:
        if next_count == C_MAX_IPV6_EXT_HEADERS:
            return 0                  # too many extension headers: L2 only
        next_count += 1
        l4avail = k.l3_end - off
        if nh == 44:
            if l4avail < 8:
                return -1
            k.frag_id = load_be32(p + off + 4)
            k.frag_proto = p[off]
            if (load_be16(p + off + 2) & 0xfff8) != 0:
                k.frag = FRAG_LATER
                return 0              # non-first fragment: no L4
            k.frag = FRAG_FIRST if (load_be16(p + off + 2) & 1) else FRAG_ATOMIC
            is_frag = 1
            hlen = 8
        else:
            if l4avail < 2:
                return -1
            if nh == 51:
                hlen = (<uint32_t>p[off + 1] + 2) * 4
            else:
                hlen = (<uint32_t>p[off + 1] + 1) * 8
            if l4avail < hlen:
                return -1
        nh = p[off]
        off += hlen
    k.l4_proto = nh
    k.l4_off = off
    if nh != 6 and nh != 17 and nh != 58:
        return 0                      # unknown next header: L2 only
    if parse_l4(k, 6, is_frag) < 0:
        return -1
    if k.has_l4:
        if nh == 6 or nh == 17:
            k.nat_ok = 1              # first and atomic fragments too (D39)
        elif nh == 58 and not is_frag:
            k.icmp_ok = 1
    return 0


cdef inline int parse_l4(Pkt *k, int family, bint frag) noexcept nogil:
    # checks the L4 header at k.l4_off against the bytes up to k.l3_end; sets has_l4.
    # frag: a first fragment, whose UDP length counts the whole datagram (D38)
    cdef uint32_t avail = k.l3_end - k.l4_off
    cdef uint8_t *q = k.p + k.l4_off
    cdef uint32_t doff, ulen
    if k.l4_off > k.l3_end:
        return -1
    if k.l4_proto == 6:
        if avail < 20:
            return -1
        doff = (q[12] >> 4) * 4
        if doff < 20 or doff > avail:
            return -1
        k.has_l4 = 1
    elif k.l4_proto == 17:
        if avail < 8:
            return -1
        ulen = load_be16(q + 4)
        if ulen < 8 or (ulen > avail and not frag):
            return -1
        k.has_l4 = 1
    elif (family == 4 and k.l4_proto == 1) or (family == 6 and k.l4_proto == 58):
        if avail < 4:
            return -1
        k.has_l4 = 1
    return 0


# ---------------------------------------------------------------- checksums

cdef inline uint16_t csum_fold(uint32_t acc) noexcept nogil:
    acc = (acc & 0xffff) + (acc >> 16)
    acc = (acc & 0xffff) + (acc >> 16)
    return <uint16_t>acc
