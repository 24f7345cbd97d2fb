"""Step 4: one table of metrics per calibration source x method (mean +- std over seeds)."""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from collections import defaultdict
from pathlib import Path

from selfcal.artifacts import atomic_write_text
from selfcal.config import Params
from selfcal.errors import DataError
from selfcal.lineage.tracking import stage_run
from selfcal.pipeline import layout
from selfcal.records import MEAN_ACC, EvaluationRecord, metric_name, read_evaluation
from selfcal.report import metric_display

log = logging.getLogger("selfcal.aggregate")


def common_tasks(rows: list[EvaluationRecord]) -> list[str]:
    """The tasks every row scored: ``mean_acc`` is only comparable over one task set, so the
    report's mean is taken over this one (and says which it is), whatever each row averaged."""
    sets = [set(r.scored_tasks()) for r in rows]
    return sorted(set.intersection(*sets)) if sets else []


def _row_metrics(r: EvaluationRecord, shared: list[str]) -> dict[str, float]:
    values = r.metrics()
    values.pop(MEAN_ACC, None)
    if shared:
        values[MEAN_ACC] = sum(r.scored_tasks()[t] for t in shared) / len(shared)
    return values


def _columns(rows: list[EvaluationRecord], shared: list[str]) -> list[str]:
    tasks = sorted({t for r in rows for t in (r.zero_shot.tasks if r.zero_shot else {})})
    cols = [metric_name("acc", t) for t in tasks]
    if shared:
        cols.append(MEAN_ACC)
    cols += [metric_name("ppl", n) for n in sorted({n for r in rows for n in r.perplexity})]
    return cols


def summarise(rows: list[EvaluationRecord]) -> tuple[list[str], list[dict]]:
    """Group evaluation records by (method, source); mean, std and count over seeds per metric.

    The std is the sample std of the sets that have the metric, and None where fewer than two do: one value
    has no spread to measure, and a 0.0 there would read as sets that agree (which several identical sets,
    e.g. greedy decoding from BOS, do show as 0.0). Every table prints ``± std`` exactly where it is not None."""
    shared = common_tasks(rows)
    cols = _columns(rows, shared)
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r.method, r.source)].append(_row_metrics(r, shared))
    table = []
    for (method, source), members in sorted(groups.items(), key=lambda kv: (kv[0][0] != "none", kv[0])):
        entry = {"method": method, "source": source, "n_sets": len(members)}
        for c in cols:
            vals = [m[c] for m in members if m.get(c) is not None]
            entry[c] = statistics.fmean(vals) if vals else None
            entry[c + ".std"] = statistics.stdev(vals) if len(vals) > 1 else None
        table.append(entry)
    return cols, table


def report_metrics(cols: list[str], table: list[dict]) -> dict:
    """The aggregate's DVC metrics: {method: {source: {metric: mean}}}, shown by ``dvc metrics show``
    and as ``dvc exp show`` columns (``gptq.self.mean_acc``)."""
    out: dict = {}
    for e in table:
        out.setdefault(e["method"], {})[e["source"]] = {c: e[c] for c in cols if e[c] is not None}
    return out


def _fmt(mean: float | None, std: float | None, col: str) -> str:
    """``mean ± std`` where ``summarise`` measured a std (``± 0.0`` included: sets that score the same, as greedy
    decoding from BOS does, must not read as one set); the mean alone where it did not (one value)."""
    if mean is None:
        return "-"
    k = metric_display.scale(col)
    spread = f" ± {metric_display.number(k * std, col)}" if std is not None else ""
    return metric_display.number(k * mean, col) + spread


def unscored_tasks(rows: list[EvaluationRecord]) -> dict[str, str]:
    """Tasks some model did not score, with the first reason given: a table must not hide them."""
    out: dict[str, str] = {}
    for r in rows:
        reasons = {**r.skipped_tasks, **(r.zero_shot.failed if r.zero_shot else {})}
        for task, why in reasons.items():
            out.setdefault(task, f"{r.name}: {why}")
    return out


