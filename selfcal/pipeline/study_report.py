"""``selfcal study-report``: a study's committed record, built only from what the pipeline declared.

A study is a profile run through the pipeline (``selfcal run --profile NAME --jobs N``, tracking on). Its
report is made from the typed evaluation records (the files behind DVC's ``metrics``), the aggregate's
tables, the calibration diagnostics, and the MLflow store: the registered version of every checkpoint
(``lineage.json``: model -> checkpoint, calibration set, base model, git commit, code digest, params) and
the stage runs' wall times. Nothing private to a script: every number in the folder traces to a record
or a registered model, and a checkpoint without a registered version is named as missing, not skipped.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from selfcal.artifacts import atomic_write_text
from selfcal.config import Params
from selfcal.errors import DataError
from selfcal.lineage import run_store
from selfcal.lineage import tags as T
from selfcal.lineage.tracking import flatten
from selfcal.pipeline import layout
from selfcal.pipeline.aggregate import (
    by_source_markdown,
    common_tasks,
    summarise,
    to_csv,
    to_markdown,
    unscored_tasks,
)
from selfcal.records import EvaluationRecord

log = logging.getLogger("selfcal.study_report")
LINEAGE_FILE = "lineage.json"


def lineage_rows(client, rows: list[EvaluationRecord]) -> tuple[list[dict], list[str]]:
    """For each evaluated checkpoint, its newest registered version and what it was made from; and the
    checkpoints no version was registered for (each one named)."""
    out, missing = [], []
    for r in sorted(rows, key=lambda r: r.name):
        if r.checkpoint_digest is None:
            continue  # the dense base model is scored, not registered
        found = client.search_model_versions(f"tags.`{T.CHECKPOINT_DIGEST}` = '{r.checkpoint_digest}'")
        if not found:
            missing.append(f"{r.name}: checkpoint {r.checkpoint_digest[:16]} has no registered version")
            continue
        v = max(found, key=lambda v: (v.creation_timestamp, int(v.version)))
        tags = dict(v.tags)
        out.append(
            {
                "evaluated": r.name,
                "model": f"{v.name}:{v.version}",
                "method": r.method,
                "source": r.source,
                "seed": r.seed,
                "checkpoint_digest": r.checkpoint_digest,
                "calibration_digest": tags.get(T.CALIBRATION_DIGEST),
                "calibration": tags.get(T.CALIBRATION_NAME),
                "base_model": tags.get(T.BASE_MODEL),
                "base_model_digest": tags.get(T.BASE_DIGEST),
                "git_commit": tags.get(T.GIT_COMMIT),
                "git_dirty": tags.get(T.GIT_DIRTY),
                "code_digest": tags.get(T.CODE_DIGEST),
                "dvc_lock_sha256": tags.get(T.DVC_LOCK_SHA),
                "method_params": json.loads(tags.get(T.METHOD_PARAMS) or "null"),
                "library_versions": json.loads(tags.get(T.VERSIONS) or "null"),
                "metrics_sha256": tags.get(T.METRICS_SHA),
                "compress_run_id": v.run_id,
                "registered_utc": store_time(v.creation_timestamp),
            }
        )
        if r.calibration_digest and tags.get(T.CALIBRATION_DIGEST) != r.calibration_digest:
            missing.append(f"{r.name}: evaluated with calibration {r.calibration_digest[:16]}, registered otherwise")
    return out, missing


def store_time(ms: int | None) -> str | None:
    from datetime import datetime, timezone

    return None if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


STAGE_ORDER = ("generate", "inspect", "compress", "evaluate", "aggregate")


def _stage_rank(stage: str) -> int:
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def stage_times(client, experiment: str, compress_run_ids: list[str] | None) -> list[dict]:
    """Wall time per stage over the pipeline executions that made these models (MLflow stage runs); with
    ``compress_run_ids`` None, over every execution in the store (a GPU lease's run folder: its checkpoints
    count even before they are scored)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None or compress_run_ids == []:
        return []
    executions = set()
    if compress_run_ids is None:
        for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`{T.STAGE}` = 'pipeline'"):
            executions.add(run.data.tags.get(T.EXECUTION_ID))
    for run_id in compress_run_ids or []:
        run = client.get_run(run_id)
        executions.add(run.data.tags.get(T.EXECUTION_ID))
    per_stage: dict[str, list[float]] = defaultdict(list)
    for execution in sorted(e for e in executions if e):
        for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`{T.EXECUTION_ID}` = '{execution}'"):
            stage = run.data.tags.get(T.STAGE)
            if stage and stage != "pipeline" and run.info.end_time and run.info.status == "FINISHED":
                per_stage[stage].append((run.info.end_time - run.info.start_time) / 1000)
    return [
        {"stage": s, "items": len(v), "item_seconds_sum": round(sum(v), 1), "item_seconds_max": round(max(v), 1)}
        for s, v in sorted(per_stage.items(), key=lambda kv: _stage_rank(kv[0]))
    ]


