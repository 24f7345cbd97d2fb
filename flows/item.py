"""Prefect flow ``selfcal-item``: one DVC stage item on whichever worker of the pool took it.

The pipeline flow with ``fan_out`` submits each item of a night's grid as a flow run of this flow's
deployment, dependencies first; workers of one work pool take them as they come free, so several GPU
boxes share one grid. Each worker has its own workspace (a clone of the repository: the deployment's
pull step moves into ``$SELFCAL_WORKSPACE``), its own DVC cache and lock; what they share is the DVC
remote (outputs and run-cache) and the MLflow server. A flow run here:

1. takes the workspace lock (one item per workspace at a time; a second waits);
2. brings the workspace to the coordinator's commit and params (``git fetch`` + ``reset --hard``, then
   the coordinator's params.yaml, validated), so every worker computes with the same code and params;
3. restores the item's upstream items from the remote's run-cache (``dvc repro --pull DEPS``: outputs
   another worker pushed, "Stage '…' is cached - skipping run"), then runs the item itself
   (``dvc repro --single-item ITEM``);
4. pushes its outputs and the run-cache (``dvc push --run-cache``), so the next item, on any worker,
   finds them;
5. ends Completed with ``{"item", "outcome", "where"}`` as its state message, which the coordinator reads.

A worker that dies mid-item leaves nothing half-written (stages write atomically, DVC records an item
only once it finished and pushed); its flow run ends Crashed, and the coordinator submits the item
again, to any worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed

from flows.dvc_items import GUARD_STAGE, outcome, ran_items
from flows.dvc_process import run_dvc
from selfcal.config import DEFAULT_PARAMS, PARAMS_ENV, load_params
from selfcal.errors import ConfigError, SelfcalError
from selfcal.lineage.tracking import EXECUTION_ENV
from selfcal.pipeline.guard import guard
from selfcal.workspace_lock import workspace_lock

WORKSPACE_ENV = "SELFCAL_WORKSPACE"  # where a worker keeps its workspace (the deployment's pull step reads it)
WORKER_ENV = "SELFCAL_WORKER"  # a worker's name in the results (default: host:workspace)


class ItemRunError(SelfcalError):
    """A stage item did not complete (on this box or on a worker)."""


def workspace_state(root: Path) -> tuple[str | None, str]:
    """(git commit, params.yaml text) of the coordinator's workspace: what every worker must match."""
    proc = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    commit = proc.stdout.strip() if proc.returncode == 0 else None
    return commit, (root / DEFAULT_PARAMS).read_text()


def parse_item_result(message: str) -> dict:
    try:
        result = json.loads(message)
    except ValueError:
        raise ItemRunError(f"item flow run ended without its result (state message {message[:200]!r})") from None
    if not isinstance(result, dict) or "item" not in result:
        raise ItemRunError(f"item flow run ended with an unexpected result: {message[:200]!r}")
    return result


def _git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"git {' '.join(args)} in {root}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc.stdout.strip()


def sync_workspace(root: Path, commit: str | None, params_yaml: str, logger) -> None:
    """Bring this workspace to the coordinator's commit and params (under the workspace lock)."""
    from selfcal.config import parse_params, read_yaml

    if commit and _git(root, "rev-parse", "HEAD") != commit:
        logger.info("workspace at %s; moving it to %s", _git(root, "rev-parse", "--short", "HEAD"), commit[:12])
        _git(root, "fetch", "--quiet", "origin")
        lock = root / "dvc.lock"
        kept = lock.read_bytes() if lock.is_file() else None
        _git(root, "reset", "--quiet", "--hard", commit)
        if kept is not None:  # this box's own record of its outputs stays (flows/sync_workspace.sh says why)
            lock.write_bytes(kept)
    path = root / DEFAULT_PARAMS
    if not path.is_file() or path.read_text() != params_yaml:
        where = "the coordinator's params.yaml"
        parse_params(read_yaml(params_yaml, source=where), source=where, root=root)  # refused before it is written
        path.write_text(params_yaml)
        logger.info("params.yaml replaced by the coordinator's")


def _env(execution_id: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != PARAMS_ENV}, EXECUTION_ENV: execution_id}


@flow(name="selfcal-item")
def item(
    item: str,
    execution_id: str,
    params_yaml: str,
    git_commit: str | None = None,
    deps: list[str] | None = None,
    force: bool = False,
    timeout_seconds: float | None = None,
    lock_timeout: float = 3600,
):
    """One stage item in this worker's workspace ($SELFCAL_WORKSPACE, else the current folder)."""
    logger = get_run_logger()
    root = Path(os.environ.get(WORKSPACE_ENV) or ".").resolve()
    where = os.environ.get(WORKER_ENV) or f"{socket.gethostname()}:{root}"
    label = f"selfcal-item flow run '{flow_run.get_name()}' ({item})"
    with workspace_lock(root, label=label, timeout=lock_timeout):
        sync_workspace(root, git_commit, params_yaml, logger)
        # The guard stage's work, as the pipeline flow does it: check the params here, write its constant output
        # (every stage reads it), all under this run's lock.
        logger.info("guard: %s", guard(load_params(root / DEFAULT_PARAMS)))
        env = _env(execution_id)
        common = {"cwd": root, "env": env, "on_line": logger.info, "timeout": timeout_seconds}
        upstream = []
        if deps:  # upstream outputs from the remote's run-cache, or computed here if nobody pushed them
            upstream = run_dvc(["--wait-for-lock", "repro", "--pull", *deps], **common)
        # --pull: an item another worker finished (and pushed) before a crash report reached the coordinator
        # is restored from the run-cache, not computed twice.
        args = ["--wait-for-lock", "repro", "--pull", "--single-item", item, *(["--force"] if force else [])]
        lines = run_dvc(args, **common)
        run_dvc(["push", "--run-cache"], **common)
    result = {
        "item": item,
        "outcome": outcome(item, lines),
        "where": where,
        # upstream items this worker had to compute because the remote did not have them (should be none)
        "upstream_ran": [i for i in ran_items(upstream) if i != GUARD_STAGE],
    }
    logger.info("%s: %s on %s", item, result["outcome"], where)
    return Completed(message=json.dumps(result))


if __name__ == "__main__":
    item()
