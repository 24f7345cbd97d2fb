"""One grid slice run with different ``--jobs`` (and GPUs): the scaling table, from each run's flow log
(``run.log``: the filtered Prefect log a run folder keeps) and its nvidia-smi samples (``gpu.csv``).

What it reads from the log, as ``flows/pipeline.py`` writes it:

- ``Flow run 'NAME' - Beginning flow run ...`` and ``Flow run 'NAME' - Finished in state S``: the wall time;
- ``Flow run 'NAME' - N stage items (--only ...)``: how many items the run was given;
- ``Flow run 'NAME' - N item(s) at once: slot 0 (GPU 0, 8 CPU threads); ...``: the jobs and GPUs it had;
- ``Task run 'ITEM' - attempt K on slot S (GPU G, ...): dvc ...``: where each attempt ran;
- ``Task run 'ITEM' - Finished in state Completed()``: what finished (each exactly once, or the run is wrong).

The wall time is the flow's own (its start to its end), not the box's: setup and the transfers are the same
for every configuration and are left out of the comparison. One box's runs (``--jobs``): a fan-out run's
items run on other workers and say so differently.
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
    """What one flow run did, from its log. ``start`` and ``end`` are clock times on day 0 of the log (a run
    past midnight ends on day 1)."""

    start: datetime
    end: datetime
    state: str
    jobs: int
    gpus: list[str]
    planned: int | None = None  # the items it was given (None: the log does not say)
    attempts: list[Attempt] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)  # stage items only (not the remote's pull and push tasks)

    @property
    def wall_seconds(self) -> float:
        return (self.end - self.start).total_seconds()

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
    """The last flow run in ``path`` (a run folder's ``run.log``) that began and finished: a log appended
    across starts (a run cut short, then started again) holds several. Clock times are one day's, a run past
    midnight included (a time more than an hour earlier than the one before is the next day; lines from
    concurrent tasks are a few ms out of order). A task's "Finished" counts as a stage item's only if the
    task ran a stage (an ``attempt`` line): the remote's pull and push tasks are not items."""
    finished: FlowRun | None = None
    current: FlowRun | None = None
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
            if message.startswith("Beginning flow run"):
                flow, current = name, FlowRun(t, t, "", 0, [])
            elif current is None or name != flow:
                continue
            elif message.startswith("Finished in state "):
                current.end, current.state = t, message.removeprefix("Finished in state ").split("(")[0]
                ran = {a.item for a in current.attempts}
                current.completed = [i for i in current.completed if i in ran]
                finished, current = current, None
            elif given := _PLANNED.match(message):
                current.planned = int(given.group(1))
            elif at_once := _AT_ONCE.match(message):
                current.jobs = int(at_once.group(1))
                current.gpus = sorted(set(re.findall(r"\(GPU (\S+?),", at_once.group(2))))
            continue
        if current is None:
            continue
        if a := _ATTEMPT.match(message):
            current.attempts.append(Attempt(name, int(a.group(1)), int(a.group(2)), a.group(4)))
        elif message == "Finished in state Completed()":
            current.completed.append(name)
    if finished is None:
        raise DataError(f"{path}: no flow run that began and finished (a run cut short has no wall time)")
    return finished


def in_sequence(runs: list[FlowRun]) -> FlowRun:
    """Runs of disjoint items one after the other, as one: walls add up (the slice's ``--jobs 1`` is longer
    than a lease: one run per source, on one box or several). Same jobs, no item in two of them."""
    if len({r.jobs for r in runs}) != 1:
        raise DataError(f"runs in sequence must have the same jobs, not {sorted({r.jobs for r in runs})}")
    done = [i for r in runs for i in r.completed]
    if len(set(done)) != len(done):
        raise DataError("runs in sequence share items: " + ", ".join(sorted({i for i in done if done.count(i) > 1})))
    first = runs[0]
    end = first.start + timedelta(seconds=sum(r.wall_seconds for r in runs))
    states = {r.state for r in runs}
    return FlowRun(
        first.start,
        end,
        states.pop() if len(states) == 1 else "+".join(r.state for r in runs),
        first.jobs,
        sorted({g for r in runs for g in r.gpus}),
        None if any(r.planned is None for r in runs) else sum(r.planned for r in runs),
        [a for r in runs for a in r.attempts],
        done,
    )


def flow_window(run: FlowRun, first_sample: datetime) -> tuple[datetime, datetime]:
    """The flow's start and end as dates, from the log's clock times and the first nvidia-smi sample's date (the
    sampler starts before the flow, minutes at most: a flow clock more than an hour before the first sample is
    the next day's)."""
    since = datetime.combine(first_sample.date(), run.start.time()) + timedelta(
        days=(run.start - datetime(1900, 1, 1)).days
    )
    if since < first_sample - timedelta(hours=1):
        since += timedelta(days=1)
    elif since > first_sample + timedelta(hours=12):  # sampling began before midnight, the flow just before it
        since -= timedelta(days=1)
    return since, since + timedelta(seconds=run.wall_seconds)


@dataclass(frozen=True)
class ScalingRow:
    label: str
    gpus: int
    jobs: int
    wall_seconds: float
    speedup: float | None  # over the --jobs 1 run of the same items; None without one
    busy: dict[str, float]  # per GPU (nvidia-smi index): busy fraction over the flow's run
    items: int
    planned: int | None
    once: bool  # every item finished exactly once
    per_gpu: dict[str, int]  # items finished per GPU


def scaling_rows(runs: list[tuple[str, FlowRun, dict[str, float]]]) -> list[ScalingRow]:
    """One row per run, speed-ups over the ``--jobs 1`` run. The runs must have finished the same items (a
    comparison of different work is no speed-up): refused, naming the difference."""
    if not runs:
        raise DataError("no runs to compare")
    failed = [f"{label} ({run.state})" for label, run, _ in runs if run.state != "Completed"]
    if failed:
        raise DataError(f"runs that did not complete have no wall time to compare: {', '.join(failed)}")
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
