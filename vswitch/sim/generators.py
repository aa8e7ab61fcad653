"""Traffic generators for the simulation, and the bulk engine that runs them fast.

Theory of operation
-------------------
A generator is a recipe: frames (one template, a list cycled in order, or a pcap) and
departure times. ``CBR``, ``Poisson``, ``OnOff`` and ``PcapReplay`` compute times
with numpy, a chunk at a time, through a *cursor* (``gen.cursor(start_ns, rng)``):
``peek(m)`` shows the next ``m`` (time, frame index) pairs without taking them and
``advance(k)`` takes ``k``. Times are integers (ns):

- ``CBR``: frame k leaves at ``start + floor(cum(k) · 10^9 / R)`` where ``cum(k)`` is
  k (rate in frames/s) or the bits of frames 0..k-1 (rate in bit/s). Exact integers, no
  drift: after any number of frames the rate is exact to one ns.
- ``Poisson``: exponential gaps with mean ``10^9 / rate_pps`` from a seeded
  ``numpy.random.Generator``; times are floored cumulative sums.
- ``OnOff``: CBR during ``on_ns``, silence for ``off_ns``, repeated.
- ``PcapReplay``: the frames of a pcap, at their captured spacing (``speed`` scales it)
  or retimed to a constant rate.

``schedule`` (``Simulation.generate``) turns a finite generator into ordinary events (per
frame, so hosts answer and ports record). ``run_bulk`` (``Simulation.run_bulk``) is the
fast path: the flows' cursors are merged a chunk at a time by time (ties: the order of
the flows), frames are copied into a preallocated buffer from a padded frame table with
one ``numpy.take`` per batch, each batch is one ``Datapath.process`` call at the time of
its last frame (a batch holds at most ``batch_size`` frames spanning at most
``batch_ns``, as a daemon reads a batch and then the clock once), shaper queues are
drained (``Switch.drain_due``) between batches at their departure times (no more often
than every ``batch_ns``), events queued meanwhile (frames sent for later; in record
mode, hosts' answers) run in time order between them, and outputs are counted per port
with ``numpy.bincount``. No Python runs per packet, nothing is recorded per packet
(``record=True`` records each frame as sent and as delivered, and hosts answer: slowly),
and memory is bounded by the chunk size and the frame table, whatever the number of
frames.

Both take the simulation as an ``engine.Engine`` and use only the names listed in
``engine.ENGINE_PROTOCOL`` (the clock, port ids, ``send``, ``deliver``, ...), never its
private state; the engine imports nothing from here.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from vswitch.datapath import consts as C
from vswitch.sim import frames as F
from vswitch.sim.engine import Engine

__all__ = ["CBR", "Poisson", "OnOff", "PcapReplay", "BulkResult", "schedule", "run_bulk"]

CHUNK = 65536          # frames per cursor peek in the bulk engine
_I63 = (1 << 63) - 1


def _frames(frame) -> list[bytes]:
    if isinstance(frame, (list, tuple)):
        if not frame:
            raise ValueError("frames: an empty list")
        out = [F.frame_bytes(f) for f in frame]
    else:
        out = [F.frame_bytes(frame)]
    for f in out:
        if not 0 < len(f) <= C.MAX_FRAME:
            raise ValueError(f"frame: {len(f)} bytes; accepted: 1 .. {C.MAX_FRAME}")
    return out


def _pos_int(name, v, allow_none=True):
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{name}: {v!r}; accepted: an integer ≥ 0")
    return int(v)


def _rate(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ValueError(f"{name}: {v!r}; accepted: a number > 0")
    return v


# =============================================================================== cursors

class _Cursor:
    """Sequential (time, frame index) producer with a look-ahead cache."""

    def __init__(self, count):
        self.remaining = count          # None: endless
        self._t = np.zeros(0, np.int64)
        self._i = np.zeros(0, np.int32)
        self.done = False

    def _produce(self, m: int):  # -> (times int64, idx int32), fewer than m at the end
        raise NotImplementedError

    def peek(self, m: int):
        while len(self._t) < m and not self.done:
            want = m - len(self._t)
            if self.remaining is not None:
                want = min(want, self.remaining)
            if want <= 0:
                self.done = True
                break
            t, i = self._produce(want)
            if len(t) == 0:
                self.done = True
                break
            if self.remaining is not None:
                self.remaining -= len(t)
            self._t = np.concatenate([self._t, t]) if len(self._t) else t
            self._i = np.concatenate([self._i, i]) if len(self._i) else i
        return self._t[:m], self._i[:m]

    def advance(self, k: int):
        self._t, self._i = self._t[k:], self._i[k:]


class _CumCursor(_Cursor):
    """t_k = start + floor(cum(k) · 10^9 / rate) with cum from a cycle of frame weights."""

    def __init__(self, start_ns, weights, rate, count, end_ns, nframes, period=None):
        super().__init__(count)
        self.start, self.rate, self.end = start_ns, rate, end_ns
        self.w = np.asarray(weights, np.int64)          # per frame of the cycle
        self.prefix = np.concatenate([[0], np.cumsum(self.w)])  # int64
        self.cycle_w = int(self.prefix[-1])
        self.nframes = nframes
        self.k = 0
        # frames per chunk so that (offset within chunk)·10^9 stays below 2^63
        self.max_chunk = max(1, min(CHUNK, (_I63 // (10 ** 9 + 1)) // max(1, int(self.w.max())) - 1))
        self.period = period  # OnOff: (frames per on period, on+off ns)

    def _cum(self, k: int) -> int:
        m = len(self.w)
        return (k // m) * self.cycle_w + int(self.prefix[k % m])

    def _produce(self, m):
        m = min(m, self.max_chunk)
        k0 = self.k
        ks = np.arange(k0, k0 + m, dtype=np.int64)
        n = len(self.w)
        if self.period is None:
            local = ks
            base_ns = np.zeros(m, np.int64)
            c0 = self._cum(k0)
        else:
            per, span_ns = self.period
            local = ks % per
            base_ns = (ks // per) * span_ns
            c0 = 0
        if self.period is None:
            q, r = divmod(c0 * 10 ** 9, self.rate)
            d = (ks // n - k0 // n) * self.cycle_w + self.prefix[ks % n] - int(self.prefix[k0 % n])
            t = self.start + q + (r + d * 10 ** 9) // self.rate
        else:
            # within an on period, cum restarts at 0 (weights are equal: see OnOff)
            t = self.start + base_ns + (local * int(self.w[0]) * 10 ** 9) // self.rate
        idx = (ks % self.nframes).astype(np.int32)
        if self.end is not None:
            keep = t < self.end
            if not keep.all():
                cut = int(np.argmin(keep))
                t, idx = t[:cut], idx[:cut]
                self.remaining = 0 if self.remaining is not None else None
                self.done = True
        self.k += len(t)
        return t.astype(np.int64), idx


class _ArrayCursor(_Cursor):
    """Times given by a function of k over a finite list (pcap captured timing)."""

    def __init__(self, times, idx):
        super().__init__(len(times))
        self._all_t, self._all_i, self.k = times, idx, 0

    def _produce(self, m):
        t, i = self._all_t[self.k:self.k + m], self._all_i[self.k:self.k + m]
        self.k += len(t)
        return t, i


class _PoissonCursor(_Cursor):
    def __init__(self, start_ns, rate_pps, count, end_ns, rng, nframes):
        super().__init__(count)
        self.start, self.scale, self.end, self.rng, self.nframes = start_ns, 1e9 / rate_pps, end_ns, rng, nframes
        self.t = 0.0
        self.k = 0

    def _produce(self, m):
        m = min(m, CHUNK)
        gaps = self.rng.exponential(self.scale, size=m)
        cum = self.t + np.cumsum(gaps)
        self.t = float(cum[-1])
        t = self.start + np.floor(cum).astype(np.int64)
        idx = ((np.arange(self.k, self.k + m)) % self.nframes).astype(np.int32)
        if self.end is not None:
            keep = t < self.end
            if not keep.all():
                cut = int(np.argmin(keep))
                t, idx = t[:cut], idx[:cut]
                self.done = True
        self.k += len(t)
        return t, idx


# =============================================================================== generators

class _Gen:
    frames: list[bytes]
    start_ns: int | None
    count: int | None
    duration_ns: int | None

    def _limits(self, count, duration_ns, start_ns):
        self.count = _pos_int("count", count)
        self.duration_ns = _pos_int("duration_ns", duration_ns)
        self.start_ns = _pos_int("start_ns", start_ns)

    @property
    def finite(self) -> bool:
        return self.count is not None or self.duration_ns is not None

    def _end(self, start):
        return None if self.duration_ns is None else start + self.duration_ns

    def cursor(self, start_ns: int, rng) -> _Cursor:
        raise NotImplementedError

    def times(self, start_ns: int = 0, seed: int = 0, limit: int = 10_000_000) -> np.ndarray:
        """All departure times (finite generators), for inspection and tests."""
        if not self.finite:
            raise ValueError(f"{type(self).__name__}: endless (give count= or duration_ns=)")
        c = self.cursor(start_ns, np.random.default_rng(seed))
        t, _ = c.peek(limit)
        return t.copy()


class CBR(_Gen):
    """Constant rate: ``rate_pps`` frames/s or ``rate_bps`` bits/s (frame bytes × 8)."""

    def __init__(self, frame, *, rate_pps=None, rate_bps=None, count=None, duration_ns=None, start_ns=None):
        self.frames = _frames(frame)
        if (rate_pps is None) == (rate_bps is None):
            raise ValueError(f"CBR: give exactly one of rate_pps ({rate_pps!r}) and rate_bps ({rate_bps!r})")
        if rate_pps is not None:
            _rate("rate_pps", rate_pps)
        else:
            _rate("rate_bps", rate_bps)
        if not all(isinstance(r, int) for r in (rate_pps, rate_bps) if r is not None):
            raise ValueError(f"CBR: rates are integers (rate_pps={rate_pps!r}, rate_bps={rate_bps!r})")
        self.rate_pps, self.rate_bps = rate_pps, rate_bps
        self._limits(count, duration_ns, start_ns)

    def cursor(self, start_ns, rng):
        if self.rate_pps is not None:
            w, rate = [1] * len(self.frames), self.rate_pps
        else:
            w, rate = [len(f) * 8 for f in self.frames], self.rate_bps
        return _CumCursor(start_ns, w, rate, self.count, self._end(start_ns), len(self.frames))


class Poisson(_Gen):
    """Poisson arrivals at ``rate_pps`` on average; ``seed`` or the simulation's."""

    def __init__(self, frame, *, rate_pps, count=None, duration_ns=None, start_ns=None, seed=None):
        self.frames = _frames(frame)
        self.rate_pps = _rate("rate_pps", rate_pps)
        self.seed = _pos_int("seed", seed)
        self._limits(count, duration_ns, start_ns)

    def cursor(self, start_ns, rng):
        if self.seed is not None:
            rng = np.random.default_rng(self.seed)
        return _PoissonCursor(start_ns, self.rate_pps, self.count, self._end(start_ns), rng, len(self.frames))


