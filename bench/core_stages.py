"""Where the core's time goes: instructions per packet and per pipeline stage (issue 16.5).

Theory of operation
-------------------
The core (ext/_datapath.pyx and its .pxi files) is one C function per batch after inlining,
so a function profile says little and a timer per stage would change what it measures
(reading the clock costs ~18 ns a packet). Instead this module counts instructions, which
on this machine are deterministic where time is not (a shared 2-vCPU guest):

1. build: a second copy of the extension, compiled with exactly setup.py's flags plus
   ``-g`` and Cython's line directives (``emit_linenums``), into ``build/core-stages/``
   (cached by a hash of ext/ and consts.py). ``-g`` and ``#line`` change no generated
   code, so it runs the same instructions as the normal build, but every instruction
   carries the .pyx/.pxi line it came from, inlined or not.
2. run: ``valgrind --tool=callgrind --dump-line=yes`` over the mixed 64-byte workload of
   bench_core.py's ``core-mixed-64B`` (80% known unicast, 10% hostPort DNAT, 10%
   egress-shaped; 16 MACs, 16 flows; batch 256, 16 batches a call), collecting only
   inside ``Datapath.process`` (``--toggle-collect``) and zeroed after the tables are
   filled (``--zero-before`` a ``_tune()`` call), so only the measured rounds count.
3. attribute: every source line belongs to the function around it (parsed from the
   sources) and every function to a stage (``FUNCTION_STAGE``); inside the functions that
   run several stages (the batch loop, pkt_prepare, pkt_finish, forward, output_unicast)
   a comment ``# stage: NAME`` switches the stage for the lines after it. Lines of the
   generated C itself (Cython glue) count as ``glue``; the Python-level ``process()``
   wrapper (argument checks, numpy C API) as ``call``.
4. ns: instructions are apportioned to time with the median ns/packet measured in the
   same process on the normal build (``ns = share of instructions x median``): a
   stage's ns is an estimate that assumes an even instruction rate across stages
   (true enough with every table in L1, as here; not for the 1M-entry tables).

    python -m bench.core_stages             # prints the table (about a minute)
    python -m bench --files bench_core_stages.py --no-plots   # the report group (bench_core_stages.py)

bench_core.py's ``core-stages`` group records one row per stage (ns/packet, with
instructions per packet and the share in ``info``).
"""
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT = os.path.join(ROOT, "ext")
BUILD = os.path.join(ROOT, "build", "core-stages")

#: the stages in pipeline order (the rows of the table)
STAGES = ("call", "batch", "parse", "antispoof", "egress_shaper", "nat", "vxlan", "l2",
          "ingress_shaper", "output", "counters", "trace_hooks", "glue")
DESCRIPTION = {
    "call": "Datapath.process(): argument checks, numpy C API, GIL release",
    "batch": "the batch loop: D2 validation of every packet, chunks, prefetch decisions",
    "parse": "parse_frame (Ethernet, IPv4/IPv6, L4 checks), MAC keys",
    "antispoof": "source MAC/IP against the port's binding",
    "egress_shaper": "the in port's egress token bucket",
    "nat": "NAT/conntrack: port filter, 5-tuple key + hash, lookup, state, rewrite",
    "vxlan": "the vxlan stage (not configured here: its checks only)",
    "l2": "MAC learn (source) and lookup (destination)",
    "ingress_shaper": "the out port's ingress token bucket",
    "output": "output decision, out_ports store, flood",
    "counters": "rx/tx/global packet and byte counters",
    "trace_hooks": "trace() recorder checks left in the path (tr_add; tr_at is compiled out)",
    "glue": "calls that were not inlined, register spills, generated C without a source line",
}

#: function name -> stage (functions that run several stages mark lines with "# stage: X")
FUNCTION_STAGE = {
    "process_batch_c": "batch", "chunk_prepare": "batch", "chunk_prefetch_entries": "nat",
    "pkt_prepare": "parse", "pkt_finish": "counters", "process_one": "batch",
    "forward": "glue", "output_unicast": "output",
    "parse_frame": "parse", "parse_ipv4": "parse", "parse_ipv6": "parse", "parse_l4": "parse",
    "mac_key": "parse", "vsw_mac48": "parse", "vsw_load_be16": "parse", "vsw_load_be32": "parse",
    "vsw_load_u64": "nat", "vsw_store_be16": "nat", "csum_fold": "nat",
    "spoofed": "antispoof", "ip4_bound": "antispoof", "ip6_linklocal": "antispoof",
    "ip6_zero": "antispoof",
    "count_tx": "counters", "count_drop": "counters",
    "tr_add": "trace_hooks", "tr_rec": "trace_hooks",
    "vx_write_back": "vxlan", "vsw_prefetch": "nat", "vsw_prefetchw": "l2",
}
FILE_STAGE = {"mactable.pxi": "l2", "conntrack.pxi": "nat", "shaper.pxi": "egress_shaper",
              "vxlan.pxi": "vxlan", "parse.pxi": "parse"}

