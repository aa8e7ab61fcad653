"""The house: the folder tree shows the rooms, and no module imports another in a circle.

The import graph is read from the source (every ``import`` and ``from ... import``, also
those inside functions: a lazy import is still a dependency), over the project's own
packages: ``vswitch`` and the folders ``cni/`` and ``bench/`` (whatever name they are
installed under, imports of it are mapped back to the folder). A cycle of any length between
modules fails, and so does a pair of subpackages that import each other.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# folder -> the names it may be imported under
ROOTS = {"vswitch": ("vswitch",), "cni": ("cni", "vswitch_cni"), "bench": ("bench", "vswitch_bench")}
ROOMS = ["vswitch/datapath", "vswitch/daemon", "vswitch/sim", "vswitch/lab", "vswitch/cluster", "cni",
         "bench"]


def _modules():
    """dotted name (folder spelling) -> path, for every module of the project."""
    mods = {}
    for folder in ROOTS:
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _canonical(name):
    head, _, rest = name.partition(".")
    for folder, names in ROOTS.items():
        if head in names:
            return folder + ("." + rest if rest else "")
    return None


def _is_type_checking(node):
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name, path, mods):
    """The project modules that module ``name`` imports."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    skip = {id(n) for top in ast.walk(tree) if _is_type_checking(top) for n in ast.walk(top)}
    out = set()

    def add(target):
        target = _canonical(target) if target else None
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            if _canonical(mod) is None:
                continue
            for a in node.names:
                sub = f"{_canonical(mod)}.{a.name}"
                add(sub if sub in mods else mod)
    return out


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_folder_tree_shows_the_rooms():
    for room in ROOMS:
        assert (REPO / room / "__init__.py").is_file(), f"{room}/ is not a package"
    flat = sorted(p.name for p in (REPO / "vswitch").glob("*.py"))
    # at the top: the protocol, the values, the switch, the CLI and the shared CNI types only
    assert len(flat) <= 8, f"vswitch/ holds {len(flat)} modules at the top: {flat}"


def test_no_module_imports_another_in_a_circle():
    assert _cycles(_graph()) == []


def test_no_two_rooms_import_each_other():
    graph = _graph()

    def room(mod):
        parts = mod.split(".")   # a subpackage or a top-level module of vswitch is a room
        return ".".join(parts[:2]) if parts[0] == "vswitch" else parts[0]

    edges = {(room(a), room(b)) for a, bs in graph.items() for b in bs if room(a) != room(b)}
    both = sorted((a, b) for a, b in edges if (b, a) in edges and a < b)
    assert both == []


def test_the_checker_finds_a_circle():
    """The cycle finder itself: a three-module loop and a self-contained chain."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
