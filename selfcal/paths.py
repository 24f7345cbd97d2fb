"""The one rule for paths in params: ``~`` expanded, relative to the params file's folder.

A value starting with one of ``LOCAL_PREFIXES`` is a path, never a hub id: when it is
missing that is an error, not a download.
"""

from __future__ import annotations

import os
from pathlib import Path

LOCAL_PREFIXES = ("/", "./", "../", "~")


def shown_path(path: Path, root: Path | None) -> str:
    """``path`` as a record or report should name it: relative to the project ``root`` (``../shared/...``
    for a sibling folder), so committed files carry no machine's absolute paths."""
    if root is None:
        return str(path)
    return os.path.relpath(Path(path).resolve(), Path(root).resolve())


def resolve_path(value: str | os.PathLike[str], root: Path) -> Path:
    """``value`` as an absolute path: ``~`` expanded, a relative one taken from ``root``."""
    p = Path(os.path.expanduser(os.fspath(value)))
    return (p if p.is_absolute() else Path(root) / p).resolve()