_DEF = re.compile(r"^(\s*)(?:cdef|cpdef|def)\s[^(=]*?\b(\w+)\s*\(")
_CDEF = re.compile(r"^\s*static\b[^(=]*?\b(vsw_\w+)\s*\(")
_MARK = re.compile(r"#.*?\bstage:\s*(\w+)")


def line_stages(path):
    """{line number: stage} for one .pyx/.pxi file."""
    name = os.path.basename(path)
    out = {}
    fn_stage, fn_indent, stage = FILE_STAGE.get(name, "glue"), None, None
    with open(path) as f:
        lines = f.read().split("\n")
    for no, text in enumerate(lines, 1):
        m = _DEF.match(text) or _CDEF.match(text)
        stripped = text.strip()
        if m:
            fname = m.group(m.lastindex)
            fn_stage = FUNCTION_STAGE.get(fname, FILE_STAGE.get(name, "glue"))
            stage = fn_stage
            fn_indent = len(m.group(1)) if m.re is _DEF else None
        elif (fn_indent is not None and stripped and not stripped.startswith("#")
              and len(text) - len(text.lstrip()) <= fn_indent):
            stage, fn_indent = FILE_STAGE.get(name, "glue"), None
        mark = _MARK.search(text)
        if mark:
            if mark.group(1) not in STAGES:
                raise ValueError(f"{name}:{no}: unknown stage {mark.group(1)!r}")
            stage = mark.group(1)
        out[no] = stage or FILE_STAGE.get(name, "glue")
    return out


def sources_hash():
    h = hashlib.sha256()
    for name in sorted(os.listdir(EXT)):
        if name.endswith((".pyx", ".pxi")):
            with open(os.path.join(EXT, name), "rb") as f:
                h.update(name.encode() + f.read())
    with open(os.path.join(ROOT, "vswitch", "datapath", "consts.py"), "rb") as f:
        h.update(f.read())
    with open(os.path.join(ROOT, "setup.py"), "rb") as f:
        h.update(f.read())
    return h.hexdigest()[:16]


_BUILD_SCRIPT = r"""
import sys, os
sys.argv = ["setup.py"]
root, out = {root!r}, {out!r}
os.chdir(root)
import setup as S                       # setup.py: writes consts.pxi, declares the extension
from Cython.Build import cythonize
from setuptools.dist import Distribution
ext = S.extensions[0]
ext.extra_compile_args = list(ext.extra_compile_args) + ["-g"]
exts = cythonize([ext], build_dir=os.path.join(out, "c"), emit_linenums=True, include_path=["ext"],
                 quiet=True, compiler_directives={directives!r})
d = Distribution({{"ext_modules": exts}})
cmd = d.get_command_obj("build_ext")
cmd.build_lib, cmd.build_temp = os.path.join(out, "lib"), os.path.join(out, "tmp")
cmd.ensure_finalized()
cmd.run()
print(cmd.get_ext_fullpath("vswitch.datapath._core"))
"""


