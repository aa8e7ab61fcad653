"""The datapath core in memory: the Cython core against the pure-Python twin (issue 2).

Figures (pytest-benchmark, the bench/README.md convention via ``bench.report.record``):

- ``core-mixed-64B``: mixed traffic of 64-byte frames - 80% known unicast (pod to a host
  behind the uplink), 10% hostPort DNAT (established flows, original direction), 10% from
  a pod whose egress shaper has tokens - in batches of 256 (and 1, 32 for the batch
  curve), 16 MACs and 16 conntrack entries; subjects ``vswitch`` (Cython) and
  ``vswitch-py`` (the twin), measured in the same run. Target: >= 30 Mpps and >= 25x the
  twin at batch 256.
- ``core-tables``: the same traffic at batch 256 with 16 and with 65,536 MAC and conntrack
  entries; traffic ``spread``: the destinations and flows are drawn from the whole table,
  so a large table really is touched all over (the figure the 1.3x target is judged on);
  ``hot16``: only 16 of them are used (the cost of the table size alone). Target: the
  65,536 cost within 1.3x the 16 one.

Each benchmarked call processes ``rounds_batches`` batches laid out in one buffer (a vnet
header before every frame, as vswitchd uses them); a setup step that is not timed
restores the pristine frames (DNAT rewrites them in place) and advances now_ns. Traffic
is built with numpy only, outside the timed region. After the measurement each benchmark
checks that every frame went where the mix says (no drop, no queueing), so a figure
never measures a broken path. ``extra_info["info"]`` holds ns_per_packet and Mpps
(median), the table sizes and the features.

    python -m pytest bench/bench_core.py --benchmark-only
"""
import numpy as np
import pytest

from bench.report import quick_mode, record
from vswitch import dpconst as C

H = 12                        # vnet header bytes before each frame (vswitchd's layout)
FRAME = 64
STRIDE = 80                   # header + frame + padding per slot
UPLINK, HOST = 1, 0
PODS = list(range(2, 10))     # 8 pods; PODS[0] has the egress shaper
SHAPED = PODS[0]
NODE_IP = bytes([192, 168, 1, 1])
NODE_MAC = bytes.fromhex("02000000aa01")
GW_MAC = bytes.fromhex("02000000fe01")
HOST_PORT0 = 8081             # hostPorts 8081.. map to pods PODS[1:], container port 80
CONTAINER_PORT = 80
NOW0 = 10 * C.SEC_NS

_RESULTS = {}                 # (group, subject, key) -> median seconds per call, for ratios


def pod_mac(p):
    return np.array([2, 0, 0, 0, 1, p], np.uint8)


def pod_ip(p):
    return np.array([10, 0, 0, 10 + p], np.uint8)


def client_macs(idx):
    """MACs 02:01:00:ii:ii:ii for client indexes (array)."""
    idx = np.asarray(idx, np.uint32)
    out = np.zeros((len(idx), 6), np.uint8)
    out[:, 0], out[:, 1] = 2, 1
    out[:, 3], out[:, 4], out[:, 5] = idx >> 16, (idx >> 8) & 0xFF, idx & 0xFF
    return out


def client_ips(idx):
    """100.64.0.0/10 addresses for client indexes."""
    idx = np.asarray(idx, np.uint32) + 1
    out = np.zeros((len(idx), 4), np.uint8)
    out[:, 0], out[:, 1] = 100, 64 + (idx >> 16)
    out[:, 2], out[:, 3] = (idx >> 8) & 0xFF, idx & 0xFF
    return out


def be16(a):
    a = np.asarray(a, np.uint32)
    return np.stack([(a >> 8) & 0xFF, a & 0xFF], axis=1).astype(np.uint8)


