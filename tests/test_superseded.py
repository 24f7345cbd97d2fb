"""An older registered version stays verifiable after a later run replaced its files (issue 16, item 1).

Version 1 of a model is compressed and DVC caches its folders; then other params re-compress the same
item into the same folder (version 2). `verify NAME:1` must find version 1's files in the DVC cache by
the md5s recorded at registration, and `restore` must copy them out, verified; without the cache,
verify says in one line that they were superseded and how to get them back.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from selfcal.cli import main
from selfcal.config import parse_params
from selfcal.hashing import file_digests
from selfcal.pipeline import layout
from selfcal.pipeline.compress import compress
from selfcal.pipeline.generate import generate
from tests.helpers import small_params

NAME = "tiny-llama-gptq-self"


def _dvc(work, *args):
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, check=True, capture_output=True)


def _params(tiny_model, work, **overrides):
    data = small_params(tiny_model, work, **{"evaluation.tasks": [], "evaluation.perplexity": {}, **overrides})
    return parse_params(data, root=work)


@pytest.fixture(scope="module")
def superseded(tiny_model, tmp_path_factory):
    """Version 1 cached by DVC, then replaced in the workspace by version 2 (other GPTQ params, other set)."""
    work = tmp_path_factory.mktemp("superseded")
    _dvc(work, "init", "--no-scm", "-q")
    v1 = _params(tiny_model, work)
    generate(v1, "self", 0, progress=False)
    m1 = compress(v1, "self", 0, "gptq")
    ckpt, calib = layout.checkpoint_dir(v1, "self", 0, "gptq"), layout.calibration_dir(v1, "self", 0)
    files_v1 = {"checkpoint": file_digests(ckpt), "calibration": file_digests(calib)}
    # What `dvc repro` does after a stage: the outputs go into DVC's cache.
    _dvc(work, "add", "-q", str(ckpt.relative_to(work)), str(calib.relative_to(work)))
    v2 = _params(
        tiny_model,
        work,
        **{
            "calibration.sources": {"self": {"kind": "self", "t_initial": 2.0}},
            "compression.gptq": {"group_size": 128, "dampening_frac": 0.05},
        },
    )
    generate(v2, "self", 0, progress=False)
    m2 = compress(v2, "self", 0, "gptq")
    assert m1.content_digest != m2.content_digest, "the second run must replace the checkpoint"
    return work, v1, files_v1


def _cli(capsys, params, *args):
    code = main([*args, "--tracking-uri", params.tracking.tracking_uri])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_older_version_verifies_from_the_dvc_cache(superseded, capsys):
    work, params, _ = superseded
    code, out, err = _cli(capsys, params, "verify", f"{NAME}:1")
    assert code == 0, err
    assert "from the DVC cache" in out and "checkpoint" in out and "calibration" in out
    assert "now holds another run's checkpoint" in err and f"selfcal restore {NAME}:1 DEST" in err
    code, out, err = _cli(capsys, params, "verify", f"{NAME}:2")
    assert code == 0 and "DVC cache" not in out, err  # the newest version is the one in place


def test_restore_copies_the_older_version_out_verified(superseded, capsys, tmp_path):
    work, params, files_v1 = superseded
    dest = tmp_path / "v1"
    code, out, err = _cli(capsys, params, "restore", f"{NAME}:1", str(dest))
    assert code == 0, err
    assert file_digests(dest / "checkpoint") == files_v1["checkpoint"]
    assert file_digests(dest / "calibration") == files_v1["calibration"]
    code, _, err = _cli(capsys, params, "restore", f"{NAME}:1", str(dest))  # never over an existing folder
    assert code == 2 and "is not an empty folder" in err


def test_a_flipped_byte_in_the_cached_copy_is_still_caught(superseded, capsys):
    work, params, files_v1 = superseded
    from selfcal.hashing import md5_file

    ckpt = work / "artifacts" / "checkpoints" / "self-s0-gptq"
    # v1's weights in the cache, found by the md5 the registry holds
    from selfcal.lineage import tags as T
    from selfcal.lineage.files import cache_file, dvc_cache_dir, parse_md5_tag
    from selfcal.lineage.tracking import open_client

    client = open_client(params.tracking.tracking_uri)
    md5s = parse_md5_tag(client.get_model_version(NAME, "1").tags[T.CHECKPOINT_FILES_MD5])
    cached = cache_file(dvc_cache_dir(work), md5s["model.safetensors"])
    assert md5_file(cached) == md5s["model.safetensors"] and ckpt.is_dir()
    original = cached.read_bytes()
    cached.chmod(0o644)
    cached.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    try:
        code, _, err = _cli(capsys, params, "verify", f"{NAME}:1")
    finally:
        cached.write_bytes(original)
    assert code == 2 and "sha256 mismatch" in err and md5s["model.safetensors"][2:] in err, err


def test_without_the_cache_verify_says_superseded_in_one_line(superseded, capsys):
    work, params, _ = superseded
    cache = work / ".dvc" / "cache"
    hidden = work / "cache-elsewhere"
    shutil.move(cache, hidden)
    try:
        code, _, err = _cli(capsys, params, "verify", f"{NAME}:1")
    finally:
        shutil.move(hidden, cache)
    lines = [line for line in err.splitlines() if line.startswith("verify: ")]
    assert code == 2
    assert any(
        "self-s0-gptq: superseded: another run wrote another checkpoint there" in line and "dvc pull" in line
        for line in lines
    ), err
    assert any("self-s0: superseded: another run wrote another calibration set there" in line for line in lines)
    assert "Traceback" not in err


def test_a_version_registered_by_another_workspace_verifies_from_this_projects_cache(superseded, capsys, tmp_path):
    """A fanned-out grid registers each model from the worker that made it; on another box its folder is absent,
    and `dvc pull` brings the same files into that box's own cache, where verify finds them by md5."""
    import os

    work, params, _ = superseded
    other = tmp_path / "other-box"
    other.mkdir()
    _dvc(other, "init", "--no-scm", "-q")
    shutil.copytree(work / ".dvc" / "cache", other / ".dvc" / "cache", dirs_exist_ok=True)  # what `dvc pull` does
    hidden = work.parent / f"{work.name}-artifacts-gone"
    shutil.move(work / "artifacts", hidden)  # the registering workspace's folders are not on this machine
    cwd = os.getcwd()
    os.chdir(other)
    try:
        code, out, err = _cli(capsys, params, "verify", f"{NAME}:1")
    finally:
        os.chdir(cwd)
        shutil.move(hidden, work / "artifacts")
    assert code == 0, err
    assert "from the DVC cache" in out and "is not on this machine" in err


