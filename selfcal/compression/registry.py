"""Compression methods as registered recipe builders, in the spirit of llm-compressor's modifiers.

A method is a name, the params section it reads, and a function from that section to
a list of llm-compressor modifiers. Adding a method means registering one here; the
verification that runs after it is chosen by its ``family``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RecipeContext:
    """What a recipe may need to know about the model, decided before weights load."""

    architecture: str | None = None
    layers: tuple[str, ...] = ()  # names of all nn.Linear modules
    skipped_layers: tuple[str, ...] = ()  # left dense on purpose (e.g. indivisible by the group)
    ignored_layers: tuple[str, ...] = ()  # matched by the section's ``ignore`` (lm_head, ...)

    @property
    def dense_layers(self) -> tuple[str, ...]:
        return tuple(n for n in self.layers if n in set(self.ignored_layers) | set(self.skipped_layers))

    @property
    def targeted_layers(self) -> tuple[str, ...]:
        dense = set(self.dense_layers)
        return tuple(n for n in self.layers if n not in dense)

    @property
    def dense_patterns(self) -> list[str]:
        """The layers to leave dense, as patterns every llm-compressor 0.14 modifier honours.

        Its quantization modifiers match a module's own name ("lm_head"), but SparseGPT and
        Wanda match "<layer>.<child>" with an empty child, i.e. "lm_head." (sgpt_base.py,
        ``on_calibration_start``: ``name = f"{layer_name}.{name}"``), so a plain "lm_head" in
        their ``ignore`` never matches and lm_head (and, tied, the embeddings) got pruned.
        An anchored regex per layer with an optional trailing dot matches both spellings.
        """
        return [f"re:^{re.escape(name)}\\.?$" for name in self.dense_layers]


@dataclass(frozen=True)
class Method:
    name: str
    config_key: str  # section of `compression` in params.yaml
    family: Literal["quantization", "pruning"]
    build_recipe: Callable[[object, RecipeContext], list]  # (params section, context) -> modifiers
    # Which weights the verification compares the compressed ones with: the base model's
    # ("base") or the model's own just before saving ("pre_save": AWQ rescales weights
    # before quantizing them, so only those show the quantization error itself).
    error_reference: Literal["base", "pre_save"] = "base"
    # Modules besides the targeted linears that the method may legitimately change (AWQ folds its
    # scales into the norms before the layers it balances); every other tensor must stay bit-identical.
    also_changes: Callable[[RecipeContext, list[str]], set[str]] = lambda ctx, modules: set()

    def group_size(self, cfg) -> int | None:
        return getattr(cfg, "group_size", None) if self.family == "quantization" else None

    def changed_modules(self, ctx: RecipeContext, modules: list[str]) -> set[str]:
        """Every module whose tensors this method may change; ``modules`` are all of the model's."""
        return set(ctx.targeted_layers) | self.also_changes(ctx, modules)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _scheme(cfg):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    extra = {}
    if cfg.clip_search is not None:
        # memoryless_mse tries shrink p = 1 - i / grid for i < int(maxshrink * grid) (mse_quant.py,
        # _grid_search_mse); these values give exactly the ratios min_ratio, ..., 1.0 in steps of `step`.
        clip = cfg.clip_search
        steps = round((1.0 - clip.min_ratio) / clip.step) + 1
        grid = 1.0 / clip.step
        extra = {
            "observer": "memoryless_mse",
            "observer_kwargs": {"maxshrink": steps / grid + 1e-9, "grid": grid, "norm": clip.norm, "patience": 10**9},
        }
    weights = QuantizationArgs(
        num_bits=cfg.bits,
        type="int",
        symmetric=cfg.symmetric,
        strategy="group" if cfg.group_size else "channel",
        group_size=cfg.group_size,
        **extra,
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _gptq(cfg, ctx: RecipeContext) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [
        GPTQModifier(
            config_groups=_scheme(cfg),
            ignore=ctx.dense_patterns,
            dampening_frac=cfg.dampening_frac,
            block_size=cfg.block_size,
            actorder=cfg.actorder,
        )
    ]


def _awq_mappings(ctx: RecipeContext) -> list | None:
    """The architecture's AWQ mappings minus those that would touch a layer left dense.

    AWQ multiplies every balance layer of a mapping by its scales, whether or not that layer is
    quantized afterwards (awq/base.py, ``_apply_smoothing``), so a dense layer in a mapping would
    not stay bit-identical; when all of them are dense, llm-compressor 0.14 also divides by zero.
    Such mappings are dropped. None = every default mapping applies.
    """
    from compressed_tensors.utils import match_name
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, default_mappings

    dense = set(ctx.dense_layers)
    mappings = AWQ_MAPPING_REGISTRY.get(ctx.architecture or "", default_mappings)
    kept = []
    for mapping in mappings:
        balanced = [n for n in ctx.layers if any(match_name(n, p) for p in mapping.balance_layers)]
        if balanced and not any(n in dense for n in balanced):
            kept.append(mapping)
    return None if len(kept) == len(mappings) else kept


def _awq_smoothed(ctx: RecipeContext, modules: list[str]) -> set[str]:
    """The smoothing modules (norms, v_proj, up_proj) of the mappings AWQ applies."""
    from compressed_tensors.utils import match_name
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, default_mappings

    mappings = _awq_mappings(ctx)
    if mappings is None:
        mappings = AWQ_MAPPING_REGISTRY.get(ctx.architecture or "", default_mappings)
    return {m for m in modules for mapping in mappings if match_name(m, mapping.smooth_layer)}


def _awq(cfg, ctx: RecipeContext) -> list:
    # llm-compressor 0.14 moved AWQ to a transform that only rescales; the quantization
    # itself is the QuantizationModifier that follows it.
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [
        AWQModifier(duo_scaling=cfg.duo_scaling, n_grid=cfg.n_grid, mappings=_awq_mappings(ctx)),
        QuantizationModifier(config_groups=_scheme(cfg), ignore=ctx.dense_patterns),
    ]


def _pruning_args(cfg, ctx: RecipeContext) -> dict:
    # "0:0" is llm-compressor's spelling of "unstructured".
    return {
        "sparsity": cfg.sparsity,
        "mask_structure": cfg.mask_structure or "0:0",
        "targets": ["Linear"],
        "ignore": ctx.dense_patterns,
    }


def _sparsegpt(cfg, ctx: RecipeContext) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return [SparseGPTModifier(**_pruning_args(cfg, ctx), dampening_frac=cfg.dampening_frac, block_size=cfg.block_size)]


def _wanda(cfg, ctx: RecipeContext) -> list:
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return [WandaPruningModifier(**_pruning_args(cfg, ctx))]


register(Method("gptq", "gptq", "quantization", _gptq))
register(Method("awq", "awq", "quantization", _awq, error_reference="pre_save", also_changes=_awq_smoothed))
register(Method("sparsegpt", "sparsegpt", "pruning", _sparsegpt))
register(Method("wanda", "wanda", "pruning", _wanda))
