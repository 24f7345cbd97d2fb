"""The chain an auditor asks for: model version -> checkpoint -> calibration set -> generator, code, metrics.

Everything comes from the tracking store (version tags, the runs they name and the
manifests those runs logged); the calibration manifest on disk is read only when no
generate run was recorded. Broken or absent links are listed under ``missing``
instead of failing, so a partial lineage is still printed in full.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from selfcal.artifacts import MANIFEST, read_manifest
from selfcal.errors import DataError
from selfcal.hashing import sha256_file
from selfcal.lineage import store
from selfcal.lineage import tags as T
from selfcal.lineage.tracking import model_id_of
from selfcal.records import CalibrationManifest, parse_record

NO_CALIBRATION = "no calibration lineage recorded"
_CALIB_ARTIFACT = "calibration/manifest.json"


def _utc(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds") if ms else None


def _json_tag(tags: dict, key: str):
    try:
        return json.loads(tags[key]) if key in tags else None
    except ValueError:
        return tags[key]


def _parsed(data: object, where: str, missing: list[str]) -> CalibrationManifest | None:
    try:
        return parse_record(CalibrationManifest, data, where)
    except DataError as err:
        missing.append(str(err))
        return None


def _calibration(client, tags: dict, compress_run, missing: list[str]) -> dict | None:
    digest = tags.get(T.CALIBRATION_DIGEST)
    if not digest:
        missing.append(f"{NO_CALIBRATION} (version has no {T.CALIBRATION_DIGEST} tag)")
        return None
    path = store.local_path(tags.get(T.CALIBRATION_URI))
    dataset = store.dataset_input(compress_run, digest)
    if dataset is None:
        missing.append(f"calibration dataset {digest} is not an input of the compress run")
    gen = store.generate_run(client, digest)
    manifest, recorded_in = None, None
    if gen is not None:
        data = store.run_artifact_json(client, gen.info.run_id, _CALIB_ARTIFACT)
        recorded_in = f"generate run {gen.info.run_id}"
        manifest = _parsed(data, recorded_in, missing) if data is not None else None
    else:
        missing.append(f"no generate run recorded for calibration {digest}")
    if manifest is None and path is not None and (path / MANIFEST).is_file():
        recorded_in = f"manifest on disk ({path})"
        try:
            manifest = read_manifest(path, CalibrationManifest)
        except DataError as err:
            missing.append(str(err))
    if manifest is None:
        missing.append(f"calibration {digest}: no manifest in the tracking store or on disk")
    generator = manifest.model.model_dump() if manifest else {}
    uses_weights = gen.data.tags.get(T.GENERATOR_USES_WEIGHTS) if gen is not None else None
    return {
        "digest": digest,
        "manifest_sha256": tags.get(T.CALIBRATION_MANIFEST_SHA),
        "name": tags.get(T.CALIBRATION_NAME),
        "path": str(path) if path else tags.get(T.CALIBRATION_URI),
        "source": manifest.source if manifest else None,
        "seed": manifest.seed if manifest else None,
        "n_samples": manifest.n_samples if manifest else None,
        "seq_len": manifest.seq_len if manifest else None,
        "params": manifest.source_params if manifest else None,
        "generator": {**generator, "uses_weights": None if uses_weights is None else uses_weights == "true"},
        "generate_run_id": gen.info.run_id if gen is not None else None,
        "dataset": dataset,
        "details_from": recorded_in,
    }


#: The evaluation settings the text form of ``lineage`` prints beside the metrics (``--json`` has them all)
LINEAGE_SETTINGS = ("tasks", "limit", "data_dir", "engine")


def _metrics(client, model_id: str | None, tags: dict) -> dict | None:
    """The evaluation linked to the version: its LoggedModel's metrics from the newest evaluate run, or, when the
    record on disk is an earlier evaluate run's (restored by DVC's run-cache), that run's, said in ``note``."""
    by_run = store.logged_metrics(client, model_id)
    run_id = tags.get(T.EVALUATE_RUN)
    if run_id not in by_run and by_run:
        run_id = store.evaluate_runs(client, model_id, {}, by_run)[0]
    note = None
    path = store.local_path(tags.get(T.METRICS_URI))
    if path is not None and path.is_file() and sha256_file(path) != tags.get(T.METRICS_SHA):
        earlier = store.evaluate_run_of_file(client, model_id, tags, path, by_run)
        if earlier is not None and earlier != run_id:
            note = f"the record on disk is evaluate run {earlier}'s (restored by DVC's run-cache); newest: {run_id}"
            run_id = earlier
    run = store.get_run(client, run_id)
    if run_id in by_run:
        values = {k: v for k, (v, _) in sorted(by_run[run_id].items())}
    else:
        if run is None:
            return None
        values = dict(sorted(run.data.metrics.items()))
    # the evaluation params the run logged (none before they were logged): what the numbers were measured with
    settings = {k.removeprefix("evaluation."): v for k, v in (run.data.params if run else {}).items()}
    out = {
        "evaluate_run_id": run_id,
        "values": values,
        "file": str(store.local_path(tags.get(T.METRICS_URI)) or "") or None,
        "sha256": tags.get(T.METRICS_SHA),
    }
    if settings:
        out["settings"] = dict(sorted(settings.items()))
    if note:
        out["note"] = note
    return out


