"""Leftovers of killed writers: the hidden scratch siblings of ``selfcal.artifacts``.

``atomic_dir``/``atomic_write_text`` write ``.NAME.tmp-XXXXXXXX`` next to the
output and rename it into place, so a killed stage never leaves half an output,
only this scratch (a checkpoint's worth of disk, for a big model). Nothing
reads scratch; whoever holds the workspace lock may delete it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from selfcal.artifacts import SCRATCH_NAME


def find_scratch(root: Path) -> list[Path]:
    found: list[Path] = []
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if SCRATCH_NAME.match(name):
                found.append(Path(directory) / name)
        dirs[:] = [d for d in dirs if not SCRATCH_NAME.match(d)]  # do not descend into scratch
    return sorted(found)


def sweep_scratch(root: Path) -> list[Path]:
    """Delete scratch under ``root``; call only while holding the workspace lock."""
    removed = find_scratch(root)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return removed
