# Declarations of the datapath core: the constants (generated from
# vswitch/datapath/consts.py into consts.pxi), the C library functions we call, and every
# struct, with a comment on each field. Included first by _datapath.pyx.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.string cimport memcpy, memcmp, memset, memmove
from libc.stdlib cimport malloc, calloc, realloc, free

cdef extern from *:
    """
    typedef unsigned __int128 vsw_u128;
    /* every `cdef inline` function of the core is inlined, whatever its size: the batch
       loop is then one function with no call per packet (GCC declined forward() and
       output_unicast() by its size limits, ~40 instructions a packet in calls and spills;
       bench/core_stages.py). Cython defines CYTHON_INLINE before this block is emitted */
    #undef CYTHON_INLINE
    #define CYTHON_INLINE __inline__ __attribute__((always_inline))
    static inline void vsw_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
    static inline void vsw_prefetchw(const void *p) { __builtin_prefetch(p, 1, 3); }
    static inline uint16_t vsw_load_be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
    static inline uint32_t vsw_load_be32(const uint8_t *p) {
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
    }
    static inline void vsw_store_be16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
    static inline uint64_t vsw_load_u64(const void *p) { uint64_t v; __builtin_memcpy(&v, p, 8); return v; }
    /* zeroed memory for a big table, on transparent huge pages where the kernel allows
       (fewer TLB misses for random lookups in multi-MiB tables) */
    #include <sys/mman.h>
    static void *vsw_table_alloc(size_t n) {
        void *p = NULL;
        size_t align = n >= (1u << 21) ? (1u << 21) : 64;
        if (n == 0) n = 1;
        if (posix_memalign(&p, align, n) != 0) return NULL;
    #ifdef MADV_HUGEPAGE
        if (align == (1u << 21)) madvise(p, n & ~((size_t)(1u << 21) - 1), MADV_HUGEPAGE);
    #endif
        memset(p, 0, n);
        return p;
    }
    /* the 6 bytes at p as a 48-bit big-endian integer; reads p[0..7] (callers pass a MAC
       inside a frame of at least 14 bytes, so p[6], p[7] exist) */
    static inline uint64_t vsw_mac48(const uint8_t *p) {
        return __builtin_bswap64(vsw_load_u64(p)) >> 16;
    }
    """
    # credit in bit*ns: 128-bit so that rate (< 2^63) * elapsed ns (< 2^64) never overflows
    ctypedef unsigned long long u128 "vsw_u128"
    void prefetch "vsw_prefetch"(const void *p) noexcept nogil
    void prefetchw "vsw_prefetchw"(const void *p) noexcept nogil
    uint16_t load_be16 "vsw_load_be16"(const uint8_t *p) noexcept nogil
    uint32_t load_be32 "vsw_load_be32"(const uint8_t *p) noexcept nogil
    void store_be16 "vsw_store_be16"(uint8_t *p, uint16_t v) noexcept nogil
    uint64_t load_u64 "vsw_load_u64"(const void *p) noexcept nogil
    uint64_t mac48 "vsw_mac48"(const uint8_t *p) noexcept nogil
    void *table_alloc "vsw_table_alloc"(size_t n) noexcept nogil


# ---------------------------------------------------------------- constants and counters
# C_* constants, the PC_* / GC_* counter indexes, the DR_* drop reasons with DROP_PC /
# DROP_GC, the TR_* trace events and the SH_* shaper verdicts: generated from
# vswitch/datapath/consts.py by the build (vswitch/datapath/gen_consts.py).
include "consts.pxi"

# parser result kinds (internal)
cdef enum:
    K_L2 = 0          # switched at L2 only (unknown ethertype)
    K_ARP = 1
    K_IPV4 = 2
    K_IPV6 = 3

cdef enum:
    TCP_FIN = 0x01
    TCP_SYN = 0x02
    TCP_RST = 0x04
    TCP_ACK = 0x10

# ---------------------------------------------------------------- structs

