"""The package's import graph, read from the source with `ast`: no import cycles and no private name imported
from another module — the layout stays a pipeline of stages instead of a knot (issue 11).

What counts as an edge of the graph (module A -> module B means "running A can run B's import"):
- every `import hf_mudsc.x` / `from hf_mudsc.x import y` anywhere in A — at module level, inside functions and
  methods (lazy imports still run, just later), inside `try`/`if` blocks; when `y` is a submodule of `hf_mudsc.x`
  the edge goes to that submodule too;
- importing `hf_mudsc.a.b` first runs the package `__init__` of `hf_mudsc.a`: a package's `__init__` is a module of
  its own (named `hf_mudsc.a`), and every package on the imported path is an edge — except the importer's own
  ancestor packages, which Python has already started before the importer runs (an explicit
  `from hf_mudsc.a import name` inside `hf_mudsc/a/b.py` is still an edge to `hf_mudsc.a`);
- NOT imports under `if TYPE_CHECKING:` — they never run, so they cannot form a runtime cycle, and they are how
  annotations name a type without importing its module (the private-name rule applies to them all the same);
- `importlib.import_module("hf_mudsc.x")` with the name written out as a literal is an import like any other;
- NOT the lazy exports of `hf_mudsc/__init__.py` (`importlib.import_module` on a module name looked up in a
  table): they run when a user touches `hf_mudsc.merge`, never while a module of the package is being imported.
- a package `__init__` that discovers its submodules (`pkgutil.iter_modules` / `walk_packages`) imports every
  submodule of the package: a plug-in that imports its registry from that `__init__` closes a cycle (keep the
  registry in a submodule of its own instead).

A private name is one with a single leading underscore (`_x`); dunders (`__version__`) are public. Importing a
private module by path (`hf_mudsc._version`) is allowed; importing a private NAME from another module is not:
make the helper public where it lives.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "hf_mudsc"
DISCOVERY = ("iter_modules", "walk_packages")  # in a package `__init__`: imports of all its submodules
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


@dataclass(frozen=True)
class Import:
    """One imported module (and, for `from` imports, one imported name) at one line of one file."""

    importer: str
    target: str
    name: str | None
    where: str  # file:line, relative to the folder that holds the package
    type_checking: bool


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> source file; a package is named by its `__init__.py`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def is_type_checking_test(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "TYPE_CHECKING") or (
        isinstance(node, ast.Attribute) and node.attr == "TYPE_CHECKING"
    )


def resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(importer: str, path: Path, root: Path = ROOT) -> list[Import]:
    """Every import statement in the file, wherever it sits, marked when it is under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Import] = []
    relative = path.relative_to(root.parent).as_posix()

    def where(node: ast.stmt | ast.expr) -> str:
        return f"{relative}:{node.lineno}"

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking_test(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(importer, alias.name, None, where(node), type_checking))
        elif isinstance(node, ast.ImportFrom):
            target = (
                resolve_relative(importer, path.name == "__init__.py", node.level, node.module)
                if node.level
                else node.module or ""
            )
            for alias in node.names:
                found.append(Import(importer, target, alias.name, where(node), type_checking))
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(importer, node.args[0].value, None, where(node), type_checking))
        elif (
            isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in DISCOVERY
            and path.name == "__init__.py"
        ):
            found.append(Import(importer, f"{importer}.*", None, where(node), type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(tree, False)
    return found


def all_imports(root: Path = ROOT) -> list[Import]:
    return [item for name, path in module_names(root).items() for item in imports_of(name, path, root)]


def ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def edges_of(item: Import, modules: set[str]) -> set[str]:
    """The package modules that running this import statement can start."""
    if item.target != PACKAGE and not item.target.startswith(PACKAGE + "."):
        return set()
    if item.target.endswith(".*"):  # a package discovering its submodules imports every one of them
        prefix = item.target[:-1]
        return {name for name in modules if name.startswith(prefix)}
    own = set(ancestors(item.importer))
    if item.name and f"{item.target}.{item.name}" in modules:
        # `from pkg import submodule` runs pkg's `__init__` only as the submodule's parent (rule above)
        targets = {f"{item.target}.{item.name}"}
    else:
        targets = {item.target} if item.target in modules else set()
    started = set()
    for target in targets:
        started.add(target)
        started.update(parent for parent in ancestors(target) if parent not in own)
    started.discard(item.importer)
    return started


def import_graph(imports: list[Import], root: Path = ROOT) -> dict[str, dict[str, Import]]:
    """Module -> {imported module: the first import statement that makes the edge}; TYPE_CHECKING excluded."""
    modules = set(module_names(root))
    graph: dict[str, dict[str, Import]] = {name: {} for name in modules}
    for item in imports:
        if item.type_checking:
            continue
        for target in sorted(edges_of(item, modules)):
            graph[item.importer].setdefault(target, item)
    return graph


def find_cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The shortest cycle through each module that sits on one (strongly connected components by Tarjan, then a
    breadth-first search per member), each as a closed path `a -> b -> ... -> a` starting at its smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles: list[list[str]] = []
    for component in components:
        for start in component:
            cycle = closed_path(graph, component, start)[:-1]
            first = cycle.index(min(cycle))
            cycle = cycle[first:] + cycle[:first]
            if cycle + [cycle[0]] not in cycles:
                cycles.append(cycle + [cycle[0]])
    return sorted(cycles)


def closed_path(graph: dict[str, dict[str, Import]], component: list[str], start: str) -> list[str]:
    """A shortest cycle through `start` (breadth-first inside its strongly connected component)."""
    members = set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node]):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")  # pragma: no cover - Tarjan guarantees one


