"""Lockstep generation: every row advances one position per step, on a static KV cache.

Why lockstep: a generation that ends with EOS is followed by a fresh one from BOS in the same
row. Run in *rounds* (a new batch of generations once the slowest row of the last one ends), a
real model's short generations leave most rows idle while the longest runs: on SmolLM2 512
positions took 1,750 forward steps. Here a set of ``seq_len`` positions takes ``seq_len - 1``
steps, always, and the batch never shrinks.

How a row restarts: the cache has one slot per position of the row (slot p holds the keys and
values of the token at position p). When the token at position p is an EOS the row sampled (not the BOS
a generation starts from, which may be an EOS id too), position p + 1 is BOS,
the row's ``start`` moves to p + 1, its position ids restart at 0 and its attention mask admits
only slots ``start..p``; so each concatenated generation is exactly an independent sample from
BOS, as if it had a cache of its own. Everything that decides the next token (sampling, the
schedule's per-row temperature, EOS handling, the next mask and positions) stays on the device,
so the step has no host round-trip and, on CUDA, is captured once per attention window as a CUDA
graph and replayed; the tokens come to the host once, at the end.

Attention reads only the cache slots that can matter: the step for position p attends over a
window of the first ``bucket(p + 1)`` slots (a multiple of ``window_chunk``), so early steps do
not stream the whole static cache; grouped-query heads are attended without repeating K/V.

Same row, same tokens: row r draws the uniform for position q from its own stream
(``sampling.row_uniforms``), its attention never reaches another row, and its positions and mask
depend on its own tokens only; so row r of seed s depends only on (s, r), whatever the batch size
or device (up to the floating-point noise of different kernels; see ``replay``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from selfcal.calibration.sampling import filter_logits, inverse_cdf
from selfcal.calibration.schedule import LinearSchedule

log = logging.getLogger("selfcal.lockstep")

ATTENTION_NAME = "selfcal_lockstep"
SDPA_ATTENTION_NAME = "selfcal_lockstep_sdpa"
DEFAULT_WINDOW_CHUNK = 128


@dataclass(frozen=True)
class SamplingPlan:
    """What a row samples: the paper's pure ancestral sampling unless top-k/top-p are set."""

    bos_id: int
    eos_ids: tuple[int, ...]
    schedule: LinearSchedule
    top_k: int | None = None
    top_p: float | None = None
    first_token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StepStats:
    forward_steps: int
    generations: int
    seconds: float
    graphs: bool
    attention: str


class StaticKVCache:
    """The cache object a transformers decoder calls: ``update(key, value, layer_idx)``.

    Duck-typed rather than a ``transformers.Cache`` subclass: the decoder layers call only
    ``update`` when position ids and a 4-D mask are given (modeling_llama.py, LlamaAttention.forward
    and LlamaModel.forward in transformers 5.17), and the library's cache classes change between
    releases. Every step writes its keys/values at ``slot`` (one position for every row, since rows
    move in lockstep) and attends over the first ``window`` slots.
    """

    is_compileable = True

    def __init__(self, *, layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.window = length
        self.length = length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.slot, key_states)
        values.index_copy_(2, self.slot, value_states)
        return keys[:, :, : self.window], values[:, :, : self.window]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never used: the engine passes position ids

    @staticmethod
    def bytes_for(*, layers: int, batch: int, kv_heads: int, length: int, head_dim: int, itemsize: int) -> int:
        return 2 * layers * batch * kv_heads * length * head_dim * itemsize