ctypedef struct CtKey:
    # one direction of a connection: the 5-tuple as it appears in a packet (40 bytes)
    uint8_t src[16]       # source address; IPv4 as ::ffff:a.b.c.d
    uint8_t dst[16]       # destination address; IPv4 as ::ffff:a.b.c.d
    uint16_t sport        # source port, host byte order
    uint16_t dport        # destination port, host byte order
    uint8_t proto         # 6 TCP or 17 UDP
    uint8_t family        # 4 or 6
    uint8_t pad[2]        # zero (keys are compared as 5 words)

ctypedef struct Pkt:
    # what the parser learned about one frame; offsets count from the frame's first byte.
    # The byte fields parse_frame() zeroes for every frame are adjacent (vlan .. ct_ready),
    # so the compiler merges their initialisation into one or two stores
    uint8_t *p            # the Ethernet frame (in the caller's buffer or a queue)
    uint8_t *vnet         # its virtio-net header (H bytes before p), or NULL when H == 0
    uint32_t len          # frame length in bytes (vnet header excluded)
    uint16_t in_port      # port it arrived on
    uint16_t vlan         # 802.1Q VLAN id (TCI & 0xfff), 0 when untagged
    uint8_t kind          # K_L2, K_ARP, K_IPV4 or K_IPV6
    uint8_t has_l4        # 1: l4_proto/l4_off are valid (headers checked)
    uint8_t nat_ok        # 1: TCP or UDP, not a fragment: may be NAT-tracked
    uint8_t icmp_ok       # 1: ICMP (IPv4) / ICMPv6 with L4, not a fragment: maybe an error (D37)
    uint8_t frag          # FRAG_NONE, FRAG_FIRST (more follow), FRAG_LATER, FRAG_ATOMIC (D39)
    uint8_t l4_proto      # IP protocol / IPv6 next header of the L4 header
    uint8_t ct_ready      # 1: ct_key / ct_hash hold the packet's 5-tuple and its hash
    uint8_t frag_proto    # IPv4 protocol / the IPv6 fragment header's next header (fragments only)
    uint32_t frag_id      # identification (IPv4 16 bits, IPv6 32 bits; fragments only)
    uint32_t l3_off       # offset of the ARP/IPv4/IPv6 header
    uint32_t l4_off       # offset of the TCP/UDP/ICMP header (when has_l4)
    uint32_t l3_end       # offset one past the IP packet (total / payload length)
    # derived from the frame's own bytes at parse time (so the batch loop can compute
    # them a few packets ahead and prefetch what they point at; ext/_datapath.pyx)
    uint64_t src_key      # mac_key(vlan, source MAC); valid when the frame is >= 14 bytes
    uint64_t dst_key      # mac_key(vlan, destination MAC)
    uint32_t ct_hash      # ct_hash(&ct_key)
    CtKey ct_key          # the 5-tuple (set by nat_stage, or ahead by the batch loop)

cdef enum:
    FRAG_NONE = 0
    FRAG_FIRST = 1
    FRAG_LATER = 2
    FRAG_ATOMIC = 3

ctypedef struct FragRec:
    # a fragmented datagram's translation, remembered from its first fragment (D39)
    CtKey key             # the fragment key: src, dst, sport = id >> 16, dport = id & 0xffff,
                          # proto = fragment protocol, family
    uint64_t expires_ns   # forgotten when now >= expires_ns
    uint64_t seq          # Core.frag_seq when remembered (the oldest is replaced first)
    uint8_t used          # 0: empty record
    uint8_t direction     # 0 original, 1 reply
    uint8_t has_src       # 1: new_src is written
    uint8_t has_dst       # 1: new_dst is written
    uint16_t out_port
    uint8_t new_src[16]   # addresses as in the entry (IPv4: ::ffff:a.b.c.d)
    uint8_t new_dst[16]
    uint8_t src_mac[6]    # direction 1: the entry's orig_dst_mac and orig_src_mac
    uint8_t dst_mac[6]

