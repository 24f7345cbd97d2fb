"""The run's summary artifact: the aggregate table, and what happened to each item.

One keyed markdown artifact per run, so the Prefect UI's Artifacts page lists
every night's table under the same key, newest first.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

RESULTS_ARTIFACT = "selfcal-results"


def _items_table(results: list[dict], not_run: dict[str, str]) -> str:
    rows = [
        f"| {r['item']} | {r['outcome']} | {r['attempts']} | {r['seconds']:.1f} | {r.get('where', '')} |"
        for r in results
    ]
    rows += [f"| {item} | {why} | | | |" for item, why in not_run.items()]
    return "\n".join(["| item | outcome | attempts | seconds | where |", "|---|---|---|---|---|", *rows])


def run_summary(results: list[dict], report: Path, profile: str | None, not_run: dict[str, str] | None = None) -> str:
    """``report``: the aggregate's results.md (``layout.results_markdown``), if it was written; ``not_run``:
    the items that failed or never started, with why. ``results`` are in the order the items finished."""
    not_run = not_run or {}
    counts = Counter(r["outcome"] for r in results) + Counter(why.split(":")[0] for why in not_run.values())
    table = report.read_text().strip() if report.is_file() else "_no aggregate report was written_"
    counted = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
    return (
        "\n\n".join(
            [
                f"# selfcal run: {len(results) + len(not_run)} stage items ({counted})",
                f"Profile: `{profile}`" if profile else "Profile: params.yaml as checked out",
                "## Results",
                table,
                "## Stage items",
                _items_table(results, not_run),
            ]
        )
        + "\n"
    )
