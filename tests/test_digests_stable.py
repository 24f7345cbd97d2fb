"""The same params and seeds give the same artifacts as before the pipeline's refactoring.

Digests recorded at commit a2380c9 (before the one-shape refactoring: methods as modules, typed
records, ground modules), on the real stories260K, CPU, torch 2.13.0 + transformers 5.17.0 +
llm-compressor 0.14.0.1: calibration sets by their token digest, checkpoints by the sha256 of
their weights file. A change that alters what a stage computes on purpose updates them here,
in the same commit, saying why.
"""

from __future__ import annotations

import pytest

from selfcal.config import parse_params
from selfcal.hashing import sha256_file
from selfcal.pipeline import layout
from selfcal.pipeline.compress import compress
from selfcal.pipeline.generate import generate
from tests.helpers import DATA, small_params

RECORDED = {
    "calibration/self": "1c36ff2b88d4ccee5139ef140a2da044bf87ac85c73eba96b9434dda7393bbd4",
    "calibration/vocab": "aad5bb06da73e2edd377fdac61963e89c3c1470e92eae31da3ddafa544ad5b75",
    "calibration/c4": "d15a13b4d32e991859ffcaa1a65a9dfe9668b3d930d715e45b1202ace830378b",
    "checkpoint/self-gptq": "77e16d0e50551ed033333dd73e8279d08214e7e743ab52fb3c0b6519d6130b68",
    "checkpoint/self-wanda": "0218f6c7db82fc220cd19c9f284797067fcb700d39a59464faa1b53c8b112a94",
}


@pytest.mark.integration
def test_calibration_digests_and_checkpoint_files_are_unchanged(stories, shared_data, tmp_path):
    over = {
        "calibration.sources": {
            "self": {"kind": "self"},
            "vocab": {"kind": "vocab"},
            "c4": {"kind": "corpus", "path": str(DATA / "c4_sample" / "c4_sample.jsonl")},
        },
        "calibration.n_samples": 8,
        "calibration.seq_len": 64,
        "compression.methods": ["gptq", "wanda"],
        "compression.gptq": {"group_size": 32, "skip_indivisible": True},
        "tracking.enabled": False,
    }
    p = parse_params(small_params(stories, tmp_path, **over), root=tmp_path)
    got = {f"calibration/{s}": generate(p, s, 0, progress=False).content_digest for s in ("self", "vocab", "c4")}
    for m in ("gptq", "wanda"):
        compress(p, "self", 0, m)
        got[f"checkpoint/self-{m}"] = sha256_file(layout.checkpoint_dir(p, "self", 0, m) / "model.safetensors")
    assert got == RECORDED