ctypedef struct CtEntry:
    # one tracked connection; indexed from two hash slots (original and reply tuple).
    # Exactly 128 bytes: an entry is two cache lines (the table is 64-byte aligned)
    CtKey orig            # the tuple of the first packet, as received
    CtKey reply           # the tuple replies carry (pod ip/port -> translated source)
    uint64_t expires_ns   # deleted when now >= expires_ns
    uint64_t packets      # packets matched, both directions, the first included
    uint64_t bytes        # frame bytes of those packets
    uint32_t next_free    # free-list link (entry index + 1, 0 = end) while unused
    uint16_t in_port      # port of the first packet (replies go there)
    uint16_t out_port     # the pod port of the rule (original direction goes there)
    uint8_t orig_src_mac[6]   # source MAC of the first frame (replies' destination MAC)
    uint8_t orig_dst_mac[6]   # destination MAC of the first frame (replies' source MAC)
    uint8_t state         # C_CT_* state
    uint8_t hairpin       # 1: the source was SNATed to the gateway address
    uint8_t fin_seen      # TCP: bit 0 FIN seen in original direction, bit 1 in reply
    uint8_t used          # 1 while the entry is live

ctypedef struct CtSlot:
    # one slot of the conntrack hash index (open addressing, linear probing)
    uint32_t ref          # 0 = empty, else (entry index << 1 | direction) + 1
    uint32_t hash         # full 32-bit hash of the key (skips most key compares)

ctypedef struct MacEntry:
    # one slot of the MAC table (open addressing, linear probing, backward-shift delete);
    # 32 bytes so that a slot never straddles two cache lines
    uint64_t key          # 0 = empty; else 1<<63 | vlan<<48 | MAC as a 48-bit big-endian int
    uint64_t last_seen_ns # the now_ns of the latest frame from this MAC (0 for a static entry)
    uint16_t port         # port the MAC was learned on (or is bound to, static)
    uint8_t static        # 1: a bound MAC (D42): never ages, never evicted, never moves
    uint8_t pad0          # zero
    uint32_t prev         # learned entries: the port's next older entry, slot + 1 (0 = none)
    uint32_t next         # learned entries: the port's next newer entry, slot + 1 (0 = none)
    uint32_t pad          # zero

ctypedef struct MacPort:
    # one port's learned MAC entries (a list oldest first, D43) and its learning bucket (D44)
    uint32_t n            # learned (non-static) entries of the port
    uint32_t head         # slot + 1 of its oldest learned entry (0 = none)
    uint32_t tail         # slot + 1 of its newest learned entry (0 = none)
    uint8_t has_last      # 1 once last_ns was set
    uint64_t tokens       # new-MAC tokens in learns * 10^9
    uint64_t last_ns      # time of the latest refill

ctypedef struct PortState:
    # one port's configuration, indexed by port id
    uint8_t present       # 1 after add_port, 0 after remove_port
    uint8_t kind          # C_PORT_POD / C_PORT_HOST / C_PORT_UPLINK
    uint8_t up            # 1 while up (new ports start up)
    uint8_t antispoof     # 1: check source MAC/IPs against the binding
    uint8_t bound         # 1 after bind_port
    uint8_t mac_bound     # 1: bound MAC set (checked, and NAT's destination MAC)
    uint8_t ips_bound     # 1: IP set bound (checked); it may be empty
    uint8_t n_ip4         # number of bound IPv4 addresses
    uint8_t n_ip6         # number of bound IPv6 addresses
    uint8_t shaped        # bit 1 << direction: that shaper of the port is active (a copy of
                          # Shaper.active, set by Datapath._rebuild_active; read per packet)
    uint8_t mac[6]        # bound MAC
    uint64_t mac48        # the bound MAC as a 48-bit big-endian integer (anti-spoofing compares it)
    uint64_t own_key      # mac_key(0, mac) while that key is this port's static FDB entry (D42),
                          # else 0: a frame from the port with this source key learns nothing
                          # (set by Datapath._own_keys after every change of static entries)
    uint32_t ip4[8]       # bound IPv4 addresses, host byte order
    uint8_t ip6[8][16]    # bound IPv6 addresses

