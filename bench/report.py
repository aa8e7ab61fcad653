"""Turns pytest-benchmark JSON into rows, a Markdown report, target verdicts and a comparison.

Theory of operation
-------------------
pytest-benchmark measures the wall time of a function; most of our figures are not wall
times (Mpps, Gbit/s, ms of RTT, achieved/set rate). Each benchmark therefore says, in
``benchmark.group`` and ``benchmark.extra_info``, *what* it measured (the convention is
written out in ``bench/README.md``; ``record()`` below fills it in):

- ``group``: the figure, e.g. ``core-mixed-64B`` or ``real-tcp``;
- ``subject``: who was measured (``vswitch``, ``vswitch-py``, ``bridge``, ``ovs``,
  ``reference-cni``, ``bandwidth-plugin``, ...);
- ``unit``: the headline unit (a key of ``UNITS``), and the headline itself from, in order
  of preference: ``samples`` (one value per repetition, e.g. Gbit/s of each iperf3 run),
  ``per_round`` (work items per benchmarked call: the unit is derived from the timing
  statistics, e.g. Mpps = packets / seconds), or ``extra_info[unit]`` (one value);
- parameters (``batch``, ``frame_bytes``, ``pods``, ...): the x-axes and the identity of a
  measurement. Two rows of one group with equal parameters and different subjects are
  *peers*, measured in the same run; ratios are only ever taken between peers.

A benchmark that follows none of this still appears: its row is the pytest-benchmark time
(median, min, max in seconds), its subject the test name, and the report lists it under
"not following the convention" so its author can align it.

A run fails when a subject it was to measure left no row (``missing_subjects``): every
benchmark test names its subject (its ``subject`` or ``impl`` parameter, or its function
name), the runner's plugin passes that on with each outcome, and each (file, subject)
among the selected tests must have a row, unless that subject is allowed to be missing.
A skipped peer is therefore a loud failure, not a quiet gap in a ratio column.

Every row carries median, min, max and, where it has enough repetitions, the quartiles.
A comparison between two runs (``compare``) calls a change real only when the two
intervals (quartiles with ≥ 5 repetitions on both sides, else min..max) do not overlap.

This module imports only the standard library, so benchmark files can import ``record``
and ``quick_mode`` cheaply.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------- convention

#: unit -> (label, better, kind). better: "higher", "lower", or "one" (closest to 1 wins).
#: kind says how ``per_round`` derives the unit from seconds per round t and items n:
#: "rate" value = n / t / scale, "time" value = t / n * scale, None: not derivable.
UNITS = {
    "mpps": ("Mpps", "higher", ("rate", 1e6)),
    "kpps": ("kpps", "higher", ("rate", 1e3)),
    "pps": ("packets/s", "higher", ("rate", 1.0)),
    "fps": ("frames/s", "higher", ("rate", 1.0)),
    "ops": ("operations/s", "higher", ("rate", 1.0)),
    "pods_per_s": ("pods/s", "higher", ("rate", 1.0)),
    "gbps": ("Gbit/s", "higher", None),
    "mbps": ("Mbit/s", "higher", None),
    "ns_per_packet": ("ns/packet", "lower", ("time", 1e9)),
    "ns_per_op": ("ns/operation", "lower", ("time", 1e9)),
    "us": ("µs", "lower", ("time", 1e6)),
    "ms": ("ms", "lower", ("time", 1e3)),
    "s": ("s", "lower", ("time", 1.0)),
    "rtt_ms": ("ms RTT", "lower", None),
    "achieved_ratio": ("achieved/set", "one", None),
}

#: extra_info keys that are parameters (x-axes and identity). Others: ``param_keys``.
PARAM_KEYS = (
    "batch", "frame_bytes", "segment_bytes", "pods", "macs", "flows", "conns", "streams",
    "rate_bps", "direction", "parallel", "hostports", "ports", "features", "traffic",
    "mtu", "offload", "path",
)
#: numeric parameters a figure can be plotted against, in order of preference.
X_KEYS = ("batch", "frame_bytes", "segment_bytes", "pods", "macs", "flows", "conns",
          "streams", "rate_bps", "parallel", "hostports", "ports")
#: the subject every other subject of a figure is compared with.
PRIMARY = "vswitch"
#: known subjects, in the order tables list them.
SUBJECTS = ("vswitch", "vswitch-py", "bridge", "ovs", "reference-cni", "bandwidth-plugin",
            "portmap")
RESERVED = ("group", "subject", "unit", "samples", "per_round", "target", "note", "param_keys",
            "info", "better")


def quick_mode() -> bool:
    """True when the runner asked for the quick subset (``VSWITCH_BENCH_QUICK=1``):
    benchmark files shrink their parameter grids and durations."""
    return os.environ.get("VSWITCH_BENCH_QUICK", "") not in ("", "0")


def record(benchmark, *, group, subject, unit, value=None, samples=None, per_round=None,
           target=None, note=None, info=None, **params):
    """Fill ``benchmark.group`` and ``benchmark.extra_info`` by the convention.

    Give exactly one of ``value`` (one headline number), ``samples`` (one per repetition)
    or ``per_round`` (items per benchmarked call; the unit is derived from the timing).
    ``params`` are the x-axis and identity parameters (``batch=32, frame_bytes=64``);
    ``info`` is a dict of further facts that are not parameters (e.g. retransmits).
    May be called before or after the benchmark ran (``samples`` may be a list that the
    measured function appends to).
    """
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; accepted: {', '.join(UNITS)}")
    if not isinstance(subject, str) or not subject:
        raise ValueError(f"subject must be a non-empty string, got {subject!r}")
    given = [name for name, v in (("value", value), ("samples", samples),
                                  ("per_round", per_round)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of value, samples, per_round; got {given or 'none'}")
    if per_round is not None and (UNITS[unit][2] is None or per_round <= 0):
        raise ValueError(f"per_round={per_round!r} cannot derive unit {unit!r}: use a rate or "
                         f"time-per-item unit and a positive count")
    for key, v in params.items():
        if key in RESERVED:
            raise ValueError(f"parameter name {key!r} is reserved")
        if not isinstance(v, (int, float, str, bool)):
            raise ValueError(f"parameter {key}={v!r} must be a number, string or bool")
    benchmark.group = group
    ei = benchmark.extra_info
    ei["group"] = group       # pytest-benchmark keeps .group only if set before it runs
    ei["subject"] = subject
    ei["unit"] = unit
    if value is not None:
        ei[unit] = float(value)
    if samples is not None:
        ei["samples"] = samples
    if per_round is not None:
        ei["per_round"] = per_round
    if target:
        ei["target"] = target
    if note:
        ei["note"] = note
    if info:
        ei["info"] = dict(info)
    extra_keys = [k for k in params if k not in PARAM_KEYS]
    if extra_keys:
        ei["param_keys"] = sorted(set(ei.get("param_keys", [])) | set(extra_keys))
    ei.update(params)


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One measured point: a subject in a figure at one parameter set."""
    group: str
    subject: str
    params: dict
    unit: str
    median: float
    lo: float                 # min
    hi: float                 # max
    q1: float | None = None
    q3: float | None = None
    n: int = 1                # repetitions (rounds or samples)
    source: str = "time"      # samples | per_round | value | time
    name: str = ""            # pytest's fullname
    target: str | None = None
    note: str | None = None
    per_round: float | None = None
    seconds: dict | None = None  # pytest-benchmark time stats (median/min/max) for per_round

    @property
    def better(self):
        return UNITS.get(self.unit, ("", "lower", None))[1]

    @property
    def key(self):
        return (self.group, params_key(self.params))

    def interval(self):
        """(low, high) used to judge noise: quartiles when n ≥ 5, else min..max."""
        if self.n >= 5 and self.q1 is not None and self.q3 is not None:
            return (min(self.q1, self.q3), max(self.q1, self.q3))
        return (self.lo, self.hi)


