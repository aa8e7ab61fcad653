"""The benchmark runner behind ``python -m bench`` / ``vswitch-bench``.

Theory of operation
-------------------
The runner starts pytest (with pytest-benchmark) in a child process on the files
``bench/bench_*.py`` — passed explicitly, since pytest's ``testpaths`` is ``tests/`` —
with ``--benchmark-only --benchmark-json=<run dir>/benchmark.json``, and the child's
output going to ``<run dir>/pytest.log``. This module is also loaded into that child as a
pytest plugin (``-p bench.runner``: named after the folder, as pytest names the benchmark
files it imports by path, so the child never holds one module under two names): its hooks append one JSON line per event (collected,
test started, test finished with outcome and skip/fail reason) to the file named by
``VSWITCH_BENCH_PROGRESS``; and a test that fails (a validity check after its
benchmarked call, or its teardown) has its benchmark marked as an error, so
pytest-benchmark leaves it out of the JSON: a row exists only for a test that passed.
The parent tails that file and draws a progress line (count,
percentage, elapsed, estimated time left, the test running and for how long); on a
terminal it redraws one line, elsewhere it prints one line per finished test.

When pytest is done, the parent reads the JSON (``bench.report``), draws PNGs
(``bench.plots``, when matplotlib is installed), records the machine (``bench.sysinfo``)
and writes ``report.md``; with ``--compare OLD_DIR`` also ``compare.md``. A run directory
is complete on its own: ``--report-only DIR`` rebuilds its report from its files.

``--quick`` sets ``VSWITCH_BENCH_QUICK=1`` (benchmark files read it through
``bench.report.quick_mode()`` to shrink their grids), deselects tests marked ``slow`` and
shortens pytest-benchmark's calibration (``--benchmark-max-time``/``--benchmark-min-rounds``),
so the whole suite runs in about two minutes on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
#: This module as the pytest child loads it: pytest imports bench/bench_*.py by path under
#: the name of their folder (``bench.bench_core`` in a checkout, whatever this package is
#: called in the parent: ``bench`` for ``python -m bench``, ``vswitch_bench`` for the
#: console script), so the plugin is named the same way, and no module of the child is
#: imported under two names.
CHILD_PLUGIN = f"{BENCH_DIR.name}.runner"
RESULTS_DIR = BENCH_DIR / "results"
PROGRESS_ENV = "VSWITCH_BENCH_PROGRESS"

# --------------------------------------------------------------------------- pytest plugin
# These hooks run inside the pytest child (loaded with ``-p bench.runner``) and do nothing
# unless VSWITCH_BENCH_PROGRESS names a file.

_outcomes = {}


def _emit(event):
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    event["t"] = time.time()
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


def _names_per_file():
    """{file of this folder: [module names it is loaded under]} in this process."""
    seen = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve().parent == BENCH_DIR:
            seen.setdefault(Path(f).resolve().name, []).append(name)
    return seen


def pytest_collection_finish(session):
    import pytest
    twice = {f: sorted(n) for f, n in _names_per_file().items() if len(n) > 1}
    if twice:
        raise pytest.UsageError(
            f"benchmark modules loaded under two names in one process: {twice}; load this "
            f"plugin as -p {CHILD_PLUGIN} (the name pytest gives the files of {BENCH_DIR})")
    from .report import subject_of_test
    subjects = {}
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        subj = subject_of_test(callspec.params if callspec else {},
                               getattr(item, "originalname", None) or item.name)
        if subj:
            subjects[item.nodeid] = subj
    _emit({"event": "collected", "n": len(session.items), "subjects": subjects})


def pytest_runtest_logstart(nodeid, location):
    _outcomes.pop(nodeid, None)
    _emit({"event": "start", "nodeid": nodeid})


_benchmarks = {}   # nodeid -> the test's pytest-benchmark fixture, while the test runs


def pytest_runtest_call(item):
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if fixture is not None:
        _benchmarks[item.nodeid] = fixture


def _discard_benchmark(nodeid):
    """A failed test keeps no row: pytest-benchmark leaves out of its JSON every fixture
    marked ``has_error``, and by its own rule only marks those whose *benchmarked call*
    raised; a validity check after the call (no frame dropped, every address rewritten)
    fails the test but would leave the timing behind as a normal row."""
    fixture = _benchmarks.get(nodeid)
    if fixture is not None:
        fixture.has_error = True


def pytest_runtest_logreport(report):
    if report.failed:
        _discard_benchmark(report.nodeid)
    prev = _outcomes.get(report.nodeid)
    if report.skipped:
        lr = report.longrepr
        msg = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
        if msg.startswith("Skipped: "):
            msg = msg[len("Skipped: "):]
        outcome = ("skipped", msg)
    elif report.failed:
        text = report.longreprtext.strip().splitlines()
        msg = next((ln for ln in reversed(text) if ln.startswith("E ")), text[-1] if text else "")
        outcome = ("failed" if report.when == "call" else "error", msg.lstrip("E ").strip())
    else:
        outcome = ("passed", "")
    if prev is None or prev[0] == "passed":
        _outcomes[report.nodeid] = outcome


def pytest_runtest_logfinish(nodeid, location):
    _benchmarks.pop(nodeid, None)
    outcome, msg = _outcomes.get(nodeid, ("passed", ""))
    _emit({"event": "done", "nodeid": nodeid, "outcome": outcome, "message": msg})


# --------------------------------------------------------------------------- progress


def _clock(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Draws progress from the plugin's events onto ``stream``."""

    def __init__(self, stream, tty=None):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.total = None
        self.done = []             # (nodeid, outcome, seconds)
        self.current = None        # (nodeid, started_at)
        self.t0 = time.time()
        self.last_heartbeat = self.t0
        self.outcomes = []         # dicts for the report
        self.subjects = {}         # nodeid -> the subject the test measures

    def feed(self, ev):
        kind = ev.get("event")
        if kind == "collected":
            self.total = ev["n"]
            self.subjects = ev.get("subjects") or {}
            self._line(f"bench: {self.total} benchmark(s) collected")
        elif kind == "start":
            self.current = (ev["nodeid"], ev["t"])
        elif kind == "done":
            started = self.current[1] if self.current and self.current[0] == ev["nodeid"] \
                else ev["t"]
            took = ev["t"] - started
            self.done.append((ev["nodeid"], ev["outcome"], took))
            self.outcomes.append({"nodeid": ev["nodeid"], "outcome": ev["outcome"],
                                  "message": ev.get("message", ""), "seconds": round(took, 3),
                                  "subject": self.subjects.get(ev["nodeid"])})
            self.current = None
            mark = {"passed": "ok  ", "skipped": "skip", "failed": "FAIL",
                    "error": "ERR "}.get(ev["outcome"], ev["outcome"])
            why = f"  ({ev['message']})" if ev["outcome"] != "passed" and ev.get("message") else ""
            self._line(f"[{len(self.done)}/{self.total or '?'}] {mark} {took:6.1f}s "
                       f"{ev['nodeid']}{why[:160]}")

    def tick(self):
        now = time.time()
        if self.tty:
            self.stream.write("\r\x1b[K" + self.status(now))
            self.stream.flush()
        elif self.current and now - max(self.last_heartbeat, self.current[1]) >= 60:
            self.last_heartbeat = now
            self._line(f"      ... {self.current[0]} running for {_clock(now - self.current[1])}")

    def status(self, now=None):
        now = now or time.time()
        n = len(self.done)
        elapsed = now - self.t0
        parts = [f"[{n}/{self.total or '?'}]"]
        if self.total:
            parts.append(f"{100 * n // self.total}%")
        parts.append(f"{_clock(elapsed)} elapsed")
        if self.total and n:
            ran = sum(d[2] for d in self.done if d[1] != "skipped") or elapsed
            ran_n = sum(1 for d in self.done if d[1] != "skipped") or n
            parts.append(f"~{_clock(ran / ran_n * (self.total - n))} left")
        if self.current:
            node = self.current[0].split("::", 1)[-1]
            parts.append(f"· {node[:60]} ({_clock(now - self.current[1])})")
        return " ".join(parts)

    def _line(self, text):
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


