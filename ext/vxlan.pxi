# VXLAN (RFC 7348): the pipeline's "vxlan" stage, after NAT and before L2
# (docs/datapath.md "VXLAN"; the twin's Datapath._vxlan is the executable spec).
#
# Tables, all C arrays sized at construction, used without the GIL:
# - peers: Peer[max_peers]; peer_slots indexes them by VTEP IPv4 (decap's "is the outer
#   source a peer");
# - the longest-prefix match: cidr_slots, one open-addressing hash keyed by (family,
#   prefix length, masked prefix) over every CIDR of every peer; plens[family] lists the
#   prefix lengths present, longest first (plen_count keeps how many CIDRs use each). A
#   lookup masks the address once per present length and probes: the cost follows the
#   number of distinct prefix lengths (typically 1-2 per family), never the number of peers;
# - podip_slots: (family, address) -> the lowest pod port with that address bound
#   (bind_port ips), rebuilt whole by bind_port/remove_port (control plane).
# Every index uses linear probing with the full 32-bit hash kept in the slot and
# backward-shift deletion (as conntrack.pxi's), so it never fills with tombstones.
#
# vxlan_stage() returns VX_NONE (not VXLAN: L2 as before), VX_OUT (the frame was
# encapsulated or decapsulated: *k now describes the new frame, *out its port, and
# c.vx_moved / vx_out_p / vx_out_len tell the batch loop its new offset and length) or a
# drop reason (counted on the in port by the caller).

cdef enum:
    VX_NONE = -1
    VX_OUT = -2

cdef inline uint32_t vx_hash(const uint8_t *a16, uint32_t tag) noexcept nogil:
    cdef uint64_t h = load_u64(a16) * 0x9E3779B97F4A7C15ULL
    h ^= load_u64(a16 + 8) * 0xC2B2AE3D27D4EB4FULL
    h ^= (<uint64_t>tag + 1) * 0x165667B19E3779F9ULL
    h ^= h >> 29
    h *= 0xBF58476D1CE4E5B9ULL
    h ^= h >> 32
    return <uint32_t>h

cdef inline void vx_addr16(uint8_t *out, const uint8_t *a, bint v4) noexcept nogil:
    # a (4 or 16 bytes) as 16 bytes, IPv4 as ::ffff:a.b.c.d
    if v4:
        memset(out, 0, 10)
        out[10] = 0xff
        out[11] = 0xff
        memcpy(out + 12, a, 4)
    else:
        memcpy(out, a, 16)

cdef inline void vx_mask16(uint8_t *out, const uint8_t *a16, uint32_t nbits) noexcept nogil:
    # the first nbits bits of a16 (16 bytes), the rest zero
    cdef uint32_t full = nbits >> 3, rem = nbits & 7
    memcpy(out, a16, 16)
    if full < 16:
        out[full] &= <uint8_t>(0xff << (8 - rem))
        if full + 1 < 16:
            memset(out + full + 1, 0, 15 - full)

cdef inline void vx_slot_insert(VxSlot *s, uint64_t mask, uint32_t h, uint32_t ref) noexcept nogil:
    cdef uint64_t i = h & mask
    while s[i].ref != 0:
        i = (i + 1) & mask
    s[i].ref = ref
    s[i].hash = h

cdef inline void vx_slot_remove(VxSlot *s, uint64_t mask, uint32_t h, uint32_t ref) noexcept nogil:
    cdef uint64_t i = h & mask
    cdef uint64_t j, home
    while s[i].ref != ref:
        i = (i + 1) & mask
    j = i
    while True:
        j = (j + 1) & mask
        if s[j].ref == 0:
            break
        home = s[j].hash & mask
        if ((j - home) & mask) >= ((j - i) & mask):
            s[i] = s[j]
            i = j
    s[i].ref = 0
    s[i].hash = 0

# ---------------------------------------------------------------- the peer and CIDR indexes

