"""Every constant, counter, drop reason and pipeline stage of the datapath, written once.

Theory of operation
-------------------
This module is the single source. The pure-Python twin imports it; the Cython core gets
the same values as C enums from ``ext/consts.pxi``, which the build writes from this
module (``vswitch/datapath/gen_consts.py``, run by setup.py before cythonize; the file is
generated and git-ignored). The core refuses to import when the values it was built with
differ from this module's (a stale build). Counters are declared Snabb/VPP style: each
drop reason once, with its text, and the per-port and global counter lists are derived
from that declaration; the pipeline's stages and the trace events that name them sit
next to the counters.

Stdlib only: ``vswitch.config`` and the CNI-facing code import this without numpy. The
numpy dtypes of the table snapshots (``FDB_DTYPE``, ``CT_DTYPE``) are built on first use.
The contract these values belong to is ``docs/datapath.md``.
"""

# out_ports values other than a port id
OUT_FLOOD = -1
OUT_DROP = -2
OUT_QUEUED = -3
# unknown unicast: every up host / uplink port except the in port, never a pod port
# (docs/datapath.md "L2"); ports with an ingress shaper get their copy through its queue
OUT_FLOOD_UNKNOWN = -4
# bits of Datapath.flood_classes()[port]: the port receives OUT_FLOOD / OUT_FLOOD_UNKNOWN
# outputs (written by the I/O layer, which still skips the in port)
FLOOD_MEMBER = 1
FLOOD_UNKNOWN_MEMBER = 2

# port kinds
PORT_POD = 0
PORT_HOST = 1
PORT_UPLINK = 2
PORT_KINDS = {"pod": PORT_POD, "host": PORT_HOST, "uplink": PORT_UPLINK}

# shaper directions (seen from the pod: egress leaves the pod, ingress goes to it)
EGRESS = 0
INGRESS = 1

# biggest frame: an offloaded 64 KiB IP packet plus Ethernet and one 802.1Q tag
MAX_FRAME = 65535 + 14 + 4
MAX_IPS_PER_PORT = 8
MAX_IPV6_EXT_HEADERS = 8
MAX_NODE_ADDRESSES = 64

# virtio-net header
VNET_F_NEEDS_CSUM = 1
# the checksums are valid (a decapsulated frame whose outer checksum was partial: D54)
VNET_F_DATA_VALID = 2
# gso_type bit of a frame the core encapsulated in VXLAN: Linux 6.17's
# VIRTIO_NET_HDR_GSO_UDP_TUNNEL_IPV4; the I/O layer segments such frames (docs/datapath.md "VXLAN")
VNET_GSO_UDP_TUNNEL_IPV4 = 0x20

# VXLAN (RFC 7348; docs/datapath.md "VXLAN"): the outer Ethernet + IPv4 + UDP + VXLAN headers
ENCAP_LEN = 50
# bytes every I/O layer leaves free before each frame's vnet header, for the outer headers
ENCAP_HEADROOM = 64
# UDP GSO of VXLAN segments (docs/datapath.md D54): virtio-net's gso_type UDP_L4; the most
# segments one packet carries and the reader cuts one read into (UDP GRO's UDP_GRO_CNT_MAX);
# the read-slot bytes each datagram of a cut needs beyond its payload (headroom, vnet header,
# Ethernet + IPv4 with options + UDP, alignment)
VNET_GSO_UDP_L4 = 5
UDP_GSO_MAX_SEGS = 64
UDP_GSO_SPLIT_SLOT_EXTRA = 64 + 12 + 14 + 60 + 8 + 8
MAX_PEER_CIDRS = 8
VXLAN_PORT = 4789

# conntrack states
CT_SYN_SENT = 1
CT_ESTABLISHED = 2
CT_FIN = 3
CT_CLOSE = 4
CT_UDP_NEW = 5
CT_UDP_REPLIED = 6
CT_SYN_RECV = 7        # the SYN-ACK seen, the handshake's final ACK not yet (D27)
CT_STATE_NAMES = {
    CT_SYN_SENT: "SYN_SENT", CT_ESTABLISHED: "ESTABLISHED", CT_FIN: "FIN",
    CT_CLOSE: "CLOSE", CT_UDP_NEW: "UDP_NEW", CT_UDP_REPLIED: "UDP_REPLIED",
    CT_SYN_RECV: "SYN_RECV",
}