# --------------------------------------------------------------------------- running


def bench_files(selected=None):
    if selected:
        files = []
        for name in selected:
            p = Path(name)
            if not p.exists():
                p = BENCH_DIR / name
            if not p.exists():
                raise SystemExit(f"bench: no benchmark file {name!r} (looked in . and bench/)")
            files.append(p.resolve())
        return files
    return sorted(BENCH_DIR.glob("bench_*.py"))


def build_pytest_command(out_dir, files, quick=False, keyword=None, extra=()):
    cmd = [sys.executable, "-m", "pytest", *[str(f) for f in files],
           "-p", "no:cacheprovider", "-p", CHILD_PLUGIN,
           "-o", "python_files=bench_*.py test_*.py",
           "--benchmark-only", f"--benchmark-json={out_dir / 'benchmark.json'}",
           "--benchmark-sort=fullname", "-q"]
    if quick:
        cmd += ["-m", "not slow", "--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
    if keyword:
        cmd += ["-k", keyword]
    cmd += list(extra)
    return cmd


def run_pytest(cmd, out_dir, env, stream=sys.stderr):
    """Runs pytest, draws progress; returns (exit code, outcomes)."""
    progress_path = out_dir / "progress.jsonl"
    progress_path.write_text("")
    env = dict(env, **{PROGRESS_ENV: str(progress_path)})
    prog = Progress(stream)
    with open(out_dir / "pytest.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        pos = 0
        interrupted = False

        def pump():
            nonlocal pos
            with open(progress_path, encoding="utf-8") as f:
                f.seek(pos)
                while True:
                    line = f.readline()
                    if not line.endswith("\n"):
                        break
                    pos += len(line.encode("utf-8"))
                    try:
                        prog.feed(json.loads(line))
                    except ValueError:
                        pass
        try:
            while proc.poll() is None:
                pump()
                prog.tick()
                time.sleep(0.25)
        except KeyboardInterrupt:
            interrupted = True
            proc.send_signal(signal.SIGINT)     # our own child; pytest writes what it has
            proc.wait()
        pump()
        prog.close()
    rc = proc.returncode
    if interrupted:
        stream.write("bench: interrupted; reporting what finished\n")
    return rc, prog.outcomes


def write_report(out_dir, sysinfo=None, outcomes=None, run_info=None, notes_text=None,
                 plots=True, compare_dir=None, stream=sys.stderr, allowed=frozenset()):
    """report.md (and compare.md) from the files in ``out_dir``; returns the report path."""
    from . import report
    out_dir = Path(out_dir)
    if sysinfo is None and (out_dir / "sysinfo.json").exists():
        sysinfo = json.loads((out_dir / "sysinfo.json").read_text())
    if outcomes is None and (out_dir / "outcomes.json").exists():
        outcomes = json.loads((out_dir / "outcomes.json").read_text())
    if run_info is None and (out_dir / "run.json").exists():
        run_info = json.loads((out_dir / "run.json").read_text())
    results = report.Results(rows=[])
    bj = out_dir / "benchmark.json"
    if bj.exists() and bj.stat().st_size:
        results = report.load_results(out_dir)
    plot_paths, plot_note = {}, None
    if plots and results.rows:
        from . import plots as plotmod
        plot_paths, plot_note = plotmod.make_plots(results.rows, out_dir / "plots")
    elif not plots:
        plot_note = "plots skipped (--no-plots)"
    text = report.render_report(results, sysinfo=sysinfo, plot_paths=plot_paths,
                                plot_note=plot_note, outcomes=outcomes, run_info=run_info,
                                notes_text=notes_text, allowed=allowed)
    path = out_dir / "report.md"
    path.write_text(text)
    if compare_dir:
        old = report.load_results(compare_dir)
        old_dir = Path(compare_dir)
        old_dir = old_dir if old_dir.is_dir() else old_dir.parent
        old_info = None
        if (old_dir / "sysinfo.json").exists():
            old_info = json.loads((old_dir / "sysinfo.json").read_text())
        changes = report.compare(old.rows, results.rows)
        ctext = report.render_compare(changes, str(old_dir), str(out_dir), old_info, sysinfo)
        (out_dir / "compare.md").write_text(ctext)
        print_compare_summary(changes, stream)
    return path


def print_targets(out_dir, stream=sys.stderr):
    from . import report
    bj = Path(out_dir) / "benchmark.json"
    if not bj.exists() or not bj.stat().st_size:
        return
    rows = report.load_results(out_dir).rows
    for v in report.evaluate_targets(rows):
        status = "–" if v.met is None else ("met" if v.met else "MISSED")
        val = "" if v.value is None else \
            (f" ×{report.fmt(v.value)}" if v.target.kind.startswith("ratio")
             else f" {report.fmt_value(v.value, v.target.unit)}")
        where = f" [{report.fmt_params(v.row.params)}]" if v.row else ""
        margin = v.margin
        if v.row is None and v.peer_rows:
            margin += " (measured: " + ", ".join(
                f"{s} {report.fmt_value(r.median, r.unit)} {report.unit_label(r.unit)}"
                for s, r in sorted(v.peer_rows.items())) + ")"
        stream.write(f"  {status:7} {v.target.text}{where}:{val} — {margin}\n")


def print_compare_summary(changes, stream=sys.stderr):
    moved = [c for c in changes if c.verdict in ("faster", "slower", "better", "worse")]
    stream.write(f"bench: compare: {len(moved)} change(s) beyond the noise "
                 f"of {len(changes)} row(s)\n")
    from . import report
    for c in moved:
        stream.write(f"  {c.verdict:7} {c.key[0]} {report.fmt_params(dict(c.key[1]))} "
                     f"{c.subject}: {report.fmt(c.old.median)} → {report.fmt(c.new.median)} "
                     f"{report.unit_label(c.new.unit)} ({c.change * 100:+.1f}%)\n")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the vswitch benchmarks (pytest-benchmark on bench/bench_*.py) and "
                    "write bench/results/<timestamp>/: benchmark.json, report.md, plots/, "
                    "sysinfo.json.",
        epilog="Arguments after -- go to pytest unchanged.")
    p.add_argument("--quick", action="store_true",
                   help="a subset in about two minutes (VSWITCH_BENCH_QUICK=1, -m 'not slow')")
    p.add_argument("--compare", metavar="OLD_DIR",
                   help="also write compare.md: what got faster or slower than OLD_DIR "
                        "beyond the noise")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="pytest -k expression")
    p.add_argument("--files", nargs="+", metavar="FILE",
                   help="benchmark files (default: bench/bench_*.py)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: "
                   "bench/results/<timestamp>)")
    p.add_argument("--notes", metavar="FILE",
                   help="Markdown appended to the report's closing note (why targets missed)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--allow-missing-peer", metavar="NAME", action="append", default=[],
                   help="a subject (bridge, ovs, portmap, bandwidth-plugin, reference-cni, "
                        "vswitch-py, vswitch; or 'all') this machine is not set up for: its "
                        "missing rows are reported but do not fail the run (repeatable; also "
                        "VSWITCH_BENCH_ALLOW_MISSING_PEER=a,b)")
    p.add_argument("--report-only", metavar="DIR",
                   help="do not run: rebuild DIR/report.md (and compare.md) from DIR's files")
    p.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stream = sys.stderr
    notes_text = Path(args.notes).read_text() if args.notes else None
    from . import report
    try:
        allowed = report.allowed_missing(args.allow_missing_peer)
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}")
    if args.compare:
        from . import report
        try:
            report.load_results(args.compare)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"bench: --compare {args.compare!r}: not a benchmark run "
                             f"directory or pytest-benchmark JSON ({exc})")
    if args.report_only:
        out_dir = Path(args.report_only)
        if not (out_dir / "benchmark.json").exists():
            raise SystemExit(f"bench: --report-only {out_dir}: no benchmark.json there")
        path = write_report(out_dir, notes_text=notes_text, plots=not args.no_plots,
                            compare_dir=args.compare, stream=stream, allowed=allowed)
        stream.write(f"bench: report written: {path}\n")
        print_targets(out_dir, stream)
        return 1 if print_missing(out_dir, allowed, stream) else 0

    from . import sysinfo as sysmod
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) if args.out else RESULTS_DIR / stamp
    if not args.out and out_dir.exists():
        out_dir = RESULTS_DIR / f"{stamp}-{os.getpid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    info = sysmod.collect()
    files = bench_files(args.files)
    if not files:
        raise SystemExit(f"bench: no benchmark files bench_*.py in {BENCH_DIR}")
    cmd = build_pytest_command(out_dir, files, quick=args.quick, keyword=args.keyword,
                         extra=args.pytest_args)
    env = dict(os.environ)
    if args.quick:
        env["VSWITCH_BENCH_QUICK"] = "1"
    stream.write(f"bench: {'quick ' if args.quick else ''}run of {len(files)} file(s) → "
                 f"{out_dir}\n")
    if args.quick:
        stream.write("bench: quick mode: parameter grids shrunk, 'slow' deselected\n")
    t0 = time.time()
    rc, outcomes = run_pytest(cmd, out_dir, env, stream)
    took = time.time() - t0
    sysmod.finish(info)
    run_info = {"started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
                "duration": _clock(took), "mode": "quick" if args.quick else "full",
                "pytest exit code": rc,
                "allowed missing": ", ".join(sorted(allowed)) or "none",
                "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)}
    (out_dir / "sysinfo.json").write_text(json.dumps(info, indent=2))
    (out_dir / "outcomes.json").write_text(json.dumps(outcomes, indent=2))
    (out_dir / "run.json").write_text(json.dumps(run_info, indent=2))
    path = write_report(out_dir, sysinfo=info, outcomes=outcomes, run_info=run_info,
                        notes_text=notes_text, plots=not args.no_plots,
                        compare_dir=args.compare, stream=stream, allowed=allowed)
    if not args.out:
        latest = RESULTS_DIR / "latest"
        try:
            if latest.is_symlink() or latest.exists():
                latest.unlink()
            latest.symlink_to(out_dir.name)
        except OSError:
            pass
    counts = {}
    for o in outcomes:
        counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
    stream.write(f"bench: {', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'nothing ran'}"
                 f" in {_clock(took)}; pytest exit code {rc}\n")
    print_targets(out_dir, stream)
    failing = print_missing(out_dir, allowed, stream)
    stream.write(f"bench: report: {path}\n")
    if rc != 0:
        stream.write(f"bench: pytest failed (exit code {rc}); its output: "
                     f"{out_dir / 'pytest.log'}\n")
    elif failing:
        rc = MISSING_EXIT
    return rc


#: exit code of a run whose tests passed but a required subject left no row
MISSING_EXIT = 3


def print_missing(out_dir, allowed, stream=sys.stderr):
    """Says loudly which subjects the run could not measure and why; returns those
    that fail the run (not allowed to be missing)."""
    from . import report
    out_dir = Path(out_dir)
    bj, oj = out_dir / "benchmark.json", out_dir / "outcomes.json"
    if not oj.exists():
        return []
    outcomes = json.loads(oj.read_text())
    rows = report.load_results(out_dir).rows if bj.exists() and bj.stat().st_size else []
    missing = report.missing_subjects(rows, outcomes, allowed)
    if not missing:
        return []
    failing = [m for m in missing if not m.allowed]
    bar = "bench: " + "!" * 72 + "\n"
    stream.write(bar)
    stream.write("bench: NOT MEASURED — these subjects left no row:\n")
    for m in missing:
        stream.write(f"bench:   {m.subject} ({m.file}, {m.tests} test(s)"
                     f"{', allowed' if m.allowed else ''}): {'; '.join(m.reasons)}\n")
    if failing:
        stream.write("bench: this machine is taken to be set up for them (scripts/setup.sh "
                     "installs them): the run FAILS; run scripts/setup.sh, or pass "
                     "--allow-missing-peer NAME for a subject this machine is not meant to "
                     "measure\n")
    stream.write(bar)
    return failing
