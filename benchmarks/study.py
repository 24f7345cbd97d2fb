"""The reproduction study: a profile's whole grid, plus the set-size and temperature sweeps,
run in-process on one machine with a wall time per stage, written as a Markdown report.

It runs the same library functions the DVC stages run (generate, compress, evaluate,
aggregate), stage by stage, with compress and evaluate items spread over ``--workers``
processes that share the one GPU (lm-eval's per-example work is CPU-bound for small models).
Items whose output already exists are skipped, so an interrupted run resumes.

    python benchmarks/study.py --profile profiles/study-stories260K.yaml --out reports/stories260K \\
        --workers 8 --sweep-n 1,2,4,8,16,32,64,128 --sweep-t 0,0.5,1,1.5,2
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfcal.artifacts import atomic_write_text  # noqa: E402
from selfcal.config import Params, parse_params  # noqa: E402
from selfcal.pipeline import layout  # noqa: E402


def _params(data: dict, root: Path, artifacts: Path) -> Params:
    data = copy.deepcopy(data)
    data["paths"] = {"artifacts": str(artifacts), "state": str(artifacts / ".state")}
    data.setdefault("tracking", {})["enabled"] = False
    return parse_params(data, root=root)


def _guarded(step, name: str, done: Path) -> tuple[str, float, str | None]:
    """One item; an error is reported with the item's name and the other items go on."""
    if done.exists():
        return name, 0.0, None
    t0 = time.perf_counter()
    try:
        step()
    except Exception as err:  # noqa: BLE001 - reported per item
        return name, time.perf_counter() - t0, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return name, time.perf_counter() - t0, None


def _compress_item(
    data: dict, root: str, artifacts: str, source: str, seed: int, method: str
) -> tuple[str, float, str | None]:
    from selfcal.pipeline.compress import compress

    params = _params(data, Path(root), Path(artifacts))
    name = layout.checkpoint_name(source, seed, method)
    return _guarded(
        lambda: compress(params, source, seed, method), name, layout.checkpoint_dir(params, source, seed, method)
    )


def _evaluate_item(data: dict, root: str, artifacts: str, name: str) -> tuple[str, float, str | None]:
    from selfcal.pipeline.evaluate import evaluate

    params = _params(data, Path(root), Path(artifacts))
    return _guarded(lambda: evaluate(params, name, progress=False), name, layout.evaluation_file(params, name))


def _report_failures(done: list, stage: str, label: str) -> list[str]:
    failed = [f"{stage} {name}: {err}" for name, _, err in done if err]
    for line in failed:
        print(f"[{label}] FAILED {line}", flush=True)
    return failed


def run_grid(data: dict, root: Path, artifacts: Path, workers: int, label: str) -> dict:
    """generate -> compress -> evaluate -> aggregate for one params dict; seconds per stage."""
    from selfcal.pipeline.aggregate import aggregate
    from selfcal.pipeline.generate import generate

    params = _params(data, root, artifacts)
    timings: dict = {}
    t0 = time.perf_counter()
    for source, seed in layout.calibration_names(params):
        if not layout.calibration_dir(params, source, seed).is_dir():
            generate(params, source, seed, progress=False)
    timings["generate"] = time.perf_counter() - t0
    print(
        f"[{label}] generate: {len(layout.calibration_names(params))} sets in {timings['generate']:.1f} s", flush=True
    )

    items = [(s, k, m) for s, k in layout.calibration_names(params) for m in params.compression.methods]
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        t0 = time.perf_counter()
        done = list(
            pool.map(_compress_item, *zip(*[(data, str(root), str(artifacts), *it) for it in items], strict=False))
        )
        timings["compress"] = time.perf_counter() - t0
        timings["compress_item_seconds"] = sum(d[1] for d in done)
        timings["failed"] = _report_failures(done, "compress", label)
        print(f"[{label}] compress: {len(items)} checkpoints in {timings['compress']:.1f} s", flush=True)
        targets = layout.evaluation_targets(params)
        t0 = time.perf_counter()
        done = list(
            pool.map(_evaluate_item, *zip(*[(data, str(root), str(artifacts), n) for n in targets], strict=False))
        )
        timings["evaluate"] = time.perf_counter() - t0
        timings["evaluate_item_seconds"] = sum(d[1] for d in done)
        timings["failed"] += _report_failures(done, "evaluate", label)
        print(f"[{label}] evaluate: {len(targets)} models in {timings['evaluate']:.1f} s", flush=True)
    if timings["failed"]:
        raise SystemExit(f"[{label}] {len(timings['failed'])} item(s) failed; re-run to retry them")
    t0 = time.perf_counter()
    aggregate(params)
    timings["aggregate"] = time.perf_counter() - t0
    return timings


def _summary(params_data: dict, root: Path, artifacts: Path) -> list[dict]:
    from selfcal.pipeline.aggregate import load_evaluations, summarise

    params = _params(params_data, root, artifacts)
    rows = load_evaluations([layout.evaluation_file(params, n) for n in layout.evaluation_targets(params)])
    return summarise(rows)[1]


