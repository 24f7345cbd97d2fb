"""Peak memory of selfcal's NLL loops (``selfcal.scoring``) against scoring through the whole model's logits.

Two loops score text under a model, and both once asked for every position's logits of a whole batch:

- ``--scorer filter``: Ji et al.'s perplexity filter (``sequence_mean_nll``). Lease 7 lost Ji's five pools on
  the H200 to it: it scored the pool in batches of the generation's 128 rows, and 128 texts of up to 2,048
  tokens x SmolLM2's 49,152 logits in float32 asked for 36.75-47.91 GiB in one allocation. Since then a
  batch holds at most ``selfcal.scoring.LOGIT_BUDGET`` float logits (``--budget``; 10^12 is no bound).
- ``--scorer windows``: ``window_nll``, the WikiText-2 perplexity of the evaluate stage and the set perplexity
  of inspect (equal-length windows, 8 a batch). It runs the decoder on a batch and the head and the
  cross-entropy on as many rows as ``--budget`` float logits allow. ``--scorer whole`` is what it did before,
  and what a user writes: ``model(ids).logits`` for the whole batch, to float, cross-entropy (1.5 GiB of bf16
  logits, 3 GiB as float and 3 GiB of log-softmax for 8 x 2048 windows of SmolLM2).

Each run scores the same random token ids (texts of decreasing length, as a pool's sorted lengths are, or
windows of ``--width``) once, in a fresh process, and reports the peak memory (CUDA's max_memory_allocated on a
GPU, the process's peak RSS on the CPU), the time and the scores; ``--compare`` another run's JSON gives the
largest difference of the scores:

    python benchmarks/scoring_memory.py --model ~/.cache/selfcal-models/SmolLM2-135M-Instruct \
        --budget 268435456 --out /tmp/fm-budget.json
    python benchmarks/scoring_memory.py --model ~/.cache/selfcal-models/SmolLM2-135M-Instruct \
        --budget 1000000000000 --out /tmp/fm-free.json --compare /tmp/fm-budget.json
    python benchmarks/scoring_memory.py --model ~/.cache/selfcal-models/SmolLM2-135M-Instruct --scorer windows \
        --texts 8 --batch-size 8 --out /tmp/w-rows.json
    python benchmarks/scoring_memory.py --model ~/.cache/selfcal-models/SmolLM2-135M-Instruct --scorer whole \
        --texts 8 --batch-size 8 --out /tmp/w-whole.json --compare /tmp/w-rows.json

Measured on this 2-core CPU (float32):

- filter, 16 texts of 1,493-2,048 tokens, batch_size 16: peak RSS 4.53 GiB with the budget (2^28) against
  19.01 GiB without (0.49 after loading the model); the scores differ by at most 7.5e-8 nats (float noise from
  the batches' composition; the filter's keep/drop at the 80th percentile is the same unless two texts lie that
  close to it).
- windows, 8 x 2048, one batch: see README ("Scoring in bounded memory").
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


@torch.inference_mode()
def whole_model_window_nll(model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Summed NLL of tokens 2..T per window from the whole model's logits (``window_nll`` before it was bounded)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        out.append(nll.double().sum(dim=1).cpu())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a causal LM folder (safetensors)")
    ap.add_argument("--scorer", choices=["filter", "windows", "whole"], default="filter", help="which loop (above)")
    ap.add_argument("--budget", type=int, default=None, help="float logits a batch may hold (default LOGIT_BUDGET)")
    ap.add_argument("--texts", type=int, default=16, help="how many texts or windows to score")
    ap.add_argument("--width", type=int, default=2048, help="tokens per window (windows, whole)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows a batch may hold")
    ap.add_argument("--out", type=Path, required=True, help="JSON: peak memory, seconds, scores")
    ap.add_argument("--compare", type=Path, help="another run's JSON: the largest difference of the scores")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from selfcal.scoring import LOGIT_BUDGET, sequence_mean_nll, window_nll

    budget = LOGIT_BUDGET if args.budget is None else args.budget
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    if args.scorer == "filter":
        texts = [torch.randint(3, vocab, (2048 - 37 * i,), generator=gen).tolist() for i in range(args.texts)]
    else:
        windows = torch.randint(3, vocab, (args.texts, args.width), generator=gen)
        texts = windows.tolist()
    loaded = _peak_rss_gib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if args.scorer == "filter":
        nll = sequence_mean_nll(model, texts, batch_size=args.batch_size, budget=budget)
    elif args.scorer == "windows":
        nll = window_nll(model, windows, batch_size=args.batch_size, budget=budget)
    else:
        nll = whole_model_window_nll(model, windows, args.batch_size)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "scorer": args.scorer,
        "budget": None if args.scorer == "whole" else budget,
        "texts": args.texts,
        "lengths": [len(t) for t in texts],
        "batch_size": args.batch_size,
        "seconds": round(seconds, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else _peak_rss_gib(), 3),
        "peak_kind": "cuda max_memory_allocated" if device == "cuda" else "peak RSS",
        "rss_after_load_gib": round(loaded, 3),
        "nll": nll.tolist(),
    }
    if args.compare:
        other = json.loads(args.compare.read_text())["nll"]
        pairs = list(zip(result["nll"], other, strict=True))
        result["max_abs_diff_vs_compare"] = max(abs(a - b) for a, b in pairs)
        result["identical_to_compare"] = all(a == b for a, b in pairs)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print({k: v for k, v in result.items() if k not in ("nll", "lengths")})


if __name__ == "__main__":
    main()
