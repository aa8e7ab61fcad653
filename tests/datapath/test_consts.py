"""The constants are declared once (vswitch/datapath/consts.py) and the build uses them.

The Cython side is generated from consts.py at build time, so nothing compares two copies
here. What is tested is behaviour: consts imports without numpy, a core built from other
constants refuses to load, counters come out in the declared shape, the raw table views
are views, and the nogil code touches no Python object (``cython -a``).
"""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vswitch.datapath import consts as C

REPO = Path(__file__).resolve().parents[2]


def _python(code, env=None):
    import os
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=120)


def test_consts_and_the_selection_import_no_numpy():
    r = _python("import sys, vswitch.datapath, vswitch.datapath.consts, vswitch.datapath.gen_consts\n"
                "from vswitch.datapath import PORT_COUNTERS, implementation\n"
                "implementation()\n"
                "print(sorted(m for m in ('numpy', 'vswitch.datapath._core', 'vswitch.datapath.pure')"
                " if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_the_dtypes_are_built_on_first_use():
    r = _python("import sys\nfrom vswitch.datapath import consts\n"
                "assert 'numpy' not in sys.modules\n"
                "print(consts.FDB_DTYPE.names[:2], consts.CT_DTYPE.itemsize, 'numpy' in sys.modules)")
    assert r.returncode == 0, r.stderr
    # CT_DTYPE: 4 + 16*4 + 2*4 + 2*2 + 6*2 + 8*3 = 116 bytes, packed (docs/datapath.md Inspection)
    assert r.stdout.strip() == "('vlan', 'mac') 116 True"


def test_a_core_built_from_other_constants_refuses_to_load(both_impls):
    """consts.py edited after the build (here: FRAG_SLOTS changed before the import)."""
    r = _python("from vswitch.datapath import consts\nconsts.FRAG_SLOTS = 128\n"
                "import vswitch.datapath._core")
    assert r.returncode != 0
    assert "built from other constants" in r.stderr and "rebuild" in r.stderr


def test_the_generated_pxi_declares_every_counter_and_drop_in_order(tmp_path):
    from vswitch.datapath import gen_consts
    text = gen_consts.render(C)
    pcs = re.findall(r"^    PC_([A-Z_]+) = (\d+)$", text, re.M)
    gcs = re.findall(r"^    GC_([A-Z_]+) = (\d+)$", text, re.M)
    assert [(n.lower(), int(i)) for n, i in pcs] == [(n, i) for i, n in enumerate(C.PORT_COUNTERS)]
    assert [(n.lower(), int(i)) for n, i in gcs] == [(n, i) for i, n in enumerate(C.GLOBAL_COUNTERS)]
    # docs/datapath.md "Counters": the per-port and global names, in this order
    assert C.PORT_COUNTERS == ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "drop_malformed",
                               "drop_spoofed", "drop_queue_full", "drop_no_route", "drop_loop",
                               "drop_table_full", "drop_nat_collision", "drop_mac_stolen",
                               "drop_ttl_expired", "drop_vxlan_unresolved", "drop_vxlan_bad_vni",
                               "drop_vxlan_malformed", "drop_vxlan_not_ours", "drop_vxlan_unknown_peer",
                               "drop_vxlan_no_route", "drop_too_big", "drop_no_headroom", "queued")
    assert C.GLOBAL_COUNTERS == ("packets", "bytes", "malformed", "spoofed", "queue_full", "no_route", "loop",
                                 "table_full", "nat_collision", "mac_stolen",
                                 "ttl_expired", "vxlan_unresolved", "vxlan_bad_vni", "vxlan_malformed",
                                 "vxlan_not_ours", "vxlan_unknown_peer", "vxlan_no_route", "too_big",
                                 "no_headroom", "queued", "flooded", "mac_moves",
                                 "mac_table_full", "mac_learned", "ct_created", "ct_expired", "ct_deleted",
                                 "nat_translated", "ct_early_drop", "mac_evicted", "mac_learn_limited",
                                 "vxlan_encap", "vxlan_decap")
    assert gen_consts.write_pxi(C, tmp_path / "consts.pxi") is True
    assert gen_consts.write_pxi(C, tmp_path / "consts.pxi") is False       # unchanged: not rewritten


