"""The relocatable plugin (cni/build.py): one file that runs on a host with nothing of ours.

Each run copies the built file ALONE into a fresh directory and executes it with ``env -i``
(no PYTHONPATH, no venv, only PATH when the test gives one), under Debian's /usr/bin/python3
and, where pyenv has them, a real Python 3.9 (the oldest accepted) and 3.8 (refused with a
CNI error). Python 3.9 compatibility is also checked statically (``check_py39``: ast with
``feature_version=(3, 9)``, ``X | Y`` annotations evaluated at run time, a list of 3.10+
library names), and the checker is shown to fire on each kind of violation. The archive's
imports are checked to be the standard library or the archive itself.
"""
import ast
import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cnitest import Netns, links_in, netconf, reservations  # noqa: F401
from vswitch_cni import build

DEBIAN_PYTHON = "/usr/bin/python3"
PYENV = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"


def _pyenv(minor):
    found = sorted(glob.glob(str(PYENV / f"3.{minor}.*" / "bin" / f"python3.{minor}")))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def lone_plugin(tmp_path_factory):
    """The default build (the /bin/sh prelude), copied alone into an empty directory."""
    d = tmp_path_factory.mktemp("lone")
    built = d / "build" / "vswitch"
    built.parent.mkdir()
    build.build(str(built))
    fresh = d / "fresh"
    fresh.mkdir()
    shutil.copy2(built, fresh / "vswitch")
    shutil.rmtree(built.parent)
    assert os.listdir(fresh) == ["vswitch"]
    return fresh / "vswitch"


def _env_i(cmd, env, stdin=b"", cwd=None):
    """``env -i`` then ``env``'s variables only: what a runtime's exec gives, and nothing of
    this test process (no PYTHONPATH, no VIRTUAL_ENV, no PATH unless given)."""
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *map(str, cmd)]
    if isinstance(stdin, dict):
        stdin = json.dumps(stdin).encode()
    p = subprocess.run(argv, input=stdin, capture_output=True, timeout=120, cwd=cwd)
    out = json.loads(p.stdout) if p.stdout.strip() else None
    return p.returncode, out, p.stderr.decode()


def _python_dir(tmp_path, interpreter):
    """A directory whose only ``python3`` is ``interpreter``: PATH for the prelude."""
    d = tmp_path / f"py-{Path(interpreter).name}"
    d.mkdir(exist_ok=True)
    os.symlink(interpreter, d / "python3")
    return d