def trace(client, version) -> dict:
    """The full lineage of one model version, JSON-ready."""
    tags = dict(version.tags)
    missing: list[str] = []
    model_id = model_id_of(version)
    compress_run = store.get_run(client, version.run_id)
    if compress_run is None:
        missing.append("no compress run linked to the version")
    if T.CHECKPOINT_DIGEST not in tags:
        missing.append(f"no checkpoint recorded (version has no {T.CHECKPOINT_DIGEST} tag)")
    checkpoint_path = store.local_path(tags.get(T.CHECKPOINT_URI))
    return {
        "model": {
            "name": version.name,
            "version": str(version.version),
            "model_id": model_id,
            "source": version.source,
            "registered_utc": _utc(version.creation_timestamp),
            "compress_run_id": version.run_id,
            "pipeline_run_id": compress_run.data.tags.get("mlflow.parentRunId") if compress_run else None,
        },
        "checkpoint": {
            "path": str(checkpoint_path) if checkpoint_path else tags.get(T.CHECKPOINT_URI),
            "digest": tags.get(T.CHECKPOINT_DIGEST),
            "manifest_sha256": tags.get(T.CHECKPOINT_MANIFEST_SHA),
            "method": tags.get(T.METHOD),
            "method_params": _json_tag(tags, T.METHOD_PARAMS),
            "recipe_sha256": tags.get(T.RECIPE_SHA),
            "recipe": tags.get(T.RECIPE),
            "library_versions": _json_tag(tags, T.VERSIONS),
        },
        "base_model": {
            "name": tags.get(T.BASE_MODEL),
            "revision": tags.get(T.BASE_REVISION),
            "digest": tags.get(T.BASE_DIGEST),
            "trust_remote_code": tags.get(T.TRUST_REMOTE_CODE),
        },
        "code": {
            "git_commit": tags.get(T.GIT_COMMIT),
            "git_dirty": tags.get(T.GIT_DIRTY),
            "params_profile": tags.get(T.PARAMS_PROFILE),
            "dvc_lock_sha256": tags.get(T.DVC_LOCK_SHA),
            "code_digest": tags.get(T.CODE_DIGEST),
        },
        "calibration": _calibration(client, tags, compress_run, missing),
        "metrics": _metrics(client, model_id, tags),
        "missing": missing,
    }


def _kv(d: dict | None) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted((d or {}).items())) or "-"


def _checkpoint_lines(lineage: dict) -> list[str]:
    c, b, code = lineage["checkpoint"], lineage["base_model"], lineage["code"]
    if c["digest"] is None:
        return ["checkpoint   not recorded (the version carries no selfcal lineage tags)"]
    dirty = {"true": " (uncommitted changes)", "false": ""}.get(code["git_dirty"] or "", " (dirty: unknown)")
    if code.get("params_profile"):
        dirty += f" (params.yaml = committed {code['params_profile']})"
    return [
        f"checkpoint   {store.show(c['path'])}",
        f"  digest     {c['digest']}  (manifest sha256 {c['manifest_sha256']})",
        f"  method     {c['method']}  {_kv(c['method_params'])}",
        f"  recipe     sha256 {c['recipe_sha256']}",
        f"  libraries  {_kv(c['library_versions'])}",
        f"base model   {b['name']}  revision {b['revision']}  digest {b['digest']}"
        + ("  (trust_remote_code: the model folder's own code ran)" if b.get("trust_remote_code") == "true" else ""),
        f"code         git {code['git_commit']}{dirty}  dvc.lock sha256 {code['dvc_lock_sha256']}"
        + (f"  selfcal source sha256 {code['code_digest']}" if code.get("code_digest") else ""),
    ]


