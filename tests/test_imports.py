"""No import circles under toyjax/: no module imports one that imports it back, at any depth.

Every module is parsed (not imported) with ast, so imports inside functions and `importlib.import_module("...")`
with a literal name count as much as top-level ones. An edge A -> B means running A can import B:
`import B`, `from B import x` (-> B.x when that is a module, else B), a relative import, or a literal
import_module / __import__ call. Imports under `if TYPE_CHECKING:` never run and are left out. Importing `a.b.c` also runs the packages `a` and `a.b`; those implicit edges
count too, except to the importer's own enclosing packages (a package's __init__ importing its submodules, which
import their siblings, is the usual layout, not a circle).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

def module_names(root: Path, package: str) -> dict[str, Path]:
    """Returns {dotted module name: file} for every .py file of a package folder (`pkg/__init__.py` is `pkg`)."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def runtime_nodes(tree: ast.AST):
    """Yields every node of tree except those inside `if TYPE_CHECKING:` blocks (annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Returns the dotted names a module's code can import, at any depth (absolute; `from X import y` gives X.y and X)."""
    out = set()
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in ("import_module", "__import__"):
                out.add(node.args[0].value)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Returns {module: modules of the package it can import}, implicit parent packages included (see the docstring)."""
    modules = module_names(root, package)
    graph = {}
    for module, path in modules.items():
        names = imported_names(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py")
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        targets = set()
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the module and every package above it
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix not in own_packages:
                    targets.add(prefix)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """Returns one cycle as [a, b, ..., a] (depth-first search), or None when the graph has none."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_toyjax_has_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT, "toyjax"))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_importing_toyjax_bert_pulls_in_no_cycle():
    graph = import_graph(ROOT, "toyjax")
    reachable, todo = set(), ["toyjax.bert"]
    while todo:
        node = todo.pop()
        if node not in reachable:
            reachable.add(node)
            todo += graph[node]
    assert find_cycle({node: graph[node] & reachable for node in reachable}) is None
    assert {"toyjax.bert.model", "toyjax.bert.candidates", "toyjax.bert.heads"} <= reachable


# -------------------------------------------------------------------------- the checker on a made-up package
def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.mark.parametrize("files, cycle", [
    # an import inside a function still closes a circle
    ({"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "def f():\n    from pkg import a\n"},
     ["pkg.a", "pkg.b", "pkg.a"]),
    # importlib with a literal name, and a relative import, three modules long
    ({"pkg/__init__.py": "", "pkg/a.py": "from . import b\n", "pkg/b.py": "from .c import x\n",
      "pkg/c.py": "import importlib\ndef g():\n    importlib.import_module('pkg.a')\n"},
     ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]),
    # importing pkg.sub.m runs pkg/sub/__init__.py, which imports pkg.other back
    ({"pkg/__init__.py": "", "pkg/sub/__init__.py": "from pkg import other\n", "pkg/sub/m.py": "",
      "pkg/other.py": "def f():\n    from pkg.sub.m import y\n"},
     ["pkg.other", "pkg.sub", "pkg.other"]),
])
def test_checker_finds_cycles_at_any_depth(tmp_path, files, cycle):
    write_package(tmp_path, files)
    assert find_cycle(import_graph(tmp_path, "pkg")) == cycle


def test_checker_accepts_a_package_init_importing_its_submodules(tmp_path):
    write_package(tmp_path, {"pkg/__init__.py": "from pkg.a import f\nfrom pkg import b\n",
                             "pkg/a.py": "from pkg.b import g\n", "pkg/b.py": "import os\n"})
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a", "pkg.b"}, "pkg.a": {"pkg.b"}, "pkg.b": set()}
    assert find_cycle(graph) is None


def test_the_everyday_api_resolves_from_the_package():
    import toyjax

    for name in toyjax.__all__:
        assert getattr(toyjax, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'lod_run'"):
        toyjax.lod_run  # noqa: B018
