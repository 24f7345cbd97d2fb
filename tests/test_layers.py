"""The package's layers, read from the import graph: ground -> domains -> config -> lineage ->
pipeline -> report/apps. A module imports only from its own layer or below; the three domains
never import each other."""

from __future__ import annotations

import pytest

from tests.dvc_graph import _imported
from tests.helpers import REPO

GROUND = {"errors", "schema", "registry", "paths", "hashing", "artifacts"}
GROUND |= {"records", "modelio", "textdata", "scoring", "hub", "faults"}
GROUND |= {"workspace_lock", "scratch"}  # every writer takes the lock and may sweep
DOMAINS = {"calibration", "compression", "evaluation"}
LAYERS = [
    GROUND,
    DOMAINS,
    {"config"},
    {"lineage"},
    {"pipeline", "report"},
    {"cli", "profiles"},
]


def _layer(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"selfcal.{top} is in no layer: add it to tests/test_layers.py")


def _top(path) -> str:
    rel = path.relative_to(REPO / "selfcal").with_suffix("")
    return rel.parts[0]


MODULES = sorted(p for p in (REPO / "selfcal").rglob("*.py") if p.name != "__init__.py" or p.parent != REPO / "selfcal")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_a_module_imports_only_its_own_layer_or_below(path):
    top = _top(path)
    for name in _imported(path):
        if not name.startswith("selfcal."):
            continue
        other = name.split(".")[1]
        if other == top:
            continue
        where = path.relative_to(REPO)
        assert _layer(other) <= _layer(top), f"{where} (layer of {top}) imports {name}, a layer above it"
        if top in DOMAINS:
            assert other not in DOMAINS, f"{path.relative_to(REPO)}: domain {top} imports domain {other} ({name})"
