"""Recompute what is on disk and compare it with what the registry recorded.

Each problem is one line that starts with the file (or run) at fault. The registry
pins each manifest by its sha256 and each manifest pins every file, so a change to
any byte of a checkpoint, calibration set, manifest or metrics file is named, and a
file rewritten together with its manifest still fails on the registered digests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from selfcal.artifacts import MANIFEST, RUN_FACTS
from selfcal.errors import DataError, SelfcalError
from selfcal.hashing import file_digests, sha256_file, tree_digest
from selfcal.lineage import store
from selfcal.lineage import tags as T
from selfcal.lineage.store import show
from selfcal.lineage.trace import NO_CALIBRATION
from selfcal.records import ArtifactManifest, CalibrationManifest, CheckpointManifest, read_evaluation, read_record


@dataclass
class Report:
    ref: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _mismatch(path: Path, what: str, registered: str | None, actual: str) -> str:
    return f"{show(path)}: {what} mismatch (registered {registered}, on disk {actual})"


def check_tree(
    directory: Path, manifest_sha: str | None, record: type[ArtifactManifest]
) -> tuple[ArtifactManifest | None, dict[str, str], list[str]]:
    """(manifest, sha256 of every file on disk, problems) for one artifact directory."""
    if not directory.is_dir():
        return None, {}, [f"{show(directory)}: directory missing"]
    path = directory / MANIFEST
    if not path.is_file():
        return None, {}, [f"{show(path)}: manifest missing"]
    problems = []
    actual_sha = sha256_file(path)
    if manifest_sha and actual_sha != manifest_sha:
        problems.append(_mismatch(path, "sha256", manifest_sha, actual_sha))
    try:
        manifest = read_record(record, path)
    except DataError as err:
        return None, {}, [*problems, f"{show(path)}: not a selfcal {record.__name__} ({str(err).split(': ', 1)[-1]})"]
    recorded = manifest.files
    on_disk = file_digests(directory, exclude=frozenset({MANIFEST}))
    for rel, want in sorted(recorded.items()):
        got = on_disk.get(rel)
        if got is None:
            problems.append(f"{show(directory / rel)}: missing (listed in the manifest)")
        elif got != want:
            problems.append(f"{show(directory / rel)}: sha256 mismatch (recorded {want}, on disk {got})")
    problems += [
        f"{show(directory / rel)}: not listed in the manifest" for rel in sorted(on_disk.keys() - recorded.keys())
    ]
    return manifest, on_disk, problems


def _checkpoint(tags: dict, report: Report) -> None:
    path = store.local_path(tags.get(T.CHECKPOINT_URI))
    if path is None or T.CHECKPOINT_DIGEST not in tags:
        report.problems.append(f"{report.ref}: no checkpoint recorded (tags {T.CHECKPOINT_URI}, {T.CHECKPOINT_DIGEST})")
        return
    manifest, on_disk, problems = check_tree(path, tags.get(T.CHECKPOINT_MANIFEST_SHA), CheckpointManifest)
    report.problems += problems
    if manifest is None:
        return
    content = tree_digest({k: v for k, v in on_disk.items() if k != RUN_FACTS})  # as compress computes it
    if not problems and content != tags[T.CHECKPOINT_DIGEST]:
        report.problems.append(_mismatch(path, "content digest", tags[T.CHECKPOINT_DIGEST], content))
    linked = manifest.calibration.digest
    if T.CALIBRATION_DIGEST in tags and linked != tags[T.CALIBRATION_DIGEST]:
        report.problems.append(
            f"{show(path / MANIFEST)}: names calibration {linked}, registered {tags[T.CALIBRATION_DIGEST]}"
        )
    report.checked.append(f"checkpoint {show(path)} ({len(on_disk)} files)")


def _calibration(client, version, tags: dict, report: Report) -> None:
    from selfcal.calibration.calibset import TOKENS, load_calibration_set

    digest = tags.get(T.CALIBRATION_DIGEST)
    if not digest:
        report.problems.append(f"{report.ref}: {NO_CALIBRATION} (no {T.CALIBRATION_DIGEST} tag)")
        return
    path = store.local_path(tags.get(T.CALIBRATION_URI))
    if path is None:
        report.problems.append(f"{report.ref}: calibration {digest} has no recorded location ({T.CALIBRATION_URI})")
        return
    manifest, on_disk, problems = check_tree(path, tags.get(T.CALIBRATION_MANIFEST_SHA), CalibrationManifest)
    report.problems += problems
    if manifest is not None and not problems:
        try:
            actual = load_calibration_set(path).digest
        except SelfcalError as err:  # tokens readable but not what the manifest says
            report.problems.append(str(err))
        except Exception as err:  # unreadable tokens: safetensors and numpy raise their own types
            report.problems.append(f"{show(path / TOKENS)}: unreadable ({str(err).splitlines()[0]})")
        else:
            if actual != digest:
                report.problems.append(_mismatch(path / TOKENS, "token digest", digest, actual))
    run = store.get_run(client, version.run_id)
    dataset = store.dataset_input(run, digest)
    if dataset is None:
        report.problems.append(
            f"run {version.run_id}: calibration dataset {digest} is not an input of the compress run"
        )
    elif dataset["digest"] != T.dataset_digest(digest):
        report.problems.append(
            f"run {version.run_id}: dataset {dataset['name']} has digest {dataset['digest']}, expected "
            f"{T.dataset_digest(digest)}"
        )
    if manifest is not None:
        report.checked.append(f"calibration {show(path)} ({len(on_disk)} files)")


def _metrics(tags: dict, report: Report) -> None:
    path = store.local_path(tags.get(T.METRICS_URI))
    if path is None:
        return  # not evaluated yet: nothing to check, and lineage says so
    if not path.is_file():
        report.problems.append(f"{show(path)}: metrics file missing")
        return
    actual = sha256_file(path)
    if actual != tags.get(T.METRICS_SHA):
        report.problems.append(_mismatch(path, "sha256", tags.get(T.METRICS_SHA), actual))
        return
    try:
        recorded = read_evaluation(path).checkpoint_digest
    except DataError as err:
        report.problems.append(str(err))
        return
    if recorded != tags.get(T.CHECKPOINT_DIGEST):
        report.problems.append(
            f"{show(path)}: scores checkpoint {recorded}, registered {tags.get(T.CHECKPOINT_DIGEST)}"
        )
    report.checked.append(f"metrics {show(path)}")


def verify(client, version) -> Report:
    """Every check, all problems collected: an auditor wants the full list, not the first."""
    tags = dict(version.tags)
    report = Report(ref=f"{version.name}:{version.version}")
    _checkpoint(tags, report)
    _calibration(client, version, tags, report)
    _metrics(tags, report)
    return report