SEC_NS = 1_000_000_000
DEFAULTS = dict(
    max_ports=256,
    mac_table_size=65536,
    conntrack_size=65536,
    max_hostports=4096,
    vnet_hdr_len=0,
    mac_aging_ns=300 * SEC_NS,
    tcp_syn_timeout_ns=120 * SEC_NS,
    tcp_est_timeout_ns=86400 * SEC_NS,
    tcp_fin_timeout_ns=120 * SEC_NS,
    tcp_close_timeout_ns=10 * SEC_NS,
    udp_timeout_ns=30 * SEC_NS,
    udp_replied_timeout_ns=120 * SEC_NS,
    tcp_syn_recv_timeout_ns=60 * SEC_NS,     # Linux's nf_conntrack_tcp_timeout_syn_recv
    # per-port learning limit (docs/datapath.md "MAC table"): new MACs per second, and the
    # bucket's size; mac_learn_rate_per_s 0 = no limit
    mac_learn_rate_per_s=1000,
    mac_learn_burst=1000,
    # VXLAN peers (docs/datapath.md "VXLAN"): at most this many remote nodes
    max_peers=4096,
)
# a full table is swept of expired entries at most this often (of now_ns)
SWEEP_INTERVAL_NS = SEC_NS
# fragments of hostPort flows (docs/datapath.md "Fragments"): at most this many fragmented
# datagrams' translations are remembered, each for this long (Linux's ipfrag_time)
FRAG_SLOTS = 256
FRAG_TIMEOUT_NS = 30 * SEC_NS

# ---------------------------------------------------------------- counters
# Each drop reason once, with what it means. A drop counts on one port (drop_<reason>)
# and globally (<reason>); the order is the counters' order in the arrays below.
DROPS = {
    "malformed": "the frame is too short or its ARP/IP/TCP/UDP/ICMP headers are inconsistent",
    "spoofed": "the source MAC or IP is not bound to the pod port it came from",
    "queue_full": "the shaper's queue has no room for the frame (or the shaper was removed)",
    "no_route": "the in port is not added, or the out port is down or removed",
    "loop": "the destination MAC was learned on the port the frame came from",
    "table_full": "a new connection found the conntrack table full",
    "nat_collision": "a new connection's reply tuple is already tracked",
    "mac_stolen": "the source MAC is a static entry (a bound MAC) of another port",
    # VXLAN (docs/datapath.md "VXLAN")
    "ttl_expired": "a routed (encapsulated or decapsulated) packet's TTL / hop limit was 1 or 0",
    "vxlan_unresolved": "the peer's underlay next-hop MAC is not resolved yet",
    "vxlan_bad_vni": "a VXLAN frame for our VTEP carries another VNI",
    "vxlan_malformed": "a VXLAN frame for our VTEP is fragmented, too short, lacks the I flag, "
                       "says GSO, or its inner frame is malformed",
    "vxlan_not_ours": "a decapsulated frame is not for our VTEP MAC, or not untagged IPv4/IPv6",
    "vxlan_unknown_peer": "a VXLAN frame for our VTEP comes from an address that is not a peer",
    "vxlan_no_route": "a decapsulated packet's destination is neither a local pod nor the gateway",
    "too_big": "the encapsulated packet (or a GSO segment of it) would exceed the underlay MTU",
    "no_headroom": "fewer than ENCAP_LEN bytes before the frame's vnet header to encapsulate it",
}
DROP_REASONS = tuple(DROPS)

# per-port counters: the index in port_counters()' second axis
PORT_COUNTERS = (
    ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")
    + tuple("drop_" + reason for reason in DROP_REASONS)
    + ("queued",)
)
# global counters: the index in global_counters() (drop counters: sums of the per-port ones)
GLOBAL_COUNTERS = (
    ("packets", "bytes")
    + DROP_REASONS
    + ("queued", "flooded",
       "mac_moves", "mac_table_full", "mac_learned",
       "ct_created", "ct_expired", "ct_deleted", "nat_translated",
       "ct_early_drop", "mac_evicted", "mac_learn_limited",
       "vxlan_encap", "vxlan_decap")
)
PC = {name: i for i, name in enumerate(PORT_COUNTERS)}
GC = {name: i for i, name in enumerate(GLOBAL_COUNTERS)}

