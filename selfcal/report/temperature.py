"""The temperature-schedule sweep's grid (the paper's Figure 4) from its rows: one cell per (t_initial, t_final),
the same cells for the README's table and the heatmap, so the two can never disagree on a value or on which
cells are still short of sets."""

from __future__ import annotations

from dataclasses import dataclass

from selfcal.report import metric_display


@dataclass(frozen=True)
class Cell:
    """One schedule's value of a metric: the mean over its sets, their std (None where fewer than two sets have
    the metric: ``aggregate.summarise`` measures none), how many sets are
    in and how many the profile asks for."""

    value: float
    std: float | None
    sets: int
    of: int

    @property
    def short(self) -> bool:
        return self.sets < self.of


def temperature_grid(rows: list[dict], metric: str) -> tuple[list[float], list[float], dict[tuple[int, int], Cell]]:
    """``rows`` (one method's: ``t_initial``, ``t_final``, ``metric``; optionally ``metric.std``, ``sets``, default
    1, and ``of``, default the fullest row's sets) as the sorted t_initial and t_final axes (every row's, so each
    metric's grid has the same axes) and the cells that have the metric, keyed by (t_initial index, t_final
    index)."""
    t0s = sorted({r["t_initial"] for r in rows})
    t1s = sorted({r["t_final"] for r in rows})
    full = max((r.get("sets", 1) for r in rows), default=0)
    k = metric_display.scale(metric)
    cells = {}
    for r in rows:
        if r.get(metric) is None:
            continue
        sets = r.get("sets", 1)
        std = r.get(metric + ".std")
        key = (t0s.index(r["t_initial"]), t1s.index(r["t_final"]))
        cells[key] = Cell(k * r[metric], None if std is None else k * std, sets, r.get("of", full))
    return t0s, t1s, cells


def temperature_markdown(rows: list[dict], metric: str) -> str:
    """One method's grid as a table: t_initial down, t_final across, mean ± std over the sets, a cell short of
    the profile's sets saying how many it has ("-": none yet)."""
    t0s, t1s, cells = temperature_grid(rows, metric)
    if not cells:
        return f"_no schedule has {metric} yet_\n"
    lines = [
        "| t_initial ↓, t_final → | " + " | ".join(f"{t:g}" for t in t1s) + " |",
        "|---|" + "---|" * len(t1s),
    ]
    for i, t0 in enumerate(t0s):
        texts = []
        for j in range(len(t1s)):
            cell = cells.get((i, j))
            if cell is None:
                texts.append("-")
                continue
            text = metric_display.number(cell.value, metric)
            if cell.std is not None:
                text += f" ± {metric_display.number(cell.std, metric)}"
            if cell.short:
                text += f" ({cell.sets} of {cell.of})"
            texts.append(text)
        lines.append(f"| **{t0:g}** | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"
