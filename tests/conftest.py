"""Fixtures shared by every test directory.

``dp_impl`` runs a test against both datapath implementations, ids ``py`` and ``c``
(aiohttp's py-parser / c-parser pattern), as ``vswitch.datapath.module`` gives them. The
Cython one is required: a missing or partial build is a test failure, not a skip, unless
VSWITCH_ALLOW_NO_BUILD=1.
"""
import os

import pytest


def _load(impl):
    from vswitch import datapath
    try:
        return datapath.module(impl)          # the one selection; BuildError when missing/partial
    except datapath.BuildError as exc:
        if os.environ.get("VSWITCH_ALLOW_NO_BUILD") == "1":
            pytest.skip(f"Cython datapath not built: {exc}")
        raise


@pytest.fixture(params=["py", "c"])
def dp_impl(request):
    """The module of one implementation; ``dp_impl.Datapath(...)`` builds a datapath."""
    return _load(request.param)


@pytest.fixture
def both_impls():
    """Both modules, for differential tests: (python_module, cython_module)."""
    return _load("py"), _load("c")
