"""Differential tests with VXLAN: the Cython core against the twin on random mixes that
include encapsulation and decapsulation (docs/datapath.md "VXLAN").

The frame mix of test_differential.py (every kind of frame, mutations, fragments, GSO
headers, shapers, NAT) plus: pod frames to the gateway MAC / VTEP MAC for remote pods
under overlapping peer CIDRs (one peer unresolved), with TTLs 0..2 and 64, fragments and
IPv6 extension headers (the flow hash's protocol byte), frames too big for the MTU; VXLAN
frames from the underlay to local pods, the gateway and unknown addresses, with foreign
VNIs, a clear I flag, unknown peers, outer first fragments, short UDP lengths, inner ARP /
tagged / malformed frames, a wrong inner MAC; and bit-flipped copies of all of them.
Batches leave ENCAP_HEADROOM before most headers and sometimes less (no_headroom, and
encapsulation writing over the previous frame's tail: sequential semantics decide).
Control calls between batches change peers, the VTEP and ports. After every batch both
implementations agree on out_ports, the rewritten offsets and lengths, every byte of the
buffer, drained frames, counters, peers() and shaper states.
"""
import struct

import numpy as np
import pytest

from test_differential import (
    CONFIG, GW4, GW6, GW_MAC, HOST, NODE4, NODE_MAC, PODS, UPLINK, Traffic, _both, _compare_state, _control,
    _eq, eth, ipv4, l4_udp, pod_ip4, pod_ip6, pod_mac, setup,
)
from vswitch.datapath import consts as C

VTEP_MAC = bytes.fromhex("0200000ee001")
VNI = 42
HOP_MAC = bytes.fromhex("02000000bb07")
PEERS = [  # (ip, vtep MAC, underlay MAC or None, cidrs)
    (bytes([192, 168, 1, 21]), bytes.fromhex("0200000ee021"), HOP_MAC,
     [(bytes([10, 1, 0, 0]), 16), (bytes.fromhex("fd01") + bytes(14), 32)]),
    (bytes([192, 168, 1, 22]), bytes.fromhex("0200000ee022"), HOP_MAC,
     [(bytes([10, 1, 5, 0]), 24), (bytes.fromhex("fd0100000005") + bytes(10), 48)]),
    (bytes([192, 168, 1, 23]), bytes.fromhex("0200000ee023"), None, [(bytes([10, 2, 0, 0]), 16)]),
]


def remote4(rng):
    return bytes([10, int(rng.choice([1, 1, 2, 3])), int(rng.choice([5, 6, 200])), int(rng.integers(1, 255))])


def remote6(rng):
    return bytes.fromhex("fd0100000005" if rng.random() < 0.5 else "fd0100000009") + bytes(9) + bytes(
        [int(rng.integers(1, 255))])


def vxlan_setup(dps, mtu):
    for dp in dps:
        dp.set_vtep(UPLINK, NODE4, NODE_MAC, VTEP_MAC, VNI, mtu=mtu)
        for ip, vmac, umac, cidrs in PEERS:
            dp.set_peer(ip, vmac, umac, cidrs)


