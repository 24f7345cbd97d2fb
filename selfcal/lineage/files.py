"""Where a registered version's files are: in their workspace folder, or in the DVC cache.

A later run with other params writes the same artifact folder (``artifacts/checkpoints/self-s0-gptq``),
so the files an older version was registered with leave the workspace. DVC keeps every output it
ever recorded in its cache, keyed by the md5 of the file (``.dvc/cache/files/md5/ab/cdef...``), and the
registry records each file's md5 beside its sha256 (``selfcal.*_files_md5``), so ``verify`` and
``restore`` find them there without DVC's own index of past ``dvc.lock`` files.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from selfcal.hashing import file_md5s

IN_PLACE = "workspace"
DVC_CACHE = "DVC cache"


@dataclass(frozen=True)
class FileSet:
    """One artifact's files (relative path -> file on this machine), and where they were found."""

    directory: Path  # the artifact's folder in the workspace, for messages and restores
    files: dict[str, Path]
    where: str = IN_PLACE


def in_place(directory: Path) -> FileSet:
    files = {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}
    return FileSet(directory, files)


def md5_tag(directory: Path) -> str:
    """The tag value that lets the files be found in the DVC cache later: {relative path: md5}."""
    return json.dumps(file_md5s(directory), sort_keys=True)


def parse_md5_tag(value: str | None) -> dict[str, str] | None:
    try:
        parsed = json.loads(value) if value else None
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def workspace_of(path: Path) -> Path | None:
    """The DVC project a path lies in: the nearest folder above it holding ``.dvc/``."""
    for folder in [path, *path.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


@functools.cache
def dvc_cache_dir(workspace: Path) -> Path | None:
    """The folder DVC keeps md5-named files in for ``workspace`` (``cache.dir`` honoured), by DVC's own config."""
    try:
        from dvc.repo import Repo

        with Repo(str(workspace)) as repo:
            return Path(repo.cache.local.path)
    except Exception:  # not a usable DVC repo (a broken config): the cache is simply not available
        return None


def cache_file(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def from_dvc_cache(directory: Path, md5s: dict[str, str], workspace: Path | None = None) -> tuple[FileSet | None, str]:
    """The files recorded by ``md5s`` in the DVC cache of ``workspace`` (default: ``directory``'s project),
    or None and why not."""
    workspace = workspace or workspace_of(directory.parent)
    if workspace is None:
        return None, f"{directory} is not inside a DVC project, so no DVC cache keeps older files"
    cache = dvc_cache_dir(workspace)
    if cache is None or not cache.is_dir():
        return None, f"the DVC cache of {workspace} is empty or unreadable"
    files = {rel: cache_file(cache, md5) for rel, md5 in md5s.items()}
    missing = sorted(rel for rel, p in files.items() if not p.is_file())
    if missing:
        return None, f"{len(missing)} of its {len(files)} file(s) are not in the DVC cache ({missing[0]}, ...)"
    return FileSet(directory, files, where=DVC_CACHE), ""
