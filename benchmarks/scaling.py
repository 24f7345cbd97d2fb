"""The scaling table: one grid slice run with ``--jobs 1`` and with ``--jobs`` = 2 x the GPU count (issue 20),
from the run folders ``tools/study_box.sh collect`` brings back (each: ``run.log``, the flow's filtered log, and
``gpu.csv``, nvidia-smi every second). Per run: GPUs, jobs, the flow's wall time, the speed-up over the
``--jobs 1`` run, each GPU's busy fraction, and that every item finished exactly once, and on which GPU;
``selfcal study-report --runs`` on the same folders gives every model's lineage.

    python benchmarks/scaling.py reports/SmolLM2-135M/scaling/runs/* --out reports/SmolLM2-135M/scaling/table.md
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from selfcal.artifacts import atomic_write_text  # noqa: E402
from selfcal.errors import SelfcalError  # noqa: E402
from selfcal.report.gpu_usage import busy_per_gpu  # noqa: E402
from selfcal.report.scaling import read_flow_log, scaling_markdown, scaling_rows  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders, each with run.log (and gpu.csv)")
    ap.add_argument("--out", type=Path, help="write the table here (Markdown) and the rows beside it (.json)")
    args = ap.parse_args(argv)
    try:
        missing = [str(r) for r in args.runs if not (r / "run.log").is_file()]
        if missing:
            raise SelfcalError(f"no run.log in {', '.join(missing)}")
        runs = []
        for folder in args.runs:
            gpu_csv = folder / "gpu.csv"
            busy = busy_per_gpu(gpu_csv) if gpu_csv.is_file() else {}
            runs.append((folder.name, read_flow_log(folder / "run.log"), busy))
        rows = scaling_rows(runs)
    except SelfcalError as e:
        print(f"scaling: {e}", file=sys.stderr)
        return 2
    table = scaling_markdown(rows)
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, table)
        atomic_write_text(args.out.with_suffix(".json"), json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
