"""Evaluation throughput: plain lm-eval against selfcal's fast path, per checkpoint, in one process.

For each model in turn (the base model, then further checkpoints of the same tokenizer), the nine
zero-shot tasks and WikiText-2 perplexity are scored

- plain:  lm-eval 0.4.13's own `simple_evaluate` with its HF wrapper (`selfcal.evaluation.harness.run_tasks`,
          batch `auto` on a GPU), which builds every task's documents, prompts and tokens again per model;
- fast:   `selfcal.evaluation.harness.run_tasks_fast`: the requests prepared once per tokenizer (the first
          model pays for it, by lm-eval's own task code), scored in token-budget batches on the device.

It reports seconds per task and per model, requests/s, the GPU's busy fraction while each side scores
(NVML utilization sampled every 100 ms), and, per task, whether both sides give the same accuracy and how far
apart their per-request log-likelihoods are (the fast path is compared request by request with lm-eval's
logged responses). A further checkpoint is made in-process when none is given: the base model with every
linear layer of the decoder pruned 2:4 by magnitude (a different model, the same tokenizer).

    python benchmarks/evaluate.py --model ../shared/models/stories260K --limit 200                 # this CPU
    python benchmarks/evaluate.py --model SmolLM2-135M-Instruct --dtype bfloat16 --limit 0 --out r.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfcal.evaluation import fast  # noqa: E402
from selfcal.evaluation.harness import run_tasks, run_tasks_fast  # noqa: E402
from selfcal.evaluation.perplexity import perplexity_of_ids, read_perplexity_text, text_ids  # noqa: E402
from selfcal.evaluation.prepared import prepared  # noqa: E402
from selfcal.evaluation.tasks import resolve_tasks  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
TASKS = ["arc_easy", "arc_challenge", "boolq", "hellaswag", "lambada_openai", "openbookqa", "piqa", "rte", "winogrande"]


class GpuBusy:
    """Mean GPU utilization (NVML, every 100 ms) while the block runs; None without a GPU."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()
        self.handle = None
        if torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
                self._nvml = pynvml
            except Exception:  # no NVML: no busy figure
                self.handle = None

    def _run(self):
        while not self._stop.wait(0.1):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __enter__(self):
        if self.handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self._stop.set()
            self._thread.join()

    @property
    def busy(self) -> float | None:
        return round(float(np.mean(self.samples)) / 100, 3) if self.samples else None


def pruned_24(model):
    """A further checkpoint: every decoder linear layer pruned 2:4 by magnitude (a real, different model)."""
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        for module in other.get_decoder().modules():
            if isinstance(module, torch.nn.Linear) and module.in_features % 4 == 0:
                w = module.weight
                groups = w.reshape(-1, 4)
                drop = groups.abs().argsort(dim=1)[:, :2]
                groups.scatter_(1, drop, 0)
    return other


def plain_side(model, tok, specs, limit, batch):
    with GpuBusy() as gpu:
        t0 = time.perf_counter()
        out = run_tasks(model, tok, specs, limit=limit, batch_size=batch)
        seconds = time.perf_counter() - t0
    return out, seconds, gpu.busy


