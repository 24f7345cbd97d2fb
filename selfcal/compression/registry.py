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
class Method:
    name: str
    config_key: str  # section of `compression` in params.yaml
    family: Literal["quantization", "pruning"]
    build_recipe: Callable[[object, list[str]], list]  # (section, extra ignores) -> modifiers
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


def _gptq(cfg, extra_ignore: list[str]) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier

    return [GPTQModifier(config_groups=_scheme(cfg), ignore=[*cfg.ignore, *extra_ignore], dampening_frac=cfg.dampening_frac)]


def _awq(cfg, extra_ignore: list[str]) -> list:
    # llm-compressor 0.14 moved AWQ to a transform that only rescales; the quantization
    # itself is the QuantizationModifier that follows it.
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [
        AWQModifier(duo_scaling=cfg.duo_scaling, n_grid=cfg.n_grid),
        QuantizationModifier(config_groups=_scheme(cfg), ignore=[*cfg.ignore, *extra_ignore]),
    ]


def _sparsegpt(cfg, extra_ignore: list[str]) -> list:
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    return [
        SparseGPTModifier(
            sparsity=cfg.sparsity,
            mask_structure=cfg.mask_structure or "0:0",
            targets=["Linear"],
            ignore=[*cfg.ignore, *extra_ignore],
            dampening_frac=cfg.dampening_frac,
            block_size=cfg.block_size,
        )
    ]


def _wanda(cfg, extra_ignore: list[str]) -> list:
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return [
        WandaPruningModifier(
            sparsity=cfg.sparsity,
            mask_structure=cfg.mask_structure or "0:0",
            targets=["Linear"],
            ignore=[*cfg.ignore, *extra_ignore],
        )
    ]


register(Method("gptq", "gptq", "quantization", _gptq))
register(Method("awq", "awq", "quantization", _awq, error_reference="pre_save"))
register(Method("sparsegpt", "sparsegpt", "pruning", _sparsegpt))
register(Method("wanda", "wanda", "pruning", _wanda))
