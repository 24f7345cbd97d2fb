"""DVC stage `evaluate`: score 'dense' or one checkpoint; the same step as `selfcal evaluate`."""

import argparse
import sys

from selfcal.pipeline.common import run_step
from selfcal.pipeline.evaluate import evaluate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("target", help="'dense' or a checkpoint name (SOURCE-sSEED-METHOD)")
    args = p.parse_args(argv)
    return run_step(lambda params: evaluate(params, args.target))


if __name__ == "__main__":
    sys.exit(main())
