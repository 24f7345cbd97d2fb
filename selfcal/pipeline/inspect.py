"""Diagnostics of calibration sets: is a set any good, before GPU hours go into it?"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from selfcal import textdata
from selfcal.artifacts import atomic_write_text
from selfcal.calibration import corpus, diagnostics
from selfcal.calibration.calibset import load_calibration_set
from selfcal.config import Params
from selfcal.lineage import tags as T
from selfcal.lineage.tracking import stage_run
from selfcal.modelio import ModelRef, load_model, load_tokenizer, pick_device
from selfcal.pipeline import layout

log = logging.getLogger("selfcal.inspect")


REFERENCE_KEY = "calibration.diagnostics.reference_path"


def _reference_stream(path: str, tokenizer, *, root: Path, text_field: str, key: str = REFERENCE_KEY):
    docs = textdata.read_documents(path, root=root, text_field=text_field, key=key)
    return textdata.token_stream(docs, tokenizer)


def reference_windows(
    path: str,
    tokenizer,
    *,
    n: int,
    seq_len: int,
    root: Path,
    text_field: str = "text",
    stride: int | None = None,
    key: str = REFERENCE_KEY,
):
    """Block 0 of the reference's windows (every ``stride`` tokens; back to back when None); errors name ``key``
    (the params key, or ``--reference`` where the command line gave the file)."""
    stream = _reference_stream(path, tokenizer, root=root, text_field=text_field, key=key)
    chosen, _ = corpus.pick_windows(textdata.windows(stream, seq_len, stride), n, 0, allow_overlap=False, name=key)
    return chosen


def preflight(params: Params) -> None:
    """What inspect reads before a model loads: the reference, if any, gives n x seq_len windows for the largest set
    (tokenized once per process; ``selfcal check`` runs it so a short reference fails there, in one line)."""
    diag = params.calibration.diagnostics
    if not diag.reference_path:
        return
    path = params.resolve(diag.reference_path)
    if not path.exists():
        return  # a hub dataset: check_local_files says whether it can be reached
    from selfcal.pipeline.common import base_model

    ref, _ = base_model(params)

    def count() -> int:
        tokenizer = load_tokenizer(ref, trust_remote_code=params.model.trust_remote_code)
        stream = _reference_stream(
            diag.reference_path, tokenizer, root=params.root, text_field=diag.reference_text_field
        )
        return int(len(stream))

    tokens = textdata.cached_token_count(path, (diag.reference_text_field, str(ref.local_dir)), count)
    cal = params.calibration
    corpus.check_windows(
        textdata.window_count(tokens, cal.seq_len, diag.window_stride),
        max(cal.samples_for(s) for s in cal.sources),  # each set is compared with as many reference windows
        0,
        allow_overlap=False,
        name=REFERENCE_KEY,
        seq_len=cal.seq_len,
    )


def inspect_set(
    calib_dir: Path,
    ref: ModelRef,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    reference_path: str | None = None,
    reference_text_field: str = "text",
    root: Path = Path("."),
    batch_size: int = 8,
    trust_remote_code: bool = False,
    reference_stride: int | None = None,
    reference_key: str = REFERENCE_KEY,
    progress: bool = False,
) -> dict:
    """Text measures, perplexity under the model and (with a reference) activation distance; with ``progress``
    a bar over each pass of the model (the set's perplexity, its activations, the reference's)."""
    calib = load_calibration_set(calib_dir)
    tokenizer = load_tokenizer(ref, trust_remote_code=trust_remote_code)
    reference = None
    if reference_path:  # cut first: a reference too short for the set fails before the model loads
        reference = reference_windows(
            reference_path,
            tokenizer,
            n=calib.n,
            seq_len=calib.seq_len,
            root=root,
            text_field=reference_text_field,
            stride=reference_stride,
            key=reference_key,
        )
    model = load_model(ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    start = calib.manifest.provenance.get("start_token_id")
    result = {
        "calibration": calib_dir.name,
        "calibration_digest": calib.digest,
        "source": calib.manifest.source,
        "kind": calib.manifest.source_params.get("kind"),
        **diagnostics.text_measures(calib.tokens, len(tokenizer), start),
        **diagnostics.set_perplexity(model, calib.tokens, batch_size, progress=progress),
    }
    if reference is not None:
        result["activation"] = {
            "reference": reference_path,
            **diagnostics.activation_distance(
                diagnostics.layer_input_stats(
                    model, calib.tokens, batch_size, progress=progress, desc="set activations"
                ),
                diagnostics.layer_input_stats(
                    model, reference, batch_size, progress=progress, desc="reference activations"
                ),
            ),
        }
    return result


def inspect_stage(params: Params, source: str, seed: int, *, progress: bool = True) -> dict:
    from selfcal.pipeline.common import base_model, check_seed, check_source

    check_source(params, source)  # before the stage's MLflow run: a refused call leaves none
    check_seed(params, seed)
    ref, _ = base_model(params)
    diag = params.calibration.diagnostics
    name = layout.calib_name(source, seed)
    with stage_run(params, "inspect", name) as run:
        result = inspect_set(
            layout.calibration_dir(params, source, seed),
            ref,
            device=pick_device(params.model.device),
            dtype=params.model.dtype,
            reference_path=diag.reference_path,
            reference_text_field=diag.reference_text_field,
            root=params.root,
            batch_size=diag.batch_size,
            trust_remote_code=params.model.trust_remote_code,
            reference_stride=diag.window_stride,
            progress=progress,
        )
        out = layout.diagnostics_file(params, name)
        atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
        log.info("wrote %s", out)
        run.metrics({k: v for k, v in result.items() if isinstance(v, (int, float))})
        if "activation" in result:
            run.metrics({f"activation.{k}": v for k, v in result["activation"].items() if isinstance(v, float)})
        run.tags({T.CALIBRATION_DIGEST: result["calibration_digest"]})
        run.artifact(out, "diagnostics")
    return result
