"""AWQ (Lin et al.): activation-aware per-channel scales folded into the preceding layers, then
weight-only group quantization. In llm-compressor 0.14 the AWQ transform only rescales; the
quantization itself is the QuantizationModifier that follows it.
"""

from __future__ import annotations

from pydantic import Field

from selfcal.compression.methods.base import QuantConfig, QuantizationMethod, RecipeContext, weight_scheme


class AWQConfig(QuantConfig):
    symmetric: bool = False  # the AWQ paper's asymmetric W4 (W4A16_ASYM)
    duo_scaling: bool = True
    # With duo scaling llm-compressor 0.14 tries identity plus ratios k / (n_grid - 2),
    # k = 0..n_grid-2: n_grid 12 is ModelOpt's awq_lite grid 0, 0.1, ..., 1.0.
    n_grid: int = Field(20, ge=3)


def _default_mappings(ctx: RecipeContext) -> list:
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, default_mappings

    return AWQ_MAPPING_REGISTRY.get(ctx.architecture or "", default_mappings)


def awq_mappings(ctx: RecipeContext) -> list | None:
    """The architecture's AWQ mappings minus those that would touch a layer left dense.

    AWQ multiplies every balance layer of a mapping by its scales, whether or not that layer is
    quantized afterwards (awq/base.py, ``_apply_smoothing``), so a dense layer in a mapping would
    not stay bit-identical; when all of them are dense, llm-compressor 0.14 also divides by zero.
    Such mappings are dropped. None = every default mapping applies.
    """
    from compressed_tensors.utils import match_name

    dense = set(ctx.dense_layers)
    mappings = _default_mappings(ctx)
    kept = []
    for mapping in mappings:
        balanced = [n for n in ctx.layers if any(match_name(n, p) for p in mapping.balance_layers)]
        if balanced and not any(n in dense for n in balanced):
            kept.append(mapping)
    return None if len(kept) == len(mappings) else kept


def allow_awq_without_cuda() -> bool:
    """The one workaround selfcal applies to llm-compressor, for AWQ on machines without CUDA.

    llm-compressor 0.14's ``IntermediatesCache.pin_memory`` pins cached activations so later
    host-to-device copies can be asynchronous; without an accelerator pinning raises "Cannot access
    accelerator device". Pinning only helps copies to a GPU, so on a CUDA-less process it is safe to
    make it a no-op. Applied only when CUDA is unavailable, only for AWQ; True if patched. Remove it
    when the pinned llm-compressor no longer needs it.
    """
    import torch

    if torch.cuda.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    if getattr(IntermediatesCache.pin_memory, "selfcal_noop", False):
        return True

    def pin_memory(self, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    pin_memory.selfcal_noop = True  # type: ignore[attr-defined]
    IntermediatesCache.pin_memory = pin_memory
    return True


class AWQ(QuantizationMethod):
    name = "awq"
    Config = AWQConfig

    def recipe(self, cfg, ctx):
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [
            AWQModifier(duo_scaling=cfg.duo_scaling, n_grid=cfg.n_grid, mappings=awq_mappings(ctx)),
            QuantizationModifier(config_groups=weight_scheme(cfg), ignore=ctx.dense_patterns),
        ]

    def prepare(self) -> None:
        allow_awq_without_cuda()

    def reference_before(self) -> bool:
        # AWQ rescales weights before quantizing them: only its own weights just before saving
        # show the quantization error itself.
        return False

    def also_changes(self, ctx, modules):
        """The smoothing modules (norms, v_proj, up_proj) of the mappings AWQ applies."""
        from compressed_tensors.utils import match_name

        mappings = awq_mappings(ctx)
        if mappings is None:
            mappings = _default_mappings(ctx)
        return {m for m in modules for mapping in mappings if match_name(m, mapping.smooth_layer)}
