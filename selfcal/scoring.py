"""Log-likelihood of token sequences under a causal LM: the one NLL loop of the project.

Perplexity (evaluation), set perplexity (calibration diagnostics) and Ji et al.'s
perplexity filter all score text the same way: each sequence predicts its tokens
2..T from the ones before; nothing is scored across a sequence boundary.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

log = logging.getLogger("selfcal.scoring")

#: Per model (held weakly: an ``id`` could be reused by a later model), whether its head may be called apart
#: from its decoder; filled by its first ``decoder_and_head``.
_SPLIT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def output_head(model):
    """The final projection to logits, with the soft-capping some architectures apply after it."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap:
        return head

    def capped(h):
        return torch.tanh(head(h) / cap) * cap

    return capped


class _WholeModel:
    """The decoder of a model whose head cannot be called apart: the whole model's logits stand in for the
    hidden states (the head is then the identity), and its hidden states are its own."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, output_hidden_states: bool = False, use_cache: bool = False):
        out = self.model(input_ids=input_ids, output_hidden_states=output_hidden_states, use_cache=use_cache)
        return SimpleNamespace(last_hidden_state=out.logits, hidden_states=out.hidden_states)


def _identity(h):
    return h


def _splits(model) -> bool:
    """Whether ``output_head(model)`` after ``model.get_decoder()`` gives the model's own logits, on four tokens.

    This is also the first forward through the whole model, which a compressed-tensors checkpoint needs before
    its decoder is called alone (it decompresses its weights in a hook there: 'Linear' object has no attribute
    'weight'). Some architectures change the logits after the head in their own forward, each its own way
    (Granite divides them by ``logits_scaling``, HyperCLOVA X multiplies them by it, Cohere by
    ``logit_scale``); a model without a decoder of the usual shape fails here too."""
    device = next(model.parameters()).device
    ids = torch.arange(1, 5, device=device)[None]
    with torch.inference_mode():
        whole = model(input_ids=ids, use_cache=False).logits
        try:
            parts = output_head(model)(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)
        except Exception as e:  # no get_decoder, no output embeddings, another output type
            log.warning(
                "%s: its decoder and head cannot be called apart (%s): scoring whole batches", type(model).__name__, e
            )
            return False
    # the same operations in the same order: equal, bar a rounding; a scale a tenth of a percent off 1 is not
    tolerance = 1e-3 * float(whole.float().abs().max()) + 1e-6
    if parts.shape != whole.shape or not torch.allclose(parts.float(), whole.float(), rtol=0, atol=tolerance):
        log.warning("%s: its logits are not its head's output: scoring whole batches", type(model).__name__)
        return False
    return True


def decoder_and_head(model):
    """The model's decoder (embeddings, layers, final norm) and its head, to be called apart, so logits are
    made only where they are needed and never for a whole batch at once.

    Where the two do not give the model's own logits (``_splits``, checked once per model), the whole model
    stands in for the decoder and the head is the identity: the same scores, with a whole batch's logits."""
    split = _SPLIT.get(model)
    if split is None:
        split = _SPLIT[model] = _splits(model)
    if split:
        return model.get_decoder(), output_head(model)
    return _WholeModel(model), _identity


def vocabulary(model) -> int:
    """The width of the model's logits: its output layer's, which a resized vocabulary may make differ from
    the config's."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or model.config.get_text_config().vocab_size)


#: Float32 logit elements one batch of ``window_nll`` or ``sequence_mean_nll`` may hold (1 GiB). A batch's logits are
#: rows x width x vocabulary: with SmolLM2's 49,152 tokens, 128 texts of up to 2,048 tokens asked for
#: 36.75 GiB in one allocation and Ji's filter died of it on the shared H200 (lease 7), after a pool
#: of 1000 generations (~5 minutes) that the retry then made again. A constant, not the free memory:
#: the batch's composition may change a row's float results, and the filter must keep the same texts
#: on every box.
LOGIT_BUDGET = 2**28


@torch.inference_mode()
def window_nll(
    model,
    windows: torch.Tensor,
    *,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "scoring",
    budget: int = LOGIT_BUDGET,
) -> torch.Tensor:
    """Summed NLL of tokens 2..T of each equal-length window: a float64 tensor of shape (n,).

    The per-window sums keep both aggregations exact: pooled perplexity
    exp(sum / tokens) and the mean of per-window perplexities.

    The decoder runs on ``batch_size`` windows at a time; the head and the cross-entropy then run on as
    many of those rows as ``budget`` float logits allow (one row at least). A whole batch's logits were
    the largest allocation of the inspect and evaluate stages: 8 x 2048 positions of SmolLM2's 49,152-token
    vocabulary are 1.5 GiB in bf16, 3 GiB as float and 3 GiB more of log-softmax, held by the caching
    allocator afterwards in each of the eight processes sharing the H200 (lease 11: one ran out of
    memory). In rows of 2 (the default budget) the same scores take about 2 GiB.
    """
    if windows.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    device = next(model.parameters()).device
    n, width = windows.shape
    decoder, head = decoder_and_head(model)
    rows = max(1, budget // (max(width - 1, 1) * vocabulary(model)))
    out = []
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state
        for r in range(0, batch.shape[0], rows):
            logits = head(hidden[r : r + rows, :-1]).float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[r : r + rows, 1:], reduction="none")
            out.append(nll.double().sum(dim=1).cpu())
            del logits, nll
        del hidden
    return torch.cat(out)


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
