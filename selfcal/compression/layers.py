"""Static checks on a model's linear layers, done on the meta device (no weights loaded)."""

from __future__ import annotations

import re


def linear_layers(config: dict) -> dict[str, tuple[int, int]]:
    """Names and (out_features, in_features) of every nn.Linear, from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {
        name: (m.out_features, m.in_features) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def matches(name: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def indivisible_layers(layers: dict[str, tuple[int, int]], group_size: int, ignore: list[str]) -> list[str]:
    """Layers that cannot be group-quantized: input width not a multiple of the group.

    llm-compressor 0.14 only pre-checks layers wider than the group; narrower ones
    fail later inside its observers, so both are caught here.
    """
    return [name for name, (_, cols) in targeted(layers, ignore).items() if cols % group_size != 0]


def targeted(layers: dict[str, tuple[int, int]], ignore: list[str]) -> dict[str, tuple[int, int]]:
    return {name: shape for name, shape in layers.items() if not matches(name, ignore)}