# ---------------------------------------------------------------- pipeline stages
# The stages in pipeline order, by the name trace() reports, with what each does.
STAGES = {
    "rx": "count the frame on its in port",
    "parse": "read the headers; drop malformed frames",
    "antispoof": "check the source MAC/IPs against the port's binding",
    "egress_shaper": "the in port's egress token bucket: pass, queue or drop",
    "nat": "hostPort DNAT and conntrack: translate, or leave untouched",
    "vxlan": "route to a remote node's pods and encapsulate, or decapsulate for a local pod",
    "l2": "learn the source MAC; pick the out port by destination MAC",
    "ingress_shaper": "the out port's ingress token bucket: pass, queue or drop",
    "output": "the verdict: a port, flood, queued or a drop reason",
}
# What trace() records: (event, its stage, text). {a} and {b} are the event's two values;
# {direction} is a = 0/1 as original/reply, {verdict} a shaper verdict (SHAPER_VERDICTS[a]),
# {state} CT_STATE_NAMES[b], {hairpin} " (hairpin)" when b, {reason} DROP_REASONS[b],
# {frame_len} the traced frame's length.
TRACE_EVENTS = (
    ("rx", "rx", "port {a}, {b} bytes"),
    ("parse", "parse", "{frame_len}-byte frame parsed"),
    ("antispoof", "antispoof", "pass"),
    ("egress", "egress_shaper", "{verdict}"),
    ("nat_new", "nat", "new entry from rule {a}{hairpin}"),
    ("nat_hit", "nat", "{direction} direction, {state}"),
    ("nat_icmp", "nat", "icmp error, {direction} direction"),
    ("nat_icmp_none", "nat", "icmp error, no entry"),
    ("nat_fragment", "nat", "fragment, {direction} direction"),
    ("nat_none", "nat", "no entry, no rule"),
    ("l2_nat", "l2", "NAT decided port {b}"),
    ("l2_multicast", "l2", "multicast/broadcast"),
    ("l2_unknown", "l2", "unknown unicast"),
    ("l2_known", "l2", "known unicast on port {b}"),
    ("ingress", "ingress_shaper", "{verdict}"),
    ("out_port", "output", "port {a}"),
    ("out_flood", "output", "flood"),
    ("out_queued", "output", "queued"),
    ("out_drop", "output", "drop {reason}"),
    ("out_flood_unknown", "output", "flood unknown"),
    ("vxlan_encap", "vxlan", "encapsulated, VNI {a}, UDP source port {b}"),
    ("vxlan_decap", "vxlan", "decapsulated, VNI {a}, to port {b}"),
)
SHAPER_VERDICTS = ("pass", "queue", "full")


def trace_step(event: int, a: int, b: int, frame_len: int) -> tuple[str, str]:
    """(stage, text) of the trace record (TRACE_EVENTS index ``event``, values a, b)."""
    _, stage, text = TRACE_EVENTS[event]
    return stage, text.format(
        a=a, b=b, frame_len=frame_len,
        direction="original" if a == 0 else "reply",
        verdict=SHAPER_VERDICTS[a] if 0 <= a < len(SHAPER_VERDICTS) else a,
        state=CT_STATE_NAMES.get(b, b), hairpin=" (hairpin)" if b else "",
        reason=DROP_REASONS[b] if 0 <= b < len(DROP_REASONS) else b)


# ---------------------------------------------------------------- table snapshot dtypes
# fdb() and conntrack() rows (docs/datapath.md "Inspection"); numpy only on first use
_DTYPE_FIELDS = {
    "FDB_DTYPE": [("vlan", "<u2"), ("mac", "u1", (6,)), ("port", "<u2"), ("last_seen_ns", "<u8"),
                  ("static", "u1")],
    "CT_DTYPE": [
        ("proto", "u1"), ("state", "u1"), ("hairpin", "u1"), ("family", "u1"),
        ("orig_src", "u1", (16,)), ("orig_dst", "u1", (16,)),
        ("orig_sport", "<u2"), ("orig_dport", "<u2"),
        ("reply_src", "u1", (16,)), ("reply_dst", "u1", (16,)),
        ("reply_sport", "<u2"), ("reply_dport", "<u2"),
        ("in_port", "<u2"), ("out_port", "<u2"),
        ("orig_src_mac", "u1", (6,)), ("orig_dst_mac", "u1", (6,)),
        ("expires_ns", "<u8"), ("packets", "<u8"), ("bytes", "<u8"),
    ],
}


def __getattr__(name):
    if name in _DTYPE_FIELDS:
        import numpy as np
        value = np.dtype(_DTYPE_FIELDS[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_DTYPE_FIELDS))
