"""The code layout DESIGN §4 promises: no two fedcrypt subpackages import each other."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedcrypt"


def _unit(path: Path) -> str:
    """The subpackage (or top-level module) a source file belongs to."""
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        here = _unit(path)
        for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions count
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] != "fedcrypt" or len(parts) < 2:
                    continue
                there = parts[1]
                if there != here:
                    edges[here].add(there)
    return edges


def test_no_two_subpackages_import_each_other() -> None:
    edges = _imports()
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    cycles = sorted(
        (a, b)
        for a in edges
        for b in edges[a]
        if a < b and a in packages and b in packages and a in edges.get(b, set())
    )
    assert cycles == [], f"subpackages importing each other: {cycles}"


def test_lower_layers_do_not_import_upper_ones() -> None:
    edges = _imports()
    upper = {"cli", "bench", "portal", "federation", "deploy", "api"}
    for low in ("protection", "tasks", "training", "config", "exceptions", "task", "site"):
        bad = edges.get(low, set()) & upper
        assert not bad, f"{low} imports {sorted(bad)}"


def test_test_modules_have_unique_basenames() -> None:
    """pytest's default import mode puts each test directory on ``sys.path`` under its
    basename, so two ``test_x.py`` (or helper modules) in different folders break collection."""
    tests = Path(__file__).resolve().parent
    seen: dict[str, list[str]] = defaultdict(list)
    for path in tests.rglob("*.py"):
        if path.name not in {"conftest.py", "__init__.py"}:
            seen[path.name].append(str(path.relative_to(tests)))
    clashes = {name: where for name, where in seen.items() if len(where) > 1}
    assert not clashes, clashes
