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

from selfcal import faults
from selfcal.artifacts import MANIFEST, RUN_FACTS, atomic_dir, write_manifest
from selfcal.compression.layers import linear_layers, matches
from selfcal.compression.methods import METHODS, CompressionMethod, RecipeContext
from selfcal.errors import ConfigError
from selfcal.hashing import file_digests, tree_digest
from selfcal.records import CalibrationRef, CheckpointManifest, ModelFingerprint

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
)


REPORT = "compression.json"  # the deterministic per-layer verification report


@dataclass(frozen=True)
class Plan:
    """Everything decided before weights are loaded, so bad settings fail in a second."""

    method: CompressionMethod
    section: object
    context: RecipeContext

    @property
    def skipped_layers(self) -> list[str]:
        return list(self.context.skipped_layers)


def plan(method_name: str, compression_cfg, model_config: dict) -> Plan:
    """The method, its params section and the layer plan, from the model's config alone."""
    method = METHODS.get(method_name, key="compression.methods")
    section = getattr(compression_cfg, method.name)
    layers = linear_layers(model_config)
    for pattern in section.ignore:
        # a typo ("lm_headd") matched nothing and the layer it meant was compressed (an audit found lm_head,
        # tied to the embeddings, quantized): an entry that names no layer is refused, not ignored
        if not any(matches(name, [pattern]) for name in layers):
            raise ConfigError(
                f"compression.{method.name}.ignore: {pattern!r} matches no linear layer of this model "
                f"({', '.join(list(layers)[:3])}, ... {len(layers)} in all); a layer meant to stay dense "
                "would be compressed"
            )
    skipped = method.skipped_layers(section, layers)
    arch = (model_config.get("architectures") or [None])[0]
    ignored = tuple(n for n in layers if matches(n, list(section.ignore)))
    context = RecipeContext(
        architecture=arch, layers=tuple(layers), skipped_layers=tuple(skipped), ignored_layers=ignored
    )
    if not context.targeted_layers:
        raise ConfigError(
            f"compression.{method.name}.ignore: every linear layer is ignored; nothing would be compressed"
        )
    return Plan(method=method, section=section, context=context)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def _verify(the_plan: Plan, checkpoint: Path, reference: dict, base_dir: Path | None) -> dict:
    """From the saved files: the targeted layers are compressed as the method claims, and every
    other tensor is bit-identical to the base model's."""
    from selfcal.compression import verify

    method, ctx = the_plan.method, the_plan.context
    saved = verify.targeted_weights(verify.load_dense(checkpoint), set(ctx.targeted_layers))
    layers = method.verify(the_plan.section, saved, reference)
    report = {"family": method.family, "layers": layers, **method.summary(layers)}
    if base_dir is not None:
        report["untouched"] = verify.check_untouched(
            base_dir, checkpoint, method.changed_modules(ctx, verify.module_names(base_dir))
        )
    return report