class VxTraffic(Traffic):
    def frame(self):
        rng = self.rng
        r = rng.random()
        if r < 0.2:
            return self.to_remote()
        if r < 0.4:
            return self.from_peer()
        return super().frame()

    def to_remote(self):
        rng = self.rng
        a = self.pick(PODS)
        family = 4 if rng.random() < 0.6 else 6
        src = pod_ip4(a) if family == 4 else pod_ip6(a)
        dst = remote4(rng) if family == 4 else remote6(rng)
        proto, pay = self.l4(family, src, dst, int(rng.integers(1000, 1100)), 80)
        if rng.random() < 0.03:
            pay += bytes(int(rng.choice([1400, 1430, 1460, 8000])))
        dmac = GW_MAC if rng.random() < 0.7 else VTEP_MAC
        f = bytearray(self.ip_frame(dmac, pod_mac(a), family, src, dst, proto, pay))
        if len(f) > 22 and rng.random() < 0.2:
            f[22 if family == 4 else 21] = int(rng.choice([0, 1, 2]))      # TTL / hop limit
        return bytes(f), a

    def from_peer(self):
        rng = self.rng
        family = 4 if rng.random() < 0.7 else 6
        peer = self.pick(PEERS)
        src = remote4(rng) if family == 4 else remote6(rng)
        x = rng.random()
        if x < 0.6:
            p = self.pick(PODS)
            dst = pod_ip4(p) if family == 4 else pod_ip6(p)
        elif x < 0.8:
            dst = GW4 if family == 4 else GW6
        else:
            dst = bytes([10, 0, 0, 77]) if family == 4 else bytes.fromhex("fd00") + bytes(13) + b"\x77"
        proto, pay = self.l4(family, src, dst, 2000, int(rng.integers(1, 100)))
        imac = VTEP_MAC if rng.random() < 0.9 else pod_mac(2)
        vlan = 7 if rng.random() < 0.03 else None
        if rng.random() < 0.03:
            inner = eth(imac, peer[1], 0x0806, bytes(28))
        else:
            inner = bytearray(self.ip_frame(imac, peer[1], family, src, dst, proto, pay, vlan))
            if len(inner) > 22 and rng.random() < 0.1:
                inner[22 if family == 4 else 21] = int(rng.choice([0, 1, 2]))
            inner = bytes(inner)
        flags = 0x08 if rng.random() < 0.95 else int(rng.choice([0, 0x0C, 0x88]))
        vni = VNI if rng.random() < 0.93 else VNI + 1
        hdr = struct.pack("!B3xI", flags, vni << 8)
        outer_src = peer[0] if rng.random() < 0.95 else bytes([192, 168, 1, 99])
        _, seg = l4_udp(outer_src, NODE4, int(rng.integers(49152, 65536)), C.VXLAN_PORT, hdr + inner,
                        csum=False)
        if rng.random() < 0.03:
            seg = seg[:4] + struct.pack("!H", int(rng.integers(8, 31))) + seg[6:]
        frag = 0x2000 if rng.random() < 0.02 else 0
        dmac = NODE_MAC if rng.random() < 0.97 else pod_mac(3)
        f = eth(dmac, HOP_MAC, 0x0800, ipv4(outer_src, NODE4, 17, seg, frag))
        return f, (UPLINK if rng.random() < 0.95 else HOST)

    def batch(self, n):
        rng = self.rng
        frames, ports, hdrs = [], [], []
        tight = rng.random() < 0.15            # the first frame without full headroom: no_headroom
        for i in range(n):
            f, p = self.to_remote() if tight and i == 0 and rng.random() < 0.5 else self.frame()
            frames.append(f)
            ports.append(p)
            hdrs.append(self.vnet_header())
            if 14 <= len(f) <= 400 and rng.random() < 0.3:
                self.recent.append((f, p))
                if len(self.recent) > 64:
                    self.recent.pop(0)
        H = self.H
        gaps = rng.integers(0, 60, n + 1) if tight else C.ENCAP_HEADROOM + rng.integers(0, 9, n + 1)
        total = int(sum(len(f) for f in frames) + n * H + gaps.sum()) + 1
        buf = rng.integers(0, 256, total, dtype=np.uint8)
        offsets = np.zeros(n + 3, dtype=np.uint32)
        lengths = np.zeros(n + 3, dtype=np.uint32)
        in_ports = np.zeros(n + 3, dtype=np.uint16)
        pos = int(gaps[0])
        for i, f in enumerate(frames):
            buf[pos:pos + H] = np.frombuffer(hdrs[i], np.uint8) if H else []
            pos += H
            offsets[i], lengths[i], in_ports[i] = pos, len(f), ports[i]
            buf[pos:pos + len(f)] = np.frombuffer(f, np.uint8) if f else []
            pos += len(f) + int(gaps[i + 1])
        x = rng.random()
        if n > 1 and x < 0.1:
            perm = rng.permutation(n)
            offsets[:n], lengths[:n], in_ports[:n] = offsets[perm], lengths[perm], in_ports[perm]
        elif n > 1 and x < 0.2:
            for i in rng.integers(1, n, size=1 + n // 8):
                j = int(rng.integers(0, i))
                offsets[i], lengths[i], in_ports[i] = offsets[j], lengths[j], in_ports[j]
        return buf, offsets, lengths, in_ports


def _vx_control(rng, dps):
    x = rng.random()
    ip, vmac, umac, cidrs = PEERS[int(rng.integers(len(PEERS)))]
    if x < 0.3:
        _both(dps, "set_peer", ip, vmac, None if rng.random() < 0.3 else HOP_MAC, cidrs)
    elif x < 0.5:
        _both(dps, "remove_peer", ip)
    elif x < 0.6:
        _both(dps, "set_peer", bytes([192, 168, 1, 30]), vmac, HOP_MAC, [(bytes([10, 1, 5, 128]), 25)])
    elif x < 0.7:
        _both(dps, "clear_vtep")
    elif x < 0.85:
        _both(dps, "set_vtep", UPLINK, NODE4, NODE_MAC, VTEP_MAC, VNI, C.VXLAN_PORT,
              int(rng.choice([1500, 9000, 1400])))
    else:
        _both(dps, "set_port_up", UPLINK, bool(rng.random() < 0.7))


def run_vx_scenario(both_impls, seed, n_frames, H, prefetch=False):
    rng = np.random.default_rng(seed)
    py_mod, c_mod = both_impls
    cfg = dict(CONFIG, vnet_hdr_len=H, max_peers=4)
    py, c = py_mod.Datapath(**cfg), c_mod.Datapath(**cfg)
    if prefetch:
        c._tune(prefetch_min_entries=0)
    dps = (py, c)
    setup(dps, H)
    vxlan_setup(dps, int(rng.choice([1500, 9000])))
    traffic = VxTraffic(rng, H)
    now = int(rng.integers(0, 10**9))
    sent = batch_no = 0
    while sent < n_frames:
        n = int(rng.choice([1, 3, 31, 32, 33, 64])) if rng.random() < 0.3 else int(rng.integers(0, 100))
        buf, offsets, lengths, in_ports = traffic.batch(n)
        bufs = [buf.copy(), buf.copy()]
        offs = [offsets.copy(), offsets.copy()]
        lens = [lengths.copy(), lengths.copy()]
        outs = [np.full(n + 3, 777, dtype=np.int32) for _ in dps]
        for dp, b, o, ln, out in zip(dps, bufs, offs, lens, outs):
            dp.process(b, o, ln, in_ports, out, n, now)
        where = f"seed {seed} H={H} batch {batch_no} now {now}"
        for i in range(n):
            got = [(int(outs[k][i]), int(offs[k][i]), int(lens[k][i])) for k in (0, 1)]
            o0, n0 = int(offsets[i]), int(lengths[i])
            assert got[0] == got[1], (f"{where}: packet {i} in_port {in_ports[i]} (out, offset, length) "
                                      f"py {got[0]} c {got[1]}\nin {buf[o0 - H:o0 + n0].tobytes().hex()}")
        assert np.array_equal(bufs[0], bufs[1]), f"{where}: buffers differ"
        sent += n
        batch_no += 1
        now += int(rng.choice([0, 1_000, 500_000, 2_000_000, 300_000_000]))
        if rng.random() < 0.7:
            size = int(rng.choice([60, 200, 3000, 70000, 300000]))
            maxp = int(rng.integers(0, 40))
            res = []
            for dp in dps:
                ob = np.zeros(size, dtype=np.uint8)
                arrs = [np.zeros(48, dtype=t) for t in (np.uint32, np.uint32, np.uint16, np.int32)]
                k = dp.drain(now, ob, *arrs, maxp)
                res.append((k, ob, *(a[:k] for a in arrs)))
            assert res[0][0] == res[1][0], f"{where}: drain count"
            for x0, x1 in zip(res[0][1:], res[1][1:]):
                assert np.array_equal(x0, x1), f"{where}: drain differs"
        if rng.random() < 0.06:
            _control(rng, dps, now)
        if rng.random() < 0.08:
            _vx_control(rng, dps)
        if rng.random() < 0.03:
            f, p = traffic.frame()
            t0, t1 = py.trace(f, p, now), c.trace(f, p, now)
            assert t0 == t1, f"{where}: trace {t0} vs {t1}"
        _compare_state(py, c, where, tables=batch_no % 4 == 0)
        assert py.peers() == c.peers() and py.vtep() == c.vtep(), f"{where}: peers / vtep"
    _compare_state(py, c, f"seed {seed} end", tables=True)
    assert _eq(np.array([py.global_counters()[C.GC["vxlan_encap"]]]), np.array([c.global_counters()[C.GC["vxlan_encap"]]]))
    return py


@pytest.mark.parametrize("seed,H,prefetch", [(21, 0, False), (22, 12, True), (23, 10, False)])
def test_random_batches_with_vxlan(both_impls, seed, H, prefetch):
    """15,000 frames per case; the mix reaches encapsulation, decapsulation and every
    VXLAN drop reason (checked on the twin's counters, so the mix cannot silently lose them)."""
    py = run_vx_scenario(both_impls, seed, 15_000, H, prefetch)
    g = py.global_counters()
    for name in ("vxlan_encap", "vxlan_decap", "ttl_expired", "vxlan_unresolved", "vxlan_bad_vni",
                 "vxlan_malformed", "vxlan_not_ours", "vxlan_unknown_peer", "vxlan_no_route", "no_headroom"):
        assert g[C.GC[name]] > 0, name