def lockstep_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one query per row over the window, grouped heads without repeating K/V.

    query (B, H, 1, D); key/value (B, KVH, W, D); attention_mask (B, 1, 1, W) bool, True = attend.
    Scores are two batched matrix products per layer that read K and V once, softmax in float32.
    Returns (B, 1, H, D), as transformers' attention functions do.
    """
    b, h, q_len, d = query.shape
    kvh, w = key.shape[1], key.shape[2]
    g = h // kvh
    q = query.reshape(b, kvh, g * q_len, d)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * (scaling if scaling is not None else d**-0.5)
    scores = scores.masked_fill(~attention_mask.view(b, 1, 1, w), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value).reshape(b, h, q_len, d)
    return out.transpose(1, 2).contiguous(), None


def sdpa_lockstep_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The candidate measured against ``lockstep_attention``: torch's fused attention with the same
    boolean mask and grouped heads (``enable_gqa``); faster on CUDA but not repeatable there (see
    ``default_attention``); kept for the benchmarks."""
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


ATTENTIONS = {ATTENTION_NAME: lockstep_attention, SDPA_ATTENTION_NAME: sdpa_lockstep_attention}


def default_attention(device: torch.device) -> str:
    """The two-matmul attention on every device: the one whose sets come out the same twice.

    Measured (benchmarks/results/gen-determinism-h200-smollm2-lease5.json; H200, SmolLM2 bf16, the study's
    self set 128 x 2048, two fresh processes at once per setting): with torch's fused SDPA the two runs
    differed in all 128 rows, every row identical up to position 128 and the earliest difference at 129
    (the first step whose attention window is past one chunk of 128), also with CUBLAS_WORKSPACE_CONFIG and
    without CUDA graphs; with these two matmuls all 128 rows were identical, at 32.2 s a set against 27.9
    (the generate step whole, two processes at once). The fused kernel stays selectable (``attention=``) for
    benchmarks (benchmarks/results/generate-h200-smollm2-bf16-candidates-pool.json: 5.48 ms/step
    against 5.85)."""
    return ATTENTION_NAME


def _register_attention() -> None:
    from transformers import AttentionInterface

    for name, fn in ATTENTIONS.items():
        AttentionInterface.register(name, fn)


@contextmanager
def lockstep_attention_on(model, name: str = ATTENTION_NAME):
    """Route the model's attention layers to ``lockstep_attention`` for the duration (they read
    ``config._attn_implementation`` on every call), then put the model's own back."""
    _register_attention()
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def check_supported(model) -> None:
    """Lockstep needs a decoder whose every layer attends fully (no sliding windows or recurrences)."""
    cfg = model.config
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if types != {"full_attention"} or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise NotImplementedError(
            f"lockstep generation supports decoders whose layers all use full attention; "
            f"{cfg.model_type} has layer types {sorted(types)} / sliding_window={getattr(cfg, 'sliding_window', None)}"
        )


