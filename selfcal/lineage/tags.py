"""The names under which lineage is recorded in MLflow: one place for writers and readers.

Run tags and model version tags share these keys, so a search by calibration digest
finds generate runs, compress runs and registered versions alike.
"""

from __future__ import annotations

STAGE = "selfcal.stage"
ITEM = "selfcal.item"
EXECUTION_ID = "selfcal.execution_id"

CALIBRATION_DIGEST = "selfcal.calibration_digest"
CALIBRATION_NAME = "selfcal.calibration"
CALIBRATION_URI = "selfcal.calibration_uri"
CALIBRATION_MANIFEST_SHA = "selfcal.calibration_manifest_sha256"
# {relative path: md5} of every file, manifest included: DVC's cache key, so a version whose folder a
# later run replaced is still found (selfcal.lineage.files).
CALIBRATION_FILES_MD5 = "selfcal.calibration_files_md5"

CHECKPOINT_DIGEST = "selfcal.checkpoint_digest"
CHECKPOINT_URI = "selfcal.checkpoint_uri"
CHECKPOINT_MANIFEST_SHA = "selfcal.checkpoint_manifest_sha256"
CHECKPOINT_FILES_MD5 = "selfcal.checkpoint_files_md5"

BASE_MODEL = "selfcal.base_model"
BASE_REVISION = "selfcal.base_model_revision"
BASE_DIGEST = "selfcal.base_model_digest"
GENERATOR_USES_WEIGHTS = "selfcal.generator_uses_weights"

METHOD = "selfcal.method"
METHOD_PARAMS = "selfcal.method_params"
RECIPE = "selfcal.recipe"
RECIPE_SHA = "selfcal.recipe_sha256"
VERSIONS = "selfcal.versions"

GIT_COMMIT = "selfcal.git_commit"
GIT_DIRTY = "selfcal.git_dirty"
# The committed profile params.yaml is a byte-for-byte copy of (`selfcal run --profile`), which then does not
# count as an uncommitted change: the params are in the commit, under that name.
PARAMS_PROFILE = "selfcal.params_profile"
# sha256 over the selfcal package's Python source: which code ran, also outside a git checkout.
CODE_DIGEST = "selfcal.code_digest"
DVC_LOCK_SHA = "selfcal.dvc_lock_sha256"

EVALUATE_RUN = "selfcal.evaluate_run_id"
METRICS_URI = "selfcal.metrics_uri"
METRICS_SHA = "selfcal.metrics_sha256"
#: The artifact folder each evaluate run logs its record under: what ``verify`` compares a restored file with
EVALUATION_ARTIFACTS = "evaluation"
METRICS_MD5 = "selfcal.metrics_md5"

UNKNOWN = "unknown"
# MLflow stores a dataset digest in 36 characters; the first 32 hex digits of the
# sha256 identify the set there, and the full digest rides along as an input tag.
DATASET_DIGEST_CHARS = 32


def dataset_digest(content_digest: str) -> str:
    return content_digest[:DATASET_DIGEST_CHARS]


# The process and host of a stage run, so a later stage can end the runs of dead processes.
PID = "selfcal.pid"
HOST = "selfcal.host"
FAILED_REASON = "selfcal.failed_reason"
# Set on a stage run when params let the model folder's own code run (model.trust_remote_code).
TRUST_REMOTE_CODE = "selfcal.trust_remote_code"
