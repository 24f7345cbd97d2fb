"""Prefect flow: the DVC pipeline, one retried task per stage item.

It orchestrates and does not reimplement: every task is ``dvc repro
--single-item ITEM``, so a flow run and a researcher's ``dvc repro`` produce the
same artifacts and the same dvc.lock. One task per *item* (``compress@self-0-gptq``,
not ``compress``) so that a failure retries that item alone and the UI shows
which one failed. Items run one after another: a GPU box runs one at a time, and
DVC allows one ``dvc`` process per workspace anyway.

The whole run holds the workspace lock (``selfcal.workspace_lock``), so a second
run against the same checkout waits or fails with one line naming the first.
A killed run leaves no half-written output (stages write atomically; DVC records
an item in dvc.lock only once it finished), and the next run skips every item
DVC already has: from the workspace, or from the run-cache when the outputs were
lost. All items of a run share one MLflow parent run through SELFCAL_EXECUTION_ID.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from flows.dvc_items import GUARD_STAGE, outcome, stage_items
from flows.dvc_process import run_dvc
from flows.summary import RESULTS_ARTIFACT, run_summary
from selfcal.config import DEFAULT_PARAMS, PARAMS_ENV, load_params
from selfcal.lineage.tracking import EXECUTION_ENV
from selfcal.pipeline import layout
from selfcal.pipeline.guard import guard
from selfcal.profiles import apply_profile
from selfcal.scratch import sweep_scratch
from selfcal.workspace_lock import lock_path, workspace_lock

# Remote sync around the run. The run-cache goes both ways so that a worker can
# skip any item another worker already computed with the same code and params.
REMOTE_SYNC = {
    "pull": ["pull", "--run-cache", "--allow-missing"],
    "push": ["push", "--run-cache"],
}


def _dvc_env(execution_id: str) -> dict[str, str]:
    """This process's environment for dvc and its stages, with the run's MLflow execution id.

    Without $SELFCAL_PARAMS: the stages must read the params.yaml DVC tracks, whatever the shell says.
    """
    return {**{k: v for k, v in os.environ.items() if k != PARAMS_ENV}, EXECUTION_ENV: execution_id}


@task(name="dvc-repro", task_run_name="{item}", cache_policy=NO_CACHE)
def repro_item(item: str, root: str, execution_id: str, force: bool, pull: bool, timeout: float | None) -> dict:
    logger = get_run_logger()
    args = ["repro", "--single-item", item, *(["--force"] if force else []), *(["--pull"] if pull else [])]
    logger.info("attempt %d: dvc %s", task_run.run_count, " ".join(args))
    start = time.monotonic()
    lines = run_dvc(args, cwd=Path(root), env=_dvc_env(execution_id), on_line=logger.info, timeout=timeout)
    return {
        "item": item,
        "outcome": outcome(item, lines),
        "attempts": task_run.run_count,
        "seconds": round(time.monotonic() - start, 1),
    }


@task(name="dvc-remote", task_run_name="dvc {action}", cache_policy=NO_CACHE)
def remote_sync(action: str, root: str, execution_id: str, timeout: float | None) -> None:
    logger = get_run_logger()
    run_dvc(REMOTE_SYNC[action], cwd=Path(root), env=_dvc_env(execution_id), on_line=logger.info, timeout=timeout)


def _prepare(root: Path, profile: str | None, logger) -> Path:
    """Install the profile, validate params, clear a killed run's scratch; returns the report's path."""
    if profile:
        changed = apply_profile(root, profile)
        logger.info("profile %s: %s", profile, "installed as params.yaml" if changed else "already params.yaml")
    params = load_params(root / DEFAULT_PARAMS)  # one clear line now, not one failed task per item later
    for path in sweep_scratch(params.artifacts_dir):
        logger.info("removed scratch left by an interrupted stage: %s", path)
    # The guard stage's work, done here once under the run's lock: `selfcal check` before any item
    # (so DVC deletes no output of an item whose params would be refused) and its constant output,
    # which every other stage depends on. The `guard` item itself is not run (always changed).
    logger.info("guard: %s", guard(params))
    return layout.results_markdown(params)


@flow(name="selfcal-pipeline")
def pipeline(
    workdir: str = ".",
    profile: str | None = None,
    force: bool = False,
    sync_remote: bool = False,
    retries: int = 2,
    retry_delay_seconds: float = 30,
    timeout_seconds: float | None = None,
    lock_timeout: float = 0,
) -> str:
    """generate -> inspect -> compress -> evaluate -> aggregate, one task per stage item.

    profile: name under profiles/ (or a path) installed as params.yaml first; None keeps params.yaml.
    force: re-run items DVC considers up to date.
    sync_remote: `dvc pull` before and `dvc push` after, with the run-cache, on DVC's default remote.
    retries, retry_delay_seconds: per item, so a failure re-runs only that item.
    timeout_seconds: per attempt of one item; the item's processes are killed when it passes.
    lock_timeout: how long to wait for another run holding this workspace before failing.
    """
    logger = get_run_logger()
    root = Path(workdir).resolve()
    run_id = flow_run.get_id() or "local"
    execution_id = f"prefect-{run_id}"
    options = {"retries": retries, "retry_delay_seconds": retry_delay_seconds}

    def waiting(holder) -> None:
        logger.info(
            "workspace busy (%s); waiting up to %g s", holder.describe() if holder else "unknown holder", lock_timeout
        )

    label = f"selfcal-pipeline flow run '{flow_run.get_name()}' ({run_id})"
    with workspace_lock(root, label=label, timeout=lock_timeout, on_wait=waiting):
        logger.info("holding %s", lock_path(root))
        report = _prepare(root, profile, logger)
        if sync_remote:
            remote_sync.with_options(**options)("pull", str(root), execution_id, timeout_seconds)
        items = [i for i in stage_items(root) if i != GUARD_STAGE]
        logger.info("%d stage items: %s", len(items), ", ".join(items))
        results = [
            repro_item.with_options(**options)(item, str(root), execution_id, force, sync_remote, timeout_seconds)
            for item in items
        ]
        if sync_remote:
            remote_sync.with_options(**options)("push", str(root), execution_id, timeout_seconds)
    summary = run_summary(results, report, profile)
    create_markdown_artifact(
        key=RESULTS_ARTIFACT, markdown=summary, description="selfcal: aggregate table and what each stage item did"
    )
    return summary


if __name__ == "__main__":
    pipeline()
