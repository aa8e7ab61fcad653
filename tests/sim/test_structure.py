"""The simulation's seams, read from the source (AST): generators use the engine only through
``ENGINE_PROTOCOL``; the engine imports nothing of generators or simulation, not even lazily;
in vswitch/, only ``Switch.drain`` and ``Switch.drain_due`` call a datapath's ``drain``."""
import ast
import inspect
from pathlib import Path

import vswitch
from vswitch.sim import engine
from vswitch.sim.engine import ENGINE_PROTOCOL, Engine

PKG = Path(vswitch.__file__).resolve().parent
SIM = PKG / "sim"


def engine_uses(source: str) -> list[str]:
    """Problems in a traffic source's code: engine attributes outside ENGINE_PROTOCOL (on
    ``sim`` or ``x.sim``), private attributes of anything but ``self``, private imports."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            owner = node.value
            is_engine = (isinstance(owner, ast.Name) and owner.id == "sim") or (
                isinstance(owner, ast.Attribute) and owner.attr == "sim")
            if is_engine and node.attr not in ENGINE_PROTOCOL:
                bad.append(f"line {node.lineno}: {ast.unparse(node)} is not in ENGINE_PROTOCOL")
            elif node.attr.startswith("_") and not node.attr.startswith("__") and not (
                    isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                bad.append(f"line {node.lineno}: {ast.unparse(node)} is private to another object")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vswitch"):
            bad += [f"line {node.lineno}: imports {node.module}.{a.name}" for a in node.names
                    if a.name.startswith("_")]
    return bad


def test_generators_use_only_the_engine_protocol():
    assert engine_uses((SIM / "generators.py").read_text()) == []


def test_the_checker_sees_private_names_and_names_outside_the_protocol():
    src = ("from vswitch.sim.engine import _check_time\n"
           "def f(sim, tally):\n"
           "    sim._now = 5\n"
           "    sim.fdb()\n"
           "    tally.sim.trace(b'', 'a')\n"
           "    tally.sim.switch._ports\n"
           "    sim.port_id('a'); sim.send('a', b'x'); self._ok = 1\n")
    assert len(engine_uses(src)) == 5


def test_the_protocol_is_public_and_documented():
    for name in ENGINE_PROTOCOL:
        assert not name.startswith("_")
        if name in ("config", "switch"):          # instance attributes set in __init__
            assert f"self.{name} = " in inspect.getsource(Engine.__init__)
            continue
        member = inspect.getattr_static(Engine, name)
        assert inspect.getdoc(member if not isinstance(member, property) else member.fget), name


def _imported_modules(path):
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_the_engine_imports_nothing_built_on_it():
    for path in (SIM / "engine.py", SIM / "frames.py"):
        mods = _imported_modules(path)
        assert not {m for m in mods if m.startswith(("vswitch.sim.generators", "vswitch.sim.simulation"))}, path
    assert Path(engine.__file__).resolve() == SIM / "engine.py"


def test_only_the_switch_calls_a_datapath_drain():
    callers = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "drain":
                    callers.append((path.relative_to(PKG).as_posix(), fn.name))
    assert sorted(set(callers)) == [("switch.py", "drain"), ("switch.py", "drain_due")]