def params_key(params):
    return tuple(sorted((k, _norm(v)) for k, v in params.items()))


def _norm(v):
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _quartiles(values):
    if len(values) < 2:
        return None, None
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _subject_fallback(bench):
    params = bench.get("params") or {}
    for key in ("subject", "impl", "dp_impl", "implementation"):
        if key in params:
            v = str(params[key])
            return {"c": "vswitch", "cython": "vswitch", "py": "vswitch-py",
                    "python": "vswitch-py"}.get(v, v)
    return bench.get("name", "?").split("[")[0]


def row_from_benchmark(bench):
    """A Row from one entry of pytest-benchmark's ``benchmarks`` list, and whether the
    entry followed the convention (False: the row is its time statistics)."""
    ei = bench.get("extra_info") or {}
    stats = bench.get("stats") or {}
    name = bench.get("fullname") or bench.get("name", "?")
    group = (ei.get("group") if isinstance(ei.get("group"), str) else None) \
        or bench.get("group") or name.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    unit = ei.get("unit")
    follows = isinstance(ei.get("subject"), str) and unit in UNITS
    if follows:
        pkeys = set(PARAM_KEYS) | set(ei.get("param_keys", []))
        params = {k: v for k, v in ei.items() if k in pkeys and k not in RESERVED}
        subject = ei["subject"]
    else:
        params = {k: v for k, v in (bench.get("params") or {}).items()
                  if isinstance(v, (int, float, str, bool))
                  and k not in ("subject", "impl", "dp_impl", "implementation")}
        subject = _subject_fallback(bench)
    row = Row(group=group, subject=subject, params=params, unit="s", median=math.nan,
              lo=math.nan, hi=math.nan, name=name, target=ei.get("target"),
              note=ei.get("note"))
    samples = ei.get("samples") if follows else None
    if follows and samples:
        vals = [float(v) for v in samples]
        row.unit, row.source, row.n = unit, "samples", len(vals)
        row.median, row.lo, row.hi = statistics.median(vals), min(vals), max(vals)
        row.q1, row.q3 = _quartiles(vals)
        return row, True
    if follows and ei.get("per_round") and UNITS[unit][2] and stats.get("median"):
        kind, scale = UNITS[unit][2]
        n_items = float(ei["per_round"])

        def conv(t):
            if t is None:
                return None
            if kind == "rate":
                return n_items / t / scale if t > 0 else math.inf
            return t / n_items * scale
        row.unit, row.source, row.per_round = unit, "per_round", n_items
        row.n = int(stats.get("rounds", 1))
        row.median = conv(stats["median"])
        a, b = conv(stats.get("min")), conv(stats.get("max"))
        row.lo, row.hi = min(a, b), max(a, b)
        q1, q3 = conv(stats.get("q1")), conv(stats.get("q3"))
        if q1 is not None and q3 is not None:
            row.q1, row.q3 = min(q1, q3), max(q1, q3)
        row.seconds = {k: stats.get(k) for k in ("median", "min", "max")}
        return row, True
    if follows and isinstance(ei.get(unit), (int, float)):
        v = float(ei[unit])
        row.unit, row.source, row.n = unit, "value", 1
        row.median = row.lo = row.hi = v
        return row, True
    # fallback: pytest-benchmark's own time statistics, seconds per call
    row.source = "time"
    row.n = int(stats.get("rounds", 0) or 0)
    row.median = stats.get("median", math.nan)
    row.lo, row.hi = stats.get("min", math.nan), stats.get("max", math.nan)
    row.q1, row.q3 = stats.get("q1"), stats.get("q3")
    return row, False