def build():
    """The line-annotated copy of the extension (cached); returns the .so path."""
    out = os.path.join(BUILD, sources_hash())
    done = os.path.join(out, "so_path")
    if os.path.exists(done):
        with open(done) as f:
            return f.read().strip()
    shutil.rmtree(BUILD, ignore_errors=True)
    os.makedirs(out)
    directives = {"language_level": 3, "boundscheck": False, "wraparound": False,
                  "cdivision": True, "initializedcheck": False}
    script = _BUILD_SCRIPT.format(root=ROOT, out=out, directives=directives)
    # setup.py calls setup() at import: run it as a module that stops before that
    r = subprocess.run([sys.executable, "-c", script.replace("import setup as S", _IMPORT_SETUP)],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"profile build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    so = r.stdout.strip().splitlines()[-1]
    with open(done, "w") as f:
        f.write(so)
    return so


# setup.py ends in setup(...): load it with setuptools.setup replaced by a no-op
_IMPORT_SETUP = """import setuptools, importlib.util
_real_setup = setuptools.setup
setuptools.setup = lambda **kw: None
_spec = importlib.util.spec_from_file_location("setup", os.path.join(root, "setup.py"))
S = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(S)
setuptools.setup = _real_setup"""


# the workload, run under valgrind by a child python (argv: so path, rounds, json out)
_WORKLOAD = r"""
import sys, json, importlib.util
sys.path.insert(0, {root!r})
so, rounds, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
spec = importlib.util.spec_from_file_location("vswitch.datapath._core", so)
m = importlib.util.module_from_spec(spec)
sys.modules["vswitch.datapath._core"] = m
spec.loader.exec_module(m)
import vswitch.datapath
vswitch.datapath._core = m
from bench.bench_core import Setup
s = Setup(m, 16, 16).traffic("mixed", 256, 16)
s.round_setup(); s.run()                 # warm (not collected: zeroed below)
s.dp._tune()                             # --zero-before: the tables are filled, count from here
for _ in range(rounds):
    s.round_setup()
    s.run()
s.check()
json.dump({{"packets": s.n_packets * rounds, "calls": s.batches.count * rounds}}, open(out, "w"))
"""


def run_callgrind(so, rounds=10, workdir=None):
    """Runs the workload under callgrind; returns (callgrind.out path, packets, calls)."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("valgrind is not installed")
    workdir = workdir or tempfile.mkdtemp(prefix="core-stages-")
    script = os.path.join(workdir, "workload.py")
    with open(script, "w") as f:
        f.write(_WORKLOAD.format(root=ROOT))
    cg, meta = os.path.join(workdir, "callgrind.out"), os.path.join(workdir, "meta.json")
    cmd = ["valgrind", "--tool=callgrind", "--dump-line=yes", "--dump-instr=no",
           "--compress-strings=no", "--compress-pos=no", f"--callgrind-out-file={cg}",
           "--toggle-collect=__pyx_pw_*Datapath_*process",
           "--zero-before=*Datapath*_tune",
           sys.executable, script, so, str(rounds), meta]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"callgrind run failed:\n{r.stderr[-3000:]}")
    with open(meta) as f:
        m = json.load(f)
    return cg, m["packets"], m["calls"]


def parse_callgrind(path):
    """{(source file, line): self Ir} from a callgrind.out written with --dump-line=yes,
    --compress-strings=no, --compress-pos=no (call costs, which are inclusive, skipped)."""
    cost = defaultdict(int)
    fl = fi = None
    skip_next = False
    with open(path) as f:
        for line in f:
            if line.startswith("fl="):
                fl = fi = line[3:].strip()
            elif line.startswith(("fi=", "fe=")):
                fi = line[3:].strip()
            elif line.startswith("fn="):
                fi = fl
            elif line.startswith("calls="):
                skip_next = True
            elif line[:1].isdigit():
                if skip_next:
                    skip_next = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    cost[(fi, int(parts[0]))] += int(parts[1])
    return cost


def attribute(cost):
    """{stage: Ir} from per-line costs."""
    maps = {}
    stages = defaultdict(int)
    for (src, line), ir in cost.items():
        base = os.path.basename(src or "")
        if base.endswith((".pyx", ".pxi")) and os.path.exists(os.path.join(EXT, base)):
            if base not in maps:
                maps[base] = line_stages(os.path.join(EXT, base))
            stages[maps[base].get(line, "glue")] += ir
        elif base.startswith("_datapath.c"):
            stages["glue"] += ir
        else:
            stages["call"] += ir                # CPython, numpy: the process() wrapper's calls
    return stages


def measure_ns(rounds=400):
    """Median ns/packet of the same workload on the normal build, in this process."""
    sys.path.insert(0, ROOT)
    from bench.bench_core import Setup, _impl
    import numpy as np
    s = Setup(_impl("c"), 16, 16).traffic("mixed", 256, 16)
    times = []
    for _ in range(rounds):
        s.round_setup()
        t0 = time.perf_counter_ns()
        s.run()
        times.append(time.perf_counter_ns() - t0)
    s.check()
    return float(np.median(times)) / s.n_packets


def stage_table(rounds=10, ns_rounds=400):
    """{"stages": {stage: {"ir": Ir/packet, "share": ..., "ns": ns/packet}}, "ir_per_packet",
    "ns_per_packet", "packets"}."""
    so = build()
    cg, packets, calls = run_callgrind(so, rounds)
    stages = attribute(parse_callgrind(cg))
    total = sum(stages.values())
    ns = measure_ns(ns_rounds)
    rows = {}
    for st in STAGES:
        ir = stages.get(st, 0)
        rows[st] = {"ir": round(ir / packets, 1), "share": round(ir / total, 4),
                    "ns": round(ns * ir / total, 2)}
    return {"stages": rows, "ir_per_packet": round(total / packets, 1), "ns_per_packet": round(ns, 2),
            "mpps": round(1e3 / ns, 2), "packets": packets, "calls": calls,
            "workload": "core-mixed-64B: batch 256, 16 batches a call, 16 MACs, 16 flows"}


def format_table(t):
    out = [f"core-mixed-64B, batch 256: {t['ir_per_packet']} instructions/packet, "
           f"median {t['ns_per_packet']} ns/packet ({t['mpps']} Mpps) measured beside it",
           f"{'stage':<15} {'Ir/pkt':>8} {'share':>7} {'ns/pkt':>7}  what"]
    for st, r in t["stages"].items():
        out.append(f"{st:<15} {r['ir']:>8} {100 * r['share']:>6.1f}% {r['ns']:>7}  {DESCRIPTION[st]}")
    return "\n".join(out)


if __name__ == "__main__":
    print(format_table(stage_table()))
