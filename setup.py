"""Builds every Cython file of ext/ into one extension module, vswitch.datapath._core, and
the CNI client cni/client.c into the executable vswitch_cni/vswitch-client.

ext/_datapath.pyx includes one .pxi per concept (uvloop/msgpack style), so there is
exactly one compiled module and no ABI seam between the parts of the core. Before
cythonize, ext/consts.pxi (generated, not in git) is written from
vswitch/datapath/consts.py, the one place the datapath's constants and counters are
declared; both files are loaded by path, so nothing of the package is imported here.

The CNI client (theory of operation in cni/client.c) is plain C, not an extension: after
the extension, build_ext compiles it with the system C compiler (``CC``, else Python's
``CC``) into build_lib's vswitch_cni/ (so a wheel carries it as package data) and, with
--inplace (scripts/setup.sh, CI), copies it to cni/vswitch-client. It is linked statically
when the C library allows (a CNI bin dir is shared by hosts and images), else dynamically.
Two values are compiled in, taken from the source tree by a child interpreter (``-IS``,
the tree alone on its path: never an installed vswitch_cni): the bytes the Python plugin
prints for VERSION, ``dumps(version_info()) + "\\n"`` of cni/results.py, and
vswitch.rpc.DEFAULT_SOCKET.
"""
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name, relpath):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_load("_vswitch_gen_consts", "vswitch/datapath/gen_consts.py").write_pxi(
    _load("_vswitch_consts", "vswitch/datapath/consts.py"), os.path.join(HERE, "ext", "consts.pxi"))

extensions = [
    Extension(
        "vswitch.datapath._core",
        ["ext/_datapath.pyx"],
        include_dirs=[numpy.get_include(), "ext"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-fno-strict-aliasing", "--param", "max-inline-insns-single=2000", "--param", "inline-unit-growth=400", "--param", "large-function-growth=800"],
    )
]

CLIENT_SOURCE = os.path.join(HERE, "cni", "client.c")
CLIENT_NAME = "vswitch-client"          # cni/build.py's CLIENT_NAME, beside the plugin's modules
CLIENT_FLAGS = ["-std=c11", "-O2", "-Wall", "-Wextra"]

# run as `python -IS -c _CLIENT_VALUES HERE`: loads vswitch_cni from HERE/cni under its
# one name (cni/__init__.py refuses another) and prints the two compiled-in values
_CLIENT_VALUES = """
import json, sys
from importlib.util import module_from_spec, spec_from_file_location
root = sys.argv[1]
sys.path.insert(0, root)
spec = spec_from_file_location("vswitch_cni", root + "/cni/__init__.py",
                               submodule_search_locations=[root + "/cni"])
sys.modules["vswitch_cni"] = module_from_spec(spec)
spec.loader.exec_module(sys.modules["vswitch_cni"])
from vswitch_cni.results import dumps, version_info
from vswitch.rpc import DEFAULT_SOCKET
print(json.dumps([dumps(version_info()) + "\\n", DEFAULT_SOCKET]))
"""


def c_string(text):
    """``text`` (UTF-8) as a C string literal: printable ASCII as is, the rest in octal."""
    out = []
    for b in text.encode():
        c = chr(b)
        out.append("\\" + c if c in '"\\' else c if 0x20 <= b < 0x7f else "\\%03o" % b)
    return '"' + "".join(out) + '"'


def client_macros():
    """The -D options of the client: VSWITCH_VERSION_JSON and VSWITCH_DEFAULT_SOCKET."""
    p = subprocess.run([sys.executable, "-IS", "-c", _CLIENT_VALUES, HERE], capture_output=True,
                       text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"reading the CNI client's values from {HERE}/cni failed: {p.stderr.strip()[-800:]}")
    version_json, default_socket = json.loads(p.stdout)
    return [f"-DVSWITCH_VERSION_JSON={c_string(version_json)}",
            f"-DVSWITCH_DEFAULT_SOCKET={c_string(default_socket)}"]


def compile_client(out):
    """Compile cni/client.c to ``out`` (replaced by rename): static, else dynamic."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    base = [*cc, *CLIENT_FLAGS, *client_macros(), "-o", tmp, CLIENT_SOURCE]
    static = subprocess.run([*base, "-static"], capture_output=True, text=True)
    if static.returncode != 0:
        dynamic = subprocess.run(base, capture_output=True, text=True)
        if dynamic.returncode != 0:
            raise RuntimeError(f"compiling the CNI client {CLIENT_SOURCE} failed:\n{dynamic.stderr}"
                               f"(statically: {static.stderr.strip()[-400:]})")
        print(f"the CNI client is linked dynamically (static linking failed: "
              f"{static.stderr.strip()[-200:]})", file=sys.stderr)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)


class build_ext_and_client(build_ext):
    """build_ext, then the CNI client (see the module docstring)."""

    def _client_paths(self):
        """(the client in build_lib, the client in the source tree's cni/)."""
        return (os.path.join(self.build_lib, "vswitch_cni", CLIENT_NAME),
                os.path.join(HERE, "cni", CLIENT_NAME))

    def run(self):
        super().run()
        built, inplace = self._client_paths()
        compile_client(built)
        if self.inplace:
            shutil.copy2(built, inplace + ".tmp")
            os.replace(inplace + ".tmp", inplace)

    def get_outputs(self):
        return super().get_outputs() + [self._client_paths()[0]]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping.update([self._client_paths()])
        return mapping


setup(
    cmdclass={"build_ext": build_ext_and_client},
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
        include_path=["ext"],
    ),
)
