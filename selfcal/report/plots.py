"""Sweep plots as PNG files (matplotlib, headless). Inputs are plain rows, so a plot can be
redrawn from a CSV without re-running anything."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from selfcal.artifacts import atomic_write_bytes
from selfcal.report import metric_display


def _save(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_vs_n(rows: list[dict], path: Path, *, metric: str = "mean_acc", title: str = "") -> None:
    """One line per ``label`` (e.g. source or method): mean ± std of ``metric`` against set size n (accuracies in %,
    perplexities as they are, on a log axis)."""
    plt = _pyplot()
    ppl = metric_display.is_perplexity(metric)
    scale = metric_display.scale(metric)
    lines: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None:
            lines[r["label"]].append((r["n"], scale * r[metric], scale * (r.get(metric + ".std") or 0.0)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.errorbar(
            [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=label
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration set size n (sequences)")
    if ppl:
        ax.set_yscale("log")
    ax.set_ylabel(f"{metric} (lower is better)" if ppl else f"{metric} (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def temperature_heatmap(rows: list[dict], path: Path, *, metric: str = "mean_acc", title: str = "") -> None:
    """``metric`` over the (t_initial, t_final) grid of the self-calibration schedule: the cells of
    ``selfcal.report.temperature.temperature_grid`` (the README's table has the same), perplexities coloured on
    a log scale and reversed, so that better is brighter either way; a cell short of sets says how many it has,
    an empty one stays blank."""
    import math

    from selfcal.report.temperature import temperature_grid

    plt = _pyplot()
    ppl = metric_display.is_perplexity(metric)
    t0s, t1s, cells = temperature_grid(rows, metric)
    shown = [[float("nan")] * len(t1s) for _ in t0s]
    for (i, j), cell in cells.items():
        shown[i][j] = math.log10(cell.value) if ppl and cell.value > 0 else cell.value
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(shown, origin="lower", cmap="viridis_r" if ppl else "viridis")
    ax.set_xticks(range(len(t1s)), [f"{t:g}" for t in t1s])
    ax.set_yticks(range(len(t0s)), [f"{t:g}" for t in t0s])
    ax.set_xlabel("t_final")
    ax.set_ylabel("t_initial")
    for (i, j), cell in cells.items():
        text = metric_display.number(cell.value, metric) + (f"\n({cell.sets} of {cell.of})" if cell.short else "")
        r, g, b, _ = im.cmap(im.norm(shown[i][j]))
        ink = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"  # legible on light and dark cells
        ax.text(j, i, text, ha="center", va="center", color=ink, fontsize=7)
    fig.colorbar(im, ax=ax, label=f"log10 {metric} (lower is better)" if ppl else f"{metric} (%)")
    ax.set_title(title)
    _save(fig, path)
    plt.close(fig)
