"""DVC stage `aggregate`: `python -m stages.aggregate ARGS` = `selfcal aggregate ARGS` (see `--help`)."""

import sys

from selfcal.cli import main

if __name__ == "__main__":
    sys.exit(main(["aggregate", *sys.argv[1:]]))
