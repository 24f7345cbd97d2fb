"""Run lm-evaluation-harness zero-shot on an already-loaded model, one task at a time.

Tasks run one by one through the same lm-eval model wrapper so that each gets its own
timing and a task lm-eval cannot score on this model (a continuation longer than the
context window, as PIQA's longest answers are for a 512-token model) is recorded as
failed with its reason instead of taking the other tasks down with it.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("selfcal.evaluate")

# lm-eval's "auto" finds the largest batch by catching CUDA out-of-memory errors; a CPU
# has no such signal (the process is killed instead), so on CPU "auto" means this.
CPU_AUTO_BATCH = 16
GPU_MAX_AUTO_BATCH = 256


def effective_batch_size(batch_size: int | str, device: str) -> int | str:
    if batch_size != "auto":
        return int(batch_size)
    return "auto" if str(device).startswith("cuda") else CPU_AUTO_BATCH


def task_name(spec) -> str:
    return spec["task"] if isinstance(spec, dict) else spec


def _one_task(lm, spec, *, limit: int | None, seed: int) -> dict:
    from lm_eval import simple_evaluate

    from selfcal.evaluation.tasks import task_manager

    name = task_name(spec)
    t0 = time.perf_counter()
    out = simple_evaluate(
        model=lm,
        tasks=[spec],
        num_fewshot=0,
        limit=limit,
        log_samples=False,
        bootstrap_iters=1000,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        task_manager=task_manager(),
    )
    seconds = time.perf_counter() - t0
    r = out["results"][name]
    n = out.get("n-samples", {}).get(name, {})
    return {
        "acc": r.get("acc,none"),
        "acc_stderr": r.get("acc_stderr,none"),
        "acc_norm": r.get("acc_norm,none"),
        "n": n.get("effective"),
        "n_total": n.get("original"),
        "seconds": round(seconds, 3),
        "examples_per_s": round(n["effective"] / seconds, 2) if n.get("effective") else None,
        # lm-eval's "auto" stores what it found per request schedule.
        "batch_size": max(lm.batch_sizes.values()) if getattr(lm, "batch_sizes", None) else lm.batch_size,
    }


def run_tasks(
    model,
    tokenizer,
    specs: list,
    *,
    limit: int | None,
    batch_size: int | str,
    seed: int = 1234,
) -> dict:
    """Zero-shot ``acc`` (stderr, counts, timings) per task; ``specs`` from ``resolve_tasks``.

    A task lm-eval refuses (its assertion on over-long continuations) lands in
    ``failed`` with the reason; any other error propagates, naming the task.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    batch = effective_batch_size(batch_size, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, max_batch_size=GPU_MAX_AUTO_BATCH)
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        name = task_name(spec)
        log.info("task %d/%d: %s (limit %s, batch %s)", i, len(specs), name, limit, batch)
        try:
            results[name] = _one_task(lm, spec, limit=limit, seed=seed)
        except AssertionError:
            failed[name] = f"lm-eval cannot score it: a request exceeds the model's {lm.max_length}-token context"
            log.warning("%s failed: %s", name, failed[name])
            continue
        except Exception as err:  # noqa: BLE001 - re-raised with the task's name
            raise RuntimeError(
                f"task {name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            ) from err
        log.info(
            "%s: acc %.4f on %s examples in %.1f s",
            name,
            results[name]["acc"] or float("nan"),
            results[name]["n"],
            results[name]["seconds"],
        )
    return {
        "tasks": results,
        "failed": failed,
        "batch_size": batch,
        "seconds": round(time.perf_counter() - t0, 3),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }


def run_tasks_fast(
    model,
    tokenizer,
    specs: list,
    *,
    limit: int | None,
    cache_dir=None,
    batch_tokens: int | None = None,
    progress: bool = False,
) -> dict:
    """The same per-task record as ``run_tasks``, through the fast path (``selfcal.evaluation.fast``): lm-eval's
    requests prepared once per tokenizer (kept in ``cache_dir``), scored in full batches on the device."""
    import lm_eval

    from selfcal.evaluation import fast
    from selfcal.evaluation.prepared import prepared

    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        name = task_name(spec)
        t_prep = time.perf_counter()
        task, how = prepared(spec, tokenizer, limit=limit, cache_dir=cache_dir)
        prep = time.perf_counter() - t_prep
        log.info(
            "task %d/%d: %s: %d requests for %d documents (%s in %.1f s)",
            i,
            len(specs),
            name,
            task.n_requests,
            task.n_docs,
            how,
            prep,
        )
        try:
            scored = fast.run_task(model, tokenizer, task, batch_tokens=batch_tokens, progress=progress)
        except fast.ContextTooLong:
            failed[name] = (
                f"lm-eval cannot score it: a request exceeds the model's {fast.max_length(model, tokenizer)}-token "
                "context"
            )
            log.warning("%s failed: %s", name, failed[name])
            continue
        results[name] = {**scored, "prepare_seconds": round(prep, 3), "prepared": how}
        log.info(
            "%s: acc %.4f on %d examples in %.1f s (%.0f requests/s)",
            name,
            float("nan") if scored["acc"] is None else scored["acc"],
            scored["n"],
            scored["seconds"],
            scored["requests_per_s"] or 0,
        )
    return {
        "tasks": results,
        "failed": failed,
        "batch_size": f"{batch_tokens or 'auto'} tokens",
        "seconds": round(time.perf_counter() - t0, 3),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
    }
