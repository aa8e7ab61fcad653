"""The one place that decides which datapath implementation runs.

Theory of operation
-------------------
Two implementations of docs/datapath.md exist: the Cython core ``vswitch.datapath._core``
(with ``BatchIO``, the daemon's packet loop, ``ext/io.pxi``) and the pure-Python twin
``vswitch.datapath.pure`` (the executable spec; the daemon then runs its Python I/O loop,
``vswitch.daemon.ports``). ``VSWITCH_PURE_PYTHON=1`` selects the twin; otherwise the core
is required: a missing, partial or stale build raises :class:`BuildError` wherever an
implementation is asked for. There is no silent fallback.

Everything else asks here: :func:`implementation` for the name (``"c"`` or ``"py"``),
:func:`module` for the implementation's module (``Datapath``, and for ``"c"``
``BatchIO``), ``vswitch.datapath.Datapath`` / ``IMPLEMENTATION`` as a shorthand.
Nothing is imported until asked for, so ``import vswitch.datapath`` (and its ``consts``)
imports neither numpy nor the extension.
"""
import importlib
import os

from vswitch.datapath.consts import *  # noqa: F401,F403  (the constants are part of this API)

ENV = "VSWITCH_PURE_PYTHON"
IMPLEMENTATIONS = ("c", "py")
_MODULES = {"c": "vswitch.datapath._core", "py": "vswitch.datapath.pure"}
_REQUIRED = {"c": ("Datapath", "BatchIO"), "py": ("Datapath",)}


class BuildError(ImportError):
    """The Cython core is required but missing, partial or stale."""


def implementation() -> str:
    """``"py"`` when ``VSWITCH_PURE_PYTHON`` is set to anything but ``""`` or ``"0"``, else ``"c"``."""
    return "py" if os.environ.get(ENV, "") not in ("", "0") else "c"


def module(impl: str | None = None):
    """The module of implementation ``impl`` (``"c"``, ``"py"``; None: :func:`implementation`).

    Raises :class:`BuildError` when the Cython core cannot be imported or lacks one of its
    parts, saying how to build it or how to ask for the twin instead.
    """
    if impl is None:
        impl = implementation()
    if impl not in _MODULES:
        raise ValueError(f"datapath implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {impl!r}")
    try:
        mod = importlib.import_module(_MODULES[impl])
    except ImportError as exc:
        if impl != "c":
            raise
        raise BuildError(
            f"the Cython datapath ({_MODULES['c']}) cannot be imported: {exc}. Build it with "
            f"`python setup.py build_ext --inplace` (or `pip install -e .`), or set {ENV}=1 to "
            "run the pure-Python twin instead") from exc
    missing = [name for name in _REQUIRED[impl] if not hasattr(mod, name)]
    if missing:
        raise BuildError(f"the datapath build {mod.__file__} is partial: it lacks {', '.join(missing)}; "
                         f"rebuild it (`python setup.py build_ext --inplace`) or set {ENV}=1")
    return mod


def __getattr__(name):
    if name == "Datapath":
        return module().Datapath
    if name == "IMPLEMENTATION":
        return implementation()
    from vswitch.datapath import consts
    if name in ("FDB_DTYPE", "CT_DTYPE"):
        return getattr(consts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
