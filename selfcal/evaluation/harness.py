"""Run lm-evaluation-harness zero-shot on an already-loaded model."""

from __future__ import annotations

import time
from pathlib import Path

from selfcal.evaluation.tasks import local_task_config


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    *,
    data_dir: Path | None,
    limit: int | None,
    batch_size: int | str,
    seed: int = 1234,
) -> dict:
    """Zero-shot ``acc`` (and stderr, counts, timings) per task; hub names when data_dir is None."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs = [local_task_config(t, data_dir) if data_dir else t for t in tasks]
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
    for name in tasks:
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
