"""The Cython core's constants (ext/defs.pxi) agree with vswitch/datapath/consts.py.

``C_CONSTANTS``, ``C_COUNTER_INDEX`` and ``C_GLOBAL_INDEX`` are built in the module from the
C enums of defs.pxi themselves, so these tests compare what the compiled code uses, not a
Python copy of it. Both implementations must also expose the same public names.
"""
import re
from pathlib import Path

import numpy as np
import pytest

from vswitch.datapath import consts as dpconst



@pytest.fixture
def core(both_impls):
    return both_impls[1]


SCALARS = ("OUT_FLOOD", "OUT_DROP", "OUT_QUEUED", "PORT_POD", "PORT_HOST", "PORT_UPLINK", "EGRESS",
           "INGRESS", "MAX_FRAME", "MAX_IPS_PER_PORT", "MAX_IPV6_EXT_HEADERS", "VNET_F_NEEDS_CSUM",
           "CT_SYN_SENT", "CT_ESTABLISHED", "CT_FIN", "CT_CLOSE", "CT_UDP_NEW", "CT_UDP_REPLIED",
           "SEC_NS", "SWEEP_INTERVAL_NS", "FRAG_SLOTS", "FRAG_TIMEOUT_NS")


@pytest.mark.parametrize("name", SCALARS)
def test_c_enum_equals_dpconst(core, name):
    assert core.C_CONSTANTS[name] == getattr(dpconst, name)


def test_counter_indexes_equal_dpconst(core):
    assert core.C_COUNTER_INDEX == dpconst.PC
    assert core.C_GLOBAL_INDEX == dpconst.GC
    assert core.C_CONSTANTS["N_PORT_COUNTERS"] == len(dpconst.PORT_COUNTERS)
    assert core.C_CONSTANTS["N_GLOBAL_COUNTERS"] == len(dpconst.GLOBAL_COUNTERS)
    assert core.C_CONSTANTS["N_DROP_REASONS"] == len(dpconst.DROP_REASONS)


def test_every_drop_reason_has_both_counters(core):
    for reason in core.DROP_REASONS:
        assert "drop_" + reason in core.C_COUNTER_INDEX
        assert reason in core.C_GLOBAL_INDEX


def _public(mod):
    return {n for n in dir(mod) if n.isupper() and not n.startswith("_") and not n.startswith("C_")}


def test_module_exposes_every_dpconst_name(core):
    for name in _public(dpconst):
        assert hasattr(core, name), name
        ours, theirs = getattr(core, name), getattr(dpconst, name)
        if isinstance(theirs, np.dtype):
            assert ours == theirs, name
        else:
            assert ours == theirs and type(ours) is type(theirs), name


def test_both_implementations_expose_the_same_names(both_impls):
    py, c = both_impls
    for name in _public(dpconst) | {"MAX_NODE_ADDRESSES"}:
        if hasattr(py, name):
            assert getattr(c, name) == getattr(py, name), name
    assert c.MAX_NODE_ADDRESSES == py.MAX_NODE_ADDRESSES


def test_port_and_global_counter_shapes(both_impls):
    for mod in both_impls:
        dp = mod.Datapath(max_ports=7)
        assert dp.port_counters().shape == (7, len(dpconst.PORT_COUNTERS))
        assert dp.port_counters().dtype == np.uint64
        assert dp.global_counters().shape == (len(dpconst.GLOBAL_COUNTERS),)
        assert dp.global_counters().dtype == np.uint64


def test_defs_pxi_source_lists_the_counters_in_dpconst_order():
    """The enums in ext/defs.pxi are written in dpconst's order (a reader can trust them)."""
    src = (Path(__file__).resolve().parents[2] / "ext" / "defs.pxi").read_text()
    pcs = re.findall(r"^\s+PC_([A-Z_]+)(?: = 0)?$", src, re.M)
    gcs = re.findall(r"^\s+GC_([A-Z_]+)(?: = 0)?$", src, re.M)
    assert [n.lower() for n in pcs] == list(dpconst.PORT_COUNTERS)
    assert [n.lower() for n in gcs] == list(dpconst.GLOBAL_COUNTERS)


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
    import subprocess
    import sys

    pytest.importorskip("Cython")
    ext = Path(__file__).resolve().parents[2] / "ext"
    for f in list(ext.glob("*.pyx")) + list(ext.glob("*.pxi")):
        shutil.copy(f, tmp_path / f.name)
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
