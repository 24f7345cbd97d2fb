"""A source's own set size (``calibration.sources.NAME.n_samples``): the set-size sweep as one profile, so its
points are items of one run (concurrent on the GPU, chunked with ``--only``, every model registered)."""

from __future__ import annotations

import json

import pytest

from selfcal.config import parse_params
from tests.helpers import small_params


def test_a_source_with_its_own_size_makes_sets_of_that_size_and_the_others_keep_theirs(tiny_model, tmp_path):
    from selfcal.calibration.calibset import load_calibration_set
    from selfcal.pipeline import layout
    from selfcal.pipeline.generate import generate

    data = small_params(tiny_model, tmp_path, **{"tracking.enabled": False})  # global n = 4
    data["calibration"]["sources"]["self-n2"] = {"kind": "self", "n_samples": 2}
    params = parse_params(data, root=tmp_path)
    assert params.calibration.samples_for("self") == 4 and params.calibration.samples_for("self-n2") == 2

    small = generate(params, "self-n2", 0, progress=False)
    full = generate(params, "self", 0, progress=False)
    assert small.n_samples == 2 and full.n_samples == 4
    assert tuple(load_calibration_set(layout.calibration_dir(params, "self-n2", 0)).tokens.shape) == (2, 32)
    assert tuple(load_calibration_set(layout.calibration_dir(params, "self", 0)).tokens.shape) == (4, 32)
    # recorded where it was set, left out where not: a source's record is what sets made before the field
    # existed recorded (the manifests of the committed H200 run, made by the commit before it)
    assert small.source_params["n_samples"] == 2 and "n_samples" not in full.source_params
    from pydantic import TypeAdapter

    from selfcal.config import SourceConfig
    from tests.helpers import REPO

    committed = sorted((REPO / "reports" / "SmolLM2-135M" / "runs" / "2026-12-03-h200-c").glob("**/manifest.json"))
    sets = [json.loads(f.read_text()) for f in committed if "/calibration/" in str(f)]
    assert {m["source_params"]["kind"] for m in sets} == {"self", "corpus"}
    for m in sets:
        assert TypeAdapter(SourceConfig).validate_python(m["source_params"]).record() == m["source_params"]


def test_check_counts_a_corpus_for_its_own_size(tiny_model, tmp_path, capsys):
    from tests.test_guards import _check

    (tmp_path / "c.txt").write_text("a few words of text that the tiny tokenizer cuts up into tokens. " * 12)
    data = small_params(tiny_model, tmp_path)  # global n = 4 x 32 tokens
    data["calibration"]["sources"]["c4-n2"] = {"kind": "corpus", "path": "./c.txt", "n_samples": 2}
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 0, err
    data["calibration"]["sources"]["c4-n2"]["n_samples"] = 64
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and "calibration.sources.c4-n2: corpus gives" in err[0], err
    assert "fewer than the 64 requested" in err[0]
    data["calibration"]["sources"]["c4-n2"]["n_samples"] = 0
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and "calibration.sources.c4-n2.n_samples" in err[0], err


