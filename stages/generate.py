"""DVC stage `generate`: `python -m stages.generate ARGS` = `selfcal generate ARGS` (see `--help`)."""

import sys

from selfcal.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
