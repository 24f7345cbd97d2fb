"""Reading the lineage back: model versions, the runs they link to, and where files are."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from selfcal.errors import ConfigError, DataError
from selfcal.lineage import tags as T

_HEX = re.compile(r"[0-9a-f]{8,64}")
_STAGE_GENERATE = "generate"


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:VERSION``; registry names cannot contain ':' so the split is unambiguous."""
    name, _, version = ref.partition(":")
    if not name or "'" in name:
        raise ConfigError(f"{ref!r}: expected MODEL or MODEL:VERSION (a registered model name)")
    if version and not version.isdigit():
        raise ConfigError(f"{ref!r}: version must be a number, got {version!r}")
    return name, version or None


def resolve_version(client, ref: str):
    """The model version ``ref`` names; without a version, the newest one."""
    from mlflow.exceptions import MlflowException

    name, version = parse_model_ref(ref)
    if version is not None:
        try:
            return client.get_model_version(name, version)
        except MlflowException:
            raise DataError(f"{ref}: no such model version in the registry") from None
    found = client.search_model_versions(f"name = '{name}'")
    if not found:
        known = sorted({m.name for m in client.search_registered_models()})
        if name in known:  # registered by hand, or its versions deleted
            raise DataError(f"{name}: registered, but it has no versions")
        raise DataError(f"{name}: no registered model of that name; registered: {known}")
    return max(found, key=lambda v: int(v.version))


def check_digest(digest: str) -> str:
    digest = digest.lower()
    if not _HEX.fullmatch(digest):
        raise ConfigError(f"--calibration: {digest!r} is not a sha256 digest or a prefix of at least 8 hex digits")
    return digest


def versions_for_calibration(client, digest: str) -> list:
    """Every version whose calibration digest is ``digest`` (or starts with it), oldest first."""
    found = client.search_model_versions(f"tags.`{T.CALIBRATION_DIGEST}` LIKE '{check_digest(digest)}%'")
    return sorted(found, key=lambda v: (v.name, int(v.version)))


def all_versions(client) -> list:
    """Every registered model version in the store, by name then version."""
    found = []
    for model in client.search_registered_models():
        found += client.search_model_versions(f"name = '{model.name}'")
    return sorted(found, key=lambda v: (v.name, int(v.version)))


def local_path(uri: str | None) -> Path | None:
    """A ``file://`` URI or plain path as a Path; None for anything not on this machine."""
    if not uri:
        return None
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri) if parsed.scheme == "" else None


def show(path: Path | str | None) -> str | None:
    """A local path relative to the working directory when inside it, as a user would type it."""
    if path is None or (isinstance(path, str) and not path.startswith("/")):
        return path  # absent, or a remote URI
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def get_run(client, run_id: str | None):
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def generate_run(client, digest: str):
    """The newest generate run that produced the calibration set with this digest, in any experiment."""
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    if not exp_ids:
        return None
    runs = client.search_runs(
        exp_ids,
        filter_string=f"tags.`{T.STAGE}` = '{_STAGE_GENERATE}' and tags.`{T.CALIBRATION_DIGEST}` = '{digest}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def run_artifact_bytes(client, run_id: str, path: str) -> bytes | None:
    """An artifact's bytes as the run recorded it (the copy in the tracking store, not the file on disk)."""
    quiet = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(quiet)
    os.environ[quiet] = "false"  # a progress bar per manifest would bury the report
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run_id, path, tmp)
            return Path(local).read_bytes()
    except Exception:  # a missing artifact raises store-specific types; all mean "not recorded"
        moved = moved_artifact(client, run_id, path)
        return moved.read_bytes() if moved is not None else None
    finally:
        if before is None:
            os.environ.pop(quiet, None)
        else:
            os.environ[quiet] = before


def run_artifact_json(client, run_id: str, path: str) -> dict | None:
    """A JSON artifact as the run recorded it (the copy in the tracking store, not the file on disk)."""
    data = run_artifact_bytes(client, run_id, path)
    return json.loads(data) if data is not None else None


def logged_metrics(client, model_id: str | None) -> dict[str, dict[str, tuple[float, int]]]:
    """A version's LoggedModel metrics by the evaluate run that logged them: run id -> key -> (value, timestamp)."""
    by_run: dict[str, dict[str, tuple[float, int]]] = {}
    if model_id:
        for m in client.get_logged_model(model_id).metrics or []:
            by_run.setdefault(m.run_id, {})[m.key] = (m.value, m.timestamp or 0)
    return by_run


def evaluate_runs(client, model_id: str | None, tags: dict, by_run: dict | None = None) -> list[str]:
    """Every evaluate run linked to a version, newest first: the runs that logged metrics on its LoggedModel
    (one per evaluation of the checkpoint; ``by_run`` when already read), and the one its tags name."""
    by_run = logged_metrics(client, model_id) if by_run is None else by_run
    newest = {run_id: max(ts for _, ts in keys.values()) for run_id, keys in by_run.items()}
    if tags.get(T.EVALUATE_RUN):
        newest.setdefault(tags[T.EVALUATE_RUN], 0)
    return sorted(newest, key=lambda r: -newest[r])


def evaluate_run_of_file(
    client, model_id: str | None, tags: dict, path: Path, by_run: dict | None = None
) -> str | None:
    """Which evaluate run of this version wrote the evaluation record ``path`` holds, byte for byte (None: no
    run did). The registry's tags name the newest evaluation; DVC may have restored an earlier one from its
    run-cache (``dvc repro`` after ``dvc exp run -S evaluation.limit=...``), which ran no code to say so.
    ``by_run``: the version's ``logged_metrics`` when the caller has already read them."""
    data = path.read_bytes()
    for run_id in evaluate_runs(client, model_id, tags, by_run):
        if run_artifact_bytes(client, run_id, f"{T.EVALUATION_ARTIFACTS}/{path.name}") == data:
            return run_id
    return None


def moved_artifact(client, run_id: str, path: str) -> Path | None:
    """A run's artifact in a sqlite store that moved with its ``mlartifacts`` folder beside it (a GPU lease's run
    committed under reports/: the store still names the box's absolute paths). Only under that folder, by the
    part of the recorded location after ``/mlartifacts/``; None when the store is no such file store."""
    uri = getattr(client, "tracking_uri", "") or ""
    if not uri.startswith("sqlite:///"):
        return None
    try:
        recorded = client.get_run(run_id).info.artifact_uri or ""
    except Exception:
        return None
    _, sep, rest = recorded.partition("/mlartifacts/")
    if not sep or not recorded.startswith("file://"):
        return None
    base = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
    candidate = (base / rest / path).resolve()
    return candidate if candidate.is_file() and base.resolve() in candidate.parents else None


def dataset_input(run, digest: str) -> dict | None:
    """The calibration dataset this run logged as an input, if it did."""
    if run is None:
        return None
    for entry in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in entry.tags}
        if tags.get(T.CALIBRATION_DIGEST) == digest:
            ds = entry.dataset
            return {
                "name": ds.name,
                "digest": ds.digest,
                "source": json.loads(ds.source).get("uri", ds.source),
                "context": tags.get("mlflow.data.context"),
            }
    return None
