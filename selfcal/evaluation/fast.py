"""Zero-shot scoring at the GPU's pace: lm-eval's requests (prepared once, ``prepared.py``), scored in
full, length-sorted batches, aggregated to lm-eval's ``acc`` / ``acc_norm``.

The arithmetic is lm-eval's ``HFLM._loglikelihood_tokens`` (lm_eval/models/huggingface.py):

- the input is ``(context + continuation)[-(max_length + 1):][:-1]``, right-padded without an attention
  mask (causal attention keeps the padding from reaching a real position), positions from 0;
- the continuation's log-probabilities are ``log_softmax`` of the logits at its positions, in the model's
  dtype (lm-eval's default ``softmax_dtype=None``), gathered at its tokens and summed (a bf16 model's sum
  rounded to bf16, as ``float(logits.sum())`` of a bf16 tensor is); ``is_greedy`` is every position's
  argmax of those log-probabilities being the continuation's token;
- a continuation longer than the context window fails the task, as lm-eval's assertion does.

What is faster: the requests are tokenized once per tokenizer, not per model; requests with the same input
(BoolQ's "yes"/"no", every single-token continuation: lm-eval's one-token logits cache does the same) share
one forward pass, generalised to any identical input; batches are filled to a token budget, longest first,
so there is little padding; the LM head and softmax run only at the continuation positions, not at every
position of every context; and the sums stay on the device until a task is done (one transfer per task).

Aggregation is ``ConfigurableTask.process_results`` (lm_eval/api/task.py): per document, ``acc`` is
``argmax(lls) == gold`` and ``acc_norm`` is ``argmax(lls / completion_len) == gold`` (numpy's argmax: the first
of equal values), ``acc`` of a ``loglikelihood`` task is ``is_greedy``; the task's value is their mean and its
stderr ``mean_stderr`` (lm_eval/api/metrics.py: sample standard deviation / sqrt(n)).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from selfcal.evaluation.prepared import PreparedTask

log = logging.getLogger("selfcal.evaluate")

# Tokens per forward pass (rows x padded length) when not given: the GPU's, halved on out-of-memory.
CUDA_BATCH_TOKENS = 1 << 17
CPU_BATCH_TOKENS = 1 << 12


class ContextTooLong(AssertionError):
    """A continuation longer than the model's context window: lm-eval refuses the task (an assertion)."""


def max_length(model, tokenizer) -> int:
    from lm_eval.models.utils import resolve_max_length

    return resolve_max_length(model.config, tokenizer)


class Requests:
    """A task's requests as model inputs: the unique (truncated) inputs, longest first, and per request which
    input it reads, where its continuation starts in it, and its tokens."""

    def __init__(self, task: PreparedTask, window: int):
        self.task = task
        seqs: dict[tuple, int] = {}
        self.seq_of = np.empty(task.n_requests, dtype=np.int64)
        self.start = np.empty(task.n_requests, dtype=np.int64)  # first continuation position in the input
        self.cont: list[np.ndarray] = []
        for i in range(task.n_requests):
            full = task.tokens[task.offsets[i] : task.offsets[i + 1]]
            cont = full[task.ctx_len[i] :]
            if len(cont) > window:
                raise ContextTooLong(f"a continuation of {len(cont)} tokens exceeds the {window}-token context")
            inp = tuple(full[-(window + 1) :][:-1].tolist())
            self.seq_of[i] = seqs.setdefault(inp, len(seqs))
            self.start[i] = len(inp) - len(cont)
            self.cont.append(cont)
        self.inputs = list(seqs)
        self.order = sorted(range(len(self.inputs)), key=lambda s: -len(self.inputs[s]))

    def batches(self, budget: int):
        """Unique inputs in batches of at most ``budget`` padded tokens, longest first."""
        batch: list[int] = []
        for s in self.order:
            width = len(self.inputs[batch[0]]) if batch else len(self.inputs[s])
            if batch and (len(batch) + 1) * width > budget:
                yield batch
                batch = []
            batch.append(s)
        if batch:
            yield batch


