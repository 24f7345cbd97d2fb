"""Step 3: score one model (the dense base or a checkpoint) on tasks and perplexity."""

from __future__ import annotations

import json
import logging
import time

from selfcal.artifacts import atomic_write_text, read_manifest
from selfcal.config import Params
from selfcal.errors import ConfigError, DataError
from selfcal.evaluation.harness import run_tasks
from selfcal.evaluation.perplexity import perplexity_of_file
from selfcal.evaluation.tasks import resolve_tasks
from selfcal.modelio import ModelRef, context_window, fingerprint, load_model, load_tokenizer, pick_device
from selfcal.pipeline import layout
from selfcal.pipeline.common import base_model, check_context
from selfcal.tracking import stage_run

log = logging.getLogger("selfcal.evaluate")
_PPL_CAP = 2048


def _target(params: Params, name: str) -> tuple[ModelRef, dict, dict]:
    """(model to load, identity fields for the metrics file, model config)."""
    ref, config = base_model(params)
    if name == layout.DENSE:
        return ref, {"method": "none", "source": "none", "seed": None, "model_digest": fingerprint(ref)["digest"]}, config
    ckpt = params.artifacts_dir / "checkpoints" / name
    if not ckpt.is_dir():
        raise DataError(f"{ckpt}: checkpoint not found (run the compress stage first)")
    m = read_manifest(ckpt)
    ident = {
        "method": m["method"],
        "source": m["calibration"]["source"],
        "seed": m["calibration"]["seed"],
        "calibration_digest": m["calibration"]["digest"],
        "checkpoint_digest": m["content_digest"],
        "model_digest": m["base_model"]["digest"],
    }
    return ModelRef(name=name, local_dir=ckpt), ident, config


def evaluate(params: Params, name: str, *, progress: bool = True) -> dict:
    ev = params.evaluation
    ref, ident, config = _target(params, name)
    data_dir = params.resolve(ev.data_dir) if ev.data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise ConfigError(f"evaluation.data_dir: {data_dir} is not a directory")
    ppl_len = None
    if ev.perplexity:
        ppl_len = ev.perplexity.seq_len or min(context_window(config) or _PPL_CAP, _PPL_CAP)
        check_context(config, ppl_len, "evaluation.perplexity.seq_len")
        if not params.resolve(ev.perplexity.path).is_file():
            raise DataError(f"evaluation.perplexity.path: {params.resolve(ev.perplexity.path)} not found")
    specs, skipped = resolve_tasks(ev.tasks, data_dir)
    for task, why in skipped.items():
        log.warning("%s skipped: %s", task, why)
    device = pick_device(params.model.device)
    with stage_run(params, "evaluate", name) as run:
        log.info("evaluating %s on %s", name, device)
        try:
            model = load_model(ref, dtype=params.model.dtype, device=device, trust_remote_code=params.model.trust_remote_code)
            tokenizer = load_tokenizer(ref, trust_remote_code=params.model.trust_remote_code)
        except (OSError, ValueError) as err:
            raise DataError(f"{ref.load_id}: model does not load: {str(err).splitlines()[0]}") from None
        t0 = time.perf_counter()
        result: dict = {"name": name, **ident, "device": device}
        if skipped:
            result["skipped_tasks"] = skipped
        if specs:
            result["zero_shot"] = run_tasks(model, tokenizer, specs, limit=ev.limit, batch_size=ev.batch_size)
            accs = [t["acc"] for t in result["zero_shot"]["tasks"].values() if t["acc"] is not None]
            result["mean_acc"] = sum(accs) / len(accs) if accs else None
        if ev.perplexity:
            result["perplexity"] = perplexity_of_file(
                model, tokenizer, params.resolve(ev.perplexity.path), seq_len=ppl_len, max_windows=ev.perplexity.max_windows, progress=progress
            )
        result["wall_seconds"] = round(time.perf_counter() - t0, 3)
        out = layout.metrics_file(params, name)
        atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
        log.info("wrote %s", out)
        metrics = {f"acc.{t}": v["acc"] for t, v in result.get("zero_shot", {}).get("tasks", {}).items()}
        metrics["mean_acc"] = result.get("mean_acc")
        if "perplexity" in result:
            metrics["perplexity"] = result["perplexity"]["perplexity"]
        run.metrics(metrics)
        run.tags({k: v for k, v in ident.items() if k.endswith("digest") or k == "method"})
        run.artifact(out, "metrics")
    return result
