"""DVC must know what each stage reads: its deps are exactly the project code its command imports."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.dvc_graph import PACKAGES, import_closure
from tests.helpers import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _code_deps(stage: dict) -> list[str]:
    return [d for d in stage.get("deps", []) if not d.startswith("${") and d.split("/")[0] in PACKAGES]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_its_import_closure_and_nothing_else(name):
    stage = STAGES[name]
    module = re.match(r"python -m (\S+)", stage["cmd"]).group(1)
    closure = {p.relative_to(REPO).as_posix() for p in import_closure(module)}
    deps = _code_deps(stage)
    missing = sorted(f for f in closure if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"{name}: dvc.yaml deps miss modules the stage imports: {missing}"
    unused = [d for d in deps if not any(f == d or f.startswith(d.rstrip("/") + "/") for f in closure)]
    assert not unused, f"{name}: dvc.yaml lists code the stage never imports: {unused}"
    for d in deps:  # a listed folder must not bring in files the stage does not import
        if (REPO / d).is_dir():
            extra = sorted(
                p.relative_to(REPO).as_posix()
                for p in (REPO / d).rglob("*.py")
                if p.relative_to(REPO).as_posix() not in closure
            )
            assert not extra, f"{name}: {d} holds modules the stage never imports: {extra}"


def test_the_graph_sees_function_level_imports():
    """A lazy import inside a function still runs in the stage, so it must count."""
    closure = {p.relative_to(REPO).as_posix() for p in import_closure("stages.compress")}
    assert "selfcal/compression/verify.py" in closure  # imported inside CompressionMethod methods
    assert "selfcal/evaluation/tasks.py" in closure  # config's task validator imports it lazily
    assert "selfcal/calibration/diagnostics.py" not in closure


def test_every_artifact_a_stage_reads_or_writes_is_under_paths_artifacts():
    """params' `paths.artifacts` moves every output: guard's `checked.json` was written as `artifacts/...` in
    dvc.yaml, so with `paths.artifacts: out` `selfcal check` passed and `dvc repro` failed at its first stage."""
    paths = []
    for stage in STAGES.values():
        for entry in [
            *stage.get("deps", []),
            *stage.get("outs", []),
            *stage.get("metrics", []),
            *stage.get("plots", []),
        ]:
            paths += list(entry) if isinstance(entry, dict) else [entry]
    fixed = [p for p in paths if p.split("/")[0] in ("artifacts", ".selfcal")]
    assert fixed == [], f"dvc.yaml names artifact paths that ignore params' paths section: {sorted(set(fixed))}"
    assert any(p == "${paths.artifacts}/checked.json" for p in paths)