def build_frames(dst_mac, src_mac, src_ip, dst_ip, proto, sport, dport, tcp_flags=0x10):
    """n 64-byte IPv4 frames (UDP or TCP) as an (n, 64) uint8 array; numpy only."""
    n = len(dst_mac)
    f = np.zeros((n, FRAME), np.uint8)
    f[:, 0:6], f[:, 6:12] = dst_mac, src_mac
    f[:, 12:14] = (0x08, 0x00)
    f[:, 14], f[:, 16:18], f[:, 22] = 0x45, be16([FRAME - 14] * n), 64
    f[:, 23] = proto
    f[:, 26:30], f[:, 30:34] = src_ip, dst_ip
    f[:, 34:36], f[:, 36:38] = be16(sport), be16(dport)
    if proto == 17:
        f[:, 38:40] = be16([FRAME - 34] * n)
    else:
        f[:, 46], f[:, 47] = 5 << 4, tcp_flags
        f[:, 48:50] = (0xFF, 0xFF)
    # a valid IPv4 header checksum (the datapath patches it, never checks it)
    words = f[:, 14:34].astype(np.uint32).reshape(n, 10, 2)
    s = (words[:, :, 0] << 8 | words[:, :, 1]).sum(axis=1)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    f[:, 24:26] = be16(~s & 0xFFFF)
    return f


class Batches:
    """Frames in slots of one buffer, as `count` batches of `batch` packets."""

    def __init__(self, frames, in_ports, batch):
        n = len(frames)
        self.batch, self.count = batch, n // batch
        self.pristine = np.zeros(n * STRIDE, np.uint8)
        view = self.pristine.reshape(n, STRIDE)
        view[:, H:H + FRAME] = frames
        self.buf = self.pristine.copy()
        self.offsets = (np.arange(n, dtype=np.uint32) * STRIDE + H).reshape(self.count, batch)
        self.lengths = np.full((self.count, batch), FRAME, np.uint32)
        self.in_ports = np.asarray(in_ports, np.uint16).reshape(self.count, batch)
        self.out_ports = np.zeros((self.count, batch), np.int32)

    def restore(self):
        np.copyto(self.buf, self.pristine)

    def run(self, dp, now_ns):
        for j in range(self.count):
            dp.process(self.buf, self.offsets[j], self.lengths[j], self.in_ports[j],
                       self.out_ports[j], self.batch, now_ns)


