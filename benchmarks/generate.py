"""Tokens/s of selfcal's batched self-calibration generator vs a naive one-sequence `generate` loop.

Both run in one process on the same model, device and sequence length. The naive
baseline is what a first implementation would do: `model.generate` per sequence, from
BOS, with pure ancestral sampling (top_k=0, top_p=1) and the same number of tokens.
Because it is slow, it may run on fewer sequences (`--naive-n`); tokens/s is per token
either way.

    python benchmarks/generate.py --model ../shared/models/stories260K --n 128 --seq-len 256
    python benchmarks/generate.py --config-only path/to/config.json --device cuda ...  # random weights
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

from selfcal.calibration.generator import generate_self_calibration  # noqa: E402
from selfcal.calibration.schedule import LinearSchedule  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def load(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.config_only:
        # Same architecture and cost as the real model, random weights: for machines the
        # weights cannot be copied to. Throughput does not depend on the weight values.
        config = AutoConfig.from_pretrained(args.config_only)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        name = f"{config.model_type} ({args.config_only}, random weights)"
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, use_safetensors=True)
        name = args.model
    model = model.to(args.device).eval()
    cfg = model.config
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_id
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else None
    return model, name, bos, eos


def batched(model, args, bos, eos) -> dict:
    _sync(args.device)
    t0 = time.perf_counter()
    tokens, stats = generate_self_calibration(
        model,
        n=args.n,
        seq_len=args.seq_len,
        bos_id=bos,
        eos_id=eos,
        schedule=LinearSchedule(1.0, 1.0, 10),
        seed=0,
        batch_size=args.batch_size,
        progress=False,
    )
    _sync(args.device)
    seconds = time.perf_counter() - t0
    return {
        "sequences": args.n,
        "tokens": int(tokens.size),
        "seconds": seconds,
        "tokens_per_s": tokens.size / seconds,
        "generations": stats.generations,
    }


@torch.inference_mode()
def naive(model, args, bos) -> dict:
    new = args.seq_len - 1
    _sync(args.device)
    t0 = time.perf_counter()
    total = 0
    for _ in range(args.naive_n):
        out = model.generate(
            input_ids=torch.tensor([[bos]], device=args.device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=bos,
        )
        total += out.numel()
    _sync(args.device)
    seconds = time.perf_counter() - t0
    return {"sequences": args.naive_n, "tokens": total, "seconds": seconds, "tokens_per_s": total / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/models/stories260K"))
    p.add_argument("--config-only", help="build the model from this config.json with random weights")
    p.add_argument("--n", type=int, default=128, help="sequences for the batched generator")
    p.add_argument("--naive-n", type=int, default=8, help="sequences for the naive loop")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", help="write the JSON result here too")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name, bos, eos = load(args)
    # Warm up kernels and allocator so neither side pays first-call costs.
    generate_self_calibration(
        model,
        n=2,
        seq_len=8,
        bos_id=bos,
        eos_id=eos,
        schedule=LinearSchedule(1, 1, 0),
        seed=1,
        batch_size=2,
        progress=False,
    )
    b = batched(model, args, bos, eos)
    s = naive(model, args, bos)
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    )
    result = {
        "model": name,
        "device": device,
        "dtype": args.dtype,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "batched": b,
        "naive": s,
        "speedup": b["tokens_per_s"] / s["tokens_per_s"],
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    print(
        f"\n| {name} | {device} | {args.n} x {args.seq_len} | {b['tokens_per_s']:,.0f} tok/s | "
        f"{s['tokens_per_s']:,.0f} tok/s ({args.naive_n} seqs) | {result['speedup']:.1f}x |"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
