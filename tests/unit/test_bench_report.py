"""The benchmark report and comparison logic, on synthetic pytest-benchmark JSON.

What is proved: rows come out of every headline form of the convention (samples,
per_round, one value) and out of files that ignore it (time statistics); peers pair only
on equal group and parameters; each target of issue 6 is judged met / missed with the
right margin, or "not measured"; a comparison calls a change only when the noise
intervals do not overlap, in the unit's direction; the runner turns a run directory into
report.md and plots, and runs a real pytest child with the progress plugin; a failed
benchmark keeps no row; a subject that left no row fails the run, by name and reason,
unless allowed; the report can say "missed" (the core judged at the daemon's batch, load
excusing only absolute misses). ``python -m bench --quick`` runs end to end unless
VSWITCH_BENCH_SMOKE=0, and must measure every subject.
"""
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import report, runner

REPO = Path(__file__).resolve().parents[2]


def bench(name, group=None, extra=None, params=None, median=1.0, lo=None, hi=None,
          rounds=5, q1=None, q3=None):
    lo = median if lo is None else lo
    hi = median if hi is None else hi
    return {
        "group": group, "name": name, "fullname": f"bench/bench_x.py::{name}",
        "params": params, "extra_info": extra or {},
        "stats": {"min": lo, "max": hi, "median": median, "mean": median, "rounds": rounds,
                  "q1": lo if q1 is None else q1, "q3": hi if q3 is None else q3,
                  "iqr": 0.0, "stddev": 0.0},
    }


def doc(*benches):
    return {"machine_info": {}, "commit_info": {}, "benchmarks": list(benches),
            "datetime": "2026-01-01T00:00:00", "version": "5.2.3"}


def rows_of(*benches):
    return report.results_from_json(doc(*benches)).rows


# ----------------------------------------------------------------------- rows


def test_samples_give_median_min_max_and_quartiles():
    (row,) = rows_of(bench("t", "real-tcp", {"subject": "vswitch", "unit": "gbps",
                                             "samples": [10, 12, 11, 30, 9], "streams": 1}))
    assert (row.median, row.lo, row.hi, row.n, row.source) == (11, 9, 30, 5, "samples")
    assert row.params == {"streams": 1}
    assert row.q1 == 10 and row.q3 == 12


def test_per_round_derives_rate_from_timing_with_min_and_max_swapped():
    # 1000 packets per call; median 20 µs per call -> 50 Mpps; the slowest call is the min
    (row,) = rows_of(bench("t", "core-mixed-64B",
                           {"subject": "vswitch", "unit": "mpps", "per_round": 1000,
                            "batch": 1000}, median=20e-6, lo=10e-6, hi=40e-6))
    assert row.median == pytest.approx(50.0)
    assert row.lo == pytest.approx(25.0) and row.hi == pytest.approx(100.0)
    assert row.source == "per_round"


def test_per_round_derives_time_per_item():
    (row,) = rows_of(bench("t", "core", {"subject": "vswitch", "unit": "ns_per_packet",
                                         "per_round": 100}, median=2e-6, lo=1e-6, hi=4e-6))
    assert (row.median, row.lo, row.hi) == pytest.approx((20.0, 10.0, 40.0))


def test_single_value_headline():
    (row,) = rows_of(bench("t", "sim-fps", {"subject": "vswitch", "unit": "fps", "fps": 1e6}))
    assert (row.median, row.lo, row.hi, row.source) == (1e6, 1e6, 1e6, "value")


def test_file_without_convention_falls_back_to_seconds_and_is_listed():
    res = report.results_from_json(doc(bench("test_forward[c-32]", None, {},
                                             params={"impl": "c", "batch": 32}, median=0.5)))
    (row,) = res.rows
    assert row.unit == "s" and row.median == 0.5 and row.source == "time"
    assert row.subject == "vswitch" and row.params == {"batch": 32}
    assert row.group == "bench_x"
    assert res.nonconforming == ["bench/bench_x.py::test_forward[c-32]"]


def test_non_benchmark_json_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="benchmarks"):
        report.results_from_json({"hello": 1})


# ----------------------------------------------------------------------- record()


def fake_benchmark():
    return SimpleNamespace(group=None, extra_info={})


def test_record_fills_the_convention():
    b = fake_benchmark()
    report.record(b, group="real-tcp", subject="ovs", unit="gbps", samples=[1.0],
                  target="tap-tcp", info={"tool": "iperf3"}, streams=4, queue="x")
    assert b.group == "real-tcp"
    assert b.extra_info == {"group": "real-tcp", "subject": "ovs", "unit": "gbps",
                            "samples": [1.0],
                            "target": "tap-tcp", "info": {"tool": "iperf3"},
                            "param_keys": ["queue"], "streams": 4, "queue": "x"}
    (row,) = rows_of(bench("t", b.group, b.extra_info))
    assert row.params == {"streams": 4, "queue": "x"}
    # record() called after the benchmarked call: pytest-benchmark wrote group None
    (late,) = rows_of(bench("t", None, b.extra_info))
    assert late.group == "real-tcp"