def temperature_rows(params: Params, table: list[dict], metrics: list[str]) -> list[dict]:
    """The temperature-schedule sweep (the paper's Figure 4), when the profile lists several self-calibration
    sources that differ in (t_initial, t_final): per method x schedule, each metric's mean ± std over the sets
    (the aggregate's table), how many sets are in (records: every study evaluation has both metrics) and how
    many the profile asks for. One schedule, or none, is no sweep: no rows. Two sources of one schedule (say,
    another ``schedule_steps``) would share a cell: the first in the profile's order is drawn, the other named
    in the log, only when there is a grid to leave it out of (a set-size sweep's self sources all share one
    schedule: no grid, nothing to say)."""
    temps: dict[str, tuple[float, float]] = {}
    shadowed: list[tuple[str, str]] = []
    for name, spec in params.calibration.sources.items():
        if getattr(spec, "kind", None) != "self":
            continue
        schedule = (spec.t_initial, spec.t_final)
        first = next((n for n, t in temps.items() if t == schedule), None)
        if first is not None:
            shadowed.append((name, first))
            continue
        temps[name] = schedule
    if len(temps) < 2:
        return []
    for name, first in shadowed:
        log.warning("temperature grid: %s has %s's schedule %s -> %s: left out of it", name, first, *temps[first])
    of = len(params.calibration.seeds)
    rows = []
    for e in table:
        if e["source"] in temps:
            t0, t1 = temps[e["source"]]
            row = {"method": e["method"], "t_initial": t0, "t_final": t1, "source": e["source"]}
            row |= {"sets": e["n_sets"], "of": of}
            for m in metrics:
                row[m], row[m + ".std"] = e.get(m), e.get(m + ".std")
            rows.append(row)
    return sorted(rows, key=lambda r: (r["method"], r["t_initial"], r["t_final"]))


def size_lines(params: Params) -> dict[str, tuple[str, int]]:
    """Per source of a set-size sweep, its line's label and its n (``set_size_points``); other sources: none."""
    import re

    groups: dict[str, list[str]] = defaultdict(list)
    for name, spec in params.calibration.sources.items():
        rest = spec.record()
        rest.pop("n_samples", None)
        groups[json.dumps(rest, sort_keys=True)].append(name)
    line_of: dict[str, tuple[str, int]] = {}
    taken: set[str] = set()
    for members in groups.values():
        sizes = [params.calibration.samples_for(m) for m in members]
        if len(set(sizes)) < 2 or len(set(sizes)) < len(sizes):
            continue  # one size (e.g. the temperature sweep's schedules), or two sources of one size: no line
        stems = {re.sub(r"[-_]n\d+$", "", m) for m in members}
        label = stems.pop() if len(stems) == 1 and "" not in stems else params.calibration.sources[members[0]].kind
        if label in taken:  # two lines of one kind without -nN names: keep them apart
            label = f"{label} ({members[0]}, ...)"
        taken.add(label)
        for m, n in zip(members, sizes, strict=True):
            line_of[m] = (label, n)
    return line_of


def self_pairs(params: Params) -> list[tuple[str, tuple[str, ...]]]:
    """Which self-calibration source is tested against which real-data sources: the grid's ``self`` against
    C4, WikiText and Cosmopedia, and in a set-size sweep each self point against the real-data (corpus)
    points of the same n (``self-n4`` against ``c4-n4``: the paper's Figure 3 compares the lines at each n)."""
    from selfcal.report.significance import REAL_SOURCES

    pairs: list[tuple[str, tuple[str, ...]]] = [("self", REAL_SOURCES)]
    at_n: dict[int, list[str]] = defaultdict(list)
    for source, (_, n) in size_lines(params).items():
        at_n[n].append(source)
    for n in sorted(at_n):
        kinds = {s: params.calibration.sources[s].kind for s in at_n[n]}
        real = tuple(s for s, k in kinds.items() if k == "corpus")
        pairs += [(s, real) for s, k in kinds.items() if k == "self" and real]
    return pairs


