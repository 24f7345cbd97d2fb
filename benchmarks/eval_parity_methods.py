"""Parity of the fast evaluation path with plain lm-eval on one checkpoint per compression method.

Each method compresses the base model through selfcal's own compress step (``compression.apply``:
llm-compressor ``oneshot``, save, verification) with a small calibration set of random vocabulary
tokens (parity needs a compressed model, not a good one); each checkpoint is loaded as the evaluate stage
loads it and scored by both paths, request by request (``benchmarks/evaluate.py``'s ``parity``).

    python benchmarks/eval_parity_methods.py --model SmolLM2-135M-Instruct --dtype bfloat16 --group-size 64 \\
        --tasks arc_easy hellaswag lambada_openai winogrande --limit 1000 --out parity-methods.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfcal.compression import apply  # noqa: E402
from selfcal.config import CompressionConfig  # noqa: E402
from selfcal.evaluation.tasks import resolve_tasks  # noqa: E402
from selfcal.modelio import ModelRef, fingerprint, load_model, load_tokenizer, resolve_model  # noqa: E402
from selfcal.records import CalibrationRef  # noqa: E402

METHODS = ["gptq", "awq", "sparsegpt", "wanda"]


def _parity():
    """``parity`` of benchmarks/evaluate.py, loaded by path: as a module named ``evaluate`` it would shadow
    Hugging Face's ``evaluate`` package, which lm-eval imports."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("selfcal_bench_evaluate", Path(__file__).with_name("evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parity


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "hellaswag", "lambada_openai", "winogrande"])
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out")
    args = p.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = resolve_model(args.model, root=Path.cwd())
    tok = load_tokenizer(ref)
    config = json.loads((ref.local_dir / "config.json").read_text())
    base = fingerprint(ref)
    special = set(tok.all_special_ids)
    vocab = np.array([i for i in range(len(tok)) if i not in special])
    tokens = np.random.default_rng(0).choice(vocab, size=(args.n, args.seq_len)).astype(np.int32)
    specs, _ = resolve_tasks(args.tasks, Path(args.data_dir))
    work = Path(tempfile.mkdtemp(prefix="selfcal-parity-"))
    quant = {"group_size": args.group_size, "skip_indivisible": True}
    cfg = CompressionConfig(methods=args.methods, gptq=quant, awq=quant, sparsegpt={}, wanda={})
    rows = {}
    for method in args.methods:
        t0 = time.perf_counter()
        model = load_model(ref, dtype=args.dtype, device=device)
        the_plan = apply.plan(method, cfg, config)
        out = work / method
        apply.compress(
            model,
            tok,
            tokens,
            the_plan,
            out,
            base_model=base,
            calibration=CalibrationRef(
                digest="random", source="vocab", seed=0, path="-", n_samples=args.n, seq_len=args.seq_len
            ),
            device=device,
            base_dir=ref.local_dir,
        )
        del model
        compressed = load_model(ModelRef(name=method, local_dir=out), dtype=args.dtype, device=device)
        ctok = load_tokenizer(ModelRef(name=method, local_dir=out))
        print(f"{method}: compressed and reloaded in {time.perf_counter() - t0:.1f} s", flush=True)
        rows[method] = _parity()(compressed, ctok, specs, args.limit)
        if args.out:  # after each method: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps({"methods": rows}, indent=2) + "\n")
        del compressed
        if device == "cuda":
            torch.cuda.empty_cache()
    result = {"model": args.model, "dtype": args.dtype, "limit": args.limit, "device": device, "methods": rows}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