@pytest.mark.parametrize("kwargs, match", [
    (dict(unit="furlongs", value=1), "unknown unit 'furlongs'"),
    (dict(unit="mpps"), "exactly one of"),
    (dict(unit="mpps", value=1, samples=[1]), "exactly one of"),
    (dict(unit="gbps", per_round=10), "cannot derive unit 'gbps'"),
    (dict(unit="mpps", per_round=0), "per_round=0"),
    (dict(unit="mpps", value=1, batch=[1, 2]), r"batch=\[1, 2\] must be a number"),
    (dict(unit="mpps", value=1, param_keys="x"), "'param_keys' is reserved"),
    (dict(subject="", unit="mpps", value=1), "subject must be a non-empty string"),
])
def test_record_rejects_bad_input_naming_the_value(kwargs, match):
    kwargs = {"subject": "vswitch", **kwargs}
    b = fake_benchmark()
    with pytest.raises(ValueError, match=match):
        report.record(b, group="g", **kwargs)
    assert b.group is None and b.extra_info == {}


def test_quick_mode_reads_the_environment(monkeypatch):
    monkeypatch.setenv("VSWITCH_BENCH_QUICK", "1")
    assert report.quick_mode()
    monkeypatch.setenv("VSWITCH_BENCH_QUICK", "0")
    assert not report.quick_mode()
    monkeypatch.delenv("VSWITCH_BENCH_QUICK")
    assert not report.quick_mode()


# ----------------------------------------------------------------------- peers, targets


def tcp(subject, gbps, streams=1, **extra):
    return bench(f"tcp_{subject}_{streams}", "real-tcp",
                 {"subject": subject, "unit": "gbps", "samples": gbps, "streams": streams,
                  **extra})


def test_peers_pair_only_on_equal_group_and_parameters():
    rows = rows_of(tcp("vswitch", [9.0]), tcp("bridge", [10.0]), tcp("bridge", [20.0], 4),
                   tcp("ovs", [5.0], pods=2))
    table = report.peers(rows)
    one = table[("real-tcp", (("streams", 1),))]
    assert set(one) == {"vswitch", "bridge"}
    assert report.ratio(one["vswitch"], one["bridge"]) == pytest.approx(0.9)


def verdicts_for(tid, *benches):
    return [v for v in report.evaluate_targets(rows_of(*benches)) if v.target.tid == tid]


def test_ratio_target_met_and_missed_with_margin():
    (v1, v4) = verdicts_for("tap-tcp", tcp("vswitch", [9.5]), tcp("bridge", [10.0]),
                            tcp("vswitch", [6.0], 4), tcp("bridge", [10.0], 4))
    assert v1.met and v1.value == pytest.approx(0.95)
    assert "5.6% above" in v1.margin
    assert v4.met is False and v4.value == pytest.approx(0.6)
    assert "missed by 33.3%" in v4.margin and "1.50× more" in v4.margin


def test_max_ratio_target_for_rtt():
    rtt = lambda s, v: bench(f"p_{s}", "real-ping", {"subject": s, "unit": "rtt_ms",
                                                     "samples": v})
    (v,) = verdicts_for("ping-rtt", rtt("vswitch", [0.2, 0.2, 0.2]),
                        rtt("bridge", [0.1, 0.1, 0.1]))
    assert v.met is False and v.value == pytest.approx(2.0)
    assert "33.3% over the limit" in v.margin


def test_absolute_target_with_aim_shows_peer_beside_it():
    core = lambda s, mpps, batch: bench(f"c_{s}_{batch}", "core-mixed-64B",
                                        {"subject": s, "unit": "mpps", "mpps": mpps,
                                         "batch": batch})
    vs = verdicts_for("core-mpps", core("vswitch", 40.0, 32), core("vswitch-py", 1.0, 32))
    absolute, versus_py = vs
    assert absolute.met and "short of the aim 50" in absolute.margin
    assert set(absolute.peer_rows) == {"vswitch-py"}
    assert versus_py.met and versus_py.value == pytest.approx(40.0)


def test_tagged_rows_win_over_the_default_group():
    core = lambda s, mpps, batch, **kw: bench(f"c_{s}_{batch}", "core-mixed-64B",
                                              {"subject": s, "unit": "mpps", "mpps": mpps,
                                               "batch": batch, **kw})
    vs = verdicts_for("core-mpps", core("vswitch", 3.0, 1), core("vswitch", 60.0, 256,
                                                                 target="core-mpps"))
    assert [v.row.params["batch"] for v in vs] == [256, 256]