def set_size_points(params: Params, table: list[dict], metrics: list[str]) -> list[dict]:
    """The set-size sweep run as one profile (the paper's Figure 3): sources that differ only in their own
    ``n_samples`` form one line; per method x line x n, each metric's mean ± std over the sets (the aggregate's
    table). A line's label is its sources' name less a trailing ``-nN`` (``self-n16`` -> ``self``), else their
    kind (with its first source's name when another line has that label). Sources that differ in other params
    (the temperature sweep's schedules) or two of one size make no line."""
    line_of = size_lines(params)
    points = []
    for e in table:
        if e["source"] in line_of:
            label, n = line_of[e["source"]]
            point = {"label": f"{e['method']} / {label}", "n": n, "source": e["source"], "sets": e["n_sets"]}
            for m in metrics:
                point[m], point[m + ".std"] = e.get(m), e.get(m + ".std")
            points.append(point)
    return sorted(points, key=lambda p: (p["label"], p["n"]))


#: The params a set-size experiment may change against its baseline: the size, and which sets (seeds)
SWEEP_KEYS = frozenset({"calibration.n_samples", "calibration.seeds"})


def _params_of(data: dict) -> dict:
    return ((data.get("params") or {}).get("params.yaml", {}).get("data")) or {}


def sweep_experiments(shown: list[dict]) -> tuple[list[tuple[str, dict]], list[str]]:
    """The experiments of ``dvc exp show --json`` that are set-size sweep points: finished, with their report's
    metrics, and with params that differ from their baseline's in ``SWEEP_KEYS`` only. Returns (name, data)
    of those, and one line per experiment left out, saying why (an audit's sweep counted an experiment of
    another GPTQ group size, one of another evaluation limit and a failed one as sets of the same n)."""
    kept, left_out = [], []
    for baseline in shown:
        base = flatten(_params_of(baseline.get("data") or {}))
        for exp in baseline.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state") or "success"
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name") or rev.get("rev", "")[:7]
                data = rev.get("data") or {}
                if state != "success" or rev.get("error") or not data:
                    left_out.append(f"{name}: {state if state != 'success' else 'failed'}, not a finished experiment")
                    continue
                params = flatten(_params_of(data))
                differ = sorted(k for k in base.keys() | params.keys() if base.get(k) != params.get(k))
                other = [k for k in differ if k not in SWEEP_KEYS]
                if other:
                    left_out.append(f"{name}: differs from its baseline in {', '.join(other[:3])}, not only n")
                    continue
                kept.append((name, data))
    return kept, left_out


def experiment_rows(root: Path, metric: str = "mean_acc") -> tuple[list[dict], list[str]]:
    """The set-size sweep as DVC experiments (``dvc exp run --queue -S calibration.n_samples=...``): per
    experiment, n, its number of sets (seeds) and ``metric`` per method x source (the mean over those sets, as
    the aggregate's report/metrics.json holds it), read from ``dvc exp show --json`` (DVC's own record of each
    experiment's params and declared metrics). Also the experiments left out, with why."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise DataError(f"dvc exp show failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    kept, left_out = sweep_experiments(json.loads(proc.stdout or "[]"))
    rows = []
    for name, data in kept:
        cal = _params_of(data).get("calibration", {})
        report = (data.get("metrics") or {}).get(f"{params_artifacts(data)}/report/metrics.json", {})
        for method, by_source in (report.get("data") or {}).items():
            for source, values in by_source.items():
                if method != "none" and values.get(metric) is not None:
                    rows.append(
                        {
                            "experiment": name,
                            "n": cal.get("n_samples"),
                            "sets": len(cal.get("seeds") or []) or 1,
                            "label": f"{method} / {source}",
                            metric: values[metric],
                        }
                    )
    return rows, left_out


def params_artifacts(data: dict) -> str:
    return (_params_of(data).get("paths") or {}).get("artifacts", "artifacts")


def _sweep_n(rows: list[dict], metric: str = "mean_acc") -> list[dict]:
    """Per (label, n): the mean over the experiments of that n (each already a mean over its sets), the std
    over those experiments (None with one: DVC's metrics hold no per-set values), the experiments and the sets."""
    import statistics

    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["label"], r["n"])].append(r)
    return [
        {
            "label": label,
            "n": n,
            metric: statistics.fmean(r[metric] for r in v),
            metric + ".std": statistics.stdev(r[metric] for r in v) if len(v) > 1 else None,
            "experiments": len(v),
            "sets": sum(r.get("sets", 1) for r in v),
        }
        for (label, n), v in sorted(groups.items())
    ]


