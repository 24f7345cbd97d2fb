"""DVC stage `inspect`: `python -m stages.inspect --source S --seed N` = `selfcal inspect --source S --seed N`."""

import sys

from selfcal.cli import main

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
