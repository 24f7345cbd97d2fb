"""DVC stage `compress`: `python -m stages.compress ARGS` = `selfcal compress ARGS` (see `--help`)."""

import sys

from selfcal.cli import main

if __name__ == "__main__":
    sys.exit(main(["compress", *sys.argv[1:]]))
