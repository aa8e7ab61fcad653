"""The fuzz corpus replays without a difference, a bounded atheris run finds none, and the
harness does report a difference when one implementation misbehaves."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from vswitch.datapath import pure  # noqa: E402

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
# inputs per target for the bounded run in the test suite (about 10-30 s each here)
RUNS = {"parse": 3000, "batch": 1500}


def _core():
    from vswitch.datapath import _core
    return _core


def _inputs():
    for target in sorted(harness.TARGETS):
        for path in sorted((CORPUS / target).iterdir()):
            yield pytest.param(target, path, id=f"{target}/{path.name}")


@pytest.mark.parametrize("target,path", list(_inputs()))
def test_corpus_input_gives_the_same_result_in_both(target, path):
    harness.TARGETS[target](pure, _core(), path.read_bytes())


@pytest.mark.parametrize("target", sorted(harness.TARGETS))
def test_every_target_has_a_corpus(target):
    assert len(list((CORPUS / target).iterdir())) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(harness.TARGETS))
def test_a_bounded_atheris_run_finds_no_difference(target, tmp_path):
    pytest.importorskip("atheris", reason="pip install atheris (the test extra has it)")
    work = tmp_path / target
    shutil.copytree(CORPUS / target, work)
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz_datapath.py"), target, str(work),
         f"-runs={RUNS[target]}", "-seed=1", "-max_len=6000"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, f"{crashes}\n{proc.stderr[-4000:]}"
    # libFuzzer's closing line; the count may exceed -runs by the run that was in flight
    done = re.search(r"Done (\d+) runs", proc.stderr)
    assert done and int(done.group(1)) >= RUNS[target], proc.stderr[-2000:]


class _Lying:
    """A stand-in 'core': the twin, except that process() sends its first frame elsewhere."""

    class Datapath(pure.Datapath):
        def process(self, buf, offsets, lengths, in_ports, out_ports, n, now_ns):
            r = super().process(buf, offsets, lengths, in_ports, out_ports, n, now_ns)
            if n:
                out_ports[0] = out_ports[0] + 1
            return r


def test_the_harness_reports_a_difference():
    seed = sorted((CORPUS / "parse").iterdir())[0].read_bytes()
    harness.target_parse(pure, pure, seed)               # the twin agrees with itself
    with pytest.raises(AssertionError, match="out_ports"):
        harness.target_parse(pure, _Lying, seed)