def test_shaping_within_two_percent_either_side():
    shp = lambda s, r, rate: bench(f"s_{s}_{rate}", "shaping",
                                   {"subject": s, "unit": "achieved_ratio", "samples": r,
                                    "rate_bps": rate, "direction": "egress"})
    vs = verdicts_for("shaping", shp("vswitch", [0.99], 20e6), shp("vswitch", [1.03], 2e9),
                      shp("bandwidth-plugin", [0.98], 20e6))
    met, missed = vs
    assert met.met and "off by 1.0%" in met.margin and "bandwidth-plugin" in met.peer_rows
    assert missed.met is False and "off by 3.0%" in missed.margin


def test_unmeasured_target_lists_the_peers_that_were_measured():
    (v,) = verdicts_for("tap-tcp", tcp("bridge", [10.0]), tcp("ovs", [8.0]))
    assert v.met is None and v.row is None
    assert set(v.peer_rows) == {"bridge", "ovs"}


def test_ratio_target_without_its_peer_is_not_judged():
    (v,) = verdicts_for("tap-tcp", tcp("vswitch", [10.0]))
    assert v.met is None and "no bridge row" in v.margin


def test_one_cold_call_does_not_make_a_clear_result_noisy():
    # 50 rounds of ~20 µs per 1000 packets (50 Mpps), the first one cold (2.5 Mpps)
    core = bench("c", "core-mixed-64B", {"subject": "vswitch", "unit": "mpps",
                                         "per_round": 1000}, median=20e-6, lo=19e-6,
                 hi=400e-6, rounds=50, q1=19.5e-6, q3=20.5e-6)
    (v, _) = verdicts_for("core-mpps", core)
    assert v.met and not v.uncertain and v.row.lo == pytest.approx(2.5)
    assert v.margin == "66.7% above the target"


def test_threshold_inside_the_range_is_flagged_as_noise():
    (v,) = verdicts_for("tap-tcp", tcp("vswitch", [8.0, 9.5, 8.5]), tcp("bridge", [10.0]))
    assert v.met is False and v.uncertain


# ----------------------------------------------------------------------- rendering


def test_report_shows_targets_ratios_skips_and_nonconforming():
    res = report.results_from_json(doc(
        tcp("vswitch", [6.0]), tcp("bridge", [10.0]), tcp("ovs", [5.0]),
        bench("test_legacy", None, {}, median=0.25)))
    outcomes = [{"nodeid": "bench/bench_cni.py::test_add", "outcome": "skipped",
                 "message": "needs root"}]
    text = report.render_report(res, sysinfo={"cpu": {"model": "Zen", "count": 2},
                                               "kernel": "6.1", "loadavg_start": [1.5, 1, 1]},
                                outcomes=outcomes, plot_paths={"real-tcp": ["plots/x.png"]})
    assert "| TAP TCP ≥ 0.9 × the Linux bridge | streams=1 | 6.00 Gbit/s |" in text
    assert "**MISSED**: missed by 33.3%" in text
    assert "×0.600 vs bridge, ×1.20 vs ovs" in text
    assert "needs root" in text and "test_legacy" in text
    assert "![real-tcp](plots/x.png)" in text
    # a ratio's peer ran under the same load: load explains nothing there
    assert "load average" not in text.split("## Closing note")[1].lower()
    assert "NOT MEASURED" in text


def udp64(subject, mpps):
    return bench(f"udp_{subject}", "real-udp-64B", {"subject": subject, "unit": "mpps",
                                                    "samples": mpps, "target": "udp-64B"})