def _csv(rows: list[dict], fields: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def sweep_n(
    base: dict,
    root: Path,
    work: Path,
    out: Path,
    sizes: list[int],
    sources: list[str],
    methods: list[str],
    seeds: list[int],
    workers: int,
    timings: dict,
) -> list[dict]:
    from selfcal.report.plots import accuracy_vs_n

    points = []
    for n in sizes:
        data = copy.deepcopy(base)
        data["calibration"].update(
            n_samples=n, seeds=seeds, sources={s: base["calibration"]["sources"][s] for s in sources}
        )
        data["compression"]["methods"] = methods
        artifacts = work / "sweep-n" / f"n{n}"
        timings[f"sweep_n/{n}"] = run_grid(data, root, artifacts, workers, f"n={n}")
        for e in _summary(data, root, artifacts):
            if e["method"] != "none":
                points.append({"n": n, "label": f"{e['source']} ({e['method']})", **e})
    atomic_write_text(
        out / "sweep_n.csv",
        _csv(
            points,
            [
                "n",
                "label",
                "method",
                "source",
                "n_sets",
                "mean_acc",
                "mean_acc.std",
                "ppl.wikitext2",
                "ppl.wikitext2.std",
            ],
        ),
    )
    accuracy_vs_n(points, out / "sweep_n.png", title="mean zero-shot accuracy vs calibration set size")
    return points


def sweep_t(
    base: dict,
    root: Path,
    work: Path,
    out: Path,
    temps: list[float],
    methods: list[str],
    seeds: list[int],
    workers: int,
    timings: dict,
) -> list[dict]:
    from selfcal.report.plots import temperature_heatmap

    template = base["calibration"]["sources"]["self"]
    sources = {
        f"t{a:g}_{b:g}".replace(".", "p"): {**template, "t_initial": a, "t_final": b} for a in temps for b in temps
    }
    data = copy.deepcopy(base)
    data["calibration"].update(seeds=seeds, sources=sources)
    data["compression"]["methods"] = methods
    artifacts = work / "sweep-t"
    timings["sweep_t"] = run_grid(data, root, artifacts, workers, "temperature grid")
    points = []
    for e in _summary(data, root, artifacts):
        if e["method"] != "none":
            src = sources[e["source"]]
            points.append({"t_initial": src["t_initial"], "t_final": src["t_final"], **e})
    atomic_write_text(
        out / "sweep_t.csv",
        _csv(
            points,
            [
                "t_initial",
                "t_final",
                "method",
                "source",
                "n_sets",
                "mean_acc",
                "mean_acc.std",
                "ppl.wikitext2",
                "ppl.wikitext2.std",
            ],
        ),
    )
    for method in methods:
        temperature_heatmap(
            [p for p in points if p["method"] == method],
            out / f"sweep_t_{method}.png",
            title=f"{method}: mean accuracy over (t_initial, t_final)",
        )
    return points


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", required=True, help="params file of the grid (e.g. profiles/study-stories260K.yaml)")
    p.add_argument("--root", default=".", help="directory the profile's relative paths are resolved from")
    p.add_argument("--work", default=".study", help="where calibration sets, checkpoints and metrics go")
    p.add_argument("--out", required=True, help="report directory (tables, CSV, PNG, timings)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--eval-batch-size", type=int, default=64, help="fixed lm-eval batch per worker (0 = the profile's)")
    p.add_argument("--skip-grid", action="store_true")
    p.add_argument("--sweep-n", default="", help="comma-separated set sizes, e.g. 1,2,4,...,128")
    p.add_argument("--sweep-n-sources", default="self,c4")
    p.add_argument(
        "--sweep-t", default="", help="comma-separated temperatures; the grid is every (t_initial, t_final) pair"
    )
    p.add_argument("--sweep-methods", default="wanda")
    p.add_argument("--sweep-seeds", default="0,1,2")
    args = p.parse_args()
    import torch

    base = yaml.safe_load(Path(args.profile).read_text())
    if args.eval_batch_size:
        # Many workers share one GPU: lm-eval's "auto" search assumes it owns the device.
        base["evaluation"]["batch_size"] = args.eval_batch_size
    root, work, out = Path(args.root).resolve(), Path(args.work).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    )
    timings["hardware"] = {
        "device": device,
        "cpu_cores": os.cpu_count(),
        "workers": args.workers,
        "torch": torch.__version__,
    }
    methods = args.sweep_methods.split(",")
    seeds = [int(s) for s in args.sweep_seeds.split(",")]
    if not args.skip_grid:
        t0 = time.perf_counter()
        timings["grid"] = run_grid(base, root, work / "grid", args.workers, "grid")
        timings["grid"]["total"] = time.perf_counter() - t0
        params = _params(base, root, work / "grid")
        for name in ("results.md", "results.csv", "diagnostics.md"):
            src = layout.report_dir(params) / name
            if src.is_file():
                atomic_write_text(out / name, src.read_text())
        atomic_write_text(timings_file, json.dumps(timings, indent=2) + "\n")
    if args.sweep_n:
        sweep_n(
            base,
            root,
            work,
            out,
            [int(n) for n in args.sweep_n.split(",")],
            args.sweep_n_sources.split(","),
            methods,
            seeds,
            args.workers,
            timings,
        )
        atomic_write_text(timings_file, json.dumps(timings, indent=2) + "\n")
    if args.sweep_t:
        sweep_t(
            base, root, work, out, [float(t) for t in args.sweep_t.split(",")], methods, seeds, args.workers, timings
        )
        atomic_write_text(timings_file, json.dumps(timings, indent=2) + "\n")
    print(json.dumps(timings, indent=2))


if __name__ == "__main__":
    main()
