"""End to end on a tiny random model: every stage for real, in-process and through `dvc repro`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfcal.calibration.calibset import load_calibration_set
from selfcal.config import parse_params
from selfcal.pipeline import layout
from selfcal.pipeline.aggregate import aggregate
from selfcal.pipeline.compress import compress
from selfcal.pipeline.evaluate import evaluate
from selfcal.pipeline.generate import generate
from tests.helpers import pipeline_workspace, small_params

# These evaluate models on the ARC-Easy and WikiText-2 files of ../shared/data.
pytestmark = pytest.mark.usefixtures("shared_data")


@pytest.fixture(scope="module")
def run_dir(tiny_model, tmp_path_factory):
    """One full in-process pipeline run shared by the assertions below."""
    work = tmp_path_factory.mktemp("pipeline")
    params = parse_params(small_params(tiny_model, work, **{"calibration.seeds": [0, 1]}), root=work)
    for seed in (0, 1):
        generate(params, "self", seed, progress=False)
        compress(params, "self", seed, "gptq")
        evaluate(params, f"self-s{seed}-gptq", progress=False)
    evaluate(params, "dense", progress=False)
    aggregate(params)
    return params


def test_calibration_set_is_bos_started_and_hash_is_reproducible(run_dir, tiny_model, tmp_path):
    first = load_calibration_set(layout.calibration_dir(run_dir, "self", 0))
    assert first.tokens.shape == (4, 32)
    assert (first.tokens[:, 0] == 1).all()
    again = parse_params(small_params(tiny_model, tmp_path, **{"tracking.enabled": False}), root=tmp_path)
    assert generate(again, "self", 0, progress=False).content_digest == first.digest
    other = load_calibration_set(layout.calibration_dir(run_dir, "self", 1))
    assert other.digest != first.digest


def test_checkpoint_manifest_links_calibration_and_reloads(run_dir):
    import torch
    from transformers import AutoModelForCausalLM

    ckpt = layout.checkpoint_dir(run_dir, "self", 0, "gptq")
    from selfcal.artifacts import read_manifest
    from selfcal.records import CheckpointManifest

    manifest = read_manifest(ckpt, CheckpointManifest)
    assert json.loads((ckpt / "manifest.json").read_text())["schema_version"] == 1
    calib = load_calibration_set(layout.calibration_dir(run_dir, "self", 0))
    assert manifest.calibration.digest == calib.digest
    assert manifest.calibration.n_samples == 4 and manifest.calibration.seq_len == 32
    assert manifest.method == "gptq" and manifest.method_params["group_size"] == 128
    assert set(manifest.files) >= {"model.safetensors", "config.json", "tokenizer.json"}
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] == 4
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()


def test_metrics_and_report(run_dir):
    from selfcal.records import read_evaluation

    dense = read_evaluation(layout.evaluation_file(run_dir, "dense"))
    assert dense.zero_shot.tasks["arc_easy"].n == 20
    assert 0.0 <= dense.mean_acc <= 1.0
    assert dense.perplexity["wikitext2"].windows == 4 and dense.perplexity["wikitext2"].perplexity > 1
    flat = json.loads(layout.metrics_file(run_dir, "dense").read_text())  # what DVC, MLflow and the report name them
    assert flat == {
        "acc.arc_easy": dense.zero_shot.tasks["arc_easy"].acc,
        "mean_acc": dense.mean_acc,
        "ppl.wikitext2": dense.perplexity["wikitext2"].perplexity,
    }
    quant = read_evaluation(layout.evaluation_file(run_dir, "self-s0-gptq"))
    assert quant.calibration_digest == load_calibration_set(layout.calibration_dir(run_dir, "self", 0)).digest
    md = (layout.report_dir(run_dir) / "results.md").read_text()
    assert "| none | none | 1 |" in md and "| gptq | self | 2 |" in md
    csv = (layout.report_dir(run_dir) / "results.csv").read_text().splitlines()
    assert csv[0].startswith("method,source,n_sets,acc.arc_easy") and len(csv) == 3


def test_mlflow_has_one_parent_with_nested_stage_runs(run_dir):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=run_dir.tracking.tracking_uri)
    exp = client.get_experiment_by_name("selfcal")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("selfcal.stage") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("selfcal.stage") != "pipeline"]
    assert len(parents) == 1
    assert len(children) == 8  # 2 generate + 2 compress + 3 evaluate + 1 aggregate
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    compress_runs = [r for r in children if r.data.tags["selfcal.stage"] == "compress"]
    assert all(r.data.tags["selfcal.calibration_digest"] for r in compress_runs)


def test_failed_stage_leaves_no_half_written_artifact(tiny_model, tmp_path, monkeypatch):
    import selfcal.calibration.calibset as calibset

    params = parse_params(small_params(tiny_model, tmp_path, **{"tracking.enabled": False}), root=tmp_path)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(calibset, "write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(params, "self", 0, progress=False)
    calib_root = tmp_path / "artifacts" / "calibration"
    assert list(calib_root.iterdir()) == []


_GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
}


def ws_params(ws: Path):
    return parse_params(yaml.safe_load((ws / "params.yaml").read_text()), root=ws)


def _dvc_json(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in _GIT_ENV.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _dvc(cwd: Path, *args: str) -> str:
    # mlflow.set_tracking_uri in the in-process tests exports MLFLOW_TRACKING_URI; keep it out.
    env = {k: v for k, v in _GIT_ENV.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def dvc_workspace(tiny_model, tmp_path_factory):
    """A clean copy of the repository's pipeline files, with params pointing at the tiny model."""
    return pipeline_workspace(tmp_path_factory.mktemp("dvc") / "ws", tiny_model)


