"""The one rule for paths in params: ``~`` expanded, relative to the params file's folder.

A value starting with one of ``LOCAL_PREFIXES`` is a path, never a hub id: when it is
missing that is an error, not a download.
"""

from __future__ import annotations

import os
from pathlib import Path

LOCAL_PREFIXES = ("/", "./", "../", "~")


#: Where DVC runs a queued (``dvc exp run --queue``) or ``--temp`` experiment: a copy of the workspace's
#: tracked files under ``<workspace>/.dvc/tmp/exps/`` (dvc/repo/experiments/executor/local.py, TempDirExecutor)
_EXPERIMENT_COPIES = (".dvc", "tmp", "exps")


def experiment_origin(root: Path) -> Path | None:
    """The workspace a DVC experiment copy at ``root`` was made from; None when ``root`` is no such copy."""
    parts = Path(root).resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == _EXPERIMENT_COPIES:
            return Path(*parts[:i])
    return None


def _base(path: Path, root: Path) -> Path:
    """The folder a path outside the workspace is taken from: the workspace itself, or, in a DVC experiment's
    copy (which holds the tracked files only), the workspace it was copied from: ``../shared`` is beside that
    one (an audit's queued experiments looked for ``.dvc/tmp/exps/shared`` and failed at the guard)."""
    if path == root or root in path.parents:
        return root
    return experiment_origin(root) or root


def shown_path(path: Path, root: Path | None) -> str:
    """``path`` as a record or report should name it: relative to the project ``root`` (``../shared/...``
    for a sibling folder), so committed files carry no machine's absolute paths; the same from a DVC
    experiment's copy of the workspace."""
    if root is None:
        return str(path)
    path, root = Path(path).resolve(), Path(root).resolve()
    return os.path.relpath(path, _base(path, root))


def resolve_path(value: str | os.PathLike[str], root: Path) -> Path:
    """``value`` as an absolute path: ``~`` expanded, a relative one taken from ``root`` (from the original
    workspace when it leads out of a DVC experiment's copy of it)."""
    p = Path(os.path.expanduser(os.fspath(value)))
    if p.is_absolute():
        return p.resolve()
    root = Path(root).resolve()
    full = (root / p).resolve()
    base = _base(full, root)
    return full if base == root else (base / p).resolve()
