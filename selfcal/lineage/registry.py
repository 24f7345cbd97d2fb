"""What the pipeline records so an auditor can trace a checkpoint: datasets, versions, links.

Checkpoints are registered *by reference*: the registry holds the checkpoint's URI,
its content digest and its manifest's sha256, never a second copy of the weights
(DVC already caches them once). ``selfcal verify`` recomputes the hashes on disk.
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import re
import subprocess
from pathlib import Path

from selfcal.artifacts import MANIFEST
from selfcal.config import Params
from selfcal.errors import ConfigError
from selfcal.hashing import md5_file, sha256_file, tree_digest
from selfcal.lineage import tags as T
from selfcal.lineage.files import md5_tag
from selfcal.lineage.tracking import RegisteredVersion, StageRun, flatten
from selfcal.modelio import ModelRef
from selfcal.paths import resolve_path
from selfcal.records import CalibrationManifest, CheckpointManifest, ModelFingerprint

log = logging.getLogger("selfcal.lineage")
MODEL_TYPE = "selfcal-checkpoint"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def base_label(ref: ModelRef, root: Path) -> str:
    """The base model's short name: a local directory's name, or the hub id."""
    local = resolve_path(ref.name, root).is_dir()
    return Path(ref.name).name if local else ref.name


# MLflow's registry stores a name in 256 characters (store/model_registry/dbmodels/models.py, String(256)).
MAX_NAME_CHARS = 256
_KEY = "tracking.registered_model_name"


def registered_name(template: str, *, base: str, method: str, source: str, seed: int) -> str:
    """Fill the params template, then replace anything MLflow or ``NAME:VERSION`` would trip on; a name MLflow
    would still refuse (a format spec the value cannot take, '.', '..x', over 256 characters) is a ConfigError,
    which ``selfcal check`` raises for every (method, source, seed) before any compute."""
    try:
        name = template.format(base=base, method=method, source=source, seed=seed)
    except (ValueError, IndexError, KeyError) as err:
        raise ConfigError(f"{_KEY}: {template!r} cannot be filled in ({err})") from None
    name = _UNSAFE.sub("-", name).strip("-") or "model"
    # mlflow/utils/validation.py _validate_model_name -> path_not_unique: the name must be a plain, normal path.
    if posixpath.normpath(name) != name or name == "." or name.startswith(".."):
        raise ConfigError(f"{_KEY}: {template!r} gives {name!r}, which MLflow refuses as a model name")
    if len(name) > MAX_NAME_CHARS:
        raise ConfigError(
            f"{_KEY}: {template!r} gives a {len(name)}-character name; MLflow stores at most {MAX_NAME_CHARS}"
        )
    return name


def registered_names(params: Params, ref: ModelRef) -> list[str]:
    """Every name the params would register under (each method x source x seed)."""
    base = base_label(ref, params.root)
    return [
        registered_name(params.tracking.registered_model_name, base=base, method=method, source=source, seed=seed)
        for method in params.compression.methods
        for source in params.calibration.sources
        for seed in params.calibration.seeds
    ]


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.cache
def code_digest() -> str:
    """sha256 over the selfcal package's own Python files: the code that ran, named even where git is not
    (an installed package, a copied workspace); git's commit says where to find it."""
    import selfcal

    package = Path(selfcal.__file__).parent
    return tree_digest({p.relative_to(package).as_posix(): sha256_file(p) for p in sorted(package.rglob("*.py"))})


def code_state(root: Path) -> dict[str, str]:
    """Commit, whether tracked files differ from it, and the dvc.lock the stage ran under.

    dvc.lock is left out of the dirty check: ``dvc repro`` rewrites it between stages,
    and its own hash is recorded beside the commit. So is a params.yaml that is byte for byte a profile
    committed under profiles/ (what ``selfcal run --profile NAME`` installs): it is recorded as that profile.
    """
    commit = _git(root, "rev-parse", "HEAD")
    status = (
        _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock") if commit else None
    )
    changed = [line.split(None, 1)[1] for line in (status or "").splitlines() if line.strip()]  # "XY path"
    profile = committed_profile(root) if "params.yaml" in changed else None
    if profile:
        changed.remove("params.yaml")
    lock = root / "dvc.lock"
    state = {
        T.GIT_COMMIT: commit or T.UNKNOWN,
        T.GIT_DIRTY: T.UNKNOWN if status is None else str(bool(changed)).lower(),
        T.DVC_LOCK_SHA: sha256_file(lock) if lock.is_file() else "absent",
        T.CODE_DIGEST: code_digest(),
    }
    if profile:
        state[T.PARAMS_PROFILE] = profile
    return state