class OnOff(_Gen):
    """Bursts: CBR at the rate for ``on_ns``, then ``off_ns`` of silence, repeated.

    With ``rate_bps`` every frame must have the same length (the on-period spacing is
    one frame's bits / rate).
    """

    def __init__(self, frame, *, on_ns, off_ns, rate_pps=None, rate_bps=None, count=None,
                 duration_ns=None, start_ns=None):
        self.frames = _frames(frame)
        if (rate_pps is None) == (rate_bps is None):
            raise ValueError(f"OnOff: give exactly one of rate_pps ({rate_pps!r}) and rate_bps ({rate_bps!r})")
        rate = rate_pps if rate_pps is not None else rate_bps
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise ValueError(f"OnOff: rate {rate!r}; accepted: an integer > 0")
        if rate_bps is not None and len({len(f) for f in self.frames}) != 1:
            raise ValueError("OnOff with rate_bps: every frame must have the same length")
        self.rate_pps, self.rate_bps = rate_pps, rate_bps
        self.on_ns = _pos_int("on_ns", on_ns, False)
        self.off_ns = _pos_int("off_ns", off_ns, False)
        if self.on_ns == 0:
            raise ValueError("on_ns: 0; accepted: > 0")
        self._limits(count, duration_ns, start_ns)

    def cursor(self, start_ns, rng):
        if self.rate_pps is not None:
            w, rate = 1, self.rate_pps
        else:
            w, rate = len(self.frames[0]) * 8, self.rate_bps
        per = max(1, -(-self.on_ns * rate // (w * 10 ** 9)))   # frames with offset < on_ns
        return _CumCursor(start_ns, [w], rate, self.count, self._end(start_ns), len(self.frames),
                          period=(per, self.on_ns + self.off_ns))


class PcapReplay(_Gen):
    """The frames of a pcap: at their captured spacing (× 1/``speed``), or at ``rate_pps``.

    ``loops`` repeats the capture (one mean gap between the repeats).
    """

    def __init__(self, path, *, speed: float = 1.0, rate_pps=None, loops: int = 1, count=None,
                 start_ns=None):
        from scapy.utils import RawPcapReader
        frames, ts = [], []
        try:
            reader = RawPcapReader(str(path))
        except (OSError, Exception) as exc:
            raise ValueError(f"pcap {str(path)!r}: cannot read it ({exc})") from None
        with reader:
            nano = getattr(reader, "nano", False)
            for data, meta in reader:
                frames.append(bytes(data))
                sub = getattr(meta, "usec", 0)
                ts.append(meta.sec * 10 ** 9 + (sub if nano else sub * 1000))
        if not frames:
            raise ValueError(f"pcap {str(path)!r}: no frames")
        for f in frames:
            if len(f) > C.MAX_FRAME:
                raise ValueError(f"pcap {str(path)!r}: a frame of {len(f)} bytes; at most {C.MAX_FRAME}")
        self.frames = frames
        self.captured_ns = np.asarray(ts, np.int64) - ts[0]
        if np.any(np.diff(self.captured_ns) < 0):
            self.captured_ns = np.maximum.accumulate(self.captured_ns)   # keep time monotonic
        self.speed = _rate("speed", speed)
        self.rate_pps = None if rate_pps is None else _rate("rate_pps", rate_pps)
        if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
            raise ValueError(f"loops: {loops!r}; accepted: an integer ≥ 1")
        self.loops = loops
        self._limits(count, None, start_ns)
        if self.count is None:
            self.count = len(frames) * loops

    def cursor(self, start_ns, rng):
        n = len(self.frames)
        if self.rate_pps is not None:
            rate = self.rate_pps
            if isinstance(rate, float) and rate.is_integer():
                rate = int(rate)
            if isinstance(rate, int):
                return _CumCursor(start_ns, [1] * n, rate, self.count, None, n)
            k = np.arange(self.count, dtype=np.int64)
            t = start_ns + np.floor(k * (1e9 / rate)).astype(np.int64)
            return _ArrayCursor(t, (k % n).astype(np.int32))
        rel = np.floor(self.captured_ns / self.speed).astype(np.int64)
        span = int(rel[-1])
        gap = span // (n - 1) if n > 1 else 1
        k = np.arange(self.count, dtype=np.int64)
        t = start_ns + (k // n) * (span + gap) + rel[k % n]
        return _ArrayCursor(t, (k % n).astype(np.int32))


# =============================================================================== scheduling

def _start(sim, gen, start_ns):
    start = start_ns if start_ns is not None else gen.start_ns if gen.start_ns is not None else sim.now
    start = _pos_int("start_ns", start, False)
    if start < sim.now:
        raise ValueError(f"start_ns: {start} is before the current time {sim.now}")
    return start


def schedule(sim: Engine, port, gen, start_ns=None) -> int:
    """Queue every frame of a finite generator as a simulation event; returns the count."""
    if not isinstance(gen, _Gen):
        raise ValueError(f"generator: {gen!r}; accepted: CBR, Poisson, OnOff, PcapReplay")
    if not gen.finite:
        raise ValueError(f"{type(gen).__name__}: endless; give count= or duration_ns= to schedule it")
    sim.port_id(port)   # unknown port: KeyError before anything is queued
    cur = gen.cursor(_start(sim, gen, start_ns), sim.new_rng())
    n = 0
    while True:
        t, idx = cur.peek(CHUNK)
        if len(t) == 0:
            break
        for ti, ii in zip(t.tolist(), idx.tolist()):
            sim.send(port, gen.frames[ii], at_ns=ti)
        n += len(t)
        cur.advance(len(t))
    return n


# =============================================================================== bulk

@dataclass
class BulkResult:
    """What ``run_bulk`` did; frame counts per port name."""
    frames: int = 0                 # frames sent into the switch
    batches: int = 0                # process() calls
    drained: int = 0                # frames released by drain()
    wall_s: float = 0.0
    start_ns: int = 0
    end_ns: int = 0
    delivered: dict = field(default_factory=dict)   # port name -> frames output to it
    dropped: int = 0                # OUT_DROP outcomes (process and drain)
    queued: int = 0                 # OUT_QUEUED outcomes
    flooded: int = 0                # OUT_FLOOD and OUT_FLOOD_UNKNOWN outcomes

    @property
    def frames_per_s(self) -> float:
        """Simulated frames per second of wall time."""
        return self.frames / self.wall_s if self.wall_s > 0 else float("inf")


class _Tally:
    def __init__(self, sim: Engine):
        self.sim = sim
        self.max_ports = sim.config.max_ports
        self.out = np.zeros(self.max_ports, np.int64)
        # per flood output (OUT_FLOOD, OUT_FLOOD_UNKNOWN): count, and count per input port
        self.flood_from = {C.OUT_FLOOD: np.zeros(self.max_ports, np.int64),
                           C.OUT_FLOOD_UNKNOWN: np.zeros(self.max_ports, np.int64)}
        self.flood_n = {C.OUT_FLOOD: 0, C.OUT_FLOOD_UNKNOWN: 0}
        self.floods = 0
        self.drops = 0
        self.queued = 0

    def add(self, outs, ins):
        if len(outs) == 0:
            return
        pos = outs >= 0
        if pos.all():
            self.out += np.bincount(outs, minlength=self.max_ports)
            return
        self.out += np.bincount(outs[pos], minlength=self.max_ports)
        for kind in (C.OUT_FLOOD, C.OUT_FLOOD_UNKNOWN):
            fl = outs == kind
            nf = int(fl.sum())
            if nf:
                self.floods += nf
                self.flood_n[kind] += nf
                self.flood_from[kind] += np.bincount(ins[fl], minlength=self.max_ports)
        self.drops += int((outs == C.OUT_DROP).sum())
        self.queued += int((outs == C.OUT_QUEUED).sum())

    def delivered(self) -> dict:
        sim = self.sim
        res = {}
        # flood targets: the datapath's flood classes (docs/datapath.md D41); a shaped port's
        # copies went through its queue and are counted when drained
        fc = sim.switch.dp.flood_classes()
        member = {C.OUT_FLOOD: C.FLOOD_MEMBER, C.OUT_FLOOD_UNKNOWN: C.FLOOD_UNKNOWN_MEMBER}
        for pid, name in sim.port_names().items():
            n = int(self.out[pid])
            for kind, bit in member.items():
                if fc[pid] & bit:
                    n += self.flood_n[kind] - int(self.flood_from[kind][pid])
            if n:
                res[name] = n
        return res


def run_bulk(sim: Engine, flows, *, until_ns=None, batch_size=256, batch_ns=100_000, record=False,
             chunk_frames=CHUNK) -> BulkResult:
    """Run generator flows [(port, generator), ...] through the switch in numpy batches.

    Memory: the frame table plus about ``chunk_frames`` × 40 bytes of schedule, whatever
    the number of frames.
    """
    if isinstance(flows, tuple) and len(flows) == 2 and isinstance(flows[1], _Gen):
        flows = [flows]
    flows = list(flows)
    if not flows:
        raise ValueError("run_bulk: no flows; give [(port, generator), ...]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 65536:
        raise ValueError(f"batch_size: {batch_size!r}; accepted: 1 .. 65536")
    batch_ns = _pos_int("batch_ns", batch_ns, False)
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise ValueError(f"chunk_frames: {chunk_frames!r}; accepted: an integer ≥ 1")
    if until_ns is not None:
        until_ns = _pos_int("until_ns", until_ns, False)
        if until_ns < sim.now:
            raise ValueError(f"until_ns: {until_ns} is before the current time {sim.now}")
    ports, gens = [], []
    for item in flows:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ValueError(f"run_bulk: flow {item!r}; accepted: (port, generator)")
        port, gen = item
        if not isinstance(gen, _Gen):
            raise ValueError(f"run_bulk: generator {gen!r}; accepted: CBR, Poisson, OnOff, PcapReplay")
        if not gen.finite and until_ns is None:
            raise ValueError(f"run_bulk: {type(gen).__name__} is endless; give until_ns= or count=/duration_ns=")
        ports.append(sim.port_id(port))
        gens.append(gen)

    # the padded frame table: every flow's frames, ENCAP_HEADROOM and the vnet header in
    # front of each (as the daemon's read loops lay a batch out: VXLAN encap writes there)
    H = sim.config.vnet_hdr_len
    R = C.ENCAP_HEADROOM + H
    base, all_frames = [], []
    for g in gens:
        base.append(len(all_frames))
        all_frames.extend(g.frames)
    maxlen = max(len(f) for f in all_frames)
    stride = -(-(maxlen + R) // 8) * 8
    table = np.zeros((len(all_frames), stride), np.uint8)
    tlen = np.empty(len(all_frames), np.uint32)
    for k, f in enumerate(all_frames):
        table[k, R:R + len(f)] = np.frombuffer(f, np.uint8)
        tlen[k] = len(f)
    B = batch_size
    buf2d = np.zeros((B, stride), np.uint8)
    buf = buf2d.reshape(-1)
    offsets = (np.arange(B, dtype=np.uint32) * stride + R).astype(np.uint32)
    cursors = [g.cursor(_start(sim, g, None), sim.new_rng()) for g in gens]
    flow_port = np.asarray(ports, np.uint16)
    flow_base = np.asarray(base, np.int32)

    res = BulkResult(start_ns=sim.now)
    tally = _Tally(sim)
    dout = None
    sw = sim.switch
    state = {"last_drain": -1}

    def drain_until(now):
        nonlocal dout
        while True:
            nd = sw.next_departure_ns()
            if nd < 0 or nd > now:
                return
            td = max(nd, sim.now)
            if batch_ns and state["last_drain"] >= 0:
                td = max(td, min(now, state["last_drain"] + batch_ns))
            t_ev = sim.next_event_ns()
            if t_ev is not None and t_ev < td:
                sim.run(until_ns=t_ev)     # queued events (replies, routed frames) first: time never runs back
                continue
            if dout is None:
                cap = 1024
                dout = (np.zeros(max(1 << 20, 2 * (C.MAX_FRAME + H)), np.uint8), np.empty(cap, np.uint32),
                        np.empty(cap, np.uint32), np.empty(cap, np.uint16), np.empty(cap, np.int32), cap)
            b, o, l_, i_, p_, cap = dout
            sim.set_clock(td)
            state["last_drain"] = td
            if record:
                res.drained += sw.drain_due(td, b, o, l_, i_, p_, cap,
                                            lambda k: sim.deliver(td, b, o, l_, i_, p_, k))
            else:
                res.drained += sw.drain_due(td, b, o, l_, i_, p_, cap, lambda k: tally.add(p_[:k], i_[:k]))

    def run_events(now):
        t_ev = sim.next_event_ns()
        if t_ev is not None and t_ev <= now:
            sim.run(until_ns=now)

    # look-ahead per flow: the merged chunk stays near CHUNK frames however many flows
    look = max(min(256, chunk_frames), chunk_frames // len(cursors))
    t_wall = time.perf_counter()
    stop = False
    while not stop:
        peeks = [c.peek(look) for c in cursors]
        if all(len(t) == 0 for t, _ in peeks):
            break
        t_cut = None
        for (t, _), c in zip(peeks, cursors):
            if len(t) == look:
                last = int(t[-1])
                t_cut = last if t_cut is None else min(t_cut, last)
        if until_ns is not None and (t_cut is None or t_cut > until_ns):
            t_cut = until_ns
        parts_t, parts_i, parts_p = [], [], []
        for f, ((t, i), c) in enumerate(zip(peeks, cursors)):
            k = len(t) if t_cut is None else int(np.searchsorted(t, t_cut, side="right"))
            if k:
                parts_t.append(t[:k])
                parts_i.append(i[:k] + flow_base[f])
                parts_p.append(np.full(k, flow_port[f], np.uint16))
                c.advance(k)
        if not parts_t:
            break       # everything left is after until_ns
        if len(parts_t) == 1:
            times, idx, inp = parts_t[0], parts_i[0], parts_p[0]
        else:
            times = np.concatenate(parts_t)
            order = np.argsort(times, kind="stable")
            times = times[order]
            idx = np.concatenate(parts_i)[order]
            inp = np.concatenate(parts_p)[order]
        inp = np.ascontiguousarray(inp)
        lens = np.ascontiguousarray(tlen[idx])
        outs = np.empty(len(times), np.int32)
        n = len(times)
        i = 0
        while i < n:
            t0 = int(times[i])
            j = min(i + B, n)
            if int(times[j - 1]) - t0 > batch_ns:
                j = int(np.searchsorted(times, t0 + batch_ns, side="right", sorter=None))
                j = min(max(j, i + 1), i + B)
            now = int(times[j - 1])
            drain_until(now)
            run_events(now)
            m = j - i
            np.take(table, idx[i:j], axis=0, out=buf2d[:m])
            sim.set_clock(now)
            if record:                     # as sent: process() rewrites frames in place (NAT)
                sim.capture_sent(now, buf, offsets, lens[i:j], inp[i:j], m)
            sw.process(buf, offsets, lens[i:j], inp[i:j], outs[i:j], m, now)
            res.batches += 1
            if record:
                sim.deliver(now, buf, offsets, lens[i:j], inp[i:j], outs[i:j], m)
            i = j
        res.frames += n
        if not record:
            tally.add(outs, inp)
        if until_ns is not None and t_cut == until_ns and any(len(c.peek(1)[0]) for c in cursors):
            stop = True
    # what is still queued leaves on time (until until_ns, or until every queue is empty)
    horizon = until_ns if until_ns is not None else None
    while True:
        nd = sw.next_departure_ns()
        if nd < 0 or (horizon is not None and nd > horizon):
            break
        drain_until(max(nd, sim.now) if horizon is None else min(horizon, max(nd, sim.now) + batch_ns))
    if until_ns is not None:
        run_events(until_ns)
        sim.set_clock(max(sim.now, until_ns))
    elif sim.next_event_ns() is not None:
        sim.run()
    res.wall_s = time.perf_counter() - t_wall
    res.end_ns = sim.now
    res.delivered = tally.delivered() if not record else {}
    res.dropped, res.queued, res.flooded = tally.drops, tally.queued, tally.floods
    sim.count_frames(res.frames, res.drained)
    return res