class Setup:
    """A datapath with n_macs MAC and n_conns conntrack entries, and the mixed traffic."""

    def __init__(self, mod, n_macs, n_conns, batch, batches, seed=7, hot=None):
        rng = np.random.default_rng(seed)
        self.dp = dp = mod.Datapath(vnet_hdr_len=H, mac_table_size=max(65536, n_macs),
                                    conntrack_size=max(65536, n_conns))
        dp.add_port(HOST, C.PORT_HOST)
        dp.add_port(UPLINK, C.PORT_UPLINK)
        for p in PODS:
            dp.add_port(p, C.PORT_POD)
            dp.bind_port(p, pod_mac(p).tobytes(), [pod_ip(p).tobytes()])
        dp.set_gateway(GW_MAC, bytes([10, 0, 0, 1]))
        dp.set_node_addresses([NODE_IP])
        dp.set_shaper(SHAPED, C.EGRESS, 10 * 10**9, 2**32 - 1)       # tokens always available
        for i, p in enumerate(PODS[1:]):
            dp.add_hostport(6, HOST_PORT0 + i, pod_ip(p).tobytes(), CONTAINER_PORT, p)
        self.now = NOW0
        self.n_clients = n_clients = n_macs - len(PODS)
        # learn the pods and the clients (MAC table: exactly n_macs entries)
        learn = [build_frames(np.repeat(pod_mac(PODS[1])[None], len(PODS), 0),
                              np.stack([pod_mac(p) for p in PODS]), np.stack([pod_ip(p) for p in PODS]),
                              np.repeat(pod_ip(PODS[1])[None], len(PODS), 0), 17, [5000] * len(PODS),
                              [5001] * len(PODS))]
        ports = [PODS]
        cidx = np.arange(n_clients)
        learn.append(build_frames(np.repeat(pod_mac(PODS[1])[None], n_clients, 0), client_macs(cidx),
                                  client_ips(cidx), np.repeat(pod_ip(PODS[1])[None], n_clients, 0), 17,
                                  [5000] * n_clients, [5001] * n_clients))
        ports.append([UPLINK] * n_clients)
        self._feed(np.concatenate(learn), np.concatenate(ports))
        # conntrack: n_conns established flows client -> node:hostPort -> pod
        f = np.arange(n_conns)
        self.flow_client = f % n_clients
        self.flow_sport = 20000 + f // n_clients
        self.flow_rule = f % (len(PODS) - 1)
        syn = build_frames(np.repeat(np.frombuffer(NODE_MAC, np.uint8)[None], n_conns, 0),
                           client_macs(self.flow_client), client_ips(self.flow_client),
                           np.repeat(np.frombuffer(NODE_IP, np.uint8)[None], n_conns, 0), 6,
                           self.flow_sport, HOST_PORT0 + self.flow_rule, tcp_flags=0x02)
        pods = np.array(PODS[1:])[self.flow_rule]
        synack = build_frames(np.repeat(np.frombuffer(GW_MAC, np.uint8)[None], n_conns, 0),
                              np.stack([pod_mac(p) for p in pods]), np.stack([pod_ip(p) for p in pods]),
                              client_ips(self.flow_client), 6, [CONTAINER_PORT] * n_conns,
                              self.flow_sport, tcp_flags=0x12)
        self._feed(syn, np.full(n_conns, UPLINK))
        self._feed(synack, pods)
        fdb, ct = dp.fdb(), dp.conntrack()
        assert len(fdb) == n_macs, (len(fdb), n_macs)
        assert len(ct) == n_conns and (ct["state"] == C.CT_ESTABLISHED).all()
        # the measured traffic
        n = batch * batches
        kind = rng.choice(3, size=n, p=[0.8, 0.1, 0.1])      # 0 unicast, 1 DNAT, 2 shaped
        src_pod = np.where(kind == 2, SHAPED, rng.choice(PODS[1:], size=n))
        # the traffic's destinations and flows: the whole table, or only `hot` of them
        dst_client = rng.integers(0, min(n_clients, hot or n_clients), size=n)
        flow = rng.integers(0, min(n_conns, hot or n_conns), size=n)
        uni = build_frames(client_macs(dst_client), np.stack([pod_mac(p) for p in range(16)])[src_pod],
                           np.stack([pod_ip(p) for p in range(16)])[src_pod], client_ips(dst_client), 17,
                           rng.integers(5000, 6000, n), rng.integers(5000, 6000, n))
        dnat = build_frames(np.repeat(np.frombuffer(NODE_MAC, np.uint8)[None], n, 0),
                            client_macs(self.flow_client[flow]), client_ips(self.flow_client[flow]),
                            np.repeat(np.frombuffer(NODE_IP, np.uint8)[None], n, 0), 6,
                            self.flow_sport[flow], HOST_PORT0 + self.flow_rule[flow])
        frames = np.where((kind == 1)[:, None], dnat, uni)
        in_ports = np.where(kind == 1, UPLINK, src_pod)
        self.expected = np.where(kind == 1, np.array(PODS[1:])[self.flow_rule[flow]], UPLINK)
        self.expected = self.expected.reshape(batches, batch)
        self.batches = Batches(frames, in_ports, batch)
        self.n_packets = n

    def _feed(self, frames, ports, chunk=1024):
        for i in range(0, len(frames), chunk):
            b = Batches(frames[i:i + chunk], ports[i:i + chunk], len(frames[i:i + chunk]))
            b.run(self.dp, self.now)
        self.now += C.SEC_NS // 1000

    def round_setup(self):
        """Not timed: pristine frames back, time moves on (the cost of the packets at 20 ns)."""
        self.batches.restore()
        self.now += self.n_packets * 20
        return (), {}

    def run(self):
        self.batches.run(self.dp, self.now)

    def check(self):
        got = self.batches.out_ports
        assert np.array_equal(got, self.expected), \
            f"{int((got != self.expected).sum())} frames went elsewhere: {np.unique(got[got != self.expected])}"


def _impl(name):
    if name == "py":
        from vswitch import datapath_py
        return datapath_py
    from vswitch import _datapath
    return _datapath


def _measure(benchmark, s, rounds):
    benchmark.pedantic(s.run, setup=s.round_setup, rounds=rounds, iterations=1, warmup_rounds=2)
    s.check()
    median = benchmark.stats.stats.median
    ns = median / s.n_packets * 1e9
    return median, ns


