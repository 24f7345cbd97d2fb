"""One step of ancestral sampling, vectorised over a batch.

Randomness comes from a per-sequence stream of uniforms (see ``row_uniforms``) and
is turned into a token by inverse-CDF sampling. Because sequence r always draws
from its own stream, a calibration set does not depend on the batch size used to
generate it, and CPU and GPU runs draw the same random numbers.
"""

from __future__ import annotations

import hashlib

import torch


def row_seed(seed: int, row: int) -> int:
    """A seed per (set seed, row), from SHA-256: independent streams without a shared generator.

    torch's CPU generator (mt19937) keeps only a seed's low 32 bits, so the streams come from 2^32, not 2^63:
    two of a set's 128 rows share one with probability about 128^2 / 2^33 = 2e-6 (and would then most likely
    be the same text). Kept as is: changing it would change every calibration set made so far."""
    digest = hashlib.sha256(f"selfcal:{seed}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_uniforms(seed: int, rows: range, length: int) -> torch.Tensor:
    """Uniforms in [0, 1) of shape (len(rows), length): column p is the draw for position p."""
    out = torch.empty(len(rows), length, dtype=torch.float64)
    for i, r in enumerate(rows):
        gen = torch.Generator().manual_seed(row_seed(seed, r))
        out[i] = torch.rand(length, generator=gen, dtype=torch.float64)
    return out


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Optional truncation; the paper uses neither (pure ancestral sampling)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass *before* it already reaches top_p; the top token always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def inverse_cdf(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row from softmax(scores), by inverse CDF on one uniform per row: the one draw
    every sampler here uses (the scalar sampler below, the lockstep engine, the Ji pool)."""
    cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)
    target = uniforms.to(cdf.device, torch.float64).unsqueeze(-1) * cdf[..., -1:]
    # right=True: the first index whose cumulative mass exceeds the target, so a
    # zero-probability token can never be chosen.
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=scores.shape[-1] - 1)


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    uniforms: torch.Tensor,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature); temperature 0 is argmax."""
    logits = filter_logits(logits.float(), top_k, top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    return inverse_cdf(logits / temperature, uniforms)