cdef inline uint32_t vx_peer_hash(const uint8_t *ip4) noexcept nogil:
    cdef uint8_t a[16]
    vx_addr16(a, ip4, 1)
    return vx_hash(a, 0x10000)

cdef inline int32_t vx_peer_find(Core *c, const uint8_t *ip4) noexcept nogil:
    # the index of the peer with VTEP address ip4 (4 bytes), or -1
    cdef uint32_t h = vx_peer_hash(ip4)
    cdef uint64_t i = h & c.peer_mask
    cdef VxSlot *s
    while True:
        s = &c.peer_slots[i]
        if s.ref == 0:
            return -1
        if s.hash == h and memcmp(c.peers[s.ref - 1].ip, ip4, 4) == 0:
            return s.ref - 1
        i = (i + 1) & c.peer_mask

cdef inline uint32_t vx_cidr_hash(uint8_t family, uint8_t plen, const uint8_t *a16) noexcept nogil:
    return vx_hash(a16, (<uint32_t>family << 8) | plen)

cdef inline uint32_t vx_cidr_find(Core *c, uint8_t family, uint8_t plen, const uint8_t *a16,
                                  uint32_t h) noexcept nogil:
    # the slot ref (peer * 8 + cidr + 1) of CIDR (family, plen, a16), or 0
    cdef uint64_t i = h & c.cidr_mask
    cdef VxSlot *s
    cdef Peer *pe
    cdef uint32_t r
    while True:
        s = &c.cidr_slots[i]
        if s.ref == 0:
            return 0
        if s.hash == h:
            r = s.ref - 1
            pe = &c.peers[r >> 3]
            if (pe.cidr_family[r & 7] == family and pe.cidr_plen[r & 7] == plen
                    and memcmp(pe.cidr_addr[r & 7], a16, 16) == 0):
                return s.ref
        i = (i + 1) & c.cidr_mask

cdef void vx_rebuild_plens(Core *c) noexcept nogil:
    cdef int f, n
    cdef int plen
    for f in range(2):
        n = 0
        for plen in range(128, -1, -1):
            if c.plen_count[f][plen]:
                c.plens[f][n] = <uint8_t>plen
                n += 1
        c.n_plens[f] = n

cdef void vx_cidrs_index(Core *c, uint32_t pi, bint add) noexcept nogil:
    # inserts (add) or removes peer pi's CIDRs in the LPM index
    cdef Peer *pe = &c.peers[pi]
    cdef uint32_t j, h
    for j in range(pe.n_cidrs):
        h = vx_cidr_hash(pe.cidr_family[j], pe.cidr_plen[j], pe.cidr_addr[j])
        if add:
            vx_slot_insert(c.cidr_slots, c.cidr_mask, h, pi * 8 + j + 1)
            c.plen_count[0 if pe.cidr_family[j] == 4 else 1][pe.cidr_plen[j]] += 1
        else:
            vx_slot_remove(c.cidr_slots, c.cidr_mask, h, pi * 8 + j + 1)
            c.plen_count[0 if pe.cidr_family[j] == 4 else 1][pe.cidr_plen[j]] -= 1
    vx_rebuild_plens(c)

cdef inline int32_t vx_lpm(Core *c, bint v4, const uint8_t *addr) noexcept nogil:
    # the peer whose CIDR holds addr (4 or 16 bytes) with the longest prefix, or -1
    cdef uint8_t a16[16]
    cdef uint8_t m[16]
    cdef int f = 0 if v4 else 1
    cdef uint8_t family = 4 if v4 else 6
    cdef uint32_t t, ref, base = 96 if v4 else 0
    cdef uint8_t plen
    vx_addr16(a16, addr, v4)
    for t in range(c.n_plens[f]):
        plen = c.plens[f][t]
        vx_mask16(m, a16, base + plen)
        ref = vx_cidr_find(c, family, plen, m, vx_cidr_hash(family, plen, m))
        if ref:
            return (ref - 1) >> 3
    return -1

# ---------------------------------------------------------------- the pod address index