@dataclass
class Results:
    rows: list
    nonconforming: list = field(default_factory=list)   # names of fallback rows
    raw: dict = field(default_factory=dict)


def load_results(path):
    """Rows from a pytest-benchmark JSON file, or a results directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "benchmark.json"
    if not path.exists():
        raise FileNotFoundError(f"no benchmark JSON at {path}")
    data = json.loads(path.read_text())
    return results_from_json(data)


def results_from_json(data):
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError("not a pytest-benchmark JSON document: no 'benchmarks' list")
    rows, nonconf = [], []
    for bench in data["benchmarks"]:
        row, follows = row_from_benchmark(bench)
        rows.append(row)
        if not follows:
            nonconf.append(row.name)
    return Results(rows=rows, nonconforming=nonconf, raw=data)


# --------------------------------------------------------------------------- peers


def subject_order(subject):
    return (SUBJECTS.index(subject) if subject in SUBJECTS else len(SUBJECTS), subject)


def peers(rows):
    """{(group, params_key): {subject: Row}} — who was measured side by side."""
    out = {}
    for row in rows:
        out.setdefault(row.key, {})[row.subject] = row
    return out


def ratio(a, b):
    """a / b of two rows' medians, or None when not comparable."""
    if a.unit != b.unit or not b.median or any(map(math.isnan, (a.median, b.median))):
        return None
    return a.median / b.median


def ratio_range(a, b):
    """The widest ratio the two rows' noise intervals allow: (low, high)."""
    (alo, ahi), (blo, bhi) = a.interval(), b.interval()
    if a.unit != b.unit or blo <= 0 or bhi <= 0:
        return None
    return (alo / bhi, ahi / blo)


# --------------------------------------------------------------------------- subjects

#: Subjects a machine set up by scripts/setup.sh measures: the reference CNI plugins
#: (containernetworking-plugins: bridge, portmap, bandwidth, the whole chain), Open
#: vSwitch (openvswitch-switch), and ours. Each is required wherever a selected test
#: measures it, unless allowed to be missing (``--allow-missing-peer NAME`` or
#: ``ALLOW_MISSING_ENV``).
REQUIRED_SUBJECTS = SUBJECTS
ALLOW_MISSING_ENV = "VSWITCH_BENCH_ALLOW_MISSING_PEER"
_IMPL_SUBJECT = {"c": "vswitch", "py": "vswitch-py"}


