"""Builds every Cython file of ext/ into one extension module, vswitch.datapath._core.

ext/_datapath.pyx includes one .pxi per concept (uvloop/msgpack style), so there is
exactly one compiled module and no ABI seam between the parts of the core. Before
cythonize, ext/consts.pxi (generated, not in git) is written from
vswitch/datapath/consts.py, the one place the datapath's constants and counters are
declared; both files are loaded by path, so nothing of the package is imported here.
"""
import importlib.util
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

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

setup(
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