ctypedef struct HpRule:
    # one hostPort DNAT rule
    uint8_t used          # 1 while the rule exists
    uint8_t proto         # 6 or 17
    uint8_t any_ip        # 1: matches any node address (host_ip None)
    uint8_t family        # 4 or 6: family of host_ip / pod_ip
    uint16_t host_port    # destination port matched
    uint16_t container_port   # port it is rewritten to
    uint16_t pod_port_id  # the pod's port id (out port)
    uint16_t pad          # zero
    uint32_t rid          # rule id returned by add_hostport
    uint8_t host_ip[16]   # destination address matched (when not any_ip), ::ffff: for IPv4
    uint8_t pod_ip[16]    # address it is rewritten to, ::ffff: for IPv4

ctypedef struct Shaper:
    # one token bucket with its queue (per port and direction)
    uint8_t active        # 1 after set_shaper, 0 after clear_shaper
    uint8_t has_last      # 1 once last_ns was set by a packet or drain
    uint64_t rate_bps     # refill rate in bit/s; 0 = off (pass all)
    uint64_t burst_bits   # bucket size in bits
    u128 credit           # tokens in bit*ns (bits * 10^9)
    uint64_t last_ns      # time of the latest refill
    uint64_t queue_limit_bytes  # sum of queued frame lengths may not exceed this
    uint64_t queue_bytes  # sum of queued frame lengths
    uint64_t queue_packets    # number of queued packets
    uint8_t *qbuf         # FIFO storage: records [QRec][charged length, 8 bytes][vnet header][frame], 8-aligned (shaper.pxi q_charged/q_data)
    uint64_t qcap         # bytes allocated at qbuf
    uint64_t qhead        # offset of the oldest record
    uint64_t qtail        # offset one past the newest record

ctypedef struct QRec:
    # header of one queued packet in a shaper FIFO
    uint32_t len          # frame length (vnet header excluded)
    uint16_t in_port      # port the packet arrived on
    uint16_t pad          # zero
    int32_t out_port      # ingress queues: the decided out port; egress queues: unused
    uint32_t reclen       # bytes of this record including header and padding
    uint64_t seq          # Core.drain_seq when queued (skipped by the drain() that queued it)

ctypedef struct TrRec:
    # one stage reached by a traced frame (trace() only)
    int stage             # TR_* event (consts.TRACE_EVENTS index)
    int64_t a             # stage-specific value (verdict, port, direction, rule id...)
    int64_t b             # stage-specific value

# trace() switches on Core.tr; the pipeline appends one record (a TR_* event) per stage it
# reaches, at most TR_MAX_RECORDS
cdef enum:
    TR_MAX_RECORDS = 16

ctypedef struct VxSlot:
    # one slot of a VXLAN hash index (vxlan.pxi; open addressing, linear probing,
    # backward-shift deletion)
    uint32_t ref          # 0 = empty, else what the index maps to, + 1
    uint32_t hash         # full 32-bit hash of the key

ctypedef struct Peer:
    # a remote node (VXLAN peer, vxlan.pxi)
    uint8_t used          # 1 while the peer exists
    uint8_t has_underlay  # 1: underlay_mac resolved
    uint8_t n_cidrs       # cidrs in use (1..C_MAX_PEER_CIDRS), in the order given
    uint8_t ip[4]         # its VTEP IPv4 address (the key)
    uint8_t vtep_mac[6]   # its VTEP MAC: inner destination MAC
    uint8_t underlay_mac[6]   # the underlay next hop's MAC: outer destination MAC
    uint8_t cidr_family[8]    # 4 or 6
    uint8_t cidr_plen[8]      # prefix length
    uint8_t cidr_addr[8][16]  # prefix, 16 bytes (IPv4 as ::ffff:a.b.c.d), host bits zero
    uint64_t tx_packets       # frames encapsulated to it
    uint64_t tx_bytes         # their outer bytes
    uint64_t rx_packets       # frames decapsulated from it
    uint64_t rx_bytes         # their outer bytes
    uint64_t drop_unresolved  # frames dropped vxlan_unresolved

