"""Quality measures of a calibration set, to judge it before compressing with it.

The headline measures are the self-calibration paper's (Williams et al., arXiv 2410.17170,
Sec. 6.3, Tables 4 and 8), per set D of sequences w of length L over a vocabulary V:

- repetition R = (1 / (|D| L)) * sum_w sum_i 1[w_i in w_1..w_{i-1}]: the share of tokens
  already seen earlier in the same sequence (``repetition``);
- n-gram diversity = (1/4) * sum_{n=1..4} unique n-grams / n-grams, over the whole set
  (``ngram_diversity``; each ratio is ``distinct_n``);
- vocabulary coverage = unique tokens in the set / |V| (``vocab_coverage``);
- perplexity = the mean over sequences of each sequence's perplexity (``perplexity``);
- Zipf coefficient: the paper gives no estimator. Here s is minus the slope of a
  least-squares line through (log rank, log frequency) of the 5,000 most frequent tokens
  of the set (``zipf``).

Two older measures stay under their own names: Welleck et al.'s ``seq_rep_4`` (share of
repeated 4-grams per sequence) and ``distinct_product`` (the product of distinct_1..4).
All text measures are pure functions of the token matrix.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from tqdm.auto import tqdm

ZIPF_TOP = 5000


def _ngrams(seq: np.ndarray, n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def repetition(tokens: np.ndarray) -> float:
    """The paper's R: tokens that already occurred earlier in their sequence, over all tokens.

    In a sequence every token but the first occurrence of each distinct token counts,
    so the sum over i is L - |distinct tokens of w|.
    """
    if tokens.size == 0:
        return 0.0
    repeats = sum(len(row) - len(np.unique(row)) for row in tokens)
    return repeats / tokens.size


def seq_rep(tokens: np.ndarray, n: int = 4) -> float:
    """Welleck et al.'s seq-rep-n: mean over sequences of 1 - unique n-grams / n-grams."""
    vals = []
    for seq in tokens:
        grams = _ngrams(seq, n)
        if grams:
            vals.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(vals)) if vals else 0.0


def ngram_diversity(tokens: np.ndarray, max_n: int = 4) -> dict[str, float]:
    """distinct_n (unique / total n-grams over the whole set) for n=1..max_n; their mean is the
    paper's ``ngram_diversity``, their product the older ``distinct_product``."""
    out: dict[str, float] = {}
    ratios = []
    for n in range(1, max_n + 1):
        grams = [g for seq in tokens for g in _ngrams(seq, n)]
        ratio = len(set(grams)) / len(grams) if grams else 0.0
        out[f"distinct_{n}"] = ratio
        ratios.append(ratio)
    out["ngram_diversity"] = float(np.mean(ratios))
    out["distinct_product"] = float(np.prod(ratios))
    return out


def vocab_coverage(tokens: np.ndarray, vocab_size: int) -> float:
    return len(np.unique(tokens)) / vocab_size


def zipf_coefficient(tokens: np.ndarray, top: int = ZIPF_TOP) -> float:
    """s in freq ~ rank^-s, by least squares on log-log over the ``top`` most frequent tokens."""
    counts = np.array(sorted(Counter(tokens.ravel().tolist()).values(), reverse=True)[:top], dtype=float)
    if len(counts) < 2:
        return float("nan")
    ranks = np.arange(1, len(counts) + 1, dtype=float)
    slope = np.polyfit(np.log(ranks), np.log(counts), 1)[0]
    return float(-slope)


