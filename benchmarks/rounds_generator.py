"""Batched self-calibration: many BOS-only generations at once, with a KV cache.

A sequence is filled with independent generations, each starting from BOS, until
it holds ``seq_len`` tokens: ``BOS s1 ... EOS BOS s2 ... `` (truncated). The loop
is written here rather than through ``model.generate`` so that nothing the
library adds by default (top_k=50, repetition penalties, length limits) sneaks
into what the paper defines as pure ancestral sampling.

Work is organised in *rounds*: every sequence that still needs tokens starts a
fresh generation from BOS in the same batch; sequences that hit EOS or fill up
are dropped from the batch (and its KV cache) as they finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from selfcal.calibration.sampling import row_uniforms, sample_tokens
from selfcal.calibration.schedule import LinearSchedule


@dataclass(frozen=True)
class GenerationStats:
    tokens: int
    seconds: float
    generations: int
    forward_steps: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@torch.inference_mode()
def _fill_batch(
    model: torch.nn.Module,
    out: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    bos_id: int,
    eos_ids: torch.Tensor | None,
    schedule: LinearSchedule,
    top_k: int | None,
    top_p: float | None,
    first_token_ids: torch.Tensor | None,
    on_tokens: Callable[[int], None],
) -> tuple[int, int]:
    """Fill ``out`` (b, seq_len) in place; returns (generations started, forward steps)."""
    from transformers import DynamicCache

    b, seq_len = out.shape
    device = next(model.parameters()).device
    filled = torch.zeros(b, dtype=torch.long)
    generations = steps = 0
    while (pending := torch.nonzero(filled < seq_len).flatten()).numel():
        # Start one new generation from BOS in every sequence that still needs tokens.
        out[pending, filled[pending]] = bos_id
        filled[pending] += 1
        generations += pending.numel()
        on_tokens(pending.numel())
        active = pending[filled[pending] < seq_len]
        cache = DynamicCache()
        inputs = torch.full((active.numel(), 1), bos_id, dtype=torch.long, device=device)
        step = 0
        while active.numel():
            logits = model(input_ids=inputs, past_key_values=cache, use_cache=True).logits[:, -1, :]
            if step == 0 and first_token_ids is not None:
                allowed = torch.full_like(logits, float("-inf"))
                allowed[:, first_token_ids.to(logits.device)] = 0.0
                logits = logits + allowed
            steps += 1
            pos = filled[active]
            tok = sample_tokens(logits, schedule(step), uniforms[active, pos], top_k=top_k, top_p=top_p).cpu()
            out[active, pos] = tok
            filled[active] += 1
            on_tokens(active.numel())
            keep = filled[active] < seq_len
            if eos_ids is not None:
                keep &= ~torch.isin(tok, eos_ids)
            if not bool(keep.all()):
                idx = torch.nonzero(keep).flatten()
                active, tok = active[idx], tok[idx]
                if active.numel():
                    cache.batch_select_indices(idx.to(device))
            inputs = tok.unsqueeze(-1).to(device)
            step += 1
    return generations, steps


def generate_self_calibration(
    model: torch.nn.Module,
    *,
    n: int,
    seq_len: int,
    bos_id: int,
    eos_id: int | Sequence[int] | None,
    schedule: LinearSchedule,
    seed: int,
    batch_size: int = 32,
    top_k: int | None = None,
    top_p: float | None = None,
    first_token_ids: list[int] | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, GenerationStats]:
    """Sample ``n`` sequences of ``seq_len`` tokens; row r depends only on (seed, r).

    ``eos_id`` may list several ids (a generation config can name more than one EOS): any of
    them ends a generation. ``first_token_ids`` restricts the first token of every generation
    (the paper's English stop-word constraint for multilingual models).
    """
    eos_list = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
    eos_ids = torch.as_tensor(sorted(set(eos_list)), dtype=torch.long) if eos_list else None
    first_ids = torch.as_tensor(sorted(set(first_token_ids)), dtype=torch.long) if first_token_ids else None
    result = np.empty((n, seq_len), dtype=np.int32)
    t0 = time.perf_counter()
    generations = steps = 0
    bar = tqdm(total=n * seq_len, unit="tok", desc="self-calibration", disable=not progress, unit_scale=True)
    try:
        for start in range(0, n, batch_size):
            rows = range(start, min(start + batch_size, n))
            out = torch.full((len(rows), seq_len), -1, dtype=torch.long)
            g, s = _fill_batch(
                model,
                out,
                row_uniforms(seed, rows, seq_len),
                bos_id=bos_id,
                eos_ids=eos_ids,
                schedule=schedule,
                top_k=top_k,
                top_p=top_p,
                first_token_ids=first_ids,
                on_tokens=bar.update,
            )
            generations += g
            steps += s
            result[rows.start : rows.stop] = out.numpy()
            bar.set_postfix(seqs=f"{rows.stop}/{n}")
    finally:
        bar.close()
    stats = GenerationStats(
        tokens=n * seq_len, seconds=time.perf_counter() - t0, generations=generations, forward_steps=steps
    )
    return result, stats