ctypedef struct Core:
    # all state of one Datapath, owned by the Python object, used without the GIL
    uint32_t max_ports        # port ids are 0 .. max_ports-1
    uint32_t mac_table_size   # MAC table capacity (entries)
    uint32_t conntrack_size   # conntrack capacity (entries)
    uint32_t max_hostports    # hostPort rule capacity
    uint32_t vnet_hdr_len     # H: bytes of virtio-net header before each frame (0, 10, 12)
    uint64_t mac_aging_ns     # MAC entries older than this are aged
    uint64_t ct_timeout[8]    # conntrack timeout per C_CT_* state (index 0 unused), ns
    uint64_t last_now_ns      # the latest now_ns of process()/drain() (monotonic check)
    uint8_t have_now          # 1 once last_now_ns was set
    PortState *ports          # [max_ports] configuration
    uint64_t *pc              # [max_ports * N_PC] per-port counters
    uint64_t gc[N_GC]         # global counters
    uint16_t *up_list         # ids of the ports that are added and up, ascending
    uint32_t n_up             # entries in up_list
    # MAC table
    MacEntry *mac             # [mac_mask + 1] slots
    uint64_t mac_mask         # slots - 1 (slots: power of two >= 2 * mac_table_size)
    int mac_shift             # 64 - log2(slots): multiplicative hash shift
    uint32_t mac_count        # entries in use
    uint8_t mac_swept         # 1 once the automatic sweep ran
    uint64_t mac_sweep_ns     # now_ns of the latest automatic sweep
    # conntrack
    CtEntry *ct               # [conntrack_size] entries
    CtSlot *ct_slots          # [ct_mask + 1] index slots (power of two >= 4 * conntrack_size)
    uint64_t ct_mask          # slots - 1
    uint32_t ct_count         # entries in use
    uint32_t ct_free          # free list head (entry index + 1), 0 = none
    uint32_t *ct_portcnt      # [65536] entries whose orig dport or reply sport is this port
    uint8_t ct_swept          # 1 once the automatic sweep ran
    uint64_t ct_sweep_ns      # now_ns of the latest automatic sweep
    # early drop (D40): the unassured entries in a list, oldest first (entry index + 1, 0 = none)
    uint32_t *ct_ev_next      # [conntrack_size] the next newer unassured entry
    uint32_t *ct_ev_prev      # [conntrack_size] the next older one
    uint32_t ct_ev_head       # the oldest unassured entry: the one a full table evicts
    uint32_t ct_ev_tail       # the newest
    # hostPort rules
    HpRule *rules             # [max_hostports] rules by id
    uint32_t *rule_slots      # [rule_mask + 1] index: rule id + 1, 0 = empty (rebuilt on change)
    uint64_t rule_mask        # slots - 1
    uint64_t rule_ports[1024] # bitmap of host ports that have a rule (any proto)
    uint64_t nat_ports[1024]  # bitmap: rule_ports | ports with ct_portcnt > 0 (the hot filter)
    # addresses
    uint8_t gw_mac_set        # 1: gateway MAC set
    uint8_t gw_mac[6]         # the host port's MAC (NAT source MAC)
    uint8_t gw_ip4_set        # 1: IPv4 gateway set
    uint8_t gw_ip4[16]        # IPv4 gateway as ::ffff:a.b.c.d (hairpin SNAT source)
    uint8_t gw_ip6_set        # 1: IPv6 gateway set
    uint8_t gw_ip6[16]        # IPv6 gateway
    uint32_t n_node           # node addresses in use
    uint8_t node_family[64]   # 4 or 6 per node address
    uint8_t node_ip[64][16]   # node addresses (IPv4 as ::ffff:a.b.c.d)
    # shapers
    Shaper *shapers           # [max_ports * 2]: index port * 2 + direction
    uint64_t drain_seq        # increments per drain() call (marks packets queued during it)
    uint32_t *active          # [max_ports * 2] indexes of the shapers that exist, ascending
    uint32_t n_active         # entries in active
    uint32_t pf_min_entries   # prefetch only when the MAC or conntrack table holds more
    uint8_t pf_off            # 1: process() never prefetches (_tune(), benchmarks only)
    FragRec frags[C_FRAG_SLOTS] # D39: fragmented datagrams' translations (conntrack.pxi)
    uint32_t frag_hash[C_FRAG_SLOTS]  # ct_hash of each record's key (what frag_find scans)
    uint64_t frag_seq         # records remembered so far (FragRec.seq)
    uint64_t frag_live_until_ns   # no record is live at or after this now_ns
    TrRec *tr                 # trace() only: the stage recorder (NULL: off)
    int tr_n                  # records in tr
    # MAC table under pressure (mactable.pxi, D42-D44) and flood membership (D41)
    MacPort *mac_ports        # [max_ports] learned-entry lists and learning buckets
    uint64_t mac_learn_rate   # new MACs per second per port; 0 = no limit
    uint64_t mac_learn_burst  # the learning bucket's size (learns)
    uint8_t *flood            # [max_ports] flood_classes(): FLOOD_MEMBER | FLOOD_UNKNOWN_MEMBER bits
    # VXLAN (vxlan.pxi)
    uint8_t vtep_set          # 1 after set_vtep
    uint16_t vtep_port        # the VTEP's (uplink) port
    uint8_t vtep_ip[4]        # our VTEP IPv4 address
    uint8_t vtep_outer_mac[6] # the uplink's MAC: outer source MAC, decap's outer destination MAC
    uint8_t vtep_mac[6]       # our VTEP MAC
    uint32_t vni              # our VNI
    uint16_t vxlan_port       # UDP destination port
    uint32_t vtep_mtu         # the underlay IP MTU
    uint32_t max_peers        # peer table capacity
    uint32_t n_peers          # peers in use
    Peer *peers               # [max_peers]
    VxSlot *peer_slots        # peer ip -> peer index (+1)
    uint64_t peer_mask        # slots - 1
    VxSlot *cidr_slots        # (family, prefix length, prefix) -> peer index * 8 + cidr index (+1)
    uint64_t cidr_mask        # slots - 1
    uint32_t plen_count[2][129]   # per family (0: IPv4, 1: IPv6) and prefix length: CIDRs held
    uint8_t plens[2][129]     # the prefix lengths present, longest first (what the LPM probes)
    uint32_t n_plens[2]
    VxSlot *podip_slots       # (family, address) -> pod port * 8 + address index (+1), lowest port
    uint64_t podip_mask       # slots - 1
    int32_t host_port         # the lowest-id PORT_HOST port, -1 = none (decap to the gateway)
    uint8_t *vx_base          # the buffer process()/drain() run on (no_headroom's offset)
    uint8_t vx_moved          # 1: the last frame was en/decapsulated to vx_out_p/vx_out_len
    uint8_t *vx_out_p
    uint32_t vx_out_len


cdef void tr_rec(Core *c, int stage, int64_t a, int64_t b) noexcept nogil:
    # records a stage for trace() (only called when c.tr is set)
    if c.tr_n < TR_MAX_RECORDS:
        c.tr[c.tr_n].stage = stage
        c.tr[c.tr_n].a = a
        c.tr[c.tr_n].b = b
        c.tr_n += 1

cdef inline void tr_add(Core *c, int stage, int64_t a, int64_t b) noexcept nogil:
    # one predictable branch when not tracing
    if c.tr != NULL:
        tr_rec(c, stage, a, b)

cdef inline void tr_at(Core *c, bint tr, int stage, int64_t a, int64_t b) noexcept nogil:
    # tr_add in the per-packet path (pkt_finish, forward, output_unicast, nat_stage,
    # nat_hit): tr is a constant of each caller (process_batch_c: False, it never runs on
    # a traced Core; trace() and drain(): True), so the batch loop has no check at all
    if tr and c.tr != NULL:
        tr_rec(c, stage, a, b)
