"""DVC stage `evaluate`: `python -m stages.evaluate ARGS` = `selfcal evaluate ARGS` (see `--help`)."""

import sys

from selfcal.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
