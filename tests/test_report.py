"""Study reporting: the paper's source x method table and the sweep plots."""

from __future__ import annotations

import pytest

from selfcal.report.paper_table import source_method_table


def _entry(method, source, acc, std, ppl, sets=3):
    return {
        "method": method,
        "source": source,
        "n_sets": sets,
        "mean_acc": acc,
        "mean_acc.std": std,
        "ppl.wikitext2": ppl,
        "ppl.wikitext2.std": 0.0,
    }


TABLE = [
    _entry("none", "none", 0.50, None, 10.0, sets=1),
    _entry("gptq", "self", 0.48, 0.01, 11.0),
    _entry("gptq", "c4", 0.47, 0.02, 10.5),
    _entry("wanda", "self", 0.40, 0.01, 14.0),
    _entry("wanda", "c4", 0.42, 0.00, 13.0),
]


def test_best_source_per_method_is_bold_and_direction_respected():
    md = source_method_table(TABLE, "mean_acc")
    lines = md.splitlines()
    assert lines[0] == "| source | gptq | wanda |"
    assert lines[2] == "| *dense (uncompressed)* | 50.0 | 50.0 |"
    assert lines[3] == "| self | **48.0 ± 1.0** | 40.0 ± 1.0 |"
    assert lines[4] == "| c4 | 47.0 ± 2.0 | **42.0 ± 0.0** |"
    ppl = source_method_table(TABLE, "ppl.wikitext2", lower_is_better=True, scale=1.0, digits=2).splitlines()
    assert (
        ppl[3] == "| self | 11.00 ± 0.00 | 14.00 ± 0.00 |" and ppl[4] == "| c4 | **10.50 ± 0.00** | **13.00 ± 0.00** |"
    )


def test_a_cell_of_identical_sets_shows_its_zero_std_and_a_cell_of_one_set_none():
    """The temperature grid's 0 -> 0 cell: greedy decoding from BOS ignores the seed, so its two sets are one
    set and score the same; printed without "± 0.0" it read as a single set. One set has no std
    (``summarise`` gives None: tests/test_evaluation.py), printed as the mean alone."""
    from selfcal.pipeline.aggregate import _fmt

    table = [
        _entry("sparsegpt", "t00-00", 0.324, 0.0, 735.0, sets=2),
        _entry("sparsegpt", "t20-00", 0.345, None, 182.5, sets=1),
    ]
    lines = source_method_table(table, "mean_acc").splitlines()
    assert lines[2:] == ["| t00-00 | 32.4 ± 0.0 |", "| t20-00 | **34.5** |"]
    assert _fmt(0.324, 0.0, "mean_acc") == "32.4 ± 0.0"
    assert _fmt(0.345, None, "mean_acc") == "34.5"
    assert _fmt(None, None, "mean_acc") == "-"


def test_ties_at_printed_precision_are_all_marked_and_missing_cells_dash():
    table = [
        _entry("gptq", "self", 0.4801, 0.0, 1.0),
        _entry("gptq", "c4", 0.4799, 0.0, 1.0),
        _entry("wanda", "self", 0.3, 0.0, 1.0),
    ]
    lines = source_method_table(table, "mean_acc").splitlines()
    assert lines[2] == "| self | **48.0 ± 0.0** | **30.0 ± 0.0** |"
    assert lines[3] == "| c4 | **48.0 ± 0.0** | - |"


