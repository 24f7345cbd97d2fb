"""Wanda (Sun et al.): prune by |weight| x input activation norm, no weight update."""

from __future__ import annotations

from selfcal.compression.methods.base import PruneConfig, PruningMethod


class WandaConfig(PruneConfig):
    pass


class Wanda(PruningMethod):
    name = "wanda"
    Config = WandaConfig

    def recipe(self, cfg, ctx):
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return [WandaPruningModifier(**self.pruning_args(cfg, ctx))]
