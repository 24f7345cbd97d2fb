"""Calibration sources, registered by ``kind`` (the params' ``calibration.sources.*.kind``).

Each source turns (its params, n, seq_len, seed, tokenizer and, if it needs one, the
model) into an (n, seq_len) token matrix plus provenance for the manifest. New
baselines register here; nothing else in the pipeline switches on the source kind.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from selfcal import textdata
from selfcal.calibration import corpus
from selfcal.calibration.generator import generate_self_calibration
from selfcal.calibration.pool import PoolSampling, generate_pool
from selfcal.calibration.schedule import LinearSchedule
from selfcal.errors import ConfigError, DataError
from selfcal.paths import resolve_path
from selfcal.registry import Registry


@dataclass(frozen=True)
class SourceRequest:
    n: int
    seq_len: int
    seed: int
    batch_size: int | str  # rows at once, or "auto" (free device memory)
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
    # Bumped whenever the algorithm changes what a source produces for the same params and
    # seed; recorded in every calibration manifest, so old and new sets are told apart.
    version: int = 1


SOURCES: Registry[Source] = Registry("source kind")


def register(kind: str, *, needs_model: bool, version: int = 1) -> Callable:
    def deco(fn: Callable[..., SourceResult]) -> Callable[..., SourceResult]:
        SOURCES.register(kind, Source(fn, needs_model, version))
        return fn

    return deco


def start_token(tokenizer) -> int:
    """BOS, or EOS for models whose BOS is their EOS (Phi-2's <|endoftext|>)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise DataError("tokenizer has neither a BOS nor an EOS token to condition self-calibration on")


def eos_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and each EOS the model's generation
    config lists (Gemma 3 names [1, 106], Llama 3.1 Instruct three)."""
    ids: list[int] = []
    gen_cfg = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(gen_cfg, "eos_token_id", None)):
        for tid in value if isinstance(value, (list, tuple)) else [value]:
            if tid is not None and int(tid) not in ids:
                ids.append(int(tid))
    return ids


def first_token_candidates(words: list[str], tokenizer) -> tuple[list[int], list[str]]:
    """Token ids of each word as it appears at the start of a text right after BOS, in lower case
    and capitalised; and the spellings that are not a single token there (refused by ``check``)."""
    ids: list[int] = []
    not_single: list[str] = []
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for word in words:
        w = word.strip()
        for spelling in dict.fromkeys((w.lower(), w[:1].upper() + w[1:].lower())):
            enc = list(tokenizer(spelling)["input_ids"])  # with special tokens: exactly what follows BOS
            if enc and bos is not None and enc[0] == bos:
                enc = enc[1:]
            if enc and eos is not None and enc[-1] == eos and len(enc) > 1:
                enc = enc[:-1]
            if len(enc) != 1:
                not_single.append(spelling)
            elif enc[0] not in ids:
                ids.append(enc[0])
    return ids, not_single


def first_tokens_of(words: list[str], tokenizer, *, key: str = "first_token_words") -> list[int]:
    ids, not_single = first_token_candidates(words, tokenizer)
    if not_single:
        raise ConfigError(f"{key}: not a single token after BOS with this tokenizer: {not_single}")
    return ids


@register("self", needs_model=True)
def self_calibration(spec, request: SourceRequest, *, model, tokenizer) -> SourceResult:
    bos = start_token(tokenizer)
    key = f"calibration.sources.{request.name}.first_token_words"
    first = first_tokens_of(spec.first_token_words, tokenizer, key=key) if spec.first_token_words else None
    eos = eos_ids(tokenizer, model)
    tokens, stats = generate_self_calibration(
        model,
        n=request.n,
        seq_len=request.seq_len,
        bos_id=bos,
        eos_id=eos,
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
            "eos_token_ids": eos,
            "first_token_ids": first,
            "generations": stats.generations,
            "attention": stats.attention,
            "tokens_per_second": round(stats.tokens_per_second, 1),
            "generation_seconds": round(stats.seconds, 3),
        },
    )


def _corpus_stream(spec, *, root, name: str, tokenizer) -> tuple[list[str], np.ndarray]:
    """The corpus's documents and their token stream (EOS between documents): what windows are cut from."""
    docs = textdata.read_documents(
        spec.path,
        root=root,
        text_field=spec.text_field,
        hub_config=spec.hub_config,
        hub_split=spec.hub_split,
        max_documents=spec.max_documents,
        key=f"calibration.sources.{name}.path",
    )
    return docs, textdata.token_stream(docs, tokenizer)


@register("corpus", needs_model=False)
def corpus_windows(spec, request: SourceRequest, *, tokenizer, model=None) -> SourceResult:
    docs, stream = _corpus_stream(spec, root=request.root, name=request.name, tokenizer=tokenizer)
    chosen, info = corpus.pick_windows(
        textdata.windows(stream, request.seq_len, spec.window_stride),
        request.n,
        request.seed,
        allow_overlap=spec.allow_overlap,
        name=f"calibration.sources.{request.name}",
    )
    if spec.window_stride is not None:
        info["window_stride"] = spec.window_stride
    return SourceResult(
        tokens=chosen.astype(np.int32), provenance={"documents": len(docs), "corpus_tokens": int(len(stream)), **info}
    )


def corpus_tokens(spec, *, root, name: str, tokenizer) -> int | None:
    """The token count of a local corpus as ``corpus_windows`` streams it (None for a hub dataset: counting it
    would download it), for ``selfcal check``; the same documents, tokenizer and EOS joins."""
    if not resolve_path(spec.path, root).exists():
        return None
    _, stream = _corpus_stream(spec, root=root, name=name, tokenizer=tokenizer)
    return int(len(stream))


@register("vocab", needs_model=False)
def vocabulary(spec, request: SourceRequest, *, tokenizer, model=None) -> SourceResult:
    special = set(tokenizer.all_special_ids)
    allowed = np.array([i for i in range(len(tokenizer)) if i not in special], dtype=np.int32)
    if allowed.size == 0:
        raise DataError("tokenizer has no non-special tokens to sample from")
    rng = np.random.default_rng(request.seed)
    tokens = allowed[rng.integers(0, allowed.size, size=(request.n, request.seq_len))]
    return SourceResult(
        tokens=tokens, provenance={"vocabulary_size": int(allowed.size), "excluded_special_ids": sorted(special)}
    )


@register("ji", needs_model=True, version=3)
def ji_synthesis(spec, request: SourceRequest, *, model, tokenizer) -> SourceResult:
    """Ji et al. (2024) as their code does it (github.com/Dereck0602/calibration_data).

    - generate_data.py: a prompt is ``tokenizer(text)["input_ids"][:2]`` (BOS + 1 token where
      the tokenizer adds BOS), sampled with temperature 0.6, top-p 0.95, top-k 50, repetition
      penalty 1.2, up to 2048 new tokens, stopping at EOS; decoded without special tokens.
    - sample_ppl.py: each text's perplexity is ``exp(model(ids, labels=ids).loss)`` over the
      whole re-tokenized text, prompt included; texts below the 80th percentile are kept.
    - Wanda/lib/data.py ``get_selfgen``: the kept texts are joined with ' ', tokenized once,
      and ``random.seed(seed)`` + ``random.randint(0, len - seqlen - 1)`` picks each window.
    Here the pool's prompts are drawn with the set's seed, so each set has its own pool, and the
    pool runs on the lockstep engine (``pool.py``: transformers' processors in its order, on the
    device; generation i draws from stream (seed, i)); version 3 (2 sampled with
    ``model.generate``'s multinomial: the same distribution, other draws).
    """
    key = f"calibration.sources.{request.name}"
    docs = textdata.read_documents(
        spec.prompt_path, root=request.root, text_field=spec.text_field, key=f"{key}.prompt_path"
    )
    encoded = ji_prompts(docs, tokenizer, spec.prompt_tokens)
    if len(encoded) < spec.pool_size:
        raise DataError(
            f"{key}.pool_size: {spec.pool_size} prompts needed, {spec.prompt_path} gives {len(encoded)} usable texts"
        )
    rng = np.random.default_rng(request.seed)
    prompts = torch.tensor([encoded[i] for i in rng.choice(len(encoded), spec.pool_size, replace=False)])
    eos = eos_ids(tokenizer, model)
    bar = tqdm(total=spec.pool_size, unit="gen", desc="ji synthesis", disable=not request.progress)
    try:
        pool = generate_pool(
            model,
            prompts.tolist(),
            max_new_tokens=spec.max_new_tokens,
            eos_ids=eos,
            sampling=PoolSampling(
                temperature=spec.temperature,
                top_k=spec.top_k,
                top_p=spec.top_p,
                repetition_penalty=spec.repetition_penalty,
            ),
            seed=request.seed,
            batch_size=request.batch_size,
            on_done=bar.update,
        )
    finally:
        bar.close()
    texts = tokenizer.batch_decode(pool.generations, skip_special_tokens=True)
    prompt_len = prompts.shape[1]
    new_tokens = [len(g) - prompt_len for g in pool.generations]
    stopped = sum(pool.stopped_at_eos)
    scoring_batch = request.batch_size if isinstance(request.batch_size, int) else 16
    kept, filt = perplexity_filter(model, tokenizer, texts, spec.drop_fraction, batch_size=scoring_batch)
    tokens, starts, joined = selfgen_windows(
        kept, tokenizer, n=request.n, seq_len=request.seq_len, seed=request.seed, key=key
    )
    return SourceResult(
        tokens=tokens,
        provenance={
            "pool_size": spec.pool_size,
            **filt,
            "stopped_at_eos": stopped,
            "new_tokens_mean": float(np.mean(new_tokens)),
            "new_tokens_max": int(max(new_tokens)),
            "joined_tokens": joined,
            "window_starts": starts,
            "eos_token_ids": eos,
            "forward_steps": pool.forward_steps,
            "attention": pool.attention,
            "generation_seconds": round(pool.seconds, 3),
        },
    )


def ji_prompts(docs: list[str], tokenizer, prompt_tokens: int) -> list[list[int]]:
    """generate_data.py's prompts: ``tokenizer(text)["input_ids"][:2]``, special tokens included, so
    a tokenizer that adds BOS gives BOS + 1 real token. Texts shorter than that are left out."""
    return [
        list(ids[:prompt_tokens]) for ids in tokenizer(docs, verbose=False)["input_ids"] if len(ids) >= prompt_tokens
    ]


def selfgen_windows(
    texts: list[str], tokenizer, *, n: int, seq_len: int, seed: int, key: str = "ji"
) -> tuple[np.ndarray, list[int], int]:
    """Wanda/lib/data.py ``get_selfgen``: join with ' ', tokenize once (special tokens as the
    tokenizer adds them), then ``random.seed(seed)``; n times ``i = random.randint(0, L - seqlen - 1)``
    and the window ``ids[i : i + seqlen]``. Returns (windows, starts, L)."""
    stream = list(tokenizer(" ".join(texts))["input_ids"])
    if len(stream) < seq_len + 1:  # randint(0, L - seqlen - 1) needs L >= seqlen + 1
        raise DataError(
            f"{key}: the {len(texts)} kept texts give {len(stream)} tokens, too few for a window of {seq_len}"
        )
    picker = random.Random(seed)  # the same draws as the module-level random.seed(seed) + random.randint
    starts = [picker.randint(0, len(stream) - seq_len - 1) for _ in range(n)]
    return np.asarray([stream[s : s + seq_len] for s in starts], dtype=np.int32), starts, len(stream)


def most_kept(pool_size: int, drop_fraction: float) -> int:
    """The most texts ``perplexity_filter`` can keep from a pool: those strictly below np.percentile's linear
    interpolation at position h = (n - 1)(1 - drop_fraction) of the sorted perplexities, so floor(h) + 1 of
    them when h is fractional and h when it is whole (a pool of one keeps none). All of them with no drop."""
    if drop_fraction == 0:
        return pool_size
    h = (pool_size - 1) * (1 - drop_fraction)
    return int(h) + (0 if h == int(h) else 1)


def perplexity_filter(
    model, tokenizer, texts: list[str], drop_fraction: float, *, batch_size: int
) -> tuple[list[str], dict]:
    """Keep texts whose perplexity is below the (1 - drop_fraction) percentile (sample_ppl.py).

    Texts of fewer than 2 tokens have no perplexity and are left out before the percentile.
    """
    from selfcal.scoring import sequence_mean_nll

    ids = [list(tokenizer(t)["input_ids"]) for t in texts]
    scorable = [i for i, x in enumerate(ids) if len(x) >= 2]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ppl = torch.exp(sequence_mean_nll(model, [ids[i] for i in scorable], batch_size=batch_size, pad_id=pad)).numpy()
    if drop_fraction == 0 or len(scorable) == 0:
        keep = list(range(len(scorable)))
        threshold = float("inf")
    else:
        threshold = float(np.percentile(ppl, 100 * (1 - drop_fraction)))
        keep = [k for k in range(len(scorable)) if ppl[k] < threshold]
    kept = [texts[scorable[k]] for k in keep]
    if not kept:
        raise DataError("ji: no generated text survived the perplexity filter")
    return kept, {"generated": len(texts), "scored": len(scorable), "kept_texts": len(kept), "ppl_threshold": threshold}


def get(kind: str) -> Source:
    return SOURCES.get(kind, key="calibration.sources.*.kind")