def committed_profile(root: Path) -> str | None:
    """The profiles/*.yaml in HEAD whose committed bytes params.yaml holds, if one does."""
    params = root / "params.yaml"
    names = _git(root, "ls-tree", "--name-only", "HEAD", "profiles/")
    if not params.is_file() or not names:
        return None
    text = params.read_bytes()
    for name in names.splitlines():
        if name.endswith((".yaml", ".yml")):
            proc = subprocess.run(["git", "-C", str(root), "show", f"HEAD:{name}"], capture_output=True, timeout=30)
            if proc.returncode == 0 and proc.stdout == text:
                return name
    return None


def log_calibration(run: StageRun, name: str, directory: Path, content_digest: str, *, context: str) -> None:
    """The calibration set as an MLflow dataset: the digest identifies it, the path says where it is."""
    run.dataset(
        name, T.dataset_digest(content_digest), directory, context=context, tags={T.CALIBRATION_DIGEST: content_digest}
    )


def checkpoint_tags(
    params: Params,
    *,
    base: ModelFingerprint,
    checkpoint: Path,
    manifest: CheckpointManifest,
    calib: CalibrationManifest,
    calib_dir: Path,
    calib_name: str,
) -> dict[str, str]:
    """Everything a version must carry to be traced and verified without the run that made it."""
    recipe_sha = manifest.files.get("recipe.yaml")
    return {
        T.CALIBRATION_DIGEST: calib.content_digest,
        T.CALIBRATION_NAME: calib_name,
        T.CALIBRATION_URI: calib_dir.resolve().as_uri(),
        T.CALIBRATION_MANIFEST_SHA: sha256_file(calib_dir / MANIFEST),
        T.CALIBRATION_FILES_MD5: md5_tag(calib_dir),
        T.CHECKPOINT_DIGEST: manifest.content_digest,
        T.CHECKPOINT_URI: checkpoint.resolve().as_uri(),
        T.CHECKPOINT_MANIFEST_SHA: sha256_file(checkpoint / MANIFEST),
        T.CHECKPOINT_FILES_MD5: md5_tag(checkpoint),
        T.BASE_MODEL: base.name,
        T.BASE_REVISION: base.revision or "none",
        T.BASE_DIGEST: base.digest,
        T.METHOD: manifest.method,
        T.METHOD_PARAMS: json.dumps(manifest.method_params, sort_keys=True),
        T.RECIPE: manifest.recipe or "",
        T.RECIPE_SHA: recipe_sha or "absent",
        T.VERSIONS: json.dumps(manifest.versions, sort_keys=True),
        # The model folder's own code ran (params allowed it): an auditor must see that on the version.
        T.TRUST_REMOTE_CODE: str(params.model.trust_remote_code).lower(),
        **code_state(params.root),
    }


def register_checkpoint(
    run: StageRun,
    params: Params,
    *,
    ref: ModelRef,
    base: ModelFingerprint,
    checkpoint: Path,
    manifest: CheckpointManifest,
    calib: CalibrationManifest,
    calib_dir: Path,
    calib_name: str,
) -> RegisteredVersion | None:
    if run.run_id is None:
        return None  # tracking off: no registry, and no hashing for it
    name = registered_name(
        params.tracking.registered_model_name,
        base=base_label(ref, params.root),
        method=manifest.method,
        source=calib.source,
        seed=calib.seed,
    )
    tags = checkpoint_tags(
        params,
        base=base,
        checkpoint=checkpoint,
        manifest=manifest,
        calib=calib,
        calib_dir=calib_dir,
        calib_name=calib_name,
    )
    model_params = {k: str(v) for k, v in flatten({"method": manifest.method, **manifest.method_params}).items()}
    version = run.register_model(name, tags=tags, params=model_params, model_type=MODEL_TYPE)
    if version is not None:
        log.info("registered %s (calibration %s)", version.ref, calib.content_digest[:16])
    return version


def link_evaluation(run: StageRun, checkpoint_digest: str, metrics_file: Path) -> RegisteredVersion | None:
    """Find the version registered for this checkpoint and point it at this evaluation.

    The metrics themselves go to the run with the version's ``model_id`` (MLflow 3
    then lists them on the LoggedModel); the version gets the run id and the
    metrics file's hash so ``verify`` can check the file too.
    """
    version = run.find_model_version(T.CHECKPOINT_DIGEST, checkpoint_digest)
    if version is None:
        if run.run_id is not None:
            log.warning("no registered version for checkpoint %s; metrics stay on the run only", checkpoint_digest[:16])
        return None
    run.tag_model_version(
        version,
        {
            T.EVALUATE_RUN: run.run_id or "",
            T.METRICS_URI: metrics_file.resolve().as_uri(),
            T.METRICS_SHA: sha256_file(metrics_file),
            T.METRICS_MD5: md5_file(metrics_file),
        },
    )
    return version
