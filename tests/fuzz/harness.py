"""Differential fuzz targets: the Cython core and the pure-Python twin must agree on anything.

Theory of operation: an input is raw bytes from a fuzzer (atheris) or from the committed
corpus. ``decode_batches`` turns it into batches of (in_port, virtio-net header, frame) with a
time step per batch, with no parsing of the frame itself: every byte the fuzzer mutates reaches
the datapath. Both implementations get the same node (host port, uplink, shaped and unshaped
pods, anti-spoofing bindings, gateway, node addresses, hostPort rules, a VXLAN VTEP on the uplink
with a resolved and an unresolved peer), the same batches at the
same ``now_ns``, and a ``drain`` after each batch. Frames lie ENCAP_HEADROOM apart, so that
encapsulation has its room. After every batch they must agree on
out_ports, the offsets and lengths (VXLAN moves frames), every byte of the buffer (NAT rewrites in place), the drained frames, the counters,
shaper states and next_departure_ns; after the last batch on the tables (fdb, conntrack,
hostports) and on ``trace`` of the first frame (its stage names and its output). Any difference, or an exception other than a
``ValueError`` both raise, is a finding (an AssertionError with the details).

Targets: ``parse`` (one frame, no virtio-net header: the parser and the whole pipeline behind
it) and ``batch`` (up to 64 frames in up to 8 batches with 12-byte virtio-net headers, time
steps from 0 to 40 s so queues drain and entries expire). Tables are kept small enough that an
input cannot fill them: the guarantees that depend on table layout are tested elsewhere.
"""
from __future__ import annotations

import struct

import numpy as np

from vswitch.datapath import consts as C

GW_MAC = bytes.fromhex("02000000fe01")
GW4 = bytes([10, 0, 0, 1])
GW6 = bytes.fromhex("fd000000000000000000000000000001")
NODE4 = bytes([192, 168, 1, 1])
NODE6 = bytes.fromhex("20010db8000000000000000000000001")
HOST, UPLINK = 0, 1
PODS = (2, 3, 4, 5)
N_PORTS = 7                       # ports 0..5 exist; 6 does not (frames from it are dropped)
VNET = 12
TIME_STEPS_NS = (0, 1_000, 1_000_000, 100_000_000, C.SEC_NS, 40 * C.SEC_NS)
MAX_FRAME = 2048
MAX_FRAMES = 64


NODE_MAC = bytes.fromhex("02000000aa01")      # the uplink's MAC (outer destination of VXLAN frames)
VTEP_MAC = bytes.fromhex("0200000ee001")
VNI = 42
PEER4 = bytes([192, 168, 1, 21])
PEER_VTEP_MAC = bytes.fromhex("0200000ee021")
HOP_MAC = bytes.fromhex("02000000bb07")
REMOTE_CIDRS = [(bytes([10, 1, 0, 0]), 16), (bytes.fromhex("fd01") + bytes(14), 32)]


def pod_mac(p):
    return bytes([2, 0, 0, 0, 1, p])


def pod_ip4(p):
    return bytes([10, 0, 0, 10 + p])


def pod_ip6(p):
    return bytes.fromhex("fd00000000000000000000000000") + bytes([0, 10 + p])


RULES = [  # (proto, host_port, pod, container_port, host_ip, pod_ip)
    (6, 8080, 2, 80, None, pod_ip4(2)), (6, 8080, 2, 80, None, pod_ip6(2)),
    (17, 5353, 3, 53, None, pod_ip4(3)), (6, 8443, 4, 443, NODE4, pod_ip4(4)),
    (17, 9000, 5, 9000, None, pod_ip6(5)),
]


def build(module, vnet_hdr_len):
    """One datapath of ``module`` set up as the fuzzed node."""
    dp = module.Datapath(max_ports=8, mac_table_size=1024, conntrack_size=1024, max_hostports=16,
                         vnet_hdr_len=vnet_hdr_len)
    dp.add_port(HOST, C.PORT_HOST)
    dp.add_port(UPLINK, C.PORT_UPLINK)
    for p in PODS:
        dp.add_port(p, C.PORT_POD)
        dp.bind_port(p, pod_mac(p), [pod_ip4(p), pod_ip6(p)])
    dp.set_gateway(GW_MAC, GW4, GW6)
    dp.set_node_addresses([NODE4, NODE6, GW4, GW6])
    dp.set_shaper(3, C.EGRESS, 2_000_000, 20_000, 8_000)
    dp.set_shaper(4, C.INGRESS, 1_000_000, 4_000, 3_000)
    for proto, hp, pod, cp, hip, pip in RULES:
        dp.add_hostport(proto, hp, pip, cp, pod, hip)
    dp.set_vtep(UPLINK, NODE4, NODE_MAC, VTEP_MAC, VNI)
    dp.set_peer(PEER4, PEER_VTEP_MAC, HOP_MAC, REMOTE_CIDRS)
    dp.set_peer(bytes([192, 168, 1, 22]), bytes.fromhex("0200000ee022"), None, [(bytes([10, 2, 0, 0]), 16)])
    return dp


