"""Step 3: score one model (the dense base or a checkpoint) on tasks and perplexity."""

from __future__ import annotations

import json
import logging
import time

from selfcal.artifacts import atomic_write_text, read_manifest
from selfcal.config import Params
from selfcal.errors import ConfigError, DataError
from selfcal.evaluation.harness import run_tasks
from selfcal.evaluation.perplexity import perplexity_of_text, read_perplexity_text
from selfcal.evaluation.tasks import resolve_tasks
from selfcal.lineage.registry import link_evaluation
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
    # Read every perplexity text now: a missing file fails before the model loads.
    ppl_sets: dict[str, tuple[str, int]] = {}
    for set_name, cfg in ev.perplexity.items():
        key = f"evaluation.perplexity.{set_name}"
        seq_len = cfg.seq_len or min(context_window(config) or _PPL_CAP, _PPL_CAP)
        check_context(config, seq_len, f"{key}.seq_len")
        text = read_perplexity_text(
            cfg.path, root=params.root, text_field=cfg.text_field, hub_config=cfg.hub_config,
            hub_split=cfg.hub_split, max_documents=cfg.max_documents, key=f"{key}.path",
        )
        ppl_sets[set_name] = (text, seq_len)
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
            zs = run_tasks(model, tokenizer, specs, limit=ev.limit, batch_size=ev.batch_size)
            result["zero_shot"] = zs
            accs = [t["acc"] for t in zs["tasks"].values() if t["acc"] is not None]
            result["mean_acc"] = sum(accs) / len(accs) if accs else None
            result["mean_acc_tasks"] = sorted(t for t, v in zs["tasks"].items() if v["acc"] is not None)
        for set_name, (text, seq_len) in ppl_sets.items():
            cfg = ev.perplexity[set_name]
            log.info("perplexity %s: windows of %d tokens", set_name, seq_len)
            t_ppl = time.perf_counter()
            ppl = perplexity_of_text(model, tokenizer, text, seq_len=seq_len, max_windows=cfg.max_windows, progress=progress)
            result.setdefault("perplexity", {})[set_name] = {**ppl, "source": cfg.path, "seconds": round(time.perf_counter() - t_ppl, 3)}
        result["wall_seconds"] = round(time.perf_counter() - t0, 3)
        out = layout.metrics_file(params, name)
        atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
        log.info("wrote %s", out)
        metrics = {f"acc.{t}": v["acc"] for t, v in result.get("zero_shot", {}).get("tasks", {}).items()}
        metrics["mean_acc"] = result.get("mean_acc")
        for set_name, ppl in result.get("perplexity", {}).items():
            metrics[f"perplexity.{set_name}"] = ppl["perplexity"]
        # A checkpoint's metrics also land on the LoggedModel of its registered version.
        version = link_evaluation(run, ident["checkpoint_digest"], out) if "checkpoint_digest" in ident else None
        run.metrics(metrics, model_id=version.model_id if version else None)
        run.tags({k: v for k, v in ident.items() if k.endswith("digest") or k == "method"})
        run.artifact(out, "metrics")
    return result