cdef inline uint32_t vx_podip_hash(bint v4, const uint8_t *a16) noexcept nogil:
    return vx_hash(a16, 0x20004 if v4 else 0x20006)

cdef inline void vx_podip_addr(Core *c, uint32_t ref, uint8_t *a16, bint *v4) noexcept nogil:
    # the address slot ref (port * 8 + j + 1) stands for: j < n_ip4 an IPv4, else an IPv6
    cdef PortState *ps = &c.ports[(ref - 1) >> 3]
    cdef uint32_t j = (ref - 1) & 7
    cdef uint8_t b4[4]
    if j < ps.n_ip4:
        b4[0] = <uint8_t>(ps.ip4[j] >> 24)
        b4[1] = <uint8_t>(ps.ip4[j] >> 16)
        b4[2] = <uint8_t>(ps.ip4[j] >> 8)
        b4[3] = <uint8_t>ps.ip4[j]
        vx_addr16(a16, b4, 1)
        v4[0] = 1
    else:
        memcpy(a16, ps.ip6[j - ps.n_ip4], 16)
        v4[0] = 0

cdef inline int32_t vx_podip_find(Core *c, bint v4, const uint8_t *addr) noexcept nogil:
    # the lowest pod port with addr (4 or 16 bytes) bound, or -1
    cdef uint8_t a16[16]
    cdef uint8_t b16[16]
    cdef bint bv4
    cdef uint32_t h
    cdef uint64_t i
    cdef VxSlot *s
    vx_addr16(a16, addr, v4)
    h = vx_podip_hash(v4, a16)
    i = h & c.podip_mask
    while True:
        s = &c.podip_slots[i]
        if s.ref == 0:
            return -1
        if s.hash == h:
            vx_podip_addr(c, s.ref, b16, &bv4)
            if bv4 == v4 and memcmp(a16, b16, 16) == 0:
                return (s.ref - 1) >> 3
        i = (i + 1) & c.podip_mask

cdef void vx_podip_rebuild(Core *c) noexcept nogil:
    # every bound address of every pod port, ports ascending: the first (lowest) port wins
    cdef uint32_t p, j
    cdef PortState *ps
    cdef uint8_t a16[16]
    cdef bint v4
    memset(c.podip_slots, 0, (c.podip_mask + 1) * sizeof(VxSlot))
    for p in range(c.max_ports):
        ps = &c.ports[p]
        if not ps.present or ps.kind != C_PORT_POD or not ps.ips_bound:
            continue
        for j in range(<uint32_t>ps.n_ip4 + ps.n_ip6):
            vx_podip_addr(c, p * 8 + j + 1, a16, &v4)
            if vx_podip_find(c, v4, a16 + (12 if v4 else 0)) < 0:
                vx_slot_insert(c.podip_slots, c.podip_mask, vx_podip_hash(v4, a16), p * 8 + j + 1)

# ---------------------------------------------------------------- the stage

cdef inline bint vx_ttl(uint8_t *l3, bint v4) noexcept nogil:
    # routing's TTL / hop limit step; False when expired. IPv4: the header checksum patched
    # over the TTL/protocol word (D26: HC' = ~fold(~HC + ~m + m'))
    cdef uint32_t ttl, old, new, acc
    if v4:
        ttl = l3[8]
        if ttl <= 1:
            return False
        old = (ttl << 8) | l3[9]
        new = ((ttl - 1) << 8) | l3[9]
        acc = (~load_be16(l3 + 10) & 0xffff) + (~old & 0xffff) + new
        store_be16(l3 + 10, ~csum_fold(acc) & 0xffff)
        l3[8] = <uint8_t>(ttl - 1)
    else:
        if l3[7] <= 1:
            return False
        l3[7] -= 1
    return True