def test_report_says_missed_when_vswitch_is_below_a_target_beside_its_peer():
    """Issue 17: the report can say "missed". vswitch at 0.20 Mpps of 64-byte frames
    (target 0.25) with the bridge measured beside it at 0.75; the core at 20 Mpps at the
    daemon's batch with its twin beside it (its 40 Mpps at batch 256 judges nothing); the
    TAP TCP ratio at 0.5 of the bridge. Under load, only the absolute misses get the load
    sentence."""
    core = lambda s, mpps, batch, tagged: bench(
        f"c_{s}_{batch}", "core-mixed-64B",
        {"subject": s, "unit": "mpps", "mpps": mpps, "batch": batch,
         **({"target": "core-mpps"} if tagged else {})})
    res = report.results_from_json(doc(
        udp64("vswitch", [0.19, 0.20, 0.21]), udp64("bridge", [0.74, 0.75, 0.76]),
        core("vswitch", 20.0, 64, True), core("vswitch-py", 0.1, 64, True),
        core("vswitch", 40.0, 256, False), core("vswitch-py", 0.1, 256, False),
        tcp("vswitch", [5.0]), tcp("bridge", [10.0])))
    by = {(v.target.text, v.row.params.get("batch")): v for v in report.evaluate_targets(res.rows)
          if v.row is not None}
    udp = by[("64-byte frames ≥ 0.25 Mpps", None)]
    assert udp.met is False and "bridge" in udp.peer_rows and not udp.uncertain
    assert udp.margin.startswith("missed by 20.0%")
    absolute = by[("core ≥ 30 Mpps on mixed traffic at the daemon's batch (aim 50)", 64)]
    assert absolute.met is False and "vswitch-py" in absolute.peer_rows
    assert not any(b == 256 for _, b in by)             # batch 256 is reported, not judged
    text = report.render_report(res, sysinfo={"cpu": {"count": 2}, "loadavg_start": [3.0, 2, 1]})
    assert ("| 64-byte frames ≥ 0.25 Mpps | – | 0.200 Mpps | bridge: 0.750 | 0.200 | "
            "**MISSED**: missed by 20.0% (needs 1.25× more) |") in text
    assert "| core ≥ 30 Mpps on mixed traffic at the daemon's batch (aim 50) | batch=64 | " \
           "20.0 Mpps | vswitch-py: 0.100 | 20.0 | **MISSED**" in text
    closing = text.split("## Closing note")[1]
    assert "0 target line(s) met" not in closing and "3 missed" in closing
    lines = {ln.split(" (")[0]: ln for ln in closing.splitlines() if ln.startswith("- ")}
    assert "load average at start was 3.00" in lines["- 64-byte frames ≥ 0.25 Mpps"].lower()
    assert "load average" not in lines["- TAP TCP ≥ 0.9 × the Linux bridge"].lower()


def test_fmt_keeps_three_significant_digits():
    assert [report.fmt(v) for v in (0.08123, 1.234, 12.34, 1234.5, 2.5e7)] == \
        ["0.0812", "1.23", "12.3", "1,234", "2.5e+07"]
    assert report.fmt(0.6) == "0.600"
    assert report.fmt_value(0.98765, "achieved_ratio") == "0.9877"


# ----------------------------------------------------------------------- compare


def test_compare_calls_changes_only_beyond_the_noise():
    old = rows_of(tcp("vswitch", [10.0, 10.5, 11.0]),
                  tcp("bridge", [10.0, 11.0, 12.0]),
                  bench("r", "real-ping", {"subject": "vswitch", "unit": "rtt_ms",
                                           "samples": [0.1, 0.11, 0.12]}),
                  tcp("ovs", [5.0]))
    new = rows_of(tcp("vswitch", [12.0, 12.5, 13.0]),     # faster, no overlap
                  tcp("bridge", [11.5, 12.5, 13.0]),      # overlaps: same
                  bench("r", "real-ping", {"subject": "vswitch", "unit": "rtt_ms",
                                           "samples": [0.2, 0.21, 0.22]}),  # RTT up: slower
                  tcp("vswitch", [1.0], 4))
    got = {(c.key[0], c.subject, dict(c.key[1]).get("streams")): c.verdict
           for c in report.compare(old, new)}
    assert got == {("real-tcp", "vswitch", 1): "faster", ("real-tcp", "bridge", 1): "same",
                   ("real-ping", "vswitch", None): "slower", ("real-tcp", "ovs", 1): "gone",
                   ("real-tcp", "vswitch", 4): "new"}


def test_compare_uses_quartiles_when_both_sides_have_five_rounds():
    # min..max overlap (one outlier each) but the quartiles do not
    old = rows_of(tcp("vswitch", [10, 10.1, 10.2, 10.3, 20]))
    new = rows_of(tcp("vswitch", [5, 11, 11.1, 11.2, 11.3]))
    (c,) = report.compare(old, new)
    assert c.verdict == "faster" and c.change == pytest.approx(11.1 / 10.2 - 1)


def test_compare_shaping_is_judged_by_distance_from_one():
    shp = lambda r: rows_of(bench("s", "shaping", {"subject": "vswitch",
                                                   "unit": "achieved_ratio", "samples": r}))
    (c,) = report.compare(shp([0.90, 0.91]), shp([1.0, 1.01]))
    assert c.verdict == "better"
    text = report.render_compare([c], "old", "new")
    assert "better" in text and "Summary: 1 better" in text


# ----------------------------------------------------------------------- runner


def write_run(tmp_path, *benches, sysinfo=None):
    d = tmp_path / "run"
    d.mkdir()
    (d / "benchmark.json").write_text(json.dumps(doc(*benches)))
    if sysinfo:
        (d / "sysinfo.json").write_text(json.dumps(sysinfo))
    return d


