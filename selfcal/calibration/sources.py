"""Calibration sources, registered by ``kind`` (the params' ``calibration.sources.*.kind``).

Each source turns (its params, n, seq_len, seed, tokenizer and, if it needs one, the
model) into an (n, seq_len) token matrix plus provenance for the manifest. New
baselines register here; nothing else in the pipeline switches on the source kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from selfcal.calibration import corpus
from selfcal.calibration.generator import generate_self_calibration
from selfcal.calibration.schedule import LinearSchedule
from selfcal.errors import DataError


@dataclass(frozen=True)
class SourceRequest:
    n: int
    seq_len: int
    seed: int
    batch_size: int
    root: Path = Path(".")  # params.yaml's directory: relative corpus paths start here
    name: str = "source"  # the params key, for error messages
    progress: bool = True


@dataclass(frozen=True)
class SourceResult:
    tokens: np.ndarray
    provenance: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    build: Callable[..., SourceResult]
    needs_model: bool  # corpus and vocabulary sources need only the tokenizer


SOURCES: dict[str, Source] = {}


def register(kind: str, *, needs_model: bool) -> Callable:
    def deco(fn: Callable[..., SourceResult]) -> Callable[..., SourceResult]:
        SOURCES[kind] = Source(fn, needs_model)
        return fn

    return deco


def start_token(tokenizer) -> int:
    """BOS, or EOS for models whose BOS is their EOS (Phi-2's <|endoftext|>)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("tokenizer has neither a BOS nor an EOS token to condition self-calibration on")


def first_tokens_of(words: list[str], tokenizer) -> list[int]:
    """The first token of each word as it appears mid-text (with its leading space)."""
    ids = []
    for w in words:
        enc = tokenizer(" " + w.strip(), add_special_tokens=False)["input_ids"]
        if enc:
            ids.append(enc[0])
    return ids


@register("self", needs_model=True)
def self_calibration(spec, request: SourceRequest, *, model, tokenizer) -> SourceResult:
    bos = start_token(tokenizer)
    first = first_tokens_of(spec.first_token_words, tokenizer) if spec.first_token_words else None
    tokens, stats = generate_self_calibration(
        model,
        n=request.n,
        seq_len=request.seq_len,
        bos_id=bos,
        eos_id=tokenizer.eos_token_id,
        schedule=LinearSchedule(spec.t_initial, spec.t_final, spec.schedule_steps),
        seed=request.seed,
        batch_size=request.batch_size,
        top_k=spec.top_k,
        top_p=spec.top_p,
        first_token_ids=first,
        progress=request.progress,
    )
    return SourceResult(
        tokens=tokens,
        provenance={
            "start_token_id": bos,
            "eos_token_id": tokenizer.eos_token_id,
            "first_token_ids": first,
            "generations": stats.generations,
            "tokens_per_second": round(stats.tokens_per_second, 1),
            "generation_seconds": round(stats.seconds, 3),
        },
    )


@register("corpus", needs_model=False)
def corpus_windows(spec, request: SourceRequest, *, tokenizer, model=None) -> SourceResult:
    key = f"calibration.sources.{request.name}.path"
    docs = corpus.read_documents(
        spec.path, root=request.root, text_field=spec.text_field, hub_config=spec.hub_config,
        hub_split=spec.hub_split, max_documents=spec.max_documents, key=key,
    )
    stream = corpus.token_stream(docs, tokenizer)
    chosen, info = corpus.pick_windows(
        corpus.windows(stream, request.seq_len), request.n, request.seed, allow_overlap=spec.allow_overlap, name=f"calibration.sources.{request.name}"
    )
    return SourceResult(tokens=chosen.astype(np.int32), provenance={"documents": len(docs), "corpus_tokens": int(len(stream)), **info})


@register("vocab", needs_model=False)
def vocabulary(spec, request: SourceRequest, *, tokenizer, model=None) -> SourceResult:
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int32)
    if allowed.size == 0:
        raise DataError("tokenizer has no non-special tokens to sample from")
    rng = np.random.default_rng(request.seed)
    tokens = allowed[rng.integers(0, allowed.size, size=(request.n, request.seq_len))]
    return SourceResult(tokens=tokens, provenance={"vocabulary_size": int(allowed.size), "excluded_special_ids": sorted(special)})


@torch.inference_mode()
def _per_sample_nll(model, ids: torch.Tensor, prompt_len: int, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(ids), batch_size):
        batch = ids[i : i + batch_size]
        logits = model(input_ids=batch).logits[:, prompt_len - 1 : -1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, prompt_len:], reduction="none")
        out.append(nll.mean(dim=1).cpu())
    return torch.cat(out)


@register("ji", needs_model=True)
def ji_synthesis(spec, request: SourceRequest, *, model, tokenizer) -> SourceResult:
    """Ji et al. (2024): generate from 2-token real prompts, keep the least perplexing 80%."""
    docs = corpus.read_documents(spec.prompt_path, root=request.root, text_field=spec.text_field, key=f"calibration.sources.{request.name}.prompt_path")
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_len = len(prefix) + spec.prompt_tokens
    if prompt_len >= request.seq_len:
        raise DataError(f"calibration.seq_len: {request.seq_len} leaves no room after a {prompt_len}-token prompt")
    encoded = [ids for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"] if len(ids) >= spec.prompt_tokens]
    total = math.ceil(request.n / (1.0 - spec.drop_fraction))
    if len(encoded) < total:
        raise DataError(f"calibration.sources.{request.name}.prompt_path: {len(encoded)} usable documents, {total} prompts needed")
    rng = np.random.default_rng(request.seed)
    prompts = torch.tensor([prefix + encoded[i][: spec.prompt_tokens] for i in rng.choice(len(encoded), total, replace=False)])
    device = next(model.parameters()).device
    new = request.seq_len - prompt_len
    torch.manual_seed(request.seed)
    outputs = []
    for i in range(0, total, request.batch_size):
        batch = prompts[i : i + request.batch_size].to(device)
        outputs.append(
            model.generate(
                input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=spec.temperature,
                top_p=spec.top_p, top_k=spec.top_k, repetition_penalty=spec.repetition_penalty,
                max_new_tokens=new, min_new_tokens=new, pad_token_id=tokenizer.eos_token_id,
            ).cpu()
        )
    samples = torch.cat(outputs)
    nll = _per_sample_nll(model, samples.to(device), prompt_len, request.batch_size)
    keep = torch.sort(torch.argsort(nll)[: request.n]).values  # lowest perplexity, original order
    return SourceResult(
        tokens=samples[keep].numpy().astype(np.int32),
        provenance={"generated": total, "kept": request.n, "dropped_ppl_threshold": float(torch.exp(nll[keep].max()))},
    )


def get(kind: str) -> Source:
    try:
        return SOURCES[kind]
    except KeyError:
        raise DataError(f"unknown calibration source kind {kind!r}; known: {sorted(SOURCES)}") from None
