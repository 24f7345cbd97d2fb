"""DVC stage `generate`: one calibration set (source x seed); the same step as `selfcal generate`.

Each stage imports only the pipeline step it runs, so dvc.yaml can list exactly the code it
reads (tests/test_dvc_deps.py checks that against this import graph)."""

import argparse
import sys

from selfcal.pipeline.common import run_step
from selfcal.pipeline.generate import generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.generate", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="a key of calibration.sources")
    p.add_argument("--seed", required=True, type=int, help="one of calibration.seeds")
    args = p.parse_args(argv)
    return run_step(lambda params: generate(params, args.source, args.seed))


if __name__ == "__main__":
    sys.exit(main())
