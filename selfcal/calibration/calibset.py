"""A calibration set on disk: token ids (safetensors), readable text, manifest.

The token matrix is the set's identity: ``content_digest`` hashes it, and every
checkpoint made from the set records that digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfcal.artifacts import atomic_dir, read_manifest, write_manifest
from selfcal.errors import DataError
from selfcal.hashing import sha256_tokens
from selfcal.records import CalibrationManifest

TOKENS = "tokens.safetensors"
TEXT = "samples.jsonl"


@dataclass(frozen=True)
class CalibrationSet:
    tokens: np.ndarray  # (n, seq_len) int32
    manifest: CalibrationManifest

    @property
    def digest(self) -> str:
        return self.manifest.content_digest

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def save_calibration_set(
    directory: Path, tokens: np.ndarray, texts: list[str], **manifest_fields
) -> CalibrationManifest:
    """Write the set atomically; ``manifest_fields`` are the CalibrationManifest's own fields."""
    from safetensors.numpy import save_file

    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise DataError(f"calibration set must be a non-empty (n, seq_len) matrix, got shape {tokens.shape}")
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    digest = sha256_tokens(tokens)
    with atomic_dir(directory) as tmp:
        save_file({"input_ids": tokens}, str(tmp / TOKENS))
        with open(tmp / TEXT, "w") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"index": i, "text": text}, ensure_ascii=False) + "\n")
        manifest = write_manifest(
            tmp, CalibrationManifest, content_digest=digest, shape=list(tokens.shape), **manifest_fields
        )
    return manifest


def read_tokens(path: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    return load_file(str(path))["input_ids"]


def token_digest(path: Path) -> str:
    """The content digest of a tokens file, wherever it lies (the set's folder, the DVC cache)."""
    return sha256_tokens(read_tokens(path))


def load_calibration_set(directory: Path) -> CalibrationSet:
    path = directory / TOKENS
    if not path.is_file():
        raise DataError(f"{path}: calibration tokens missing (run the generate stage first)")
    manifest = read_manifest(directory, CalibrationManifest)
    tokens = read_tokens(path)
    if sha256_tokens(tokens) != manifest.content_digest:
        raise DataError(f"{path}: token content does not match the manifest's content_digest")
    return CalibrationSet(tokens=tokens, manifest=manifest)
