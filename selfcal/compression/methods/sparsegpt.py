"""SparseGPT (Frantar & Alistarh): one-shot N:M pruning with second-order weight updates."""

from __future__ import annotations

from pydantic import Field

from selfcal.compression.methods.base import PruneConfig, PruningMethod


class SparseGPTConfig(PruneConfig):
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=1)


class SparseGPT(PruningMethod):
    name = "sparsegpt"
    Config = SparseGPTConfig

    def recipe(self, cfg, ctx):
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return [
            SparseGPTModifier(
                **self.pruning_args(cfg, ctx), dampening_frac=cfg.dampening_frac, block_size=cfg.block_size
            )
        ]