def compress(
    model,
    tokenizer,
    tokens: np.ndarray,
    the_plan: Plan,
    out_dir: Path,
    *,
    base_model: ModelFingerprint,
    calibration: CalibrationRef,
    device: str,
    base_dir: Path | None,
) -> CheckpointManifest:
    """Compress ``model`` in place with ``tokens``, verify, and write the checkpoint atomically.

    The checkpoint directory appears only if verification passes; ``compression.json``
    inside it holds the per-layer measurements.
    """
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    from selfcal.compression import verify

    method = the_plan.method
    method.prepare()
    cfg = the_plan.section
    targets = set(the_plan.context.targeted_layers)
    # What verification compares with: the weights before oneshot (GPTQ's reconstruction error), or
    # the model's own just before saving (AWQ's rescaled weights; pruning's round trip).
    reference = verify.targeted_weights(model, targets) if method.reference_before() else None
    n, seq_len = tokens.shape
    dataset = Dataset.from_dict(
        {"input_ids": tokens.astype(np.int64).tolist(), "attention_mask": [[1] * seq_len for _ in range(n)]}
    )
    recipe = method.recipe(cfg, the_plan.context)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    route_library_logs()
    quiet_library_bars()
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=cfg.batch_size,
    )
    seconds = time.perf_counter() - t0
    faults.point("compress:after-oneshot")
    if reference is None:
        reference = verify.targeted_weights(model, targets)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        faults.point("compress:after-save")
        tokenizer.save_pretrained(tmp)
        if base_dir is not None:
            _copy_tokenizer(base_dir, tmp)
        t1 = time.perf_counter()
        report = _verify(the_plan, tmp, reference, base_dir)
        report.update(
            {
                "method": the_plan.method.name,
                "size_bytes": verify.size_on_disk(tmp),
                "dense_size_bytes": verify.size_on_disk(base_dir) if base_dir else None,
                "skipped_layers": the_plan.skipped_layers,
                "dense_layers": list(the_plan.context.dense_layers),
            }
        )
        # What determines the model goes in compression.json (and the content digest); how this
        # run went (times, memory) goes in run.json beside it, outside the digest.
        (tmp / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        facts = {
            "compress_seconds": round(seconds, 3),
            "verify_seconds": round(time.perf_counter() - t1, 3),
            "peak_rss_bytes": verify.peak_rss_bytes(),
            "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        }
        (tmp / RUN_FACTS).write_text(json.dumps(facts, indent=2, sort_keys=True) + "\n")
        manifest = write_manifest(
            tmp,
            CheckpointManifest,
            content_digest=tree_digest(file_digests(tmp, exclude=frozenset({MANIFEST, RUN_FACTS}))),
            method=the_plan.method.name,
            method_params=cfg.model_dump(),
            recipe=(tmp / "recipe.yaml").read_text() if (tmp / "recipe.yaml").is_file() else None,
            skipped_layers=the_plan.skipped_layers,
            compress_seconds=round(seconds, 3),
            verification={k: v for k, v in report.items() if k != "layers"} | facts,
            base_model=base_model,
            calibration=calibration,
            device=device,
        )
    return manifest


# compressed-tensors' bars that pass ``disable=`` themselves, which overrides $TQDM_DISABLE (tqdm reads it as
# __init__'s default, ``tqdm.utils.envwrap``): "Applying quantization config" (quantization/lifecycle/apply.py,
# ``disable=(not show_progress)``) and "Dispatching model" (offload/dispatch.py, the same); llm-compressor calls
# both without ``show_progress``. Each module imports the class (``from tqdm import tqdm``).
_BARS_SET_BY_HAND = ("compressed_tensors.quantization.lifecycle.apply", "compressed_tensors.offload.dispatch")


def quiet_library_bars() -> None:
    """With ``--no-progress`` (which sets ``TQDM_DISABLE``) no bar at all: the modules in ``_BARS_SET_BY_HAND``
    get a tqdm that is always off, since their own ``disable=False`` beats the environment. A no-op otherwise,
    and where a later compressed-tensors no longer imports the name (nothing to replace)."""
    import importlib
    import os

    import tqdm

    if not os.environ.get("TQDM_DISABLE"):  # tqdm's own reading: any non-empty value is true (bool of a str)
        return

    class _Off(tqdm.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    for name in _BARS_SET_BY_HAND:
        module = importlib.import_module(name)
        if getattr(module, "tqdm", None) is tqdm.tqdm:
            module.tqdm = _Off


def route_library_logs() -> None:
    """llm-compressor logs through loguru to *stdout* at INFO (``llmcompressor/logger.py``, ``configure_logger``,
    run on import): a GPTQ run on stories260K printed ~100 lines, a "Quantizing" line and two METRIC lines per
    module, and buried the stage's own two. Here they go to stderr, warnings and up, its METRIC lines (each
    module's compression error) with ``-v`` only. Its own ``LLM_COMPRESSOR_LOG_LEVEL`` (or ``_DISABLED``) rules
    where set."""
    import logging
    import os
    import sys

    if os.environ.get("LLM_COMPRESSOR_LOG_LEVEL") or os.environ.get("LLM_COMPRESSOR_LOG_DISABLED"):
        return
    from llmcompressor.logger import LoggerConfig, configure_logger, logger, support_log_once

    verbose = logging.getLogger("selfcal").isEnabledFor(logging.DEBUG)
    configure_logger(LoggerConfig(console_log_level=None))  # its sinks removed, its METRIC level defined

    def keep(record) -> bool:
        return support_log_once(record) and (verbose or record["level"].name != "METRIC")

    logger.add(
        sys.stderr,
        level="INFO" if verbose else "WARNING",
        format="{time:HH:mm:ss} {level} llmcompressor.{function}: {message}",
        filter=keep,
    )