def score(
    model, task: PreparedTask, *, window: int, batch_tokens: int | None = None, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood, is_greedy) of every request of ``task``, as lm-eval's HFLM computes them. ``progress``: a
    bar over the task's unique inputs (a full HellaSwag is minutes on a CPU, and it was silent)."""
    import torch
    from tqdm.auto import tqdm

    from selfcal import scoring

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    budget = batch_tokens or (CUDA_BATCH_TOKENS if device.type == "cuda" else CPU_BATCH_TOKENS)
    reqs = Requests(task, window)
    by_seq: dict[int, list[int]] = {}
    for i, s in enumerate(reqs.seq_of):
        by_seq.setdefault(int(s), []).append(i)
    decoder, head = scoring.decoder_and_head(model)
    sums = torch.zeros(task.n_requests, dtype=torch.float32, device=device)
    misses = torch.zeros(task.n_requests, dtype=torch.int32, device=device)
    pending = list(reqs.batches(budget))
    bar = tqdm(total=len(reqs.inputs), desc=task.name, unit="input", disable=not progress, leave=False)
    with torch.inference_mode(), bar:
        while pending:
            batch = pending.pop(0)
            width = len(reqs.inputs[batch[0]])
            ids = np.zeros((len(batch), width), dtype=np.int64)
            rows, cols, targets, owner = [], [], [], []
            for r, s in enumerate(batch):
                seq = reqs.inputs[s]
                ids[r, : len(seq)] = seq
                for i in by_seq[s]:
                    n = len(reqs.cont[i])
                    rows.append(np.full(n, r))
                    cols.append(np.arange(reqs.start[i], reqs.start[i] + n))
                    targets.append(reqs.cont[i])
                    owner.append(np.full(n, i))
            try:
                hidden = decoder(input_ids=torch.from_numpy(ids).to(device), use_cache=False).last_hidden_state
                at = torch.from_numpy(np.concatenate(rows) * width + np.concatenate(cols)).to(device)
                logp = torch.log_softmax(head(hidden.reshape(-1, hidden.shape[-1])[at]), dim=-1)
            except torch.OutOfMemoryError:
                if len(batch) == 1:
                    raise
                torch.cuda.empty_cache()
                half = len(batch) // 2
                pending[:0] = [batch[:half], batch[half:]]
                budget = max(width, budget // 2)
                log.info("out of memory at %d x %d tokens: batches of at most %d tokens now", len(batch), width, budget)
                continue
            tgt = torch.from_numpy(np.concatenate(targets).astype(np.int64)).to(device)
            who = torch.from_numpy(np.concatenate(owner)).to(device)
            sums.index_add_(0, who, logp.gather(1, tgt[:, None]).squeeze(1).float())
            misses.index_add_(0, who, (logp.argmax(dim=-1) != tgt).int())
            del hidden, logp
            bar.update(len(batch))  # host-side only: no device sync
    # lm-eval sums a request's log-probs as a tensor of the model's dtype: a bf16 sum is a bf16 number
    ll = sums.to(dtype).double().cpu().numpy()
    return ll, (misses == 0).cpu().numpy()


def _mean_stderr(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mu = sum(values) / len(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1)) / math.sqrt(len(values))


def aggregate(task: PreparedTask, ll: np.ndarray, greedy: np.ndarray) -> dict:
    """Per-document ``acc`` / ``acc_norm`` as ``process_results``, then their means and stderrs."""
    acc, acc_norm = [], []
    if task.output_type == "loglikelihood":  # one request per document
        acc = [float(bool(g)) for g in greedy]
    else:
        lls: list[dict[int, float]] = [{} for _ in range(task.n_docs)]
        for i in range(task.n_requests):
            lls[task.doc_of[i]][int(task.choice_of[i])] = float(ll[i])
        for d in range(task.n_docs):
            values = np.array([lls[d][c] for c in sorted(lls[d])])
            pred = int(np.argmax(values))
            pred_norm = int(np.argmax(values / np.array(task.completion_len[d])))
            gold = task.gold[d]
            golds = gold if isinstance(gold, list) else [gold]
            acc.append(1.0 if pred in golds else 0.0)
            acc_norm.append(1.0 if pred_norm in golds else 0.0)
    out = {"acc": float(np.mean(acc)) if acc else None, "acc_stderr": _mean_stderr(acc)}
    if acc_norm and "acc_norm" in task.metrics:
        out["acc_norm"] = float(np.mean(acc_norm))
    return out


def run_task(model, tokenizer, task: PreparedTask, *, batch_tokens: int | None = None, progress: bool = False) -> dict:
    """One prepared task on one model: lm-eval's numbers, plus its timings and request counts."""
    import torch

    t0 = time.perf_counter()
    ll, greedy = score(model, task, window=max_length(model, tokenizer), batch_tokens=batch_tokens, progress=progress)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        **aggregate(task, ll, greedy),
        "n": task.n_docs,
        "n_total": task.n_total,
        "seconds": round(seconds, 3),
        "examples_per_s": round(task.n_docs / seconds, 2) if seconds > 0 else None,
        "requests": task.n_requests,
        "requests_per_s": round(task.n_requests / seconds, 1) if seconds > 0 else None,
        "batch_size": f"{batch_tokens or 'auto'} tokens",
    }
