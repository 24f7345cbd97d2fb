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


def test_a_token_digest_is_of_the_values_and_shape_never_the_storage():
    import numpy as np

    from selfcal.hashing import sha256_tokens

    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    d = sha256_tokens(a)
    assert d == sha256_tokens(a.astype(np.int64)) == sha256_tokens(np.asfortranarray(a.astype(">i4")))
    assert d != sha256_tokens(a.reshape(3, 2))  # the same bytes in another shape
    b = a.copy()
    b[1, 2] += 1
    assert d != sha256_tokens(b)


def test_a_tree_digest_sees_every_files_name_and_content_and_not_the_listing_order(tmp_path):
    import hashlib

    from selfcal.hashing import file_digests, file_md5s, sha256_json, tree_digest

    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "sub" / "a.txt").write_text("y")
    (tmp_path / "manifest.json").write_text("{}")
    x, y = hashlib.sha256(b"x").hexdigest(), hashlib.sha256(b"y").hexdigest()
    files = file_digests(tmp_path, exclude=frozenset({"manifest.json"}))
    assert files == {"a.txt": x, "sub/a.txt": y}
    assert set(file_md5s(tmp_path)) == {"a.txt", "sub/a.txt", "manifest.json"}
    d = tree_digest(files)
    assert d == tree_digest({"sub/a.txt": y, "a.txt": x})
    assert d != tree_digest({"a.txt": y, "sub/a.txt": x})  # the same contents, swapped between the names
    assert d != tree_digest({"b.txt": x, "sub/a.txt": y})  # a file renamed
    assert d != tree_digest({"a.txt": x, "sub/a.txt": x})  # a file changed
    assert sha256_json({"a": 1, "b": [2]}) == sha256_json({"b": [2], "a": 1}) != sha256_json({"a": 1, "b": [3]})


def test_a_change_past_the_first_megabyte_changes_a_files_digests(tmp_path):
    import hashlib

    from selfcal.hashing import md5_file, sha256_file

    data = bytearray(b"\0" * ((1 << 20) + 10))
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    before = sha256_file(f), md5_file(f)
    data[-1] = 1
    f.write_bytes(data)
    after = sha256_file(f), md5_file(f)
    assert after == (hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()) and after[0] != before[0]
    assert after[1] != before[1]


def test_an_artifact_is_intact_only_with_exactly_its_listed_files_byte_for_byte(tmp_path):
    from selfcal.artifacts import intact, write_manifest
    from selfcal.records import ArtifactManifest

    (tmp_path / "w.bin").write_bytes(b"abc")
    written = write_manifest(tmp_path, ArtifactManifest, kind="test")
    assert written.content_digest == written.tree_digest and intact(tmp_path, ArtifactManifest) == written
    assert set(written.files) == {"w.bin"}
    (tmp_path / "w.bin").write_bytes(b"abd")
    assert intact(tmp_path, ArtifactManifest) is None
    (tmp_path / "w.bin").write_bytes(b"abc")
    (tmp_path / "extra.txt").write_text("")
    assert intact(tmp_path, ArtifactManifest) is None
    (tmp_path / "extra.txt").unlink()
    (tmp_path / "w.bin").rename(tmp_path / "v.bin")  # the same bytes under another name
    assert intact(tmp_path, ArtifactManifest) is None
    (tmp_path / "v.bin").unlink()  # a listed file missing
    assert intact(tmp_path, ArtifactManifest) is None
