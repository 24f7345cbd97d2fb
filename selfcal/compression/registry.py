"""Compression methods as registered recipe builders, in the spirit of llm-compressor's modifiers.

A method is a name, the params section it reads, and a function from that section to
a list of llm-compressor modifiers. Adding a method means registering one here; the
verification that runs after it is chosen by its ``family``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RecipeContext:
    """What a recipe may need to know about the model, decided before weights load."""

    architecture: str | None = None
    layers: tuple[str, ...] = ()  # names of all nn.Linear modules
    skipped_layers: tuple[str, ...] = ()  # left dense on purpose (e.g. indivisible by the group)

    @property
    def skip_patterns(self) -> list[str]:
        import re

        return [f"re:^{re.escape(name)}$" for name in self.skipped_layers]


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

    def group_size(self, cfg) -> int | None:
        return getattr(cfg, "group_size", None) if self.family == "quantization" else None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _scheme(cfg):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=cfg.bits,
        type="int",
        symmetric=cfg.symmetric,
        strategy="group" if cfg.group_size else "channel",
        group_size=cfg.group_size,
    )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _gptq(cfg, ctx: RecipeContext) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(config_groups=_scheme(cfg), ignore=[*cfg.ignore, *ctx.skip_patterns], dampening_frac=cfg.dampening_frac)]


def _awq_mappings(ctx: RecipeContext) -> list | None:
    """The architecture's AWQ mappings minus those whose balance layers are all left dense.

    AWQ balances a smoothing layer against the layers it feeds; when every one of those
    is skipped, llm-compressor 0.14 divides by zero. None = let llm-compressor choose.
    """
    if not ctx.skipped_layers:
        return None
    from compressed_tensors.utils import match_name
    from llmcompressor.modifiers.transform.awq.mappings import AWQ_MAPPING_REGISTRY, default_mappings

    kept = []
    for mapping in AWQ_MAPPING_REGISTRY.get(ctx.architecture or "", default_mappings):
        balanced = [n for n in ctx.layers if any(match_name(n, p) for p in mapping.balance_layers)]
        if any(n not in ctx.skipped_layers for n in balanced):
            kept.append(mapping)
    return kept


def _awq(cfg, ctx: RecipeContext) -> list:
    # llm-compressor 0.14 moved AWQ to a transform that only rescales; the quantization
    # itself is the QuantizationModifier that follows it.
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [
        AWQModifier(duo_scaling=cfg.duo_scaling, n_grid=cfg.n_grid, mappings=_awq_mappings(ctx)),
        QuantizationModifier(config_groups=_scheme(cfg), ignore=[*cfg.ignore, *ctx.skip_patterns]),
    ]


def _pruning_args(cfg, ctx: RecipeContext) -> dict:
    # "0:0" is llm-compressor's spelling of "unstructured".
    return {
        "sparsity": cfg.sparsity,
        "mask_structure": cfg.mask_structure or "0:0",
        "targets": ["Linear"],
        "ignore": [*cfg.ignore, *ctx.skip_patterns],
    }


def _sparsegpt(cfg, ctx: RecipeContext) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return [SparseGPTModifier(**_pruning_args(cfg, ctx), dampening_frac=cfg.dampening_frac, block_size=cfg.block_size)]


def _wanda(cfg, ctx: RecipeContext) -> list:
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return [WandaPruningModifier(**_pruning_args(cfg, ctx))]


register(Method("gptq", "gptq", "quantization", _gptq))
register(Method("awq", "awq", "quantization", _awq, error_reference="pre_save"))
register(Method("sparsegpt", "sparsegpt", "pruning", _sparsegpt))
register(Method("wanda", "wanda", "pruning", _wanda))
