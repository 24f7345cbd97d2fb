"""A pool of prompted generations on the lockstep engine (Ji et al.'s synthesis and any sampled source).

Ji et al. sample thousands of generations from two-token prompts, each until EOS or
``max_new_tokens``. Batched ``generate`` runs them in batches that end only when their longest
row does; here every row of the batch advances one position per step and, when its generation
ends, takes the next prompt of the pool in place, so the batch stays full until the pool runs
out. The KV cache is a ring of ``prompt + max_new_tokens`` slots (the longest a generation can
be): slot ``p mod L`` holds position p, and a row attends only to the slots of its current
generation, whose positions restart at 0, so each generation is exactly an independent sample
from its prompt (``lockstep.py`` says why the step needs no host round-trip).

The logits processors are transformers' own, in its order (generation/utils.py,
``_get_logits_processor``: RepetitionPenalty, then Temperature, TopK, TopP; logits_process.py
for each), run on the device per row: the repetition penalty reads a per-row mask of the tokens
seen in the generation so far, prompt included, as ``RepetitionPenaltyLogitsProcessor`` reads
``input_ids``. Generation i draws its uniforms from stream (seed, i) (``sampling.row_uniforms``),
so the pool does not depend on the batch size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from selfcal.calibration import lockstep
from selfcal.calibration.lockstep import (
    StaticKVCache,
    _geometry,
    check_supported,
    lockstep_attention_on,
)
from selfcal.calibration.sampling import inverse_cdf, row_uniforms

log = logging.getLogger("selfcal.pool")

CHECK_EVERY = 32  # steps between the host's looks at whether the pool is done (one GPU sync each)


@dataclass(frozen=True)
class PoolSampling:
    """transformers' sampling knobs, applied in its order; None/1.0 = off."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class PoolResult:
    generations: list[list[int]]  # prompt + generated tokens, EOS included when reached
    stopped_at_eos: list[bool]
    forward_steps: int
    seconds: float
    batch: int
    cuda_graphs: bool = False
    attention: str = ""  # the lockstep attention that computed the logits (recorded: it decides the bits)


def process_logits(logits: torch.Tensor, sampling: PoolSampling, seen: torch.Tensor | None) -> torch.Tensor:
    """RepetitionPenalty -> Temperature -> TopK -> TopP, as transformers computes each (float32)."""
    scores = logits.float()
    if sampling.repetition_penalty is not None and sampling.repetition_penalty != 1.0 and seen is not None:
        pen = sampling.repetition_penalty
        scores = torch.where(seen, torch.where(scores < 0, scores * pen, scores / pen), scores)
    if sampling.temperature not in (None, 1.0):
        scores = scores / sampling.temperature
    if sampling.top_k is not None and sampling.top_k > 0:
        k = min(sampling.top_k, scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - sampling.top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))
    return scores


