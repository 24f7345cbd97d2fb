"""What every compression method is: one class owning its config, its static layer checks, its
llm-compressor recipe, the verification of what it saved and its device quirks, in the spirit
of llm-compressor's modifiers. The two families share their checks here; each method module
adds only what is its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from selfcal.compression.layers import indivisible_layers, targeted
from selfcal.errors import ConfigError
from selfcal.registry import Registry
from selfcal.schema import Strict


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
        their ``ignore`` never matched and lm_head (and, tied, the embeddings) got pruned.
        An anchored regex per layer with an optional trailing dot matches both spellings.
        """
        return [f"re:^{re.escape(name)}\\.?$" for name in self.dense_layers]


class MethodConfig(Strict):
    # Module names (exact, or a dotted suffix such as "down_proj") or "re:" regexes (re.match);
    # every listed layer stays bit-identical to the base model, which the stage verifies.
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])
    # Calibration samples per forward pass in ``oneshot`` (its ``batch_size``). What every method gathers
    # is a sum over samples, so a batch changes only the floating-point order of the same sums
    # (llm-compressor 0.14): GPTQ's Hessian (modifiers/gptq/helpers.py ``accumulate_hessian``: += 2 X X^T,
    # divided by the sample count), SparseGPT's (modifiers/pruning/sparsegpt/sgpt_sparsify.py
    # ``accumulate_hessian``: scaled by n/(n+b), then += (2/n) X X^T), Wanda's row norms
    # (modifiers/pruning/wanda/wanda_sparsify.py ``accumulate_row_scalars``: the same running mean), AWQ's
    # activation means (modifiers/transform/awq/base.py: sums and counts). The sets are equal-length rows,
    # so llm-compressor's truncating collator drops nothing. In float32 the checkpoints agree up to near-ties
    # (tests/test_compression.py); in bfloat16 the layer outputs round differently per batch shape and, carried
    # through the layers, flip close decisions (SmolLM2-135M bf16, 4 x 2048, batch 4 vs 1: 93% of SparseGPT's
    # zero pattern and 36% of GPTQ's packed 8-code words equal; benchmarks/compress_batch.py), as any other
    # change of summation order would. 1 (the library's default) keeps every recorded checkpoint; a larger
    # batch turns 2 x n small forwards per layer into a few large ones (faster on a GPU, slower on a CPU).
    batch_size: int = Field(1, ge=1)


class CompressionMethod:
    """One method. Subclasses set ``name``, ``family`` and ``Config`` and build the recipe."""

    name: ClassVar[str]
    family: ClassVar[Literal["quantization", "pruning"]]
    Config: ClassVar[type[MethodConfig]]

    def skipped_layers(self, cfg, layers: dict[str, tuple[int, int]]) -> list[str]:
        """Static layer checks on the config's shapes: raise ConfigError, or name layers to leave dense."""
        return []

    def recipe(self, cfg, ctx: RecipeContext) -> list:
        raise NotImplementedError

    def prepare(self) -> None:
        """Device quirks, applied just before ``oneshot``."""

    def also_changes(self, ctx: RecipeContext, modules: list[str]) -> set[str]:
        """Modules besides the targeted linears the method may change (AWQ: the norms it scales)."""
        return set()

    def changed_modules(self, ctx: RecipeContext, modules: list[str]) -> set[str]:
        return set(ctx.targeted_layers) | self.also_changes(ctx, modules)

    def reference_before(self) -> bool:
        """Whether verification compares with the weights before ``oneshot`` (True) or just before saving."""
        return False

    def verify(self, cfg, saved: dict, reference: dict) -> dict:
        """Per-layer measurements of the targeted weights read back from the saved checkpoint
        (name -> float32 tensor), against ``reference`` (see ``reference_before``)."""
        raise NotImplementedError

    def summary(self, layers: dict[str, dict]) -> dict:
        from selfcal.compression import verify

        return verify.summary(layers, self.family)


# --- quantization ---------------------------------------------------------------------------------


class ClipSearchConfig(Strict):
    """Search each group's clipping range (llm-compressor's MSE weight observer) over the ratios
    min_ratio, min_ratio + step, ..., 1.0 of the min-max range, as ModelOpt's INT4 AWQ clip search
    does (awq_clip: 0.5 to 1.0 in steps of 0.05). ModelOpt scores a ratio by the layer's output
    error on 64 tokens; llm-compressor 0.14 only by the weights' own |error|^norm."""

    min_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    step: float = Field(0.05, gt=0.0, lt=1.0)
    norm: float = Field(2.0, gt=0.0)