def fast_side(model, tok, specs, limit, cache_dir, batch_tokens):
    with GpuBusy() as gpu:
        t0 = time.perf_counter()
        out = run_tasks_fast(model, tok, specs, limit=limit, cache_dir=cache_dir, batch_tokens=batch_tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return out, seconds, gpu.busy


def parity(model, tok, specs, limit) -> dict:
    """Per task: the fast path's per-request log-likelihoods against lm-eval's logged responses."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from selfcal.evaluation.harness import task_name
    from selfcal.evaluation.tasks import task_manager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size="auto" if torch.cuda.is_available() else 16)
    window = fast.max_length(model, tok)
    rows = {}
    for spec in specs:
        name = task_name(spec)
        try:
            out = simple_evaluate(
                model=lm,
                tasks=[spec],
                num_fewshot=0,
                limit=limit,
                log_samples=True,
                task_manager=task_manager(),
                bootstrap_iters=1000,
            )
        except AssertionError:
            rows[name] = {"skipped": "lm-eval refuses it on this context"}
            continue
        samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        ref_ll = np.array([float(r[0][0]) for s in samples for r in s["resps"]])
        ref_greedy = [bool(r[0][1]) for s in samples for r in s["resps"]]
        task, _ = prepared(spec, tok, limit=limit, cache_dir=None)
        ll, greedy = fast.score(model, task, window=window)
        ours = fast.aggregate(task, ll, greedy)
        res = out["results"][name]
        rows[name] = {
            "requests": len(ref_ll),
            "max_abs_ll_diff": float(np.max(np.abs(ll - ref_ll))) if len(ref_ll) else 0.0,
            "greedy_differ": int(sum(a != b for a, b in zip(greedy, ref_greedy, strict=True))),
            "acc_lm_eval": res.get("acc,none"),
            "acc_fast": ours["acc"],
            "acc_norm_lm_eval": res.get("acc_norm,none"),
            "acc_norm_fast": ours.get("acc_norm"),
            "same_acc": ours["acc"] == res.get("acc,none") and ours.get("acc_norm") == res.get("acc_norm,none"),
        }
        print(f"parity {name}: {rows[name]}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(SHARED / "models/stories260K"))
    p.add_argument("--further", nargs="*", default=None, help="further checkpoints (default: one 2:4-pruned copy)")
    p.add_argument("--data-dir", default=str(SHARED / "data"))
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--limit", type=int, default=200, help="examples per task; 0 = full sets")
    p.add_argument("--batch-size", default="auto", help="plain lm-eval's batch: an integer, or auto")
    p.add_argument("--batch-tokens", type=int, default=None, help="the fast path's tokens per batch (default auto)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ppl-file", default=str(SHARED / "data/wikitext2_raw/test_joined_gptq_style.txt"))
    p.add_argument("--ppl-seq-len", type=int, default=2048)
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--parity", action="store_true", help="also compare per-request log-likelihoods with lm-eval")
    p.add_argument("--cache-dir", default=None, help="prepared requests (default: a fresh temporary folder)")
    p.add_argument("--out")
    args = p.parse_args()
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, use_safetensors=True).to(device).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    models = [("base", base)]
    if args.further is None:
        models.append(("pruned-2:4", pruned_24(base)))
    else:
        for path in args.further:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
            models.append((Path(path).name, m))
    limit = args.limit or None
    specs, skipped = resolve_tasks(args.tasks, Path(args.data_dir))
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="selfcal-prepared-"))
    text = read_perplexity_text(args.ppl_file, root=Path.cwd())
    seq_len = min(args.ppl_seq_len, fast.max_length(base, tok))
    rows = []
    for label, model in models:
        row = {"model": label}
        if not args.skip_plain:
            out, seconds, busy = plain_side(model, tok, specs, limit, batch)
            row["plain"] = {
                "seconds": round(seconds, 1),
                "gpu_busy": busy,
                "tasks": {k: {"acc": v["acc"], "seconds": v["seconds"]} for k, v in out["tasks"].items()},
                "failed": out["failed"],
            }
            print(f"{label} plain lm-eval: {seconds:.1f} s, GPU busy {busy}", flush=True)
        out, seconds, busy = fast_side(model, tok, specs, limit, cache, args.batch_tokens)
        row["fast"] = {
            "seconds": round(seconds, 1),
            "gpu_busy": busy,
            "tasks": {
                k: {
                    key: v[key]
                    for key in (
                        "acc",
                        "acc_norm",
                        "seconds",
                        "requests",
                        "requests_per_s",
                        "prepare_seconds",
                        "prepared",
                    )
                    if key in v
                }
                for k, v in out["tasks"].items()
            },
            "failed": out["failed"],
        }
        print(f"{label} fast path: {seconds:.1f} s, GPU busy {busy}", flush=True)
        for k, v in out["tasks"].items():
            print(
                f"  {k}: acc {v['acc']:.4f}  {v['seconds']:.2f} s  {v['requests']} requests  "
                f"{v['requests_per_s']:.0f}/s  prepared {v['prepared']} in {v['prepare_seconds']:.1f} s",
                flush=True,
            )
        t0 = time.perf_counter()
        ppl = perplexity_of_ids(model, text_ids(tok, text), seq_len=seq_len, max_windows=None, progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        row["perplexity"] = {
            "ppl": round(ppl["perplexity"], 3),
            "windows": ppl["windows"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if "plain" in row:
            row["same_acc_all_tasks"] = all(
                row["plain"]["tasks"][k]["acc"] == row["fast"]["tasks"][k]["acc"] for k in row["fast"]["tasks"]
            )
        print(f"{label} perplexity: {row['perplexity']}", flush=True)
        if args.parity:
            row["parity"] = parity(model, tok, specs, limit)
        rows.append(row)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()} CPU",
        "model": args.model,
        "dtype": args.dtype,
        "limit": args.limit,
        "torch": torch.__version__,
        "skipped": skipped,
        "rows": rows,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