def test_version_under_debian_python_isolated(lone_plugin, tmp_path):
    if not os.access(DEBIAN_PYTHON, os.X_OK):
        pytest.skip("no Debian /usr/bin/python3 here")
    rc, out, err = _env_i([DEBIAN_PYTHON, "-I", lone_plugin], {"CNI_COMMAND": "VERSION"},
                          cwd=tmp_path)
    assert rc == 0, err
    assert out == {"cniVersion": "1.1.0",
                   "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}
    # executed as a runtime does: the prelude finds python3 on PATH
    rc, out, err = _env_i([lone_plugin], {"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                          cwd=tmp_path)
    assert rc == 0 and out["cniVersion"] == "1.1.0", err


def test_no_python3_on_path_is_a_cni_error(lone_plugin, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, _ = _env_i([lone_plugin], {"CNI_COMMAND": "ADD", "PATH": str(empty)})
    assert rc == 1
    assert out["code"] == build.HOST_PYTHON_ERROR and "python3" in out["msg"] and "3.9" in out["msg"]


def test_python_older_than_3_9_is_a_cni_error_naming_it(lone_plugin, tmp_path):
    old = _pyenv(8) or _pyenv(7) or _pyenv(6)
    if old is None:
        pytest.skip(f"no Python 3.6-3.8 under {PYENV}")
    rc, out, err = _env_i([lone_plugin], {"CNI_COMMAND": "VERSION",
                                          "PATH": f"{_python_dir(tmp_path, old)}:/bin"})
    assert rc == 1, err
    assert out["code"] == build.HOST_PYTHON_ERROR
    assert "needs Python 3.9 or later" in out["msg"] and ("is 3.%s" % old.rsplit(".", 1)[1]) in out["msg"]


def test_the_bytecode_tree_is_this_interpreters_and_others_run_the_sources(lone_plugin):
    names = zipfile.ZipFile(lone_plugin).namelist()
    tag = sys.implementation.cache_tag
    assert f"{tag}/vswitch_cni/plugin.pyc" in names and "vswitch_cni/plugin.py" in names
    assert {n.split("/", 1)[1][:-1] for n in names if n.startswith(tag + "/")} == \
        {n for n in build.MODULES}             # every module compiled, nothing else


def test_the_build_is_reproducible():
    assert build.build_bytes() == build.build_bytes()
    assert build.build_bytes(python="/usr/bin/python3").startswith(b"#!/usr/bin/python3 -IS\n")
    with pytest.raises(ValueError, match="absolute path"):
        build.build_bytes(python="python3")


def _full_cycle(cmd, env_base, node, pods, tmp_path, tag):
    """ADD, CHECK, DEL of one pod through ``cmd`` (the copied plugin), against ``node``."""
    pod = pods.new()
    hl = tmp_path / f"hl-{tag}"
    name = f"z{tag}{os.getpid() % 1000}"
    conf = netconf(name, node.subnet, hl, socket=node.socket,
                   runtimeConfig={"portMappings": [{"hostPort": 28000 + len(tag), "containerPort": 80,
                                                    "protocol": "tcp"}]},
                   capabilities={"portMappings": True})
    env = dict(env_base, CNI_CONTAINERID=f"zip-{tag}", CNI_NETNS=Netns.path(pod), CNI_IFNAME="eth0",
               CNI_PATH="/usr/lib/cni")
    rc, out, err = _env_i(cmd, dict(env, CNI_COMMAND="ADD"), conf)
    assert rc == 0, (out, err)
    ip = out["ips"][0]["address"].split("/")[0]
    assert ip in json.dumps(node.attachments()) and "eth0" in links_in(pod)
    rc, out2, err = _env_i(cmd, dict(env, CNI_COMMAND="CHECK"), dict(conf, prevResult=out))
    assert rc == 0 and out2 is None, (out2, err)
    rc, out3, err = _env_i(cmd, dict(env, CNI_COMMAND="DEL"), dict(conf, prevResult=out))
    assert rc == 0, (out3, err)
    assert ip not in json.dumps(node.attachments()) and reservations(hl, name) == []


def test_add_check_del_under_debian_python_against_a_real_daemon(lone_plugin, node, pods, tmp_path):
    if not os.access("/usr/lib/cni/host-local", os.X_OK):
        pytest.fail("needs host-local in /usr/lib/cni (apt-get install -y containernetworking-plugins)")
    _full_cycle([DEBIAN_PYTHON, "-I", lone_plugin], {}, node, pods, tmp_path, "deb")
    _full_cycle([lone_plugin], {"PATH": "/usr/bin:/bin"}, node, pods, tmp_path, "exec")


def test_add_check_del_under_python_3_9(lone_plugin, node, pods, tmp_path):
    py39 = _pyenv(9)
    if py39 is None:
        pytest.skip(f"no Python 3.9 under {PYENV} (the static check below still runs)")
    if not os.access("/usr/lib/cni/host-local", os.X_OK):
        pytest.fail("needs host-local in /usr/lib/cni (apt-get install -y containernetworking-plugins)")
    _full_cycle([lone_plugin], {"PATH": f"{_python_dir(tmp_path, py39)}:/bin"}, node, pods,
                tmp_path, "py39")


# ---------------------------------------------------------------- static checks

# names that exist only from Python 3.10 on (module attribute or builtin), as they are spelled
NEW_IN_310 = {
    "itertools.pairwise", "int.bit_count", "bisect.bisect_left.key", "aiter", "anext",
    "types.NoneType", "types.UnionType", "types.EllipsisType", "typing.TypeAlias",
    "typing.ParamSpec", "typing.TypeGuard", "typing.Concatenate", "dataclasses.KW_ONLY",
    "sys.stdlib_module_names", "sys.orig_argv", "contextlib.aclosing", "EncodingWarning",
    # 3.11 and later
    "tomllib", "ExceptionGroup", "BaseExceptionGroup", "typing.Self", "typing.LiteralString",
    "typing.Never", "typing.assert_never", "typing.reveal_type", "enum.StrEnum",
    "datetime.UTC", "hashlib.file_digest", "operator.call", "re.NOFLAG", "asyncio.TaskGroup",
    "asyncio.timeout", "contextlib.chdir", "sys.exception", "logging.getLevelNamesMapping",
    "typing.override", "itertools.batched", "warnings.deprecated",
}
NEW_KEYWORDS_310 = {"zip": {"strict"}, "dataclass": {"slots", "kw_only", "match_args"},
                    "field": {"kw_only"}}


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def check_py39(source, name="<src>"):
    """Problems that keep ``source`` from running on Python 3.9 (list of strings)."""
    problems = []
    try:
        tree = ast.parse(source, name, feature_version=(3, 9))
    except SyntaxError as exc:
        return [f"{name}:{exc.lineno}: syntax newer than 3.9: {exc.msg}"]
    lazy = any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in tree.body)

    def union(node):
        return node is not None and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                                        for n in ast.walk(node))
    imported = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            for a in n.names:
                imported[a.asname or a.name] = a.name
                if a.name in NEW_IN_310:
                    problems.append(f"{name}:{n.lineno}: import {a.name} (3.11+)")
        elif isinstance(n, ast.ImportFrom) and n.module:
            for a in n.names:
                full = f"{n.module}.{a.name}"
                imported[a.asname or a.name] = full
                if full in NEW_IN_310 or n.module in NEW_IN_310:
                    problems.append(f"{name}:{n.lineno}: from {n.module} import {a.name} (3.10+)")
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and not lazy:
            anns = [a.annotation for a in n.args.args + n.args.kwonlyargs + n.args.posonlyargs]
            anns += [n.args.vararg and n.args.vararg.annotation,
                     n.args.kwarg and n.args.kwarg.annotation, n.returns]
            if any(union(a) for a in anns):
                problems.append(f"{name}:{n.lineno}: X | Y annotation evaluated at def time "
                                f"(3.10+; add from __future__ import annotations)")
        elif isinstance(n, ast.AnnAssign) and not lazy and union(n.annotation):
            problems.append(f"{name}:{n.lineno}: X | Y annotation evaluated at run time (3.10+)")
        elif isinstance(n, ast.Call):
            fn = _dotted(n.func) or ""
            if fn.split(".")[-1] in ("isinstance", "issubclass") and len(n.args) == 2 \
                    and union(n.args[1]):
                problems.append(f"{name}:{n.lineno}: {fn}(x, A | B) (3.10+)")
            new_kw = NEW_KEYWORDS_310.get(fn.split(".")[-1], set())
            if any(k.arg in new_kw for k in n.keywords):
                problems.append(f"{name}:{n.lineno}: {fn}({', '.join(k.arg for k in n.keywords if k.arg in new_kw)}=) (3.10+)")
        if isinstance(n, (ast.Attribute, ast.Name)):
            d = _dotted(n)
            if d:
                head, _, rest = d.partition(".")
                full = imported.get(head, head) + ("." + rest if rest else "")
                if full in NEW_IN_310 or (isinstance(n, ast.Attribute) and f"int.{n.attr}" in NEW_IN_310
                                          and n.attr == "bit_count"):
                    problems.append(f"{name}:{n.lineno}: {d} (3.10+)")
    return sorted(set(problems))


def _archive_sources(path):
    z = zipfile.ZipFile(path)
    return {n: z.read(n).decode() for n in z.namelist() if n.endswith(".py")}


def test_every_module_of_the_archive_runs_on_3_9_statically(lone_plugin):
    sources = _archive_sources(lone_plugin)
    assert set(build.MODULES) | {"__main__.py", "vswitch_cni_boot.py"} == set(sources)
    problems = [p for n, s in sources.items() for p in check_py39(s, n)]
    assert problems == []


@pytest.mark.parametrize("bad, what", [
    ("match x:\n    case 1:\n        pass\n", "syntax newer than 3.9"),
    ("def f(x: int | None): pass\n", "X | Y annotation"),
    ("y: int | str = 1\n", "X | Y annotation"),
    ("isinstance(1, int | str)\n", "isinstance(x, A | B)"),
    ("list(zip([1], [2], strict=True))\n", "zip(strict=)"),
    ("import itertools\nitertools.pairwise([1, 2])\n", "itertools.pairwise"),
    ("from itertools import pairwise\n", "from itertools import pairwise"),
    ("import tomllib\n", "import tomllib"),
    ("import sys\nsys.stdlib_module_names\n", "sys.stdlib_module_names"),
    ("from dataclasses import dataclass\n@dataclass(slots=True)\nclass A:\n    x: int\n", "dataclass(slots=)"),
    ("with (open('a') as a,\n      open('b') as b):\n    pass\n", None),   # 3.9's PEG parser took it
])
def test_the_3_9_checker_fires(bad, what):
    problems = check_py39(bad)
    if what is None:
        assert problems == []
    else:
        assert problems and what in problems[0], problems


def test_the_future_import_makes_union_annotations_fine():
    assert check_py39("from __future__ import annotations\ndef f(x: int | None) -> str | None: pass\n") == []


OURS = ("vswitch", "vswitch_cni")


def outside_imports(sources):
    """(file, module) for every import (function-level ones too) of a module that is
    neither the standard library nor in ``sources`` ({name in the archive: text});
    ``from vswitch import rpc`` needs the submodule vswitch.rpc."""
    inside = {n[:-3].replace("/__init__", "").replace("/", ".") for n in sources}
    out = []
    for fname, text in sources.items():
        pkg = fname.split("/")[0]
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, ast.Import):
                wanted = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = (pkg + ("." + n.module if n.module else "")) if n.level else n.module
                wanted = [base] + [f"{base}.{a.name}" for a in n.names
                                   if base in OURS and a.name != "__version__"]
            else:
                continue
            for mod in wanted:
                if mod in inside:
                    continue
                if mod.split(".")[0] in OURS:
                    if mod not in inside:
                        out.append((fname, mod))
                elif mod.split(".")[0] not in sys.stdlib_module_names:
                    out.append((fname, mod))
    return sorted(set(out))


def test_the_archive_imports_only_the_standard_library_and_itself(lone_plugin):
    sources = _archive_sources(lone_plugin)
    assert outside_imports(sources) == []
    # the check fires: without vswitch/rpc.py the archive would need the checkout's
    broken = {k: v for k, v in sources.items() if k != "vswitch/rpc.py"}
    assert ("vswitch_cni/plugin.py", "vswitch.rpc") in outside_imports(broken)
    assert ("vswitch/cnitypes.py", "vswitch.rpc") in outside_imports(broken)


def test_isolated_run_loads_no_module_from_outside_the_archive(lone_plugin, tmp_path):
    """A VERSION run under -IS: every non-builtin module loaded comes from the archive or
    the interpreter's own standard library (no site-packages, no checkout)."""
    code = ("import sys, io, json; sys.path.insert(0, sys.argv.pop(1));"
            "sys.path.insert(0, sys.path[0] + '/' + sys.implementation.cache_tag);"
            "out = io.StringIO(); real = sys.stdout; sys.stdout = out;"
            "import vswitch_cni.plugin as p, vswitch_cni.ipam, vswitch_cni.conf; rc = p.main();"
            "sys.stdout = real;"
            "print(json.dumps(sorted({getattr(m, '__file__', None) or '' for m in list(sys.modules.values())})))")
    p = subprocess.run(["env", "-i", "CNI_COMMAND=VERSION", DEBIAN_PYTHON, "-IS", "-c", code,
                        str(lone_plugin)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    files = [f for f in json.loads(p.stdout) if f]
    foreign = [f for f in files if not f.startswith((str(lone_plugin) + "/", "/usr/lib/python3"))]
    assert foreign == [], foreign
    assert any(f.startswith(str(lone_plugin) + "/") and f.endswith("plugin.pyc") for f in files)


# ---------------------------------------------------------------- what a pod's start loads

# stdlib modules the plugin must not load on its way through ADD and DEL (issue 16: each
# costs milliseconds of every pod's start; fastjson, _socket and posix_spawn stand in)
HEAVY = ("json", "re", "socket", "subprocess", "enum", "selectors", "threading", "collections",
         "ipaddress", "dataclasses", "traceback", "signal")


def _loaded_after(lone_plugin, env, stdin):
    """Run the archive's plugin in-process under -IS; the sorted names of sys.modules
    after main() returned, and main()'s output (stdout)."""
    code = ("import sys, io; sys.path.insert(0, sys.argv.pop(1));"
            "sys.path.insert(0, sys.path[0] + '/' + sys.implementation.cache_tag);"
            "out = io.StringIO(); real = sys.stdout; sys.stdout = out;"
            "import vswitch_cni.plugin as p; rc = p.main(); sys.stdout = real;"
            "sys.stderr.write('MODULES ' + ' '.join(sorted(sys.modules)) + '\\n');"
            "sys.stdout.write(out.getvalue()); sys.exit(rc)")
    p = subprocess.run(["env", "-i", *[f"{k}={v}" for k, v in env.items()], DEBIAN_PYTHON, "-IS", "-c",
                        code, str(lone_plugin)], input=stdin, capture_output=True, timeout=60)
    line = [ln for ln in p.stderr.decode().splitlines() if ln.startswith("MODULES ")]
    assert line, p.stderr
    return p.returncode, set(line[-1].split()[1:]), p.stdout


def test_version_loads_no_heavy_stdlib_module(lone_plugin):
    rc, mods, out = _loaded_after(lone_plugin, {"CNI_COMMAND": "VERSION"}, b"")
    assert rc == 0 and json.loads(out)["cniVersion"] == "1.1.0"
    assert sorted(mods & set(HEAVY)) == []


def test_add_and_del_load_no_heavy_stdlib_module(lone_plugin, node, pods, tmp_path):
    """A whole ADD (host-local run through posix_spawn, the attach on the control socket,
    the result printed) and its DEL, against a real daemon, without json, re, socket,
    subprocess and the rest of HEAVY."""
    if not os.access("/usr/lib/cni/host-local", os.X_OK):
        pytest.fail("needs host-local in /usr/lib/cni (apt-get install -y containernetworking-plugins)")
    pod = pods.new()
    hl = tmp_path / "hl-heavy"
    name = f"zh{os.getpid() % 1000}"
    conf = netconf(name, node.subnet, hl, socket=node.socket,
                   runtimeConfig={"portMappings": [{"hostPort": 28100, "containerPort": 80}],
                                  "bandwidth": {"ingressRate": 10 ** 8, "ingressBurst": 10 ** 7}},
                   capabilities={"portMappings": True, "bandwidth": True})
    env = {"CNI_CONTAINERID": "zip-heavy", "CNI_NETNS": Netns.path(pod), "CNI_IFNAME": "eth0",
           "CNI_PATH": "/usr/lib/cni", "PATH": "/usr/bin:/bin"}
    rc, mods, out = _loaded_after(lone_plugin, dict(env, CNI_COMMAND="ADD"), json.dumps(conf).encode())
    assert rc == 0, out
    result = json.loads(out)
    ip = result["ips"][0]["address"].split("/")[0]
    assert ip in json.dumps(node.attachments()) and "eth0" in links_in(pod)
    assert sorted(mods & set(HEAVY)) == []
    rc, mods, out = _loaded_after(lone_plugin, dict(env, CNI_COMMAND="DEL"),
                                  json.dumps(dict(conf, prevResult=result)).encode())
    assert rc == 0, out
    assert sorted(mods & set(HEAVY)) == []
    assert node.attachments() == [] and reservations(hl, name) == [] and set(links_in(pod)) == {"lo"}
