"""Step 3: score one model (the dense base or a checkpoint) on tasks and perplexity."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from selfcal.artifacts import atomic_write_text, read_manifest
from selfcal.config import Params
from selfcal.errors import ConfigError, DataError
from selfcal.evaluation.harness import run_tasks, run_tasks_fast
from selfcal.evaluation.perplexity import check_one_window, perplexity_of_ids, read_perplexity_text, text_ids
from selfcal.evaluation.tasks import missing_task_files, resolve_tasks
from selfcal.lineage.registry import link_evaluation
from selfcal.lineage.tags import EVALUATION_ARTIFACTS
from selfcal.lineage.tracking import stage_run
from selfcal.modelio import ModelRef, context_window, fingerprint, load_model, load_tokenizer, pick_device
from selfcal.pipeline import layout
from selfcal.pipeline.common import base_model, check_context
from selfcal.records import CheckpointManifest, EvaluationRecord, PerplexityScore, ZeroShot, dump_record

log = logging.getLogger("selfcal.evaluate")
# Perplexity windows when the params give no seq_len: the model's context, at most this.
PPL_CAP = 2048


@dataclass(frozen=True)
class EvaluatePlan:
    data_dir: Path | None
    ppl_seq_len: dict[str, int]  # perplexity set -> window length


def preflight(params: Params, *, count_windows: bool = False) -> EvaluatePlan:
    """Everything an evaluate item (dense or a checkpoint) checks before a model loads (``selfcal check`` runs
    it): every listed task's file under data_dir, each perplexity window within the context; with
    ``count_windows`` (``selfcal check``), each local perplexity text tokenized, once per process, to know it
    fills one window (the stage itself counts the ids it scores, before the model loads)."""
    ev = params.evaluation
    _, config = base_model(params)
    data_dir = params.resolve(ev.data_dir) if ev.data_dir else None
    if data_dir is not None and ev.tasks:
        if not data_dir.is_dir():
            raise ConfigError(f"evaluation.data_dir: {ev.data_dir} does not exist (or is not a folder)")
        missing = missing_task_files(ev.tasks, data_dir)
        if missing:
            listed = ", ".join(f"{name} ({file})" for name, file in missing)
            raise ConfigError(
                f"evaluation.data_dir: {ev.data_dir} has no data for {len(missing)} listed task(s): {listed}; "
                "add the files or drop the tasks from evaluation.tasks"
            )
    seq_lens = {}
    for name, cfg in ev.perplexity.items():
        seq_len = cfg.seq_len or min(context_window(config) or PPL_CAP, PPL_CAP)
        check_context(config, seq_len, f"evaluation.perplexity.{name}.seq_len")
        seq_lens[name] = seq_len
        if count_windows and params.resolve(cfg.path).exists():
            check_one_window(_ppl_tokens(params, name), seq_len, f"evaluation.perplexity.{name}")
    return EvaluatePlan(data_dir=data_dir, ppl_seq_len=seq_lens)


def _read_ppl_text(params: Params, name: str) -> str:
    cfg = params.evaluation.perplexity[name]
    return read_perplexity_text(
        cfg.path,
        root=params.root,
        text_field=cfg.text_field,
        hub_config=cfg.hub_config,
        hub_split=cfg.hub_split,
        max_documents=cfg.max_documents,
        key=f"evaluation.perplexity.{name}.path",
    )


def _ppl_tokens(params: Params, name: str) -> int:
    from selfcal.textdata import cached_token_count

    ref, _ = base_model(params)
    cfg = params.evaluation.perplexity[name]

    def count() -> int:
        tokenizer = load_tokenizer(ref, trust_remote_code=params.model.trust_remote_code)
        return int(text_ids(tokenizer, _read_ppl_text(params, name)).numel())

    return cached_token_count(params.resolve(cfg.path), ("perplexity", cfg.text_field, str(ref.local_dir)), count)


def _present(params: Params, shown: int = 6) -> str:
    """What a mistyped target could have been: the checkpoints present, so the one-line error
    answers "which names are there?" without a second command."""
    root = layout.checkpoints_root(params)
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not names:
        return f"no checkpoint is there yet; '{layout.DENSE}' evaluates the base model"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"present: {', '.join(names[:shown])}{more}, or '{layout.DENSE}'"


def _target(params: Params, name: str) -> tuple[ModelRef, dict]:
    """(model to load, identity fields of its evaluation record)."""
    ref, _ = base_model(params)
    if name == layout.DENSE:
        return ref, {"method": "none", "source": "none", "seed": None, "model_digest": fingerprint(ref).digest}
    ckpt = layout.checkpoint_path(params, name)
    if not ckpt.is_dir():
        raise DataError(f"{ckpt}: checkpoint not found (run the compress stage first; {_present(params)})")
    m = read_manifest(ckpt, CheckpointManifest)
    ident = {
        "method": m.method,
        "source": m.calibration.source,
        "seed": m.calibration.seed,
        "calibration_digest": m.calibration.digest,
        "checkpoint_digest": m.content_digest,
        "model_digest": m.base_model.digest,
    }
    return ModelRef(name=name, local_dir=ckpt), ident


def evaluate(params: Params, name: str, *, progress: bool = True) -> EvaluationRecord:
    ev = params.evaluation
    ref, ident = _target(params, name)
    planned = preflight(params)
    data_dir = planned.data_dir
    try:
        tokenizer = load_tokenizer(ref, trust_remote_code=params.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise DataError(f"{ref.load_id}: tokenizer does not load: {str(err).splitlines()[0]}") from None
    # Every perplexity text read and tokenized now: a missing file, or one short of a window, fails before the
    # model loads (not after the zero-shot tasks).
    ppl_sets: dict[str, tuple[object, int]] = {}
    for set_name in ev.perplexity:
        seq_len = planned.ppl_seq_len[set_name]
        ids = text_ids(tokenizer, _read_ppl_text(params, set_name))
        check_one_window(int(ids.numel()), seq_len, f"evaluation.perplexity.{set_name}")
        ppl_sets[set_name] = (ids, seq_len)
    specs, skipped = resolve_tasks(ev.tasks, data_dir, root=params.root)
    for task, why in skipped.items():
        log.warning("%s skipped: %s", task, why)
    device = pick_device(params.model.device)
    with stage_run(params, "evaluate", name) as run:
        log.info("evaluating %s on %s", name, device)
        try:
            model = load_model(
                ref, dtype=params.model.dtype, device=device, trust_remote_code=params.model.trust_remote_code
            )
        except (OSError, ValueError) as err:
            raise DataError(f"{ref.load_id}: model does not load: {str(err).splitlines()[0]}") from None
        t0 = time.perf_counter()
        zero_shot, mean_acc, mean_tasks = None, None, []
        if specs:
            if ev.engine == "fast":
                tokens = None if ev.batch_tokens == "auto" else ev.batch_tokens
                scored = run_tasks_fast(
                    model,
                    tokenizer,
                    specs,
                    limit=ev.limit,
                    cache_dir=layout.prepared_dir(params),
                    batch_tokens=tokens,
                    progress=progress,
                )
            else:
                scored = run_tasks(model, tokenizer, specs, limit=ev.limit, batch_size=ev.batch_size)
            zero_shot = ZeroShot.model_validate({**scored, "engine": ev.engine})
            scored = {t: s.acc for t, s in zero_shot.tasks.items() if s.acc is not None}
            mean_acc = sum(scored.values()) / len(scored) if scored else None
            mean_tasks = sorted(scored)
        perplexities = {}
        for set_name, (ids, seq_len) in ppl_sets.items():
            cfg = ev.perplexity[set_name]
            log.info("perplexity %s: windows of %d tokens", set_name, seq_len)
            t_ppl = time.perf_counter()
            ppl = perplexity_of_ids(model, ids, seq_len=seq_len, max_windows=cfg.max_windows, progress=progress)
            perplexities[set_name] = PerplexityScore(
                **ppl, source=cfg.path, seconds=round(time.perf_counter() - t_ppl, 3)
            )
        record = EvaluationRecord(
            name=name,
            **ident,
            device=device,
            zero_shot=zero_shot,
            skipped_tasks=skipped,
            perplexity=perplexities,
            mean_acc=mean_acc,
            mean_acc_tasks=mean_tasks,
            wall_seconds=round(time.perf_counter() - t0, 3),
        )
        out = write_evaluation(params, record)
        metrics = record.metrics()
        # A checkpoint's metrics also land on the LoggedModel of its registered version.
        version = link_evaluation(run, record.checkpoint_digest, out) if record.checkpoint_digest else None
        run.metrics(metrics, model_id=version.model_id if version else None)
        # what the numbers mean (an audit: `lineage` showed 40- and 10-item accuracies alike, with no limit)
        run.params(evaluation_settings(params))
        run.tags({k: v for k, v in ident.items() if k.endswith("digest") or k == "method"})
        run.artifact(out, EVALUATION_ARTIFACTS)
    return record


def evaluation_settings(params: Params) -> dict:
    """The evaluation params an evaluate run logs (``evaluation.limit`` …), as ``selfcal lineage`` shows them
    beside the metrics they produced."""
    return {"evaluation": params.evaluation.model_dump(mode="json")}


def write_evaluation(params: Params, record: EvaluationRecord) -> Path:
    """The one writer: the full record (evaluations/NAME.json) and its flat metrics, under the names
    MLflow and the report use too (metrics/NAME.json, what DVC's ``metrics`` declare)."""
    out = layout.evaluation_file(params, record.name)
    atomic_write_text(out, dump_record(record))
    atomic_write_text(
        layout.metrics_file(params, record.name), json.dumps(record.metrics(), indent=2, sort_keys=True) + "\n"
    )
    log.info("wrote %s and %s", out, layout.metrics_file(params, record.name))
    return out
