"""GPTQ (Frantar et al.): weight-only W4, group-wise, second-order error correction."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from selfcal.compression.methods.base import QuantConfig, QuantizationMethod, weight_scheme


class GPTQConfig(QuantConfig):
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=1)
    # llm-compressor 0.14's activation ordering: "weight" (its default "static": columns quantized
    # in order of decreasing Hessian diagonal, groups kept contiguous) or null (no reordering).
    actorder: Literal["weight"] | None = "weight"


class GPTQ(QuantizationMethod):
    name = "gptq"
    Config = GPTQConfig

    def recipe(self, cfg, ctx):
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [
            GPTQModifier(
                config_groups=weight_scheme(cfg),
                ignore=ctx.dense_patterns,
                dampening_frac=cfg.dampening_frac,
                block_size=cfg.block_size,
                actorder=cfg.actorder,
            )
        ]
