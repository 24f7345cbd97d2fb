"""Static checks on a model's linear layers, done on the meta device (no weights loaded)."""

from __future__ import annotations

import re

from selfcal.errors import ConfigError


def linear_layers(config: dict) -> dict[str, tuple[int, int]]:
    """Names and (out_features, in_features) of every nn.Linear, from the config alone."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError) as err:
        # An architecture this transformers does not ship (custom code, a newer release): the layer plan
        # cannot be made, so say which one, not a traceback from inside the auto classes.
        arch = ", ".join(config.get("architectures") or []) or "none listed"
        raise ConfigError(
            f"model.path: architecture {arch} (model_type {config.get('model_type')!r}) is not a causal LM "
            f"transformers {transformers.__version__} can build, so its layers cannot be planned for compression "
            f"({str(err).splitlines()[0][:160]})"
        ) from None
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
