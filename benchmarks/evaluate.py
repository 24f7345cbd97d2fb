"""Evaluation throughput: examples/s per zero-shot task and tokens/s of perplexity.

Runs each task alone through selfcal's lm-eval path (local task files, `limit` examples,
one already-loaded model), and the WikiText-2 perplexity windows, timing each.

    python benchmarks/evaluate.py --model ../shared/models/stories260K --limit 200
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfcal.evaluation.harness import run_tasks  # noqa: E402
from selfcal.evaluation.perplexity import perplexity_of_text, read_perplexity_text  # noqa: E402
from selfcal.evaluation.tasks import resolve_tasks  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_TASKS = [
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "lambada_openai",
    "openbookqa",
    "piqa",
    "rte",
    "winogrande",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models/stories260K"))
    p.add_argument("--data-dir", default=str(SHARED / "data"))
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, default=200, help="examples per task; 0 = full sets")
    p.add_argument("--batch-size", default="auto", help="an integer, or auto (lm-eval's search on GPU, 16 on CPU)")
    p.add_argument("--ppl-file", default=str(SHARED / "data/wikitext2_raw/test_joined_gptq_style.txt"))
    p.add_argument("--ppl-windows", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    specs, skipped = resolve_tasks(args.tasks, Path(args.data_dir))
    out = run_tasks(model, tok, specs, limit=args.limit or None, batch_size=batch)
    rows: dict = {}
    print("| task | examples | seconds (incl. lm-eval set-up) | examples/s | acc |")
    print("|---|---|---|---|---|")
    for name, r in out["tasks"].items():
        rows[name] = {
            "examples": r["n"],
            "seconds": r["seconds"],
            "examples_per_s": r["examples_per_s"],
            "acc": r["acc"],
            "batch_size": r["batch_size"],
        }
        print(
            f"| {name} | {r['n']} | {r['seconds']:.1f} | {r['examples_per_s']:.1f} | {100 * r['acc']:.1f} |", flush=True
        )
    for name, why in out["failed"].items():
        rows[name] = {"error": why}
        print(f"| {name} | - | - | - | {why} |")
    ctx = model.config.max_position_embeddings
    t0 = time.perf_counter()
    text = read_perplexity_text(args.ppl_file, root=Path.cwd())
    ppl = perplexity_of_text(model, tok, text, seq_len=min(ctx, 2048), max_windows=args.ppl_windows, progress=False)
    seconds = time.perf_counter() - t0
    rows["perplexity"] = {"tokens": ppl["tokens"], "seconds": seconds, "tokens_per_s": ppl["tokens"] / seconds}
    print(
        f"| perplexity ({ppl['windows']} x {ppl['seq_len']}) | {ppl['tokens']} tokens | {seconds:.1f} s "
        f"| {ppl['tokens'] / seconds:,.0f} tok/s |"
    )
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.machine()} x{torch.get_num_threads()} threads"
    )
    result = {
        "model": args.model,
        "device": device,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "tasks": rows,
        "skipped": skipped,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
