# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""vswitch.datapath._core: the Cython forwarding core (the fast implementation of docs/datapath.md).

Theory of operation
-------------------
One ``Datapath`` object owns one C struct, ``Core`` (ext/defs.pxi), holding every table
as a malloc'd, bounded C array: ports, counters, the MAC table (mactable.pxi), conntrack
and hostPort rules (conntrack.pxi), token buckets with their packet queues (shaper.pxi).
``process()`` checks its arguments (numpy C API, no copies), then runs the whole batch
under ``with nogil:`` - parse (parse.pxi) -> anti-spoofing -> egress shaper ->
NAT/conntrack -> L2 learn/lookup -> ingress shaper -> output - finishing one packet
after the other, so each packet sees the state the previous one left (parsing and
prefetching run a few packets ahead: "the batch loop" below), the same
sequential semantics as the pure-Python twin (vswitch/datapath/pure.py, the executable
spec; the decisions of docs/datapath.md, section *Decisions*, are followed here and cited
by number). Constants, counter indexes, drop reasons and trace events come from
vswitch/datapath/consts.py through the generated consts.pxi. The loop allocates no Python object and reads no clock: time is the
``now_ns`` argument. Every helper it calls is ``cdef inline ... noexcept nogil``.

``drain()`` releases queued packets in departure order (D16) and runs egress-released
ones through ``forward`` (NAT, L2, ingress shaper, output) in the output buffer. Control
calls (ports, bindings, rules, shapers) run between batches, with the GIL, and validate like the twin (ValueError naming
the value, nothing changed). ``trace()`` runs one frame through the same C pipeline on a
deep copy of the Core with a stage recorder switched on, so it changes nothing.

One thread at a time: process() and drain() release the GIL, and a call from another
thread while they run raises RuntimeError instead of corrupting a batch.