def subject_of_test(params, function_name):
    """The subject a benchmark test measures: its ``subject`` parameter, else its ``impl``
    parameter (``c``: vswitch, ``py``: vswitch-py), else the known subject its function
    name ends with or contains as a word (``test_ovs_tcp``: ovs,
    ``test_shaping_bandwidth_plugin``: bandwidth-plugin); None when none says."""
    params = params or {}
    if isinstance(params.get("subject"), str):
        return params["subject"]
    if params.get("impl") in _IMPL_SUBJECT:
        return _IMPL_SUBJECT[params["impl"]]
    words = "_" + function_name.split("[")[0] + "_"
    for subj in sorted(SUBJECTS, key=len, reverse=True):
        if "_" + subj.replace("-", "_") + "_" in words:
            return subj
    return None


def allowed_missing(names=(), environ=None):
    """The set of subjects allowed to be missing: ``names`` (``--allow-missing-peer``)
    and the comma-separated ``VSWITCH_BENCH_ALLOW_MISSING_PEER``; ``all`` allows every
    subject. Unknown names are refused with the accepted ones."""
    environ = os.environ if environ is None else environ
    given = [n.strip() for n in list(names) + environ.get(ALLOW_MISSING_ENV, "").split(",")
             if n.strip()]
    bad = [n for n in given if n != "all" and n not in SUBJECTS]
    if bad:
        raise ValueError(f"--allow-missing-peer / {ALLOW_MISSING_ENV}: unknown subject(s) "
                         f"{', '.join(map(repr, bad))}; accepted: all, {', '.join(SUBJECTS)}")
    return set(SUBJECTS) if "all" in given else set(given)


@dataclass
class Missing:
    """A subject that selected tests of one file were to measure and that left no row."""
    subject: str
    file: str
    reasons: list           # the skip/fail messages of its tests (distinct, in order)
    tests: int              # how many of its tests were selected
    allowed: bool           # allowed to be missing (else the run fails)


def missing_subjects(rows, outcomes, allowed=frozenset()):
    """Per (benchmark file, subject) among the tests that ran (``outcomes``, each with
    its ``subject``): those with no row in the results. A test's row carries its file in
    ``Row.name`` (pytest's fullname), so a subject measured by one file does not cover
    the same subject skipped in another."""
    have = {(r.name.split("::")[0].rsplit("/", 1)[-1], r.subject) for r in rows}
    wanted = {}
    for o in outcomes or ():
        subj = o.get("subject")
        if subj not in REQUIRED_SUBJECTS:
            continue
        key = (o["nodeid"].split("::")[0].rsplit("/", 1)[-1], subj)
        wanted.setdefault(key, []).append(o)
    out = []
    for (file, subj), tests in sorted(wanted.items()):
        if (file, subj) in have:
            continue
        reasons = []
        for o in tests:
            why = (f"{o['outcome']}: {o.get('message') or 'no reason given'}"
                   if o["outcome"] != "passed" else "passed but recorded no row")
            if why not in reasons:
                reasons.append(why)
        out.append(Missing(subj, file, reasons, len(tests), subj in allowed))
    return out


def render_missing(missing):
    lines = [[m.subject, m.file, m.tests, "; ".join(m.reasons),
              "allowed (--allow-missing-peer)" if m.allowed else "**FAILS THE RUN**"]
             for m in missing]
    return _md_table(["subject", "file", "tests", "why", "verdict"], lines)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    tid: str            # the id benchmarks put in extra_info["target"]
    text: str           # as the issue words it
    groups: tuple       # default groups when no row carries the tag
    unit: str
    kind: str           # "min" (value ≥), "max" (value ≤), "ratio_min", "ratio_max", "within"
    threshold: float
    peer: str | None = None   # subject the ratio is taken against
    aim: float | None = None


#: The targets of issue 6, each beside its peer.
TARGETS = (
    # judged at the batch the daemon forms (bench_core tags it), not at a kinder one
    Target("core-mpps", "core ≥ 30 Mpps on mixed traffic at the daemon's batch (aim 50)",
           ("core-mixed-64B",), "mpps", "min", 30.0, peer="vswitch-py", aim=50.0),
    Target("core-mpps", "core ≥ 25 × the pure-Python twin at the daemon's batch",
           ("core-mixed-64B",), "mpps", "ratio_min", 25.0, peer="vswitch-py"),
    Target("tap-tcp", "TAP TCP ≥ 0.9 × the Linux bridge", ("real-tcp",),
           "gbps", "ratio_min", 0.9, peer="bridge"),
    Target("udp-64B", "64-byte frames ≥ 0.25 Mpps", ("real-udp-64B",),
           "mpps", "min", 0.25, peer="bridge"),
    Target("ping-rtt", "ping RTT ≤ 1.5 × the Linux bridge", ("real-ping",),
           "rtt_ms", "ratio_max", 1.5, peer="bridge"),
    Target("cni-add", "CNI ADD no slower than the reference chain", ("cni-add",),
           "ms", "ratio_max", 1.0, peer="reference-cni"),
    Target("shaping", "shaped rate within 2% of the setting", ("shaping",),
           "achieved_ratio", "within", 0.02, peer="bandwidth-plugin"),
)


