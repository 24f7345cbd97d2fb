"""Prefect flow that runs the DVC pipeline stage by stage.

It orchestrates; it does not reimplement: every task is a ``dvc repro`` of one
stage, so a flow run and a researcher's ``dvc repro`` produce the same artifacts
and the same dvc.lock. All stages of one flow run share one MLflow parent run
through ``SELFCAL_EXECUTION_ID``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from selfcal.tracking import EXECUTION_ENV

STAGES = ("generate", "inspect", "compress", "evaluate", "evaluate_dense", "aggregate")


@task(retries=1, retry_delay_seconds=5, task_run_name="dvc repro {stage}")
def repro_stage(stage: str, workdir: str, execution_id: str, force: bool = False) -> str:
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    logger.info("%s (in %s)", " ".join(cmd), workdir)
    env = {**os.environ, EXECUTION_ENV: execution_id}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        logger.info(line)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"dvc repro {stage} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


@flow(name="selfcal-pipeline", log_prints=True)
def pipeline(workdir: str = ".", force: bool = False) -> str | None:
    """generate -> compress -> evaluate -> aggregate, each a retried task."""
    root = str(Path(workdir).resolve())
    execution_id = f"prefect-{flow_run.get_id() or 'local'}"
    for stage in STAGES:
        repro_stage(stage, root, execution_id, force)
    report = Path(root) / "artifacts" / "report" / "results.md"
    if report.is_file():
        create_markdown_artifact(key="selfcal-results", markdown=report.read_text(), description="aggregate table")
        return report.read_text()
    return None


if __name__ == "__main__":
    pipeline()
