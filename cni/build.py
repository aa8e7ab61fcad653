"""Build the relocatable Python plugin: one file, ``vswitch-py`` in a CNI bin directory (or
``vswitch`` itself with ``install-cni --form python``); and find the built C client.

The C client (cni/client.c, compiled by setup.py's build_ext into this package's folder as
``vswitch-client``) is what ``install-cni`` writes as ``vswitch``: it forwards each
invocation to vswitchd and executes ``vswitch-py`` beside itself (``FALLBACK_NAME``)
whenever the daemon cannot take it. :func:`client_path` finds it; nothing here compiles it.

Theory of operation: the file is a shell prelude followed by a zip archive (Python reads a
zip from its end, so anything may precede it). The prelude is three lines for ``/bin/sh``:
if no ``python3`` is on PATH it prints a CNI error (code 117) and exits 1; otherwise it
``exec``s ``python3 -IS -c BOOT "$0"``: isolated (no PYTHON* variables, no user site, no
current directory on sys.path) and without ``site`` (whose .pth processing costs tens of
milliseconds per pod), which ``#!/usr/bin/env python3`` could not ask for. The shell never
reads past the ``exec`` line. ``BOOT`` puts the file itself on sys.path and imports
``vswitch_cni_boot`` from it. That module is written for any Python 3: below 3.9 it prints a
CNI error (code 117) naming the version found; otherwise it puts the archive's precompiled
tree for this interpreter (``cpython-311/``, from ``sys.implementation.cache_tag``) in front
of the sources and runs ``vswitch_cni.plugin.main``, then leaves with ``os._exit`` once
stdout and stderr are flushed (the interpreter's teardown, freeing every module, costs ~2 ms
per pod and does nothing the plugin needs). zipimport cannot write bytecode, so
without that tree every run would compile the plugin again (about 25 ms); the tree is built
with the interpreter running this builder (pass ``compile_with`` for more), and any other
Python >= 3.9 runs the sources. ``python3 FILE`` also works (the archive's ``__main__``).

Contents: the stdlib-only modules the plugin imports, listed once in ``MODULES``
(tests/cni/test_zipapp.py checks the list against the imports it finds). The archive is
reproducible: entries sorted, a fixed date, stored uncompressed, bytecode with unchecked
hashes; the same sources and interpreter give the same bytes, so reinstalling changes no
file (cni/install.py relies on that).

``python -m vswitch_cni.build OUT`` (or ``vswitchctl build-cni OUT``) writes the file;
``--python PATH`` pins an interpreter instead of the prelude (``#!PATH -IS``).
"""
import argparse
import io
import os
import subprocess
import sys
import tempfile
import zipfile

# name in the archive -> (package, file) of this installation; everything the plugin imports
# beyond the standard library (tests/cni/test_zipapp.py checks it is complete)
MODULES = {
    "vswitch/__init__.py": ("vswitch", "__init__.py"),
    "vswitch/rpc.py": ("vswitch", "rpc.py"),
    "vswitch/cnitypes.py": ("vswitch", "cnitypes.py"),
    "vswitch/fastjson.py": ("vswitch", "fastjson.py"),
    "vswitch_cni/__init__.py": ("vswitch_cni", "__init__.py"),
    "vswitch_cni/conf.py": ("vswitch_cni", "conf.py"),
    "vswitch_cni/errors.py": ("vswitch_cni", "errors.py"),
    "vswitch_cni/ipam.py": ("vswitch_cni", "ipam.py"),
    "vswitch_cni/plugin.py": ("vswitch_cni", "plugin.py"),
    "vswitch_cni/results.py": ("vswitch_cni", "results.py"),
}
CLIENT_NAME = "vswitch-client"  # the C client in this package's folder (setup.py's CLIENT_NAME)
FALLBACK_NAME = "vswitch-py"    # the Python plugin's name beside the client (cni/client.c's)
MIN_PYTHON = (3, 9)
HOST_PYTHON_ERROR = 117     # CNI error code: the host's python3 is missing or too old
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

BOOT = '''"""Starts the vswitch CNI plugin from this archive (cni/build.py); any Python 3 reads it."""
import sys
if sys.version_info < %(min)r:
    sys.stdout.write('{"cniVersion": "1.0.0", "code": %(code)d, "msg": "the vswitch CNI plugin '
                     'needs Python %(min_text)s or later; %%s is %%d.%%d"}\\n'
                     %% (sys.executable.replace("\\\\", "/").replace('"', "'"),
                        sys.version_info[0], sys.version_info[1]))
    sys.exit(1)
_archive = sys.path[0]
_tag = getattr(sys.implementation, "cache_tag", None)
if _tag:
    sys.path.insert(0, _archive + "/" + _tag)
from vswitch_cni.plugin import main
_rc = main()
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(_rc or 0)     # no interpreter teardown (~2 ms): main wrote and flushed everything
'''

MAIN = "import vswitch_cni_boot  # python3 FILE: the same start as the prelude's\n"

PRELUDE = """#!/bin/sh
# vswitch CNI plugin {version}: these lines start the host's python3 (3.9 or later) on the zip archive that follows (cni/build.py)
command -v python3 >/dev/null 2>&1 || {{ echo '{{"cniVersion": "1.0.0", "code": {code}, "msg": "the vswitch CNI plugin needs python3 (3.9 or later) on PATH; none found"}}'; exit 1; }}
exec python3 -IS -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); import vswitch_cni_boot' "$0" "$@"
"""