@dataclass
class Verdict:
    target: Target
    row: Row | None              # the vswitch row (None: not measured)
    peer_rows: dict              # subject -> Row measured beside it
    value: float | None          # what is judged (a value or a ratio)
    met: bool | None             # None: not measured
    margin: str                  # "by how much", in words
    uncertain: bool = False      # the threshold lies inside the noise interval


def _select_rows(rows, target):
    tagged = [r for r in rows if r.target == target.tid and r.subject == PRIMARY
              and r.unit == target.unit]
    if tagged:
        return tagged
    return [r for r in rows if r.group in target.groups and r.subject == PRIMARY
            and r.unit == target.unit]


def _peer_candidates(rows, target):
    tagged = [r for r in rows if r.target == target.tid and r.subject != PRIMARY]
    return tagged or [r for r in rows if r.group in target.groups and r.subject != PRIMARY]


def evaluate_targets(rows, targets=TARGETS):
    """One Verdict per (target, measured parameter set); a target with no vswitch row
    gets one Verdict with ``met=None`` (listing the peers that were measured)."""
    table = peers(rows)
    out = []
    for t in targets:
        mine = _select_rows(rows, t)
        if not mine:
            seen = {}
            for r in _peer_candidates(rows, t):
                seen.setdefault(r.subject, r)
            out.append(Verdict(t, None, seen, None, None, "not measured"))
            continue
        for row in sorted(mine, key=lambda r: params_key(r.params)):
            beside = {s: r for s, r in table.get(row.key, {}).items() if s != PRIMARY}
            out.append(_judge(t, row, beside))
    return out


def _pct(x):
    return f"{x * 100:.1f}%"


def _judge(t, row, beside):
    peer = beside.get(t.peer) if t.peer else None
    if t.kind in ("min", "max", "within"):
        value, rng = row.median, row.interval()
    else:
        if peer is None:
            return Verdict(t, row, beside, None, None,
                           f"no {t.peer} row measured beside it (same group and parameters)")
        value, rng = ratio(row, peer), ratio_range(row, peer)
        if value is None:
            return Verdict(t, row, beside, None, None, f"units differ from {t.peer}'s")
    thr = t.threshold
    if t.kind in ("min", "ratio_min"):
        met = value >= thr
        uncertain = rng is not None and rng[0] < thr <= rng[1]
        if met:
            margin = (f"{value / thr:.1f}× the target" if value >= 2 * thr
                      else f"{_pct(value / thr - 1)} above the target")
        else:
            margin = f"missed by {_pct(1 - value / thr)} (needs {thr / value:.2f}× more)" \
                if value > 0 else "missed (zero)"
        if t.aim and value < t.aim * (1 - 1e-9):
            margin += f"; {_pct(1 - value / t.aim)} short of the aim {t.aim:g}"
    elif t.kind in ("max", "ratio_max"):
        met = value <= thr
        uncertain = rng is not None and rng[0] <= thr < rng[1]
        margin = (f"{_pct(1 - value / thr)} under the limit" if met
                  else f"missed by {_pct(value / thr - 1)} over the limit")
    elif t.kind == "within":
        off = abs(value - 1.0)
        met = off <= thr
        uncertain = rng is not None and (abs(rng[0] - 1) > thr) != (abs(rng[1] - 1) > thr)
        margin = (f"off by {_pct(off)} (allowed {_pct(thr)})" if met
                  else f"missed: off by {_pct(off)}, allowed {_pct(thr)}")
    else:
        raise ValueError(f"unknown target kind {t.kind!r}")
    return Verdict(t, row, beside, value, met, margin, uncertain)


# --------------------------------------------------------------------------- formatting


