"""DVC stage `guard`: runs first on every `dvc repro` (always changed), before DVC touches any
other stage's outputs. It refuses the run when another one holds the workspace (naming it) and
when `selfcal check` fails on params.yaml; otherwise it leaves a small process holding the
workspace lock for this `dvc` until it exits, so nothing else writes in between (see
selfcal/workspace_lock.py). Inside `selfcal run`, which holds the lock already, it only checks."""

import argparse
import sys

from selfcal.pipeline.common import run_step
from selfcal.pipeline.guard import guard


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.guard", description=__doc__.splitlines()[0])
    p.parse_args(argv)
    return run_step(guard, lock=False)


if __name__ == "__main__":
    sys.exit(main())