def decode_batches(data: bytes, vnet_hdr_len: int):
    """[(time_step_ns, [(in_port, header, frame), ...]), ...] from raw fuzzer bytes.

    Record layout: in_port byte, flags byte (bits 0-2: time step before the record's batch,
    bit 3: this record starts a new batch, bit 4: the header comes from the input), a 2-byte
    length (mod MAX_FRAME + 1), then the header (if bit 4) and the frame, cut short by the end
    of the input.
    """
    batches, pos = [], 0
    while pos + 4 <= len(data) and sum(len(b[1]) for b in batches) < MAX_FRAMES:
        port, flags, length = data[pos], data[pos + 1], struct.unpack_from("!H", data, pos + 2)[0]
        pos += 4
        hdr = bytes(vnet_hdr_len)
        if vnet_hdr_len and flags & 0x10:
            hdr = data[pos:pos + vnet_hdr_len].ljust(vnet_hdr_len, b"\0")
            pos += vnet_hdr_len
        length %= MAX_FRAME + 1
        frame = data[pos:pos + length]
        pos += length
        if not batches or (flags & 0x08 and len(batches) < 8):
            batches.append((TIME_STEPS_NS[(flags & 7) % len(TIME_STEPS_NS)], []))
        batches[-1][1].append((port % N_PORTS, hdr, frame))
    return batches


def _layout(records, vnet_hdr_len):
    n = len(records)
    gap = C.ENCAP_HEADROOM
    total = sum(len(f) + vnet_hdr_len + gap for _, _, f in records) + 4
    buf = np.zeros(total, np.uint8)
    offs, lens = np.zeros(n, np.uint32), np.zeros(n, np.uint32)
    ins, outs = np.zeros(n, np.uint16), np.zeros(n, np.int32)
    pos = gap
    for i, (port, hdr, frame) in enumerate(records):
        buf[pos:pos + vnet_hdr_len] = np.frombuffer(hdr, np.uint8)
        pos += vnet_hdr_len
        offs[i], lens[i], ins[i] = pos, len(frame), port
        buf[pos:pos + len(frame)] = np.frombuffer(frame, np.uint8)
        pos += len(frame) + gap
    return buf, offs, lens, ins, outs


def _call(dp, name, *args):
    try:
        return "ok", getattr(dp, name)(*args)
    except ValueError as exc:
        return "ValueError", str(exc)


def _same(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    return a == b


def _agree(py, c, what, *args):
    ra, rb = _call(py, what, *args), _call(c, what, *args)
    assert ra[0] == rb[0] and _same(ra[1], rb[1]), f"{what}: py {ra!r} vs c {rb!r}"
    return ra[1]


def _drain_both(py, c, now):
    got = []
    for dp in (py, c):
        buf = np.zeros(1 << 20, np.uint8)
        offs, lens = np.zeros(256, np.uint32), np.zeros(256, np.uint32)
        ins, outs = np.zeros(256, np.uint16), np.zeros(256, np.int32)
        k = dp.drain(now, buf, offs, lens, ins, outs, 256)
        got.append([(int(ins[i]), int(outs[i]), buf[offs[i]:offs[i] + lens[i]].tobytes())
                    for i in range(k)])
    assert got[0] == got[1], f"drain at {now}: py {got[0]!r} vs c {got[1]!r}"


def _compare_state(py, c, tables):
    for what in ("port_counters", "global_counters", "next_departure_ns", "peers", "vtep"):
        _agree(py, c, what)
    for p in range(8):
        for d in (C.EGRESS, C.INGRESS):
            _agree(py, c, "shaper_state", p, d)
    if tables:
        for what in ("fdb", "conntrack", "hostports"):
            _agree(py, c, what)


def run_pair(py_module, c_module, batches, vnet_hdr_len):
    """Runs the batches through both implementations; AssertionError on any difference."""
    py, c = build(py_module, vnet_hdr_len), build(c_module, vnet_hdr_len)
    now = 1_000 * C.SEC_NS
    for step, records in batches:
        now += step
        lay_py, lay_c = _layout(records, vnet_hdr_len), _layout(records, vnet_hdr_len)
        _agree_process(py, c, lay_py, lay_c, len(records), now)
        _drain_both(py, c, now)
        _compare_state(py, c, tables=False)
    _compare_state(py, c, tables=True)
    if batches and batches[0][1]:
        port, _, frame = batches[0][1][0]
        ta, tb = _call(py, "trace", frame, port, now), _call(c, "trace", frame, port, now)
        assert ta[0] == tb[0], f"trace: py {ta!r} vs c {tb!r}"
        if ta[0] == "ok":     # the stage names and the output are the contract, not the details
            assert [s for s, _ in ta[1]] == [s for s, _ in tb[1]] and ta[1][-1] == tb[1][-1], \
                f"trace: py {ta!r} vs c {tb!r}"


def _agree_process(py, c, lay_py, lay_c, n, now):
    res = [_call(dp, "process", *lay, n, now) for dp, lay in ((py, lay_py), (c, lay_c))]
    assert res[0] == res[1], f"process: py {res[0]!r} vs c {res[1]!r}"
    buf_p, off_p, len_p, _, out_p = lay_py
    buf_c, off_c, len_c, _, out_c = lay_c
    assert out_p.tolist() == out_c.tolist(), f"out_ports: py {out_p.tolist()} vs c {out_c.tolist()}"
    assert off_p.tolist() == off_c.tolist() and len_p.tolist() == len_c.tolist(), \
        f"offsets/lengths: py {off_p.tolist()} {len_p.tolist()} vs c {off_c.tolist()} {len_c.tolist()}"
    if buf_p.tobytes() != buf_c.tobytes():
        i = int(np.nonzero(buf_p != buf_c)[0][0])
        raise AssertionError(f"buffer differs first at byte {i}: py {buf_p[i]} vs c {buf_c[i]}")


def target_parse(py_module, c_module, data: bytes):
    """One frame (the input minus its first byte, which picks the in_port), no vnet header."""
    if not data:
        return
    run_pair(py_module, c_module, [(0, [(data[0] % N_PORTS, b"", data[1:MAX_FRAME + 1])])], 0)


def target_batch(py_module, c_module, data: bytes):
    run_pair(py_module, c_module, decode_batches(data, VNET), VNET)


TARGETS = {"parse": target_parse, "batch": target_batch}
