"""lm-eval's requests for a task, built once per tokenizer and kept on disk, for every model to score.

Building a task's requests is lm-eval's CPU work: load the documents, render each prompt and choice
through the task's Jinja templates, tokenize every (context, continuation) pair. For HellaSwag's 10,042
documents that is ~45 s on one core, the same for every checkpoint, while the GPU waits. Here it is done
once, by lm-eval's own code, and stored content-addressed under the key (task config, data file digest,
tokenizer digest, lm-eval version, limit): any checkpoint of the same tokenizer reuses it.

What is stored is exactly what lm-eval would hand its model and then score with:

- the requests, tokenized by lm-eval's own ``TemplateLM.loglikelihood`` path (``_encode_pair``: trailing
  spaces of the context move to the continuation; an empty context becomes the prefix token), with
  ``HFLM.tok_encode``'s special-token rule (lm_eval/models/huggingface.py, ``tok_encode``);
- per document, what ``ConfigurableTask.process_results`` needs for ``acc`` and ``acc_norm``
  (lm_eval/api/task.py, multiple_choice branch): the gold index (or indices), and each choice's length in
  characters (``completion_len``); for ``loglikelihood`` tasks (LAMBADA) nothing more (``acc = is_greedy``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selfcal.artifacts import atomic_dir
from selfcal.errors import DataError
from selfcal.hashing import sha256_file, sha256_json

log = logging.getLogger("selfcal.evaluate")
PREPARED_VERSION = 1
TOKENS = "requests.safetensors"
META = "task.json"


@dataclass(frozen=True)
class PreparedTask:
    """One task's requests and what scoring them needs. Request i asks for log P(cont_i | ctx_i)."""

    name: str
    output_type: str  # "multiple_choice" or "loglikelihood"
    metrics: tuple[str, ...]  # lm-eval's metric names for this task (acc, acc_norm, perplexity ...)
    doc_of: np.ndarray  # (R,) int: the document of request i (0..D-1, in lm-eval's order)
    choice_of: np.ndarray  # (R,) int: its choice index within the document
    tokens: np.ndarray  # flat int32: for request i, ctx tokens then cont tokens
    offsets: np.ndarray  # (R + 1,) int64: request i's tokens are tokens[offsets[i]:offsets[i+1]]
    ctx_len: np.ndarray  # (R,) int: how many of them are context
    gold: list  # per document: an int, or a list of ints (multiple targets); -100 = out of range
    completion_len: list[list[float]]  # per document, per choice: characters (acc_norm's divisor)
    n_total: int  # documents in the split (lm-eval's "original")
    key: str

    @property
    def n_docs(self) -> int:
        return len(self.gold)

    @property
    def n_requests(self) -> int:
        return len(self.doc_of)


def tokenizer_digest(tokenizer) -> str:
    """What decides the token ids of a string: the tokenizer's serialized model (vocabulary, merges, added
    tokens, pre- and post-processing), the BOS/EOS ids lm-eval uses as the empty-context prefix, and the flag it
    reads (add_bos_token). Not the pad token, which lm-eval's HF wrapper sets on the tokenizer it is given and
    which no encoding uses. Equal for a base model and the checkpoints that copy its tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    ident = {
        "class": type(tokenizer).__name__,
        "backend": hashlib.sha256(body.encode()).hexdigest(),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
    }
    return sha256_json(ident)


def data_files(spec: dict | str) -> list[Path]:
    """The local files a task config reads (``dataset_kwargs.data_files``); none for a hub task."""
    if not isinstance(spec, dict):
        return []
    files = (spec.get("dataset_kwargs") or {}).get("data_files") or {}
    values = files.values() if isinstance(files, dict) else [files]
    return [Path(v) for v in values if isinstance(v, str)]


def _stable(value) -> str:
    """A config value JSON cannot hold, by what it is, not where it lives: lm-eval resolves a task's
    ``!function`` entries (HellaSwag's ``process_docs``, WinoGrande's ``doc_to_text``) to Python functions, whose
    ``str`` carries a memory address that changes with every process. A function is named by module and
    qualified name and hashed by its source."""
    import inspect

    if callable(value):
        try:
            source = hashlib.sha256(inspect.getsource(value).encode()).hexdigest()
        except (OSError, TypeError):
            source = None
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}:{source}"
    return f"{type(value).__name__}:{value!r}" if "0x" not in repr(value) else type(value).__name__


def task_key(spec: dict | str, tokenizer, limit: int | None) -> str:
    import lm_eval

    ident = {
        "prepared_version": PREPARED_VERSION,
        "task": spec if isinstance(spec, str) else json.loads(json.dumps(spec, sort_keys=True, default=_stable)),
        "data": [sha256_file(f) for f in data_files(spec) if f.is_file()],
        "tokenizer": tokenizer_digest(tokenizer),
        "lm_eval": getattr(lm_eval, "__version__", "unknown"),
        "limit": limit,
    }
    return sha256_json(ident)


def _token_lm(tokenizer):
    """lm-eval's own tokenization path for loglikelihood requests, without a model: ``TemplateLM.loglikelihood``
    tokenizes (``_encode_pair``, empty contexts) and hands the pairs to ``_loglikelihood_tokens``, which here
    records them instead of scoring them."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix

    class TokenRecorder(TemplateLM):
        backend = "causal"

        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer
            self.add_bos_token = None  # HFLM's default
            self.recorded: list[tuple[list[int], list[int]]] = []

        @property
        def eot_token_id(self):
            return tokenizer.eos_token_id

        @property
        def prefix_token_id(self):  # HFLM.prefix_token_id
            return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            # HFLM.tok_encode (lm_eval/models/huggingface.py), line for line
            special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
            if add_special_tokens is None and has_bos_prefix(string, tokenizer.decode(self.prefix_token_id)):
                special["add_special_tokens"] = False
            # verbose=False: the same ids, without transformers' "will result in indexing errors" for a text over
            # the context, which the scorer cuts to the window as lm-eval does (fast.py)
            encoding = tokenizer.encode(string, verbose=False, **special)
            return encoding[-left_truncate_len:] if left_truncate_len else encoding

        def _loglikelihood_tokens(self, requests, **kwargs):
            self.recorded = [(list(ctx), list(cont)) for _, ctx, cont in requests]
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return TokenRecorder()


