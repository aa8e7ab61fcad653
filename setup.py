"""Builds every Cython file of ext/ into one extension module, vswitch.datapath._core.

ext/_datapath.pyx includes one .pxi per concept (uvloop/msgpack style), so there is
exactly one compiled module and no ABI seam between the parts of the core.
"""
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

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