def fmt(v):
    """A number with 3 significant digits, no exponent for everyday magnitudes."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6 or a < 1e-3:
        return f"{v:.3g}"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:#.3g}"


def fmt_value(v, unit):
    """``fmt`` with the precision a unit needs (achieved/set: 4 decimals, 2% matters)."""
    if unit == "achieved_ratio" and isinstance(v, (int, float)) and math.isfinite(v):
        return f"{v:.4f}"
    return fmt(v)


def fmt_params(params):
    def one(k, v):
        if k == "rate_bps" and isinstance(v, (int, float)):
            return f"rate={_si(v)}bit/s"
        return f"{k}={v}"
    return ", ".join(one(k, v) for k, v in sorted(params.items())) or "–"


def _si(v):
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def unit_label(unit):
    return UNITS.get(unit, (unit,))[0]


def _md_table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for line in lines:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in line) + " |")
    return "\n".join(out)


def _ratio_cells(row, group_peers):
    """'×1.23 vs bridge' strings for the primary subject against each peer."""
    if row.subject != PRIMARY:
        return ""
    cells = []
    for subj in sorted(group_peers, key=subject_order):
        if subj == PRIMARY:
            continue
        r = ratio(row, group_peers[subj])
        if r is not None:
            cells.append(f"×{fmt(r)} vs {subj}")
    return ", ".join(cells)


def render_targets(verdicts):
    lines = []
    for v in verdicts:
        t = v.target
        if v.row is None:
            beside = "; ".join(f"{s}: {fmt_value(r.median, r.unit)} {unit_label(r.unit)}"
                               for s, r in sorted(v.peer_rows.items(),
                                                  key=lambda kv: subject_order(kv[0])))
            lines.append([t.text, "–", "not measured", beside or "–", "–", "NOT MEASURED"])
            continue
        mine = f"{fmt_value(v.row.median, v.row.unit)} {unit_label(v.row.unit)}"
        beside = "; ".join(f"{s}: {fmt_value(r.median, r.unit)}" for s, r in
                           sorted(v.peer_rows.items(), key=lambda kv: subject_order(kv[0])))
        if v.target.kind.startswith("ratio") and v.value is not None:
            judged = f"×{fmt(v.value)} vs {t.peer}"
        elif v.value is not None:
            judged = fmt_value(v.value, v.target.unit)
        else:
            judged = "–"
        if v.met is None:
            status = "NOT JUDGED"
        else:
            status = ("met" if v.met else "**MISSED**") + (" (within noise)" if v.uncertain else "")
        lines.append([t.text, fmt_params(v.row.params), mine, beside or "–",
                      judged, f"{status}: {v.margin}"])
    return _md_table(["target", "parameters", "vswitch (median)", "peers (median)",
                      "judged value", "verdict"], lines)


def render_groups(rows, plot_paths=None):
    plot_paths = plot_paths or {}
    table = peers(rows)
    by_group = {}
    for row in rows:
        by_group.setdefault(row.group, []).append(row)
    parts = []
    for group in sorted(by_group):
        grows = sorted(by_group[group],
                       key=lambda r: (_sortable(params_key(r.params)), subject_order(r.subject)))
        units = sorted({r.unit for r in grows})
        parts.append(f"### {group}\n")
        lines = []
        for r in grows:
            extra = ""
            if r.source == "per_round" and r.seconds and r.seconds.get("median"):
                kind = UNITS[r.unit][2][0]
                t = r.seconds["median"] / r.per_round
                extra = f"{fmt(t * 1e9)} ns/item" if kind == "rate" else \
                    f"{fmt(1 / t / 1e6)} M items/s"
            lines.append([fmt_params(r.params), r.subject, fmt_value(r.median, r.unit),
                          fmt_value(r.lo, r.unit), fmt_value(r.hi, r.unit), unit_label(r.unit), r.n, r.source,
                          _ratio_cells(r, table.get(r.key, {})), extra])
        parts.append(_md_table(["parameters", "subject", "median", "min", "max", "unit",
                                "n", "from", "ratio (vswitch ÷ peer, medians)", "also"],
                               lines))
        if len(units) > 1:
            parts.append(f"\n(units differ inside this group: {', '.join(units)})")
        for path in plot_paths.get(group, ()):
            parts.append(f"\n![{group}]({path})")
        parts.append("")
    return "\n".join(parts)


def _sortable(key):
    return tuple((k, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)))
                 for k, v in key)


def render_report(results, sysinfo=None, plot_paths=None, plot_note=None, outcomes=None,
                  run_info=None, notes_text=None, allowed=frozenset()):
    """The Markdown report of one run."""
    rows = results.rows
    verdicts = evaluate_targets(rows)
    missing = missing_subjects(rows, outcomes, allowed)
    out = ["# vswitch benchmark report", ""]
    run_info = run_info or {}
    if run_info:
        out.append(" · ".join(f"{k}: {v}" for k, v in run_info.items()))
        out.append("")
    out.append("Medians with min and max over the repetitions (n). Ratios are taken only "
               "between subjects measured in the same run, in the same figure, with the same "
               "parameters. The machine is shared and noisy: trust medians and ratios within "
               "this run, not absolute numbers across runs.")
    out.append("")
    if missing:
        failing = [m for m in missing if not m.allowed]
        out.append("## Subjects not measured" + (" — THE RUN FAILS" if failing else ""))
        out.append("")
        out.append("Selected benchmarks of these subjects left no row. The machine is taken to "
                   "be set up for every subject (scripts/setup.sh installs the reference CNI "
                   "plugins and Open vSwitch), so a missing one fails the run unless it was "
                   "allowed with `--allow-missing-peer NAME` or "
                   f"`{ALLOW_MISSING_ENV}`.")
        out.append("")
        out.append(render_missing(missing))
        out.append("")
    if sysinfo:
        out.append("## Machine")
        out.append("")
        out.append(render_sysinfo(sysinfo))
        out.append("")
    out.append("## Targets (issue 6)")
    out.append("")
    out.append(render_targets(verdicts))
    out.append("")
    out.append("## Figures")
    out.append("")
    if plot_note:
        out.append(plot_note)
        out.append("")
    out.append(render_groups(rows, plot_paths) if rows else "No benchmark produced a result.")
    out.append("")
    if outcomes:
        bad = [o for o in outcomes if o["outcome"] != "passed"]
        if bad:
            out.append("## Skipped and failed")
            out.append("")
            out.append(_md_table(["test", "outcome", "reason"],
                                 [[o["nodeid"], o["outcome"], _one_line(o.get("message", ""))]
                                  for o in bad]))
            out.append("")
    if results.nonconforming:
        out.append("## Not following the convention (shown as seconds per call)")
        out.append("")
        out.extend(f"- `{n}`" for n in results.nonconforming)
        out.append("")
        out.append("See bench/README.md: set `group`, `extra_info[\"subject\"]`, "
                   "`extra_info[\"unit\"]` and a headline (`bench.report.record`).")
        out.append("")
    out.append("## Closing note")
    out.append("")
    out.append(render_closing(verdicts, rows, sysinfo, notes_text))
    return "\n".join(out) + "\n"


def _one_line(s, limit=300):
    s = " ".join(str(s).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def render_closing(verdicts, rows, sysinfo=None, notes_text=None):
    lines = []
    missed = [v for v in verdicts if v.met is False]
    unmeasured = [v for v in verdicts if v.met is None]
    met = [v for v in verdicts if v.met]
    lines.append(f"{len(met)} target line(s) met, {len(missed)} missed, "
                 f"{len(unmeasured)} not measured or not judged.")
    if missed:
        lines.append("")
        lines.append("Missed, and what this run knows about why:")
        for v in missed:
            why = []
            if v.uncertain:
                why.append("the threshold lies inside the measured noise interval, so the "
                           "miss may be noise")
            if v.row and v.row.note:
                why.append(f"benchmark note: {v.row.note}")
            for s, r in v.peer_rows.items():
                if r.note:
                    why.append(f"{s} note: {r.note}")
            load = (sysinfo or {}).get("loadavg_start")
            cores = (sysinfo or {}).get("cpu", {}).get("count")
            # load excuses only an absolute figure: a ratio's peer ran under the same load
            if not v.target.kind.startswith("ratio") and load and cores and load[0] > 0.5 * cores:
                why.append(f"load average at start was {load[0]:.2f} on {cores} cores: "
                           "other work competed for the CPU")
            because = "; ".join(why)
            lines.append(f"- {v.target.text} ({fmt_params(v.row.params)}): {v.margin}."
                         + (" " + because[:1].upper() + because[1:] + "." if why else
                            " No automatic explanation: see the author's notes below."))
    if unmeasured:
        lines.append("")
        lines.append("Not measured or not judged: "
                     + "; ".join(sorted({f"{v.target.text} ({v.margin})" for v in unmeasured})))
    notes = sorted({(r.group, r.subject, r.note) for r in rows if r.note})
    if notes:
        lines.append("")
        lines.append("Notes from the benchmarks:")
        lines.extend(f"- {g} / {s}: {n}" for g, s, n in notes)
    if notes_text:
        lines.append("")
        lines.append(notes_text.strip())
    return "\n".join(lines)


def render_sysinfo(info):
    cpu = info.get("cpu", {})
    lines = [
        f"- CPU: {cpu.get('model', '?')} × {cpu.get('count', '?')}"
        + (f" (governor {cpu['governor']})" if cpu.get("governor") else ""),
        f"- kernel: {info.get('kernel', '?')}; memory: {info.get('mem_total_gib', '?')} GiB",
    ]
    la0, la1 = info.get("loadavg_start"), info.get("loadavg_end")
    if la0:
        lines.append(f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in la0)}"
                     + (f"; at end: {', '.join(f'{x:.2f}' for x in la1)}" if la1 else ""))
    if info.get("busiest"):
        lines.append(f"- busiest processes at start: {info['busiest']}")
    pk = info.get("debian_packages", {})
    if pk:
        lines.append("- Debian packages: " + ", ".join(f"{k} {v or 'not installed'}"
                                                        for k, v in pk.items()))
    py = info.get("python_packages", {})
    if py:
        lines.append(f"- Python {info.get('python', '?')}: "
                     + ", ".join(f"{k} {v or 'missing'}" for k, v in py.items()))
    if info.get("git"):
        lines.append(f"- git: {info['git']}")
    if "cython_core_built" in info:
        lines.append(f"- Cython core built: {'yes' if info['cython_core_built'] else 'NO'}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- compare


@dataclass
class Change:
    key: tuple
    subject: str
    old: Row | None
    new: Row | None
    verdict: str        # faster | slower | better | worse | same | new | gone | unit changed
    change: float | None  # new/old - 1 of medians


def _improved(old, new):
    """True when new is better than old, by the unit's direction."""
    if old.better == "higher":
        return new.median > old.median
    if old.better == "lower":
        return new.median < old.median
    return abs(new.median - 1) < abs(old.median - 1)