def test_sweep_plots_are_png_files(tmp_path):
    from selfcal.report.plots import accuracy_vs_n, temperature_heatmap

    rows = [{"n": n, "label": "self (wanda)", "mean_acc": 0.3 + n / 1000, "mean_acc.std": 0.01} for n in (1, 2, 4)]
    accuracy_vs_n(rows, tmp_path / "n.png")
    grid = [{"t_initial": a, "t_final": b, "mean_acc": 0.3} for a in (0.5, 1.0) for b in (0.5, 1.0, 1.5)]
    temperature_heatmap(grid, tmp_path / "t.png")
    for f in ("n.png", "t.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_study_report_from_runs_of_other_machines_reports_what_is_done_and_what_is_pending(tmp_path):
    """A grid run in chunks on GPU leases: each chunk's records come back as a run folder; the report merges
    them, says per source x method how many sets are in, lists the models nobody evaluated yet, and refuses a
    model two runs scored differently."""
    import json

    from selfcal.config import parse_params
    from selfcal.errors import DataError
    from selfcal.pipeline.study_report import study_report
    from tests.helpers import small_params
    from tests.test_evaluation import _record

    raw = small_params(tmp_path / "model", tmp_path, **{"calibration.seeds": [0, 1], "tracking.enabled": False})
    raw["calibration"]["sources"]["c4"] = {"kind": "corpus", "path": "c4.jsonl"}
    params = parse_params(raw, root=tmp_path)

    def run(name: str, *records):
        folder = tmp_path / "runs" / name / "artifacts" / "evaluations"
        folder.mkdir(parents=True)
        for r in records:
            (folder / f"{r.name}.json").write_text(r.model_dump_json())
        return folder.parents[1]

    dense = _record("dense", "none", {"arc_easy": 0.5}, ppl=20.0)
    a = run("a", dense, _record("self-s0-gptq", "gptq", {"arc_easy": 0.45}, ppl=22.0))
    (a / "artifacts" / "diagnostics").mkdir()
    diag = {"calibration": "self-s0", "kind": "self", "perplexity": 7.25, "repetition": 0.125}
    (a / "artifacts" / "diagnostics" / "self-s0.json").write_text(json.dumps(diag))
    b = run("b", dense, _record("self-s1-gptq", "gptq", {"arc_easy": 0.47}, ppl=21.0))
    (a / "gpu.csv").write_text("2026/12/03 10:00:00.000, 0, 50 %, 9 MiB\n2026/12/03 10:06:00.000, 0, 0 %, 9 MiB\n")
    out = study_report(params, tmp_path / "report", title="chunks", runs=[a, b])
    readme = (out / "README.md").read_text()
    assert "| a | 1 | 6.0 min | 0.10 | 50% | 0.05 | 0.0 GiB | 2 |" in readme
    assert "\n| b | " not in readme  # b has no gpu.csv: no row
    assert "3 of 5 models evaluated (the dense base: evaluated)" in readme
    assert "| self | 2/2 ✓ |" in readme and "| c4 | 0/2 |" in readme
    assert "| arc_easy | None of None | 50.0 | 25 | yes |" in readme
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["pending"] == ["c4-s0-gptq", "c4-s1-gptq"]
    assert "| self-s0 | self | 7.25 | 0.125 |" in (out / "diagnostics.md").read_text()  # the paper's Table 4 columns

    c = run("c", _record("self-s0-gptq", "gptq", {"arc_easy": 0.40}, ppl=22.0))
    with pytest.raises(DataError, match="self-s0-gptq: evaluated differently in runs a and c"):
        study_report(params, tmp_path / "report2", title="chunks", runs=[a, c])


def test_a_cell_whose_sets_share_one_calibration_digest_says_how_many_are_distinct(tmp_path):
    """The temperature grid's 0 -> 0 schedule (greedy throughout) made one set from both seeds: its two
    models are one, and the completeness table read "2/2" as two sets."""
    from selfcal.config import parse_params
    from selfcal.pipeline.study_report import completeness_markdown
    from tests.helpers import small_params
    from tests.test_evaluation import _record

    raw = small_params(tmp_path / "model", tmp_path, **{"calibration.seeds": [0, 1], "tracking.enabled": False})
    params = parse_params(raw, root=tmp_path)

    def rec(seed: int, digest: str):
        r = _record(f"self-s{seed}-gptq", "gptq", {"arc_easy": 0.45}, ppl=22.0)
        return r.model_copy(update={"calibration_digest": digest})

    same = completeness_markdown(params, [rec(0, "d" * 64), rec(1, "d" * 64)], [])
    assert "| self | 2/2 ✓ (1 distinct) |" in same and "(N distinct): sets with one calibration digest" in same
    other = completeness_markdown(params, [rec(0, "d" * 64), rec(1, "e" * 64)], [])
    assert "| self | 2/2 ✓ |" in other and "distinct" not in other


def test_a_set_two_runs_made_differently_is_reported_and_the_quality_shown_is_the_set_the_models_used(tmp_path):
    """Lease 3 made the five self sets again (a fresh box has no DVC cache) and got other tokens than lease 1
    from the same params and seed, while C4's sets came out identical. The report says which sets differ,
    and its quality measures are those of the set the models were calibrated with, not the first run's."""
    import json

    from selfcal.config import parse_params
    from selfcal.pipeline.study_report import study_report
    from tests.helpers import small_params
    from tests.test_evaluation import _record

    raw = small_params(tmp_path / "model", tmp_path, **{"calibration.seeds": [0], "tracking.enabled": False})
    raw["calibration"]["sources"]["c4"] = {"kind": "corpus", "path": "c4.jsonl"}
    params = parse_params(raw, root=tmp_path)
    old, new, c4 = "a" * 64, "b" * 64, "c" * 64

    def run(name: str, sets: dict[str, str], diagnostics: dict[str, tuple[str, float]], *records):
        root = tmp_path / "runs" / name
        (root / "artifacts" / "evaluations").mkdir(parents=True)
        for r in records:
            (root / "artifacts" / "evaluations" / f"{r.name}.json").write_text(r.model_dump_json())
        for set_name, digest in sets.items():
            (root / "artifacts" / "calibration" / set_name).mkdir(parents=True)
            (root / "artifacts" / "calibration" / set_name / "manifest.json").write_text(
                json.dumps({"content_digest": digest})
            )
        (root / "artifacts" / "diagnostics").mkdir()
        for set_name, (digest, ppl) in diagnostics.items():
            diag = {"calibration": set_name, "calibration_digest": digest, "kind": "self", "perplexity": ppl}
            (root / "artifacts" / "diagnostics" / f"{set_name}.json").write_text(json.dumps(diag))
        return root

    dense = _record("dense", "none", {"arc_easy": 0.5}, ppl=20.0)
    model = _record("self-s0-gptq", "gptq", {"arc_easy": 0.45}, ppl=22.0).model_copy(
        update={"seed": 0, "calibration_digest": new}
    )
    a = run("a", {"self-s0": old, "c4-s0": c4}, {"self-s0": (old, 7.25)}, dense)
    b = run("b", {"self-s0": new, "c4-s0": c4}, {"self-s0": (new, 9.5)}, model)
    readme = (study_report(params, tmp_path / "report", title="t", runs=[a, b]) / "README.md").read_text()
    assert "| c4-s0 | a, b | cccccccccccc, cccccccccccc | yes | - |" in readme  # no model of c4 evaluated
    assert "| self-s0 | a, b | aaaaaaaaaaaa, bbbbbbbbbbbb | **no** | b |" in readme
    assert "1 of 2 differ (self-s0)" in readme
    assert "| self-s0 | self | 9.50 |" in (tmp_path / "report" / "diagnostics.md").read_text()


def test_a_run_that_scored_no_model_still_brings_its_sets_and_their_measures(tmp_path):
    """Lease 9's Ji chunk was cut after its pools, sets and three measures, before any model was scored: the
    run folder has no evaluations, and the report still takes its measures and its remade sets; a folder with
    no records at all is refused by name."""
    import json

    from selfcal.config import parse_params
    from selfcal.errors import DataError
    from selfcal.pipeline.study_report import study_report
    from tests.helpers import small_params
    from tests.test_evaluation import _record

    raw = small_params(tmp_path / "model", tmp_path, **{"calibration.seeds": [0], "tracking.enabled": False})
    raw["calibration"]["sources"]["c4"] = {"kind": "corpus", "path": "c4.jsonl"}
    params = parse_params(raw, root=tmp_path)
    a = tmp_path / "runs" / "a"
    (a / "artifacts" / "evaluations").mkdir(parents=True)
    rec = _record("dense", "none", {"arc_easy": 0.5}, ppl=20.0)
    (a / "artifacts" / "evaluations" / "dense.json").write_text(rec.model_dump_json())
    (a / "artifacts" / "calibration" / "c4-s0").mkdir(parents=True)
    (a / "artifacts" / "calibration" / "c4-s0" / "manifest.json").write_text(json.dumps({"content_digest": "c" * 64}))
    j = tmp_path / "runs" / "j"
    (j / "artifacts" / "calibration" / "c4-s0").mkdir(parents=True)
    (j / "artifacts" / "calibration" / "c4-s0" / "manifest.json").write_text(json.dumps({"content_digest": "c" * 64}))
    (j / "artifacts" / "diagnostics").mkdir()
    diag = {"calibration": "c4-s0", "calibration_digest": "c" * 64, "kind": "corpus", "perplexity": 31.5}
    (j / "artifacts" / "diagnostics" / "c4-s0.json").write_text(json.dumps(diag))
    readme = (study_report(params, tmp_path / "report", title="t", runs=[a, j]) / "README.md").read_text()
    assert "| c4-s0 | a, j | cccccccccccc, cccccccccccc | yes | - |" in readme
    assert "| c4-s0 | corpus | 31.50 |" in (tmp_path / "report" / "diagnostics.md").read_text()
    empty = tmp_path / "runs" / "empty"
    (empty / "artifacts").mkdir(parents=True)
    with pytest.raises(DataError, match="empty: no artifacts/evaluations, calibration or diagnostics"):
        study_report(params, tmp_path / "report2", title="t", runs=[a, empty])


def test_quality_of_a_set_is_shown_only_for_the_make_its_models_used_whatever_the_runs_order():
    """Cases the runs can produce: the used make measured in the later run or the earlier one; a set no model
    used yet; models of one set from two makes (a chunk remade a Ji pool); a used make nobody inspected."""
    from selfcal.pipeline.study_report import pick_diagnostics, remade_markdown

    a, b = {"calibration_digest": "a" * 64, "ppl": 1}, {"calibration_digest": "b" * 64, "ppl": 2}
    for records in ([a, b], [b, a]):
        shown, unmeasured = pick_diagnostics({"self-s0": records}, {"self-s0": {"b" * 64}})
        assert shown["self-s0"] is b and unmeasured == []
    assert pick_diagnostics({"c4-s0": [a, b]}, {}) == ({"c4-s0": a}, [])
    assert pick_diagnostics({"ji-s0": [a, b]}, {"ji-s0": {"a" * 64, "b" * 64}}) == ({}, ["ji-s0"])
    assert pick_diagnostics({"ji-s1": [a]}, {"ji-s1": {"c" * 64}}) == ({}, ["ji-s1"])
    assert pick_diagnostics({"ji-s2": []}, {"ji-s2": {"c" * 64}}) == ({}, [])  # nothing inspected: nothing said

    # the section names the sets left out, also when every inspected set is left out (none shown)
    from selfcal.pipeline.study_report import quality_markdown

    assert quality_markdown([], ["ji-s0", "ji-s1"]).startswith("_no measure shown._ Left out: ji-s0, ji-s1: ")
    assert quality_markdown([], []) == "_no calibration set inspected yet_\n"
    row = {"calibration": "c4-s0", "source": "c4", "ppl": 9.5}
    both = quality_markdown([row], ["ji-s0"])
    assert "| c4 |" in both and both.endswith(
        "\nLeft out: ji-s0: no inspect record of the make (digest) its models were calibrated with.\n"
    )
    assert "Left out" not in quality_markdown([row], [])

    remade = [
        {"set": "ji-s0", "runs": ["r1", "r2"], "digests": ["a" * 64, "b" * 64], "same": False},
        {"set": "c4-s0", "runs": ["r1", "r2"], "digests": ["c" * 64, "c" * 64], "same": True},
        {"set": "c4-s1", "runs": ["r1", "r2"], "digests": ["d" * 64, "d" * 64], "same": True},
    ]
    text = remade_markdown(remade, {"ji-s0": {"a" * 64, "b" * 64}, "c4-s0": {"c" * 64}, "c4-s1": {"e" * 64}})
    assert "| ji-s0 | r1, r2 | aaaaaaaaaaaa, bbbbbbbbbbbb | **no** | r1, r2 (**mixed**" in text
    assert "| c4-s0 | r1, r2 | cccccccccccc, cccccccccccc | yes | any (identical) |" in text
    assert "| c4-s1 | r1, r2 | dddddddddddd, dddddddddddd | yes | a make none of these runs holds |" in text


def test_lineage_table_names_the_run_whose_store_holds_a_version_when_runs_share_version_numbers():
    """Each lease has its own MLflow store, so ``…-awq-c4:1`` is c4-s0's model in one run and c4-s3's in
    the next: the table must say which store to read, and a single workspace's table stays as it was."""
    from selfcal.pipeline.study_report import _lineage_table

    def entry(evaluated, run=None):
        e = {
            "evaluated": evaluated,
            "model": "M-awq-c4:1",
            "calibration": evaluated[:5],
            "calibration_digest": "ab" * 32,
            "git_commit": "c" * 40,
            "git_dirty": "false",
            "code_digest": "d" * 64,
        }
        return e | ({"run": run} if run else {})

    two = _lineage_table([entry("c4-s0-awq", "lease-c"), entry("c4-s3-awq", "lease-d")]).splitlines()
    assert "own MLflow store" in two[0] and "selfcal lineage --tracking-uri" in two[0]  # how to read a row
    assert two[2].startswith("| evaluated | run (MLflow store) | registered model |")
    assert two[4].startswith("| c4-s0-awq | lease-c | `M-awq-c4:1` |")
    assert two[5].startswith("| c4-s3-awq | lease-d | `M-awq-c4:1` |")
    one = _lineage_table([entry("c4-s0-awq")]).splitlines()
    assert one[0].startswith("| evaluated | registered model |") and one[2].startswith("| c4-s0-awq | `M-awq-c4:1` |")


def test_self_against_real_sources_by_welchs_t_over_the_sets_and_the_papers_own_tables():
    from selfcal.report.significance import compare_self, comparison_markdown, paper_comparisons, welch
    from tests.helpers import SHARED

    # t = 2 / sqrt(1/5 + 4/5) = 2; Welch-Satterthwaite df = 1 / 0.17 = 5.88; p = I_{df/(df+t²)}(df/2, 1/2)
    t, p = welch(10, 1, 5, 8, 2, 5)
    assert t == pytest.approx(2.0) and p == pytest.approx(0.09338, abs=1e-5)

    def cell(source, acc, std, ppl, n=5):
        return {"method": "gptq", "source": source, "n_sets": n, "mean_acc": acc, "mean_acc.std": std,
                "ppl.wikitext2": ppl, "ppl.wikitext2.std": 0.1}  # fmt: skip

    table = [cell("self", 0.50, 0.01, 20.0), cell("c4", 0.45, 0.01, 25.0), cell("wikitext", 0.50, 0.02, 19.0)]
    table.append(cell("cosmopedia", 0.40, None, 30.0, n=1))
    table.append(cell("vocab", 0.40, None, 30.0))  # five sets, one of them with the metric: no std, no test
    others = ("c4", "wikitext", "cosmopedia", "vocab")
    acc = {c.other: c.verdict for c in compare_self(table, "mean_acc", others=others)}
    assert acc == {"c4": "beats", "wikitext": "matches", "cosmopedia": "n/a", "vocab": "n/a"}
    ppl = {c.other: c.verdict for c in compare_self(table, "ppl.wikitext2")}
    assert ppl["c4"] == "beats" and ppl["wikitext"] == "loses"  # lower perplexity is better

    reference = SHARED / "reference" / "williams2025_appendix_tables.csv"
    if not reference.is_file():
        pytest.skip("no ../shared/reference")
    paper = paper_comparisons(reference)
    assert len(paper) == 5 * 4 * 3  # five models x four methods x three real sources
    assert {r["verdict"] for r in paper} <= {"beats", "matches", "loses"}
    md = comparison_markdown(compare_self(table, "mean_acc"), paper, "mean_acc")
    assert "| gptq | c4 | 50.00 | 45.00 | +7.91 |" in md and "**beats**" in md


def test_welch_with_no_spread_on_a_side_and_a_p_of_exactly_alpha():
    from selfcal.report.significance import verdict, welch

    # no spread on either side: any difference is certain, none is no difference
    assert welch(2, 0, 5, 1, 0, 5) == (float("inf"), 0.0)
    assert welch(1, 0, 5, 2, 0, 5) == (float("-inf"), 0.0)
    assert welch(1, 0, 5, 1, 0, 5) == (0.0, 1.0)
    # no spread on one side only is still Welch's t: t = 2 / sqrt(0 + 4/5) = sqrt(5) = 2.2361; df = 0.8² / (0.8²/4)
    # = 4; with 4 df, P(|T| < t) = sin θ (1 + cos²θ / 2), tan θ = t / 2: sin θ = sqrt(5)/3, cos²θ = 4/9, so
    # p = 1 - (sqrt(5)/3)(11/9) = 0.08901
    t, p = welch(10, 0, 5, 8, 2, 5)
    assert t == pytest.approx(5**0.5) and p == pytest.approx(1 - 5**0.5 / 3 * 11 / 9, abs=1e-9)
    assert verdict(1.0, 0.05, 0.05) == "matches" and verdict(1.0, 0.0499, 0.05) == "beats"  # significant: p < alpha


def test_the_papers_verdicts_are_welchs_over_five_sets_and_tallied_per_method_and_source(tmp_path):
    from selfcal.report.significance import Comparison, comparison_markdown, paper_comparisons

    reference = tmp_path / "appendix.csv"
    reference.write_text(
        "model,method,calib,mean10,mean10_std\n"
        "M,none,none,11.0,\n"
        "M,GPTQ,Self,10.0,1.0\n"
        "M,GPTQ,C4,8.0,2.0\n"  # t = 2 / sqrt(1/5 + 4/5) = 2, df 5.88: p = 0.0934 (0.141 with four sets)
        "M,GPTQ,WikiText,12.0,1.0\n"  # t = -2 / sqrt(2/5) = -3.16, df 8: p = 0.0133
        "M,GPTQ,Cosmopedia,9.0,\n"  # no std: no test
    )
    paper = paper_comparisons(reference, alpha=0.1)
    assert paper == [
        {"model": "M", "method": "GPTQ", "other": "c4", "verdict": "beats"},
        {"model": "M", "method": "GPTQ", "other": "wikitext", "verdict": "loses"},
    ]
    ours = [Comparison("gptq", o, 0.5, 0.4, 3.0, 0.01, 5, 5, "beats") for o in ("c4", "wikitext", "cosmopedia")]
    lines = comparison_markdown(ours, paper, "mean_acc").splitlines()
    assert lines[2].endswith("| **beats** | 1 / 0 / 0 |") and lines[3].endswith("| **beats** | 0 / 0 / 1 |")
    assert lines[4].endswith("| **beats** | - |")


def test_gpu_time_from_nvidia_smi_samples_of_either_format(tmp_path):
    """GPU-hours held = sampled span x GPUs; busy = utilization x interval; the lines nvidia-smi writes besides
    samples (errors, a cut last line) are not samples."""
    from selfcal.report.gpu_usage import read_gpu_csv, usage_markdown

    two = tmp_path / "two.csv"
    two.write_text(
        "2026/12/03 10:00:00.000, 0, 100 %, 1000 MiB\n"
        "2026/12/03 10:00:00.000, 1, 0 %, 10 MiB\n"
        "Unable to determine the device handle for GPU0000:1B:00.0: Unknown Error\n"
        "2026/12/03 10:00:10.000, 0, 50 %, 3000 MiB\n"
        "2026/12/03 10:00:10.000, 1, 0 %, 10 MiB\n"
        "2026/12/03 10:00:30.000, 0, 0 %, 2000 MiB\n"
        "2026/12/03 10:00:30.000, 1, 100 %, 20 MiB\n"
        "2026/12/03 10:00:31.0"
    )
    u = read_gpu_csv(two)
    assert (u.gpus, u.span_seconds, u.peak_memory_mib) == (2, 30.0, 3000.0)
    assert u.busy_gpu_seconds == pytest.approx(100 / 100 * 10 + 50 / 100 * 20)  # GPU 1 idle until its last sample
    assert u.busy_fraction == pytest.approx(20 / 60) and u.gpu_hours == pytest.approx(60 / 3600)
    one = tmp_path / "one.csv"  # lease 1's sampler: no index column
    one.write_text("2026/12/03 09:47:42.000, 40 %, 5 MiB\n2026/12/03 09:47:44.000, 0 %, 5 MiB\n")
    assert read_gpu_csv(one).gpus == 1 and read_gpu_csv(one).busy_gpu_seconds == pytest.approx(0.8)
    (tmp_path / "empty.csv").write_text("No devices were found\n")
    assert read_gpu_csv(tmp_path / "empty.csv") is None
    md = usage_markdown([("a", u, 3), ("b", read_gpu_csv(one), 1)]).splitlines()
    assert md[2] == "| a | 2 | 0.5 min | 0.02 | 33% | 0.01 | 2.9 GiB | 3 |"
    assert md[-1].startswith("| total | | | 0.02 |") and md[-1].endswith("| 4 |")
