"""DVC stage `compress`: one calibration set x one method; the same step as `selfcal compress`."""

import argparse
import sys

from selfcal.pipeline.common import run_step
from selfcal.pipeline.compress import compress


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.compress", description=__doc__.splitlines()[0])
    p.add_argument("--source", required=True)
    p.add_argument("--seed", required=True, type=int)
    p.add_argument("--method", required=True, help="one of compression.methods")
    args = p.parse_args(argv)
    return run_step(lambda params: compress(params, args.source, args.seed, args.method))


if __name__ == "__main__":
    sys.exit(main())