def _gold(task, doc, choices: list[str]):
    """The gold index as ``ConfigurableTask.process_results`` derives it (lm_eval/api/task.py, multiple_choice:
    ``doc_to_text`` for multiple inputs, else ``doc_to_target``; a string is looked up among the choices; an
    index past the choices is -100)."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, list):
        return [i if i < len(choices) else -100 for i in gold]
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else -100
    return gold if gold < len(choices) else -100


def build(spec: dict | str, tokenizer, *, limit: int | None, key: str) -> PreparedTask:
    """Build one task's requests with lm-eval's own code (documents, templates, tokenization)."""
    from lm_eval.evaluator_utils import get_sample_size
    from lm_eval.tasks import get_task_dict

    from selfcal.evaluation.harness import task_name
    from selfcal.evaluation.tasks import task_manager

    name = task_name(spec)
    task = get_task_dict([spec], task_manager())[name]
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=get_sample_size(task, limit), rank=0, world_size=1)
    instances = task.instances
    output_type = task.OUTPUT_TYPE
    if output_type not in ("multiple_choice", "loglikelihood"):
        raise DataError(f"task {name}: output type {output_type!r} is not scored by the fast path")
    recorder = _token_lm(tokenizer)
    recorder.loglikelihood(instances, disable_tqdm=True)
    pairs = recorder.recorded
    doc_ids = sorted({inst.doc_id for inst in instances})
    doc_index = {d: i for i, d in enumerate(doc_ids)}
    docs = {inst.doc_id: inst.doc for inst in instances}
    gold, completion_len = [], []
    for d in doc_ids:
        if output_type == "multiple_choice":
            choices = task.doc_to_choice(docs[d])
            completion_len.append([float(len(c)) for c in choices])
            gold.append(_gold(task, docs[d], choices))
        else:
            completion_len.append([])
            gold.append(0)
    lengths = [len(c) + len(t) for c, t in pairs]
    offsets = np.zeros(len(pairs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    tokens = np.fromiter((t for c, cont in pairs for t in (*c, *cont)), dtype=np.int32, count=int(offsets[-1]))
    return PreparedTask(
        name=name,
        output_type=output_type,
        metrics=tuple(task._metric_fn_list.keys()),
        doc_of=np.array([doc_index[i.doc_id] for i in instances], dtype=np.int64),
        choice_of=np.array([i.idx for i in instances], dtype=np.int64),
        tokens=tokens,
        offsets=offsets,
        ctx_len=np.array([len(c) for c, _ in pairs], dtype=np.int64),
        gold=gold,
        completion_len=completion_len,
        n_total=len(task.eval_docs),
        key=key,
    )


def save(task: PreparedTask, directory: Path) -> None:
    from safetensors.numpy import save_file

    with atomic_dir(directory) as tmp:
        save_file(
            {
                "doc_of": task.doc_of,
                "choice_of": task.choice_of,
                "tokens": task.tokens,
                "offsets": task.offsets,
                "ctx_len": task.ctx_len,
            },
            str(tmp / TOKENS),
        )
        meta = {
            "prepared_version": PREPARED_VERSION,
            "name": task.name,
            "output_type": task.output_type,
            "metrics": list(task.metrics),
            "gold": task.gold,
            "completion_len": task.completion_len,
            "n_total": task.n_total,
            "key": task.key,
        }
        (tmp / META).write_text(json.dumps(meta) + "\n")


def load(directory: Path) -> PreparedTask | None:
    from safetensors.numpy import load_file

    try:
        meta = json.loads((directory / META).read_text())
        arrays = load_file(str(directory / TOKENS))
    except (OSError, ValueError):
        return None
    if meta.get("prepared_version") != PREPARED_VERSION:
        return None
    return PreparedTask(
        name=meta["name"],
        output_type=meta["output_type"],
        metrics=tuple(meta["metrics"]),
        gold=meta["gold"],
        completion_len=meta["completion_len"],
        n_total=meta["n_total"],
        key=meta["key"],
        **arrays,
    )


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # concurrent evaluate items of one workspace build a task once
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_LOADED: dict[str, PreparedTask] = {}  # one process scoring several models reads each task once


def prepared(spec: dict | str, tokenizer, *, limit: int | None, cache_dir: Path | None) -> tuple[PreparedTask, str]:
    """The task's prepared requests and where they came from ("memory", "cache" or "built"): from this
    process, from ``cache_dir`` when another model of this tokenizer built them, else built now and stored."""
    key = task_key(spec, tokenizer, limit)
    if key in _LOADED:
        return _LOADED[key], "memory"
    if cache_dir is None:
        task, how = build(spec, tokenizer, limit=limit, key=key), "built"
    else:
        directory = cache_dir / key[:32]
        with _locked(cache_dir / f".{key[:32]}.lock"):
            found = load(directory)
            if found is not None and found.key == key:
                task, how = found, "cache"
            else:
                task, how = build(spec, tokenizer, limit=limit, key=key), "built"
                save(task, directory)
    _LOADED[key] = task
    return task, how
