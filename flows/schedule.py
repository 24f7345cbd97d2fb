"""Run a graph of stage items through a Prefect task runner: dependencies first, at most ``jobs`` at once.

An item is submitted only when every item it reads from has completed and one of the ``jobs`` places is free,
so no submitted task sits on a worker thread waiting for its inputs (Prefect's own ``wait_for`` resolves
inside the worker thread, which would hold one of the ``jobs`` places while idle). The upstream futures
still go in ``wait_for``, so the Prefect UI draws the dependency edges. An item that fails after its
retries stops only the items that read from it; every independent item still runs, and the outcome names
what failed and what never ran.

Of the items ready at once, the one furthest down the graph goes first (evaluate before compress before
generate, then dvc.yaml's order): each model is finished end to end as early as it can be, so a run cut short
(a GPU lease that ends, a chunk of a grid) leaves complete results (measured on the H200: submitting every ready
item at once queued all twenty of C4's compress items ahead of any evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner


@dataclass
class Outcome:
    results: list[dict] = field(default_factory=list)  # completed items' results, in completion order
    failed: dict[str, str] = field(default_factory=dict)  # item -> why (its last error)
    blocked: dict[str, str] = field(default_factory=dict)  # item -> the failed item it waited for

    def not_run(self) -> dict[str, str]:
        """Every item that did not complete, with why: for the run's summary."""
        failed = {i: f"failed: {why}" for i, why in self.failed.items()}
        return failed | {i: f"not run: {dep} failed" for i, dep in self.blocked.items()}

    def failure_line(self) -> str:
        first, why = next(iter(self.failed.items()))
        rest = f" ({len(self.failed) - 1} more failed)" if len(self.failed) > 1 else ""
        skipped = f"; {len(self.blocked)} item(s) after it not run" if self.blocked else ""
        return f"{why}{rest}{skipped}" if why.startswith(first) else f"{first}: {why}{rest}{skipped}"


def _reason(future) -> str:
    state = future.state
    try:
        future.result()
    except BaseException as err:  # the task's own exception: the stage's one-line reason
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return state.message or state.type.value


def run_in_order(
    graph: dict[str, list[str]],
    task,
    parameters_of: Callable[[str], dict],
    *,
    jobs: int,
    on_event=None,
    on_abort: Callable[[], None] | None = None,
) -> Outcome:
    """Run every item of ``graph`` (item -> the items it depends on, dependencies first) as ``task`` with
    ``parameters_of(item)``; at most ``jobs`` at once. ``on_abort``: called when the loop is left by an exception
    (Prefect's termination signal on SIGTERM, Ctrl-C), before the task runner waits for the running tasks: it
    must end them (``kill_running``), or a stopped run went on until every running item had finished."""
    out = Outcome()
    with ThreadPoolTaskRunner(max_workers=jobs) as runner:
        try:
            _schedule(graph, task, parameters_of, runner, out, jobs=jobs, on_event=on_event)
        except BaseException:
            if on_abort is not None:
                on_abort()
            raise
    return out


def _schedule(graph, task, parameters_of, runner, out: Outcome, *, jobs: int, on_event) -> None:
    futures: dict = {}
    running: dict = {}  # future -> item
    done: set[str] = set()
    order = {item: i for i, item in enumerate(graph)}
    depth = depths(graph)
    pending = list(graph)
    while pending or running:
        for item in list(pending):
            bad = next((d for d in graph[item] if d in out.failed or d in out.blocked), None)
            if bad is not None:
                out.blocked[item] = out.blocked.get(bad, bad)
                pending.remove(item)
                if on_event:
                    on_event(f"{item}: not run, {out.blocked[item]} failed")
        ready = sorted((i for i in pending if all(d in done for d in graph[i])), key=lambda i: (-depth[i], order[i]))
        for item in ready[: max(0, jobs - len(running))]:
            fut = runner.submit(task, parameters_of(item), wait_for=[futures[d] for d in graph[item]])
            futures[item], running[fut] = fut, item
            pending.remove(item)
        if not running:
            break
        finished = next(as_completed(list(running)))
        item = running.pop(finished)
        finished.wait()  # as_completed can yield before the future has read its final state
        if finished.state.is_completed():
            done.add(item)
            out.results.append(finished.result())
        else:
            out.failed[item] = _reason(finished)
            if on_event:
                on_event(f"{item}: failed: {out.failed[item]}")


def depths(graph: dict[str, list[str]]) -> dict[str, int]:
    """Each item's longest chain of items it reads from (generate 0, compress 1, evaluate 2 ...); ``graph`` lists
    dependencies first."""
    depth: dict[str, int] = {}
    for item, deps in graph.items():
        depth[item] = 1 + max((depth[d] for d in deps), default=-1)
    return depth
