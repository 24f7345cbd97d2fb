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


@torch.inference_mode()
def sequence_mean_nll(
    model, sequences: Sequence[Sequence[int]], *, batch_size: int = 8, pad_id: int = 0
) -> torch.Tensor:
    """Mean NLL over tokens 2..T of each sequence (lengths may differ): shape (n,), float64.

    This is ``model(ids, labels=ids).loss`` per sequence, as Ji et al.'s sample_ppl.py computes
    it one text at a time, batched here: sequences are sorted by length and right-padded, and a
    causal model's logits at real positions do not depend on the padding after them.
    Sequences shorter than 2 tokens have nothing to predict and get NaN.
    """
    device = next(model.parameters()).device
    result = torch.full((len(sequences),), float("nan"), dtype=torch.float64)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start : start + batch_size] if len(sequences[i]) >= 2]
        if not idx:
            continue
        width = max(len(sequences[i]) for i in idx)
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