def test_report_only_rebuilds_report_plots_and_compare(tmp_path):
    pytest.importorskip("matplotlib")
    old = write_run(tmp_path, tcp("vswitch", [5.0]), tcp("bridge", [10.0]))
    new = tmp_path / "new"
    new.mkdir()
    core = [bench(f"c{b}", "core-mixed-64B", {"subject": s, "unit": "mpps",
                                              "per_round": b, "batch": b}, median=b * k)
            for b in (1, 32, 1024) for s, k in (("vswitch", 1e-8), ("vswitch-py", 5e-7))]
    (new / "benchmark.json").write_text(json.dumps(doc(tcp("vswitch", [9.5]),
                                                       tcp("bridge", [10.0]), *core)))
    assert runner.main(["--report-only", str(new), "--compare", str(old)]) == 0
    text = (new / "report.md").read_text()
    assert "core ≥ 25 × the pure-Python twin at the daemon's batch | batch=32" in text
    assert (new / "plots" / "core-mixed-64B.png").stat().st_size > 1000
    assert (new / "plots" / "real-tcp.png").exists()
    assert "faster" in (new / "compare.md").read_text()


def test_progress_draws_one_line_per_finished_test():
    out = io.StringIO()
    p = runner.Progress(out, tty=False)
    p.feed({"event": "collected", "n": 2, "t": 0})
    p.feed({"event": "start", "nodeid": "bench/b.py::test_a", "t": 10.0})
    p.feed({"event": "done", "nodeid": "bench/b.py::test_a", "outcome": "passed", "t": 12.5})
    p.feed({"event": "start", "nodeid": "bench/b.py::test_b", "t": 12.5})
    p.feed({"event": "done", "nodeid": "bench/b.py::test_b", "outcome": "skipped",
            "message": "needs root", "t": 12.6})
    lines = out.getvalue().splitlines()
    assert lines[1] == "[1/2] ok      2.5s bench/b.py::test_a"
    assert lines[2].startswith("[2/2] skip") and "(needs root)" in lines[2]
    assert [o["outcome"] for o in p.outcomes] == ["passed", "skipped"]


def test_runner_runs_pytest_benchmark_and_reports(tmp_path):
    """A real pytest child on a synthetic benchmark file: JSON, outcomes with the skip
    reason, and a report that pairs the two subjects."""
    f = tmp_path / "bench_fake.py"
    f.write_text(textwrap.dedent('''
        import pytest
        from bench.report import quick_mode, record

        @pytest.mark.parametrize("subject, per_call", [("vswitch", 10), ("bridge", 20)])
        def test_fake(benchmark, subject, per_call):
            record(benchmark, group="real-udp-64B", subject=subject, unit="mpps",
                   samples=[0.3 if subject == "vswitch" else 0.6], quick=quick_mode())
            benchmark.pedantic(lambda: sum(range(per_call)), rounds=2, iterations=1)

        def test_skipped(benchmark):
            pytest.skip("no such tool here")
    '''))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-plots",
                           "--files", str(f), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + (out / "pytest.log").read_text()
    assert "[3/3]" in proc.stderr
    outcomes = json.loads((out / "outcomes.json").read_text())
    assert {o["outcome"] for o in outcomes} == {"passed", "skipped"}
    assert any(o["message"] == "no such tool here" for o in outcomes)
    text = (out / "report.md").read_text()
    assert "×0.500 vs bridge" in text
    assert "| 64-byte frames ≥ 0.25 Mpps | quick=True | 0.300 Mpps | bridge: 0.600 |" in text
    assert json.loads((out / "sysinfo.json").read_text())["kernel"]


def test_a_row_exists_only_when_its_validity_checks_passed(tmp_path):
    """A benchmark whose check after the benchmarked call fails (frames dropped) leaves no
    row in benchmark.json, whether it recorded before the check or not; the passing one
    beside it does."""
    f = tmp_path / "bench_checked.py"
    f.write_text(textwrap.dedent('''
        import pytest
        from bench.report import record

        @pytest.mark.parametrize("dropped", [0, 5])
        def test_checked(benchmark, dropped):
            record(benchmark, group="sim-fps", subject="vswitch", unit="fps", per_round=10,
                   dropped_case=dropped)
            benchmark.pedantic(lambda: sum(range(10)), rounds=2, iterations=1)
            assert dropped == 0, f"{dropped} frames dropped: the figure is invalid"

        def test_unrecorded_then_failed(benchmark):
            benchmark.pedantic(lambda: None, rounds=2, iterations=1)
            assert False, "checked after the call"
    '''))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-plots",
                           "--files", str(f), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0                     # pytest failed, and the runner says so
    outcomes = {o["nodeid"].split("::")[-1]: o["outcome"]
                for o in json.loads((out / "outcomes.json").read_text())}
    assert outcomes == {"test_checked[0]": "passed", "test_checked[5]": "failed",
                        "test_unrecorded_then_failed": "failed"}
    names = [b["name"] for b in json.loads((out / "benchmark.json").read_text())["benchmarks"]]
    assert names == ["test_checked[0]"]


