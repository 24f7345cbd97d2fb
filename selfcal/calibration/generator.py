"""Self-calibration sets: many BOS-only generations per row, generated in lockstep.

A row is filled with independent generations, each starting from BOS, until it holds
``seq_len`` tokens: ``BOS s1 ... EOS BOS s2 ...`` (truncated). The loop is written here
rather than through ``model.generate`` so that nothing the library adds by default
(top_k=50, repetition penalties, length limits) sneaks into what the paper defines as pure
ancestral sampling. ``lockstep.py`` says how the rows advance and restart.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from selfcal.calibration.lockstep import LockstepRows, auto_batch_size, plan_for
from selfcal.calibration.sampling import row_uniforms
from selfcal.calibration.schedule import LinearSchedule


@dataclass(frozen=True)
class GenerationStats:
    tokens: int
    seconds: float
    generations: int
    forward_steps: int
    batch_size: int = 0
    cuda_graphs: bool = False
    attention: str = ""  # the lockstep attention that computed the logits (recorded: it decides the bits)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def generate_self_calibration(
    model: torch.nn.Module,
    *,
    n: int,
    seq_len: int,
    bos_id: int,
    eos_id: int | Sequence[int] | None,
    schedule: LinearSchedule,
    seed: int,
    batch_size: int | Literal["auto"] = "auto",
    top_k: int | None = None,
    top_p: float | None = None,
    first_token_ids: list[int] | None = None,
    progress: bool = True,
    use_graphs: bool | None = None,
    window_chunk: int | None = None,
    attention: str | None = None,
) -> tuple[np.ndarray, GenerationStats]:
    """Sample ``n`` sequences of ``seq_len`` tokens; row r depends only on (seed, r).

    ``eos_id`` may list several ids (a generation config can name more than one EOS): any of
    them ends a generation. ``first_token_ids`` restricts the first token of every generation
    (the paper's English stop-word constraint for multilingual models). ``batch_size="auto"``
    sizes the batch from free device memory. ``use_graphs`` (default: on CUDA) captures the
    step as CUDA graphs.
    """
    plan = plan_for(
        bos_id=bos_id, eos_id=eos_id, schedule=schedule, top_k=top_k, top_p=top_p, first_token_ids=first_token_ids
    )
    rows_per_batch = auto_batch_size(model, n=n, length=seq_len) if batch_size == "auto" else int(batch_size)
    result = np.empty((n, seq_len), dtype=np.int32)
    t0 = time.perf_counter()
    generations = steps = 0
    graphs = False
    used_attention = ""
    bar = tqdm(total=n * seq_len, unit="tok", desc="self-calibration", disable=not progress, unit_scale=True)
    extra = {} if window_chunk is None else {"window_chunk": window_chunk}
    if attention is not None:
        extra["attention"] = attention
    try:
        for start in range(0, n, rows_per_batch):
            rows = range(start, min(start + rows_per_batch, n))
            engine = LockstepRows(model, plan, row_uniforms(seed, rows, seq_len), use_graphs=use_graphs, **extra)
            bar.update(len(rows))  # the BOS every row starts with
            stats = engine.run(on_step=bar.update)
            result[rows.start : rows.stop] = engine.out.cpu().numpy()
            generations += stats.generations
            steps += stats.forward_steps
            graphs = stats.graphs
            used_attention = stats.attention
            bar.set_postfix(seqs=f"{rows.stop}/{n}")
            del engine
    finally:
        bar.close()
    stats = GenerationStats(
        tokens=n * seq_len,
        seconds=time.perf_counter() - t0,
        generations=generations,
        forward_steps=steps,
        batch_size=rows_per_batch,
        cuda_graphs=graphs,
        attention=used_attention,
    )
    return result, stats