class QuantConfig(MethodConfig):
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int | None = Field(128, ge=1)
    symmetric: bool = True
    # Layers whose input width is not a multiple of group_size cannot be group-quantized.
    # False: refuse before loading. True: leave them dense and record them in the manifest.
    skip_indivisible: bool = False
    clip_search: ClipSearchConfig | None = None  # None: plain min-max ranges


class QuantizationMethod(CompressionMethod):
    family = "quantization"

    def skipped_layers(self, cfg, layers):
        group = cfg.group_size
        if not group:
            return []
        key = f"compression.{self.name}.group_size"
        bad = indivisible_layers(layers, group, list(cfg.ignore))
        if bad and len(bad) == len(targeted(layers, list(cfg.ignore))):
            raise ConfigError(
                f"{key}: {group} divides the input width of no targeted layer (e.g. {bad[0]}); nothing "
                "would be compressed"
            )
        if bad and not cfg.skip_indivisible:
            raise ConfigError(
                f"{key}: {group} does not divide the input width of {len(bad)} layer(s) (e.g. {bad[0]}); "
                "choose another "
                f"group_size or set compression.{self.name}.skip_indivisible: true to leave them dense"
            )
        return bad

    def reference_before(self) -> bool:
        return True

    def verify(self, cfg, saved, reference):
        from selfcal.compression import verify

        return verify.check_quantization(saved, reference, cfg.bits, cfg.group_size)


def weight_scheme(cfg) -> dict:
    """compressed-tensors' weight-only scheme for a quantization section."""
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


# --- pruning --------------------------------------------------------------------------------------


class PruneConfig(MethodConfig):
    sparsity: float = Field(0.5, gt=0.0, lt=1.0)
    # "N:M" keeps at most N non-zeros in every M consecutive input weights; null = unstructured.
    mask_structure: str | None = "2:4"

    @field_validator("mask_structure")
    @classmethod
    def _n_of_m(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = value.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]):
            raise ValueError(f"mask_structure must be 'N:M' with 0 < N < M, got {value!r}")
        return value

    @property
    def n_m(self) -> tuple[int, int] | None:
        if self.mask_structure is None:
            return None
        n, m = self.mask_structure.split(":")
        return int(n), int(m)

    def model_post_init(self, _context) -> None:
        nm = self.n_m
        if nm and abs(self.sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            raise ValueError(
                f"sparsity {self.sparsity} is impossible with mask_structure {self.mask_structure} "
                f"(which fixes it at {1 - nm[0] / nm[1]})"
            )


class PruningMethod(CompressionMethod):
    family = "pruning"

    def skipped_layers(self, cfg, layers):
        if cfg.n_m:
            m = cfg.n_m[1]
            bad = [n for n, (_, cols) in targeted(layers, list(cfg.ignore)).items() if cols % m]
            if bad:
                raise ConfigError(
                    f"compression.{self.name}.mask_structure: {cfg.mask_structure} needs input widths "
                    f"divisible by {m}; {bad[0]} is not"
                )
        return []

    def verify(self, cfg, saved, reference):
        from selfcal.compression import verify

        layers = verify.check_pruning(saved, cfg.sparsity, cfg.n_m)
        # Pruned checkpoints are plain dense safetensors: they must read back bit for bit.
        verify.check_round_trip(saved, reference)
        return layers

    @staticmethod
    def pruning_args(cfg, ctx: RecipeContext) -> dict:
        """llm-compressor's ``mask_structure`` "n:m" *prunes* n of every m (sgpt_sparsify.py:176-185 and
        wanda_sparsify.py:84-91: ``topk(..., prune_n, largest=False)`` marks the weights zeroed), where ours keeps
        N of every M: ours N:M is its (M - N):M. For 2:4 the two agree; a "1:4" was handed over as is, pruned 1
        of 4, and failed verification after the compute. "0:0" is its spelling of "unstructured"."""
        n_m = cfg.n_m
        return {
            "sparsity": cfg.sparsity,
            "mask_structure": f"{n_m[1] - n_m[0]}:{n_m[1]}" if n_m else "0:0",
            "targets": ["Linear"],
            "ignore": ctx.dense_patterns,
        }


METHODS: Registry[CompressionMethod] = Registry("method")
