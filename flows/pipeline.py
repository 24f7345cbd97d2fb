"""Prefect flow: the DVC pipeline, one retried task per stage item.

It orchestrates and does not reimplement: every task is ``dvc repro
--single-item ITEM``, so a flow run and a researcher's ``dvc repro`` produce the
same artifacts and the same dvc.lock. One task per *item* (``compress@self-0-gptq``,
not ``compress``) so that a failure retries that item alone and the UI shows
which one failed.

Up to ``jobs`` items run at once (Prefect's ``ThreadPoolTaskRunner``), each as soon as every item
whose outputs it reads has finished, each on its own device slot (``flows/slots.py``: a free GPU
through ``CUDA_VISIBLE_DEVICES``, ``slots_per_gpu`` items per GPU, or a share of the CPU cores).
Concurrent ``dvc repro --single-item`` processes are DVC's documented way to run stages in
parallel: DVC releases its repo lock while a stage's command runs and takes it again to record the
outputs, and ``--wait-for-lock`` makes every ``dvc`` wait for those short phases instead of failing
after 3 s (which would throw a finished stage's work away). dvc.lock is rewritten under that lock,
re-read each time, so every item's entry lands. With ``fan_out`` the items instead run as flow
runs of the ``selfcal-item`` deployment (``flows/item.py``) on whichever worker of the pool is free.

The whole run holds the workspace lock (``selfcal.workspace_lock``), so a second
run against the same checkout waits or fails with one line naming the first.
A killed run leaves no half-written output (stages write atomically; DVC records
an item in dvc.lock only once it finished), and the next run skips every item
DVC already has: from the workspace, or from the run-cache when the outputs were
lost. All items of a run share one MLflow parent run through SELFCAL_EXECUTION_ID.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run

from flows import mps as gpu_mps
from flows.dvc_items import GUARD_STAGE, outcome, select_items, stage_graph
from flows.dvc_process import kill_running, run_dvc
from flows.item import ItemRunError, parse_item_result
from flows.schedule import run_in_order
from flows.slots import SlotPool, plan_slots, visible_gpus
from flows.summary import RESULTS_ARTIFACT, run_summary
from selfcal.config import DEFAULT_PARAMS, PARAMS_ENV, load_params
from selfcal.lineage.tracking import EXECUTION_ENV, close_pipeline_run, open_pipeline_run
from selfcal.pipeline import layout
from selfcal.pipeline.guard import guard
from selfcal.profiles import apply_profile
from selfcal.scratch import sweep_scratch
from selfcal.workspace_lock import lock_path, workspace_lock

# Remote sync around the run. The run-cache goes both ways so that a worker can
# skip any item another worker already computed with the same code and params.
# How much longer than an item's own --timeout the coordinator waits for its flow run on a worker.
FAN_OUT_MARGIN_SECONDS = 900
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
def repro_item(
    item: str, root: str, execution_id: str, force: bool, pull: bool, timeout: float | None, slots: SlotPool
) -> dict:
    logger = get_run_logger()
    args = ["repro", "--single-item", item, *(["--force"] if force else []), *(["--pull"] if pull else [])]
    with slots.take() as slot:
        logger.info("attempt %d on %s: dvc %s", task_run.run_count, slot.describe(), " ".join(args))
        start = time.monotonic()
        env = {**_dvc_env(execution_id), **slot.env()}
        lines = run_dvc(["--wait-for-lock", *args], cwd=Path(root), env=env, on_line=logger.info, timeout=timeout)
    return {
        "item": item,
        "outcome": outcome(item, lines),
        "attempts": task_run.run_count,
        "seconds": round(time.monotonic() - start, 1),
        "where": slot.describe(),
    }


class RemoteRuns:
    """The flow runs this coordinator has on workers, by its execution id: what a stop must cancel. A stopped
    ``selfcal run --fan-out`` (SIGTERM, Ctrl-C) submitted nothing more, but the items it had sent ran on to
    their end on the workers, writing and registering after the run that asked for them was gone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, set] = {}
        self._stopped: set[str] = set()

    def add(self, execution_id: str, run_id) -> bool:
        """Track ``run_id``; False (and not tracked) when that execution was stopped meanwhile."""
        with self._lock:
            if execution_id in self._stopped:
                return False
            self._runs.setdefault(execution_id, set()).add(run_id)
            return True

    def discard(self, execution_id: str, run_id) -> None:
        with self._lock:
            self._runs.get(execution_id, set()).discard(run_id)

    def tracked(self, execution_id: str, run_id) -> bool:
        with self._lock:
            return run_id in self._runs.get(execution_id, set())

    def stop(self, execution_id: str) -> list:
        """Mark the execution stopped; the runs it had in flight, now untracked (so their waits end)."""
        with self._lock:
            self._stopped.add(execution_id)
            return sorted(self._runs.pop(execution_id, set()), key=str)

    def stopped(self, execution_id: str) -> bool:
        with self._lock:
            return execution_id in self._stopped


