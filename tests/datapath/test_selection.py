"""One place decides the implementation (vswitch.datapath), and a missing build is an error.

``VSWITCH_PURE_PYTHON=1`` selects the twin; otherwise the Cython core is required by the
selection, the Switch, the daemon's packet I/O and vswitchd itself: a core that cannot be
imported, or lacks a part (BatchIO), raises BuildError (vswitchd: exit 2 with the message)
instead of falling back to the twin.
"""
import os
import sys
import types
from pathlib import Path

import pytest

from vswitch import datapath

REPO = Path(__file__).resolve().parents[2]
# makes vswitch.datapath._core unimportable in a child process, as a missing build does
NO_BUILD = "import sys; sys.modules['vswitch.datapath._core'] = None\n"
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="vswitchd needs root, /dev/net/tun and network namespaces")


@pytest.mark.parametrize("value,impl", [(None, "c"), ("", "c"), ("0", "c"), ("1", "py"), ("yes", "py")])
def test_the_environment_variable_decides(monkeypatch, value, impl):
    if value is None:
        monkeypatch.delenv("VSWITCH_PURE_PYTHON", raising=False)
    else:
        monkeypatch.setenv("VSWITCH_PURE_PYTHON", value)
    assert datapath.implementation() == impl
    assert datapath.IMPLEMENTATION == impl
    assert datapath.module().__name__ == {"c": "vswitch.datapath._core", "py": "vswitch.datapath.pure"}[impl]
    assert datapath.Datapath is datapath.module().Datapath


def test_an_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="one of c, py, got 'rust'"):
        datapath.module("rust")


@pytest.fixture
def no_build(monkeypatch):
    monkeypatch.delenv("VSWITCH_PURE_PYTHON", raising=False)
    monkeypatch.setitem(sys.modules, "vswitch.datapath._core", None)


@pytest.fixture
def partial_build(monkeypatch):
    """A core module with a Datapath but without BatchIO."""
    monkeypatch.delenv("VSWITCH_PURE_PYTHON", raising=False)
    fake = types.ModuleType("vswitch.datapath._core")
    fake.Datapath = object
    fake.__file__ = "/nowhere/_core.so"
    monkeypatch.setitem(sys.modules, "vswitch.datapath._core", fake)


def test_a_missing_build_is_an_error_everywhere(no_build):
    from vswitch.daemon.ports import PacketIO
    from vswitch.switch import Switch
    for make in (datapath.module, lambda: datapath.Datapath, Switch, lambda: PacketIO(max_ports=4)):
        with pytest.raises(datapath.BuildError, match="cannot be imported.*VSWITCH_PURE_PYTHON=1"):
            make()


def test_a_partial_build_is_an_error_everywhere(partial_build):
    from vswitch.daemon.ports import PacketIO
    from vswitch.switch import Switch
    for make in (datapath.module, Switch, lambda: PacketIO(max_ports=4)):
        with pytest.raises(datapath.BuildError, match="partial: it lacks BatchIO"):
            make()


def test_the_twin_asked_for_runs_without_a_build(no_build, monkeypatch):
    from vswitch.daemon.ports import PacketIO
    from vswitch.switch import Switch
    monkeypatch.setenv("VSWITCH_PURE_PYTHON", "1")
    assert type(Switch().dp).__module__ == "vswitch.datapath.pure"
    assert PacketIO(max_ports=4).impl == "py"


def _daemon_without_build(ns, tmp_path, pure):
    """lab.Daemon in ns whose vswitch.datapath._core cannot be imported (a sitecustomize
    first on its path hides it, as a missing build does)."""
    from vswitch import lab
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_BUILD)
    d = lab.Daemon(ns, tmp_path / "d", env={"VSWITCH_PURE_PYTHON": "1" if pure else "0"})
    d.env["PYTHONPATH"] = f"{site}{os.pathsep}{REPO}"
    return d


@pytest.mark.integration
@needs_root
def test_vswitchd_without_a_build_exits_with_the_reason(tmp_path):
    from vswitch import lab
    with lab.Namespaces("vsnb") as nss:
        d = _daemon_without_build(nss.new("n"), tmp_path, pure=False)
        with pytest.raises(RuntimeError, match="exited with 2") as info:
            d.start()
        d.stop()
    assert "vswitchd: the Cython datapath (vswitch.datapath._core) cannot be imported" in str(info.value)
    assert "VSWITCH_PURE_PYTHON=1" in str(info.value)


@pytest.mark.integration
@needs_root
def test_vswitchd_without_a_build_runs_the_twin_when_asked(tmp_path):
    """The daemon starts and answers on the twin and the Python I/O loop, with no build."""
    from vswitch import lab
    with lab.Namespaces("vsnb") as nss:
        d = _daemon_without_build(nss.new("n"), tmp_path, pure=True)
        try:
            status = d.start().call("status")
        finally:
            rc = d.stop()
    assert status["ok"] and status["datapath"] == "vswitch.datapath.pure" and status["io"] == "py"
    assert rc == 0
