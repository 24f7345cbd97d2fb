"""Step 2: compress the base model with one calibration set and one method."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from selfcal import faults
from selfcal.calibration.calibset import load_calibration_set
from selfcal.compression.apply import Plan, plan
from selfcal.compression.apply import compress as apply_compression
from selfcal.config import Params
from selfcal.errors import ConfigError
from selfcal.lineage import tags as T
from selfcal.lineage.registry import base_label, code_digest, log_calibration, register_checkpoint, registered_name
from selfcal.lineage.tracking import stage_run
from selfcal.modelio import ModelRef, fingerprint, load_model, load_tokenizer, pick_device
from selfcal.pipeline import layout
from selfcal.pipeline.common import base_model, check_seed
from selfcal.records import CalibrationRef, CheckpointManifest

log = logging.getLogger("selfcal.compress")


@dataclass(frozen=True)
class CompressPlan:
    ref: ModelRef
    config: dict
    plan: Plan


def preflight(params: Params, source: str, seed: int, method: str) -> CompressPlan:
    """Everything compress checks before a model loads (``selfcal check`` runs it for every item): the method's
    static layer plan from the config's shapes, and the name the checkpoint will be registered under."""
    if method not in params.compression.methods:
        raise ConfigError(f"compression.methods: {method!r} is not listed ({params.compression.methods})")
    check_seed(params, seed)
    ref, config = base_model(params)
    the_plan = plan(method, params.compression, config)
    if params.tracking.enabled:  # refused now, not after the compression
        name = params.tracking.registered_model_name
        registered_name(name, base=base_label(ref, params.root), method=method, source=source, seed=seed)
    return CompressPlan(ref=ref, config=config, plan=the_plan)


def compress(params: Params, source: str, seed: int, method: str) -> CheckpointManifest:
    planned = preflight(params, source, seed, method)
    ref, the_plan = planned.ref, planned.plan
    calib_dir = layout.calibration_dir(params, source, seed)
    calib = load_calibration_set(calib_dir)
    base = fingerprint(ref)
    made_with = calib.manifest.model.digest
    if made_with != base.digest:
        # Token ids only mean something under the tokenizer that made them, and
        # self-generated data is only "self" for the model that wrote it.
        raise ConfigError(
            f"model.path: calibration set {layout.calib_name(source, seed)} was made with a different "
            "model; re-run generate"
        )
    device = pick_device(params.model.device)
    out = layout.checkpoint_dir(params, source, seed, method)
    item = layout.checkpoint_name(source, seed, method)
    with stage_run(params, "compress", item) as run:
        manifest = stranded_checkpoint(run, out, the_plan, calib_digest=calib.digest, base=base, device=device)
        if manifest is not None:
            log.info(
                "%s: a complete checkpoint (%s) from an earlier compress run that never registered it, with these "
                "params, calibration set, base model, libraries and code: registering it without recomputing",
                layout.shown(out, params),
                manifest.content_digest[:16],
            )
        else:
            manifest = _compress(params, ref, the_plan, calib, (source, seed), out, base=base, device=device)
            log.info("wrote %s in %.1fs", out, manifest.compress_seconds)
        run.tags({T.CHECKPOINT_DIGEST: manifest.content_digest, T.CODE_DIGEST: code_digest()})
        faults.point("compress:before-register")
        run.params(
            {
                "method": method,
                "method_params": manifest.method_params,
                "calibration": layout.calib_name(source, seed),
                "model": ref.name,
            }
        )
        run.tags({T.CALIBRATION_DIGEST: calib.digest, T.BASE_DIGEST: base.digest, T.METHOD: method})
        run.metrics({"compress_seconds": manifest.compress_seconds})
        run.artifact(out / "manifest.json", "checkpoint")
        log_calibration(run, layout.calib_name(source, seed), calib_dir, calib.digest, context="calibration")
        register_checkpoint(
            run,
            params,
            ref=ref,
            base=base,
            checkpoint=out,
            manifest=manifest,
            calib=calib.manifest,
            calib_dir=calib_dir,
            calib_name=layout.calib_name(source, seed),
        )
    return manifest


def _compress(params: Params, ref, the_plan, calib, item: tuple[str, int], out, *, base, device) -> CheckpointManifest:
    source, seed = item
    if the_plan.skipped_layers:
        log.warning(
            "%d layer(s) left dense (group size does not divide them): %s",
            len(the_plan.skipped_layers),
            ", ".join(the_plan.skipped_layers),
        )
    log.info(
        "compressing %s with %s on %d x %d calibration tokens (%s)",
        ref.name,
        the_plan.method.name,
        calib.n,
        calib.seq_len,
        device,
    )
    model = load_model(ref, dtype=params.model.dtype, device=device, trust_remote_code=params.model.trust_remote_code)
    tokenizer = load_tokenizer(ref, trust_remote_code=params.model.trust_remote_code)
    return apply_compression(
        model,
        tokenizer,
        calib.tokens,
        the_plan,
        out,
        base_dir=ref.local_dir,
        base_model=base,
        calibration=CalibrationRef(
            digest=calib.digest,
            source=source,
            seed=seed,
            path=os.path.relpath(layout.calibration_dir(params, source, seed), params.root),
            n_samples=calib.n,
            seq_len=calib.seq_len,
        ),
        device=device,
    )


def stranded_checkpoint(run, out, the_plan, *, calib_digest: str, base, device: str) -> CheckpointManifest | None:
    """The checkpoint in ``out``, if an earlier compress run wrote it completely and then failed to register it
    (a tracking server down, a kill just after the rename), and this run would make exactly it again: the same
    method params, calibration set, base model, device, library versions and selfcal code. Registering that
    one costs seconds; recomputing it costs the whole compression. Anything less certain is recomputed."""
    from selfcal.artifacts import intact, library_versions

    if run.run_id is None or not out.is_dir():
        return None  # tracking off: nothing is registered, so nothing is stranded
    manifest = intact(out, CheckpointManifest)
    if manifest is None:
        return None
    same = (
        manifest.method == the_plan.method.name
        and manifest.method_params == the_plan.section.model_dump(mode="json")
        and manifest.calibration.digest == calib_digest
        and manifest.base_model.digest == base.digest
        and manifest.device == device
        and manifest.versions == library_versions()
    )
    digest = manifest.content_digest
    if not same or run.find_model_version(T.CHECKPOINT_DIGEST, digest) is not None:
        return None
    if not run.find_runs({T.STAGE: "compress", T.CHECKPOINT_DIGEST: digest, T.CODE_DIGEST: code_digest()}):
        return None
    return manifest
