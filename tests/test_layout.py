"""The architecture the layout promises (DESIGN.md "Layout"), checked on the source itself.

Dependencies point one way (dcbench.protocols and dcbench.pretrained import the engine, never
the reverse), there is no import cycle among the three folders, counting imports inside
functions, and every protocol module is a short recipe.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib

REPO = Path(__file__).resolve().parents[1]
#: repository folder -> the package it installs as (pyproject's package-dir)
FOLDERS = {"dcbench": "dcbench", "protocols": "dcbench.protocols", "pretrained": "dcbench.pretrained"}
MAX_PROTOCOL_LINES = 400


def _modules() -> dict[str, Path]:
    """Installed module name -> source file, for every .py file of the three folders."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a non-module attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(root: str) -> None:
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1
                    stack.append(child); on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop(); on_stack.discard(member); component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return out


def _folder(name: str) -> str:
    """Which of the three folders a module lives in."""
    for folder in ("protocols", "pretrained"):
        if name == f"dcbench.{folder}" or name.startswith(f"dcbench.{folder}."):
            return folder
    return "dcbench"


def _is_engine(name: str) -> bool:
    return _folder(name) == "dcbench"


def test_engine_never_imports_protocols_or_pretrained():
    graph = _graph()
    wrong = sorted(f"{a} imports {b}" for a, deps in graph.items() if _is_engine(a)
                   for b in deps if not _is_engine(b))
    assert not wrong, wrong


def test_protocols_and_pretrained_do_not_import_each_other():
    graph = _graph()
    wrong = sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                   if {_folder(a), _folder(b)} == {"protocols", "pretrained"})
    assert not wrong, wrong


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_cycle_detection_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", sorted((REPO / "protocols").glob("*.py")), ids=lambda p: p.name)
def test_protocol_modules_are_short_recipes(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_PROTOCOL_LINES, f"{path.name} has {lines} lines; move library code into dcbench/"


def test_every_package_is_installed_under_dcbench():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert packages == listed, f"pyproject [tool.setuptools] packages differs: {sorted(packages ^ listed)}"
    assert config["package-dir"] == {"dcbench": "dcbench", "dcbench.protocols": "protocols",
                                     "dcbench.pretrained": "pretrained"}


def test_top_level_names_are_not_importable_from_elsewhere(tmp_path):
    """Installed, the plugin folders are dcbench.protocols / dcbench.pretrained only."""
    import subprocess

    code = ("import importlib.util as u, dcbench.protocols, dcbench.pretrained;"
            "print(u.find_spec('protocols') is None, u.find_spec('pretrained') is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split() == ["True", "True"], out.stderr