def compare(old_rows, new_rows):
    """Changes between two runs, matched by (group, parameters, subject). A change is
    real only when the two noise intervals (quartiles with n ≥ 5 on both sides, else
    min..max) do not overlap."""
    old = {(r.key, r.subject): r for r in old_rows}
    new = {(r.key, r.subject): r for r in new_rows}
    out = []
    for k in sorted(set(old) | set(new), key=lambda k: (k[0][0], _sortable(k[0][1]),
                                                       subject_order(k[1]))):
        o, n = old.get(k), new.get(k)
        if o is None:
            out.append(Change(k[0], k[1], None, n, "new", None))
            continue
        if n is None:
            out.append(Change(k[0], k[1], o, None, "gone", None))
            continue
        if o.unit != n.unit:
            out.append(Change(k[0], k[1], o, n, "unit changed", None))
            continue
        ch = (n.median / o.median - 1) if o.median else None
        use_iqr = o.n >= 5 and n.n >= 5 and None not in (o.q1, o.q3, n.q1, n.q3)
        lo_o, hi_o = (o.q1, o.q3) if use_iqr else (o.lo, o.hi)
        lo_n, hi_n = (n.q1, n.q3) if use_iqr else (n.lo, n.hi)
        overlap = not (hi_n < lo_o or hi_o < lo_n)
        if overlap:
            verdict = "same"
        else:
            up = _improved(o, n)
            if o.better == "one":
                verdict = "better" if up else "worse"
            else:
                verdict = "faster" if up else "slower"
        out.append(Change(k[0], k[1], o, n, verdict, ch))
    return out


