"""The engine's families (``src/torchjac/_engine/*/``) import only the families before them in
the order the engine's docstring gives, so no import circle can form between them."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "src" / "torchjac" / "_engine"
ORDER = ["core", "kernel", "graph", "taylor", "modules", "func", "sparse"]


def _imported_families(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["torchjac", "_engine"]:
                assert len(parts) > 2, f"{path.name} imports the engine package itself"
                found.add(parts[2])
    return found


def test_every_engine_module_sits_in_a_family() -> None:
    assert sorted(p.name for p in ENGINE.glob("*.py")) == ["__init__.py"]
    assert sorted(
        p.name for p in ENGINE.iterdir() if p.is_dir() and p.name != "__pycache__"
    ) == sorted(ORDER)
    for family in ORDER:
        assert (ENGINE / family / "__init__.py").read_text().startswith('"""')


def test_families_import_only_those_before_them() -> None:
    wrong = []
    for family in ORDER:
        allowed = set(ORDER[: ORDER.index(family) + 1])
        for path in sorted((ENGINE / family).glob("*.py")):
            for other in _imported_families(path) - allowed:
                wrong.append(f"{family}/{path.name} imports {other}")
    assert wrong == []
