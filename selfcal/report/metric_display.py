"""How a headline metric column is shown, in one place: ``mean_acc`` (a fraction, shown in % to 0.1 point) and
``ppl.NAME`` (a perplexity, shown as it is to 0.01, lower is better). The tables, the significance test's
table, the sweep plots and the temperature grid all print through these."""

from __future__ import annotations


def is_perplexity(metric: str) -> bool:
    return metric.startswith("ppl.")


def scale(metric: str) -> float:
    """Accuracies are shown in %, perplexities as they are."""
    return 1.0 if is_perplexity(metric) else 100.0


def digits(metric: str) -> int:
    return 2 if is_perplexity(metric) else 1


def number(value: float, metric: str) -> str:
    """An already scaled value as the tables print it."""
    return f"{value:.{digits(metric)}f}"


def unit(metric: str) -> str:
    """What a heading or column adds after the metric's name: " (%)" for accuracies, nothing for perplexities."""
    return "" if is_perplexity(metric) else " (%)"


def file_name(stem: str, metric: str) -> str:
    """A per-metric plot: ``STEM.png`` for mean accuracy, ``STEM-wikitext2.png`` for ``ppl.wikitext2``."""
    return f"{stem}.png" if metric == "mean_acc" else f"{stem}-{metric[4:]}.png"


def label(metric: str) -> str:
    """A heading's name for the metric: "mean zero-shot accuracy" or "wikitext2 perplexity (lower is better)"."""
    return f"{metric[4:]} perplexity (lower is better)" if is_perplexity(metric) else "mean zero-shot accuracy"
