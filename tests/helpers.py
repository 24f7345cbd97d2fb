"""Test helpers: a tiny random Llama built in-process, and params pointing at it."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SELFCAL_SHARED_DIR", REPO.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
DATA = SHARED / "data"


# English text the unit tier's tokenizer is trained on (and that tests write into small corpora).
TOKENIZER_TEXT = (
    "Once upon a time there was a little cat. The cat sat on a mat and then a dog ran to the park "
    "where birds sang all day long. She said hello to her friend, and he smiled. They played with a "
    "red ball in the garden until the sun went down. Question: which animal sat on the mat? Answer: "
    "the cat. A scientist measures the temperature of water; it boils at one hundred degrees. "
    "The quick brown fox jumps over the lazy dog. Plants need light, water and air to grow. "
    "Every morning the children walked to school along the river, counting boats and ducks. "
    "History tells of kings, queens and merchants who traded silk, spices, gold and salt across "
    "mountains, deserts and oceans. Numbers such as 1, 2, 3, 42, 100 and 2048 appear in tables. "
    "Energy moves from the sun to the earth; clouds form, rain falls, rivers flow to the sea. "
    "Why do leaves change colour in autumn? Because chlorophyll breaks down as days get shorter. "
)


def build_tokenizer(directory: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer trained in-process (no download, no ../shared): <unk> 0, <s> 1,
    </s> 2, BOS added in front of every text like a Llama tokenizer, any text encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TOKENIZER_TEXT] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=1 << 20
    )
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def build_tiny_model(directory: Path, *, seed: int = 0, max_positions: int = 128, tie: bool = True) -> Path:
    """A random 2-layer Llama whose linear layers are all multiples of 128 wide, with the in-process
    tokenizer above (512 tokens), so the unit tier needs nothing from ../shared. ``tie`` shares
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
    build_tokenizer(directory)
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
            "perplexity": {
                "wikitext2": {
                    "path": str(DATA / "wikitext2_raw" / "test_joined_gptq_style.txt"),
                    "seq_len": 64,
                    "max_windows": 4,
                }
            },
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
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
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


def calibration_fields(tokens, **overrides) -> dict:
    """Every field a CalibrationManifest needs, for a test that writes a set by hand."""
    fields = {
        "source": "test",
        "source_params": {"kind": "test"},
        "source_version": 1,
        "seed": 0,
        "n_samples": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "model": {"name": "test-model", "revision": None, "digest": "0" * 64},
        "wall_seconds": 0.0,
    }
    fields.update(overrides)
    return fields


@contextmanager
def hold_workspace(root: Path, label: str):
    """Another process holds ``root``'s workspace lock for the block, as a running flow would; yields
    the owner's pid (a ``sleep`` the holder process keeps the lock for)."""
    import subprocess
    import sys

    owner = subprocess.Popen(["sleep", "300"])
    holder = subprocess.Popen(
        [sys.executable, "-m", "selfcal.workspace_lock", str(root), str(owner.pid), label],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield owner.pid
    finally:
        owner.kill()
        owner.wait()
        holder.wait(timeout=30)


def params_error(data) -> str:
    """The one-line ConfigError that parse_params gives for ``data`` (asserted to be one line)."""
    import pytest

    from selfcal.config import parse_params
    from selfcal.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse_params(data, source="params.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def load_script(relative: str):
    """A repository script that is no package module (``tools/airgap.py``, ``benchmarks/scaling.py``), imported
    from its file so a test can call its functions."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
