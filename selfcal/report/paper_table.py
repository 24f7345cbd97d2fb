"""The paper's comparison table: calibration sources as rows, compression methods as columns.

Each cell is the mean (± std over calibration sets) of one metric; the best source of each
column is bold, so "does self-calibration win for this method?" is read down a column, as in
Williams et al.'s tables. Ties (equal at the printed precision) are all marked.
"""

from __future__ import annotations


def _cell(entry: dict | None, col: str, scale: float, digits: int) -> tuple[str, float | None]:
    """One cell's text and its rounded mean; ``± std`` wherever the summary measured one (two values or more),
    even when it is 0 (identical sets)."""
    if entry is None or entry.get(col) is None:
        return "-", None
    mean, std = entry[col], entry.get(col + ".std")
    rounded = round(scale * mean, digits)
    text = f"{rounded:.{digits}f}" + (f" ± {scale * std:.{digits}f}" if std is not None else "")
    return text, rounded


def source_method_table(
    table: list[dict], col: str, *, lower_is_better: bool = False, scale: float = 100.0, digits: int = 1
) -> str:
    """Markdown for one metric column of ``aggregate.summarise``'s table."""
    methods = [m for m in dict.fromkeys(e["method"] for e in table) if m != "none"]
    sources = [s for s in dict.fromkeys(e["source"] for e in table) if s != "none"]
    by_key = {(e["method"], e["source"]): e for e in table}
    cells = {(m, s): _cell(by_key.get((m, s)), col, scale, digits) for m in methods for s in sources}
    best = {}
    for m in methods:
        values = [v for s in sources if (v := cells[(m, s)][1]) is not None]
        best[m] = (min if lower_is_better else max)(values) if values else None
    lines = ["| source | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    dense = by_key.get(("none", "none"))
    if dense is not None:
        text = _cell(dense, col, scale, digits)[0]
        lines.append("| *dense (uncompressed)* | " + " | ".join([text] * len(methods)) + " |")
    for s in sources:
        row = []
        for m in methods:
            text, value = cells[(m, s)]
            row.append(f"**{text}**" if value is not None and value == best[m] else text)
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
