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
from selfcal.errors import DataError
from selfcal.hashing import md5_file, sha256_file, tree_digest
from selfcal.lineage import store
from selfcal.lineage import tags as T
from selfcal.lineage.files import (
    DVC_CACHE,
    IN_PLACE,
    FileSet,
    from_dvc_cache,
    in_place,
    parse_md5_tag,
    workspace_of,
)
from selfcal.lineage.store import show
from selfcal.lineage.trace import NO_CALIBRATION
from selfcal.lineage.tracking import model_id_of
from selfcal.records import ArtifactManifest, CalibrationManifest, CheckpointManifest, read_evaluation, read_record

CHECKPOINT = "checkpoint"
CALIBRATION = "calibration"


@dataclass
class Report:
    ref: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    found: dict[str, FileSet] = field(default_factory=dict)  # artifact -> where its verified files are

    @property
    def ok(self) -> bool:
        return not self.problems


def _mismatch(path: Path, what: str, registered: str | None, actual: str) -> str:
    return f"{show(path)}: {what} mismatch (registered {registered}, on disk {actual})"


def check_files(
    found: FileSet, manifest_sha: str | None, record: type[ArtifactManifest]
) -> tuple[ArtifactManifest | None, dict[str, str], list[str]]:
    """(manifest, sha256 of every file, problems) for one artifact's files, wherever they were found."""
    directory = found.directory
    if found.where == IN_PLACE and not directory.is_dir():
        return None, {}, [f"{show(directory)}: directory missing"]
    path = found.files.get(MANIFEST)
    if path is None:
        return None, {}, [f"{show(directory / MANIFEST)}: manifest missing"]
    problems = []
    actual_sha = sha256_file(path)
    if manifest_sha and actual_sha != manifest_sha:
        problems.append(_mismatch(path, "sha256", manifest_sha, actual_sha))
    try:
        manifest = read_record(record, path)
    except DataError as err:
        return None, {}, [*problems, f"{show(path)}: not a selfcal {record.__name__} ({str(err).split(': ', 1)[-1]})"]
    recorded = manifest.files
    actual = {rel: sha256_file(p) for rel, p in found.files.items() if rel != MANIFEST}
    for rel, want in sorted(recorded.items()):
        got = actual.get(rel)
        if got is None:
            problems.append(f"{show(directory / rel)}: missing (listed in the manifest)")
        elif got != want:
            problems.append(f"{show(found.files[rel])}: sha256 mismatch (recorded {want}, on disk {got})")
    problems += [
        f"{show(found.files[rel])}: not listed in the manifest" for rel in sorted(actual.keys() - recorded.keys())
    ]
    return manifest, actual, problems


def check_tree(
    directory: Path, manifest_sha: str | None, record: type[ArtifactManifest]
) -> tuple[ArtifactManifest | None, dict[str, str], list[str]]:
    """(manifest, sha256 of every file on disk, problems) for one artifact directory."""
    return check_files(in_place(directory), manifest_sha, record)


def _replaced_by(
    directory: Path,
    record: type[ArtifactManifest],
    registered: str,
    manifest_sha: str | None = None,
    md5s: dict[str, str] | None = None,
) -> str | None:
    """The content digest of the *other* complete artifact now in ``directory``, if another run replaced this
    version's one there: a folder consistent with its own manifest, holding another digest, or the same
    content under another run's manifest (a stage re-run with the same inputs, after a code change: the same
    digest, another creation time; an audit's older version then failed verify on its manifest's sha256). A
    folder whose files no longer match its manifest, or whose content is not this version's, is tampering or
    damage, not a replacement."""
    if not directory.is_dir():
        return None
    manifest, _, problems = check_tree(directory, None, record)
    if manifest is None or problems:
        return None
    if manifest.content_digest != registered:
        return manifest.content_digest
    if manifest_sha and md5s and sha256_file(directory / MANIFEST) != manifest_sha and _same_content(directory, md5s):
        return manifest.content_digest
    return None


def _same_content(directory: Path, md5s: dict[str, str]) -> bool:
    """Every file this version registered, but its manifest and run facts, is in ``directory`` unchanged."""
    content = {rel: md5 for rel, md5 in md5s.items() if rel not in (MANIFEST, RUN_FACTS)}
    return bool(content) and all(
        (directory / rel).is_file() and md5_file(directory / rel) == md5 for rel, md5 in content.items()
    )