def to_markdown(
    cols: list[str], table: list[dict], unscored: dict[str, str] | None = None, mean_tasks: list[str] | None = None
) -> str:
    head = ["method", "source", "sets", *[c.removeprefix("acc.").replace("ppl.", "ppl ") for c in cols]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        cells = [e["method"], e["source"], str(e["n_sets"]), *[_fmt(e[c], e[c + ".std"], c) for c in cols]]
        lines.append("| " + " | ".join(cells) + " |")
    note = "Accuracy in % (lm-eval `acc`, zero-shot), mean ± std over calibration seeds; perplexity lower is better."
    if mean_tasks:
        note += f" `mean_acc` is over the {len(mean_tasks)} task(s) every row scored: {', '.join(mean_tasks)}."
    notes = [note] + [f"- `{task}` not scored ({why})" for task, why in sorted((unscored or {}).items())]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def by_source_markdown(cols: list[str], table: list[dict], mean_tasks: list[str] | None = None) -> str:
    """The paper's layout: calibration sources down, methods across, best source per method in bold."""
    from selfcal.report.paper_table import source_method_table

    parts = []
    for col in cols:
        if col == "mean_acc" or metric_display.is_perplexity(col):
            ppl = metric_display.is_perplexity(col)
            over = f" over {', '.join(mean_tasks)}" if mean_tasks else ""
            what = metric_display.label(col) + metric_display.unit(col) + ("" if ppl else over)
            parts.append(
                f"### {what}, mean ± std over calibration sets\n\n"
                + source_method_table(
                    table, col, lower_is_better=ppl, scale=metric_display.scale(col), digits=metric_display.digits(col)
                )
            )
    return "\n".join(parts)


def to_csv(cols: list[str], table: list[dict]) -> str:
    """One row per method x source; ``label`` (``gptq/c4``, ``dense``) names the row in one field, the y axis of
    dvc.yaml's bar plot (on ``source`` alone, every method's bar for a source was drawn in one place)."""
    fields = ["method", "source", "n_sets", *[x for c in cols for x in (c, c + ".std")], "label"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in table:
        label = "dense" if row["method"] == "none" else f"{row['method']}/{row['source']}"
        writer.writerow({**row, "label": label})
    return buf.getvalue()


def load_evaluations(files: list[Path]) -> list[EvaluationRecord]:
    """Only the records the current params produce: stale ones from removed items stay out."""
    missing = [f for f in files if not f.is_file()]
    if missing:
        more = ""
        if len(missing) > 1:
            names = ", ".join(f.stem for f in missing[1:6]) + (", ..." if len(missing) > 6 else "")
            more = f"and {len(missing) - 1} more of the {len(files)} the params define: {names}; "
        raise DataError(f"{missing[0]}: evaluation record missing ({more}run the evaluate stage first)")
    if not files:
        raise DataError("nothing to aggregate: params define no evaluation targets")
    return [read_evaluation(f) for f in files]


def aggregate(params: Params) -> Path:
    from selfcal.report.diagnostics_table import diagnostics_markdown

    rows = load_evaluations([layout.evaluation_file(params, n) for n in layout.evaluation_targets(params)])
    cols, table = summarise(rows)
    diag_files = [layout.diagnostics_file(params, layout.calib_name(s, k)) for s, k in layout.calibration_names(params)]
    diag_rows = [json.loads(f.read_text()) for f in diag_files if f.is_file()]
    out = layout.report_dir(params)
    with stage_run(params, "aggregate", "report") as run:
        atomic_write_text(out / "results.csv", to_csv(cols, table))
        atomic_write_text(
            layout.report_metrics_file(params), json.dumps(report_metrics(cols, table), indent=2, sort_keys=True) + "\n"
        )
        atomic_write_text(out / "results.md", to_markdown(cols, table, unscored_tasks(rows), common_tasks(rows)))
        atomic_write_text(out / "by_source.md", by_source_markdown(cols, table, common_tasks(rows)))
        atomic_write_text(
            out / "diagnostics.md",
            diagnostics_markdown(diag_rows) if diag_rows else "No calibration-set diagnostics were computed.\n",
        )
        log.info("wrote %s (%d rows from %d metric files)", out, len(table), len(rows))
        run.artifact(out / "results.md", "report")
        run.artifact(out / "results.csv", "report")
    return out
