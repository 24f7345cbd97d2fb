"""Peak memory of Ji et al.'s perplexity filter's scoring, with the logit budget and without it.

Lease 7 lost Ji's five pools on the H200 to the filter: ``sequence_mean_nll`` scored the pool in batches of
the generation's 128 rows, and 128 texts of up to 2,048 tokens x SmolLM2's 49,152 logits in float32 asked
for 36.75-47.91 GiB in one allocation. Since then a batch holds at most ``selfcal.scoring.LOGIT_BUDGET``
float logits. This scores the same texts (random token ids of decreasing length, as a pool's sorted
lengths are) once under the given budget, in a fresh process each, and reports the peak memory (CUDA's
max_memory_allocated on a GPU, the process's peak RSS on the CPU), the time, and the scores for
comparison across budgets:

    python benchmarks/filter_memory.py --model ~/.cache/selfcal-models/SmolLM2-135M-Instruct \
        --budget 268435456 --out /tmp/fm-budget.json
    python benchmarks/filter_memory.py --model ~/.cache/selfcal-models/SmolLM2-135M-Instruct \
        --budget 1000000000000 --out /tmp/fm-free.json --compare /tmp/fm-budget.json

Measured on this 2-core CPU (float32, 16 texts of 1,493-2,048 tokens, batch_size 16): peak RSS 4.53 GiB
with the budget (2^28) against 19.01 GiB without (0.49 after loading the model); the scores differ by at
most 7.5e-8 nats (float noise from the batches' composition; the filter's keep/drop at the 80th
percentile is the same unless two texts lie that close to it).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a causal LM folder (safetensors)")
    ap.add_argument("--budget", type=int, required=True, help="float logits a batch may hold")
    ap.add_argument("--texts", type=int, default=16, help="how many texts to score")
    ap.add_argument("--batch-size", type=int, default=16, help="rows a batch may hold (the generation's batch)")
    ap.add_argument("--out", type=Path, required=True, help="JSON: peak memory, seconds, scores")
    ap.add_argument("--compare", type=Path, help="another run's JSON: the largest difference of the scores")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from selfcal.scoring import sequence_mean_nll

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    texts = [torch.randint(3, vocab, (2048 - 37 * i,), generator=gen).tolist() for i in range(args.texts)]
    loaded = _peak_rss_gib()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    nll = sequence_mean_nll(model, texts, batch_size=args.batch_size, budget=args.budget)
    seconds = time.perf_counter() - start
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "budget": args.budget,
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
        result["max_abs_diff_vs_compare"] = max(abs(a - b) for a, b in zip(result["nll"], other, strict=True))
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print({k: v for k, v in result.items() if k not in ("nll", "lengths")})


if __name__ == "__main__":
    main()