def format_text(lineage: dict) -> str:
    m = lineage["model"]
    run = (
        f"run {m['compress_run_id']}  (pipeline run {m['pipeline_run_id']})"
        if m["compress_run_id"]
        else "no run linked"
    )
    lines = [
        f"model        {m['name']}:{m['version']}  ({m['source']}, registered {m['registered_utc']})",
        f"  compress   {run}",
        *_checkpoint_lines(lineage),
    ]
    cal = lineage["calibration"]
    if cal is None:
        lines.append(f"calibration  {NO_CALIBRATION}")
    else:
        gen = cal["generator"]
        role = {True: "weights and tokenizer", False: "tokenizer only"}.get(gen.get("uses_weights"), "role unknown")
        same = "  = base model" if gen.get("digest") and gen.get("digest") == lineage["base_model"]["digest"] else ""
        ds = cal["dataset"]
        lines += [
            f"calibration  {cal['name']}  {store.show(cal['path'])}",
            f"  digest     {cal['digest']}  (manifest sha256 {cal['manifest_sha256']})",
            f"  source     {cal['source']}  seed {cal['seed']}  {cal['n_samples']} x {cal['seq_len']} tokens",
            f"  params     {_kv(cal['params'])}",
            f"  generator  {gen.get('name')}  revision {gen.get('revision') or 'none'}  digest "
            f"{gen.get('digest')}  ({role}){same}",
            f"  recorded   {cal['details_from']}",
            "  dataset    "
            + (
                f"MLflow dataset {ds['name']} digest {ds['digest']} ({ds['context']} input of the compress run)"
                if ds
                else "-"
            ),
        ]
    met = lineage["metrics"]
    if met is None:
        lines.append("metrics      none linked (no evaluate run recorded for this version)")
    else:
        lines.append(f"metrics      evaluate run {met['evaluate_run_id']}  {store.show(met['file']) or ''}".rstrip())
        lines.append(f"  record     sha256 {met['sha256']}  (the registered record's)")
        if met.get("note"):
            lines.append(f"  note       {met['note']}")
        shown = {k: v for k, v in (met.get("settings") or {}).items() if k in LINEAGE_SETTINGS}
        if shown:
            lines.append("  settings   " + "  ".join(f"{k}={v}" for k, v in shown.items()))
        width = max((len(k) for k in met["values"]), default=0)
        lines += [f"  {k:<{width}}  {v:.6g}" for k, v in met["values"].items()]
    lines += [f"MISSING      {why}" for why in lineage["missing"]]
    return "\n".join(lines)


def _version_row(v) -> dict:
    tags = dict(v.tags)
    uri = tags.get(T.CHECKPOINT_URI)
    return {
        "model": f"{v.name}:{v.version}",
        "calibration_digest": tags.get(T.CALIBRATION_DIGEST),
        "calibration": tags.get(T.CALIBRATION_NAME),
        "method": tags.get(T.METHOD),
        "base_model": tags.get(T.BASE_MODEL),
        "checkpoint": str(store.local_path(uri) or uri) if uri else None,
        # two versions with one digest hold the same weights (a --force rerun, a second workspace)
        "checkpoint_digest": tags.get(T.CHECKPOINT_DIGEST),
        "registered_utc": _utc(v.creation_timestamp),
    }


def models_from_calibration(client, digest: str) -> list[dict]:
    """Every registered version made from the calibration set ``digest`` (a prefix is enough)."""
    return [_version_row(v) for v in store.versions_for_calibration(client, digest)]


def all_models(client) -> list[dict]:
    """Every registered version, for an auditor who does not know a name yet (``selfcal models``)."""
    return [_version_row(v) for v in store.all_versions(client)]


def format_model_list(models: list[dict]) -> str:
    if not models:
        return "no registered models in this store"
    lines = [f"{len(models)} registered model version(s):"]
    for m in models:
        lineage = (
            f"{m['method']}  {m['calibration']} ({(m['calibration_digest'] or '')[:16]})  "
            f"checkpoint {(m['checkpoint_digest'] or '?')[:16]} {store.show(m['checkpoint'])}"
            if m["calibration_digest"]
            else "no selfcal lineage"
        )
        lines.append(f"  {m['model']}  {lineage}  registered {m['registered_utc']}")
    return "\n".join(lines)


def format_models(digest: str, models: list[dict]) -> str:
    if not models:
        return f"no registered model was made from calibration {digest}"
    lines = [f"{len(models)} model version(s) made from calibration {digest}:"]
    for m in models:
        lines.append(
            f"  {m['model']}  {m['method']}  {m['calibration']} ({m['calibration_digest'][:16]})  "
            f"{store.show(m['checkpoint'])}  registered {m['registered_utc']}"
        )
    return "\n".join(lines)
