"""Find and load models from a local directory or the Hugging Face hub.

Resolution happens before any compute, so a wrong path costs a second, not a
generation run. Weights load from safetensors only and remote code only runs
when the user asked for it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from selfcal.errors import ConfigError, ModelNotFoundError
from selfcal.hashing import sha256_file, sha256_json
from selfcal.paths import LOCAL_PREFIXES, resolve_path
from selfcal.records import ModelFingerprint

_WEIGHT_FILES = (".safetensors", ".json", ".model", ".txt")


@dataclass(frozen=True)
class ModelRef:
    """Where a model lives: ``local_dir`` when on disk, else a hub id + revision."""

    name: str
    local_dir: Path | None
    revision: str | None = None

    @property
    def load_id(self) -> str:
        return str(self.local_dir) if self.local_dir else self.name


def resolve_model(
    name: str, *, root: Path = Path("."), revision: str | None = None, key: str = "model.path"
) -> ModelRef:
    """Map a params value to a loadable model, or fail naming the key.

    A value that exists on disk (relative to ``root``) is a local model. A value
    that looks like a path (``./``, ``../``, ``/``, ``~``) but is missing is an
    error. Anything else is a hub id, checked against the local cache first so an
    offline machine says so instead of hanging on a download.
    """
    candidate = resolve_path(name, root)
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise ModelNotFoundError(f"{key}: {name!r} is a directory without config.json, not a Hugging Face model")
        check_weights(candidate, key=key)
        return ModelRef(name=name, local_dir=candidate.resolve(), revision=revision)
    if candidate.exists():
        raise ModelNotFoundError(f"{key}: {str(candidate)!r} is a file, not a model directory")
    if name.startswith(LOCAL_PREFIXES):
        raise ModelNotFoundError(f"{key}: local model directory {str(candidate)!r} does not exist")
    return _resolve_hub(name, revision=revision, key=key)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_weights(directory: Path, *, key: str = "model.path") -> None:
    """A local model folder must hold safetensors weights with readable headers: selfcal never
    loads pickles (``*.bin`` can run code when unpickled), and a cut or corrupt file should be
    named here, in one line, not deep inside ``from_pretrained``."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelNotFoundError(
                f"{key}: {directory} has only pickle weights ({', '.join(pickles[:3])}); selfcal loads "
                "safetensors only: convert them (transformers' save_pretrained(safe_serialization=True))"
            )
        raise ModelNotFoundError(f"{key}: {directory} has no weights (*.safetensors)")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if size < 8 or n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelNotFoundError(
                f"{key}: {f}: corrupt safetensors header ({err}); re-download or rebuild it"
            ) from None


def _resolve_hub(name: str, *, revision: str | None, key: str) -> ModelRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
    try:
        path = snapshot_download(name, revision=revision, allow_patterns=patterns, local_files_only=True)
        return ModelRef(name=name, local_dir=Path(path), revision=revision)
    except HFValidationError:
        raise ModelNotFoundError(f"{key}: {name!r} is neither a local directory nor a valid hub id") from None
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotFoundError(
            f"{key}: {name!r} is not a local directory and not in the hub cache (HF_HUB_OFFLINE is set)"
        )
    try:
        path = snapshot_download(name, revision=revision, allow_patterns=patterns)
    except Exception as err:  # network errors come in many types; all mean the same here
        raise ModelNotFoundError(
            f"{key}: {name!r} is not a local directory and the hub could not be reached ({type(err).__name__})"
        ) from None
    return ModelRef(name=name, local_dir=Path(path), revision=revision)


def model_config(ref: ModelRef) -> dict:
    assert ref.local_dir is not None
    return json.loads((ref.local_dir / "config.json").read_text())


def context_window(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def fingerprint(ref: ModelRef) -> ModelFingerprint:
    """Identify the exact weights: a digest over config, tokenizer and weight files."""
    assert ref.local_dir is not None
    files = {
        p.name: sha256_file(p)
        for p in sorted(ref.local_dir.iterdir())
        if p.is_file() and p.name.endswith(_WEIGHT_FILES)
    }
    return ModelFingerprint(name=ref.name, revision=ref.revision, digest=sha256_json(files))


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device: 'cuda' requested but no CUDA device is available")
    return requested


def load_model(ref: ModelRef, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        ref.load_id,
        revision=ref.revision if ref.local_dir is None else None,
        dtype=getattr(torch, dtype),
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    return model.to(device).eval()


def load_tokenizer(ref: ModelRef, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref.load_id, trust_remote_code=trust_remote_code)