cdef inline uint8_t vx_ip6_final_nh(const uint8_t *p, uint32_t l3) noexcept nogil:
    # the twin's _ip6_final_nh: the next header the extension-header chain ends with (D47)
    cdef uint8_t nh = p[l3 + 6]
    cdef uint32_t pos = l3 + 40, hlen
    cdef int n
    for n in range(C_MAX_IPV6_EXT_HEADERS):
        if not (nh == 0 or nh == 43 or nh == 60 or nh == 44 or nh == 51):
            return nh
        if nh == 44:
            if (load_be16(p + pos + 2) >> 3) != 0:
                return p[pos]
            hlen = 8
        elif nh == 51:
            hlen = (<uint32_t>p[pos + 1] + 2) * 4
        else:
            hlen = (<uint32_t>p[pos + 1] + 1) * 8
        nh = p[pos]
        pos += hlen
    return nh

cdef inline uint32_t vx_fnv(uint32_t h, const uint8_t *b, uint32_t n) noexcept nogil:
    cdef uint32_t i
    for i in range(n):
        h = (h ^ b[i]) * <uint32_t>0x01000193
    return h

cdef inline uint16_t le16(const uint8_t *p) noexcept nogil:
    return <uint16_t>(p[0] | (p[1] << 8))

cdef inline void store_le16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>v
    p[1] = <uint8_t>(v >> 8)

cdef inline bint vx_port_ok(Core *c, int32_t port) noexcept nogil:
    return c.ports[port].present and c.ports[port].up

cdef int vx_encap(Core *c, Pkt *k, Peer *pe, int32_t *out) noexcept nogil:
    cdef uint32_t H = c.vnet_hdr_len
    cdef uint8_t *p = k.p
    cdef uint32_t L = k.len
    cdef bint v4 = k.kind == K_IPV4
    cdef uint8_t *l3 = p + 14
    cdef uint32_t gso_type = 0, ip_len, h, total, ulen, acc, i
    cdef uint16_t sport
    cdef uint8_t proto
    cdef uint8_t hdr[12]
    cdef uint8_t *o
    if not vx_ttl(l3, v4):
        return DR_TTL_EXPIRED
    if not pe.has_underlay:
        pe.drop_unresolved += 1
        return DR_VXLAN_UNRESOLVED
    if H:
        gso_type = k.vnet[1]
    if gso_type and k.has_l4 and (k.l4_proto == 6 or k.l4_proto == 17):
        ip_len = le16(k.vnet + 4) + k.l4_off + ((p[k.l4_off + 12] >> 4) * 4 if k.l4_proto == 6 else 8) + 36
    else:
        ip_len = L + 36
    if ip_len > c.vtep_mtu:
        return DR_TOO_BIG
    if <uint64_t>(p - H - c.vx_base) < C_ENCAP_LEN:
        return DR_NO_HEADROOM
    # the flow hash: FNV-1a over src, dst, protocol and (TCP/UDP) the ports, after the TTL step
    if v4:
        h = vx_fnv(0x811C9DC5, l3 + 12, 8)
        proto = l3[9]
    else:
        h = vx_fnv(0x811C9DC5, l3 + 8, 32)
        proto = vx_ip6_final_nh(p, 14)
    h = vx_fnv(h, &proto, 1)
    if k.has_l4 and (k.l4_proto == 6 or k.l4_proto == 17):
        h = vx_fnv(h, p + k.l4_off, 4)
    h ^= h >> 16
    sport = <uint16_t>(49152 + (h & 0x3FFF))
    if H:
        memcpy(hdr, k.vnet, H)
    memcpy(p, pe.vtep_mac, 6)
    memcpy(p + 6, c.vtep_mac, 6)
    o = p - C_ENCAP_LEN
    total = L + 36
    ulen = L + 16
    memcpy(o, pe.underlay_mac, 6)
    memcpy(o + 6, c.vtep_outer_mac, 6)
    o[12] = 0x08
    o[13] = 0x00
    o[14] = 0x45
    o[15] = 0
    store_be16(o + 16, total if total <= 65535 else 0)
    store_be16(o + 18, 0)
    store_be16(o + 20, 0x4000)
    o[22] = 64
    o[23] = 17
    store_be16(o + 24, 0)
    memcpy(o + 26, c.vtep_ip, 4)
    memcpy(o + 30, pe.ip, 4)
    acc = 0
    for i in range(10):
        acc += load_be16(o + 14 + 2 * i)
    store_be16(o + 24, ~csum_fold(acc) & 0xffff)
    store_be16(o + 34, sport)
    store_be16(o + 36, c.vxlan_port)
    store_be16(o + 38, ulen if ulen <= 65535 else 0)
    store_be16(o + 40, 0)
    o[42] = 0x08
    o[43] = 0
    o[44] = 0
    o[45] = 0
    o[46] = <uint8_t>(c.vni >> 16)
    o[47] = <uint8_t>(c.vni >> 8)
    o[48] = <uint8_t>c.vni
    o[49] = 0
    if H:
        if hdr[0] & C_VNET_F_NEEDS_CSUM:
            store_le16(hdr + 6, le16(hdr + 6) + C_ENCAP_LEN)
        if le16(hdr + 2):
            store_le16(hdr + 2, le16(hdr + 2) + C_ENCAP_LEN)
        if hdr[1]:
            hdr[1] |= C_VNET_GSO_UDP_TUNNEL_IPV4
        memcpy(o - H, hdr, H)
    L += C_ENCAP_LEN
    c.gc[GC_VXLAN_ENCAP] += 1
    pe.tx_packets += 1
    pe.tx_bytes += L
    tr_add(c, TR_VXLAN_ENCAP, c.vni, sport)
    if not vx_port_ok(c, c.vtep_port):
        return DR_NO_ROUTE
    parse_frame(k, o, L)
    k.vnet = o - H if H else NULL
    out[0] = c.vtep_port
    return VX_OUT

