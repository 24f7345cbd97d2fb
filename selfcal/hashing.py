"""Content hashes: the identity of every artifact.

Hashes are over content, never over paths or timestamps, so the same params and
seed give the same digest on any machine that produces the same tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def md5_file(path: Path) -> str:
    """The md5 DVC 3 keys its cache by (``.dvc/cache/files/md5/ab/cdef...``): recorded at registration so
    a version's files can be found there after a later run replaced them in the workspace."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_md5s(root: Path) -> dict[str, str]:
    """md5 of every file below ``root`` (manifest included), keyed by POSIX relative path."""
    return {p.relative_to(root).as_posix(): md5_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def sha256_tokens(tokens: np.ndarray) -> str:
    """Digest of a token matrix that ignores the storage format it came from."""
    arr = np.ascontiguousarray(tokens, dtype="<i4")
    h = hashlib.sha256()
    h.update(canonical_json({"dtype": "int32", "shape": list(arr.shape)}))
    h.update(arr.tobytes())
    return h.hexdigest()


def file_digests(root: Path, exclude: frozenset[str] = frozenset()) -> dict[str, str]:
    """sha256 of every file below ``root``, keyed by POSIX relative path."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() not in exclude
    }


def tree_digest(files: dict[str, str]) -> str:
    """One digest for a directory, from its per-file digests."""
    return sha256_json(sorted(files.items()))
