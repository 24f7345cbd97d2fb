"""One grid slice run with different ``--jobs`` (and GPUs): the scaling table, from each run's flow log
(``run.log``: the filtered Prefect log a run folder keeps) and its nvidia-smi samples (``gpu.csv``).

What it reads from the log, as ``flows/pipeline.py`` writes it:

- ``Flow run 'NAME' - Beginning flow run ...`` and ``Flow run 'NAME' - Finished in state S``: the wall time;
- ``Flow run 'NAME' - N stage items (--only ...)``: how many items the run was given;
- ``Flow run 'NAME' - N item(s) at once: slot 0 (GPU 0, 8 CPU threads); ...``: the jobs and GPUs it had;
- ``Task run 'ITEM' - attempt K on slot S (GPU G, ...): dvc ...``: where each attempt ran;
- ``Task run 'ITEM' - Finished in state Completed()``: what finished (each exactly once, or the run is wrong).

The wall time is the flow's own (its start to its end), not the box's: setup and the transfers are the same
for every configuration and are left out of the comparison.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from selfcal.errors import DataError

_LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d+) \| \w+\s*\| (Flow|Task) run '([^']+)' - (.*)$")
_ATTEMPT = re.compile(r"^attempt (\d+) on slot (\d+) \((GPU (\S+?)|CPU),")
_AT_ONCE = re.compile(r"^(\d+) item\(s\) at once: (.*)$")
_PLANNED = re.compile(r"^(\d+) stage items\b")


@dataclass(frozen=True)
class Attempt:
    item: str
    attempt: int
    slot: int
    gpu: str | None  # None: a CPU slot


@dataclass
class FlowRun:
    """What one flow run did, from its log."""

    wall_seconds: float
    state: str
    jobs: int
    gpus: list[str]
    planned: int | None = None  # the items it was given (None: the log does not say)
    attempts: list[Attempt] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)

    def twice(self) -> list[str]:
        """Items that finished more than once (a scheduler bug: each item runs once)."""
        return sorted(i for i, n in Counter(self.completed).items() if n > 1)

    def gpu_of(self) -> dict[str, str | None]:
        """Each completed item's GPU: its last attempt's."""
        last: dict[str, Attempt] = {}
        for a in self.attempts:
            last[a.item] = a
        return {i: last[i].gpu for i in self.completed if i in last}


def read_flow_log(path: Path) -> FlowRun:
    """The first flow run in ``path`` (a run folder's ``run.log``); its clock times are one day's, a run past
    midnight included (a time earlier than the one before is the next day)."""
    start = end = None
    state, jobs, gpus, planned = "", 0, [], None
    attempts: list[Attempt] = []
    completed: list[str] = []
    flow = None
    day, previous = 0, None
    for raw in path.read_text().splitlines():
        m = _LINE.match(raw)
        if not m:
            continue
        clock, kind, name, message = m.groups()
        t = datetime.strptime(clock, "%H:%M:%S.%f")
        if previous is not None and t < previous - timedelta(hours=1):
            day += 1
        previous = t
        t += timedelta(days=day)
        if kind == "Flow":
            if flow is None and message.startswith("Beginning flow run"):
                flow, start = name, t
            elif name == flow and message.startswith("Finished in state "):
                end, state = t, message.removeprefix("Finished in state ").split("(")[0]
                break
            elif name == flow and (given := _PLANNED.match(message)):
                planned = int(given.group(1))
            elif name == flow and (at_once := _AT_ONCE.match(message)):
                jobs = int(at_once.group(1))
                gpus = sorted(set(re.findall(r"\(GPU (\S+?),", at_once.group(2))))
            continue
        if flow is None:
            continue
        if a := _ATTEMPT.match(message):
            attempts.append(Attempt(name, int(a.group(1)), int(a.group(2)), a.group(4)))
        elif message == "Finished in state Completed()":
            completed.append(name)
    if start is None or end is None:
        raise DataError(f"{path}: no flow run that began and finished (a run cut short has no wall time)")
    return FlowRun((end - start).total_seconds(), state, jobs, gpus, planned, attempts, completed)


@dataclass(frozen=True)
class ScalingRow:
    label: str
    gpus: int
    jobs: int
    wall_seconds: float
    speedup: float | None  # over the --jobs 1 run of the same items; None without one
    busy: dict[str, float]  # per GPU (nvidia-smi index): busy fraction over the flow's sampled span
    items: int
    planned: int | None
    once: bool  # every item finished exactly once
    per_gpu: dict[str, int]  # items finished per GPU


def scaling_rows(runs: list[tuple[str, FlowRun, dict[str, float]]]) -> list[ScalingRow]:
    """One row per run, speed-ups over the ``--jobs 1`` run. The runs must have finished the same items (a
    comparison of different work is no speed-up): refused, naming the difference."""
    if not runs:
        raise DataError("no runs to compare")
    items = {label: set(run.completed) for label, run, _ in runs}
    first_label = runs[0][0]
    for label, done in items.items():
        if done != items[first_label]:
            diff = sorted(done ^ items[first_label])
            raise DataError(
                f"runs {first_label} and {label} finished different items ({len(diff)}: {', '.join(diff[:3])}...)"
            )
    base = next((run.wall_seconds for _, run, _ in runs if run.jobs == 1), None)
    rows = []
    for label, run, busy in runs:
        per_gpu = Counter(g or "CPU" for g in run.gpu_of().values())
        rows.append(
            ScalingRow(
                label,
                len(run.gpus),
                run.jobs,
                run.wall_seconds,
                base / run.wall_seconds if base else None,
                busy,
                len(set(run.completed)),
                run.planned,
                not run.twice(),
                dict(sorted(per_gpu.items())),
            )
        )
    return rows


def scaling_markdown(rows: list[ScalingRow]) -> str:
    """The README's scaling table: GPUs, jobs, wall, speed-up over ``--jobs 1``, busy per GPU, items."""
    lines = [
        "| run | GPUs | jobs | wall | speed-up over --jobs 1 | busy per GPU | items done (each once) | items per GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        busy = ", ".join(f"{g}: {100 * b:.0f}%" for g, b in sorted(r.busy.items())) or "-"
        per = ", ".join(f"{g}: {n}" for g, n in r.per_gpu.items())
        speed = f"{r.speedup:.2f}×" if r.speedup is not None else "-"
        lines.append(
            f"| {r.label} | {r.gpus} | {r.jobs} | {r.wall_seconds / 60:.1f} min | {speed} | {busy} | "
            f"{r.items}{'' if r.planned is None else f' of {r.planned}'} ({'yes' if r.once else '**no**'}) | {per} |"
        )
    return "\n".join(lines) + "\n"
