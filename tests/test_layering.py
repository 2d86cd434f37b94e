"""Imports run one way: jobs -> {pipeline, trainer} -> catalog (DESIGN.md §3).

Every .py under the four packages is parsed (not imported), so an import inside a function, or one
that only runs on some code path, counts the same as a top-level one.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("catalog", "pipeline", "trainer", "jobs")
# What each package must never import. jobs may import everything; nothing imports jobs.
FORBIDDEN = {
    "catalog": {"pipeline", "trainer", "jobs"},
    "pipeline": {"trainer", "jobs"},
    "trainer": {"pipeline", "jobs"},
    "jobs": set(),
}


def imported_packages(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in ``path``; relative imports resolve within ``package``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else (node.module or "").split(".")[0]))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
            "import_module", "__import__"
        ) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append((node.lineno, node.args[0].value.split(".")[0]))
    return found


def violations(root: Path = REPO) -> list[str]:
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for line, target in imported_packages(path, package):
                if target in FORBIDDEN[package]:
                    bad.append(f"{path.relative_to(root)}:{line} imports {target}")
    return bad


def test_imports_run_one_way():
    assert violations() == []


def test_every_package_is_scanned():
    for package in PACKAGES:
        assert list((REPO / package).rglob("*.py")), f"expected python files under {package}/"


def test_the_scan_sees_local_relative_and_dynamic_imports(tmp_path):
    """The checker itself: a catalog module importing pipeline inside a function, a trainer module
    importing pipeline through importlib, and a pipeline module importing jobs are all caught."""
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "catalog" / "a.py").write_text("import json\n\ndef f():\n    from pipeline.media import probe\n")
    (tmp_path / "trainer" / "b.py").write_text("import importlib\nm = importlib.import_module('pipeline.sample')\n")
    (tmp_path / "pipeline" / "c.py").write_text("from . import media\nimport jobs.curate\n")
    (tmp_path / "jobs" / "d.py").write_text("import catalog, pipeline, trainer\n")
    assert violations(tmp_path) == [
        "catalog/a.py:4 imports pipeline",
        "pipeline/c.py:2 imports jobs",
        "trainer/b.py:2 imports pipeline",
    ]