def _runs_by_execution(db: Path) -> dict[str, list]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("selfcal").experiment_id])
    by_exec: dict[str, list] = {}
    for r in runs:
        by_exec.setdefault(r.data.tags["selfcal.execution_id"], []).append(r)
    return by_exec


def test_a_held_workspace_refuses_dvc_repro_before_anything_is_written(dvc_workspace):
    """Another run holds the workspace lock: the guard stage refuses `dvc repro` naming it, and no
    stage runs, no artifact and no dvc.lock appear."""
    from tests.helpers import hold_workspace

    ws, _ = dvc_workspace
    with hold_workspace(ws, "nightly selfcal run") as owner:
        env = {k: v for k, v in _GIT_ENV.items() if k != "MLFLOW_TRACKING_URI"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=ws, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"is in use by nightly selfcal run (pid {owner}" in out
    assert [line for line in out.splitlines() if "Running stage" in line] == ["Running stage 'guard':"]
    assert not (ws / "dvc.lock").exists() and not (ws / "artifacts" / "calibration").exists()


def test_dvc_repro_end_to_end_then_noop_then_partial(dvc_workspace):
    ws, data = dvc_workspace
    out = _dvc(ws, "repro")
    for stage in (
        "generate@self-0",
        "inspect@self-0",
        "compress@self-0-gptq",
        "evaluate@self-0-gptq",
        "evaluate_dense",
        "aggregate",
    ):
        assert f"Running stage '{stage}'" in out
    assert (ws / "artifacts" / "report" / "results.md").is_file()
    assert "| self-s0 | self |" in (ws / "artifacts" / "report" / "diagnostics.md").read_text()
    ((execution, runs),) = _runs_by_execution(ws / ".selfcal" / "mlflow.db").items()
    assert execution.startswith("dvc-")  # all five stage processes found the same `dvc repro`
    stages = sorted(r.data.tags["selfcal.stage"] for r in runs)
    assert stages == ["aggregate", "compress", "evaluate", "evaluate", "generate", "inspect", "pipeline"]

    # The study's record, from the declared records and MLflow only: every checkpoint traced to its version.
    env = {k: v for k, v in _GIT_ENV.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "selfcal.cli", "study-report", "--out", "study", "--title", "tiny study"]
    proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lineage = json.loads((ws / "study" / "lineage.json").read_text())
    (model,) = lineage["models"]
    assert lineage["missing"] == [] and model["evaluated"] == "self-s0-gptq" and model["model"].endswith(":1")
    ckpt = json.loads((ws / "artifacts" / "checkpoints" / "self-s0-gptq" / "manifest.json").read_text())
    assert model["checkpoint_digest"] == ckpt["content_digest"]
    assert model["calibration_digest"] == ckpt["calibration"]["digest"] and model["code_digest"]
    readme = (ws / "study" / "README.md").read_text()
    assert "2 evaluated models (1 checkpoints + the dense base), 1 traced" in readme and "| compress | 1 |" in readme
    assert (ws / "study" / "by_source.md").read_text() == (ws / "artifacts" / "report" / "by_source.md").read_text()

    again = _dvc(ws, "repro")  # a no-op: only the guard stage (always run, output unchanged) runs
    assert "Running stage 'guard'" in again
    assert [line for line in again.splitlines() if "Running stage" in line] == ["Running stage 'guard':"]

    # DVC's own tools see the metrics, under the names MLflow and the report use.
    shown = json.loads(_dvc_json(ws, "metrics", "show", "--json"))
    (files,) = [v["data"] for v in shown.values()]  # keyed by "" (the workspace) in DVC 3.67
    assert set(files["artifacts/metrics/dense.json"]["data"]) == {"acc.arc_easy", "mean_acc", "ppl.wikitext2"}
    assert files["artifacts/report/metrics.json"]["data"]["gptq"]["self"]["mean_acc"] == pytest.approx(
        json.loads(layout.metrics_file(ws_params(ws), "self-s0-gptq").read_text())["mean_acc"]
    )

    # A sweep point as a DVC experiment: only evaluation and the report re-run, and `dvc exp show`
    # has the metric columns for it.
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=ws, check=True, capture_output=True, env=_GIT_ENV)
    out = _dvc(ws, "exp", "run", "-S", "evaluation.limit=10")
    assert "Running stage 'evaluate@self-0-gptq'" in out and "Running stage 'evaluate_dense'" in out
    assert "Running stage 'generate" not in out and "Running stage 'compress" not in out
    rows = json.loads(_dvc_json(ws, "exp", "show", "--json"))
    exps = [r for row in rows for e in row.get("experiments") or [] for r in e["revs"]]
    assert len(exps) == 1 and exps[0]["data"]["params"]["params.yaml"]["data"]["evaluation"]["limit"] == 10
    metrics = exps[0]["data"]["metrics"]
    assert set(metrics) == {
        "artifacts/metrics/dense.json",
        "artifacts/metrics/self-s0-gptq.json",
        "artifacts/report/metrics.json",
    }
    assert set(metrics["artifacts/report/metrics.json"]["data"]["gptq"]["self"]) == {
        "acc.arc_easy",
        "mean_acc",
        "ppl.wikitext2",
    }
    # ... and the study report reads the experiments back from DVC (the set-size sweep's route): this one
    # changed evaluation.limit, not the set size, so it is no sweep point (an audit found such experiments
    # counted as sets of the baseline's n), and the report says why it was left out
    proc = subprocess.run([*cmd, "--experiments"], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (ws / "study" / "sweep_n.csv").exists()
    assert "differs from its baseline in evaluation.limit, not only n" in (ws / "study" / "README.md").read_text()
