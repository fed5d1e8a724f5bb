"""The import graph points one way: app/ never imports worker/ (the CLI, which starts workers, aside), nor torch."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The command line may start a worker (`tuneforge worker`, `tuneforge serve`); nothing else in app/ may.
ALLOWED = {ROOT / "app" / "cli.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_api_package_imports_neither_the_worker_package_nor_torch() -> None:
    offenders = {}
    for path in sorted((ROOT / "app").rglob("*.py")):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in ("worker", "torch", "transformers", "peft")}
        if path in ALLOWED:
            bad = {m for m in bad if m.split(".")[0] != "worker"}
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}