REMOTE_RUNS = RemoteRuns()
STOPPED_MESSAGE = "selfcal: the run that sent it was stopped"


@task(name="dvc-repro-remote", task_run_name="{item}", cache_policy=NO_CACHE)
def fan_out_item(item: str, deployment: str, parameters: dict, timeout: float | None) -> dict:
    """One item as a flow run of the per-item deployment, on whichever worker of its pool is free. A run that
    does not complete raises, so the task's retries submit it again, to any worker: failed, crashed (its worker
    died: nothing half-written is left, stages write atomically and DVC records only finished items), or still
    not final after ``timeout`` (a box that vanished reports nothing; the run is cancelled first). When the
    coordinator is stopped, its in-flight runs are cancelled (``_fan_out``) and the item ends at once."""
    logger = get_run_logger()
    logger.info("attempt %d: %s on deployment %s", task_run.run_count, item, deployment)
    start = time.monotonic()
    run = submit_item(deployment, {"item": item, **parameters}, timeout)
    state = run.state
    if REMOTE_RUNS.stopped(parameters["execution_id"]) and (state is None or not state.is_completed()):
        raise ItemRunError(f"{item}: flow run {run.name} cancelled: the run was stopped")
    if state is None or not state.is_final():
        cancel_flow_run(run.id)
        raise ItemRunError(f"{item}: flow run {run.name} had no final state after {timeout:g} s; cancelled it")
    if not state.is_completed():
        raise ItemRunError(f"{item}: flow run {run.name} ended {state.type.value}: {state.message or ''}".strip())
    result = parse_item_result(state.message or "")
    if result.get("upstream_ran"):  # the remote lacked an upstream item's outputs: computed there a second time
        result["outcome"] += f" (and upstream {', '.join(result['upstream_ran'])} recomputed on {result['where']})"
    result.update({"attempts": task_run.run_count, "seconds": round(time.monotonic() - start, 1)})
    logger.info("%s: %s on %s", item, result.get("outcome"), result.get("where"))
    return result