def _lineage_table(lineage: list[dict]) -> str:
    """One row per checkpoint. Each run has its own MLflow store, so a version number (``…-c4:1``)
    names a model only within its run: a report of run folders (``--runs``) has the run as a column, and the
    ``selfcal lineage`` of a row is read from that run folder's store (``lineage.run_store``)."""
    by_run = any("run" in e for e in lineage)
    note = (
        "Each run folder has its own MLflow store (`mlflow-store.tar.xz`), so a version number names a model "
        "within its run only: `selfcal lineage --tracking-uri sqlite:///<the unpacked store>/.selfcal/mlflow.db "
        "MODEL:VERSION`."
    )
    lines = [
        *([note, ""] if by_run else []),
        "| evaluated |"
        + (" run (MLflow store) |" if by_run else "")
        + " registered model | calibration set (digest) | git commit | selfcal code |",
        "|---|" + ("---|" if by_run else "") + "---|---|---|---|",
    ]
    for e in lineage:
        dirty = " (dirty)" if e["git_dirty"] == "true" else ""
        run = f" {e.get('run', '-')} |" if by_run else ""
        lines.append(
            f"| {e['evaluated']} |{run} `{e['model']}` | {e['calibration']} ({(e['calibration_digest'] or '-')[:12]}) "
            f"| {(e['git_commit'] or '-')[:12]}{dirty} | {(e['code_digest'] or '-')[:12]} |"
        )
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _times_table(times: list[dict]) -> str:
    lines = ["| stage | items | sum of item wall times | slowest item |", "|---|---|---|---|"]
    lines += [f"| {t['stage']} | {t['items']} | {t['item_seconds_sum']} s | {t['item_seconds_max']} s |" for t in times]
    return "\n".join(lines) + "\n"


def _gpu_time(sources: list[RunSource], gathered: list[tuple[RunSource, EvaluationRecord]]) -> str:
    from selfcal.report.gpu_usage import read_gpu_csv, usage_markdown

    rows = []
    for src in sources:
        csv = src.evaluations.parents[1] / "gpu.csv"
        usage = read_gpu_csv(csv) if csv.is_file() else None
        if usage is not None:
            rows.append((src.label, usage, sum(1 for s, _ in gathered if s is src)))
    if not rows:
        return "_no run folder has a gpu.csv_\n"
    return usage_markdown(rows) + (
        "\nHeld: the sampled span times the GPUs (set-up before the first item included where sampling began "
        "earlier); busy: each sample's utilization (nvidia-smi: a kernel running) times its interval. Models "
        "scored: this run's evaluation records the report uses.\n"
    )


@dataclass
class RunSource:
    """Where evaluated models come from: the workspace, or a run committed from elsewhere (a GPU lease's chunk:
    its ``artifacts/evaluations`` and its MLflow store, ``.selfcal/mlflow.db`` or packed as ``mlflow-store.tar.xz``)."""

    label: str
    evaluations: Path
    tracking_uri: str | None


def run_sources(params: Params, runs: list[Path] | None) -> list[RunSource]:
    from selfcal.lineage.tracking import tracking_uri

    if not runs:
        uri = tracking_uri(params) if params.tracking.enabled else None
        return [RunSource("workspace", layout.evaluation_file(params, "x").parent, uri)]
    out = []
    for root in runs:
        evaluations = root / "artifacts" / "evaluations"
        # a lease cut before any model was scored still made sets and measured them (lease 9: Ji's pools
        # took the first ten minutes): its sets and measures count; a folder with none of the three is no run
        if not any((root / "artifacts" / d).is_dir() for d in ("evaluations", "calibration", "diagnostics")):
            raise DataError(f"{root}: no artifacts/evaluations, calibration or diagnostics in this run folder")
        db = run_store.store_db(root)  # plain, or unpacked from the committed mlflow-store.tar.xz
        out.append(RunSource(root.name, evaluations, f"sqlite:///{db.resolve()}" if db is not None else None))
    return out