def locate(
    directory: Path,
    tags: dict,
    *,
    digest_tag: str,
    md5_tag: str,
    record: type[ArtifactManifest],
    what: str,
    manifest_tag: str | None = None,
) -> tuple[FileSet | None, str | None]:
    """Where this version's files of one artifact are: its folder when that still holds them, else the DVC
    cache when a later run replaced the folder; or None and the one line that says where they went."""
    registered = tags.get(digest_tag, "")
    md5s = parse_md5_tag(tags.get(md5_tag))
    if not directory.exists() and md5s:
        # Registered by another workspace (another worker of a fanned-out run, another box, a `dvc exp` run's
        # temporary copy): its folder is not here, but DVC caches the same files, here after `dvc pull`.
        for project in dict.fromkeys(p for p in (workspace_of(Path.cwd()), workspace_of(directory.parent)) if p):
            cached, _ = from_dvc_cache(directory, md5s, workspace=project)
            if cached is not None:
                return cached, None
    other = _replaced_by(directory, record, registered, tags.get(manifest_tag or ""), md5s)
    if other is None:
        return in_place(directory), None
    cached, why = from_dvc_cache(directory, md5s) if md5s else (None, f"no file md5s were registered ({md5_tag})")
    if cached is not None:
        return cached, None
    commit = tags.get(T.GIT_COMMIT, T.UNKNOWN)
    at = (
        f"`git checkout {commit[:12]}`" if commit != T.UNKNOWN else "the code it was made with (no git commit recorded)"
    )
    wrote = (
        f"another run wrote the same {what} there ({other[:16]}) under its own manifest"
        if other == registered
        else f"another run wrote another {what} there ({other[:16]})"
    )
    return None, (
        f"{show(directory)}: superseded: {wrote}, and this "
        f"version's files are gone from the workspace: {why}; bring them back into the DVC cache from the "
        f"remote (at {at}: `dvc pull`, or recompute with `dvc repro`), then `selfcal verify {{ref}}` finds them "
        f"and `selfcal restore {{ref}} DEST` copies them out"
    )


def _checkpoint(tags: dict, report: Report) -> FileSet | None:
    path = store.local_path(tags.get(T.CHECKPOINT_URI))
    if path is None or T.CHECKPOINT_DIGEST not in tags:
        report.problems.append(f"{report.ref}: no checkpoint recorded (tags {T.CHECKPOINT_URI}, {T.CHECKPOINT_DIGEST})")
        return None
    found, gone = locate(
        path,
        tags,
        digest_tag=T.CHECKPOINT_DIGEST,
        md5_tag=T.CHECKPOINT_FILES_MD5,
        record=CheckpointManifest,
        what="checkpoint",
        manifest_tag=T.CHECKPOINT_MANIFEST_SHA,
    )
    if found is None:
        report.problems.append(gone.replace("{ref}", report.ref))
        return None
    manifest, on_disk, problems = check_files(found, tags.get(T.CHECKPOINT_MANIFEST_SHA), CheckpointManifest)
    report.problems += problems
    if manifest is None:
        return None
    content = tree_digest({k: v for k, v in on_disk.items() if k != RUN_FACTS})  # as compress computes it
    if not problems and content != tags[T.CHECKPOINT_DIGEST]:
        report.problems.append(_mismatch(path, "content digest", tags[T.CHECKPOINT_DIGEST], content))
    linked = manifest.calibration.digest
    if T.CALIBRATION_DIGEST in tags and linked != tags[T.CALIBRATION_DIGEST]:
        report.problems.append(
            f"{show(path / MANIFEST)}: names calibration {linked}, registered {tags[T.CALIBRATION_DIGEST]}"
        )
    report.checked.append(f"checkpoint {show(path)} ({len(on_disk)} files{_where(found)})")
    _note_superseded(found, "checkpoint", report)
    if not problems:
        report.found[CHECKPOINT] = found
    return found


def _where(found: FileSet) -> str:
    return "" if found.where == IN_PLACE else f", from the {found.where}"


def _note_superseded(found: FileSet, what: str, report: Report) -> None:
    if found.where == IN_PLACE:
        return
    why = (
        f"now holds another run's {what}"
        if found.directory.exists()
        else "is not on this machine (another workspace's)"
    )
    report.notes.append(
        f"{show(found.directory)} {why}; this version's files were verified in the {found.where} "
        f"(`selfcal restore {report.ref} DEST` copies them out)"
    )


def _calibration(client, version, tags: dict, report: Report) -> FileSet | None:
    from selfcal.calibration.calibset import TOKENS, token_digest

    digest = tags.get(T.CALIBRATION_DIGEST)
    if not digest:
        report.problems.append(f"{report.ref}: {NO_CALIBRATION} (no {T.CALIBRATION_DIGEST} tag)")
        return None
    path = store.local_path(tags.get(T.CALIBRATION_URI))
    if path is None:
        report.problems.append(f"{report.ref}: calibration {digest} has no recorded location ({T.CALIBRATION_URI})")
        return None
    found, gone = locate(
        path,
        tags,
        digest_tag=T.CALIBRATION_DIGEST,
        md5_tag=T.CALIBRATION_FILES_MD5,
        record=CalibrationManifest,
        what="calibration set",
        manifest_tag=T.CALIBRATION_MANIFEST_SHA,
    )
    if found is None:
        manifest, on_disk, problems = None, {}, [gone.replace("{ref}", report.ref)]
    else:
        manifest, on_disk, problems = check_files(found, tags.get(T.CALIBRATION_MANIFEST_SHA), CalibrationManifest)
    report.problems += problems
    if manifest is not None and not problems:
        tokens = found.files.get(TOKENS)
        try:
            actual = token_digest(tokens) if tokens else None
        except Exception as err:  # unreadable tokens: safetensors and numpy raise their own types
            report.problems.append(f"{show(tokens)}: unreadable ({str(err).splitlines()[0]})")
        else:
            if actual is None:
                report.problems.append(f"{show(path / TOKENS)}: missing")
            elif actual != manifest.content_digest:
                report.problems.append(f"{show(tokens)}: token content does not match the manifest's content_digest")
            elif actual != digest:
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
        report.checked.append(f"calibration {show(path)} ({len(on_disk)} files{_where(found)})")
        _note_superseded(found, "calibration set", report)
        if not problems:
            report.found[CALIBRATION] = found
    return found


