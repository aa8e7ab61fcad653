"""Chooses the datapath implementation: the Cython core, or the pure-Python twin.

``VSWITCH_PURE_PYTHON=1`` selects the twin (``vswitch/datapath/pure.py``, the executable
spec); so does a missing build, with a warning. Everything else imports ``Datapath`` and
the constants from here.
"""
import os
import warnings

from vswitch.datapath.consts import *  # noqa: F401,F403  (the constants are part of this API)

IMPLEMENTATION = "py"
if os.environ.get("VSWITCH_PURE_PYTHON", "") not in ("", "0"):
    from vswitch.datapath.pure import Datapath
else:
    try:
        from vswitch.datapath._core import Datapath
        IMPLEMENTATION = "c"
    except ImportError as exc:  # pragma: no cover - depends on the build
        warnings.warn(f"vswitch: the Cython datapath is not built ({exc}); using the pure-Python twin",
                      RuntimeWarning, stacklevel=2)
        from vswitch.datapath.pure import Datapath

__all__ = ["Datapath", "IMPLEMENTATION"]