def test_every_trace_event_names_a_stage():
    assert list(C.STAGES) == ["rx", "parse", "antispoof", "egress_shaper", "nat", "vxlan", "l2", "ingress_shaper",
                              "output"]
    for event, stage, _ in C.TRACE_EVENTS:
        assert stage in C.STAGES, event
    assert C.trace_step([e for e, _, _ in C.TRACE_EVENTS].index("out_drop"), 0, 1, 60) == ("output", "drop spoofed")


def test_port_and_global_counter_shapes(dp_impl):
    dp = dp_impl.Datapath(max_ports=7)
    assert dp.port_counters().shape == (7, 22) and dp.port_counters().dtype == np.uint64
    assert dp.global_counters().shape == (33,) and dp.global_counters().dtype == np.uint64


def test_raw_table_views_match_the_c_structs(both_impls):
    """mac_table_raw()/conntrack_raw() are views of the C arrays, kept alive by the Datapath."""
    core = both_impls[1]
    dp = core.Datapath(max_ports=4, mac_table_size=8, conntrack_size=4)
    raw = dp.mac_table_raw()
    assert raw.dtype == core.MAC_SLOT_DTYPE and len(raw) >= 16 and not raw.flags.writeable
    assert raw.base is dp or raw.base is not None
    ct = dp.conntrack_raw()
    assert ct.dtype == core.CT_ENTRY_DTYPE and len(ct) == 4 and not ct["used"].any()
    del dp
    assert not raw["key"].any()          # still readable: the view keeps the Datapath alive


def test_nogil_code_has_no_python_interaction(tmp_path):
    """`cython -a` scores every line of the nogil helpers and of process()'s nogil block 0.

    A non-zero score is a line that touches the Python C-API (a yellow line in the HTML).
    Only the `with nogil:` line itself may score (it releases the GIL).
    """
    import shutil

    from vswitch.datapath import gen_consts

    pytest.importorskip("Cython")
    ext = REPO / "ext"
    for f in list(ext.glob("*.pyx")) + list(ext.glob("*.pxi")):
        if f.name != "consts.pxi":
            shutil.copy(f, tmp_path / f.name)
    gen_consts.write_pxi(C, tmp_path / "consts.pxi")
    subprocess.run([sys.executable, "-m", "cython", "-3", "-a", "-I", ".", "-X", "boundscheck=False",
                    "-X", "wraparound=False", "-X", "cdivision=True", "_datapath.pyx", "-o", "_datapath.c"],
                   cwd=tmp_path, check=True, capture_output=True)

    def scores(name):
        html = (tmp_path / f"{name}.html").read_text()
        return [int(s) for s in re.findall(r'<pre class="cython line score-(\d+)"', html)]

    problems = []
    for name, suffix in [("parse", "pxi"), ("mactable", "pxi"), ("conntrack", "pxi"), ("shaper", "pxi"),
                         ("defs", "pxi"), ("_datapath", "pyx")]:
        src = (tmp_path / f"{name}.{suffix}").read_text().splitlines()
        sc = scores(name)
        inside = False
        for i, line in enumerate(src):
            if line.startswith(("cdef ", "def ")):
                inside = "nogil" in line
            elif line and not line.startswith((" ", "#")):
                inside = False
            if inside and i < len(sc) and sc[i] > 0 and not line.strip().startswith("cdef "):
                problems.append(f"{name}.{suffix}:{i + 1}: {line.strip()}")
    src = (tmp_path / "_datapath.pyx").read_text().splitlines()
    sc = scores("_datapath")
    start = next(i for i, line in enumerate(src) if "def process(self" in line)
    block = next(i for i in range(start, len(src)) if "with nogil:" in src[i])
    end = next(i for i in range(block + 1, len(src)) if src[i].startswith("        if bad >= 0:"))
    problems += [f"_datapath.pyx:{i + 1}: {src[i].strip()}" for i in range(block + 1, end) if sc[i] > 0]
    assert not problems, "Python interaction in nogil code:\n" + "\n".join(problems)
