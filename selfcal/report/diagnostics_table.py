"""The calibration-set diagnostics as one Markdown table (``artifacts/report/diagnostics.md``)."""

from __future__ import annotations

# The paper's Table 4 columns first (Williams et al.: PPL, Rep., n-gram div., Cov., Zipf), then the rest.
DIAGNOSTIC_COLUMNS = (
    ("perplexity", "ppl", "{:.2f}"),
    ("repetition", "rep.", "{:.3f}"),
    ("ngram_diversity", "n-gram div.", "{:.3f}"),
    ("vocab_coverage", "vocab cov.", "{:.3f}"),
    ("zipf", "zipf", "{:.2f}"),
    ("pooled_perplexity", "pooled ppl", "{:.2f}"),
    ("seq_rep_4", "seq-rep-4", "{:.3f}"),
    ("distinct_product", "dist. product", "{:.4f}"),
    ("segment_len_mean", "gen. len", "{:.0f}"),
)
# The activation distance to the reference (its own section of each record), where one was given.
ACTIVATION_COLUMNS = (
    ("mean_rel_distance_avg", "act. mean dist", "{:.3f}"),
    ("logvar_abs_distance_avg", "act. logvar dist", "{:.3f}"),
)


def _head(first: list[str], rows: list[dict]) -> tuple[list[str], bool]:
    has_act = any("activation" in r for r in rows)
    head = [*first, *[c[1] for c in DIAGNOSTIC_COLUMNS], *([c[1] for c in ACTIVATION_COLUMNS] if has_act else [])]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)], has_act


def diagnostics_markdown(rows: list[dict]) -> str:
    lines, has_act = _head(["set", "kind"], rows)
    for r in rows:
        cells = [r["calibration"], str(r.get("kind"))]
        cells += [fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in DIAGNOSTIC_COLUMNS]
        if has_act:
            act = r.get("activation", {})
            cells += [fmt.format(act[key]) if act else "-" for key, _, fmt in ACTIVATION_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_source_markdown(rows: list[dict]) -> str:
    """Each source's sets summarised: mean ± std over its sets of every measure (the paper's Table 4 reports one
    value per source); the per-set rows are ``diagnostics_markdown``'s."""
    import statistics
    from collections import defaultdict

    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[str(r.get("source") or r["calibration"].rsplit("-s", 1)[0])].append(r)
    lines, has_act = _head(["source", "kind", "sets"], rows)

    def cell(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        sd = f" ± {fmt.format(statistics.stdev(values))}" if len(values) > 1 else ""
        return fmt.format(statistics.fmean(values)) + sd

    for source, members in groups.items():
        cells = [source, str(members[0].get("kind")), str(len(members))]
        cells += [cell([m[k] for m in members if m.get(k) is not None], fmt) for k, _, fmt in DIAGNOSTIC_COLUMNS]
        if has_act:
            acts = [m["activation"] for m in members if m.get("activation")]
            cells += [cell([a[key] for a in acts], fmt) for key, _, fmt in ACTIVATION_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