def test_core_target_is_judged_at_the_batch_the_daemon_forms():
    """Issue 17: the quick grid measures batches 32 and 64 (both implementations at the
    judged one), and the core-mpps tag sits on the batch vswitchd really hands the core:
    the max_batch of the PacketIO the daemon builds (``DAEMON_MAX_BATCH``)."""
    from vswitch.daemon.ports import DAEMON_MAX_BATCH
    daemon_batch = DAEMON_MAX_BATCH
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-o", "python_files=bench_*.py",
                           "bench/bench_core.py", "-k", "test_core_mixed"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, VSWITCH_BENCH_QUICK="1"))
    ids = {ln.split("[", 1)[1].rstrip("]") for ln in proc.stdout.splitlines() if "[" in ln}
    assert {"32-c", "64-c", "256-c", f"{daemon_batch}-c", f"{daemon_batch}-py"} <= ids, ids
    from bench import bench_core
    assert bench_core.DAEMON_BATCH == daemon_batch    # the tag (rows: the end-to-end test)


def test_sim_fps_check_refuses_a_run_that_dropped_or_flooded():
    from bench.bench_sim import check_delivered
    ok = SimpleNamespace(frames=100, dropped=0, queued=0, flooded=0)
    check_delivered(ok, 100)
    for bad, match in ((dict(dropped=3), "'dropped': 3"), (dict(flooded=1), "'flooded': 1"),
                       (dict(queued=2), "'queued': 2"), (dict(frames=99), "99 of 100")):
        with pytest.raises(AssertionError, match=match):
            check_delivered(SimpleNamespace(**{**vars(ok), **bad}), 100)


def test_subject_of_a_test_from_its_parameters_or_name():
    assert report.subject_of_test({"subject": "bridge", "streams": 1}, "test_real_tcp") == "bridge"
    assert report.subject_of_test({"impl": "py", "batch": 32}, "test_core_mixed") == "vswitch-py"
    assert report.subject_of_test({"streams": 4}, "test_ovs_tcp") == "ovs"
    assert report.subject_of_test({}, "test_shaping_bandwidth_plugin") == "bandwidth-plugin"
    assert report.subject_of_test({}, "test_shaping_vswitch") == "vswitch"
    assert report.subject_of_test({}, "test_helper") is None


def test_allowed_missing_names_subjects_or_all_and_refuses_others():
    assert report.allowed_missing(["ovs"], {}) == {"ovs"}
    assert report.allowed_missing([], {report.ALLOW_MISSING_ENV: "portmap, bridge"}) == \
        {"portmap", "bridge"}
    assert report.allowed_missing(["all"], {}) == set(report.SUBJECTS)
    with pytest.raises(ValueError, match="unknown subject.*'obs'.*accepted: all, vswitch"):
        report.allowed_missing(["obs"], {})


PEER_SKIPPED = textwrap.dedent('''
    import pytest
    from bench.report import record

    @pytest.mark.parametrize("subject", ["vswitch", "bridge"])
    def test_pair(benchmark, subject):
        if subject == "bridge":
            pytest.skip("reference CNI plugin /usr/lib/cni/bridge not installed")
        record(benchmark, group="real-udp-64B", subject=subject, unit="mpps", samples=[0.3])
        benchmark.pedantic(lambda: None, rounds=2, iterations=1)

    def test_ovs_udp(benchmark):
        pytest.skip("not installed: ovs-vswitchd")
''')


def test_a_skipped_peer_fails_the_run_and_is_named_with_its_reason(tmp_path):
    """Issue 17: a peer the machine is set up for that is skipped fails the run (exit
    code 3, pytest itself passed), the runner says loudly which and why, and the report
    leads with it; allowed with --allow-missing-peer, the run passes and still says so."""
    f = tmp_path / "bench_peers.py"
    f.write_text(PEER_SKIPPED)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-plots",
                           "--files", str(f), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == runner.MISSING_EXIT, proc.stderr
    assert "NOT MEASURED — these subjects left no row" in proc.stderr
    assert ("bridge (bench_peers.py, 1 test(s)): skipped: reference CNI plugin "
            "/usr/lib/cni/bridge not installed") in proc.stderr
    assert "ovs (bench_peers.py, 1 test(s)): skipped: not installed: ovs-vswitchd" in proc.stderr
    assert "the run FAILS" in proc.stderr
    text = (out / "report.md").read_text()
    assert "## Subjects not measured — THE RUN FAILS" in text
    assert "| bridge | bench_peers.py | 1 | skipped: reference CNI plugin" in text
    outcomes = json.loads((out / "outcomes.json").read_text())
    assert {o["nodeid"].split("::")[1]: o["subject"] for o in outcomes} == \
        {"test_pair[vswitch]": "vswitch", "test_pair[bridge]": "bridge", "test_ovs_udp": "ovs"}

    out2 = tmp_path / "out2"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-plots",
                           "--files", str(f), "--out", str(out2), "--allow-missing-peer",
                           "bridge"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **{report.ALLOW_MISSING_ENV: "ovs"}))
    assert proc.returncode == 0, proc.stderr
    assert "bridge (bench_peers.py, 1 test(s), allowed)" in proc.stderr
    assert "the run FAILS" not in proc.stderr
    assert "allowed (--allow-missing-peer)" in (out2 / "report.md").read_text()


