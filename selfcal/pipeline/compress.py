"""Step 2: compress the base model with one calibration set and one method."""

from __future__ import annotations

import logging
import os

from selfcal import faults
from selfcal.calibration.calibset import load_calibration_set
from selfcal.compression.apply import compress as apply_compression
from selfcal.compression.apply import plan
from selfcal.config import Params
from selfcal.errors import ConfigError
from selfcal.lineage import tags as T
from selfcal.lineage.registry import log_calibration, register_checkpoint
from selfcal.lineage.tracking import stage_run
from selfcal.modelio import fingerprint, load_model, load_tokenizer, pick_device
from selfcal.pipeline import layout
from selfcal.pipeline.common import base_model
from selfcal.records import CalibrationRef, CheckpointManifest

log = logging.getLogger("selfcal.compress")


def compress(params: Params, source: str, seed: int, method: str) -> CheckpointManifest:
    if method not in params.compression.methods:
        raise ConfigError(f"compression.methods: {method!r} is not listed ({params.compression.methods})")
    ref, config = base_model(params)
    the_plan = plan(method, params.compression, config)
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
        if the_plan.skipped_layers:
            log.warning(
                "%d layer(s) left dense (group size does not divide them): %s",
                len(the_plan.skipped_layers),
                ", ".join(the_plan.skipped_layers),
            )
        log.info(
            "compressing %s with %s on %d x %d calibration tokens (%s)",
            ref.name,
            method,
            calib.n,
            calib.seq_len,
            device,
        )
        model = load_model(
            ref, dtype=params.model.dtype, device=device, trust_remote_code=params.model.trust_remote_code
        )
        tokenizer = load_tokenizer(ref, trust_remote_code=params.model.trust_remote_code)
        manifest = apply_compression(
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
                path=os.path.relpath(calib_dir, params.root),
                n_samples=calib.n,
                seq_len=calib.seq_len,
            ),
            device=device,
        )
        faults.point("compress:before-register")
        log.info("wrote %s in %.1fs", out, manifest.compress_seconds)
        run.params(
            {
                "method": method,
                "method_params": manifest.method_params,
                "calibration": layout.calib_name(source, seed),
                "model": ref.name,
            }
        )
        run.tags(
            {
                T.CALIBRATION_DIGEST: calib.digest,
                T.BASE_DIGEST: base.digest,
                T.CHECKPOINT_DIGEST: manifest.content_digest,
                T.METHOD: method,
            }
        )
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
