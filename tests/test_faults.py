"""Fault injection (issue 16): generate and compress killed with SIGKILL at named points
(``selfcal.faults``), then re-run: no half artifact is ever left, the re-run gives the digests of an
uninterrupted run, and no MLflow run stays RUNNING."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfcal.faults import ENV
from tests.helpers import REPO, small_params, write_params

GENERATE = ["stages.generate", "--source", "self", "--seed", "0"]
COMPRESS = ["stages.compress", "--source", "self", "--seed", "0", "--method", "gptq"]
GENERATE_POINTS = [
    "stage:start",
    "generate:after-load",
    "generate:after-sampling",
    "artifacts:before-rename",
    "generate:before-log",
]
COMPRESS_POINTS = [
    "stage:start",
    "compress:after-oneshot",
    "compress:after-save",
    "artifacts:before-rename",
    "compress:before-register",
]


def _stage(ws: Path, argv: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(REPO)
    if fault:
        env[ENV] = fault
    return subprocess.run([sys.executable, "-m", *argv], cwd=ws, env=env, capture_output=True, text=True, timeout=600)


def _workspace(tiny_model, ws: Path) -> Path:
    ws.mkdir(parents=True)
    data = small_params(tiny_model, ws, **{"evaluation.perplexity": {}})
    data["paths"] = {"artifacts": "artifacts", "state": ".selfcal"}
    data["tracking"] = {}  # the default store: .selfcal/mlflow.db inside the workspace (copies carry it)
    write_params(ws / "params.yaml", data)
    return ws


def _digest(ws: Path, kind: str, name: str) -> str:
    return json.loads((ws / "artifacts" / kind / name / "manifest.json").read_text())["content_digest"]


def _no_half_artifact(ws: Path) -> None:
    """Every artifact folder that exists is whole: its manifest reads and every listed file matches."""
    from selfcal.hashing import file_digests

    for kind in ("calibration", "checkpoints"):
        root = ws / "artifacts" / kind
        for d in root.iterdir() if root.is_dir() else []:
            if d.name.startswith("."):
                continue  # scratch: never read, swept by the next writer
            manifest = json.loads((d / "manifest.json").read_text())
            assert file_digests(d, exclude=frozenset({"manifest.json"})) == manifest["files"], d


def _running_runs(ws: Path) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ws / '.selfcal' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("selfcal")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return [r.info.run_name for r in runs if r.info.status == "RUNNING"]


@pytest.fixture(scope="module")
def baseline(tiny_model, tmp_path_factory):
    ws = _workspace(tiny_model, tmp_path_factory.mktemp("faults") / "clean")
    assert _stage(ws, GENERATE).returncode == 0
    assert _stage(ws, COMPRESS).returncode == 0
    return ws, _digest(ws, "calibration", "self-s0"), _digest(ws, "checkpoints", "self-s0-gptq")


@pytest.mark.parametrize("fault", GENERATE_POINTS)
def test_generate_killed_at_any_point_leaves_no_half_set_and_reruns_to_the_same_digest(
    tiny_model, tmp_path, baseline, fault
):
    ws = _workspace(tiny_model, tmp_path / "ws")
    killed = _stage(ws, GENERATE, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    _no_half_artifact(ws)
    again = _stage(ws, GENERATE)
    assert again.returncode == 0, again.stderr[-2000:]
    _no_half_artifact(ws)
    assert _digest(ws, "calibration", "self-s0") == baseline[1]
    assert not list((ws / "artifacts" / "calibration").glob(".*")), "the re-run sweeps the scratch"
    assert _running_runs(ws) == []


@pytest.mark.parametrize("fault", COMPRESS_POINTS)
def test_compress_killed_at_any_point_leaves_no_half_checkpoint_and_reruns_to_the_same_digest(
    tiny_model, tmp_path, baseline, fault
):
    import shutil

    ws = tmp_path / "ws"  # the clean workspace's calibration set and store, without its checkpoint
    shutil.copytree(baseline[0], ws, ignore=shutil.ignore_patterns("checkpoints"))
    killed = _stage(ws, COMPRESS, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    _no_half_artifact(ws)
    again = _stage(ws, COMPRESS)
    assert again.returncode == 0, again.stderr[-2000:]
    _no_half_artifact(ws)
    assert _digest(ws, "checkpoints", "self-s0-gptq") == baseline[2]
    assert _running_runs(ws) == []
