"""The scaling table: one grid slice run with ``--jobs 1`` and with ``--jobs`` = 2 x the GPU count (issue 20),
from the run folders as committed (each: ``run.log``, the flow's log filtered from the ``study.log`` that
``tools/study_box.sh collect`` brings back, and ``gpu.csv``, nvidia-smi every second). ``A+B``: two runs of
disjoint items one after the other (the slice's ``--jobs 1`` is longer than a lease), walls added. Per run:
GPUs, jobs, the flow's wall time, the speed-up over the ``--jobs 1`` run, each GPU's busy fraction over the
flow's run, and that every item finished exactly once, and on which GPU; ``selfcal study-report --runs`` on
the same folders gives every model's lineage.

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
from selfcal.report.gpu_usage import busy_per_gpu, first_sample_time, gpu_samples  # noqa: E402
from selfcal.report.scaling import (  # noqa: E402
    flow_window,
    in_sequence,
    read_flow_log,
    scaling_markdown,
    scaling_rows,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "runs",
        nargs="+",
        type=Path,
        help="run folders as committed (run.log: the flow's log as the lease step filters it from study.log; "
        "gpu.csv), or A+B: runs of disjoint items one after the other, as one configuration (walls added)",
    )
    ap.add_argument("--out", type=Path, help="write the table here (Markdown) and the rows beside it (.json)")
    args = ap.parse_args(argv)
    try:
        groups = [[Path(p) for p in str(arg).split("+")] for arg in args.runs]
        missing = [str(p) for parts in groups for p in parts if not (p / "run.log").is_file()]
        if missing:
            raise SelfcalError(f"no run.log in {', '.join(missing)}")
        runs = []
        for parts in groups:
            flows = [read_flow_log(p / "run.log") for p in parts]
            busy: dict[str, float] = {}
            if len(parts) == 1 and (parts[0] / "gpu.csv").is_file():
                samples = gpu_samples(parts[0] / "gpu.csv")  # read once: its first date anchors the log's clock
                first = first_sample_time(samples)
                if first is not None:
                    busy = busy_per_gpu(samples, *flow_window(flows[0], first))
            label = "+".join(p.name for p in parts)
            runs.append((label, flows[0] if len(flows) == 1 else in_sequence(flows), busy))
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
