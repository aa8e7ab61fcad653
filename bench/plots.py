"""PNG figures of a benchmark run: each figure against its x-axis, one line per subject.

Theory of operation: rows (``bench.report.Row``) are grouped by figure (``group``) and
unit. The x-axis is the first parameter of ``report.X_KEYS`` (batch, frame_bytes, pods,
macs, flows, ...) that takes more than one numeric value in that figure; every other
parameter that varies becomes part of the series label, so "vswitch, features=dnat" and
"vswitch-py, features=dnat" are separate lines. Points are medians; error bars are
quartiles when a point has ≥ 5 repetitions, else min..max (one cold first call must not
hide the spread that matters). An axis spanning more than two decades is logarithmic
(batch 1..1024, 16..1M MACs), and so is a value axis whose medians span more than two
decades (``LOG_SPAN``), in line and bar charts alike, its label saying "log scale".
A figure without a varying numeric parameter becomes a bar chart of its subjects, side by
side, each bar's median printed on it. matplotlib is an optional extra (``pip install '.[plot]'``); without it
``make_plots`` returns no figures and says why.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from . import report


def _matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return None, f"plots skipped: matplotlib is not installed ({exc}); " \
                     f"install the extra: pip install '.[plot]'"
    return plt, None


AXIS_LABELS = {"batch": "batch (packets per call)", "frame_bytes": "frame (bytes)",
               "segment_bytes": "segment (bytes)", "rate_bps": "rate set (bit/s)",
               "macs": "MAC table entries", "conns": "connections", "pods": "pods",
               "parallel": "pods in parallel"}


def x_key(rows):
    """The parameter to plot against, or None."""
    for key in report.X_KEYS:
        vals = {r.params.get(key) for r in rows}
        if len(vals) > 1 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                 for v in vals):
            return key
    return None


def series_label(row, xkey, varying):
    extra = [f"{k}={row.params[k]}" for k in sorted(varying)
             if k != xkey and k in row.params]
    return ", ".join([row.subject] + extra)


def _slug(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "figure"


def make_plots(rows, out_dir):
    """Writes PNGs into ``out_dir``; returns ({group: [relative paths]}, note or None)."""
    plt, note = _matplotlib()
    if plt is None:
        return {}, note
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    by = {}
    for r in rows:
        if not math.isnan(r.median):
            by.setdefault((r.group, r.unit), []).append(r)
    for (group, unit), grows in sorted(by.items()):
        name = _slug(group if len({u for g, u in by if g == group}) == 1 else f"{group}-{unit}")
        path = out_dir / f"{name}.png"
        xk = x_key(grows)
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
        try:
            if xk:
                _line_plot(ax, grows, xk)
            else:
                _bar_plot(ax, grows)
            ax.set_title(f"{group}", fontsize=11)
            ax.set_ylabel(report.unit_label(unit)
                          + (", log scale" if ax.get_yscale() == "log" else ""))
            better = report.UNITS.get(unit, ("", "", None))[1]
            hint = {"higher": "higher is better", "lower": "lower is better",
                    "one": "1.0 is exact"}.get(better)
            if hint:
                ax.text(1.0, 1.01, hint, transform=ax.transAxes, ha="right", va="bottom",
                        fontsize=8, color="0.4")
            ax.grid(True, which="both", alpha=0.3)
            fig.tight_layout()
            fig.savefig(path)
        finally:
            plt.close(fig)
        figures.setdefault(group, []).append(f"{out_dir.name}/{path.name}")
    return figures, None


def _line_plot(ax, rows, xk):
    varying = {k for k in set().union(*(r.params for r in rows))
               if len({str(r.params.get(k)) for r in rows}) > 1}
    series = {}
    for r in rows:
        series.setdefault(series_label(r, xk, varying), []).append(r)
    styles = {}                       # one colour per subject, a line style per variant
    for label in sorted(series, key=lambda s: report.subject_order(s.split(",")[0])):
        pts = sorted((r for r in series[label] if xk in r.params), key=lambda r: r.params[xk])
        if not pts:
            continue
        subject = pts[0].subject
        n = styles[subject] = styles.get(subject, -1) + 1
        xs = [r.params[xk] for r in pts]
        ys = [r.median for r in pts]
        ax.errorbar(xs, ys, yerr=_err(pts), marker="os^Dv"[n % 5], ms=4, capsize=3,
                    label=label, color=_colour(subject), linestyle=("-", "--", ":", "-.")[n % 4])
    xs_all = [r.params[xk] for r in rows if xk in r.params]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 100:
        ax.set_xscale("log")
    distinct = sorted(set(xs_all))
    if len(distinct) <= 12:
        ax.set_xticks(distinct)
        ax.set_xticklabels([_tick(x) for x in distinct], fontsize=8)
        ax.minorticks_off()
    log = _log_y(ax, [r.median for r in rows])   # then a ratio reads as a distance
    if not log and any(r.unit == "achieved_ratio" for r in rows):
        ax.axhspan(0.98, 1.02, color="tab:green", alpha=0.12, label="±2% of the setting")
        ax.axhline(1.0, color="tab:green", lw=0.8)
    elif not log:
        ax.set_ylim(bottom=0)          # a ratio reads true only from zero
    ax.set_xlabel(AXIS_LABELS.get(xk, xk.replace("_", " ")))
    ax.legend(fontsize=8)


def _colour(subject):
    """The same colour for a subject in every figure."""
    order = report.subject_order(subject)[0]
    if order >= len(report.SUBJECTS):
        order += sum(map(ord, subject))      # stable for unknown subjects
    return f"C{order % 10}"


def _err(rows):
    """Error bars: the noise interval of each row (quartiles with ≥ 5 repetitions, else
    min..max), as matplotlib's [[below], [above]]."""
    spans = [r.interval() for r in rows]
    return [[max(0.0, r.median - lo) for r, (lo, hi) in zip(rows, spans)],
            [max(0.0, hi - r.median) for r, (lo, hi) in zip(rows, spans)]]


