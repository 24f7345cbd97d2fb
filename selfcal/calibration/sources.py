"""Calibration sources, registered by ``kind`` (the params' ``calibration.sources.*.kind``).

Each source turns (model, tokenizer, its params, n, seq_len, seed) into an (n, seq_len)
token matrix plus provenance fields for the manifest. New baselines register here;
nothing else in the pipeline switches on the source kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from selfcal.calibration.generator import generate_self_calibration
from selfcal.calibration.schedule import LinearSchedule
from selfcal.errors import DataError


@dataclass(frozen=True)
class SourceRequest:
    n: int
    seq_len: int
    seed: int
    batch_size: int
    progress: bool = True


@dataclass(frozen=True)
class SourceResult:
    tokens: np.ndarray
    provenance: dict = field(default_factory=dict)


SourceFn = Callable[..., SourceResult]
SOURCES: dict[str, SourceFn] = {}


def register(kind: str) -> Callable[[SourceFn], SourceFn]:
    def deco(fn: SourceFn) -> SourceFn:
        SOURCES[kind] = fn
        return fn

    return deco


def start_token(tokenizer) -> int:
    """BOS, or EOS for models whose BOS is their EOS (Phi-2's <|endoftext|>)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("tokenizer has neither a BOS nor an EOS token to condition self-calibration on")


@register("self")
def self_calibration(spec, request: SourceRequest, *, model, tokenizer) -> SourceResult:
    bos = start_token(tokenizer)
    schedule = LinearSchedule(spec.t_initial, spec.t_final, spec.schedule_steps)
    tokens, stats = generate_self_calibration(
        model,
        n=request.n,
        seq_len=request.seq_len,
        bos_id=bos,
        eos_id=tokenizer.eos_token_id,
        schedule=schedule,
        seed=request.seed,
        batch_size=request.batch_size,
        top_k=spec.top_k,
        top_p=spec.top_p,
        progress=request.progress,
    )
    return SourceResult(
        tokens=tokens,
        provenance={
            "start_token_id": bos,
            "eos_token_id": tokenizer.eos_token_id,
            "generations": stats.generations,
            "tokens_per_second": round(stats.tokens_per_second, 1),
            "generation_seconds": round(stats.seconds, 3),
        },
    )


def build(kind: str, spec, request: SourceRequest, **resources) -> SourceResult:
    try:
        fn = SOURCES[kind]
    except KeyError:
        raise DataError(f"unknown calibration source kind {kind!r}; known: {sorted(SOURCES)}") from None
    return fn(spec, request, **resources)