def _sources():
    """{name in the archive: source bytes} of MODULES, read from where this process
    imported the packages (a checkout or site-packages)."""
    import vswitch
    import vswitch_cni
    roots = {"vswitch": os.path.dirname(os.path.abspath(vswitch.__file__)),
             "vswitch_cni": os.path.dirname(os.path.abspath(vswitch_cni.__file__))}
    out = {}
    for name, (pkg, fname) in MODULES.items():
        with open(os.path.join(roots[pkg], fname), "rb") as f:
            out[name] = f.read()
    out["vswitch_cni_boot.py"] = (BOOT % {"min": MIN_PYTHON, "code": HOST_PYTHON_ERROR,
                                           "min_text": "%d.%d" % MIN_PYTHON}).encode()
    out["__main__.py"] = MAIN.encode()
    return out


_COMPILE = r"""
import importlib.util, marshal, os, py_compile, sys
src, out = sys.argv[1], sys.argv[2]
for dirpath, _, files in os.walk(src):
    for f in files:
        rel = os.path.relpath(os.path.join(dirpath, f), src)
        if not f.endswith(".py") or rel in ("__main__.py", "vswitch_cni_boot.py"):
            continue
        dest = os.path.join(out, rel[:-3] + ".pyc")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        py_compile.compile(os.path.join(dirpath, f), cfile=dest, dfile=rel, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
print(sys.implementation.cache_tag)
"""


def _compiled(sources, python):
    """{name: bytes} of the bytecode tree ``python`` makes of ``sources``, under its cache
    tag (``cpython-311/vswitch_cni/plugin.pyc``)."""
    with tempfile.TemporaryDirectory(prefix="vswitch-cni-build.") as tmp:
        src, out = os.path.join(tmp, "src"), os.path.join(tmp, "out")
        for name, data in sources.items():
            path = os.path.join(src, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        p = subprocess.run([python, "-IS", "-c", _COMPILE, src, out], capture_output=True,
                           text=True, timeout=120)
        if p.returncode != 0:
            raise ValueError(f"compiling the plugin with {python} failed: {p.stderr.strip()[-500:]}")
        tag = p.stdout.strip()
        found = {}
        for dirpath, _, files in os.walk(out):
            for f in files:
                path = os.path.join(dirpath, f)
                with open(path, "rb") as fh:
                    found[f"{tag}/{os.path.relpath(path, out)}"] = fh.read()
        return found


def client_path():
    """The built C client beside these modules (a checkout: cni/vswitch-client, after
    ``python setup.py build_ext --inplace``; a wheel: vswitch_cni/vswitch-client), or None
    when it was not built."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), CLIENT_NAME)
    return path if os.path.isfile(path) and os.access(path, os.X_OK) else None


def shebang_for(python=None):
    """The text before the archive: the /bin/sh prelude (``python`` None: the host's python3
    from PATH), or ``#!PYTHON -IS`` for an interpreter given by absolute path."""
    if python is None:
        from vswitch import __version__
        return PRELUDE.format(version=__version__, code=HOST_PYTHON_ERROR)
    if not os.path.isabs(python) or any(c.isspace() for c in python):
        raise ValueError(f"--python {python!r}: give the interpreter's absolute path without "
                         f"spaces (like /usr/bin/python3), or leave it out for python3 from PATH")
    return f"#!{python} -IS\n"


def build_bytes(python=None, compile_with=(sys.executable,), shebang=None):
    """The plugin file's bytes. ``python``: see :func:`shebang_for`; ``compile_with``:
    interpreters whose bytecode trees to include (default: this one); ``shebang``: the
    whole first part verbatim instead (benchmarks use ``#!/usr/bin/env python3``)."""
    head = shebang if shebang is not None else shebang_for(python)
    sources = _sources()
    entries = dict(sources)
    for py in compile_with:
        entries.update(_compiled({n: d for n, d in sources.items() if n.endswith(".py")}, py))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.create_system = 3      # unix, whatever the builder
            z.writestr(info, entries[name])
    return head.encode() + buf.getvalue()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data, mode):
    """Write ``data`` (bytes or str) to ``path``: a hidden temp file in the same directory
    (no name a runtime loads), fsync, chmod, rename over ``path``, fsync of the directory."""
    if isinstance(data, str):
        data = data.encode()
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _fsync_dir(directory)


def build(out, python=None, compile_with=(sys.executable,)):
    """Write the plugin to ``out`` (mode 0755, atomically); returns its path."""
    write_atomic(out, build_bytes(python, compile_with), 0o755)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="vswitchctl build-cni",
        description="Write the relocatable vswitch CNI plugin: one file, a /bin/sh prelude and a "
                    "zip archive, run by the host's python3 (3.9 or later).")
    parser.add_argument("out", help="the file to write, like /opt/cni/bin/vswitch")
    parser.add_argument("--python", help="pin this interpreter (#!PATH -IS) instead of python3 from PATH")
    parser.add_argument("--compile-with", action="append", default=[], metavar="PYTHON",
                        help="also include bytecode made by this interpreter (repeatable); "
                             "this one's is always included")
    args = parser.parse_args(argv)
    try:
        build(args.out, args.python, (sys.executable, *args.compile_with))
    except (ValueError, OSError) as exc:
        print(f"build-cni: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