def _interleaved_ratio(big, small, rounds):
    """Median time per round of `big` over that of `small`, alternating rounds."""
    import time
    times = {id(big): [], id(small): []}
    for _ in range(rounds):
        for s in (small, big):
            s.round_setup()
            t0 = time.perf_counter_ns()
            s.run()
            times[id(s)].append(time.perf_counter_ns() - t0)
    big.check()
    small.check()
    return float(np.median(times[id(big)]) / np.median(times[id(small)]))


BATCHES = [1, 32, 256] if quick_mode() else [1, 3, 32, 33, 256, 1024]


@pytest.mark.parametrize("impl", ["c", "py"])
@pytest.mark.parametrize("batch", BATCHES)
def test_core_mixed(benchmark, impl, batch):
    """Mixed 64-byte traffic, 16 MACs / 16 flows; the twin right after the core."""
    if impl == "py" and batch not in (32, 256):
        pytest.skip("the twin is measured at batch 32 and 256 only (slow)")
    mod = _impl(impl)
    if impl == "c":
        per_call = max(4096, batch)
        s = Setup(mod, 16, 16, batch, per_call // batch)
        rounds = 50 if quick_mode() else 2000
    else:
        s = Setup(mod, 16, 16, batch, 1)
        rounds = 3 if quick_mode() else 10
    subject = "vswitch" if impl == "c" else "vswitch-py"
    median, ns = _measure(benchmark, s, rounds)
    _RESULTS[("core-mixed-64B", impl, batch)] = ns
    info = dict(ns_per_packet=round(ns, 2), mpps=round(1e3 / ns, 2), mac_entries=16, ct_entries=16,
                mac_table_size=65536, conntrack_size=65536, vnet_hdr_len=H,
                mix="80% known unicast, 10% hostPort DNAT, 10% egress-shaped with tokens")
    if impl == "py" and ("core-mixed-64B", "c", batch) in _RESULTS:
        info["c_speedup"] = round(ns / _RESULTS[("core-mixed-64B", "c", batch)], 1)
    record(benchmark, group="core-mixed-64B", subject=subject, unit="mpps", per_round=s.n_packets,
           target="core-mpps" if batch == 256 else None, info=info, batch=batch, frame_bytes=FRAME,
           features="all")


@pytest.mark.parametrize("traffic", ["spread", "hot16"])
@pytest.mark.parametrize("entries", [16, 65536])
def test_core_tables(benchmark, entries, traffic):
    """The same mix at batch 256 with 16 or 65,536 MAC and conntrack entries (Cython core).

    traffic "spread": destinations and flows drawn from the whole table (every lookup a
    cache miss without the prefetch pipeline); "hot16": only 16 of them (what a bigger
    table costs by itself: probe lengths, the prefetch pipeline's own work).
    """
    if entries == 16 and traffic == "hot16":
        pytest.skip("with 16 entries both traffics are the same")
    s = Setup(_impl("c"), entries, entries, 256, 16, hot=16 if traffic == "hot16" else None)
    median, ns = _measure(benchmark, s, 50 if quick_mode() else 2000)
    _RESULTS[("core-tables", "c", entries, traffic)] = ns
    info = dict(ns_per_packet=round(ns, 2), mpps=round(1e3 / ns, 2), mac_entries=entries,
                ct_entries=entries, batch=256, features="all")
    base = _RESULTS.get(("core-tables", "c", 16, "spread"))
    if entries != 16 and base:
        info["cost_vs_16_entries"] = round(ns / base, 3)
    if entries != 16:
        # the same comparison interleaved round by round, so both sides share the machine's
        # momentary state (the 2-vCPU guest is shared: sequential benchmarks drift)
        small = Setup(_impl("c"), 16, 16, 256, 16)
        info["cost_vs_16_entries_interleaved"] = round(_interleaved_ratio(s, small, 60 if quick_mode() else 600), 3)
    record(benchmark, group="core-tables", subject="vswitch", unit="mpps", per_round=s.n_packets,
           info=info, macs=entries, conns=entries, traffic=traffic)
