"""Concurrent stage items: one grid through `selfcal run --jobs N`, against plain `dvc repro`, in one run.

Each configuration gets a fresh copy of the workspace (the checkout's pipeline files, no dvc.lock, no
artifacts) with the same params, so every one computes the whole grid from nothing:

- `dvc repro`           DVC alone: what a researcher runs; one stage at a time (DVC has no parallel repro)
- `selfcal run --jobs 1` the Prefect flow, one item at a time
- `selfcal run --jobs N` up to N items at once (on a CPU each gets cores / N threads)

The grid (default): stories260K, sources self and vocab x seeds 0 and 1 x GPTQ and Wanda = 8 independent
compress items (4 generate, 4 inspect, 8 evaluate + dense, aggregate: 25 items), 32 x 128 calibration tokens,
ARC-Easy (20 items) and 4 WikiText-2 windows per evaluation, tracking on (each workspace's own sqlite).
The hardware bound is the --jobs 1 wall divided by min(N, cores).

    python benchmarks/jobs.py --jobs 2 --out benchmarks/results/jobs-cpu-stories260K.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import DATA, STORIES, pipeline_workspace  # noqa: E402


def grid_overrides() -> dict:
    return {
        "calibration.sources": {"self": {"kind": "self"}, "vocab": {"kind": "vocab"}},
        "calibration.seeds": [0, 1],
        "calibration.n_samples": 32,
        "calibration.seq_len": 128,
        "calibration.batch_size": 32,
        "compression.methods": ["gptq", "wanda"],
        "compression.gptq": {"group_size": 32, "skip_indivisible": True},
        "compression.wanda": {},
        "evaluation.limit": 20,
        "evaluation.perplexity": {
            "wikitext2": {
                "path": str(DATA / "wikitext2_raw" / "test_joined_gptq_style.txt"),
                "seq_len": 128,
                "max_windows": 4,
            }
        },
    }


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SELFCAL_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def run_config(name: str, cmd: list[str], work: Path) -> dict:
    ws, _ = pipeline_workspace(work / name / "ws", STORIES, **grid_overrides())
    env = _env(work / name / "prefect")
    log = work / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ws, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = log.read_text()
    ran = text.count("Running stage '")
    print(f"{name}: {wall:.1f} s, rc {proc.returncode}, {ran} stage commands", flush=True)
    if proc.returncode != 0:
        print(text[-3000:])
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=ws, env=env, capture_output=True, text=True)
    listed = [line.rstrip(":") for line in status.stdout.splitlines() if line and not line[0].isspace()]
    return {
        "config": name,
        "cmd": " ".join(cmd),
        "wall_s": round(wall, 1),
        "rc": proc.returncode,
        "stages_run": ran,
        "dvc_status_lists": listed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the workspaces (printed)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="selfcal-jobs-"))
    run = [sys.executable, "-m", "selfcal.cli", "run"]
    configs = [
        ("dvc-repro", [sys.executable, "-m", "dvc", "repro"]),
        ("run-jobs-1", [*run, "--jobs", "1"]),
        (f"run-jobs-{args.jobs}", [*run, "--jobs", str(args.jobs)]),
    ]
    rows = [run_config(name, cmd, work) for name, cmd in configs]
    base = next(r for r in rows if r["config"] == "run-jobs-1")["wall_s"]
    cores = os.cpu_count() or 1
    for r in rows:
        r["vs_jobs_1"] = round(r["wall_s"] / base, 3)
    result = {
        "machine": f"{platform.machine()}, {cores} cores",
        "python": platform.python_version(),
        "grid": "stories260K; self, vocab x seeds 0, 1 x gptq, wanda (8 compress items); 32 x 128 tokens",
        "rows": rows,
        "hardware_bound_s": round(base / min(args.jobs, cores), 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.keep:
        print(f"workspaces kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
