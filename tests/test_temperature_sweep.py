"""The temperature-schedule sweep (the paper's Figure 4) as one profile: one self-calibration source per
(t_initial, t_final); study-report draws its grid per method from the run folders, as a table, a CSV and a
heatmap per headline metric."""

from __future__ import annotations

import pytest

from selfcal.config import parse_params
from tests.helpers import small_params


def _temperature_params(tmp_path, schedules):
    raw = small_params(tmp_path / "model", tmp_path, **{"calibration.seeds": [0, 1], "tracking.enabled": False})
    raw["calibration"]["sources"] = {
        f"t{a:02d}-{b:02d}": {"kind": "self", "t_initial": a / 10, "t_final": b / 10, "schedule_steps": 10}
        for a, b in schedules
    }
    raw["compression"] = {"methods": ["sparsegpt", "wanda"]}  # the paper's Figure 4 (and Wanda if time allows)
    return parse_params(raw, root=tmp_path)


def test_the_study_report_draws_the_temperature_grid_per_method_with_each_cells_mean_and_sets(tmp_path):
    import csv

    from selfcal.pipeline.study_report import study_report
    from tests.test_evaluation import _record

    params = _temperature_params(tmp_path, [(0, 10), (10, 10), (20, 0), (20, 10)])
    folder = tmp_path / "runs" / "a" / "artifacts" / "evaluations"
    folder.mkdir(parents=True)
    # (source, seed) -> accuracy; t20-00 has one set of two, t20-10 none yet
    acc = {("t00-10", 0): 0.30, ("t00-10", 1): 0.34, ("t10-10", 0): 0.40, ("t10-10", 1): 0.42, ("t20-00", 0): 0.25}
    for (source, seed), a in acc.items():
        rec = _record(f"{source}-s{seed}-sparsegpt", "sparsegpt", {"arc_easy": a}, ppl=10 / a)
        (folder / f"{rec.name}.json").write_text(rec.model_copy(update={"source": source}).model_dump_json())
    wanda = _record("t00-10-s0-wanda", "wanda", {"arc_easy": 0.2}, ppl=50.0)  # another method: its own grid
    (folder / f"{wanda.name}.json").write_text(wanda.model_copy(update={"source": "t00-10"}).model_dump_json())

    out = study_report(params, tmp_path / "report", title="temperature", runs=[folder.parents[1]])

    with open(out / "temperature.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["source"], r["t_initial"], r["t_final"], r["sets"], r["of"]) for r in rows] == [
        ("sparsegpt", "t00-10", "0.0", "1.0", "2", "2"),
        ("sparsegpt", "t10-10", "1.0", "1.0", "2", "2"),
        ("sparsegpt", "t20-00", "2.0", "0.0", "1", "2"),
        ("wanda", "t00-10", "0.0", "1.0", "1", "2"),
    ]
    assert float(rows[0]["mean_acc"]) == pytest.approx(0.32)  # the mean over the sets, not the last set's
    assert float(rows[0]["mean_acc.std"]) == pytest.approx(0.02828, abs=1e-4)
    assert float(rows[1]["ppl.wikitext2"]) == pytest.approx((10 / 0.40 + 10 / 0.42) / 2)
    for png in ("temperature-sparsegpt.png", "temperature-sparsegpt-wikitext2.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text()
    # t_initial down, t_final across; an unrun cell is "-", a cell with fewer sets says so
    assert "| t_initial ↓, t_final → | 0 | 1 |" in readme
    assert "| **0** | - | 32.0 ± 2.8 |" in readme
    assert "| **1** | - | 41.0 ± 1.4 |" in readme
    assert "| **2** | 25.0 (1 of 2) | - |" in readme
    assert "| **2** | 40.00 (1 of 2) | - |" in readme  # perplexity 10 / 0.25
    assert "| **0** | - | 31.37 ± 2.77 |" in readme  # (25 + 33.33) / 2, to 0.01
    assert "![temperature schedule, sparsegpt, mean_acc](temperature-sparsegpt.png)" in readme
    wanda_part = readme[readme.index("### Temperature schedule, wanda: mean zero-shot") :]
    assert "| t_initial ↓, t_final → | 1 |" in wanda_part and "| **0** | 20.0 (1 of 2) |" in wanda_part
    assert (out / "temperature-wanda.png").is_file()


def test_one_schedule_is_no_temperature_sweep(tmp_path, caplog):
    from selfcal.pipeline.study_report import temperature_rows

    params = _temperature_params(tmp_path, [(10, 10)])
    # a set-size sweep: several self sources, one schedule; no grid, so no warning about cells either
    params.calibration.sources["t10-10-n2"] = params.calibration.sources["t10-10"].model_copy(update={"n_samples": 2})
    table = [{"source": "t10-10", "method": "gptq", "n_sets": 2, "mean_acc": 0.4, "mean_acc.std": 0.01}]
    with caplog.at_level("WARNING"):
        assert temperature_rows(params, table, ["mean_acc"]) == []
    assert "temperature grid" not in caplog.text
    two = _temperature_params(tmp_path, [(10, 10), (5, 10)])
    assert [r["t_initial"] for r in temperature_rows(two, table, ["mean_acc"])] == [1.0]


def test_the_grid_is_the_one_the_table_and_the_heatmap_both_draw(tmp_path):
    """``temperature_grid`` is what both print: axes sorted, cells at their (t_initial, t_final) indices, in %
    for accuracy, a cell short of the profile's sets marked even when every cell is (a grid half run)."""
    from selfcal.report.temperature import Cell, temperature_grid, temperature_markdown

    rows = [
        {"t_initial": 2.0, "t_final": 0.5, "sets": 1, "of": 2, "mean_acc": 0.25, "mean_acc.std": None},
        {"t_initial": 0.0, "t_final": 1.0, "sets": 1, "of": 2, "mean_acc": 0.30, "mean_acc.std": None},
        {"t_initial": 0.0, "t_final": 0.5, "sets": 1, "of": 2, "mean_acc": None},
    ]
    t0s, t1s, cells = temperature_grid(rows, "mean_acc")
    assert (t0s, t1s) == ([0.0, 2.0], [0.5, 1.0])
    assert cells == {(1, 0): Cell(25.0, None, 1, 2), (0, 1): Cell(30.0, None, 1, 2)}
    assert all(c.short for c in cells.values())
    table = temperature_markdown(rows, "mean_acc")
    assert "| **0** | - | 30.0 (1 of 2) |" in table and "| **2** | 25.0 (1 of 2) | - |" in table
    assert temperature_markdown(rows, "ppl.wikitext2") == "_no schedule has ppl.wikitext2 yet_\n"


def test_two_sources_of_one_schedule_share_no_cell(tmp_path, caplog):
    from selfcal.pipeline.study_report import temperature_rows

    params = _temperature_params(tmp_path, [(10, 10), (5, 10)])
    raw_steps = params.calibration.sources["t10-10"].model_copy(update={"schedule_steps": 20})
    params.calibration.sources["t10-10-long"] = raw_steps
    table = [
        {"source": s, "method": "sparsegpt", "n_sets": 2, "mean_acc": a}
        for s, a in (("t10-10", 0.4), ("t10-10-long", 0.3))
    ]
    with caplog.at_level("WARNING"):
        rows = temperature_rows(params, table, ["mean_acc"])
    assert [(r["source"], r["mean_acc"]) for r in rows] == [("t10-10", 0.4)]
    assert "t10-10-long has t10-10's schedule 1.0 -> 1.0: left out of it" in caplog.text
