"""Run lm-evaluation-harness zero-shot on an already-loaded model."""

from __future__ import annotations

import time

def run_tasks(
    model,
    tokenizer,
    specs: list,
    *,
    limit: int | None,
    batch_size: int | str,
    seed: int = 1234,
) -> dict:
    """Zero-shot ``acc`` (and stderr, counts, timings) per task; ``specs`` from ``resolve_tasks``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    t0 = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=specs,
        num_fewshot=0,
        limit=limit,
        log_samples=False,
        bootstrap_iters=1000,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    seconds = time.perf_counter() - t0
    results = {}
    for name in [spec["task"] if isinstance(spec, dict) else spec for spec in specs]:
        r = out["results"][name]
        n = out.get("n-samples", {}).get(name, {})
        results[name] = {
            "acc": r.get("acc,none"),
            "acc_stderr": r.get("acc_stderr,none"),
            "acc_norm": r.get("acc_norm,none"),
            "n": n.get("effective"),
            "n_total": n.get("original"),
        }
    return {"tasks": results, "seconds": round(seconds, 3), "lm_eval_version": out.get("lm_eval_version")}
