"""Where core-mixed-64B's time goes: one report row per pipeline stage of the core (ns/packet).

bench/core_stages.py does the work (a line-annotated build, a callgrind run of
bench_core's mixed workload, a timing beside it); this file only puts its table into the
report as group ``core-stages``. Apart from bench_core.py so that neither imports the other.

    python -m bench --files bench_core_stages.py --no-plots
"""
import shutil

import pytest

from . import core_stages
from .report import quick_mode, record

QUICK = quick_mode()

_STAGE_TABLE = {}


def _stage_table():
    """core_stages.stage_table() once per session (a build, a callgrind run, a timing)."""
    if "t" not in _STAGE_TABLE:
        _STAGE_TABLE["t"] = core_stages.stage_table(rounds=10, ns_rounds=100 if QUICK else 400)
    return _STAGE_TABLE["t"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(core_stages.STAGES))
def test_core_stages(benchmark, stage):
    """Where core-mixed-64B's time goes at batch 256: ns/packet per pipeline stage.

    bench/core_stages.py: instructions per source line of the core counted by callgrind
    (deterministic), summed per stage, apportioned to the median ns/packet measured in
    the same run. One row per stage; ``info`` holds the instructions per packet.
    """
    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (the stage table counts instructions with callgrind)")
    t = _stage_table()
    r = t["stages"][stage]
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)     # the figure is computed above
    record(benchmark, group="core-stages", subject="vswitch", unit="ns_per_packet", value=r["ns"],
           info=dict(ir_per_packet=r["ir"], share_of_instructions=r["share"], what=core_stages.DESCRIPTION[stage],
                     total_ir_per_packet=t["ir_per_packet"], median_ns_per_packet=t["ns_per_packet"],
                     workload=t["workload"], command="python -m bench.core_stages"),
           stage=stage)