Tables are inspectable without copies (``mac_table_raw()``, ``conntrack_raw()``: numpy
structured arrays over the C slots, scikit-learn _tree.pyx style, read-only and valid
while the Datapath lives) and as sorted snapshots equal to the twin's (``fdb()``,
``conntrack()``).
"""
cimport cython
cimport numpy as cnp
from cpython.ref cimport PyObject
from cpython.long cimport PyLong_CheckExact, PyLong_AsLongLongAndOverflow

import operator

import numpy as np

from vswitch.datapath import consts as _consts
from vswitch.datapath import gen_consts as _gen_consts

cnp.import_array()

include "defs.pxi"
include "parse.pxi"
include "mactable.pxi"
include "conntrack.pxi"
include "shaper.pxi"
include "vxlan.pxi"

cdef extern from "numpy/arrayobject.h":
    object PyArray_NewFromDescr(PyTypeObject *subtype, cnp.dtype descr, int nd, cnp.npy_intp *dims,
                                cnp.npy_intp *strides, void *data, int flags, object obj)
    ctypedef struct PyTypeObject:
        pass

# ---------------------------------------------------------------- the constants it was built with
# The C side of consts.py is generated into consts.pxi at build time; a build whose values
# differ from the consts.py it runs with (edited since, not rebuilt) must not load.
if _CONSTS_DIGEST != _gen_consts.digest(_consts):
    raise ImportError("vswitch.datapath._core was built from other constants than "
                      "vswitch/datapath/consts.py holds now: rebuild it "
                      "(python setup.py build_ext --inplace)")
DEFAULTS = _consts.DEFAULTS

cdef uint64_t MAX_I63 = 0x7fffffffffffffffULL
MAX_PEERS_LIMIT = 1 << 20          # the largest max_peers a Datapath accepts (the twin's)

# ---------------------------------------------------------------- raw table dtypes
cdef MacEntry _me
cdef CtEntry _ce
cdef CtKey _ck
assert sizeof(CtEntry) == 128, "CtEntry must stay two cache lines"
assert sizeof(MacEntry) == 32, "MacEntry must stay half a cache line"
MAC_SLOT_DTYPE = np.dtype({
    "names": ["key", "last_seen_ns", "port", "static"],
    "formats": ["<u8", "<u8", "<u2", "u1"],
    "offsets": [<Py_ssize_t>(<char *>&_me.key - <char *>&_me),
                <Py_ssize_t>(<char *>&_me.last_seen_ns - <char *>&_me),
                <Py_ssize_t>(<char *>&_me.port - <char *>&_me),
                <Py_ssize_t>(<char *>&_me.static - <char *>&_me)],
    "itemsize": sizeof(MacEntry),
})
CT_KEY_DTYPE = np.dtype({
    "names": ["src", "dst", "sport", "dport", "proto", "family"],
    "formats": [("u1", (16,)), ("u1", (16,)), "<u2", "<u2", "u1", "u1"],
    "offsets": [<Py_ssize_t>(<char *>&_ck.src - <char *>&_ck), <Py_ssize_t>(<char *>&_ck.dst - <char *>&_ck),
                <Py_ssize_t>(<char *>&_ck.sport - <char *>&_ck), <Py_ssize_t>(<char *>&_ck.dport - <char *>&_ck),
                <Py_ssize_t>(<char *>&_ck.proto - <char *>&_ck), <Py_ssize_t>(<char *>&_ck.family - <char *>&_ck)],
    "itemsize": sizeof(CtKey),
})
CT_ENTRY_DTYPE = np.dtype({
    "names": ["orig", "reply", "expires_ns", "packets", "bytes", "in_port", "out_port",
              "orig_src_mac", "orig_dst_mac", "state", "hairpin", "fin_seen", "used"],
    "formats": [CT_KEY_DTYPE, CT_KEY_DTYPE, "<u8", "<u8", "<u8", "<u2", "<u2", ("u1", (6,)),
                ("u1", (6,)), "u1", "u1", "u1", "u1"],
    "offsets": [<Py_ssize_t>(<char *>&_ce.orig - <char *>&_ce), <Py_ssize_t>(<char *>&_ce.reply - <char *>&_ce),
                <Py_ssize_t>(<char *>&_ce.expires_ns - <char *>&_ce),
                <Py_ssize_t>(<char *>&_ce.packets - <char *>&_ce), <Py_ssize_t>(<char *>&_ce.bytes - <char *>&_ce),
                <Py_ssize_t>(<char *>&_ce.in_port - <char *>&_ce), <Py_ssize_t>(<char *>&_ce.out_port - <char *>&_ce),
                <Py_ssize_t>(<char *>&_ce.orig_src_mac - <char *>&_ce),
                <Py_ssize_t>(<char *>&_ce.orig_dst_mac - <char *>&_ce),
                <Py_ssize_t>(<char *>&_ce.state - <char *>&_ce), <Py_ssize_t>(<char *>&_ce.hairpin - <char *>&_ce),
                <Py_ssize_t>(<char *>&_ce.fin_seen - <char *>&_ce), <Py_ssize_t>(<char *>&_ce.used - <char *>&_ce)],
    "itemsize": sizeof(CtEntry),
})

# ---------------------------------------------------------------- the pipeline

cdef inline void count_drop(Core *c, int reason, uint32_t port) noexcept nogil:
    c.pc[port * N_PC + DROP_PC[reason]] += 1
    c.gc[DROP_GC[reason]] += 1
    tr_add(c, TR_OUT_DROP, 0, reason)

cdef inline void count_tx(Core *c, uint32_t port, uint32_t length) noexcept nogil:
    cdef uint64_t *row = c.pc + port * N_PC
    row[PC_TX_PACKETS] += 1
    row[PC_TX_BYTES] += length

cdef inline bint ip6_linklocal(const uint8_t *a) noexcept nogil:
    return a[0] == 0xfe and (a[1] & 0xc0) == 0x80

cdef inline bint ip6_zero(const uint8_t *a) noexcept nogil:
    return (load_u64(a) | load_u64(a + 8)) == 0

cdef inline bint ip4_bound(PortState *ps, uint32_t a) noexcept nogil:
    cdef int i
    if a == 0:
        return True
    for i in range(ps.n_ip4):
        if ps.ip4[i] == a:
            return True
    return False

cdef inline bint spoofed(PortState *ps, Pkt *k) noexcept nogil:
    # anti-spoofing for a port with it on and a binding (D12)
    cdef const uint8_t *l3 = k.p + k.l3_off
    cdef int i
    if ps.mac_bound:
        if (k.src_key & 0xffffffffffffULL) != ps.mac48:       # the source MAC (parse's key)
            return True
        if k.kind == K_ARP and memcmp(l3 + 8, ps.mac, 6) != 0:
            return True
    if ps.ips_bound:
        if k.kind == K_ARP:
            return not ip4_bound(ps, load_be32(l3 + 14))
        if k.kind == K_IPV4:
            return not ip4_bound(ps, load_be32(l3 + 12))
        if k.kind == K_IPV6:
            if ip6_zero(l3 + 8) or ip6_linklocal(l3 + 8):
                return False
            for i in range(ps.n_ip6):
                if memcmp(ps.ip6[i], l3 + 8, 16) == 0:
                    return False
            return True
    return False

cdef int32_t output_flood(Core *c, Pkt *k, int32_t out, uint64_t now) noexcept nogil:
    # OUT_FLOOD / OUT_FLOOD_UNKNOWN: tx on every receiver, a shaped receiver's copy queued
    # (D41). Not inline: the unicast path stays small enough to be inlined whole
    cdef uint16_t in_port = k.in_port
    cdef uint32_t j, q, charged
    cdef Shaper *sh
    c.gc[GC_FLOODED] += 1
    charged = 0
    for j in range(c.n_up):
        q = c.up_list[j]
        if q == in_port or (out == C_OUT_FLOOD_UNKNOWN and c.ports[q].kind == C_PORT_POD):
            continue
        sh = &c.shapers[q * 2 + C_INGRESS]
        if not sh.active:
            count_tx(c, q, k.len)
            continue
        # D41: a shaped receiver's copy always goes through its queue
        if charged == 0:
            charged = charged_len(k)
        shaper_refill(sh, now)
        if (sh.queue_bytes + k.len > sh.queue_limit_bytes
                or q_push(sh, k.p - c.vnet_hdr_len, c.vnet_hdr_len, k.len, charged, in_port,
                          <int32_t>q, c.drain_seq) != 0):
            c.pc[q * N_PC + PC_DROP_QUEUE_FULL] += 1     # counted, not traced: the frame goes on
            c.gc[GC_QUEUE_FULL] += 1
            continue
        c.pc[q * N_PC + PC_QUEUED] += 1
        c.gc[GC_QUEUED] += 1
    tr_add(c, TR_OUT_FLOOD if out == C_OUT_FLOOD else TR_OUT_FLOOD_UNKNOWN, 0, 0)
    return out

cdef inline int32_t forward(Core *c, Pkt *k, uint64_t now, bint tr) noexcept nogil:
    # NAT, L2, ingress shaper, output for a parsed packet that passed rx, parse, anti-spoofing
    # and its egress shaper (also where drain() continues a packet released from an egress queue)
    cdef bint src_mcast = k.p[6] & 1
    cdef int32_t out = C_OUT_FLOOD
    cdef int r = NAT_NONE
    cdef int port
    cdef uint16_t in_port = k.in_port
    cdef PortState *ps
    # stage: nat
    if k.nat_ok:
        r = nat_stage(c, k, now, &out, tr)
        if r >= 0:
            count_drop(c, r, in_port)
            return C_OUT_DROP
    elif k.icmp_ok:
        r = nat_icmp_error(c, k, now, &out)
    elif k.frag == FRAG_LATER:
        r = nat_fragment(c, k, now, &out)
    # stage: vxlan
    if r != NAT_OUT and c.vtep_set:
        # 4b. VXLAN (vxlan.pxi): a routed frame skips L2
        r = vxlan_stage(c, k, &out)
        if r >= 0:
            count_drop(c, r, in_port)
            return C_OUT_DROP
        if r == VX_OUT:
            return output_unicast(c, k, out, now, tr)
        r = NAT_NONE
    # stage: l2
    # a frame from a port with its own bound MAC as source: that static entry makes the
    # learn a no-op (D42), known without a lookup
    if not src_mcast and k.src_key != c.ports[in_port].own_key:
        if mac_learn(c, k.src_key, in_port, now) < 0:
            count_drop(c, DR_MAC_STOLEN, in_port)        # D42
            return C_OUT_DROP
    if r == NAT_OUT:
        ps = &c.ports[out]
        if not ps.present or not ps.up:
            count_drop(c, DR_NO_ROUTE, in_port)
            return C_OUT_DROP
        tr_at(c, tr, TR_L2_NAT, 0, out)
    elif k.p[0] & 1:
        tr_at(c, tr, TR_L2_MULTICAST, 0, 0)
    else:
        port = mac_lookup(c, k.dst_key, now)
        if port < 0:
            tr_at(c, tr, TR_L2_UNKNOWN, 0, 0)
            out = C_OUT_FLOOD_UNKNOWN
        elif port == in_port:
            count_drop(c, DR_LOOP, in_port)
            return C_OUT_DROP
        else:
            ps = &c.ports[port]
            if not ps.present or not ps.up:
                count_drop(c, DR_NO_ROUTE, in_port)
                return C_OUT_DROP
            tr_at(c, tr, TR_L2_KNOWN, 0, port)
            out = port
    # stage: output
    if out < 0:                    # OUT_FLOOD or OUT_FLOOD_UNKNOWN
        return output_flood(c, k, out, now)
    return output_unicast(c, k, out, now, tr)

cdef inline int32_t output_unicast(Core *c, Pkt *k, int32_t out, uint64_t now, bint tr) noexcept nogil:
    # the ingress shaper and output of a frame for port out (switched, translated, or
    # routed by the vxlan stage)
    cdef Shaper *sh
    cdef int r
    if c.ports[out].shaped & (1 << C_INGRESS):     # stage: ingress_shaper
        sh = &c.shapers[out * 2 + C_INGRESS]
        r = shaper_admit(sh, k, c.vnet_hdr_len, out, now, c.drain_seq)
        tr_at(c, tr, TR_INGRESS, r, 0)
        if r == SH_FULL:
            count_drop(c, DR_QUEUE_FULL, out)
            return C_OUT_DROP
        if r == SH_QUEUE:
            c.pc[out * N_PC + PC_QUEUED] += 1
            c.gc[GC_QUEUED] += 1
            tr_at(c, tr, TR_OUT_QUEUED, 0, 0)
            return C_OUT_QUEUED
    count_tx(c, out, k.len)        # stage: counters
    tr_at(c, tr, TR_OUT_PORT, out, 0)
    return out                     # stage: output

cdef inline int pkt_prepare(Core *c, Pkt *k, uint8_t *frame, uint32_t length, uint16_t in_port,
                            bint pf, uint32_t H) noexcept nogil:
    # parsing one frame: parse_frame's result (0, or -1 malformed). It reads only the
    # frame's own bytes and changes no state, so the batch loop runs it a few packets
    # ahead; with pf it also prefetches the MAC slots the packet will touch and, for a
    # TCP/UDP packet whose ports pass the nat_ports filter (as it stands now: nat_stage
    # checks again), computes the conntrack key and hash and prefetches the index slot
    cdef int r = parse_frame(k, frame, length)
    cdef PortState *ps
    cdef const uint8_t *l4
    k.in_port = in_port
    k.vnet = frame - H if H else NULL           # H: c.vnet_hdr_len
    if r < 0 or not pf:
        return r
    ps = &c.ports[in_port]         # stage: l2
    # a pod port whose anti-spoofing pins its one MAC touches that slot with every frame
    if not (ps.antispoof and ps.mac_bound):
        prefetchw(&c.mac[mac_home(c, k.src_key)])
    if not (frame[0] & 1):
        prefetch(&c.mac[mac_home(c, k.dst_key)])
    if k.nat_ok:                   # stage: nat
        l4 = frame + k.l4_off
        if bit_test(c.nat_ports, load_be16(l4)) or bit_test(c.nat_ports, load_be16(l4 + 2)):
            ct_key_from_pkt(&k.ct_key, k)
            k.ct_hash = ct_hash(&k.ct_key)
            k.ct_ready = 1
            prefetch(&c.ct_slots[k.ct_hash & c.ct_mask])
    return 0

cdef inline int32_t pkt_finish(Core *c, Pkt *k, int parsed, uint64_t now, bint rx_counted, bint tr) noexcept nogil:
    # the whole pipeline for a frame pkt_prepare() has parsed; returns its out_ports value.
    # rx_counted: the batch loop has counted rx already (per port in chunk_prepare, the
    # global packets/bytes once per batch): the same sums, fewer stores
    cdef uint16_t in_port = k.in_port
    cdef uint32_t length = k.len
    cdef PortState *ps = &c.ports[in_port]
    cdef uint64_t *row = c.pc + <uint64_t>in_port * N_PC
    cdef Shaper *sh
    cdef int v
    # stage: counters
    if not rx_counted:
        row[PC_RX_PACKETS] += 1
        row[PC_RX_BYTES] += length
        c.gc[GC_PACKETS] += 1
        c.gc[GC_BYTES] += length
    tr_at(c, tr, TR_RX, in_port, length)
    # stage: parse
    if not ps.present:
        count_drop(c, DR_NO_ROUTE, in_port)
        return C_OUT_DROP
    if parsed < 0:
        count_drop(c, DR_MALFORMED, in_port)
        return C_OUT_DROP
    tr_at(c, tr, TR_PARSE, 0, 0)
    # stage: antispoof
    if ps.antispoof and (ps.mac_bound or ps.ips_bound):
        if spoofed(ps, k):
            count_drop(c, DR_SPOOFED, in_port)
            return C_OUT_DROP
        tr_at(c, tr, TR_ANTISPOOF, 0, 0)
    # stage: egress_shaper
    if ps.shaped & (1 << C_EGRESS):
        sh = &c.shapers[<uint32_t>in_port * 2 + C_EGRESS]
        v = shaper_admit(sh, k, c.vnet_hdr_len, -1, now, c.drain_seq)
        if v == SH_FULL:
            count_drop(c, DR_QUEUE_FULL, in_port)
            return C_OUT_DROP
        tr_at(c, tr, TR_EGRESS, v, 0)
        if v == SH_QUEUE:
            row[PC_QUEUED] += 1
            c.gc[GC_QUEUED] += 1
            tr_at(c, tr, TR_OUT_QUEUED, 0, 0)
            return C_OUT_QUEUED
    return forward(c, k, now, tr)  # stage: output

cdef inline int32_t process_one(Core *c, uint8_t *frame, uint32_t length, uint16_t in_port,
                                uint64_t now, bint rx_counted, bint tr) noexcept nogil:
    # the whole pipeline for one received frame, nothing prefetched; returns its out_ports value
    cdef Pkt k
    cdef int parsed = pkt_prepare(c, &k, frame, length, in_port, False, c.vnet_hdr_len)
    return pkt_finish(c, &k, parsed, now, rx_counted, tr)

# ---------------------------------------------------------------- the batch loop
# process() runs a batch through a software pipeline over chunks of VEC packets (VPP
# style): while chunk t is finished (pkt_finish, in order), chunk t+1's conntrack index
# slots, fetched by then, are read and their entries prefetched, and chunk t+2 is parsed
# (pkt_prepare: parse, MAC keys, conntrack key and hash, prefetches). Parsing and hashing
# are work every packet needs anyway: done ahead, they are done once, and the pipeline
# costs little more than the prefetch instructions. A prepared packet depends only on
# its own bytes, and finishing a packet writes only its own bytes (NAT), so the result
# equals finishing each packet right after parsing it, as long as no two frames of the
# batch overlap in the buffer; a batch whose frames overlap (or are not in ascending
# buffer order: checked with the arguments) runs packet by packet through process_one.
# Prefetches are hints: with small tables every slot a batch touches is cached, so they
# are issued only when a table holds more than pf_min_entries entries.
cdef enum:
    VEC = 8                 # packets per chunk
    PF_MIN_ENTRIES = 64     # default Core.pf_min_entries (measured: the crossover)

cdef inline void chunk_prepare(Core *c, Pkt *kv, int *pv, uint8_t *base, uint8_t *p_off, Py_ssize_t s_off,
                               uint8_t *p_len, Py_ssize_t s_len, uint8_t *p_in, Py_ssize_t s_in,
                               Py_ssize_t start, Py_ssize_t n, bint pf) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef uint32_t length
    cdef uint16_t ip
    cdef uint64_t *row
    for i in range(n):
        j = start + i
        length = (<uint32_t *>(p_len + j * s_len))[0]
        ip = (<uint16_t *>(p_in + j * s_in))[0]
        row = c.pc + <uint64_t>ip * N_PC          # D34: rx (pkt_finish runs with rx_counted); stage: counters
        row[PC_RX_PACKETS] += 1
        row[PC_RX_BYTES] += length
        pv[i] = pkt_prepare(            # stage: batch
           c, &kv[i], base + (<uint32_t *>(p_off + j * s_off))[0], length, ip, pf, c.vnet_hdr_len)

cdef inline void chunk_prefetch_entries(Core *c, Pkt *kv, Py_ssize_t n) noexcept nogil:
    # the conntrack entries of the chunk's prepared packets (their index slots are cached)
    cdef Py_ssize_t i
    cdef uint32_t ref
    cdef const uint8_t *e
    for i in range(n):
        if kv[i].ct_ready:
            ref = c.ct_slots[kv[i].ct_hash & c.ct_mask].ref
            if ref:
                e = <const uint8_t *>&c.ct[(ref - 1) >> 1]
                prefetchw(e)
                prefetchw(e + 64)

cdef inline uint64_t u128_lo(u128 v) noexcept nogil:
    return <uint64_t>v

cdef inline uint64_t u128_hi(u128 v) noexcept nogil:
    return <uint64_t>(v >> 64)

cdef inline void vx_write_back(Core *c, uint8_t *base, uint8_t *p_off, uint8_t *p_len) noexcept nogil:
    # an en/decapsulated frame's new offset and length into the batch arrays (VXLAN)
    (<uint32_t *>p_off)[0] = <uint32_t>(c.vx_out_p - base)
    (<uint32_t *>p_len)[0] = c.vx_out_len
    c.vx_moved = 0

cdef Py_ssize_t process_batch_c(Core *c, uint8_t *base, uint64_t buflen,
                                uint8_t *p_off, Py_ssize_t s_off, uint8_t *p_len, Py_ssize_t s_len,
                                uint8_t *p_in, Py_ssize_t s_in, uint8_t *p_out, Py_ssize_t s_out,
                                Py_ssize_t cnt, uint64_t now, int *why) noexcept nogil:
    """The batch of process() (and of the daemon's loop, ext/io.pxi): -1 when done, else
    the index of the first invalid packet (why: 1 in_port, 2 length, 3 outside buf), with
    nothing changed (D2). `now` must not be below c.last_now_ns (the caller checks)."""
    cdef uint32_t H = c.vnet_hdr_len
    cdef Py_ssize_t i, t, nch, start, n
    cdef uint64_t off, length, end = 0, nbytes = 0
    cdef uint16_t ip
    cdef bint disjoint = True, pf
    cdef Pkt kv[3 * VEC]            # three chunks in flight: finished, entries, prepared
    cdef int pv[3 * VEC]
    cdef Pkt *kc
    cdef int *pc
    cdef uint64_t *row
    cdef uint32_t max_ports = c.max_ports
    cdef bint vx = c.vtep_set        # only the vxlan stage moves frames (vx_moved)
    # D2: the whole batch is checked before any state changes
    for i in range(cnt):
        off = (<uint32_t *>(p_off + i * s_off))[0]
        length = (<uint32_t *>(p_len + i * s_len))[0]
        ip = (<uint16_t *>(p_in + i * s_in))[0]
        if ip >= max_ports or length > C_MAX_FRAME or off < H or off + length > buflen:
            if ip >= max_ports:
                why[0] = 1
            elif length > C_MAX_FRAME:
                why[0] = 2
            else:
                why[0] = 3
            return i
        if off < end:
            disjoint = False
        end = off + length
        nbytes += length
    c.last_now_ns = now
    c.have_now = 1
    c.vx_base = base
    c.vx_moved = 0
    if not disjoint:
        for i in range(cnt):
            off = (<uint32_t *>(p_off + i * s_off))[0]
            (<int32_t *>(p_out + i * s_out))[0] = process_one(
                c, base + off, (<uint32_t *>(p_len + i * s_len))[0],
                (<uint16_t *>(p_in + i * s_in))[0], now, False, False)
            if c.vx_moved:
                vx_write_back(c, base, p_off + i * s_off, p_len + i * s_len)
        return -1
    c.gc[GC_PACKETS] += <uint64_t>cnt     # D34, for the whole (valid) batch at once
    c.gc[GC_BYTES] += nbytes
    pf = not c.pf_off and (c.mac_count > c.pf_min_entries or c.ct_count > c.pf_min_entries)
    if not pf:
        # small tables, every slot they have cached: nothing to prefetch, so no chunks to
        # run ahead either; each packet is parsed and finished in turn (rx counted here)
        for i in range(cnt):
            length = (<uint32_t *>(p_len + i * s_len))[0]
            ip = (<uint16_t *>(p_in + i * s_in))[0]
            row = c.pc + <uint64_t>ip * N_PC      # stage: counters
            row[PC_RX_PACKETS] += 1
            row[PC_RX_BYTES] += length
            (<int32_t *>(p_out + i * s_out))[0] = process_one(     # stage: batch
                c, base + (<uint32_t *>(p_off + i * s_off))[0], <uint32_t>length, ip, now, True, False)
            if vx and c.vx_moved:
                vx_write_back(c, base, p_off + i * s_off, p_len + i * s_len)
        return -1
    nch = (cnt + VEC - 1) // VEC
    for t in range(-2, nch):
        if t + 2 < nch:
            start = (t + 2) * VEC
            n = min(<Py_ssize_t>VEC, cnt - start)
            chunk_prepare(c, kv + ((t + 2) % 3) * VEC, pv + ((t + 2) % 3) * VEC, base, p_off, s_off,
                          p_len, s_len, p_in, s_in, start, n, pf)
        if pf and 0 <= t + 1 < nch:
            start = (t + 1) * VEC
            chunk_prefetch_entries(c, kv + ((t + 1) % 3) * VEC, min(<Py_ssize_t>VEC, cnt - start))
        if t >= 0:
            start = t * VEC
            n = min(<Py_ssize_t>VEC, cnt - start)
            kc = kv + (t % 3) * VEC
            pc = pv + (t % 3) * VEC
            for i in range(n):
                (<int32_t *>(p_out + (start + i) * s_out))[0] = pkt_finish(c, &kc[i], pc[i], now, True, False)
                if vx and c.vx_moved:
                    vx_write_back(c, base, p_off + (start + i) * s_off, p_len + (start + i) * s_len)
    return -1


cdef int64_t next_departure_c(Core *c) noexcept nogil:
    """The earliest departure time of a queued packet, or -1 with every queue empty."""
    cdef uint32_t j
    cdef Shaper *s
    cdef uint64_t t, best = 0
    cdef bint found = False
    for j in range(c.n_active):
        s = &c.shapers[c.active[j]]
        if s.queue_packets:
            t = shaper_t_dep(s)
            if not found or t < best:
                best = t
                found = True
    return <int64_t>best if found else -1


cdef Py_ssize_t drain_c(Core *c, uint64_t now, uint8_t *obuf, Py_ssize_t obuf_len,
                        uint8_t *o_off, Py_ssize_t s_off, uint8_t *o_len, Py_ssize_t s_len,
                        uint8_t *o_in, Py_ssize_t s_in, uint8_t *o_out, Py_ssize_t s_out,
                        Py_ssize_t max_pkts) noexcept nogil:
    # D16; returns the number of emitted entries
    cdef Py_ssize_t emitted = 0
    cdef uint64_t off = C_ENCAP_HEADROOM + c.vnet_hdr_len     # headroom before each header (VXLAN)
    cdef uint32_t H = c.vnet_hdr_len
    cdef uint32_t j, idx, best
    cdef uint64_t t, best_t
    cdef bint found
    cdef Shaper *s
    cdef QRec *r
    cdef uint32_t length
    cdef uint16_t in_port
    cdef int32_t out
    cdef Pkt k
    c.drain_seq += 1
    c.vx_base = obuf
    c.vx_moved = 0
    while emitted < max_pkts:
        found = False
        best = 0
        best_t = 0
        for j in range(c.n_active):
            idx = c.active[j]
            s = &c.shapers[idx]
            if s.queue_packets == 0 or q_head(s).seq == c.drain_seq:
                continue
            t = shaper_t_dep(s)
            if t <= now and (not found or t < best_t):
                found = True
                best = idx
                best_t = t
        if not found:
            break
        s = &c.shapers[best]
        r = q_head(s)
        length = r.len
        if off + length > <uint64_t>obuf_len:
            break
        shaper_refill(s, best_t)          # released at its own departure time (D15)
        s.credit -= pkt_cost(q_charged(r))
        in_port = r.in_port
        out = r.out_port
        memcpy(obuf + off - H, q_data(r), H + length)
        q_pop(s)
        if (best & 1) == C_EGRESS:
            parse_frame(&k, obuf + off, length)
            k.in_port = in_port
            k.vnet = obuf + off - H if H else NULL
            out = forward(c, &k, now, True)
            if c.vx_moved:                # en/decapsulated: the frame moved in its slot
                c.vx_moved = 0
                if out != C_OUT_QUEUED:
                    off = <uint64_t>(c.vx_out_p - obuf)
                    length = c.vx_out_len
            if out == C_OUT_QUEUED:
                continue
        else:
            count_tx(c, <uint32_t>out, length)
        (<uint32_t *>(o_off + emitted * s_off))[0] = <uint32_t>off
        (<uint32_t *>(o_len + emitted * s_len))[0] = length
        (<uint16_t *>(o_in + emitted * s_in))[0] = in_port
        (<int32_t *>(o_out + emitted * s_out))[0] = out
        emitted += 1
        off += length + C_ENCAP_HEADROOM + H
    return emitted

# ---------------------------------------------------------------- Core lifetime

cdef uint64_t pow2_at_least(uint64_t n):
    cdef uint64_t p = 1
    while p < n:
        p <<= 1
    return p

cdef int log2_u64(uint64_t p):
    cdef int b = 0
    while (<uint64_t>1 << b) < p:
        b += 1
    return b

cdef void core_free(Core *c) noexcept nogil:
    cdef uint32_t i
    if c == NULL:
        return
    if c.shapers != NULL:
        for i in range(c.max_ports * 2):
            free(c.shapers[i].qbuf)
    free(c.ports)
    free(c.pc)
    free(c.up_list)
    free(c.mac)
    free(c.ct)
    free(c.ct_slots)
    free(c.ct_portcnt)
    free(c.rules)
    free(c.rule_slots)
    free(c.shapers)
    free(c.active)
    free(c.tr)
    free(c.mac_ports)
    free(c.flood)
    free(c.ct_ev_next)
    free(c.ct_ev_prev)
    free(c.peers)
    free(c.peer_slots)
    free(c.cidr_slots)
    free(c.podip_slots)
    free(c)

cdef void *dup(const void *p, size_t n) noexcept nogil:
    cdef void *q = malloc(n if n else 1)
    if q != NULL and n:
        memcpy(q, p, n)
    return q

cdef Core *core_clone(Core *c) noexcept nogil:
    # a deep copy (for trace()); NULL when memory runs out
    cdef Core *d = <Core *>calloc(1, sizeof(Core))
    cdef uint32_t i
    cdef Shaper *s
    if d == NULL:
        return NULL
    memcpy(d, c, sizeof(Core))
    d.ports = NULL; d.pc = NULL; d.up_list = NULL; d.mac = NULL; d.ct = NULL; d.ct_slots = NULL
    d.ct_portcnt = NULL; d.rules = NULL; d.rule_slots = NULL; d.shapers = NULL; d.active = NULL
    d.tr = NULL
    d.mac_ports = NULL; d.flood = NULL
    d.peers = <Peer *>dup(c.peers, c.max_peers * sizeof(Peer))
    d.peer_slots = <VxSlot *>dup(c.peer_slots, (c.peer_mask + 1) * sizeof(VxSlot))
    d.cidr_slots = <VxSlot *>dup(c.cidr_slots, (c.cidr_mask + 1) * sizeof(VxSlot))
    d.podip_slots = <VxSlot *>dup(c.podip_slots, (c.podip_mask + 1) * sizeof(VxSlot))
    d.mac_ports = <MacPort *>dup(c.mac_ports, c.max_ports * sizeof(MacPort))
    d.flood = <uint8_t *>dup(c.flood, c.max_ports)
    d.ct_ev_next = <uint32_t *>dup(c.ct_ev_next, c.conntrack_size * sizeof(uint32_t))
    d.ct_ev_prev = <uint32_t *>dup(c.ct_ev_prev, c.conntrack_size * sizeof(uint32_t))
    d.ports = <PortState *>dup(c.ports, c.max_ports * sizeof(PortState))
    d.pc = <uint64_t *>dup(c.pc, c.max_ports * N_PC * sizeof(uint64_t))
    d.up_list = <uint16_t *>dup(c.up_list, c.max_ports * sizeof(uint16_t))
    d.mac = <MacEntry *>dup(c.mac, (c.mac_mask + 1) * sizeof(MacEntry))
    d.ct = <CtEntry *>dup(c.ct, c.conntrack_size * sizeof(CtEntry))
    d.ct_slots = <CtSlot *>dup(c.ct_slots, (c.ct_mask + 1) * sizeof(CtSlot))
    d.ct_portcnt = <uint32_t *>dup(c.ct_portcnt, 65536 * sizeof(uint32_t))
    d.rules = <HpRule *>dup(c.rules, c.max_hostports * sizeof(HpRule))
    d.rule_slots = <uint32_t *>dup(c.rule_slots, (c.rule_mask + 1) * sizeof(uint32_t))
    d.active = <uint32_t *>dup(c.active, c.max_ports * 2 * sizeof(uint32_t))
    d.shapers = <Shaper *>dup(c.shapers, c.max_ports * 2 * sizeof(Shaper))
    if d.shapers != NULL:
        for i in range(c.max_ports * 2):
            s = &d.shapers[i]
            if s.qbuf != NULL:
                s.qbuf = <uint8_t *>dup(c.shapers[i].qbuf, s.qcap)
                if s.qbuf == NULL:
                    s.qcap = 0
                    s.qhead = 0
                    s.qtail = 0
                    core_free(d)
                    return NULL
    if (d.ports == NULL or d.pc == NULL or d.up_list == NULL or d.mac == NULL or d.ct == NULL
            or d.ct_slots == NULL or d.ct_portcnt == NULL or d.rules == NULL or d.rule_slots == NULL
            or d.active == NULL or d.shapers == NULL or d.mac_ports == NULL or d.flood == NULL
            or d.ct_ev_next == NULL or d.ct_ev_prev == NULL or d.peers == NULL or d.peer_slots == NULL
            or d.cidr_slots == NULL or d.podip_slots == NULL):
        core_free(d)
        return NULL
    return d

# ---------------------------------------------------------------- argument checks (the twin's)

cdef object _index(object value, str what, object lo, object hi):
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer in {lo}..{hi}, got {value!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{what} must be in {lo}..{hi}, got {v}")
    return v

cdef inline int64_t _int_fast(object value, str what, int64_t lo, int64_t hi) except? -1:
    # _index for the hot entry points: exact ints in range without a Python call
    cdef long long v
    cdef int overflow = 0
    if PyLong_CheckExact(value):
        v = PyLong_AsLongLongAndOverflow(value, &overflow)
        if not overflow and lo <= v <= hi:
            return v
    return _index(value, what, lo, hi)

cdef bytes _bytes_of(object value, str what, tuple lengths):
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{what} must be bytes of length {' or '.join(map(str, lengths))}, got {value!r}")
    b = bytes(value)
    if len(b) not in lengths:
        raise ValueError(f"{what} must be {' or '.join(map(str, lengths))} bytes long, "
                         f"got {len(b)} bytes: {b.hex()}")
    return b

cdef list _unique_addrs(object ips, str or_none, long limit, str noun, str what):
    # the addresses of ips (4 or 16 bytes each) in order without repeats; refuses a
    # non-iterable and more than limit items (the same messages as datapath_py)
    try:
        items = list(ips)
    except TypeError:
        raise ValueError(f"ips must be an iterable of addresses{or_none}, got {ips!r}") from None
    if len(items) > limit:
        raise ValueError(f"at most {limit} {noun}, got {len(items)}")
    addrs = []
    for a in items:
        b = _bytes_of(a, what, (4, 16))
        if b not in addrs:
            addrs.append(b)
    return addrs

cdef bytes _addr16(bytes raw):
    return (b"\0" * 10 + b"\xff\xff" + raw) if len(raw) == 4 else raw

cdef void _put_addr16(uint8_t *dst, bytes raw):
    # raw (4 or 16 bytes) as the 16-byte table form (IPv4 as ::ffff:a.b.c.d)
    cdef bytes b = _addr16(raw)
    memcpy(dst, <const char *>b, 16)

cdef cnp.ndarray _array(object a, str name, int typenum, bint writable):
    cdef cnp.ndarray arr
    if not isinstance(a, cnp.ndarray):
        raise ValueError(f"{name} must be a 1-D {np.dtype(np.sctypeDict[_TYPENAMES[typenum]])} "
                         f"numpy array, got {type(a).__name__}")
    arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != typenum or not cnp.PyArray_ISNOTSWAPPED(arr) or cnp.PyArray_NDIM(arr) != 1:
        raise ValueError(f"{name} must be a 1-D {np.dtype(_TYPENAMES[typenum])} numpy array, "
                         f"got {arr.dtype}[{arr.ndim}-D]")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} must be writable")
    return arr

_TYPENAMES = {cnp.NPY_UINT8: "uint8", cnp.NPY_UINT16: "uint16", cnp.NPY_UINT32: "uint32",
              cnp.NPY_INT32: "int32"}

cdef cnp.ndarray _check_buf(object buf, str name):
    cdef cnp.ndarray arr = _array(buf, name, cnp.NPY_UINT8, True)
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name} must be C-contiguous")
    return arr

cdef int _direction(object direction) except -1:
    if isinstance(direction, bool) or direction not in (C_EGRESS, C_INGRESS):
        raise ValueError(f"direction must be EGRESS (0) or INGRESS (1), got {direction!r}")
    return int(direction)

cdef int _proto(object proto) except -1:
    if isinstance(proto, bool) or proto not in (6, 17):
        raise ValueError(f"proto must be 6 (TCP) or 17 (UDP), got {proto!r}")
    return int(proto)


def _cidr_text(addr, plen):
    import ipaddress
    return f"{ipaddress.ip_address(addr)}/{plen}"

cdef bytes _masked(bytes addr, object plen):
    # Python ints: the masks are up to 128 bits wide
    bits = len(addr) * 8
    v = int.from_bytes(addr, "big") & (((1 << plen) - 1) << (bits - plen))
    return v.to_bytes(len(addr), "big")

cdef list _peer_cidrs(object cidrs):
    # set_peer's cidrs as [(family, prefix_len, addr)], checked like the twin's
    try:
        items = list(cidrs)
    except TypeError:
        raise ValueError(f"cidrs must be a list of (address, prefix_len), got {cidrs!r}") from None
    if not 1 <= len(items) <= C_MAX_PEER_CIDRS:
        raise ValueError(f"cidrs must hold 1..{C_MAX_PEER_CIDRS} items, got {len(items)}")
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"a cidr must be (address, prefix_len), got {item!r}")
        addr = _bytes_of(item[0], "cidr address", (4, 16))
        plen = _index(item[1], "cidr prefix_len", 0, len(addr) * 8)
        if _masked(addr, plen) != addr:
            raise ValueError(f"cidr {_cidr_text(addr, plen)} has host bits set")
        key = (4 if len(addr) == 4 else 6, plen, addr)
        if key in out:
            raise ValueError(f"cidr {_cidr_text(addr, plen)} is given twice")
        out.append(key)
    return out


# ---------------------------------------------------------------- the class

cdef class Datapath:
    """The datapath contract of docs/datapath.md, in C. See the module docstring."""

    cdef Core *c
    cdef readonly uint32_t max_ports
    cdef readonly uint64_t mac_table_size
    cdef readonly uint64_t conntrack_size
    cdef readonly uint64_t max_hostports
    cdef readonly uint32_t vnet_hdr_len
    cdef readonly uint64_t mac_aging_ns
    cdef bint busy               # True while process()/drain() run without the GIL

    def __cinit__(self):
        self.c = NULL

    def __init__(self, *, max_ports=DEFAULTS["max_ports"], mac_table_size=DEFAULTS["mac_table_size"],
                 conntrack_size=DEFAULTS["conntrack_size"], max_hostports=DEFAULTS["max_hostports"],
                 vnet_hdr_len=DEFAULTS["vnet_hdr_len"], mac_aging_ns=DEFAULTS["mac_aging_ns"],
                 tcp_syn_timeout_ns=DEFAULTS["tcp_syn_timeout_ns"],
                 tcp_est_timeout_ns=DEFAULTS["tcp_est_timeout_ns"],
                 tcp_fin_timeout_ns=DEFAULTS["tcp_fin_timeout_ns"],
                 tcp_close_timeout_ns=DEFAULTS["tcp_close_timeout_ns"],
                 udp_timeout_ns=DEFAULTS["udp_timeout_ns"],
                 udp_replied_timeout_ns=DEFAULTS["udp_replied_timeout_ns"],
                 tcp_syn_recv_timeout_ns=DEFAULTS["tcp_syn_recv_timeout_ns"],
                 mac_learn_rate_per_s=DEFAULTS["mac_learn_rate_per_s"],
                 mac_learn_burst=DEFAULTS["mac_learn_burst"], max_peers=DEFAULTS["max_peers"]):
        cdef Core *c
        cdef uint64_t mac_slots, ct_slots, rule_slots
        cdef uint32_t i, ncts
        if self.c != NULL:
            raise RuntimeError("Datapath.__init__ called twice")
        mp = _index(max_ports, "max_ports", 1, 65535)
        mts = _index(mac_table_size, "mac_table_size", 1, MAX_I63)
        cts = _index(conntrack_size, "conntrack_size", 1, MAX_I63)
        mhp = _index(max_hostports, "max_hostports", 1, MAX_I63)
        H = _index(vnet_hdr_len, "vnet_hdr_len", 0, 12)
        if H not in (0, 10, 12):
            raise ValueError(f"vnet_hdr_len must be 0, 10 or 12, got {vnet_hdr_len}")
        aging = _index(mac_aging_ns, "mac_aging_ns", 0, MAX_I63)
        timeouts = [0,
                    _index(tcp_syn_timeout_ns, "tcp_syn_timeout_ns", 0, MAX_I63),
                    _index(tcp_est_timeout_ns, "tcp_est_timeout_ns", 0, MAX_I63),
                    _index(tcp_fin_timeout_ns, "tcp_fin_timeout_ns", 0, MAX_I63),
                    _index(tcp_close_timeout_ns, "tcp_close_timeout_ns", 0, MAX_I63),
                    _index(udp_timeout_ns, "udp_timeout_ns", 0, MAX_I63),
                    _index(udp_replied_timeout_ns, "udp_replied_timeout_ns", 0, MAX_I63),
                    _index(tcp_syn_recv_timeout_ns, "tcp_syn_recv_timeout_ns", 0, MAX_I63)]
        learn_rate = _index(mac_learn_rate_per_s, "mac_learn_rate_per_s", 0, 10**9)
        learn_burst = _index(mac_learn_burst, "mac_learn_burst", 1, 10**9)
        npeers = _index(max_peers, "max_peers", 1, MAX_PEERS_LIMIT)
        # the C tables index entries with 32-bit references
        if mts > (1 << 30):
            raise ValueError(f"mac_table_size {mts} is beyond what this build supports (2**30)")
        if cts > (1 << 29):
            raise ValueError(f"conntrack_size {cts} is beyond what this build supports (2**29)")
        if mhp > (1 << 24):
            raise ValueError(f"max_hostports {mhp} is beyond what this build supports (2**24)")
        c = <Core *>calloc(1, sizeof(Core))
        if c == NULL:
            raise MemoryError()
        self.c = c
        c.max_ports = mp
        c.mac_table_size = mts
        c.conntrack_size = cts
        c.max_hostports = mhp
        c.vnet_hdr_len = H
        c.mac_aging_ns = aging
        c.pf_min_entries = PF_MIN_ENTRIES
        c.mac_learn_rate = learn_rate
        c.mac_learn_burst = learn_burst
        for i in range(8):
            c.ct_timeout[i] = timeouts[i]
        mac_slots = pow2_at_least(2 * <uint64_t>mts)
        if mac_slots < 16:
            mac_slots = 16
        ct_slots = pow2_at_least(4 * <uint64_t>cts)
        if ct_slots < 16:
            ct_slots = 16
        rule_slots = pow2_at_least(2 * <uint64_t>mhp)
        if rule_slots < 16:
            rule_slots = 16
        c.mac_mask = mac_slots - 1
        c.mac_shift = 64 - log2_u64(mac_slots)
        c.ct_mask = ct_slots - 1
        c.rule_mask = rule_slots - 1
        c.ports = <PortState *>calloc(mp, sizeof(PortState))
        c.pc = <uint64_t *>calloc(mp * N_PC, sizeof(uint64_t))
        c.up_list = <uint16_t *>calloc(mp, sizeof(uint16_t))
        c.mac = <MacEntry *>table_alloc(mac_slots * sizeof(MacEntry))
        c.ct = <CtEntry *>table_alloc(cts * sizeof(CtEntry))
        c.ct_slots = <CtSlot *>table_alloc(ct_slots * sizeof(CtSlot))
        c.ct_portcnt = <uint32_t *>calloc(65536, sizeof(uint32_t))
        c.rules = <HpRule *>calloc(mhp, sizeof(HpRule))
        c.rule_slots = <uint32_t *>calloc(rule_slots, sizeof(uint32_t))
        c.shapers = <Shaper *>calloc(mp * 2, sizeof(Shaper))
        c.active = <uint32_t *>calloc(mp * 2, sizeof(uint32_t))
        c.mac_ports = <MacPort *>calloc(mp, sizeof(MacPort))
        c.flood = <uint8_t *>calloc(mp, 1)
        c.ct_ev_next = <uint32_t *>calloc(cts, sizeof(uint32_t))
        c.ct_ev_prev = <uint32_t *>calloc(cts, sizeof(uint32_t))
        c.max_peers = npeers
        c.host_port = -1
        c.peer_mask = pow2_at_least(2 * <uint64_t>npeers) - 1
        c.cidr_mask = pow2_at_least(2 * C_MAX_PEER_CIDRS * <uint64_t>npeers) - 1
        c.podip_mask = pow2_at_least(2 * C_MAX_IPS_PER_PORT * <uint64_t>mp) - 1
        c.peers = <Peer *>calloc(npeers, sizeof(Peer))
        c.peer_slots = <VxSlot *>calloc(c.peer_mask + 1, sizeof(VxSlot))
        c.cidr_slots = <VxSlot *>calloc(c.cidr_mask + 1, sizeof(VxSlot))
        c.podip_slots = <VxSlot *>calloc(c.podip_mask + 1, sizeof(VxSlot))
        if c.peers == NULL or c.peer_slots == NULL or c.cidr_slots == NULL or c.podip_slots == NULL:
            raise MemoryError("cannot allocate the VXLAN tables")
        if (c.mac_ports == NULL or c.flood == NULL or c.ports == NULL or c.pc == NULL or c.up_list == NULL or c.mac == NULL or c.ct == NULL
                or c.ct_slots == NULL or c.ct_portcnt == NULL or c.rules == NULL
                or c.rule_slots == NULL or c.shapers == NULL or c.active == NULL
                or c.ct_ev_next == NULL or c.ct_ev_prev == NULL):
            raise MemoryError("cannot allocate the datapath tables")
        # free list of conntrack entries: 0, 1, 2, ...
        ncts = cts
        for i in range(ncts):
            c.ct[i].next_free = i + 2 if i + 1 < ncts else 0
        c.ct_free = 1
        self.max_ports = mp
        self.mac_table_size = mts
        self.conntrack_size = cts
        self.max_hostports = mhp
        self.vnet_hdr_len = H
        self.mac_aging_ns = aging

    def __dealloc__(self):
        core_free(self.c)
        self.c = NULL

    # ------------------------------------------------------------------ ports

    cdef int _idle(self) except -1:
        # one call at a time: process()/drain() run without the GIL, so a second thread
        # calling in meanwhile would see (and change) tables in the middle of a batch
        if self.busy:
            raise RuntimeError("Datapath is busy in process()/drain() on another thread; "
                               "calls must be serialized")
        return 0

    cdef PortState *_port(self, port_id) except NULL:
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        if not self.c.ports[pid].present:
            raise ValueError(f"port {pid} is not added")
        return &self.c.ports[pid]

    cdef void _rebuild_up_list(self):
        cdef uint32_t i, n = 0
        for i in range(self.c.max_ports):
            if self.c.ports[i].present and self.c.ports[i].up:
                self.c.up_list[n] = i
                n += 1
        self.c.n_up = n
        self.c.host_port = -1          # VXLAN: decapsulation to the gateway goes to the lowest host port
        for i in range(self.c.max_ports):
            if self.c.ports[i].present and self.c.ports[i].kind == C_PORT_HOST:
                self.c.host_port = i
                break
        self._rebuild_flood()

    cdef void _rebuild_flood(self):
        # D41: flood_classes(); up ports without an ingress shaper
        cdef uint32_t i
        cdef PortState *ps
        for i in range(self.c.max_ports):
            ps = &self.c.ports[i]
            self.c.flood[i] = 0
            if ps.present and ps.up and not self.c.shapers[i * 2 + C_INGRESS].active:
                self.c.flood[i] = C_FLOOD_MEMBER | (C_FLOOD_UNKNOWN_MEMBER if ps.kind != C_PORT_POD else 0)

    def flood_classes(self):
        """uint8[max_ports], a read-only view kept current: bit FLOOD_MEMBER set for the ports an
        OUT_FLOOD output is written to, FLOOD_UNKNOWN_MEMBER for OUT_FLOOD_UNKNOWN (the I/O
        layer still skips the in port). Ports with an ingress shaper are in neither: they get
        their copy through the shaper's queue (D41)."""
        return self._wrap(self.c.flood, self.c.max_ports, np.dtype(np.uint8))

    cdef void _rebuild_active(self):
        cdef uint32_t i, n = 0
        for i in range(self.c.max_ports):
            self.c.ports[i].shaped = 0
        for i in range(self.c.max_ports * 2):
            if self.c.shapers[i].active:
                self.c.active[n] = i
                n += 1
                self.c.ports[i // 2].shaped |= 1 << (i % 2)
        self.c.n_active = n
        self._rebuild_flood()

    def add_port(self, port_id, kind):
        self._idle()
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        if self.c.ports[pid].present:
            raise ValueError(f"port {pid} is already added")
        if isinstance(kind, bool) or kind not in (C_PORT_POD, C_PORT_HOST, C_PORT_UPLINK):
            raise ValueError(f"port kind must be PORT_POD, PORT_HOST or PORT_UPLINK (0, 1, 2), got {kind!r}")
        cdef PortState *ps = &self.c.ports[pid]
        memset(ps, 0, sizeof(PortState))
        ps.present = 1
        ps.kind = int(kind)
        ps.up = 1
        ps.antispoof = int(kind) == C_PORT_POD
        memset(self.c.pc + <uint64_t>pid * N_PC, 0, N_PC * sizeof(uint64_t))
        memset(&self.c.mac_ports[pid], 0, sizeof(MacPort))
        self.c.mac_ports[pid].tokens = self.c.mac_learn_burst * <uint64_t>C_SEC_NS
        self._rebuild_up_list()

    def remove_port(self, port_id):
        self._idle()
        cdef PortState *ps = self._port(port_id)
        cdef uint32_t pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        cdef uint32_t i
        self._drop_shaper(pid, C_EGRESS)
        self._drop_shaper(pid, C_INGRESS)
        mac_remove_port(self.c, pid)
        for i in range(self.c.max_hostports):
            if self.c.rules[i].used and self.c.rules[i].pod_port_id == pid:
                self._remove_rule(i)
        cdef uint32_t left = self.c.ct_count   # used entries not visited yet (the scan stops at 0)
        for i in range(self.c.conntrack_size):
            if not left:
                break
            if not self.c.ct[i].used:
                continue
            left -= 1
            if self.c.ct[i].in_port == pid or self.c.ct[i].out_port == pid:
                ct_delete(self.c, i)
                self.c.gc[GC_CT_DELETED] += 1
        memset(ps, 0, sizeof(PortState))
        memset(&self.c.mac_ports[pid], 0, sizeof(MacPort))
        self._own_keys()
        if self.c.vtep_set and self.c.vtep_port == pid:
            self.c.vtep_set = 0
        vx_podip_rebuild(self.c)
        self._rebuild_up_list()

    def set_port_up(self, port_id, up):
        self._idle()
        cdef PortState *ps = self._port(port_id)
        ps.up = bool(up)
        self._rebuild_up_list()

    def bind_port(self, port_id, mac=None, ips=None):
        self._idle()
        cdef PortState *ps = self._port(port_id)
        mac_b = None if mac is None else _bytes_of(mac, "mac", (6,))
        ips_set = None
        if ips is not None:
            ips_set = _unique_addrs(ips, " or None", C_MAX_IPS_PER_PORT, "ips per port", "ip")
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        # D42: the bound MAC is a static FDB entry (vlan 0) of this port
        cdef Core *c = self.c
        cdef uint64_t old_key = mac_key(0, ps.mac) if ps.mac_bound else 0
        cdef uint64_t new_key = 0
        cdef uint8_t mbuf[8]
        cdef int64_t i
        cdef uint32_t p
        cdef bint any_learned = False
        if mac_b is not None:
            memset(mbuf, 0, 8)
            memcpy(mbuf, <const char *>mac_b, 6)
            new_key = mac_key(0, mbuf)
            i = mac_find(c, new_key)
            if i < 0 and new_key != old_key and c.mac_count >= c.mac_table_size:
                for p in range(c.max_ports):
                    if c.mac_ports[p].n:
                        any_learned = True
                if not any_learned:
                    raise ValueError(f"the MAC table ({c.mac_table_size} entries) holds only bound MACs; "
                                     f"cannot bind mac {mac_b.hex(':')}")
        if old_key != 0 and old_key != new_key:
            i = mac_find(c, old_key)
            if i >= 0 and c.mac[i].static and c.mac[i].port == pid:
                mac_delete(c, <uint64_t>i)
        if new_key != 0:              # (a MAC bound elsewhere moves here: the latest binding owns it)
            i = mac_find(c, new_key)
            if i >= 0:
                mac_delete(c, <uint64_t>i)
            elif c.mac_count >= c.mac_table_size:
                mac_evict(c, -1)
            i = mac_insert(c, new_key, <uint16_t>pid, 0)
            c.mac[i].static = 1
        ps.mac_bound = mac_b is not None
        memset(ps.mac, 0, 6)
        if mac_b is not None:
            memcpy(ps.mac, <const char *>mac_b, 6)
        ps.ips_bound = ips_set is not None
        ps.n_ip4 = 0
        ps.n_ip6 = 0
        memset(ps.ip4, 0, sizeof(ps.ip4))
        memset(ps.ip6, 0, sizeof(ps.ip6))
        if ips_set is not None:
            for b in ips_set:
                if len(b) == 4:
                    ps.ip4[ps.n_ip4] = int.from_bytes(b, "big")
                    ps.n_ip4 += 1
                else:
                    memcpy(ps.ip6[ps.n_ip6], <const char *>b, 16)
                    ps.n_ip6 += 1
        ps.mac48 = int.from_bytes(mac_b, "big") if mac_b is not None else 0
        ps.bound = ps.mac_bound or ps.ips_bound
        self._own_keys()
        vx_podip_rebuild(c)

    cdef void _own_keys(self):
        # PortState.own_key of every port, after the static entries changed (bind, remove)
        cdef Core *c = self.c
        cdef uint32_t p
        cdef uint64_t key
        cdef int64_t i
        for p in range(c.max_ports):
            c.ports[p].own_key = 0
            if c.ports[p].present and c.ports[p].mac_bound:
                key = mac_key(0, c.ports[p].mac)
                i = mac_find(c, key)
                if i >= 0 and c.mac[i].static and c.mac[i].port == p:
                    c.ports[p].own_key = key

    def set_antispoof(self, port_id, enabled):
        self._idle()
        cdef PortState *ps = self._port(port_id)
        ps.antispoof = bool(enabled)

    def set_gateway(self, mac, ipv4=None, ipv6=None):
        self._idle()
        mac_b = _bytes_of(mac, "gateway mac", (6,))
        v4 = None if ipv4 is None else _bytes_of(ipv4, "gateway ipv4", (4,))
        v6 = None if ipv6 is None else _bytes_of(ipv6, "gateway ipv6", (16,))
        cdef Core *c = self.c
        c.gw_mac_set = 1
        memcpy(c.gw_mac, <const char *>mac_b, 6)
        c.gw_ip4_set = v4 is not None
        memset(c.gw_ip4, 0, 16)
        if v4 is not None:
            _put_addr16(c.gw_ip4, v4)
        c.gw_ip6_set = v6 is not None
        memset(c.gw_ip6, 0, 16)
        if v6 is not None:
            memcpy(c.gw_ip6, <const char *>v6, 16)

    def set_node_addresses(self, ips):
        self._idle()
        addrs = _unique_addrs(ips, "", C_MAX_NODE_ADDRESSES, "node addresses", "node address")
        cdef Core *c = self.c
        c.n_node = 0
        for b in addrs:
            c.node_family[c.n_node] = 4 if len(b) == 4 else 6
            _put_addr16(c.node_ip[c.n_node], b)
            c.n_node += 1

    # ------------------------------------------------------------------ VXLAN (vxlan.pxi, docs/datapath.md "VXLAN")

    def set_vtep(self, port_id, ip, outer_mac, vtep_mac, vni, udp_port=C_VXLAN_PORT, mtu=1500):
        self._idle()
        self._port(port_id)
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        ip_b = _bytes_of(ip, "vtep ip", (4,))
        omac = _bytes_of(outer_mac, "outer_mac", (6,))
        vmac = _bytes_of(vtep_mac, "vtep_mac", (6,))
        v = _index(vni, "vni", 0, 2**24 - 1)
        up = _index(udp_port, "udp_port", 1, 65535)
        m = _index(mtu, "mtu", 68, 65535)
        cdef Core *c = self.c
        c.vtep_port = pid
        memcpy(c.vtep_ip, <const char *>ip_b, 4)
        memcpy(c.vtep_outer_mac, <const char *>omac, 6)
        memcpy(c.vtep_mac, <const char *>vmac, 6)
        c.vni = v
        c.vxlan_port = up
        c.vtep_mtu = m
        c.vtep_set = 1

    def clear_vtep(self):
        self._idle()
        self.c.vtep_set = 0

    def vtep(self):
        self._idle()
        cdef Core *c = self.c
        if not c.vtep_set:
            return None
        return dict(port=int(c.vtep_port), ip=bytes(c.vtep_ip[:4]), outer_mac=bytes(c.vtep_outer_mac[:6]),
                    vtep_mac=bytes(c.vtep_mac[:6]), vni=int(c.vni), udp_port=int(c.vxlan_port),
                    mtu=int(c.vtep_mtu))

    def set_peer(self, ip, vtep_mac, underlay_mac, cidrs):
        self._idle()
        key = _bytes_of(ip, "peer ip", (4,))
        vmac = _bytes_of(vtep_mac, "vtep_mac", (6,))
        umac = None if underlay_mac is None else _bytes_of(underlay_mac, "underlay_mac", (6,))
        items = _peer_cidrs(cidrs)
        cdef Core *c = self.c
        cdef const uint8_t *kp = <const uint8_t *><const char *>key
        cdef int32_t pi = vx_peer_find(c, kp)
        cdef uint32_t ref, j, idx
        cdef bytes a16
        cdef Peer *pe
        for family, plen, addr in items:
            a16 = _addr16(addr)
            ref = vx_cidr_find(c, family, plen, <const uint8_t *><const char *>a16,
                               vx_cidr_hash(family, plen, <const uint8_t *><const char *>a16))
            if ref and <int32_t>((ref - 1) >> 3) != pi:
                owner = bytes(c.peers[(ref - 1) >> 3].ip[:4])
                raise ValueError(f"cidr {_cidr_text(addr, plen)} is already held by peer {owner.hex()}")
        if pi < 0 and c.n_peers >= c.max_peers:
            raise ValueError(f"peer table full: at most {c.max_peers} peers")
        if pi >= 0:
            vx_cidrs_index(c, pi, 0)
            idx = pi
        else:
            idx = 0
            while c.peers[idx].used:
                idx += 1
            pe = &c.peers[idx]
            memset(pe, 0, sizeof(Peer))
            pe.used = 1
            memcpy(pe.ip, kp, 4)
            vx_slot_insert(c.peer_slots, c.peer_mask, vx_peer_hash(kp), idx + 1)
            c.n_peers += 1
        pe = &c.peers[idx]
        memcpy(pe.vtep_mac, <const char *>vmac, 6)
        pe.has_underlay = umac is not None
        memset(pe.underlay_mac, 0, 6)
        if umac is not None:
            memcpy(pe.underlay_mac, <const char *>umac, 6)
        pe.n_cidrs = len(items)
        for j in range(pe.n_cidrs):
            family, plen, addr = items[j]
            a16 = _addr16(addr)
            pe.cidr_family[j] = family
            pe.cidr_plen[j] = plen
            memcpy(pe.cidr_addr[j], <const char *>a16, 16)
        vx_cidrs_index(c, idx, 1)

    def remove_peer(self, ip):
        self._idle()
        key = _bytes_of(ip, "peer ip", (4,))
        cdef Core *c = self.c
        cdef const uint8_t *kp = <const uint8_t *><const char *>key
        cdef int32_t pi = vx_peer_find(c, kp)
        if pi < 0:
            raise ValueError(f"no peer {key.hex()}")
        vx_cidrs_index(c, pi, 0)
        vx_slot_remove(c.peer_slots, c.peer_mask, vx_peer_hash(kp), pi + 1)
        memset(&c.peers[pi], 0, sizeof(Peer))
        c.n_peers -= 1

    def peers(self):
        self._idle()
        cdef Core *c = self.c
        cdef Peer *pe
        cdef uint32_t i, j
        out = []
        for i in range(c.max_peers):
            pe = &c.peers[i]
            if not pe.used:
                continue
            cidrs = []
            for j in range(pe.n_cidrs):
                alen = 4 if pe.cidr_family[j] == 4 else 16
                cidrs.append((bytes(pe.cidr_addr[j][16 - alen:16]), int(pe.cidr_plen[j])))
            out.append(dict(ip=bytes(pe.ip[:4]), vtep_mac=bytes(pe.vtep_mac[:6]),
                            underlay_mac=bytes(pe.underlay_mac[:6]) if pe.has_underlay else None,
                            cidrs=cidrs, tx_packets=pe.tx_packets, tx_bytes=pe.tx_bytes,
                            rx_packets=pe.rx_packets, rx_bytes=pe.rx_bytes,
                            drop_unresolved=pe.drop_unresolved))
        out.sort(key=lambda d: d["ip"])
        return out

    # ------------------------------------------------------------------ shapers

    cdef void _drop_shaper(self, uint32_t pid, int direction):
        cdef Shaper *s = &self.c.shapers[pid * 2 + direction]
        if not s.active:
            return
        self.c.pc[pid * N_PC + PC_DROP_QUEUE_FULL] += s.queue_packets
        self.c.gc[GC_QUEUE_FULL] += s.queue_packets
        free(s.qbuf)
        memset(s, 0, sizeof(Shaper))
        self._rebuild_active()

    def set_shaper(self, port_id, direction, rate_bps, burst_bits, queue_bytes=0):
        self._idle()
        self._port(port_id)
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        d = _direction(direction)
        rate = _index(rate_bps, "rate_bps", 0, MAX_I63)
        burst = _index(burst_bits, "burst_bits", 0, MAX_I63)
        qbytes = _index(queue_bytes, "queue_bytes", 0, MAX_I63)
        if rate == 0:
            self._drop_shaper(pid, d)
            return
        limit = qbytes or max(131106, rate // 320, min(burst // 8, 16777216))
        cdef Shaper *s = &self.c.shapers[pid * 2 + d]
        cdef u128 cap = <u128>(<uint64_t>burst) * NS_PER_S
        if not s.active:
            memset(s, 0, sizeof(Shaper))
            s.active = 1
            s.credit = cap
        elif s.credit > cap:
            s.credit = cap
        s.rate_bps = rate
        s.burst_bits = burst
        s.queue_limit_bytes = limit
        self._rebuild_active()

    def clear_shaper(self, port_id, direction):
        self._idle()
        self._port(port_id)
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        d = _direction(direction)
        self._drop_shaper(pid, d)

    def shaper_state(self, port_id, direction):
        self._idle()
        self._port(port_id)
        pid = _index(port_id, "port_id", 0, self.max_ports - 1)
        d = _direction(direction)
        cdef Shaper *s = &self.c.shapers[pid * 2 + d]
        if not s.active:
            return None
        credit = (int(u128_hi(s.credit)) << 64) | int(u128_lo(s.credit))
        return dict(rate_bps=s.rate_bps, burst_bits=s.burst_bits, credit=credit,
                    queue_bytes=s.queue_bytes, queue_packets=s.queue_packets,
                    queue_limit_bytes=s.queue_limit_bytes)

    def next_departure_ns(self):
        self._idle()
        return next_departure_c(self.c)

    # ------------------------------------------------------------------ hostPort rules

    cdef void _flush_udp(self, uint16_t host_port):
        cdef uint32_t i
        cdef Core *c = self.c
        cdef uint32_t left = c.ct_count        # used entries not visited yet (the scan stops at 0)
        if not c.ct_portcnt[host_port]:         # no entry's original destination is this port
            return
        for i in range(c.conntrack_size):
            if not left:
                break
            if not c.ct[i].used:
                continue
            left -= 1
            if c.ct[i].orig.proto == 17 and c.ct[i].orig.dport == host_port:
                ct_delete(c, i)
                c.gc[GC_CT_DELETED] += 1

    cdef void _remove_rule(self, uint32_t rid):
        cdef uint16_t hp = self.c.rules[rid].host_port
        memset(&self.c.rules[rid], 0, sizeof(HpRule))
        rules_reindex(self.c)
        self._flush_udp(hp)

    def add_hostport(self, proto, host_port, pod_ip, container_port, pod_port_id, host_ip=None):
        self._idle()
        pr = _proto(proto)
        hport = _index(host_port, "host_port", 1, 65535)
        cport = _index(container_port, "container_port", 1, 65535)
        pod = _bytes_of(pod_ip, "pod_ip", (4, 16))
        host = None if host_ip is None else _bytes_of(host_ip, "host_ip", (4, 16))
        if host is not None and len(host) != len(pod):
            raise ValueError(f"host_ip {host.hex()} and pod_ip {pod.hex()} are of different families")
        self._port(pod_port_id)
        pid = _index(pod_port_id, "port_id", 0, self.max_ports - 1)
        cdef Core *c = self.c
        cdef uint8_t family = 4 if len(pod) == 4 else 6
        cdef bytes host16 = _addr16(host) if host is not None else bytes(16)
        cdef int32_t rid = rule_find(c, pr, hport, family, host is None, <const uint8_t *><const char *>host16)
        cdef uint32_t i, n = 0
        if rid < 0:
            for i in range(c.max_hostports):
                if c.rules[i].used:
                    n += 1
                elif rid < 0:
                    rid = i
            if n >= c.max_hostports:
                raise ValueError(f"hostPort table full: at most {c.max_hostports} rules")
        cdef HpRule *r = &c.rules[rid]
        memset(r, 0, sizeof(HpRule))
        r.used = 1
        r.proto = pr
        r.any_ip = host is None
        r.family = family
        r.host_port = hport
        r.container_port = cport
        r.pod_port_id = pid
        r.rid = rid
        memcpy(r.host_ip, <const char *>host16, 16)
        _put_addr16(r.pod_ip, pod)
        rules_reindex(c)
        self._flush_udp(hport)
        return rid

    def remove_hostport(self, proto, host_port, host_ip=None):
        self._idle()
        pr = _proto(proto)
        hport = _index(host_port, "host_port", 1, 65535)
        host = None if host_ip is None else _bytes_of(host_ip, "host_ip", (4, 16))
        cdef Core *c = self.c
        cdef int32_t rid
        rids = []
        cdef uint8_t h16[16]
        if host is not None:
            _put_addr16(h16, host)
            rid = rule_find(c, pr, hport, 4 if len(host) == 4 else 6, 0, h16)
            if rid >= 0:
                rids.append(rid)
        else:
            for fam in (4, 6):
                rid = rule_find(c, pr, hport, fam, 1, ZERO16)
                if rid >= 0:
                    rids.append(rid)
        if not rids:
            where = host.hex() if host is not None else "any node address"
            raise ValueError(f"no hostPort rule for proto {pr} port {hport} on {where}")
        for rid in rids:
            self._remove_rule(rid)

    def hostports(self):
        self._idle()
        out = []
        cdef HpRule *r
        cdef uint32_t i
        for i in range(self.c.max_hostports):
            r = &self.c.rules[i]
            if not r.used:
                continue
            alen = 4 if r.family == 4 else 16
            pod = bytes(r.pod_ip[16 - alen:16])
            host = None if r.any_ip else bytes(r.host_ip[16 - alen:16])
            out.append(dict(id=int(r.rid), proto=int(r.proto), host_port=int(r.host_port), host_ip=host,
                            pod_ip=pod, container_port=int(r.container_port), pod_port_id=int(r.pod_port_id)))
        return out

    # ------------------------------------------------------------------ counters and tables

    def port_counters(self):
        self._idle()
        cdef cnp.ndarray out = np.empty((self.max_ports, N_PC), dtype=np.uint64)
        memcpy(cnp.PyArray_DATA(out), self.c.pc, self.max_ports * N_PC * sizeof(uint64_t))
        return out

    def global_counters(self):
        self._idle()
        cdef cnp.ndarray out = np.empty(N_GC, dtype=np.uint64)
        memcpy(cnp.PyArray_DATA(out), self.c.gc, N_GC * sizeof(uint64_t))
        return out

    cdef object _wrap(self, void *ptr, Py_ssize_t count, object dtype):
        cdef cnp.npy_intp shape[1]
        shape[0] = count
        cnp.Py_INCREF(dtype)          # PyArray_NewFromDescr steals a reference to the descr
        arr = PyArray_NewFromDescr(<PyTypeObject *>np.ndarray, <cnp.dtype>dtype, 1, shape, NULL, ptr,
                                   cnp.NPY_ARRAY_CARRAY_RO, None)
        cnp.set_array_base(arr, self)  # the Datapath outlives the view
        return arr

    def _tune(self, prefetch=None, prefetch_min_entries=None):
        """Benchmarking knob (not API): prefetch=False stops process() from prefetching at
        all; prefetch_min_entries is the table size above which it prefetches."""
        self._idle()
        if prefetch is not None:
            self.c.pf_off = not prefetch
        if prefetch_min_entries is not None:
            self.c.pf_min_entries = _index(prefetch_min_entries, "prefetch_min_entries", 0, 2**32 - 1)

    def mac_table_raw(self):
        """The MAC table's slots (MAC_SLOT_DTYPE), a read-only view without copy. key == 0:
        empty slot; else key = 1<<63 | vlan<<48 | MAC. Valid while this Datapath lives."""
        return self._wrap(self.c.mac, self.c.mac_mask + 1, MAC_SLOT_DTYPE)

    def conntrack_raw(self):
        """The conntrack entries (CT_ENTRY_DTYPE; used == 0: free), a read-only view without copy."""
        return self._wrap(self.c.ct, self.c.conntrack_size, CT_ENTRY_DTYPE)

    def fdb(self):
        self._idle()
        raw = self.mac_table_raw()
        keys = raw["key"]
        sel = np.nonzero(keys)[0]
        used = raw[sel]
        order = np.argsort(used["key"], kind="stable")
        used = used[order]
        k = used["key"]
        out = np.zeros(len(used), dtype=_consts.FDB_DTYPE)
        out["vlan"] = (k >> np.uint64(48)) & np.uint64(0xfff)
        shifts = np.array([40, 32, 24, 16, 8, 0], dtype=np.uint64)
        out["mac"] = ((k[:, None] >> shifts[None, :]) & np.uint64(0xff)).astype(np.uint8)
        out["port"] = used["port"]
        out["last_seen_ns"] = used["last_seen_ns"]
        out["static"] = used["static"]
        return out

    def conntrack(self):
        self._idle()
        raw = self.conntrack_raw()
        e = raw[raw["used"] != 0]
        o = e["orig"]
        r = e["reply"]
        keys = [e["orig"]["family"], o["dport"], o["sport"]]
        keys += [o["dst"][:, i] for i in range(15, -1, -1)]
        keys += [o["src"][:, i] for i in range(15, -1, -1)]
        keys.append(o["proto"])
        order = np.lexsort(keys) if len(e) else np.zeros(0, dtype=np.intp)
        e = e[order]
        o = e["orig"]
        r = e["reply"]
        out = np.zeros(len(e), dtype=_consts.CT_DTYPE)
        out["proto"] = o["proto"]
        out["state"] = e["state"]
        out["hairpin"] = e["hairpin"]
        out["family"] = o["family"]
        out["orig_src"] = o["src"]
        out["orig_dst"] = o["dst"]
        out["orig_sport"] = o["sport"]
        out["orig_dport"] = o["dport"]
        out["reply_src"] = r["src"]
        out["reply_dst"] = r["dst"]
        out["reply_sport"] = r["sport"]
        out["reply_dport"] = r["dport"]
        out["in_port"] = e["in_port"]
        out["out_port"] = e["out_port"]
        out["orig_src_mac"] = e["orig_src_mac"]
        out["orig_dst_mac"] = e["orig_dst_mac"]
        out["expires_ns"] = e["expires_ns"]
        out["packets"] = e["packets"]
        out["bytes"] = e["bytes"]
        return out

    def mac_sweep(self, now_ns):
        self._idle()
        now = _index(now_ns, "now_ns", 0, MAX_I63)
        return int(mac_sweep_c(self.c, now))

    def conntrack_sweep(self, now_ns):
        self._idle()
        now = _index(now_ns, "now_ns", 0, MAX_I63)
        return int(ct_sweep_c(self.c, now))

    # ------------------------------------------------------------------ batches

    cdef uint64_t _check_now(self, now_ns) except? 0:
        cdef uint64_t now = <uint64_t>_int_fast(now_ns, "now_ns", 0, MAX_I63)
        if self.c.have_now and now < self.c.last_now_ns:
            raise ValueError(f"now_ns went backwards: {now} < {self.c.last_now_ns}")
        return now

    def process(self, buf, offsets, lengths, in_ports, out_ports, n, now_ns):
        """Runs a batch through the pipeline (docs/datapath.md); fills out_ports[:n]."""
        self._idle()
        cdef cnp.ndarray a_buf = _check_buf(buf, "buf")
        cdef cnp.ndarray a_off = _array(offsets, "offsets", cnp.NPY_UINT32, False)
        cdef cnp.ndarray a_len = _array(lengths, "lengths", cnp.NPY_UINT32, False)
        cdef cnp.ndarray a_in = _array(in_ports, "in_ports", cnp.NPY_UINT16, False)
        cdef cnp.ndarray a_out = _array(out_ports, "out_ports", cnp.NPY_INT32, True)
        cdef Py_ssize_t m = cnp.PyArray_DIM(a_off, 0)
        if cnp.PyArray_DIM(a_len, 0) < m:
            m = cnp.PyArray_DIM(a_len, 0)
        if cnp.PyArray_DIM(a_in, 0) < m:
            m = cnp.PyArray_DIM(a_in, 0)
        if cnp.PyArray_DIM(a_out, 0) < m:
            m = cnp.PyArray_DIM(a_out, 0)
        cdef Py_ssize_t cnt = _int_fast(n, "n", 0, m)
        cdef uint64_t now = self._check_now(now_ns)
        cdef Core *c = self.c
        cdef uint8_t *base = <uint8_t *>cnp.PyArray_DATA(a_buf)
        cdef uint64_t buflen = <uint64_t>cnp.PyArray_DIM(a_buf, 0)
        cdef uint8_t *p_off = <uint8_t *>cnp.PyArray_DATA(a_off)
        cdef uint8_t *p_len = <uint8_t *>cnp.PyArray_DATA(a_len)
        cdef uint8_t *p_in = <uint8_t *>cnp.PyArray_DATA(a_in)
        cdef uint8_t *p_out = <uint8_t *>cnp.PyArray_DATA(a_out)
        cdef Py_ssize_t s_off = cnp.PyArray_STRIDE(a_off, 0)
        cdef Py_ssize_t s_len = cnp.PyArray_STRIDE(a_len, 0)
        cdef Py_ssize_t s_in = cnp.PyArray_STRIDE(a_in, 0)
        cdef Py_ssize_t s_out = cnp.PyArray_STRIDE(a_out, 0)
        cdef Py_ssize_t bad
        cdef int why = 0
        cdef uint64_t off, length
        cdef uint32_t H = c.vnet_hdr_len
        self.busy = True
        with nogil:
            bad = process_batch_c(c, base, buflen, p_off, s_off, p_len, s_len, p_in, s_in, p_out, s_out,
                                  cnt, now, &why)
        self.busy = False
        if bad >= 0:
            off = offsets[bad]
            length = lengths[bad]
            if why == 1:
                raise ValueError(f"in_ports[{bad}] = {in_ports[bad]} is not below max_ports {self.max_ports}")
            if why == 2:
                raise ValueError(f"lengths[{bad}] = {length} exceeds MAX_FRAME {C_MAX_FRAME}")
            raise ValueError(f"packet {bad} (offset {off}, length {length}, vnet header {H}) "
                             f"does not lie inside buf of {buflen} bytes")

    def drain(self, now_ns, out_buf, out_offsets, out_lengths, out_in_ports, out_ports, max_pkts):
        """Releases due queued packets into out_buf (docs/datapath.md, D16); returns the count."""
        self._idle()
        cdef cnp.ndarray a_buf = _check_buf(out_buf, "out_buf")
        cdef cnp.ndarray a_off = _array(out_offsets, "out_offsets", cnp.NPY_UINT32, True)
        cdef cnp.ndarray a_len = _array(out_lengths, "out_lengths", cnp.NPY_UINT32, True)
        cdef cnp.ndarray a_in = _array(out_in_ports, "out_in_ports", cnp.NPY_UINT16, True)
        cdef cnp.ndarray a_out = _array(out_ports, "out_ports", cnp.NPY_INT32, True)
        cdef Py_ssize_t m = min(cnp.PyArray_DIM(a_off, 0), cnp.PyArray_DIM(a_len, 0),
                                cnp.PyArray_DIM(a_in, 0), cnp.PyArray_DIM(a_out, 0))
        cdef Py_ssize_t mp = _index(max_pkts, "max_pkts", 0, m)
        cdef uint64_t now = self._check_now(now_ns)
        cdef Core *c = self.c
        cdef Py_ssize_t got
        c.last_now_ns = now
        c.have_now = 1
        self.busy = True
        with nogil:
            got = drain_c(c, now, <uint8_t *>cnp.PyArray_DATA(a_buf), cnp.PyArray_DIM(a_buf, 0),
                          <uint8_t *>cnp.PyArray_DATA(a_off), cnp.PyArray_STRIDE(a_off, 0),
                          <uint8_t *>cnp.PyArray_DATA(a_len), cnp.PyArray_STRIDE(a_len, 0),
                          <uint8_t *>cnp.PyArray_DATA(a_in), cnp.PyArray_STRIDE(a_in, 0),
                          <uint8_t *>cnp.PyArray_DATA(a_out), cnp.PyArray_STRIDE(a_out, 0), mp)
        self.busy = False
        return got

    def trace(self, frame, in_port, now_ns):
        """The stage-by-stage decisions for one frame, changing no state (D35)."""
        self._idle()
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            raise ValueError(f"frame must be bytes, got {type(frame).__name__}")
        frame = bytes(frame)
        if len(frame) > C_MAX_FRAME:
            raise ValueError(f"frame of {len(frame)} bytes exceeds MAX_FRAME {C_MAX_FRAME}")
        pid = _index(in_port, "in_port", 0, self.max_ports - 1)
        cdef uint64_t now = self._check_now(now_ns)
        cdef uint32_t H = self.vnet_hdr_len
        cdef bytearray fb = bytearray(C_ENCAP_HEADROOM + H) + bytearray(frame)     # room to encapsulate
        cdef uint8_t *fp = <uint8_t *>(<char *>fb)
        cdef Core *d = core_clone(self.c)
        cdef uint32_t length = len(frame)
        cdef uint16_t ip16 = pid
        cdef int i
        if d == NULL:
            raise MemoryError("cannot copy the datapath state for trace()")
        d.tr = <TrRec *>calloc(TR_MAX_RECORDS, sizeof(TrRec))
        if d.tr == NULL:
            core_free(d)
            raise MemoryError()
        d.tr_n = 0
        d.vx_base = fp
        try:
            with nogil:
                process_one(d, fp + C_ENCAP_HEADROOM + H, length, ip16, now, False, True)
            steps = [_consts.trace_step(d.tr[i].stage, d.tr[i].a, d.tr[i].b, length)
                     for i in range(d.tr_n)]
        finally:
            core_free(d)
        return steps


include "io.pxi"