def gather(params: Params, sources: list[RunSource]) -> tuple[list[tuple[RunSource, EvaluationRecord]], list[str]]:
    """Every evaluation record the params define that some run holds (one per model: a model scored by two runs
    must have the same checkpoint and scores in both), and the targets no run has evaluated yet."""
    from selfcal.records import read_evaluation

    found: dict[str, tuple[RunSource, EvaluationRecord]] = {}
    for src in sources:
        for name in layout.evaluation_targets(params):
            f = src.evaluations / f"{name}.json"
            if not f.is_file():
                continue
            rec = read_evaluation(f)
            if name in found:
                prev_src, prev = found[name]
                same = (prev.checkpoint_digest, prev.mean_acc) == (rec.checkpoint_digest, rec.mean_acc)
                if not same:
                    raise DataError(
                        f"{name}: evaluated differently in runs {prev_src.label} and {src.label} "
                        f"(checkpoint {str(prev.checkpoint_digest)[:12]} vs {str(rec.checkpoint_digest)[:12]})"
                    )
                continue
            found[name] = (src, rec)
    pending = [n for n in layout.evaluation_targets(params) if n not in found]
    return [found[n] for n in layout.evaluation_targets(params) if n in found], pending


def quality_markdown(diag_rows: list[dict], unmeasured: list[str]) -> str:
    """The calibration-set quality section: per source the measures of the sets shown, and by name the sets
    left out because no inspect record measured the make their models used (said even when none is shown)."""
    from selfcal.report.diagnostics_table import per_source_markdown

    left_out = (
        f"Left out: {', '.join(unmeasured)}: no inspect record of the make (digest) its models were calibrated with.\n"
        if unmeasured
        else ""
    )
    if not diag_rows:
        return ("_no measure shown._ " + left_out) if unmeasured else "_no calibration set inspected yet_\n"
    return (
        per_source_markdown(diag_rows)
        + "\nThe paper's Table 4 measures first (perplexity under the base model, repetition, n-gram diversity, "
        "vocabulary coverage, Zipf exponent), then this pipeline's own; per set: `diagnostics.md`.\n"
        + ("\n" + left_out if left_out else "")
    )


def pick_diagnostics(candidates: dict[str, list[dict]], used: dict[str, set[str]]) -> tuple[dict[str, dict], list[str]]:
    """Per set, the inspect record to show: the one of the make (digest) its models were calibrated with; a set
    no model used yet shows the first record. A set whose models used a make no record measured, or several
    makes, shows none and is named in the second list (its measures would describe other tokens)."""
    shown: dict[str, dict] = {}
    unmeasured: list[str] = []
    for name, records in candidates.items():
        want = used.get(name)
        if not want:
            if records:
                shown[name] = records[0]
            continue
        match = next((r for r in records if r.get("calibration_digest") in want), None)
        if len(want) == 1 and match is not None:
            shown[name] = match
        elif records:
            unmeasured.append(name)
    return shown, unmeasured


def remade_sets(runs: list[Path]) -> list[dict]:
    """Each calibration set that more than one run made (a fresh GPU box has no DVC cache, so a chunk that
    needs a set makes it again), with the digest each run got: the same params and seed must give the same
    digest, and where they did not, the report says so beside the set the models used."""
    made: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for root in runs:
        for manifest in sorted((root / "artifacts" / "calibration").glob("*/manifest.json")):
            digest = json.loads(manifest.read_text()).get("content_digest")
            if digest:
                made[manifest.parent.name].append((root.name, digest))
    return [
        {
            "set": name,
            "runs": [r for r, _ in got],
            "digests": [d for _, d in got],
            "same": len({d for _, d in got}) == 1,
        }
        for name, got in sorted(made.items())
        if len(got) > 1
    ]


def remade_markdown(remade: list[dict], used: dict[str, set[str]]) -> str:
    lines = ["| set | made by runs | digests (first 12) | the same | the models used |", "|---|---|---|---|---|"]
    for e in remade:
        digests = ", ".join(d[:12] for d in e["digests"])
        want = used.get(e["set"], set())
        users = [r for r, d in zip(e["runs"], e["digests"], strict=True) if d in want]
        if not want:
            user = "-"
        elif e["same"] and want == {e["digests"][0]}:
            user = "any (identical)"
        elif not users:
            user = "a make none of these runs holds"
        else:
            user = ", ".join(users) + (" (**mixed**: models of several makes)" if len(want) > 1 else "")
        lines.append(
            f"| {e['set']} | {', '.join(e['runs'])} | {digests} | {'yes' if e['same'] else '**no**'} | {user} |"
        )
    differ = [e["set"] for e in remade if not e["same"]]
    note = (
        f"\n{len(differ)} of {len(remade)} differ ({', '.join(differ)}): made again from the same params and seed "
        "by the same source version, they did not come out byte for byte the same. Each model's lineage names "
        "the set it was calibrated with, by digest, and the quality measures above are of that make (a set "
        "whose models' make has no inspect record is left out of them and named).\n"
        if differ
        else f"\nAll {len(remade)} came out byte for byte the same.\n"
    )
    return "\n".join(lines) + "\n" + note