cdef int vx_decap(Core *c, Pkt *k, int32_t *out) noexcept nogil:
    cdef uint32_t H = c.vnet_hdr_len
    cdef uint8_t *b = k.p
    cdef uint32_t l4 = k.l4_off, ulen, vni, d, ilen, g
    cdef uint32_t outer_len = k.len
    cdef uint16_t in_port = k.in_port
    cdef int32_t pi, port
    cdef bint v4
    cdef Pkt q
    cdef uint8_t *ip
    cdef uint8_t *dst
    cdef const uint8_t *new_dst = NULL
    cdef const uint8_t *new_src = NULL
    cdef uint8_t hdr[12]
    cdef Peer *pe
    if load_be16(b + 14 + 6) & 0x2000:
        return DR_VXLAN_MALFORMED
    pi = vx_peer_find(c, b + 14 + 12)
    if pi < 0:
        return DR_VXLAN_UNKNOWN_PEER
    pe = &c.peers[pi]
    ulen = load_be16(b + l4 + 4)
    if ulen < 8 + 8 + 14 or not (b[l4 + 8] & 0x08):
        return DR_VXLAN_MALFORMED
    vni = (<uint32_t>b[l4 + 12] << 16) | (<uint32_t>b[l4 + 13] << 8) | b[l4 + 14]
    if vni != c.vni:
        return DR_VXLAN_BAD_VNI
    d = l4 + 16
    ilen = ulen - 16
    ip = b + d
    if parse_frame(&q, ip, ilen) < 0:
        return DR_VXLAN_MALFORMED
    if H and k.vnet[1] != 0:
        # a GSO frame as a kernel VTEP hands it over a veth (D53): it crosses whole when the
        # header describes the inner TCP/UDP it carries
        g = k.vnet[1] & 0x7F
        if (not (k.vnet[0] & C_VNET_F_NEEDS_CSUM) or le16(k.vnet + 6) < d + 14 or not q.has_l4
                or not ((g == 1 and q.kind == K_IPV4 and q.l4_proto == 6)
                        or (g == 4 and q.kind == K_IPV6 and q.l4_proto == 6)
                        or (g == 5 and q.l4_proto == 17))):
            return DR_VXLAN_MALFORMED
    if memcmp(ip, c.vtep_mac, 6) != 0:
        return DR_VXLAN_NOT_OURS
    if q.l3_off != 14 or (q.kind != K_IPV4 and q.kind != K_IPV6):
        return DR_VXLAN_NOT_OURS
    v4 = q.kind == K_IPV4
    dst = ip + 14 + (16 if v4 else 24)
    port = vx_podip_find(c, v4, dst)
    if port >= 0:
        if c.ports[port].mac_bound:
            new_dst = c.ports[port].mac
        if c.gw_mac_set:
            new_src = c.gw_mac
    elif ((v4 and c.gw_ip4_set and memcmp(c.gw_ip4 + 12, dst, 4) == 0)
            or (not v4 and c.gw_ip6_set and memcmp(c.gw_ip6, dst, 16) == 0)):
        port = c.host_port
        if port < 0:
            return DR_VXLAN_NO_ROUTE
        new_dst = c.gw_mac
        new_src = c.vtep_mac
    else:
        return DR_VXLAN_NO_ROUTE
    if not vx_ttl(ip + 14, v4):
        return DR_TTL_EXPIRED
    if new_dst != NULL:
        memcpy(ip, new_dst, 6)
    if new_src != NULL:
        memcpy(ip + 6, new_src, 6)
    if H:
        memcpy(hdr, k.vnet, H)
        store_le16(hdr + 2, le16(hdr + 2) - d if le16(hdr + 2) > d else 0)
        if hdr[0] & C_VNET_F_NEEDS_CSUM:
            if le16(hdr + 6) >= d + 14:
                store_le16(hdr + 6, le16(hdr + 6) - d)
            else:                          # the partial checksum was in the outer headers:
                # a locally sent packet, its inner checksums complete and trusted (D54)
                hdr[0] = (hdr[0] & ~C_VNET_F_NEEDS_CSUM & 0xff) | C_VNET_F_DATA_VALID
                store_le16(hdr + 6, 0)
                store_le16(hdr + 8, 0)
        memcpy(ip - H, hdr, H)
    c.gc[GC_VXLAN_DECAP] += 1
    pe.rx_packets += 1
    pe.rx_bytes += outer_len
    tr_add(c, TR_VXLAN_DECAP, c.vni, port)
    if not vx_port_ok(c, port):
        return DR_NO_ROUTE
    k[0] = q
    k.in_port = in_port
    k.vnet = ip - H if H else NULL
    out[0] = port
    return VX_OUT