def describe(graph: dict[str, dict[str, Import]], cycle: list[str]) -> str:
    steps = []
    for here, there in zip(cycle, cycle[1:]):
        item = graph[here][there]
        steps.append(f"{here} -> {there} ({item.where})")
    return "; ".join(steps)


def private_imports(imports: list[Import], root: Path = ROOT) -> list[str]:
    """`file:line: name from module` for every private name imported from another module."""
    modules = set(module_names(root))
    found = []
    for item in imports:
        if item.name is None or not item.name.startswith("_") or item.name.startswith("__"):
            continue
        if item.target == item.importer or f"{item.target}.{item.name}" in modules:
            continue  # a module's own names, or a private submodule imported by path
        found.append(f"{item.where}: {item.name} from {item.target}")
    return found


def dotted(node: ast.expr) -> str | None:
    """`a.b.c` for a chain of attribute look-ups on a plain name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def private_attribute_uses(root: Path = ROOT) -> list[str]:
    """`file:line: name from module` for `module._x` where `module` was bound by importing a package module —
    the same reach into another module's private helpers, spelled as an attribute."""
    modules = module_names(root)
    found = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bound: dict[str, str] = {}  # local name -> package module it stands for (per file: lazy imports included)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        head = alias.name.split(".")[0]
                        bound[head] = head
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in modules:
                        bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
                continue
            chain = dotted(node.value)
            if chain is None or chain.split(".")[0] not in bound:
                continue
            head, _, rest = chain.partition(".")
            module = bound[head] + (f".{rest}" if rest else "")
            if module in modules and module != importer:
                where = f"{path.relative_to(root.parent).as_posix()}:{node.lineno}"
                found.append(f"{where}: {node.attr} from {module}")
    return found


# --- the rules ---------------------------------------------------------------------------------------------


def test_the_package_has_no_import_cycle():
    graph = import_graph(all_imports())
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (break them by moving the shared code down a stage):\n" + "\n".join(
        describe(graph, cycle) for cycle in cycles
    )


def test_no_private_name_is_imported_from_another_module():
    found = private_imports(all_imports()) + private_attribute_uses()
    assert not found, "private names imported across modules (make them public where they live):\n" + "\n".join(found)


# --- the checker itself: each rule fires on a small package written for the purpose ------------------------


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "options.py": "def check():\n    from hf_mudsc.methods import registry\n",
            "methods/__init__.py": "",
            "methods/registry.py": "import os\n\nfrom hf_mudsc.options import OPTIONS\n",
        },
    )
    graph = import_graph(all_imports(root), root)
    assert find_cycles(graph) == [["hf_mudsc.methods.registry", "hf_mudsc.options", "hf_mudsc.methods.registry"]]
    assert describe(graph, find_cycles(graph)[0]) == (
        "hf_mudsc.methods.registry -> hf_mudsc.options (hf_mudsc/methods/registry.py:3); "
        "hf_mudsc.options -> hf_mudsc.methods.registry (hf_mudsc/options.py:2)"
    )


