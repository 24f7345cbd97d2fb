"""The artifact contracts: what a calibration set's manifest, a checkpoint's manifest and an
evaluation's metrics record hold, as typed records with a ``schema_version``.

Each has one writer and one reader (``write_*``/``read_*`` here or in the module that owns the
artifact), so a field is named once and a file from another schema is refused in one line
instead of failing later on a missing key. Metric names are defined once too (``metric_name``):
``acc.TASK``, ``mean_acc``, ``ppl.SET``, the same in the metrics file DVC reads, in MLflow and in
the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError

from selfcal.errors import DataError
from selfcal.schema import Strict

SCHEMA_VERSION = 1


class Record(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1] = SCHEMA_VERSION


class ModelFingerprint(Strict):
    """The exact base model: a digest over its config, tokenizer and weight files."""

    name: str
    revision: str | None = None
    digest: str


class ArtifactManifest(Record):
    """What every artifact directory's manifest.json holds, whatever its kind."""

    kind: str
    content_digest: str  # the semantic identity (the token matrix; the model files)
    tree_digest: str  # over every file's sha256
    files: dict[str, str]  # relative path -> sha256, manifest excluded
    created_utc: str
    versions: dict[str, str]
    argv: list[str]


class CalibrationManifest(ArtifactManifest):
    kind: Literal["calibration_set"] = "calibration_set"
    shape: list[int]
    source: str
    source_params: dict[str, Any]
    source_version: int
    seed: int
    n_samples: int
    seq_len: int
    model: ModelFingerprint  # whose tokenizer (and, for generated sources, weights) made the set
    device: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    wall_seconds: float


class CalibrationRef(Strict):
    """The calibration set a checkpoint was made from, as recorded in the checkpoint."""

    digest: str
    source: str
    seed: int
    path: str
    n_samples: int
    seq_len: int


class CheckpointManifest(ArtifactManifest):
    kind: Literal["checkpoint"] = "checkpoint"
    method: str
    method_params: dict[str, Any]
    recipe: str | None = None
    skipped_layers: list[str] = Field(default_factory=list)
    compress_seconds: float
    verification: dict[str, Any]
    base_model: ModelFingerprint
    calibration: CalibrationRef
    device: str


class TaskScore(Strict):
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    n: int | None = None
    n_total: int | None = None
    seconds: float
    examples_per_s: float | None = None
    batch_size: int | str | None = None
    # the fast path (evaluation.engine: fast): lm-eval's requests, how fast they were scored, and how long
    # getting them prepared took ("built" by lm-eval's task code, or read back from the cache)
    requests: int | None = None
    requests_per_s: float | None = None
    prepare_seconds: float | None = None
    prepared: str | None = None


class ZeroShot(Strict):
    engine: str = "lm-eval"
    tasks: dict[str, TaskScore] = Field(default_factory=dict)
    failed: dict[str, str] = Field(default_factory=dict)
    batch_size: int | str
    seconds: float
    lm_eval_version: str | None = None


class PerplexityScore(Strict):
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    stride: int
    source: str
    seconds: float


def metric_name(kind: Literal["acc", "ppl"], name: str) -> str:
    """The one spelling of a metric: ``acc.arc_easy``, ``ppl.wikitext2``."""
    return f"{kind}.{name}"


MEAN_ACC = "mean_acc"


class EvaluationRecord(Record):
    """The metrics record of one evaluated model, the dense base (method "none") or a checkpoint:
    identity, per-task scores with counts and timings, perplexities. ``metrics()`` is the flat view."""

    kind: Literal["evaluation"] = "evaluation"
    name: str
    method: str
    source: str
    seed: int | None = None
    calibration_digest: str | None = None
    checkpoint_digest: str | None = None
    model_digest: str
    device: str
    zero_shot: ZeroShot | None = None
    skipped_tasks: dict[str, str] = Field(default_factory=dict)
    perplexity: dict[str, PerplexityScore] = Field(default_factory=dict)
    mean_acc: float | None = None
    mean_acc_tasks: list[str] = Field(default_factory=list)
    wall_seconds: float

    def scored_tasks(self) -> dict[str, float]:
        return {t: s.acc for t, s in (self.zero_shot.tasks.items() if self.zero_shot else []) if s.acc is not None}

    def metrics(self) -> dict[str, float]:
        """Every headline number under its one name: what DVC, MLflow and the report show."""
        out = {metric_name("acc", t): acc for t, acc in self.scored_tasks().items()}
        if self.mean_acc is not None:
            out[MEAN_ACC] = self.mean_acc
        out.update({metric_name("ppl", n): p.perplexity for n, p in self.perplexity.items()})
        return out


def parse_record(cls: type[Record], data: object, where: str) -> Record:
    """``data`` as a ``cls``, or one line saying what is wrong with ``where``."""
    if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
        found = data.get("schema_version", "none")
        raise DataError(
            f"{where}: written with schema_version {found}, this selfcal reads {SCHEMA_VERSION}; re-run "
            "the stage that made it"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{where}: not a valid {cls.__name__} ({loc}: {first['msg']})") from None


def read_record(cls: type[Record], path: Path) -> Record:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path}: not valid JSON") from None
    return parse_record(cls, data, str(path))


def read_evaluation(path: Path) -> EvaluationRecord:
    """The one reader of an evaluation record (evaluations/NAME.json)."""
    return read_record(EvaluationRecord, path)


def dump_record(record: Record) -> str:
    return json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
