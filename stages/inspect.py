"""DVC stage `inspect`: diagnostics of one calibration set; the same step as `selfcal inspect --source S --seed N`."""

import argparse
import sys

from selfcal.pipeline.common import run_step
from selfcal.pipeline.inspect import inspect_stage


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.inspect", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True)
    p.add_argument("--seed", required=True, type=int)
    args = p.parse_args(argv)
    return run_step(lambda params: inspect_stage(params, args.source, args.seed))


if __name__ == "__main__":
    sys.exit(main())