def test_the_study_report_draws_the_set_size_sweep_from_the_sources_sizes(tmp_path):
    """Sources that differ only in n_samples are one line of the paper's Figure 3, per method; each point is the
    mean ± std over its sets; the other sources are not on it."""
    from selfcal.pipeline.study_report import study_report
    from tests.test_evaluation import _record

    raw = small_params(tmp_path / "model", tmp_path, **{"calibration.seeds": [0, 1], "tracking.enabled": False})
    raw["calibration"]["sources"] = {
        **{f"self-n{n}": {"kind": "self", "n_samples": n} for n in (1, 2, 4)},
        **{f"c4-n{n}": {"kind": "corpus", "path": "c4.jsonl", "n_samples": n} for n in (1, 4)},
        "wiki": {"kind": "corpus", "path": "wiki.txt"},
    }
    params = parse_params(raw, root=tmp_path)
    folder = tmp_path / "runs" / "a" / "artifacts" / "evaluations"
    folder.mkdir(parents=True)
    acc = {("self-n1", 0): 0.30, ("self-n1", 1): 0.32, ("self-n2", 0): 0.40, ("self-n4", 0): 0.44, ("self-n4", 1): 0.46}
    acc |= {("c4-n1", 0): 0.35, ("c4-n4", 0): 0.45, ("c4-n4", 1): 0.47, ("wiki", 0): 0.5}
    for (source, seed), a in acc.items():
        rec = _record(f"{source}-s{seed}-gptq", "gptq", {"arc_easy": a}, ppl=10 / a).model_copy(
            update={"source": source}
        )
        (folder / f"{rec.name}.json").write_text(rec.model_dump_json())
    diag = tmp_path / "runs" / "a" / "artifacts" / "diagnostics"
    diag.mkdir()
    for seed, ppl in ((0, 6.0), (1, 8.0)):
        row = {"calibration": f"self-n1-s{seed}", "source": "self-n1", "kind": "self", "perplexity": ppl}
        (diag / f"self-n1-s{seed}.json").write_text(json.dumps(row))

    out = study_report(params, tmp_path / "report", title="sweep", runs=[folder.parents[1]])
    lines = (out / "sweep_n.csv").read_text().splitlines()
    head = lines[0].split(",")
    assert head[:4] == ["label", "n", "source", "sets"] and "mean_acc" in head and "ppl.wikitext2" in head
    rows = [dict(zip(head, line.split(","), strict=True)) for line in lines[1:]]
    assert [(r["label"], r["n"], r["sets"]) for r in rows] == [
        ("gptq / c4", "1", "1"),
        ("gptq / c4", "4", "2"),
        ("gptq / self", "1", "2"),
        ("gptq / self", "2", "1"),
        ("gptq / self", "4", "2"),
    ]
    assert float(rows[2]["mean_acc"]) == pytest.approx(0.31) and float(rows[2]["mean_acc.std"]) == pytest.approx(
        0.01414, abs=1e-4
    )
    for png in ("sweep_n.png", "sweep_n-wikitext2.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text()
    assert "![set-size sweep, mean_acc](sweep_n.png)" in readme
    # the calibration-quality summary: one row per source, mean ± std over its sets
    assert "| self-n1 | self | 2 | 7.00 ± 1.41 |" in readme
    # self against real data at each n (Welch's t over the sets), not "nothing to compare"; wiki is on no line
    from selfcal.pipeline.study_report import self_pairs
    from selfcal.report.significance import REAL_SOURCES

    assert self_pairs(params) == [("self", REAL_SOURCES), ("self-n1", ("c4-n1",)), ("self-n4", ("c4-n4",))]
    # t = (0.45 - 0.46) / sqrt(0.01414² / 2 x 2) = -0.71; c4-n1 has one set: no test
    assert (
        "| gptq | c4-n4 | 45.00 | 46.00 | -0.71 |" in readme
        and "| gptq | c4-n1 | 31.00 | 35.00 | - | - | **n/a** |" in readme
    )
    assert "| gptq | wiki |" not in readme and "not both evaluated yet" not in readme


def test_only_sources_differing_in_size_alone_make_a_line_and_labels_stay_apart(tmp_path):
    from selfcal.pipeline.study_report import set_size_points

    def points(sources: dict) -> list[tuple[str, int]]:
        raw = small_params(tmp_path / "model", tmp_path, **{"tracking.enabled": False})
        raw["calibration"]["sources"] = sources
        params = parse_params(raw, root=tmp_path)
        table = [{"method": "gptq", "source": s, "n_sets": 1, "mean_acc": 0.5} for s in sources]
        return [(p["label"], p["n"]) for p in set_size_points(params, table, ["mean_acc"])]

    # the temperature sweep: many self sources of one size, other schedules: no set-size line
    temps = {f"t{a}{b}": {"kind": "self", "t_initial": a / 2, "t_final": b / 2} for a in range(3) for b in range(3)}
    assert points(temps) == []
    # a source without its own size sits on the line at the global n (4 here)
    c4 = {"kind": "corpus", "path": "c.txt"}
    assert points({"c4": c4, "c4-n1": {**c4, "n_samples": 1}}) == [("gptq / c4", 1), ("gptq / c4", 4)]
    # two lines of one kind, names without -nN: two labels, not one line of four points
    two = {
        "a": {"kind": "self", "n_samples": 1},
        "b": {"kind": "self", "n_samples": 2},
        "x": {"kind": "self", "n_samples": 1, "t_final": 0.5},
        "y": {"kind": "self", "n_samples": 2, "t_final": 0.5},
    }
    got = points(two)
    assert len(got) == 4 and len({label for label, _ in got}) == 2 and len(set(got)) == 4
    # two sources of one size and the same params: no line (which would be the point?)
    assert points({"s1": {"kind": "self", "n_samples": 2}, "s2": {"kind": "self", "n_samples": 2}}) == []


def _exp(name, *, n=4, seeds=(0,), limit=200, state="success", metrics=0.3):
    params = {"calibration": {"n_samples": n, "seeds": list(seeds)}, "evaluation": {"limit": limit}}
    report = {"artifacts/report/metrics.json": {"data": {"gptq": {"self": {"mean_acc": metrics}}}}}
    rev = {"rev": name * 4, "name": name, "data": {"params": {"params.yaml": {"data": params}}, "metrics": report}}
    return {"revs": [rev], "executor": {"state": state} if state != "success" else None, "name": name}


def test_the_experiments_route_takes_only_finished_experiments_that_change_the_set_size_alone():
    """An audit: `study-report --experiments` keyed each experiment on n_samples alone, so an experiment of
    another GPTQ group size, one of another evaluation limit and a failed queued one (carrying the baseline's
    metrics) became 'sets' of the baseline's n, with a mean ± std over them. Only experiments that differ from
    their baseline in the size (and seeds) are points; the others are named with why."""
    from selfcal.pipeline.study_report import _sweep_n, sweep_experiments

    base = _exp("base")["revs"][0]
    shown = [
        {
            **base,
            "experiments": [
                _exp("n8", n=8, metrics=0.31),
                _exp("n8b", n=8, seeds=(1, 2), metrics=0.33),
                _exp("lim", limit=10),
                _exp("q1", n=16, state="failed"),
            ],
        }
    ]
    kept, left_out = sweep_experiments(shown)
    assert [name for name, _ in kept] == ["n8", "n8b"]
    assert left_out == [
        "lim: differs from its baseline in evaluation.limit, not only n",
        "q1: failed, not a finished experiment",
    ]
    rows = [
        {"experiment": name, "n": 8, "sets": len(d["params"]["params.yaml"]["data"]["calibration"]["seeds"]),
         "label": "gptq / self", "mean_acc": m}
        for (name, d), m in zip(kept, (0.31, 0.33), strict=True)
    ]  # fmt: skip
    (point,) = _sweep_n(rows)
    assert point["experiments"] == 2 and point["sets"] == 3 and point["mean_acc"] == pytest.approx(0.32)
    assert point["mean_acc.std"] == pytest.approx(0.0141421, rel=1e-4)


def test_a_sweep_point_is_the_mean_of_its_experiments_and_their_sample_std():
    from selfcal.pipeline.study_report import _sweep_n

    rows = [{"label": "gptq / self", "n": 8, "sets": 2, "mean_acc": a} for a in (0.30, 0.31, 0.35)]
    rows.append({"label": "gptq / self", "n": 16, "mean_acc": 0.4})  # its own point; no "sets": one
    eight, sixteen = _sweep_n(rows)
    # mean 0.32 (the median would be 0.31); deviations -0.02, -0.01, 0.03: std = sqrt(14e-4 / 2) = 0.0264575
    assert eight["n"] == 8 and eight["mean_acc"] == pytest.approx(0.32)
    assert eight["mean_acc.std"] == pytest.approx(0.0264575, rel=1e-5)
    assert eight["experiments"] == 3 and eight["sets"] == 6
    assert sixteen == {"label": "gptq / self", "n": 16, "mean_acc": 0.4, "mean_acc.std": None, "experiments": 1,
                       "sets": 1}  # fmt: skip
