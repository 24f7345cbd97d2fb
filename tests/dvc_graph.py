"""The project's import graph, read from the source (no import is executed).

Every ``import`` and ``from ... import`` statement counts, at module level or inside a
function: code a stage imports lazily still runs in it. Parent packages count too
(their ``__init__`` runs first).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("selfcal", "stages", "flows")


def module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {n for n in out if n.split(".")[0] in PACKAGES}


def import_closure(module: str) -> set[Path]:
    """Files of the project that ``python -m module`` may import, transitively."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # parent packages' __init__ run first
            path = module_file(".".join(parts[:i]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo.extend(_imported(path))
    return seen