def completeness_markdown(params: Params, rows: list[EvaluationRecord], pending: list[str]) -> str:
    """Sets evaluated per source x method, of the profile's; what is complete and what is still to run. A cell
    whose sets share a calibration digest says how many distinct sets it has: seeds of a schedule that ignores
    them (greedy decoding, t = 0 throughout) make one set, and its std of 0 is no measure of spread."""
    digests: dict[tuple[str, str], list[str]] = defaultdict(list)  # one per evaluated set (its name if none)
    for r in rows:
        digests[(r.source, r.method)].append(r.calibration_digest or r.name)
    methods = list(params.compression.methods)
    sets = len(params.calibration.seeds)

    def cell(key: tuple[str, str]) -> str:
        n, distinct = len(digests[key]), len(set(digests[key]))
        return f"{n}/{sets}" + (" ✓" if n == sets else "") + (f" ({distinct} distinct)" if distinct < n else "")

    lines = ["| source | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for source in params.calibration.sources:
        lines.append(f"| {source} | " + " | ".join(cell((source, m)) for m in methods) + " |")
    dense = "evaluated" if any(r.method == "none" for r in rows) else "**not yet evaluated**"
    total = len(layout.evaluation_targets(params))
    head = f"{total - len(pending)} of {total} models evaluated (the dense base: {dense}); sets per cell:"
    repeated = any(len(set(d)) < len(d) for d in digests.values())
    note = (
        "\n(N distinct): sets with one calibration digest are one set, made again from another seed; the cell's "
        "std over them is 0 by construction.\n"
    )
    return head + "\n\n" + "\n".join(lines) + "\n" + (note if repeated else "")


# Accuracy of a uniform guess per task (lambada: an open-vocabulary word, effectively 0).
CHANCE = {
    "arc_easy": 0.25,
    "arc_challenge": 0.25,
    "boolq": 0.5,
    "hellaswag": 0.25,
    "lambada_openai": 0.0,
    "openbookqa": 0.25,
    "piqa": 0.5,
    "rte": 0.5,
    "storycloze_2016": 0.5,
    "winogrande": 0.5,
}


def dense_markdown(rows: list[EvaluationRecord]) -> str:
    """The base model per task: examples scored (of the task's full set), acc ± stderr, chance, and whether it is
    clearly above chance (acc - 2 stderr above the guess): a study on a model at chance says nothing."""
    dense = next((r for r in rows if r.method == "none"), None)
    if dense is None or dense.zero_shot is None:
        return "_the dense base model is not evaluated yet_\n"
    lines = ["| task | examples | acc | chance | clearly above chance |", "|---|---|---|---|---|"]
    for task, t in sorted(dense.zero_shot.tasks.items()):
        chance = CHANCE.get(task)
        above = "" if chance is None else ("yes" if t.acc - 2 * (t.acc_stderr or 0) > chance else "no")
        stderr = f" ± {100 * t.acc_stderr:.1f}" if t.acc_stderr else ""
        lines.append(
            f"| {task} | {t.n} of {t.n_total} | {100 * t.acc:.1f}{stderr} | "
            f"{'-' if chance is None else f'{100 * chance:.0f}'} | {above} |"
        )
    for name, p in sorted((dense.perplexity or {}).items()):
        lines.append(f"| {name} perplexity | {p.windows} windows of {p.seq_len} | {p.perplexity:.2f} | | |")
    skipped = "".join(f"\n\nNot scored: {task}: {why}." for task, why in sorted((dense.skipped_tasks or {}).items()))
    return "\n".join(lines) + skipped + "\n"


def _headline(cols: list[str]) -> list[str]:
    """The columns the self-vs-real tests and the sweeps are drawn for: mean accuracy and each perplexity."""
    return [c for c in cols if c == "mean_acc" or c.startswith("ppl.")]


def _significance(
    table: list[dict], cols: list[str], paper_table: Path | None, pairs: list[tuple[str, tuple[str, ...]]]
) -> str:
    from selfcal.report import metric_display
    from selfcal.report.significance import compare_self, comparison_markdown, paper_comparisons

    paper = paper_comparisons(paper_table) if paper_table is not None and paper_table.is_file() else []
    parts = []
    for metric in _headline(cols):
        ours = [c for mine, others in pairs for c in compare_self(table, metric, self_source=mine, others=others)]
        if ours:
            table_md = comparison_markdown(ours, paper if metric == "mean_acc" else [], metric)
            parts.append(f"### {metric_display.label(metric)}\n\n" + table_md)
    return "\n".join(parts) if parts else "_self-calibration and a real-data source are not both evaluated yet_\n"


def _merge_times(parts: list[list[dict]]) -> list[dict]:
    merged: dict[str, dict] = {}
    for times in parts:
        for t in times:
            m = merged.setdefault(
                t["stage"], {"stage": t["stage"], "items": 0, "item_seconds_sum": 0.0, "item_seconds_max": 0.0}
            )
            m["items"] += t["items"]
            m["item_seconds_sum"] = round(m["item_seconds_sum"] + t["item_seconds_sum"], 1)
            m["item_seconds_max"] = max(m["item_seconds_max"], t["item_seconds_max"])
    return sorted(merged.values(), key=lambda t: _stage_rank(t["stage"]))


def study_report(
    params: Params,
    out: Path,
    *,
    title: str,
    client=None,
    experiments: bool = False,
    runs: list[Path] | None = None,
    paper_table: Path | None = None,
) -> Path:
    """Write ``out``/README.md, results.csv/md, by_source.md, diagnostics.md and lineage.json; the temperature
    heatmaps when the profile has several self-calibration schedules; with ``experiments``, the set-size sweep
    from the workspace's DVC experiments (sweep_n.csv, sweep_n.png). ``runs``: run folders committed from other
    machines (each with its records and MLflow store) instead of the workspace; a grid still partly to run is
    reported as far as it goes, with what is complete and what is not. ``paper_table``: the paper's appendix
    tables (CSV), for the same self-vs-real-data test on its numbers beside ours."""
    from selfcal.lineage.tracking import open_client
    from selfcal.report import metric_display, plots, temperature

    sources = run_sources(params, runs)
    gathered, pending = gather(params, sources)
    rows = [r for _, r in gathered]
    if not rows:
        raise DataError(
            "nothing to report: no evaluation record of these params in " + ", ".join(s.label for s in sources)
        )
    cols, table = summarise(rows)
    shared = common_tasks(rows)
    lineage, missing = [], []
    times_parts: list[list[dict]] = []
    if params.tracking.enabled:
        for src in sources:
            mine = [r for s, r in gathered if s is src]
            if not mine:
                continue
            if src.tracking_uri is None:
                missing += [f"{r.name}: run {src.label} has no MLflow store" for r in mine if r.checkpoint_digest]
                continue
            c = client if (client is not None and len(sources) == 1) else open_client(src.tracking_uri)
            found, lost = lineage_rows(c, mine)
            if runs:  # each run its own store: the version numbers repeat across runs
                for e in found:
                    e["run"] = src.label
            lineage += found
            missing += lost
            ids = None if runs else [e["compress_run_id"] for e in found]
            times_parts.append(stage_times(c, params.tracking.experiment, ids))
    times = _merge_times(times_parts)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.csv", to_csv(cols, table))
    atomic_write_text(out / "results.md", to_markdown(cols, table, unscored_tasks(rows), shared))
    atomic_write_text(out / "by_source.md", by_source_markdown(cols, table, shared))
    # the calibration sets' quality measures (the inspect stage's records), from the workspace or every run
    from selfcal.report.diagnostics_table import diagnostics_markdown

    # A set made again by a later run can differ (self-generation on the GPU did not come out the same): the
    # measures shown are those of the make the models were calibrated with.
    used: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if r.calibration_digest:
            used[layout.calib_name(r.source, r.seed)].add(r.calibration_digest)
    candidates: dict[str, list[dict]] = {}
    for source, seed in layout.calibration_names(params):
        name = layout.calib_name(source, seed)
        files = [root / "artifacts" / "diagnostics" / f"{name}.json" for root in runs or []] or [
            layout.diagnostics_file(params, name)
        ]
        candidates[name] = [json.loads(f.read_text()) for f in files if f.is_file()]
    inspected, unmeasured = pick_diagnostics(candidates, used)
    remade = remade_sets(runs or [])
    diag_rows = list(inspected.values())  # the profile's order: source by source
    if diag_rows:
        per_set = sorted(diag_rows, key=lambda r: r["calibration"])
        atomic_write_text(out / "diagnostics.md", diagnostics_markdown(per_set))
    atomic_write_text(
        out / LINEAGE_FILE,
        json.dumps({"models": lineage, "missing": missing, "pending": pending}, indent=2, sort_keys=True) + "\n",
    )
    sweeps = []
    size_metrics = _headline(cols)
    temps = temperature_rows(params, table, size_metrics)
    if temps:
        atomic_write_text(out / "temperature.csv", _csv(temps))
    for method in sorted({r["method"] for r in temps}):
        mine = [r for r in temps if r["method"] == method]
        for m in [m for m in size_metrics if any(r[m] is not None for r in mine)]:
            png = metric_display.file_name(f"temperature-{method}", m)
            what = metric_display.label(m) + metric_display.unit(m)
            plots.temperature_heatmap(mine, out / png, metric=m, title=f"{method}: {what}")
            sweeps.append(
                f"### Temperature schedule, {method}: {what}, mean ± std over the sets\n\n"
                + temperature.temperature_markdown(mine, m)
                + f"\n![temperature schedule, {method}, {m}]({png})"
            )
    if temps:
        sweeps.append("(`temperature.csv`: every schedule's mean ± std and sets, per method)")
    size_points = set_size_points(params, table, size_metrics)
    if size_points and not experiments:
        atomic_write_text(out / "sweep_n.csv", _csv(size_points))
        for m in [m for m in size_metrics if any(p[m] is not None for p in size_points)]:
            png = metric_display.file_name("sweep_n", m)
            plots.accuracy_vs_n(size_points, out / png, metric=m, title=f"{m} against calibration set size")
            sweeps.append(f"![set-size sweep, {m}]({png})")
        sweeps.append("(`sweep_n.csv`: mean ± std over each point's calibration sets)")
    if experiments:
        exp_rows, left_out = experiment_rows(params.root)
        for why in left_out:
            log.warning("set-size sweep: experiment %s", why)
        points = _sweep_n(exp_rows)
        if points:
            atomic_write_text(out / "sweep_n.csv", _csv(points))
            plots.accuracy_vs_n(points, out / "sweep_n.png", title="mean_acc against calibration set size")
            sweeps.append(
                "![set-size sweep](sweep_n.png) (`sweep_n.csv`: per n, the mean over its experiments, each the mean "
                "over its sets (seeds); ± std over experiments where an n has several)"
                + (f"; left out: {'; '.join(left_out)}" if left_out else "")
            )
        elif left_out:
            sweeps.append(f"No set-size experiments: left out {'; '.join(left_out)}")
    checkpoints = sum(1 for r in rows if r.checkpoint_digest)
    parts = [
        f"# {title}",
        f"{len(rows)} evaluated models ({checkpoints} checkpoints"
        + (" + the dense base" if len(rows) > checkpoints else "")
        + f"), {len(lineage)} traced to a registered model version"
        + (f"; **{len(missing)} without lineage**: " + "; ".join(missing) if missing else "")
        + ". Built by `selfcal study-report` from the evaluation records and the MLflow store"
        + (f" of each run ({', '.join(s.label for s in sources)})" if runs else "")
        + f"; `{LINEAGE_FILE}` holds each model's full chain (`selfcal lineage MODEL:VERSION` prints it, "
        "`selfcal verify` checks it).",
        "## Completeness",
        completeness_markdown(params, rows, pending),
        "## The dense base model",
        dense_markdown(rows),
        "## Results (mean ± std over calibration sets)",
        (out / "by_source.md").read_text(),
        "## Self-calibration against real data",
        _significance(table, cols, paper_table, self_pairs(params)),
        "## Calibration-set quality (mean ± std over each source's sets)",
        quality_markdown(diag_rows, unmeasured),
        *(["## Calibration sets made in several runs", remade_markdown(remade, used)] if remade else []),
        *(["## Sweeps", "\n\n".join(sweeps)] if sweeps else []),
        "## Stage wall times (MLflow stage runs)",
        _times_table(times) if times else "_no tracked stage runs_\n",
        *(["## GPU time (each run's nvidia-smi samples, `gpu.csv`)", _gpu_time(sources, gathered)] if runs else []),
        "## Lineage: every checkpoint",
        _lineage_table(lineage)
        if lineage
        else (
            "_no evaluated checkpoint yet_\n"
            if params.tracking.enabled
            else "_tracking was off: no registered models_\n"
        ),
    ]
    atomic_write_text(out / "README.md", "\n\n".join(parts))
    log.info(
        "wrote %s (%d models, %d traced, %d without lineage, %d pending)",
        out,
        len(rows),
        len(lineage),
        len(missing),
        len(pending),
    )
    return out
