"""Compression methods as registered recipe builders, in the spirit of llm-compressor's modifiers.

A method is a name, the params section it reads, and a function from that section to
a list of llm-compressor modifiers. Adding a method means registering one here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    config_key: str  # section of `compression` in params.yaml
    build_recipe: Callable[[object, list[str]], list]  # (section, extra ignores) -> modifiers
    group_size: Callable[[object], int | None] = lambda cfg: None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _gptq_recipe(cfg, extra_ignore: list[str]) -> list:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(
        num_bits=cfg.bits,
        type="int",
        symmetric=cfg.symmetric,
        strategy="group" if cfg.group_size else "channel",
        group_size=cfg.group_size,
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return [
        GPTQModifier(
            config_groups={"group_0": scheme},
            ignore=[*cfg.ignore, *extra_ignore],
            dampening_frac=cfg.dampening_frac,
        )
    ]


register(Method(name="gptq", config_key="gptq", build_recipe=_gptq_recipe, group_size=lambda cfg: cfg.group_size))