cdef inline int vxlan_stage(Core *c, Pkt *k, int32_t *out) noexcept nogil:
    # VX_NONE, VX_OUT or a drop reason (see the top of this file); only with a VTEP set
    cdef uint8_t *p = k.p
    cdef int32_t pi
    cdef int r
    if k.l3_off != 14:
        return VX_NONE
    if k.in_port == c.vtep_port:
        if (k.kind == K_IPV4 and memcmp(p, c.vtep_outer_mac, 6) == 0
                and memcmp(p + 14 + 16, c.vtep_ip, 4) == 0 and k.has_l4 and k.l4_proto == 17
                and load_be16(p + k.l4_off + 2) == c.vxlan_port):
            r = vx_decap(c, k, out)
        else:
            return VX_NONE
    else:
        if k.kind != K_IPV4 and k.kind != K_IPV6:
            return VX_NONE
        if not ((c.gw_mac_set and memcmp(p, c.gw_mac, 6) == 0) or memcmp(p, c.vtep_mac, 6) == 0):
            return VX_NONE
        if k.kind == K_IPV4:
            pi = vx_lpm(c, 1, p + 14 + 16)
        else:
            pi = vx_lpm(c, 0, p + 14 + 24)
        if pi < 0:
            return VX_NONE
        r = vx_encap(c, k, &c.peers[pi], out)
    if r == VX_OUT:
        c.vx_moved = 1
        c.vx_out_p = k.p
        c.vx_out_len = k.len
    return r