def test_the_same_content_under_another_runs_manifest_verifies_from_the_dvc_cache(tiny_model, tmp_path, capsys):
    """An audit's clone: after a code change, `dvc repro` re-ran compress with the same inputs: the same
    checkpoint digest, registered again (v3 beside v1) under a manifest with another creation time. `verify v1`
    called v1's manifest tampered with. The folder holds v1's content under another run's self-consistent
    manifest: v1's files (its manifest too) are verified in the DVC cache instead; a folder whose content is
    not v1's is still a mismatch."""
    import json

    from selfcal.hashing import sha256_file

    _dvc(tmp_path, "init", "--no-scm", "-q")
    params = _params(tiny_model, tmp_path)
    generate(params, "self", 0, progress=False)
    compress(params, "self", 0, "gptq")
    ckpt = layout.checkpoint_dir(params, "self", 0, "gptq")
    _dvc(tmp_path, "add", "-q", str(ckpt.relative_to(tmp_path)))
    manifest = ckpt / "manifest.json"
    original = manifest.read_bytes()
    rerun = json.loads(original)
    rerun["created_utc"] = "2030-01-01T00:00:00+00:00"  # what a re-run with the same inputs changes
    manifest.write_text(json.dumps(rerun, indent=2) + "\n")
    code, out, err = _cli(capsys, params, "verify", f"{NAME}:1")
    assert code == 0, err
    assert "self-s0-gptq (8 files, from the DVC cache)" in out and "now holds another run's checkpoint" in err
    weights = ckpt / "model.safetensors"  # the same manifest over other content: not a re-run, a mismatch
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    rerun["files"]["model.safetensors"] = sha256_file(weights)
    manifest.write_text(json.dumps(rerun, indent=2) + "\n")
    code, _, err = _cli(capsys, params, "verify", f"{NAME}:1")
    assert code == 2 and f"verify: {manifest}: sha256 mismatch (registered " in err
