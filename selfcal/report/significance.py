"""Does self-calibration beat, match or lose to a real-data source? Welch's t-test over the calibration sets.

The paper's claim (Williams et al., Sec. 5 and Table 2) is comparative: self-calibration is competitive with,
and often better than, real calibration data. Each cell of a study is a mean and sample std over its sets (5
in the paper's protocol), so the comparison is a two-sample test on those summaries with unequal variances:
Welch's t, t = (m1 - m2) / sqrt(s1^2/n1 + s2^2/n2), Welch-Satterthwaite degrees of freedom, two-sided p
(``scipy.stats.ttest_ind_from_stats(..., equal_var=False)``). "matches" means no difference at ``alpha``; with
five sets a side only large differences are detectable, which the report says beside the verdicts.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from selfcal.report import metric_display

REAL_SOURCES = ("c4", "wikitext", "cosmopedia")
# The paper's appendix names its sources so; our sources are keyed in lower case.
PAPER_SOURCES = {"c4": "C4", "wikitext": "WikiText", "cosmopedia": "Cosmopedia", "self": "Self"}


@dataclass(frozen=True)
class Comparison:
    method: str
    other: str
    self_mean: float
    other_mean: float
    t: float
    p: float
    n_self: int
    n_other: int
    verdict: str  # "beats" | "matches" | "loses" (self against other), or "n/a" with fewer than two sets a side


def welch(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int) -> tuple[float, float]:
    """Welch's t and its two-sided p from two samples' means, sample stds and sizes."""
    from scipy.stats import ttest_ind_from_stats

    if s1 == 0 and s2 == 0:  # identical sets on both sides: a difference is certain, none is no difference
        return (math.inf if m1 > m2 else -math.inf if m1 < m2 else 0.0), (0.0 if m1 != m2 else 1.0)
    res = ttest_ind_from_stats(m1, s1, n1, m2, s2, n2, equal_var=False)
    return float(res.statistic), float(res.pvalue)


def verdict(t: float, p: float, alpha: float, *, higher_is_better: bool = True) -> str:
    if p >= alpha:
        return "matches"
    better = t > 0 if higher_is_better else t < 0
    return "beats" if better else "loses"


def compare_self(
    table: list[dict],
    metric: str = "mean_acc",
    *,
    self_source: str = "self",
    others: tuple[str, ...] = REAL_SOURCES,
    alpha: float = 0.05,
) -> list[Comparison]:
    """For each method: ``self_source`` against every other source present, on ``metric`` (the aggregate's table:
    one row per method x source with ``metric``, ``metric.std`` and ``n_sets``)."""
    higher = not metric.startswith("ppl.")
    cells = {(r["method"], r["source"]): r for r in table if r.get(metric) is not None}
    out = []
    for (method, source), mine in sorted(cells.items()):
        if source != self_source:
            continue
        for other in others:
            theirs = cells.get((method, other))
            if theirs is None:
                continue
            n1, n2 = mine["n_sets"], theirs["n_sets"]
            m1, m2 = mine[metric], theirs[metric]
            s1, s2 = mine.get(metric + ".std"), theirs.get(metric + ".std")
            if n1 < 2 or n2 < 2 or s1 is None or s2 is None:  # no std: fewer than two sets have the metric
                out.append(Comparison(method, other, m1, m2, math.nan, math.nan, n1, n2, "n/a"))
                continue
            t, p = welch(m1, s1, n1, m2, s2, n2)
            out.append(Comparison(method, other, m1, m2, t, p, n1, n2, verdict(t, p, alpha, higher_is_better=higher)))
    return out


def paper_comparisons(csv_path: Path, *, alpha: float = 0.05, sets: int = 5) -> list[dict]:
    """The same test on the paper's appendix tables (``../shared/reference``): per model and method, Self against
    C4, WikiText and Cosmopedia on the ten-task mean, each cell a mean and std over ``sets`` sets."""
    rows = list(csv.DictReader(Path(csv_path).open()))
    cells = {(r["model"], r["method"], r["calib"]): r for r in rows}
    out = []
    for (model, method, calib), mine in sorted(cells.items()):
        if calib != "Self":
            continue
        for key in REAL_SOURCES:
            theirs = cells.get((model, method, PAPER_SOURCES[key]))
            if theirs is None or not mine.get("mean10_std") or not theirs.get("mean10_std"):
                continue
            m1, s1 = float(mine["mean10"]), float(mine["mean10_std"])
            m2, s2 = float(theirs["mean10"]), float(theirs["mean10_std"])
            t, p = welch(m1, s1, sets, m2, s2, sets)
            out.append({"model": model, "method": method, "other": key, "verdict": verdict(t, p, alpha)})
    return out


def comparison_markdown(ours: list[Comparison], paper: list[dict], metric: str, alpha: float = 0.05) -> str:
    """Our verdicts per method and source, beside how often the paper's five models got each verdict."""
    scale, unit = metric_display.scale(metric), metric_display.unit(metric)
    tally: dict[tuple[str, str], dict[str, int]] = {}
    for r in paper:
        counts = tally.setdefault((r["method"].lower(), r["other"]), {"beats": 0, "matches": 0, "loses": 0})
        counts[r["verdict"]] += 1
    lines = [
        f"| method | self vs | self{unit} | other{unit} | Welch t | p | here | the paper (5 models): beats / matches / "
        "loses |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in ours:
        counts = tally.get((c.method, c.other))
        paper_cell = f"{counts['beats']} / {counts['matches']} / {counts['loses']}" if counts else "-"
        t = "-" if math.isnan(c.t) else f"{c.t:+.2f}"
        p = "-" if math.isnan(c.p) else f"{c.p:.3f}"
        lines.append(
            f"| {c.method} | {c.other} | {scale * c.self_mean:.2f} | {scale * c.other_mean:.2f} | {t} | {p} | "
            f"**{c.verdict}** | {paper_cell} |"
        )
    note = (
        f'\n\nWelch\'s t over the calibration sets (n each side as run), two-sided, alpha {alpha}: "matches" is no '
        "detectable difference, not proof of equality; with five sets a side (two in the sweeps) only differences of "
        "a few stds show. "
        "The paper's column applies the same test to its appendix tables (ten-task mean, five sets)."
    )
    return "\n".join(lines) + note + "\n"
