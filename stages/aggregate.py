"""DVC stage `aggregate`: the report tables and metrics; the same step as `selfcal aggregate`."""

import argparse
import sys

from selfcal.pipeline.aggregate import aggregate
from selfcal.pipeline.common import run_step


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m stages.aggregate", description=__doc__.splitlines()[0]).parse_args(argv)
    return run_step(aggregate)


if __name__ == "__main__":
    sys.exit(main())
