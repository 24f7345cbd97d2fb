"""Apply a registered method to a model with a calibration set, through llm-compressor.

The calibration set is handed over exactly as prepared: no shuffling, every sample,
its own sequence length. Otherwise ``oneshot`` would shuffle, cap at 512 samples and
re-truncate, and the lineage would name a set that was not what the model saw.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfcal.artifacts import atomic_dir, write_manifest
from selfcal.compression.layers import indivisible_layers, linear_layers, targeted
from selfcal.compression.registry import METHODS, Method
from selfcal.errors import ConfigError

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class Plan:
    """Everything decided before weights are loaded, so bad settings fail in a second."""

    method: Method
    section: object
    skipped_layers: list[str]


def plan(method_name: str, compression_cfg, model_config: dict) -> Plan:
    try:
        method = METHODS[method_name]
    except KeyError:
        raise ConfigError(f"compression.methods: unknown method {method_name!r}; known: {sorted(METHODS)}") from None
    section = getattr(compression_cfg, method.config_key)
    skipped: list[str] = []
    group = method.group_size(section)
    if group:
        layers = linear_layers(model_config)
        bad = indivisible_layers(layers, group, list(section.ignore))
        if bad and len(bad) == len(targeted(layers, list(section.ignore))):
            raise ConfigError(
                f"compression.{method.config_key}.group_size: {group} divides the input width of no "
                f"targeted layer (e.g. {bad[0]}); nothing would be compressed"
            )
        if bad and not section.skip_indivisible:
            raise ConfigError(
                f"compression.{method.config_key}.group_size: {group} does not divide the input width of "
                f"{len(bad)} layer(s) (e.g. {bad[0]}); choose another group_size or set "
                f"compression.{method.config_key}.skip_indivisible: true to leave them dense"
            )
        skipped = bad
    return Plan(method=method, section=section, skipped_layers=skipped)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def compress(model, tokenizer, tokens: np.ndarray, the_plan: Plan, out_dir: Path, *, manifest_fields: dict, base_dir: Path | None) -> dict:
    """Compress ``model`` in place with ``tokens`` and write the checkpoint atomically."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    n, seq_len = tokens.shape
    ids = tokens.astype(np.int64).tolist()
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len for _ in range(n)]})
    recipe = the_plan.method.build_recipe(the_plan.section, [f"re:^{re.escape(name)}$" for name in the_plan.skipped_layers])
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    seconds = time.perf_counter() - t0
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        if base_dir is not None:
            _copy_tokenizer(base_dir, tmp)
        manifest = write_manifest(
            tmp,
            kind="checkpoint",
            method=the_plan.method.name,
            method_params=the_plan.section.model_dump(),
            skipped_layers=the_plan.skipped_layers,
            compress_seconds=round(seconds, 3),
            peak_cuda_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            **manifest_fields,
        )
    return manifest
