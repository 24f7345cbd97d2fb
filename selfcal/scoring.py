"""Log-likelihood of token sequences under a causal LM: the one NLL loop of the project.

Perplexity (evaluation), set perplexity (calibration diagnostics) and Ji et al.'s
perplexity filter all score text the same way: each sequence predicts its tokens
2..T from the ones before; nothing is scored across a sequence boundary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def window_nll(
    model, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = False, desc: str = "scoring"
) -> torch.Tensor:
    """Summed NLL of tokens 2..T of each equal-length window: a float64 tensor of shape (n,).

    The per-window sums keep both aggregations exact: pooled perplexity
    exp(sum / tokens) and the mean of per-window perplexities.
    """
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(nll.double().sum(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


#: Float32 logit elements one batch of ``sequence_mean_nll`` may hold (1 GiB). A batch's logits are
#: rows x width x vocabulary: with SmolLM2's 49,152 tokens, 128 texts of up to 2,048 tokens asked for
#: 36.75 GiB in one allocation and Ji's filter died of it on the shared H200 (lease 7), after a pool
#: of 1000 generations (~5 minutes) that the retry then made again. A constant, not the free memory:
#: the batch's composition may change a row's float results, and the filter must keep the same texts
#: on every box.
LOGIT_BUDGET = 2**28


def sequence_batches(lengths: Sequence[int], *, batch_size: int, vocab_size: int, budget: int = LOGIT_BUDGET):
    """Indices of ``lengths`` in batches, shortest first: at most ``batch_size`` rows, and rows x the
    batch's longest length x ``vocab_size`` within ``budget`` (one row always goes, however long)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or (len(batch) + 1) * lengths[i] * vocab_size > budget):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def sequence_mean_nll(
    model, sequences: Sequence[Sequence[int]], *, batch_size: int = 8, pad_id: int = 0, budget: int = LOGIT_BUDGET
) -> torch.Tensor:
    """Mean NLL over tokens 2..T of each sequence (lengths may differ): shape (n,), float64.

    This is ``model(ids, labels=ids).loss`` per sequence, as Ji et al.'s sample_ppl.py computes
    it one text at a time, batched here: sequences are sorted by length and right-padded, and a
    causal model's logits at real positions do not depend on the padding after them.
    Sequences shorter than 2 tokens have nothing to predict and get NaN. A batch holds at most
    ``batch_size`` rows and ``budget`` float logits (``sequence_batches``).
    """
    device = next(model.parameters()).device
    result = torch.full((len(sequences),), float("nan"), dtype=torch.float64)
    lengths = [len(s) for s in sequences]
    for batch in sequence_batches(lengths, batch_size=batch_size, vocab_size=model.config.vocab_size, budget=budget):
        idx = [i for i in batch if lengths[i] >= 2]
        if not idx:
            continue
        width = max(lengths[i] for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(sequences[i])] = torch.as_tensor(sequences[i], dtype=torch.long)
            mask[row, : len(sequences[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").double()
        target = mask[:, 1:].double()
        per_seq = (nll * target).sum(1) / target.sum(1)
        result[torch.as_tensor(idx)] = per_seq.cpu()
    return result
