"""Pipeline overhead of selfcal's compress step against calling llm-compressor's `oneshot` directly.

For each method, on the same model, the same calibration tokens and the same recipe, in one
process, alternating the two sides `--repeats` times:

- direct:   fresh model -> `oneshot(...)` -> `save_pretrained(save_compressed=True)`
- pipeline: fresh model -> `selfcal.compression.apply.compress(...)`, which adds dataset
            preparation, the atomic scratch directory, the manifest and the verification
            (reload, decompress, per-layer checks)

It reports the best and median wall time of each side, the pipeline's overhead (verification
included) from both, and the cost of verification on its own.

    python benchmarks/compress.py --model ../shared/models/stories260K --n 128 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfcal.calibration.generator import generate_self_calibration  # noqa: E402
from selfcal.calibration.schedule import LinearSchedule  # noqa: E402
from selfcal.compression import apply  # noqa: E402
from selfcal.compression.methods.awq import allow_awq_without_cuda  # noqa: E402
from selfcal.config import CompressionConfig  # noqa: E402


def fresh(path: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).to(device).eval()


def direct(path, device, tokens, the_plan, out: Path) -> float:
    from datasets import Dataset
    from llmcompressor import oneshot

    model = fresh(path, device)
    n, seq_len = tokens.shape
    t0 = time.perf_counter()
    ds = Dataset.from_dict(
        {"input_ids": tokens.astype(np.int64).tolist(), "attention_mask": np.ones_like(tokens).tolist()}
    )
    oneshot(
        model=model,
        dataset=ds,
        recipe=the_plan.method.recipe(the_plan.section, the_plan.context),
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    model.save_pretrained(out, save_compressed=True)
    return time.perf_counter() - t0


def pipeline(path, device, tokenizer, tokens, the_plan, out: Path) -> tuple[float, float]:
    model = fresh(path, device)
    t0 = time.perf_counter()
    manifest = apply.compress(model, tokenizer, tokens, the_plan, out, manifest_fields={}, base_dir=Path(path))
    total = time.perf_counter() - t0
    return total, manifest.verification["verify_seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/models/stories260K"))
    p.add_argument("--methods", nargs="+", default=["gptq", "awq", "sparsegpt", "wanda"])
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--group-size", type=int, default=32, help="for gptq/awq (stories260K's layers are 64 wide)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = fresh(args.model, args.device)
    tokens, _ = generate_self_calibration(
        model,
        n=args.n,
        seq_len=args.seq_len,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
        schedule=LinearSchedule(1, 1, 10),
        seed=0,
        batch_size=min(args.n, 128),
        progress=False,
    )
    del model
    quant = {"group_size": args.group_size, "skip_indivisible": True}
    cfg = CompressionConfig(methods=args.methods, gptq=quant, awq=quant)
    config = AutoConfig.from_pretrained(args.model).to_dict()
    allow_awq_without_cuda()  # applied up front so both sides run the same AWQ code
    results = {}
    work = Path(tempfile.mkdtemp())
    for method in args.methods:
        the_plan = apply.plan(method, cfg, config)
        d, pl, ver = [], [], []
        for r in range(args.repeats):
            for side in ("direct", "pipeline") if r % 2 == 0 else ("pipeline", "direct"):
                out = work / f"{method}-{side}-{r}"
                if side == "direct":
                    d.append(direct(args.model, args.device, tokens, the_plan, out))
                else:
                    total, verify_s = pipeline(args.model, args.device, tokenizer, tokens, the_plan, out)
                    pl.append(total)
                    ver.append(verify_s)
                shutil.rmtree(out, ignore_errors=True)
        # Best-of-N is the least noisy estimate of what each side costs; medians are kept too.
        bd, bp, mv = min(d), min(pl), statistics.median(ver)
        results[method] = {
            "direct_best_s": bd,
            "pipeline_best_s": bp,
            "verify_median_s": mv,
            "overhead_best_pct": 100 * (bp - bd) / bd,
            "overhead_median_pct": 100 * (statistics.median(pl) - statistics.median(d)) / statistics.median(d),
            "runs": {"direct": d, "pipeline": pl, "verify": ver},
        }
        r = results[method]
        print(
            f"| {method} | {bd:.2f} s | {bp:.2f} s | {mv:.2f} s | {r['overhead_best_pct']:+.1f}% | "
            f"{r['overhead_median_pct']:+.1f}% |",
            flush=True,
        )
    shutil.rmtree(work, ignore_errors=True)
    out = {
        "model": args.model,
        "device": args.device,
        "n": args.n,
        "seq_len": args.seq_len,
        "repeats": args.repeats,
        "methods": results,
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
