"""Test helpers: a tiny random Llama built in-process, and params pointing at it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SELFCAL_SHARED_DIR", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"


def build_tiny_model(directory: Path, *, seed: int = 0, max_positions: int = 128, tie: bool = True) -> Path:
    """A random 2-layer Llama whose linear layers are all multiples of 128 wide.

    It borrows the stories260K tokenizer (512 tokens) so text round-trips; the
    weights are random, so nothing here depends on a pretrained model. ``tie`` shares
    lm_head with the input embeddings (stored once), as stories260K and SmolLM2 do.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy2(STORIES / name, directory / name)
    return directory


def small_params(model_dir: Path, workdir: Path, **overrides) -> dict:
    """A fast params dict: 4 x 32 calibration tokens, GPTQ, 20 ARC-Easy items, 4 ppl windows."""
    params = {
        "model": {"path": str(model_dir), "device": "cpu"},
        "calibration": {
            "n_samples": 4,
            "seq_len": 32,
            "seeds": [0],
            "batch_size": 4,
            "sources": {"self": {"kind": "self"}},
            # dvc.yaml tracks this key, so a params.yaml for `dvc repro` must spell it out.
            "diagnostics": {"reference_path": None},
        },
        "compression": {"methods": ["gptq"], "gptq": {"group_size": 128}},
        "evaluation": {
            "tasks": ["arc_easy"],
            "data_dir": str(DATA),
            "limit": 20,
            "batch_size": 8,
            "perplexity": {"wikitext2": {"path": str(DATA / "wikitext2_raw" / "test_joined_gptq_style.txt"), "seq_len": 64, "max_windows": 4}},
        },
        "tracking": {"tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}"},
        "paths": {"artifacts": str(workdir / "artifacts"), "state": str(workdir / "state")},
    }
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def pipeline_workspace(dest: Path, model_dir: Path, **overrides) -> tuple[Path, dict]:
    """A copy of the checkout's pipeline files (tracked and new, as in the working tree) at ``dest``,
    its params.yaml pointing at ``model_dir``, no dvc.lock: a workspace where nothing ran yet."""
    import subprocess

    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for rel in listed:
        if rel.startswith(("tests/", "README")) or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    data = small_params(model_dir, dest, **overrides)
    data["paths"] = {"artifacts": "artifacts", "state": ".selfcal"}
    if "tracking.tracking_uri" not in overrides:
        data["tracking"]["tracking_uri"] = None  # the workspace's own .selfcal/mlflow.db
    write_params(dest / "params.yaml", data)
    return dest, data
