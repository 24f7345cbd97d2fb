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


def test_the_declared_bar_plot_has_a_number_on_its_bar_axis_and_one_bar_per_method_and_source():
    """DVC's `bar_horizontal` template takes x as the quantity and y as the category: with `x: source, y: mean_acc`
    the accuracies were drawn as category names, and on `source` alone every method's bar for a source fell on
    one row."""
    import csv
    import io

    from dvc_render.vega_templates import get_template

    from selfcal.pipeline.aggregate import to_csv

    (plots,) = STAGES["aggregate"]["plots"]
    ((path, spec),) = plots.items()
    assert path.endswith("report/results.csv")
    encoding = get_template(spec["template"]).content["encoding"]
    quantity = {"x": spec["x"], "y": spec["y"]}[next(a for a in "xy" if encoding[a]["type"] == "quantitative")]
    category = {"x": spec["x"], "y": spec["y"]}[next(a for a in "xy" if encoding[a]["type"] == "nominal")]
    table = [
        {"method": "none", "source": "none", "n_sets": 1, "mean_acc": 0.5, "mean_acc.std": None},
        {"method": "gptq", "source": "c4", "n_sets": 2, "mean_acc": 0.4, "mean_acc.std": 0.01},
        {"method": "wanda", "source": "c4", "n_sets": 2, "mean_acc": 0.3, "mean_acc.std": 0.02},
    ]
    rows = list(csv.DictReader(io.StringIO(to_csv(["mean_acc"], table))))
    assert [float(r[quantity]) for r in rows] == [0.5, 0.4, 0.3]
    assert [r[category] for r in rows] == ["dense", "gptq/c4", "wanda/c4"]