class PoolRows:
    """Device state of a batch of rows working through a pool of prompts; owns its CUDA graph."""

    def __init__(
        self,
        model,
        prompts: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_ids: Sequence[int],
        sampling: PoolSampling,
        seed: int,
        batch: int,
        use_graphs: bool | None = None,
    ):
        check_supported(model)
        self.model = model
        self.device = device = next(model.parameters()).device
        n, plen = prompts.shape
        self.n, self.plen = n, plen
        self.gen_len = plen + max_new_tokens
        self.batch = b = max(1, min(batch, n))
        self.sampling = sampling
        layers, kv_heads, head_dim = _geometry(model)
        dtype = next(model.parameters()).dtype
        self.cache = StaticKVCache(
            layers=layers,
            batch=b,
            kv_heads=kv_heads,
            length=self.gen_len,
            head_dim=head_dim,
            dtype=dtype,
            device=device,
        )
        # One extra, never-read pool item (index n) for rows whose pool has run out.
        dummy = torch.zeros(1, plen, dtype=torch.long)
        self.prompts = torch.cat([prompts.long(), dummy]).to(device)
        self.uniforms = torch.cat(
            [row_uniforms(seed, range(n), self.gen_len), torch.zeros(1, self.gen_len, dtype=torch.float64)]
        ).to(device)
        self.out = torch.full((n + 1, self.gen_len), -1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(n + 1, dtype=torch.long, device=device)
        self.stopped = torch.zeros(n + 1, dtype=torch.bool, device=device)
        self.item = torch.arange(b, device=device).clamp(max=n)
        self.next_item = torch.full((1,), b, dtype=torch.long, device=device)
        self.start = torch.zeros(b, dtype=torch.long, device=device)
        self.p = torch.zeros(1, dtype=torch.long, device=device)
        self.tok = self.prompts[self.item, 0].clone()
        self.out[self.item, 0] = self.tok
        self.eos = torch.as_tensor(list(eos_ids) or [-1], dtype=torch.long, device=device)
        self.seen = torch.zeros(b, model.config.vocab_size, dtype=torch.bool, device=device)
        self.slots = torch.arange(self.gen_len, device=device)
        self.rows = torch.arange(b, device=device)
        self.true = torch.ones((), dtype=torch.bool, device=device)
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.graph = None

    def _step(self) -> None:
        length = self.gen_len
        self.cache.window = length
        self.cache.slot.copy_(self.p % length)
        rel = self.p - self.start
        # Absolute position held by each ring slot; a row attends to those of its generation.
        held = self.p - torch.remainder(self.p - self.slots, length)
        mask = held.unsqueeze(0) >= self.start.unsqueeze(1)
        logits = self.model(
            input_ids=self.tok.unsqueeze(1),
            position_ids=rel.unsqueeze(1),
            attention_mask=mask.view(self.batch, 1, 1, length),
            past_key_values=self.cache,
            use_cache=True,
        ).logits[:, -1, :]
        self.seen.index_put_((self.rows, self.tok), self.true)  # a device value: capturable
        scores = process_logits(logits, self.sampling, self.seen)
        nxt_rel = (rel + 1).clamp(max=length - 1)
        u = self.uniforms[self.item, nxt_rel]
        sampled = inverse_cdf(scores, u)
        forced = nxt_rel < self.plen
        nxt = torch.where(forced, self.prompts[self.item, nxt_rel.clamp(max=self.plen - 1)], sampled)
        self.out[self.item, nxt_rel] = nxt
        hit_eos = torch.isin(nxt, self.eos) & ~forced
        done = hit_eos | (nxt_rel == length - 1)
        self.lengths[self.item] = torch.where(done, nxt_rel + 1, self.lengths[self.item])
        self.stopped[self.item] = torch.where(done, hit_eos, self.stopped[self.item])
        # Rows whose generation ended take the next prompts of the pool, in row order.
        new_item = (self.next_item + torch.cumsum(done.long(), 0) - 1).clamp(max=self.n)
        self.next_item.add_(done.long().sum())
        self.item.copy_(torch.where(done, new_item, self.item))
        self.start.copy_(torch.where(done, self.p + 1, self.start))
        first = self.prompts[self.item, 0]
        self.out[self.item, 0] = torch.where(done, first, self.out[self.item, 0])
        self.seen.masked_fill_(done.unsqueeze(1), False)
        self.tok.copy_(torch.where(done, first, nxt))
        self.p.add_(1)

    def _replay(self) -> Callable[[], None]:
        if self.graph is None:
            state = [self.out, self.lengths, self.stopped, self.item, self.next_item, self.start, self.p, self.tok]
            state.append(self.seen)
            saved = [t.clone() for t in state]
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)
            self.graph = graph
        return self.graph.replay

    def run(self, on_done: Callable[[int], None] | None = None) -> PoolResult:
        t0 = time.perf_counter()
        steps = 0
        reported = 0
        # Every generation ends within gen_len steps of its start: a bound that cannot loop forever.
        max_steps = (self.n // self.batch + 2) * self.gen_len
        every = CHECK_EVERY if self.device.type == "cuda" else 1  # a look costs a sync only on a GPU
        attention = lockstep.default_attention(self.device)  # looked up when run: benchmarks swap it
        with torch.inference_mode(), lockstep_attention_on(self.model, attention):
            while steps < max_steps:
                if self.use_graphs:
                    try:
                        self._replay()()
                    except Exception as exc:  # capture refused by this model/library: step eagerly
                        log.warning("CUDA graph capture failed (%s); stepping eagerly", exc)
                        self.use_graphs = False
                        self._step()
                else:
                    self._step()
                steps += 1
                if steps % every == 0 or steps == max_steps:
                    finished = int((self.lengths[: self.n] > 0).sum())
                    if on_done is not None and finished > reported:
                        on_done(finished - reported)
                        reported = finished
                    if finished == self.n:
                        break
        lengths = self.lengths[: self.n].cpu().tolist()
        out = self.out[: self.n].cpu()
        gens = [out[i, :n].tolist() for i, n in enumerate(lengths)]
        return PoolResult(
            generations=gens,
            stopped_at_eos=self.stopped[: self.n].cpu().tolist(),
            forward_steps=steps,
            seconds=time.perf_counter() - t0,
            batch=self.batch,
            cuda_graphs=self.use_graphs,
            attention=attention,
        )


def generate_pool(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    sampling: PoolSampling,
    seed: int,
    batch_size: int | str = "auto",
    use_graphs: bool | None = None,
    on_done: Callable[[int], None] | None = None,
) -> PoolResult:
    """Generate one continuation per prompt (all prompts of one length) on the lockstep engine."""
    from selfcal.calibration.lockstep import auto_batch_size

    if not prompts:
        raise ValueError("generate_pool: no prompts")
    lengths = {len(p) for p in prompts}
    if len(lengths) != 1:
        raise ValueError(f"generate_pool: prompts must have one length, got {sorted(lengths)}")
    tensor = torch.tensor([list(p) for p in prompts], dtype=torch.long)
    gen_len = tensor.shape[1] + max_new_tokens
    batch = auto_batch_size(model, n=len(prompts), length=gen_len) if batch_size == "auto" else int(batch_size)
    rows = PoolRows(
        model,
        tensor,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        sampling=sampling,
        seed=seed,
        batch=batch,
        use_graphs=use_graphs,
    )
    return rows.run(on_done=on_done)
