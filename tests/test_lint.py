"""The code base passes ruff (lint and format), as configured in pyproject.toml."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def m3_jax_imports() -> dict[str, list[tuple[str, bool]]]:
    """module → [(imported m3_jax module, whether the import is inside a function)]."""
    package = ROOT / "m3_jax"
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in package.rglob("*.py")
    }

    def owner(name: str) -> str | None:  # the module a dotted name belongs to
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        edges = []
        tree = ast.parse(path.read_text())
        nested = {
            id(node)
            for scope in ast.walk(tree)
            if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(scope)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                module = owner(target) if target.startswith("m3_jax") else None
                if module and module != name and not name.startswith(module + "."):
                    edges.append((module, id(node) in nested))
        graph[name] = edges
    return graph


def test_m3_jax_imports_are_at_the_top_and_have_no_cycle():
    graph = m3_jax_imports()
    inside = sorted(
        f"{m} imports {t}" for m, edges in graph.items() for t, nested in edges if nested
    )
    assert not inside, inside
    # Depth-first search for a back edge: an import cycle.
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target, _ in graph[module]:
            assert state.get(target) != 1, " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
