"""Replay a self-calibration set by full recomputation, with no cache: the generator's own check.

Each row is cut into its generations (a new one starts at position 0 and after every EOS);
each generation is run through the model in one forward pass from its BOS, and every token is
drawn again with the scalar sampler (``sampling.sample_tokens``), the schedule's temperature for
its step and the row's uniform for its position. A faithful generator gives identical tokens,
and its log-probs (of the untempered distribution) agree within the dtype's noise.

Identical tokens need identical arithmetic: on a GPU the cached step and the full forward run
different kernels, and with a 49k-token vocabulary the cumulative distribution has 49k
boundaries, each moved a little by float noise, so a few uniforms in ten thousand land on the
other side of one. Every mismatch is therefore also measured: ``tie_distance`` is how far the
uniform lies outside the generated token's interval of the reference's CDF (0 = inside).
A real fault (wrong mask, position, temperature or uniform) puts tokens far outside; a
near-tie puts them within the noise (``max_tie_distance`` below 1e-4 or so).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from selfcal.calibration.sampling import row_uniforms, sample_tokens
from selfcal.calibration.schedule import LinearSchedule


@dataclass(frozen=True)
class ReplayReport:
    rows: int
    tokens: int
    generations: int
    mismatches: int
    first_mismatch: tuple[int, int] | None  # (row, position)
    max_logprob_diff: float | None
    max_tie_distance: float = 0.0  # over mismatches: the uniform's distance outside the token's interval

    @property
    def identical(self) -> bool:
        return self.mismatches == 0


def segments(row: Sequence[int], eos_ids: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of each generation in a row: starts at 0 and right after each EOS it sampled (the BOS a
    generation starts from ends nothing, though it be an EOS id too)."""
    eos = set(eos_ids)
    starts = [0]
    for q in range(len(row) - 1):
        if row[q] in eos and q != starts[-1]:
            starts.append(q + 1)
    ends = starts[1:] + [len(row)]
    return list(zip(starts, ends, strict=True))


@torch.inference_mode()
def replay(
    model,
    tokens: np.ndarray,
    *,
    seed: int,
    rows: Sequence[int],
    bos_id: int,
    eos_ids: Sequence[int],
    schedule: LinearSchedule,
    top_k: int | None = None,
    top_p: float | None = None,
    first_token_ids: Sequence[int] | None = None,
    logprobs: np.ndarray | None = None,
) -> ReplayReport:
    """Check rows ``rows`` of a set (``tokens[i]`` is row ``rows[i]`` of seed ``seed``)."""
    device = next(model.parameters()).device
    uniforms = row_uniforms(seed, range(0, max(rows) + 1), tokens.shape[1])
    first = torch.as_tensor(sorted(set(first_token_ids)), device=device) if first_token_ids else None
    mismatches, first_bad, n_gen, max_diff, max_tie = 0, None, 0, None, 0.0
    for i, r in enumerate(rows):
        row = [int(t) for t in tokens[i]]
        for s, e in segments(row, eos_ids):
            n_gen += 1
            if row[s] != bos_id:
                mismatches += 1
                first_bad = first_bad or (r, s)
                continue
            if e - s < 2:
                continue
            ids = torch.tensor([row[s:e]], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()  # logits[j] predicts position s + j + 1
            lp = torch.log_softmax(logits, dim=-1)
            for j in range(e - s - 1):
                q = s + j + 1
                lg = logits[j : j + 1]
                if j == 0 and first is not None:
                    bias = torch.full_like(lg, float("-inf"))
                    bias[:, first] = 0.0
                    lg = lg + bias
                u = uniforms[r, q : q + 1]
                tok = int(sample_tokens(lg, schedule(j), u, top_k=top_k, top_p=top_p)[0])
                if tok != row[q]:
                    mismatches += 1
                    first_bad = first_bad or (r, q)
                    max_tie = max(max_tie, tie_distance(lg, schedule(j), float(u), row[q], top_k=top_k, top_p=top_p))
                if logprobs is not None:
                    d = abs(float(lp[j, row[q]]) - float(logprobs[i, q]))
                    max_diff = d if max_diff is None else max(max_diff, d)
    return ReplayReport(
        rows=len(rows),
        tokens=int(tokens.size),
        generations=n_gen,
        mismatches=mismatches,
        first_mismatch=first_bad,
        max_logprob_diff=max_diff,
        max_tie_distance=max_tie,
    )


def tie_distance(logits, temperature: float, u: float, token: int, *, top_k=None, top_p=None) -> float:
    """How far ``u`` lies outside ``token``'s interval [CDF(token - 1), CDF(token)) of the
    reference's normalised CDF (the arithmetic of ``sample_tokens``); inf for a zero-mass token."""
    from selfcal.calibration.sampling import filter_logits

    lg = filter_logits(logits.float(), top_k, top_p)[0]
    if temperature == 0.0:
        return 0.0 if int(lg.argmax()) == token else float("inf")
    cdf = torch.softmax(lg / temperature, dim=-1).double().cumsum(-1)
    cdf = cdf / cdf[-1]
    lo = float(cdf[token - 1]) if token > 0 else 0.0
    hi = float(cdf[token])
    if hi <= lo:
        return float("inf")
    return max(lo - u, u - hi, 0.0)