def submit_item(deployment: str, parameters: dict, timeout: float | None, poll_seconds: float = 2):
    """A flow run of ``deployment``, waited for (at most ``timeout`` s); Prefect's FlowRun with its state.
    Created first and tracked in ``REMOTE_RUNS`` while it is waited for (``run_deployment`` with a timeout
    would block with the run's id out of reach of a stop); the wait is the poll ``run_deployment`` itself runs
    (``prefect/deployments/flow_runs.py``, ``read_flow_run`` until a final state or the timeout), which here also
    ends when a stop untracks the run."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    execution_id = parameters["execution_id"]
    run = run_deployment(deployment, parameters=parameters, timeout=0, as_subflow=True)
    if not REMOTE_RUNS.add(execution_id, run.id):  # the stop came while it was being created
        cancel_flow_run(run.id, STOPPED_MESSAGE)
        return run
    start = time.monotonic()
    try:
        with get_client(sync_client=True) as client:
            while True:
                run = client.read_flow_run(run.id)
                if run.state is not None and run.state.is_final():
                    return run
                if not REMOTE_RUNS.tracked(execution_id, run.id):  # stopped: cancelled by the coordinator
                    return run
                if timeout is not None and time.monotonic() - start >= timeout:
                    return run
                time.sleep(poll_seconds)
    finally:
        REMOTE_RUNS.discard(execution_id, run.id)


def cancel_flow_run(flow_run_id, message: str = "selfcal: no result in time") -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message=message), force=True)


def cancel_in_flight(execution_id: str, logger) -> None:
    """A stopped fan-out: no item is submitted again (the retry condition) and every flow run still in flight
    on a worker is cancelled; its worker then ends the item's process (the deployment's own cancellation)."""
    runs = REMOTE_RUNS.stop(execution_id)
    for run_id in runs:
        try:
            cancel_flow_run(run_id, STOPPED_MESSAGE)
        except Exception as err:  # a server gone with the stop: say which run may go on
            logger.warning("could not cancel flow run %s: %s", run_id, err)
    if runs:
        logger.warning("stopped: cancelled %d flow run(s) in flight on the workers", len(runs))


@task(name="dvc-remote", task_run_name="dvc {action}", cache_policy=NO_CACHE)
def remote_sync(action: str, root: str, execution_id: str, timeout: float | None) -> None:
    logger = get_run_logger()
    run_dvc(REMOTE_SYNC[action], cwd=Path(root), env=_dvc_env(execution_id), on_line=logger.info, timeout=timeout)


def _prepare(root: Path, profile: str | None, logger, *, stages_here: bool = True):
    """Install the profile, validate params, clear a killed run's scratch; returns the params."""
    checked = None
    if profile:  # checked whole (`selfcal check`) before it replaces params.yaml
        changed, checked = apply_profile(root, profile)
        logger.info("profile %s: %s", profile, "installed as params.yaml" if changed else "already params.yaml")
    params = load_params(root / DEFAULT_PARAMS)  # one clear line now, not one failed task per item later
    for path in sweep_scratch(params.artifacts_dir):
        logger.info("removed scratch left by an interrupted stage: %s", path)
    # The guard stage's work, done here once under the run's lock: `selfcal check` before any item
    # (so DVC deletes no output of an item whose params would be refused; the profile's own check when one
    # was just installed) and its constant output, which every other stage depends on. The `guard` item
    # itself is not run (always changed).
    logger.info("guard: %s", guard(params, checked=checked, stages_here=stages_here))
    return params


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
    jobs: int = 1,
    slots_per_gpu: int = 1,
    fan_out: str | None = None,
    only: list[str] | None = None,
    mps: bool = False,
) -> str:
    """generate -> inspect -> compress -> evaluate -> aggregate, one task per stage item.

    profile: name under profiles/ (or a path) installed as params.yaml first; None keeps params.yaml.
    force: re-run items DVC considers up to date.
    sync_remote: `dvc pull` before and `dvc push` after, with the run-cache, on DVC's default remote.
    retries, retry_delay_seconds: per item, so a failure re-runs only that item.
    timeout_seconds: per attempt of one item; the item's processes are killed when it passes.
    lock_timeout: how long to wait for another run holding this workspace before failing.
    jobs: items at once; an item starts when every item it reads from has finished.
    slots_per_gpu: items that may share one GPU (small models); jobs are capped at GPUs x slots_per_gpu.
    fan_out: a deployment (`selfcal-item/NAME`, flows/item.py) to run each item on the pool's workers
      instead of here; artifacts travel through the DVC remote and its run-cache.
    only: shell-style patterns of items to run (``evaluate@self-*``), each with what it reads: one chunk of a
      grid when a lease is shorter than the grid; None runs every item.
    mps: items sharing a GPU run their kernels side by side through a CUDA MPS daemon of the run's own
      (``flows/mps.py``); where it cannot start, they take turns as without it, and the log says why.
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
        params = _prepare(root, profile, logger, stages_here=not fan_out)
        parent = open_pipeline_run(params, execution_id)  # before items start, so they all find one parent
        graph = {i: [d for d in deps if d != GUARD_STAGE] for i, deps in stage_graph(root).items() if i != GUARD_STAGE}
        graph = select_items(graph, only)
        logger.info("%d stage items%s: %s", len(graph), f" (--only {' '.join(only)})" if only else "", ", ".join(graph))
        failed = True
        try:
            if fan_out:
                outcome_of = _fan_out(root, graph, fan_out, execution_id, force, jobs, timeout_seconds, options, logger)
            else:
                if sync_remote:
                    remote_sync.with_options(**options)("pull", str(root), execution_id, timeout_seconds)
                with _gpu_sharing(root, plan_slots(jobs, visible_gpus(), slots_per_gpu), mps, logger) as slots:
                    logger.info("%d item(s) at once: %s", len(slots), "; ".join(s.describe() for s in slots))
                    pool = SlotPool(slots)
                    common = {"root": str(root), "execution_id": execution_id, "force": force, "pull": sync_remote}
                    stopping = threading.Event()

                    def stop() -> None:  # a stop ends the running items now, not when they finish, and their
                        stopping.set()  # retries do not wait out their delay (--retry-delay) to be cancelled
                        kill_running()

                    outcome_of = run_in_order(
                        graph,
                        repro_item.with_options(**options, retry_condition_fn=lambda *_: not stopping.is_set()),
                        lambda item: {"item": item, **common, "timeout": timeout_seconds, "slots": pool},
                        jobs=len(slots),
                        on_event=logger.warning,
                        on_abort=stop,
                    )
                if sync_remote and not outcome_of.failed:
                    remote_sync.with_options(**options)("push", str(root), execution_id, timeout_seconds)
            failed = bool(outcome_of.failed)
        finally:
            kill_running()  # an interrupted flow leaves no dvc (or stage) of its own running
            close_pipeline_run(params, parent, failed=failed)
    summary = run_summary(outcome_of.results, layout.results_markdown(params), profile, outcome_of.not_run())
    create_markdown_artifact(
        key=RESULTS_ARTIFACT, markdown=summary, description="selfcal: aggregate table and what each stage item did"
    )
    if outcome_of.failed:
        raise ItemRunError(outcome_of.failure_line())
    return summary


@contextmanager
def _gpu_sharing(root: Path, slots, use_mps: bool, logger):
    """The slots, handing the MPS daemon the run starts to their items (``use_mps``); where items share a GPU,
    the log says how they take it. On the way out, however it is left, the items' processes are ended, then
    the daemon (``quit`` waits for its clients)."""
    gpus = list(dict.fromkeys(s.gpu for s in slots if s.gpu is not None))  # plan_slots: all GPU slots, or none
    started = use_mps and bool(gpus)
    try:
        daemon = None
        if use_mps and not gpus:
            logger.warning("--mps: no GPU here, so nothing to share: ignored")
        elif use_mps:
            try:
                daemon = gpu_mps.start(root, device_order=slots[0].env().get("CUDA_DEVICE_ORDER"))
                # the slots use a prefix of the visible GPUs, in their order: the server's numbering of them
                index = gpu_mps.client_devices(gpus)
                slots = [
                    replace(s, extra=(*daemon.env().items(), ("CUDA_VISIBLE_DEVICES", index[s.gpu])))
                    if s.gpu is not None
                    else s
                    for s in slots
                ]
            except gpu_mps.MpsUnavailable as e:
                logger.warning("--mps: %s: items that share a GPU take turns on it (time-slicing)", e)
        if len(slots) > len(gpus) > 0:
            logger.info("items sharing a GPU take it by %s", daemon.describe() if daemon else gpu_mps.sharing())
        yield slots
    finally:
        if started:
            kill_running()
            outcome = gpu_mps.stop(gpu_mps.home(root) / "pipe")
            if outcome == "left":
                logger.warning("--mps: the MPS daemon at %s does not quit", gpu_mps.home(root) / "pipe")
            elif outcome != "none":
                logger.info("MPS daemon ended (%s)", outcome)


def _fan_out(root: Path, graph, deployment: str, execution_id: str, force: bool, jobs: int, timeout, options, logger):
    """Every item as a flow run of ``deployment`` (``selfcal-item/NAME``) on the pool's workers, dependencies
    first, ``jobs`` at once. Each worker's workspace is brought to this run's commit and params first; the
    artifacts travel through the DVC remote (outputs and run-cache), the lineage to the shared MLflow store."""
    from flows.item import workspace_state

    commit, params_text = workspace_state(root)
    parameters = {
        "execution_id": execution_id,
        "git_commit": commit,
        "params_yaml": params_text,
        "force": force,
        "timeout_seconds": timeout,
    }
    logger.info("fanning %d item(s) out to deployment %s, %d at once (commit %s)", len(graph), deployment, jobs, commit)
    return run_in_order(
        graph,
        fan_out_item.with_options(**options, retry_condition_fn=lambda *_: not REMOTE_RUNS.stopped(execution_id)),
        lambda item: {
            "item": item,
            "deployment": deployment,
            "parameters": {**parameters, "deps": graph[item]},
            # a worker must pick it up, sync and restore its inputs before the item's own limit starts
            "timeout": None if timeout is None else timeout + FAN_OUT_MARGIN_SECONDS,
        },
        jobs=jobs,
        on_event=logger.warning,
        on_abort=lambda: cancel_in_flight(execution_id, logger),
    )
