"""Atomic artifact directories with a JSON manifest.

A stage writes into a hidden sibling directory and renames it into place only
when every file, manifest included, is complete: a killed run leaves either the
old artifact or the new one, never half of one.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from selfcal import faults
from selfcal.errors import DataError
from selfcal.hashing import file_digests, tree_digest
from selfcal.records import ArtifactManifest, dump_record, read_record

M = TypeVar("M", bound=ArtifactManifest)

MANIFEST = "manifest.json"
# How a run went (wall times, peak memory): listed in a manifest's files, never in its content digest.
RUN_FACTS = "run.json"
_TRACKED_PACKAGES = ("selfcal", "torch", "transformers", "llmcompressor", "compressed-tensors", "lm-eval")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# Scratch siblings of an output: ``.NAME.tmp-XXXXXXXX`` while writing, ``.NAME.old-XXXXXXXX``
# while replacing. selfcal.scratch finds a killed writer's leftovers by this same pattern.
SCRATCH_NAME = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


def _scratch(final: Path, kind: str) -> Path:
    return final.parent / f".{final.name}.{kind}-{uuid.uuid4().hex[:8]}"


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a scratch directory that replaces ``final`` only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        faults.point("artifacts:before-rename")
        if final.exists():
            old = _scratch(final, "old")
            os.replace(final, old)
            faults.point("artifacts:mid-swap")
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _scratch(path, "tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_manifest(directory: Path, record: type[M], *, content_digest: str | None = None, **fields: Any) -> M:
    """Record what is in ``directory``, what it was made from and by which software, as a typed
    ``record`` (``selfcal.records``): the one writer of every manifest.json.

    ``files`` lists every file's sha256 so ``selfcal verify`` can name the one that
    changed; ``tree_digest`` condenses them; ``content_digest`` is the semantic
    identity (e.g. the token matrix) when one exists.
    """
    files = file_digests(directory, exclude=frozenset({MANIFEST}))
    manifest = record(
        content_digest=content_digest or tree_digest(files),
        tree_digest=tree_digest(files),
        files=files,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=library_versions(),
        argv=list(sys.argv),
        **fields,
    )
    (directory / MANIFEST).write_text(dump_record(manifest))
    return manifest


def read_manifest(directory: Path, record: type[M]) -> M:
    """The one reader of a manifest.json: validated as ``record``, or one line saying why not."""
    path = directory / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: manifest missing; is {directory} an artifact written by selfcal?")
    return read_record(record, path)


def intact(directory: Path, record: type[M]) -> M | None:
    """The manifest of ``directory`` when it is a complete artifact: a valid ``record`` whose listed files are
    exactly the files there, byte for byte. None for anything else (missing, half, edited, other schema)."""
    try:
        manifest = read_manifest(directory, record)
        on_disk = file_digests(directory, exclude=frozenset({MANIFEST}))
    except (DataError, OSError):
        return None
    return manifest if on_disk == manifest.files else None
