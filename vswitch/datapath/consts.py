"""Constants and counter names of the datapath, shared by both implementations.

The Cython core mirrors these values in ``ext/defs.pxi``; ``tests/datapath/test_consts.py``
checks that the two agree. The contract they belong to is ``docs/datapath.md``.
"""

# out_ports values other than a port id
OUT_FLOOD = -1
OUT_DROP = -2
OUT_QUEUED = -3

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

# virtio-net header
VNET_F_NEEDS_CSUM = 1

# conntrack states
CT_SYN_SENT = 1
CT_ESTABLISHED = 2
CT_FIN = 3
CT_CLOSE = 4
CT_UDP_NEW = 5
CT_UDP_REPLIED = 6
CT_STATE_NAMES = {
    CT_SYN_SENT: "SYN_SENT", CT_ESTABLISHED: "ESTABLISHED", CT_FIN: "FIN",
    CT_CLOSE: "CLOSE", CT_UDP_NEW: "UDP_NEW", CT_UDP_REPLIED: "UDP_REPLIED",
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
)
# a full table is swept of expired entries at most this often (of now_ns)
SWEEP_INTERVAL_NS = SEC_NS
# fragments of hostPort flows (the twin's D39): slots of the memory of fragmented
# datagrams' translations, and how long one is kept (Linux's ipfrag_time)
FRAG_SLOTS = 256
FRAG_TIMEOUT_NS = 30 * SEC_NS

# per-port counters: the index in port_counters()' second axis
PORT_COUNTERS = (
    "rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
    "drop_malformed", "drop_spoofed", "drop_queue_full", "drop_no_route",
    "drop_loop", "drop_table_full", "drop_nat_collision", "queued",
)
# global counters: the index in global_counters()
GLOBAL_COUNTERS = (
    "packets", "bytes",
    "malformed", "spoofed", "queue_full", "no_route", "loop", "table_full",
    "nat_collision", "queued", "flooded",
    "mac_moves", "mac_table_full", "mac_learned",
    "ct_created", "ct_expired", "ct_deleted", "nat_translated",
)
PC = {name: i for i, name in enumerate(PORT_COUNTERS)}
GC = {name: i for i, name in enumerate(GLOBAL_COUNTERS)}
# drop reason -> (port counter, global counter)
DROP_REASONS = ("malformed", "spoofed", "queue_full", "no_route", "loop", "table_full", "nat_collision")


def _dtypes():
    import numpy as np
    fdb = np.dtype([("vlan", "<u2"), ("mac", "u1", (6,)), ("port", "<u2"), ("last_seen_ns", "<u8")])
    ct = np.dtype([
        ("proto", "u1"), ("state", "u1"), ("hairpin", "u1"), ("family", "u1"),
        ("orig_src", "u1", (16,)), ("orig_dst", "u1", (16,)),
        ("orig_sport", "<u2"), ("orig_dport", "<u2"),
        ("reply_src", "u1", (16,)), ("reply_dst", "u1", (16,)),
        ("reply_sport", "<u2"), ("reply_dport", "<u2"),
        ("in_port", "<u2"), ("out_port", "<u2"),
        ("orig_src_mac", "u1", (6,)), ("orig_dst_mac", "u1", (6,)),
        ("expires_ns", "<u8"), ("packets", "<u8"), ("bytes", "<u8"),
    ])
    return fdb, ct


FDB_DTYPE, CT_DTYPE = _dtypes()
