"""The committed studies trace, model by model, from the files committed under reports/.

Every version registered in every run folder's MLflow store (reports/*/runs/*/.selfcal/mlflow.db, or packed as
mlflow-store.tar.xz: what came
back from each GPU lease of the SmolLM2 study, and the stories260K pruning re-run) must trace through
``selfcal.lineage.trace`` with nothing missing, to the calibration set and checkpoint whose manifests came
back beside it (same content digests), the model's params as the stage recorded them, the code commit (in
this repository's history), the base model, and, once it is scored, to the same metrics the run's metrics
file holds. This is the auditor's question asked of the studies themselves: a model in a report that does
not trace fails here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from selfcal.lineage.run_store import has_store, store_db
from tests.helpers import REPO as ROOT

# reports/STUDY/runs/RUN, and a sweep's own runs beside the grid's: reports/STUDY/SWEEP/runs/RUN
RUNS = sorted(p for p in (ROOT / "reports").glob("**/runs/*") if p.is_dir() and has_store(p))


@pytest.fixture(autouse=True)
def _store_cache(tmp_path_factory, monkeypatch):
    """Packed stores unpack into this session's temporary folder, not the user's cache."""
    monkeypatch.setenv("SELFCAL_STORE_CACHE", str(tmp_path_factory.getbasetemp() / "run-stores"))


def _versions(run: Path):
    from mlflow.tracking import MlflowClient

    from selfcal.lineage import store

    client = MlflowClient(tracking_uri=f"sqlite:///{store_db(run)}")  # plain, or the packed store unpacked
    return client, store.all_versions(client)


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text())


def _in_history(commit: str) -> bool | None:
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    if shallow != "false":
        return None  # a shallow clone cannot say
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT).returncode == 0


def test_the_study_has_runs_with_registered_models():
    assert any("SmolLM2" in str(r) for r in RUNS), "no SmolLM2 run folder with an MLflow store under reports/"
    assert sum(len(_versions(run)[1]) for run in RUNS) >= 5


@pytest.mark.parametrize("run", RUNS, ids=[str(r.relative_to(ROOT / "reports")) for r in RUNS])
def test_every_registered_model_traces_to_its_committed_files(run):
    from selfcal.lineage.trace import trace

    client, versions = _versions(run)
    assert versions
    for version in versions:
        where = f"{run.name}: {version.name}:{version.version}"
        lineage = trace(client, version)
        assert lineage["missing"] == [], where
        ckpt, cal, code, base = lineage["checkpoint"], lineage["calibration"], lineage["code"], lineage["base_model"]
        item = Path(ckpt["path"]).name  # e.g. c4-s2-gptq
        ckpt_manifest = _manifest(run / "artifacts" / "checkpoints" / item / "manifest.json")
        assert ckpt["digest"] == ckpt_manifest["content_digest"], where
        assert ckpt["method"] == ckpt_manifest["method"] and ckpt["method_params"] == ckpt_manifest["method_params"]
        assert ckpt["recipe"] == ckpt_manifest["recipe"], where
        cal_manifest = _manifest(run / "artifacts" / "calibration" / item.rsplit("-", 1)[0] / "manifest.json")
        assert cal["digest"] == cal_manifest["content_digest"] == ckpt_manifest["calibration"]["digest"], where
        assert (cal["source"], cal["seed"]) == (cal_manifest["source"], cal_manifest["seed"]), where
        assert base["digest"] == ckpt_manifest["base_model"]["digest"], where
        assert len(code["git_commit"] or "") == 40 and code["code_digest"], where
        assert _in_history(code["git_commit"]) in (True, None), f"{where}: commit {code['git_commit']} not in history"
        metrics_file = run / "artifacts" / "metrics" / f"{item}.json"
        if metrics_file.is_file():
            assert lineage["metrics"] is not None, f"{where}: scored but no metrics linked"
            committed = json.loads(metrics_file.read_text())
            shared = sorted(set(lineage["metrics"]["values"]) & set(committed))
            assert shared, f"{where}: the linked metrics and {metrics_file.name} share no key"
            for key in shared:
                assert lineage["metrics"]["values"][key] == pytest.approx(committed[key]), f"{where}: {key}"
