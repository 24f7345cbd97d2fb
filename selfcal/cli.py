"""``selfcal``: run pipeline steps by hand, check params, or run the whole flow.

Each step reads the validated params.yaml ($SELFCAL_PARAMS or --params) and writes
the same artifacts the DVC stages write; ``dvc repro`` is the reproducible way to
run them all, ``selfcal run`` the one-command way through Prefect.
"""

from __future__ import annotations

import argparse
import sys

from selfcal.pipeline.common import run_cli, setup_logging


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selfcal",
        description="Compress causal LMs with self-generated calibration data, with lineage.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  selfcal check                              validate params.yaml and find the model\n"
        "  selfcal generate --source self --seed 0    sample one calibration set\n"
        "  selfcal compress --source self --seed 0 --method gptq\n"
        "  selfcal evaluate dense                     score the uncompressed model\n"
        "  selfcal aggregate                          write artifacts/report/results.{csv,md}\n"
        "  selfcal run                                the whole pipeline (Prefect flow over dvc repro)\n",
    )
    p.add_argument("--params", help="params file (default: $SELFCAL_PARAMS or ./params.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("check", help="validate params and resolve the model; no compute")

    g = sub.add_parser("generate", help="write one calibration set (source x seed)")
    g.add_argument("--source", required=True, help="a key of calibration.sources")
    g.add_argument("--seed", required=True, type=int, help="one of calibration.seeds")

    c = sub.add_parser("compress", help="compress the base model with one calibration set and method")
    c.add_argument("--source", required=True)
    c.add_argument("--seed", required=True, type=int)
    c.add_argument("--method", required=True, help="one of compression.methods")

    e = sub.add_parser("evaluate", help="score 'dense' or a checkpoint name (SOURCE-sSEED-METHOD)")
    e.add_argument("target", help="'dense' or a checkpoint directory name under artifacts/checkpoints")

    sub.add_parser("aggregate", help="summarise metrics into CSV and Markdown tables")

    r = sub.add_parser("run", help="run the whole pipeline as a Prefect flow (local ephemeral API)")
    r.add_argument("--force", action="store_true", help="re-run stages even if DVC says they are up to date")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(args.verbose)

    def go() -> None:
        from selfcal.config import load_params

        params = load_params(args.params)
        progress = not args.no_progress
        if args.command == "check":
            from selfcal.pipeline.common import base_model, check_context

            ref, config = base_model(params)
            check_context(config, params.calibration.seq_len, "calibration.seq_len")
            print(f"ok: params valid; model {ref.name} -> {ref.local_dir}")
        elif args.command == "generate":
            from selfcal.pipeline.generate import generate

            generate(params, args.source, args.seed, progress=progress)
        elif args.command == "compress":
            from selfcal.pipeline.compress import compress

            compress(params, args.source, args.seed, args.method)
        elif args.command == "evaluate":
            from selfcal.pipeline.evaluate import evaluate

            evaluate(params, args.target, progress=progress)
        elif args.command == "aggregate":
            from selfcal.pipeline.aggregate import aggregate

            aggregate(params)
        elif args.command == "run":
            from flows.pipeline import pipeline

            pipeline(force=args.force)

    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