def test_a_subject_measured_in_one_file_is_still_missing_in_another():
    rows = rows_of(tcp("bridge", [10.0]))          # from bench/bench_x.py
    outcomes = [{"nodeid": "bench/bench_x.py::t[bridge]", "outcome": "passed",
                 "subject": "bridge"},
                {"nodeid": "bench/bench_growth.py::t[bridge-2]", "outcome": "skipped",
                 "message": "no plugin", "subject": "bridge"},
                {"nodeid": "bench/bench_growth.py::t[helper]", "outcome": "passed",
                 "subject": None}]
    (m,) = report.missing_subjects(rows, outcomes)
    assert (m.subject, m.file, m.reasons, m.allowed) == \
        ("bridge", "bench_growth.py", ["skipped: no plugin"], False)


def test_benchmarks_install_as_vswitch_bench_and_never_as_a_top_level_bench(tmp_path):
    """Issue 10/17: outside a checkout the benchmarks are ``vswitch_bench`` (no top-level
    ``bench`` that could collide with another project's), their imports are relative
    (importing them loads no ``bench``), and the ``vswitch-bench`` console script runs a
    real pytest child from anywhere."""
    code = ("import sys, json; import vswitch_bench.runner, vswitch_bench.report, "
            "vswitch_bench.bench_sim, vswitch_bench.bench_real; "
            "print(json.dumps([vswitch_bench.runner.__file__, sorted(m for m in sys.modules "
            "if m == 'bench' or m.startswith('bench.'))]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    where, top_level_bench = json.loads(proc.stdout)
    assert Path(where) == REPO / "bench" / "runner.py" and top_level_bench == []
    script = Path(sys.executable).parent / "vswitch-bench"
    assert script.exists(), "the console script vswitch-bench is not installed"
    f = tmp_path / "bench_fake.py"
    f.write_text(PEER_SKIPPED.replace('pytest.skip("reference CNI', 'print("reference CNI'))
    out = tmp_path / "out"
    proc = subprocess.run([str(script), "--quick", "--no-plots", "--files", str(f), "--out",
                           str(out), "--allow-missing-peer", "ovs"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + (out / "pytest.log").read_text()
    assert "-p bench.runner" in (out / "pytest.log").read_text().splitlines()[0]


def test_the_child_refuses_a_module_under_two_names(tmp_path):
    """The plugin loaded as vswitch_bench.runner while pytest imports the files of bench/
    as ``bench.*``: one file under two module names; the child stops with the reason."""
    f = tmp_path / "bench_one.py"
    f.write_text("from bench.report import record\n\ndef test_x(benchmark):\n"
                 "    benchmark.pedantic(lambda: None, rounds=1)\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "vswitch_bench.runner", "-o", "python_files=bench_*.py",
                           "--benchmark-only", str(f)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "loaded under two names in one process" in proc.stdout + proc.stderr
    assert "-p bench.runner" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VSWITCH_BENCH_SMOKE") == "0",
                    reason="VSWITCH_BENCH_SMOKE=0 turns off the end-to-end `python -m bench --quick`")
def test_quick_suite_end_to_end(tmp_path):
    """Issue 6: CI runs `python -m bench --quick` to prove the suite works (no figure is
    judged). Issue 17: on a machine set up by scripts/setup.sh every peer is measured — a
    missing one fails the run (exit code 3) and this test, unless the environment allows
    it (VSWITCH_BENCH_ALLOW_MISSING_PEER) — and the core target is judged at the
    daemon's batch."""
    from vswitch.daemon.ports import DAEMON_MAX_BATCH
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    log = (out / "pytest.log").read_text() if (out / "pytest.log").exists() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + log[-5000:]
    text = (out / "report.md").read_text()
    assert "## Targets (issue 6)" in text and "## Subjects not measured" not in text
    benchmarks = json.loads((out / "benchmark.json").read_text())["benchmarks"]
    subjects = {b.get("extra_info", {}).get("subject") for b in benchmarks}
    allowed = report.allowed_missing()
    assert set(report.SUBJECTS) - allowed <= subjects, subjects
    tagged = {(b["extra_info"]["subject"], b["extra_info"]["batch"]) for b in benchmarks
              if b["extra_info"].get("target") == "core-mpps"}
    daemon_batch = DAEMON_MAX_BATCH
    assert tagged == {("vswitch", daemon_batch), ("vswitch-py", daemon_batch)}, tagged
    core = {b["extra_info"]["batch"] for b in benchmarks
            if b["extra_info"].get("group") == "core-mixed-64B"
            and b["extra_info"]["subject"] == "vswitch"}
    assert {32, 64, 256} <= core, core


def test_compare_with_something_that_is_not_a_run_is_refused(tmp_path):
    run = write_run(tmp_path, tcp("vswitch", [5.0]))
    with pytest.raises(SystemExit, match="not a benchmark run directory"):
        runner.main(["--report-only", str(run), "--compare", str(tmp_path / "nothing")])


def test_iperf_intervals_skip_omitted_and_the_misreported_one_after_them():
    from bench import nettools
    iv = lambda seconds, nbytes, omitted: {"sum": {"seconds": seconds, "bytes": nbytes,
                                                   "omitted": omitted}}
    # iperf3 3.12: the first interval after the omitted ones claims 2.0 s for 1 s of bytes
    data = {"intervals": [iv(1.0, 2_600_000, True), iv(2.0, 2_400_000, False),
                          iv(1.0, 2_400_000, False), iv(1.0, 2_400_000, False)]}
    assert nettools.receiver_intervals(data) == (4_800_000, 2.0)
    assert nettools.goodput_bps(data) == 8 * 4_800_000 / 2.0
    no_omit = {"intervals": [iv(1.0, 100, False), iv(0.5, 50, False)]}
    assert nettools.receiver_intervals(no_omit) == (150, 1.5)
    # nothing left after the omitted ones: iperf3's own end-of-run figure
    only_omitted = {"intervals": [iv(1.0, 100, True)],
                    "end": {"sum_received": {"bits_per_second": 800.0}}}
    assert nettools.goodput_bps(only_omitted) == 800.0


def test_a_value_axis_spanning_more_than_two_decades_is_logarithmic():
    from bench import plots
    # core-features: the core near 40 Mpps beside the twin near 0.1 Mpps
    assert plots.value_scale([40.0, 0.1]) == "log"
    assert plots.value_scale([40.0, 0.5]) == "linear"        # 80×: bars still visible
    assert plots.value_scale([0.95, 1.01]) == "linear"
    # zeros, NaN and a lone value do not decide it
    assert plots.value_scale([0.0, 5.0, float("nan")]) == "linear"


def test_bar_chart_of_a_wide_span_is_drawn_on_a_log_axis_with_a_label(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    from bench import plots
    rows = rows_of(*(bench(f"f{s}", "core-features",
                           {"subject": s, "unit": "mpps", "mpps": v, "features": "none"})
                     for s, v in (("vswitch", 40.0), ("vswitch-py", 0.1))))
    drawn = {}                     # each figure's axis as it is written to its PNG
    savefig = matplotlib.figure.Figure.savefig

    def spy(fig, path, *a, **kw):
        ax = fig.axes[0]
        drawn[Path(path).name] = (ax.get_yscale(), ax.get_ylabel(),
                                  {t.get_text() for t in ax.texts})
        return savefig(fig, path, *a, **kw)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    figures, note = plots.make_plots(rows, tmp_path / "plots")
    assert note is None and figures == {"core-features": ["plots/core-features.png"]}
    scale, label, texts = drawn["core-features.png"]
    assert scale == "log" and "log scale" in label
    assert {"40", "0.1"} <= texts                # each bar's median printed on it


def test_udp_request_response_client_discards_a_late_reply_and_counts_it():
    """bench_hostport's UDP client against a local echo server that answers the first
    request after 1.05 s (the client has given up on it after 1 s) and every other one
    after 10 ms: the late reply arrives while a later request waits, and must not be
    taken as that request's answer."""
    import socket
    import threading
    from bench import bench_hostport
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve():
        first = True
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                data, peer = srv.recvfrom(65535)
            except socket.timeout:
                continue
            delay = 1.05 if first else 0.01
            first = False
            threading.Timer(delay, srv.sendto, (data, peer)).start()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        count = 30
        proc = subprocess.run([sys.executable, "-c", bench_hostport.CLIENT, "udp", "127.0.0.1",
                               str(port), str(count), "0", "18"],
                              capture_output=True, text=True, timeout=60)
    finally:
        stop.set()
        t.join()
        srv.close()
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["lost"] == 1 and r["late"] == 1, r
    assert len(r["ms"]) == count - 1
    # every sample is one request's own round trip (~10 ms), none a stale pairing
    assert all(5 <= ms < 500 for ms in r["ms"]), r["ms"]
