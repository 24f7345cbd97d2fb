"""MLflow adapter: one parent run per pipeline execution, one nested run per stage item.

DVC starts every stage as its own process, so the stages find their common parent
run by an *execution id*: ``$SELFCAL_EXECUTION_ID`` when an orchestrator sets it
(the Prefect flow does), otherwise the pid and start time of the enclosing
``dvc`` process, which is the same for every stage of one ``dvc repro``.
"""

from __future__ import annotations

import functools
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selfcal.config import Params

log = logging.getLogger(__name__)
EXECUTION_ENV = "SELFCAL_EXECUTION_ID"
_TAG_EXEC = "selfcal.execution_id"
_TAG_STAGE = "selfcal.stage"


def _dvc_ancestor() -> str | None:
    """Identify the enclosing ``dvc`` process (pid + start tick) from /proc, if any."""
    pid = os.getppid()
    for _ in range(8):
        if pid <= 1:
            return None
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        args = [part.decode(errors="replace") for part in cmd[:3]]
        if any(Path(a).name == "dvc" for a in args[:2]) or args[1:3] == ["-m", "dvc"]:
            start = stat.rsplit(")", 1)[1].split()[19]
            return f"dvc-{pid}-{start}"
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None


@functools.cache
def _process_execution_id() -> str:
    """Outside DVC and Prefect, the steps one process runs belong to one execution."""
    return _dvc_ancestor() or f"standalone-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def execution_id() -> str:
    return os.environ.get(EXECUTION_ENV) or _process_execution_id()


def tracking_uri(params: Params) -> str:
    if params.tracking.tracking_uri:
        return params.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    params.state_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(params.state_dir / 'mlflow.db').resolve()}"


def _experiment_id(mlflow, params: Params) -> str:
    name = params.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = (params.state_dir / "mlartifacts").resolve()
    return mlflow.create_experiment(name, artifact_location=artifacts.as_uri())


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class StageRun:
    """What a stage may record; a no-op when tracking is disabled."""

    def __init__(self, mlflow=None):
        self._mlflow = mlflow

    @property
    def run_id(self) -> str | None:
        if self._mlflow is None:
            return None
        return self._mlflow.active_run().info.run_id

    def params(self, values: dict) -> None:
        if self._mlflow is not None:
            flat = {k: str(v)[:6000] for k, v in flatten(values).items()}
            self._mlflow.log_params(flat)

    def metrics(self, values: dict[str, float]) -> None:
        if self._mlflow is not None:
            self._mlflow.log_metrics({k: float(v) for k, v in values.items() if v is not None})

    def tags(self, values: dict[str, Any]) -> None:
        if self._mlflow is not None:
            self._mlflow.set_tags({k: str(v) for k, v in values.items()})

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            self._mlflow.log_artifact(str(path), artifact_path=artifact_path)


@contextmanager
def stage_run(params: Params, stage: str, item: str) -> Iterator[StageRun]:
    if not params.tracking.enabled:
        yield StageRun()
        return
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(params))
    exp_id = _experiment_id(mlflow, params)
    exec_id = execution_id()
    found = mlflow.search_runs(
        experiment_ids=[exp_id],
        filter_string=f"tags.`{_TAG_EXEC}` = '{exec_id}' and tags.`{_TAG_STAGE}` = 'pipeline'",
        output_format="list",
        max_results=1,
    )
    parent_kwargs = {"run_id": found[0].info.run_id} if found else {"run_name": f"pipeline {exec_id}"}
    with mlflow.start_run(experiment_id=exp_id, **parent_kwargs) as parent:
        mlflow.set_tags({_TAG_EXEC: exec_id, _TAG_STAGE: "pipeline"})
        with mlflow.start_run(experiment_id=exp_id, run_name=f"{stage}@{item}", nested=True):
            mlflow.set_tags({_TAG_EXEC: exec_id, _TAG_STAGE: stage, "selfcal.item": item})
            log.info("MLflow: run %s under pipeline run %s", mlflow.active_run().info.run_id, parent.info.run_id)
            yield StageRun(mlflow)