def test_checker_treats_a_package_init_as_a_module(tmp_path):
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "architectures/__init__.py": (
                "import importlib\nREGISTRY = {}\nimportlib.import_module('hf_mudsc.architectures.vit')\n"
            ),
            "architectures/vit.py": "from hf_mudsc.architectures import REGISTRY\n",
            "solve/__init__.py": "from hf_mudsc.load.parents import load\n",
            "solve/loop.py": "",
            "load/__init__.py": "",
            "load/parents.py": "from hf_mudsc.solve.loop import run\n",
        },
    )
    graph = import_graph(all_imports(root), root)
    assert find_cycles(graph) == [
        ["hf_mudsc.architectures", "hf_mudsc.architectures.vit", "hf_mudsc.architectures"],
        # importing solve.loop runs solve/__init__, which imports load.parents
        ["hf_mudsc.load.parents", "hf_mudsc.solve", "hf_mudsc.load.parents"],
    ]


def test_checker_ignores_type_checking_imports_for_cycles_but_not_for_private_names(tmp_path):
    root = write_package(
        tmp_path,
        {
            "__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hf_mudsc.a import _A\n",
            "a.py": (
                "import typing\nif typing.TYPE_CHECKING:\n    import hf_mudsc\n"
                "from hf_mudsc._version import __version__\n"
            ),
            "_version.py": "__version__ = '1'\n",
            "b.py": "def f():\n    from hf_mudsc.a import _helper as helper\n    return helper\n",
        },
    )
    imports = all_imports(root)
    assert find_cycles(import_graph(imports, root)) == []
    assert private_imports(imports, root) == [
        "hf_mudsc/__init__.py:3: _A from hf_mudsc.a",
        "hf_mudsc/b.py:2: _helper from hf_mudsc.a",
    ]


def test_checker_finds_a_private_helper_reached_through_a_module_attribute(tmp_path):
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "calibrate/__init__.py": "",
            "calibrate/statistics.py": "def _as_tensor(x):\n    return x._data\n",
            "evaluate.py": (
                "import hf_mudsc.calibrate.statistics\n"
                "from hf_mudsc.calibrate import statistics as stats\n"
                "def f(x):\n"
                "    return stats._as_tensor(x), hf_mudsc.calibrate.statistics._as_tensor(x), x._private\n"
            ),
        },
    )
    assert private_attribute_uses(root) == [
        "hf_mudsc/evaluate.py:4: _as_tensor from hf_mudsc.calibrate.statistics",
        "hf_mudsc/evaluate.py:4: _as_tensor from hf_mudsc.calibrate.statistics",
    ]


def test_checker_counts_submodule_discovery_as_importing_every_submodule(tmp_path):
    root = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "architectures/__init__.py": (
                "import importlib, pkgutil\n"
                "for info in pkgutil.iter_modules(__path__):\n"
                "    importlib.import_module(f'{__name__}.{info.name}')\n"
            ),
            "architectures/registry.py": "REGISTRY = {}\n",
            "architectures/vit.py": "from hf_mudsc.architectures.registry import REGISTRY\n",
            "architectures/bert.py": "from hf_mudsc.architectures import registry\n",
        },
    )
    graph = import_graph(all_imports(root), root)
    assert sorted(graph["hf_mudsc.architectures"]) == [
        "hf_mudsc.architectures.bert",
        "hf_mudsc.architectures.registry",
        "hf_mudsc.architectures.vit",
    ]
    assert find_cycles(graph) == []  # registry in a submodule of its own: no cycle
    (root / "architectures" / "vit.py").write_text("from hf_mudsc.architectures import REGISTRY\n", encoding="utf-8")
    assert find_cycles(import_graph(all_imports(root), root)) == [
        ["hf_mudsc.architectures", "hf_mudsc.architectures.vit", "hf_mudsc.architectures"]
    ]
