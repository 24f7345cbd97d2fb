"""GPU time of a run from its nvidia-smi samples (``gpu.csv`` beside a run folder's records).

``tools/study_box.sh start`` samples ``nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used
--format=csv,noheader -lms 1000`` for as long as the run goes (older runs: without ``index``, one GPU). The
report's GPU-hours are the sampled span times the GPUs seen (what the run held), beside the busy GPU-hours (each
sample's utilization times its interval): the gap is start-up, waiting and the tail of the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

Samples = dict[str, list[tuple[datetime, float, float]]]  # per GPU index: (time, utilization %, memory MiB)


@dataclass(frozen=True)
class GpuUsage:
    gpus: int
    span_seconds: float  # first to last sample
    busy_gpu_seconds: float  # sum over GPUs and samples of utilization x the sampling interval
    peak_memory_mib: float  # the largest memory.used of any one GPU

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.span_seconds / 3600

    @property
    def busy_fraction(self) -> float:
        return self.busy_gpu_seconds / (self.gpus * self.span_seconds) if self.span_seconds else 0.0


def read_gpu_csv(path: Path) -> GpuUsage | None:
    """The samples of ``path``; None when it holds fewer than two (nothing to measure)."""
    series = list(gpu_samples(path).values())
    if not series:
        return None
    start = min(s[0][0] for s in series)
    end = max(s[-1][0] for s in series)
    busy = sum(_busy_seconds(s) for s in series)
    peak = max(m for s in series for _, _, m in s)
    return GpuUsage(len(series), (end - start).total_seconds(), busy, peak)


def busy_per_gpu(samples: Samples, since: datetime | None = None, until: datetime | None = None) -> dict[str, float]:
    """Each GPU's busy fraction (nvidia-smi's index; ``gpu_samples``) over the sampled span, or over [since,
    until] (a flow's own run: the sampler starts before it and goes on after, and ``start`` appends across
    runs): on a box of several GPUs, whether the work was spread over all of them."""
    if since is not None or until is not None:
        lo, hi = since or datetime.min, until or datetime.max
        samples = {g: kept for g, s in samples.items() if len(kept := [x for x in s if lo <= x[0] <= hi]) > 1}
    if not samples:
        return {}
    start = since or min(s[0][0] for s in samples.values())
    end = until or max(s[-1][0] for s in samples.values())
    span = (end - start).total_seconds()
    return {gpu: _busy_seconds(s) / span if span else 0.0 for gpu, s in sorted(samples.items())}


def first_sample_time(samples: Samples) -> datetime | None:
    """When the sampler's first good line was written (gpu.csv has dates, a flow log only clock times)."""
    return min((s[0][0] for s in samples.values()), default=None)


def _busy_seconds(series: list[tuple[datetime, float, float]]) -> float:
    """Each sample's utilization times the interval to the next."""
    pairs = zip(series, series[1:], strict=False)
    return sum(u0 / 100 * (t1 - t0).total_seconds() for (t0, u0, _), (t1, _, _) in pairs)


def gpu_samples(path: Path) -> Samples:
    """Per GPU index, its (time, utilization %, memory MiB) samples in time order; GPUs with fewer than two
    samples left out."""
    samples: Samples = {}
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) not in (3, 4) or not parts[-1].endswith("MiB") or not parts[-2].endswith("%"):
            continue  # a header, an error line of nvidia-smi, a cut last line
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
            util, mem = float(parts[-2].removesuffix("%")), float(parts[-1].removesuffix("MiB"))
        except ValueError:
            continue
        samples.setdefault(parts[1] if len(parts) == 4 else "0", []).append((t, util, mem))
    return {gpu: sorted(s) for gpu, s in samples.items() if len(s) > 1}


def usage_markdown(rows: list[tuple[str, GpuUsage, int]]) -> str:
    """One row per run (label, usage, models it scored), and their total."""
    head = ["run", "GPUs", "sampled span", "GPU-hours held", "busy", "busy GPU-hours", "peak memory (one GPU)"]
    lines = ["| " + " | ".join([*head, "models scored"]) + " |", "|---|---|---|---|---|---|---|---|"]
    for label, u, models in rows:
        lines.append(
            f"| {label} | {u.gpus} | {u.span_seconds / 60:.1f} min | {u.gpu_hours:.2f} | {100 * u.busy_fraction:.0f}% "
            f"| {u.busy_gpu_seconds / 3600:.2f} | {u.peak_memory_mib / 1024:.1f} GiB | {models} |"
        )
    if len(rows) > 1:
        held = sum(u.gpu_hours for _, u, _ in rows)
        busy = sum(u.busy_gpu_seconds for _, u, _ in rows) / 3600
        lines.append(f"| total | | | {held:.2f} | | {busy:.2f} | | {sum(m for _, _, m in rows)} |")
    return "\n".join(lines) + "\n"