def _geometry(model) -> tuple[int, int, int]:
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def auto_batch_size(model, *, n: int, length: int, memory_fraction: float = 0.6) -> int:
    """Rows per batch from free memory: the static cache plus a step's logits and sort per row.

    On CUDA, ``memory_fraction`` of the device's free memory; on CPU a quarter of the available
    RAM, capped at 256 rows (stories260K, 128 x 256 on 2 cores: 128 rows at once ran 9.4-10.6k
    tokens/s against 7.5-8.3k for 64).
    """
    import os

    device = next(model.parameters()).device
    layers, kv_heads, head_dim = _geometry(model)
    itemsize = next(model.parameters()).element_size()
    per_row = StaticKVCache.bytes_for(
        layers=layers, batch=1, kv_heads=kv_heads, length=length, head_dim=head_dim, itemsize=itemsize
    )
    per_row += model.config.vocab_size * 8 * 6  # logits in float32/float64 and the sort of top-p
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # `selfcal run --slots-per-gpu K` starts up to K items on this GPU at once: each takes 1/K of it.
        share = max(1, int(os.environ.get("SELFCAL_GPU_SHARE", "1") or 1))
        budget = int(free * memory_fraction / share)
        cap = n
    else:
        try:
            budget = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
        except (ValueError, OSError):
            budget = 4 << 30
        cap = 256
    return max(1, min(n, cap, budget // per_row))


class LockstepRows:
    """The device state of one batch of rows and the step that advances it; owns its CUDA graphs.

    ``out`` (B, seq_len) holds every row's tokens; ``tok`` the token at position ``p`` (the
    input of the next step); ``start`` each row's last BOS position.
    """

    def __init__(
        self,
        model,
        plan: SamplingPlan,
        uniforms: torch.Tensor,
        *,
        window_chunk: int = DEFAULT_WINDOW_CHUNK,
        use_graphs: bool | None = None,
        logprobs: bool = False,
        attention: str | None = None,
    ):
        check_supported(model)
        attention = attention or default_attention(next(model.parameters()).device)
        if attention not in ATTENTIONS:
            raise ValueError(f"unknown lockstep attention {attention!r}; known: {sorted(ATTENTIONS)}")
        self.attention = attention
        _register_attention()
        self.model = model
        self.plan = plan
        self.device = device = next(model.parameters()).device
        b, length = uniforms.shape
        self.batch, self.length = b, length
        layers, kv_heads, head_dim = _geometry(model)
        dtype = next(model.parameters()).dtype
        self.cache = StaticKVCache(
            layers=layers, batch=b, kv_heads=kv_heads, length=length, head_dim=head_dim, dtype=dtype, device=device
        )
        self.uniforms = uniforms.to(device, torch.float64)
        self.out = torch.full((b, length), -1, dtype=torch.long, device=device)
        self.out[:, 0] = plan.bos_id
        self.tok = torch.full((b,), plan.bos_id, dtype=torch.long, device=device)
        self.start = torch.zeros(b, dtype=torch.long, device=device)
        self.p = torch.zeros(1, dtype=torch.long, device=device)
        self.restarts = torch.zeros(b, dtype=torch.long, device=device)
        self.eos = torch.as_tensor(plan.eos_ids or (-1,), dtype=torch.long, device=device)
        self.slots = torch.arange(length, device=device)
        vocab = model.config.vocab_size
        self.first_bias = None
        if plan.first_token_ids:
            bias = torch.full((vocab,), float("-inf"), device=device)
            bias[torch.as_tensor(plan.first_token_ids, device=device)] = 0.0
            self.first_bias = bias
        self.logprobs = torch.zeros(b, length, dtype=torch.float32, device=device) if logprobs else None
        self.window_chunk = max(1, window_chunk)
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.host_p = 0

    # -- the step --------------------------------------------------------------------------
    def window_for(self, p: int) -> int:
        return min(self.length, math.ceil((p + 1) / self.window_chunk) * self.window_chunk)

    def _temperatures(self, step: torch.Tensor) -> torch.Tensor:
        """LinearSchedule per row, in float64 as the Python schedule computes it, then float32."""
        s = self.plan.schedule
        if s.steps == 0:
            return torch.full(step.shape, s.t_final, dtype=torch.float64, device=step.device).float()
        ramp = s.t_initial + (step.double() / s.steps) * (s.t_final - s.t_initial)
        return torch.where(step >= s.steps, torch.full_like(ramp, s.t_final), ramp).float()

    def _sample(self, logits: torch.Tensor, temps: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """sampling.sample_tokens with a temperature per row (0 = argmax), the same arithmetic."""
        logits = filter_logits(logits.float(), self.plan.top_k, self.plan.top_p)
        greedy = logits.argmax(dim=-1)
        safe = torch.where(temps == 0, torch.ones_like(temps), temps)
        return torch.where(temps == 0, greedy, inverse_cdf(logits / safe.unsqueeze(-1), u))

    def _step(self, window: int) -> None:
        """Advance every row from position p to p + 1 (no host sync; graph-capturable)."""
        self.cache.window = window
        self.cache.slot.copy_(self.p)
        rel = self.p - self.start  # position ids: steps since the row's BOS
        slots = self.slots[:window]
        mask = (slots.unsqueeze(0) >= self.start.unsqueeze(1)) & (slots.unsqueeze(0) <= self.p)
        logits = self.model(
            input_ids=self.tok.unsqueeze(1),
            position_ids=rel.unsqueeze(1),
            attention_mask=mask.view(self.batch, 1, 1, window),
            past_key_values=self.cache,
            use_cache=True,
        ).logits[:, -1, :]
        if self.logprobs is not None:
            lp = torch.log_softmax(logits.float(), dim=-1)
        if self.first_bias is not None:
            logits = logits.float() + torch.where((rel == 0).unsqueeze(1), self.first_bias, 0.0)
        nxt_pos = self.p + 1
        u = self.uniforms.index_select(1, nxt_pos).squeeze(1)
        sampled = self._sample(logits, self._temperatures(rel), u)
        # an EOS the row sampled ends its generation; the BOS a generation starts from does not, though it be an
        # EOS id too (Phi-2's <|endoftext|> is both; a tokenizer without BOS starts from EOS): rows were all BOS
        restart = torch.isin(self.tok, self.eos) & (rel > 0)
        nxt = torch.where(restart, torch.full_like(sampled, self.plan.bos_id), sampled)
        self.start.copy_(torch.where(restart, nxt_pos.expand_as(self.start), self.start))
        self.restarts.add_(restart.long())
        self.out.index_copy_(1, nxt_pos, nxt.unsqueeze(1))
        if self.logprobs is not None:
            chosen = lp.gather(1, nxt.unsqueeze(1)).squeeze(1)
            self.logprobs.index_copy_(1, nxt_pos, torch.where(restart, 0.0, chosen).unsqueeze(1))
        self.tok.copy_(nxt)
        self.p.add_(1)

    def _graph(self, window: int) -> Callable[[], None]:
        graph = self.graphs.get(window)
        if graph is None:
            # Warm up on a side stream (allocator, lazy kernels), then capture one step; the state
            # the warm-up advanced is put back so the captured step starts where the rows are.
            saved = [t.clone() for t in (self.out, self.tok, self.start, self.p, self.restarts)]
            if self.logprobs is not None:
                saved.append(self.logprobs.clone())
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._step(window)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                self._step(window)
            state = [self.out, self.tok, self.start, self.p, self.restarts]
            if self.logprobs is not None:
                state.append(self.logprobs)
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)
            self.graphs[window] = graph
        return graph.replay

    def run(self, on_step: Callable[[int], None] | None = None) -> StepStats:
        """Fill every row to ``length`` tokens: ``length - 1`` steps."""
        t0 = time.perf_counter()
        steps = 0
        with torch.inference_mode(), lockstep_attention_on(self.model, self.attention):
            for p in range(self.length - 1):
                window = self.window_for(p)
                if self.use_graphs:
                    try:
                        self._graph(window)()
                    except Exception as exc:  # capture refused by this model/library: run eagerly
                        log.warning("CUDA graph capture failed (%s); stepping eagerly", exc)
                        self.use_graphs = False
                        self.graphs.clear()
                        self._step(window)
                else:
                    self._step(window)
                steps += 1
                if on_step is not None:
                    on_step(self.batch)
            generations = int(self.restarts.sum()) + self.batch
        return StepStats(
            forward_steps=steps,
            generations=generations,
            seconds=time.perf_counter() - t0,
            graphs=self.use_graphs,
            attention=self.attention,
        )


def plan_for(
    *,
    bos_id: int,
    eos_id: int | Sequence[int] | None,
    schedule: LinearSchedule,
    top_k: int | None = None,
    top_p: float | None = None,
    first_token_ids: Sequence[int] | None = None,
) -> SamplingPlan:
    eos_list = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
    return SamplingPlan(
        bos_id=bos_id,
        eos_ids=tuple(sorted(set(eos_list))),
        schedule=schedule,
        top_k=top_k,
        top_p=top_p,
        first_token_ids=tuple(sorted(set(first_token_ids))) if first_token_ids else None,
    )
