"""Apply a registered method to a model with a calibration set, through llm-compressor.

The calibration set is handed over exactly as prepared: no shuffling, every sample,
its own sequence length. Otherwise ``oneshot`` would shuffle, cap at 512 samples and
re-truncate, and the lineage would name a set that was not what the model saw.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfcal.artifacts import atomic_dir, write_manifest
from selfcal.compression.layers import indivisible_layers, linear_layers, matches, targeted
from selfcal.compression.registry import METHODS, Method, RecipeContext
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
    context: RecipeContext

    @property
    def skipped_layers(self) -> list[str]:
        return list(self.context.skipped_layers)


def plan(method_name: str, compression_cfg, model_config: dict) -> Plan:
    try:
        method = METHODS[method_name]
    except KeyError:
        raise ConfigError(f"compression.methods: unknown method {method_name!r}; known: {sorted(METHODS)}") from None
    section = getattr(compression_cfg, method.config_key)
    skipped: list[str] = []
    layers = linear_layers(model_config)
    group = method.group_size(section)
    if group:
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
    if method.family == "pruning" and section.n_m:
        m = section.n_m[1]
        bad = [n for n, (_, cols) in targeted(layers, list(section.ignore)).items() if cols % m]
        if bad:
            raise ConfigError(
                f"compression.{method.config_key}.mask_structure: {section.mask_structure} needs input widths "
                f"divisible by {m}; {bad[0]} is not"
            )
    arch = (model_config.get("architectures") or [None])[0]
    ignored = tuple(n for n in layers if matches(n, list(section.ignore)))
    context = RecipeContext(architecture=arch, layers=tuple(layers), skipped_layers=tuple(skipped), ignored_layers=ignored)
    if not context.targeted_layers:
        raise ConfigError(f"compression.{method.config_key}.ignore: every linear layer is ignored; nothing would be compressed")
    return Plan(method=method, section=section, context=context)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def _verify(the_plan: Plan, checkpoint: Path, reference: dict | None, base_dir: Path | None) -> dict:
    """From the saved files: the targeted layers are compressed as the method claims, and every
    other tensor is bit-identical to the base model's."""
    from selfcal.compression import verify

    cfg = the_plan.section
    ctx = the_plan.context
    targeted = verify.targeted_weights(verify.load_dense(checkpoint), set(ctx.targeted_layers))
    if the_plan.method.family == "pruning":
        layers = verify.check_pruning(targeted, cfg.sparsity, cfg.n_m)
        verify.check_round_trip(targeted, reference)
    else:
        layers = verify.check_quantization(targeted, reference, cfg.bits, cfg.group_size)
    report = {"family": the_plan.method.family, "layers": layers, **verify.summary(layers, the_plan.method.family)}
    if base_dir is not None:
        modules = verify.module_names(base_dir)
        report["untouched"] = verify.check_untouched(base_dir, checkpoint, the_plan.method.changed_modules(ctx, modules))
    return report


def compress(model, tokenizer, tokens: np.ndarray, the_plan: Plan, out_dir: Path, *, manifest_fields: dict, base_dir: Path | None) -> dict:
    """Compress ``model`` in place with ``tokens``, verify, and write the checkpoint atomically.

    The checkpoint directory appears only if verification passes; ``compression.json``
    inside it holds the per-layer measurements.
    """
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    from selfcal.compression import verify
    from selfcal.compression.cpu_compat import allow_awq_without_cuda

    if the_plan.method.name == "awq":
        allow_awq_without_cuda()
    cfg = the_plan.section
    targets = set(the_plan.context.targeted_layers)
    # Reconstruction error needs the weights before (GPTQ) or just before saving (AWQ); pruning does not.
    quantizing = the_plan.method.family == "quantization"
    reference = verify.targeted_weights(model, targets) if quantizing and the_plan.method.error_reference == "base" else None
    n, seq_len = tokens.shape
    dataset = Dataset.from_dict({"input_ids": tokens.astype(np.int64).tolist(), "attention_mask": [[1] * seq_len for _ in range(n)]})
    recipe = the_plan.method.build_recipe(cfg, the_plan.context)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
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
    if reference is None:
        # AWQ: its own rescaled weights; pruning: the pruned weights, which must read back exactly.
        reference = verify.targeted_weights(model, targets)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        tokenizer.save_pretrained(tmp)
        if base_dir is not None:
            _copy_tokenizer(base_dir, tmp)
        t1 = time.perf_counter()
        report = _verify(the_plan, tmp, reference, base_dir)
        report.update(
            {
                "verify_seconds": round(time.perf_counter() - t1, 3),
                "method": the_plan.method.name,
                "compress_seconds": round(seconds, 3),
                "size_bytes": verify.size_on_disk(tmp),
                "dense_size_bytes": verify.size_on_disk(base_dir) if base_dir else None,
                "peak_rss_bytes": verify.peak_rss_bytes(),
                "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                "skipped_layers": the_plan.skipped_layers,
                "dense_layers": list(the_plan.context.dense_layers),
            }
        )
        (tmp / "compression.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        manifest = write_manifest(
            tmp,
            kind="checkpoint",
            method=the_plan.method.name,
            method_params=cfg.model_dump(),
            recipe=(tmp / "recipe.yaml").read_text() if (tmp / "recipe.yaml").is_file() else None,
            skipped_layers=the_plan.skipped_layers,
            compress_seconds=round(seconds, 3),
            verification={k: v for k, v in report.items() if k != "layers"},
            **manifest_fields,
        )
    return manifest