def segment_lengths(tokens: np.ndarray, start_id: int | None) -> dict[str, float]:
    """Lengths of the generations concatenated in each sequence (split at the start token)."""
    if start_id is None:
        return {}
    lengths = []
    for seq in tokens:
        starts = np.flatnonzero(seq == start_id).tolist() + [len(seq)]
        lengths += [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    return {
        "segments": int(arr.size),
        "segment_len_mean": float(arr.mean()),
        "segment_len_median": float(np.median(arr)),
        "segment_len_min": int(arr.min()),
        "segment_len_max": int(arr.max()),
    }


def text_measures(tokens: np.ndarray, vocab_size: int, start_id: int | None = None) -> dict:
    return {
        "n": int(tokens.shape[0]),
        "seq_len": int(tokens.shape[1]),
        "repetition": repetition(tokens),
        "seq_rep_4": seq_rep(tokens, 4),
        **ngram_diversity(tokens),
        "vocab_coverage": vocab_coverage(tokens, vocab_size),
        "zipf": zipf_coefficient(tokens),
        **segment_lengths(tokens, start_id),
    }


def set_perplexity(model, tokens: np.ndarray, batch_size: int = 8, *, progress: bool = False) -> dict[str, float]:
    """The paper's set perplexity (mean of per-sequence perplexities) and the pooled one.

    ``perplexity`` = mean_w exp(mean NLL of w); ``pooled_perplexity`` = exp(mean NLL over all
    tokens of the set), the older measure. Each row is scored as one window.
    """
    from selfcal.scoring import window_nll

    windows = torch.as_tensor(tokens, dtype=torch.long)
    sums = window_nll(model, windows, batch_size=batch_size, progress=progress, desc="set perplexity")
    predicted = windows.shape[1] - 1
    return {
        "perplexity": float(torch.exp(sums / predicted).mean()),
        "pooled_perplexity": float(torch.exp(sums.sum() / (predicted * windows.shape[0]))),
    }


@torch.inference_mode()
def layer_input_stats(
    model, tokens: np.ndarray, batch_size: int = 8, *, progress: bool = False, desc: str = "activations"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, the mean and variance of its input hidden states over all tokens.

    These are what GPTQ/AWQ/SparseGPT/Wanda calibrate on, so a set whose statistics are
    far from real text's will tune the compression for inputs the model rarely sees. Only the decoder
    runs (the same call the whole model makes): logits are not needed here, and for a batch of 8 x 2048
    positions of SmolLM2's vocabulary they were 1.5 GiB.
    """
    from selfcal.scoring import decoder_and_head

    device = next(model.parameters()).device
    decoder, _ = decoder_and_head(model)
    sums: list[torch.Tensor] = []
    sq: list[torch.Tensor] = []
    count = 0
    for i in tqdm(range(0, len(tokens), batch_size), desc=desc, disable=not progress):
        ids = torch.as_tensor(tokens[i : i + batch_size], dtype=torch.long, device=device)
        hidden = decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[:-1]  # layer inputs
        for li, h in enumerate(hidden):
            h = h.double().reshape(-1, h.shape[-1])
            if li == len(sums):
                sums.append(torch.zeros(h.shape[-1], dtype=torch.float64, device=device))
                sq.append(torch.zeros(h.shape[-1], dtype=torch.float64, device=device))
            sums[li] += h.sum(0)
            sq[li] += (h * h).sum(0)
        count += ids.numel()
    stats = []
    for s, q in zip(sums, sq, strict=True):
        mean = s / count
        stats.append((mean.cpu(), (q / count - mean * mean).clamp_min(0).cpu()))
    return stats


def activation_distance(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Per-layer relative distance of means and of log-variances between two sets (b = reference)."""
    mean_d, var_d = [], []
    for (ma, va), (mb, vb) in zip(a, b, strict=True):
        mean_d.append(float((ma - mb).norm() / (mb.norm() + 1e-12)))
        la, lb = (va + 1e-8).log(), (vb + 1e-8).log()
        var_d.append(float((la - lb).abs().mean()))
    return {
        "mean_rel_distance": mean_d,
        "logvar_abs_distance": var_d,
        "mean_rel_distance_avg": float(np.mean(mean_d)),
        "logvar_abs_distance_avg": float(np.mean(var_d)),
    }