def render_compare(changes, old_label, new_label, old_info=None, new_info=None):
    out = [f"# Comparison: {old_label} → {new_label}", ""]
    out.append("A change counts only when the noise intervals do not overlap (quartiles when "
               "both sides have ≥ 5 repetitions, else min..max). Runs on a shared machine at "
               "different times differ by load: prefer ratios measured within one run.")
    out.append("")
    for label, info in (("old", old_info), ("new", new_info)):
        if info:
            la = info.get("loadavg_start")
            out.append(f"- {label}: {info.get('cpu', {}).get('model', '?')}, kernel "
                       f"{info.get('kernel', '?')}, load {la[0]:.2f}" if la else
                       f"- {label}: {info.get('cpu', {}).get('model', '?')}")
    if old_info and new_info and old_info.get("cpu", {}).get("model") != \
            new_info.get("cpu", {}).get("model"):
        out.append("- **different CPU models: the comparison says little**")
    out.append("")
    counts = {}
    for c in changes:
        counts[c.verdict] = counts.get(c.verdict, 0) + 1
    out.append("Summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    out.append("")
    lines = []
    for c in changes:
        group, pkey = c.key
        unit = (c.new or c.old).unit
        lines.append([group, fmt_params(dict(pkey)), c.subject,
                      _cell(c.old), _cell(c.new), unit_label(unit),
                      "–" if c.change is None else f"{c.change * 100:+.1f}%",
                      f"**{c.verdict}**" if c.verdict in ("slower", "worse") else c.verdict])
    out.append(_md_table(["group", "parameters", "subject", "old median [min–max]",
                          "new median [min–max]", "unit", "change", "verdict"], lines))
    return "\n".join(out) + "\n"


def _cell(row):
    if row is None:
        return "–"
    return (f"{fmt_value(row.median, row.unit)} "
            f"[{fmt_value(row.lo, row.unit)}–{fmt_value(row.hi, row.unit)}]")