def _tick(x):
    """1000000 -> 1M, 1048576 -> 1Mi, 2e9 -> 2G; below 100,000 as is."""
    if x < 100_000:
        return f"{x:g}"
    for div, suffix in ((1 << 20, "Mi"), (1 << 10, "Ki")):
        if x >= div and x % div == 0 and x != 1000 * (x // 1000):
            return f"{x // div}{suffix}"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div and (x / div) == int(x / div):
            return f"{int(x / div)}{suffix}"
    return f"{x:g}"


def _bar_plot(ax, rows):
    rows = sorted(rows, key=lambda r: (report.fmt_params(r.params),
                                       report.subject_order(r.subject)))
    labels = [r.subject + ("" if not r.params
                           else "\n" + report.fmt_params(r.params).replace(", ", "\n"))
              for r in rows]
    ys = [r.median for r in rows]
    err = _err(rows)
    colors = [_colour(r.subject) for r in rows]
    bars = ax.bar(range(len(rows)), ys, yerr=err, capsize=4, color=colors)
    ax.bar_label(bars, labels=[_value(y) for y in ys], fontsize=7, padding=2)
    if _log_y(ax, ys):
        # the smallest bar stands a factor 5 above the axis' foot, so it is seen
        ax.set_ylim(bottom=min(y for y in ys if y > 0) / 5)
    elif any(r.unit == "achieved_ratio" for r in rows):
        ax.axhspan(0.98, 1.02, color="tab:green", alpha=0.12)
        ax.set_ylim(min(0.9, min(ys) - 0.02), max(1.1, max(ys) + 0.02))
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=7, rotation=20 if len(rows) > 4 else 0,
                       ha="right" if len(rows) > 4 else "center")


#: Values spanning more than this factor (two decades) get a logarithmic value axis, so a
#: 0.1 Mpps bar beside a 40 Mpps one is still seen.
LOG_SPAN = 100.0


def value_scale(values):
    """"log" when the positive, finite ``values`` (a figure's medians) span more than
    ``LOG_SPAN``, else "linear"."""
    pos = [v for v in values if v > 0 and math.isfinite(v)]
    return "log" if len(pos) >= 2 and max(pos) / min(pos) > LOG_SPAN else "linear"


def _log_y(ax, values):
    """Makes the value axis logarithmic when :func:`value_scale` says so; returns whether
    it did (``make_plots`` then says so in the axis label)."""
    if value_scale(values) != "log":
        return False
    ax.set_yscale("log", nonpositive="clip")
    return True


def _value(y):
    """A bar's value printed on it: three significant digits."""
    return f"{y:.3g}"