def _metrics(client, version, tags: dict, report: Report) -> None:
    path = store.local_path(tags.get(T.METRICS_URI))
    if path is None:
        return  # not evaluated yet: nothing to check, and lineage says so
    where = ""
    if not path.exists() and tags.get(T.METRICS_MD5):  # another workspace's file: this project's DVC cache
        for project in dict.fromkeys(p for p in (workspace_of(Path.cwd()), workspace_of(path.parent)) if p):
            cached, _ = from_dvc_cache(path, {path.name: tags[T.METRICS_MD5]}, workspace=project)
            if cached is not None:
                path, where = cached.files[path.name], f", from the {DVC_CACHE}"
                break
    elif path.is_file() and sha256_file(path) != tags.get(T.METRICS_SHA) and (other := _record_of(path)) is not None:
        # Another evaluation rewrote the file: of a later checkpoint, or of the same checkpoint registered again
        # (a compress re-run with the same inputs after a code change): this version's record is in the DVC cache
        md5 = tags.get(T.METRICS_MD5)
        cached, why = from_dvc_cache(path, {path.name: md5}) if md5 else (None, f"no md5 registered ({T.METRICS_MD5})")
        if cached is not None:
            path, where = cached.files[path.name], f", from the {DVC_CACHE}"
        elif other.checkpoint_digest != tags.get(T.CHECKPOINT_DIGEST):  # a later checkpoint's evaluation
            report.problems.append(
                f"{show(path)}: superseded: a later evaluation rewrote it, and this version's file is gone "
                f"from the workspace: {why}"
            )
            return
    if not path.is_file():
        report.problems.append(f"{show(path)}: metrics file missing")
        return
    actual = sha256_file(path)
    if actual != tags.get(T.METRICS_SHA):
        earlier = not where and store.evaluate_run_of_file(client, model_id_of(version), tags, path)
        if not earlier:
            report.problems.append(_mismatch(path, "sha256", tags.get(T.METRICS_SHA), actual))
            return
        # DVC restored an earlier evaluation of this version from its run-cache (the params it was made with
        # are back): the file is that run's record, byte for byte, not the registry's newest
        where = (
            f", evaluate run {earlier}'s record, restored by DVC's run-cache; the newest is run "
            f"{tags.get(T.EVALUATE_RUN)}"
        )
    try:
        recorded = read_evaluation(path).checkpoint_digest
    except DataError as err:
        report.problems.append(str(err))
        return
    if recorded != tags.get(T.CHECKPOINT_DIGEST):
        report.problems.append(
            f"{show(path)}: scores checkpoint {recorded}, registered {tags.get(T.CHECKPOINT_DIGEST)}"
        )
    report.checked.append(f"metrics {show(store.local_path(tags.get(T.METRICS_URI)))}{where}")


def _record_of(path: Path):
    """The evaluation record the file holds, or None when it holds none."""
    try:
        return read_evaluation(path)
    except DataError:
        return None


def verify(client, version) -> Report:
    """Every check, all problems collected: an auditor wants the full list, not the first."""
    tags = dict(version.tags)
    report = Report(ref=f"{version.name}:{version.version}")
    _checkpoint(tags, report)
    _calibration(client, version, tags, report)
    _metrics(client, version, tags, report)
    return report


def restore(client, version, dest: Path) -> list[Path]:
    """Copy a version's checkpoint and calibration set, verified, out of the workspace or the DVC cache into
    ``dest/checkpoint`` and ``dest/calibration``: how an auditor gets back a version a later run replaced."""
    import shutil

    from selfcal.artifacts import atomic_dir
    from selfcal.errors import ConfigError, VerificationError

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"{dest}: exists and is not an empty folder; restore writes into a new one")
    report = verify(client, version)
    if not report.ok:
        raise VerificationError(f"{report.ref}: cannot restore: {report.problems[0]}")
    tags = dict(version.tags)
    shas = {CHECKPOINT: tags.get(T.CHECKPOINT_MANIFEST_SHA), CALIBRATION: tags.get(T.CALIBRATION_MANIFEST_SHA)}
    records = {CHECKPOINT: CheckpointManifest, CALIBRATION: CalibrationManifest}
    written = []
    for what, found in report.found.items():
        target = dest / what
        with atomic_dir(target) as tmp:
            for rel, src in found.files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / rel)
            _, _, problems = check_tree(tmp, shas[what], records[what])  # the copies, not the sources
            if problems:
                raise VerificationError(f"{report.ref}: restored {what} does not verify: {problems[0]}")
        written.append(target)
    return written
