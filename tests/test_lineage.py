"""Lineage on a real pipeline run: two calibration sets, two registered checkpoints, one store.

The pipeline runs once (tiny model, in-process) into a temporary sqlite store; each
test then audits it through the library or `selfcal.cli.main`, and every tampering
test restores the byte it flipped.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from selfcal.artifacts import read_manifest
from selfcal.calibration.calibset import TOKENS, load_calibration_set
from selfcal.cli import main
from selfcal.config import parse_params
from selfcal.errors import ConfigError
from selfcal.lineage import store, trace
from selfcal.lineage import tags as T
from selfcal.lineage.registry import registered_name
from selfcal.lineage.tracking import open_client
from selfcal.modelio import fingerprint, resolve_model
from selfcal.pipeline import layout
from selfcal.pipeline.compress import compress
from selfcal.pipeline.evaluate import evaluate
from selfcal.pipeline.generate import generate
from selfcal.records import CheckpointManifest
from tests.helpers import small_params

# These evaluate models on the ARC-Easy and WikiText-2 files of ../shared/data.
pytestmark = pytest.mark.usefixtures("shared_data")

SOURCES = ("self", "vocab")


@pytest.fixture(scope="module")
def audited(tiny_model, tmp_path_factory):
    """generate -> compress -> evaluate for self-s0 and vocab-s0 (GPTQ), perplexity only."""
    work = tmp_path_factory.mktemp("lineage")
    overrides = {
        "calibration.sources": {"self": {"kind": "self"}, "vocab": {"kind": "vocab"}},
        "evaluation.tasks": [],
    }
    params = parse_params(small_params(tiny_model, work, **overrides), root=work)
    for source in SOURCES:
        generate(params, source, 0, progress=False)
        compress(params, source, 0, "gptq")
        evaluate(params, f"{source}-s0-gptq", progress=False)
    return params


def _uri(params) -> str:
    return params.tracking.tracking_uri


def _name(source: str) -> str:
    return f"tiny-llama-gptq-{source}"


def _cli(capsys, params, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--tracking-uri", _uri(params)])
    out, err = capsys.readouterr()
    return code, out, err


@contextmanager
def flipped(path: Path, offset: int = -1) -> Iterator[None]:
    """One byte of ``path`` inverted for the duration, then the original restored."""
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    try:
        yield
    finally:
        path.write_bytes(original)


def test_lineage_names_the_calibration_set_each_model_was_made_from(audited, tiny_model):
    client = open_client(_uri(audited))
    base = fingerprint(resolve_model(str(tiny_model)))
    digests = {s: load_calibration_set(layout.calibration_dir(audited, s, 0)).digest for s in SOURCES}
    assert digests["self"] != digests["vocab"]
    for source in SOURCES:
        chain = trace.trace(client, store.resolve_version(client, _name(source)))
        assert chain["missing"] == []
        cal = chain["calibration"]
        assert cal["digest"] == digests[source]
        assert (cal["name"], cal["source"], cal["seed"], cal["n_samples"], cal["seq_len"]) == (
            f"{source}-s0",
            source,
            0,
            4,
            32,
        )
        assert cal["params"]["kind"] == source
        assert cal["generator"]["digest"] == base.digest
        assert cal["generator"]["uses_weights"] is (source == "self")
        assert cal["dataset"]["digest"] == digests[source][:32] and cal["dataset"]["context"] == "calibration"
        assert cal["generate_run_id"] and cal["details_from"].startswith("generate run")
        assert chain["checkpoint"]["path"] == str(layout.checkpoint_dir(audited, source, 0, "gptq"))
        assert chain["checkpoint"]["method_params"]["group_size"] == 128
        assert chain["base_model"]["digest"] == base.digest
        assert chain["code"]["git_commit"] == T.UNKNOWN  # the temporary workdir is no git repository
        assert chain["code"]["dvc_lock_sha256"] == "absent"
        assert chain["model"]["model_id"] and chain["model"]["pipeline_run_id"]
        scored = json.loads(layout.metrics_file(audited, f"{source}-s0-gptq").read_text())
        assert chain["metrics"]["values"]["ppl.wikitext2"] == pytest.approx(scored["ppl.wikitext2"])
        # MLflow 3 keeps the same metrics, under the same names, on the LoggedModel behind the version.
        logged = client.get_logged_model(chain["model"]["model_id"])
        assert {m.key for m in logged.metrics} >= set(scored)


def test_calibration_digest_lists_only_the_models_made_from_it(audited, capsys):
    digest = load_calibration_set(layout.calibration_dir(audited, "self", 0)).digest
    code, out, _ = _cli(capsys, audited, "lineage", "--calibration", digest[:12])
    assert code == 0
    assert f"{_name('self')}:1" in out and _name("vocab") not in out
    code, out, _ = _cli(capsys, audited, "lineage", "--calibration", digest, "--json")
    assert [m["model"] for m in json.loads(out)] == [f"{_name('self')}:1"]
    code, out, _ = _cli(capsys, audited, "lineage", "--calibration", "0" * 64)
    assert code == 0 and "no registered model was made from calibration" in out


def test_cli_lineage_text_and_json(audited, capsys):
    """Text and JSON name the sha256 of all three records an auditor can hold without the weights (the checkpoint
    and calibration manifests and the metrics record), so each checks against the files with ``sha256sum``."""
    from selfcal.artifacts import MANIFEST
    from selfcal.hashing import sha256_file

    calib = layout.calibration_dir(audited, "vocab", 0)
    digest = load_calibration_set(calib).digest
    shas = {
        "checkpoint": sha256_file(layout.checkpoint_dir(audited, "vocab", 0, "gptq") / MANIFEST),
        "calibration": sha256_file(calib / MANIFEST),
        "metrics": sha256_file(layout.evaluation_file(audited, "vocab-s0-gptq")),  # the evaluation record
    }
    code, out, _ = _cli(capsys, audited, "lineage", f"{_name('vocab')}:1")
    assert code == 0
    assert f"model        {_name('vocab')}:1" in out
    assert f"  digest     {digest}  (manifest sha256 {shas['calibration']})" in out
    assert f"(manifest sha256 {shas['checkpoint']})" in out
    assert f"  record     sha256 {shas['metrics']}  (the registered record's)" in out
    assert "(tokenizer only)" in out and "ppl.wikitext2" in out and "MISSING" not in out
    code, out, _ = _cli(capsys, audited, "lineage", _name("vocab"), "--json")
    chain = json.loads(out)
    assert chain["calibration"]["digest"] == digest and chain["model"]["version"] == "1"
    assert chain["checkpoint"]["manifest_sha256"] == shas["checkpoint"]
    assert (chain["calibration"]["manifest_sha256"], chain["metrics"]["sha256"]) == (
        shas["calibration"],
        shas["metrics"],
    )


def test_verify_passes_on_untouched_artifacts(audited, capsys):
    for source in SOURCES:
        code, out, err = _cli(capsys, audited, "verify", _name(source))
        assert code == 0, err
        assert (
            out.startswith(f"verify: ok: {_name(source)}:1: checkpoint ")
            and "calibration " in out
            and "metrics " in out
        )


@pytest.mark.parametrize("target", ["checkpoint", "calibration"])
def test_one_flipped_byte_fails_verify_naming_the_file(audited, capsys, target):
    if target == "checkpoint":
        path = layout.checkpoint_dir(audited, "self", 0, "gptq") / "model.safetensors"
    else:
        path = layout.calibration_dir(audited, "self", 0) / TOKENS
    with flipped(path):
        code, _, err = _cli(capsys, audited, "verify", _name("self"))
        assert code == 2
        assert f"verify: {path}: sha256 mismatch" in err
        assert "failed verification: 1 problem(s)" in err
        code, _, err = _cli(capsys, audited, "verify", _name("vocab"))
        assert code == 0, err  # the other model's files are untouched
    assert _cli(capsys, audited, "verify", _name("self"))[0] == 0


def test_a_missing_file_and_an_unlisted_file_fail_verify_naming_them(audited, capsys):
    ckpt = layout.checkpoint_dir(audited, "vocab", 0, "gptq")
    config = ckpt / "config.json"
    original = config.read_bytes()
    config.unlink()
    try:
        code, _, err = _cli(capsys, audited, "verify", _name("vocab"))
    finally:
        config.write_bytes(original)
    assert code == 2 and f"verify: {config}: missing (listed in the manifest)" in err, err
    extra = ckpt / "extra.bin"
    extra.write_bytes(b"not registered")
    try:
        code, _, err = _cli(capsys, audited, "verify", _name("vocab"))
    finally:
        extra.unlink()
    assert code == 2 and f"verify: {extra}: not listed in the manifest" in err, err
    assert _cli(capsys, audited, "verify", _name("vocab"))[0] == 0


def test_rewriting_the_manifest_too_is_still_caught(audited, capsys):
    ckpt = layout.checkpoint_dir(audited, "vocab", 0, "gptq")
    manifest_path = ckpt / "manifest.json"
    weights = ckpt / "model.safetensors"
    original_manifest = manifest_path.read_text()
    with flipped(weights):
        from selfcal.hashing import sha256_file

        forged = json.loads(original_manifest)
        forged["files"]["model.safetensors"] = sha256_file(weights)
        manifest_path.write_text(json.dumps(forged))
        try:
            code, _, err = _cli(capsys, audited, "verify", _name("vocab"))
        finally:
            manifest_path.write_text(original_manifest)
    assert code == 2
    assert f"verify: {manifest_path}: sha256 mismatch (registered " in err


def test_model_registered_without_lineage_is_reported(audited, capsys):
    client = open_client(_uri(audited))
    client.create_registered_model("hand-made")
    client.create_model_version("hand-made", source=str(layout.checkpoint_dir(audited, "self", 0, "gptq")))
    code, out, _ = _cli(capsys, audited, "lineage", "hand-made:1")
    assert code == 0
    assert "calibration  no calibration lineage recorded" in out
    assert "MISSING      no calibration lineage recorded" in out
    code, _, err = _cli(capsys, audited, "verify", "hand-made:1")
    assert code == 2
    assert "verify: hand-made:1: no calibration lineage recorded" in err
    assert "verify: hand-made:1: no checkpoint recorded" in err


def test_unknown_model_and_bad_arguments_fail_in_one_line(audited, capsys):
    code, _, err = _cli(capsys, audited, "lineage", "no-such-model")
    assert code == 2 and "no-such-model: no registered model of that name" in err
    client = open_client(_uri(audited))
    if not client.search_registered_models("name = 'versionless'"):
        client.create_registered_model("versionless")
    code, _, err = _cli(capsys, audited, "lineage", "versionless")  # it said "no registered model of that name"
    assert code == 2 and err.strip() == "selfcal: error: versionless: registered, but it has no versions"
    code, _, err = _cli(capsys, audited, "verify", f"{_name('self')}:9")
    assert code == 2 and "no such model version" in err
    code, _, err = _cli(capsys, audited, "lineage", "--calibration", "xyz")
    assert code == 2 and "not a sha256 digest" in err
    code, _, err = _cli(capsys, audited, "lineage")
    assert code == 2 and "give MODEL[:VERSION] or --calibration DIGEST" in err


def test_missing_store_is_an_error_not_a_new_store(tmp_path, capsys):
    db = tmp_path / "absent.db"
    assert main(["lineage", "x", "--tracking-uri", f"sqlite:///{db}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not db.exists()


def test_tracking_off_registers_nothing_and_writes_no_store(tiny_model, tmp_path):
    params = parse_params(
        small_params(
            tiny_model, tmp_path, **{"tracking.enabled": False, "calibration.sources": {"vocab": {"kind": "vocab"}}}
        ),
        root=tmp_path,
    )
    generate(params, "vocab", 0, progress=False)
    manifest = compress(params, "vocab", 0, "gptq")
    assert manifest.calibration.source == "vocab"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "state").exists()


def test_registered_name_template_and_sanitising(tiny_model, tmp_path):
    assert (
        registered_name("{base}-{method}-{source}", base="org/Model.v1", method="gptq", source="self", seed=0)
        == "org-Model.v1-gptq-self"
    )
    assert registered_name("{base}:{seed}", base="m", method="x", source="y", seed=3) == "m-3"
    with pytest.raises(ConfigError, match=r"tracking.registered_model_name.*unknown field \{nope\}"):
        parse_params(
            small_params(tiny_model, tmp_path, **{"tracking.registered_model_name": "{base}-{nope}"}), root=tmp_path
        )


def test_models_lists_every_registered_version_for_an_auditor_who_knows_no_name(audited, capsys):
    code, out, _ = _cli(capsys, audited, "models")
    assert code == 0 and "registered model version(s):" in out.splitlines()[0]
    for source in SOURCES:
        assert f"  {_name(source)}:1  gptq  {source}-s0 (" in out
        digest = read_manifest(layout.checkpoint_dir(audited, source, 0, "gptq"), CheckpointManifest).content_digest
        assert re.search(rf"  {_name(source)}:1  gptq  {source}-s0 \(\w{{16}}\)  checkpoint {digest[:16]} ", out)
    if "hand-made:1" in out:  # registered by hand in the test above: said so, not hidden
        assert "hand-made:1  no selfcal lineage" in out
    code, out, _ = _cli(capsys, audited, "models", "--json")
    rows = {r["model"]: r for r in json.loads(out)}
    assert {f"{_name(s)}:1" for s in SOURCES} <= set(rows)
    assert all(rows[f"{_name(s)}:1"]["calibration"] == f"{s}-s0" for s in SOURCES)
    assert all(len(rows[f"{_name(s)}:1"]["checkpoint_digest"]) == 64 for s in SOURCES)


def test_params_installed_from_a_committed_profile_is_recorded_as_that_profile_not_as_dirty(tmp_path):
    """`selfcal run --profile NAME` copies profiles/NAME.yaml onto params.yaml: every model of the H200 study was
    tagged "uncommitted changes" though its params were committed, byte for byte, under the profile's name."""
    import subprocess

    from selfcal.lineage import tags as T
    from selfcal.lineage.registry import code_state

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "study.yaml").write_text("model: {path: big}\n")
    (tmp_path / "params.yaml").write_text("model: {path: small}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    assert code_state(tmp_path)[T.GIT_DIRTY] == "false" and T.PARAMS_PROFILE not in code_state(tmp_path)

    (tmp_path / "params.yaml").write_text((tmp_path / "profiles" / "study.yaml").read_text())
    state = code_state(tmp_path)
    assert state[T.GIT_DIRTY] == "false" and state[T.PARAMS_PROFILE] == "profiles/study.yaml"

    (tmp_path / "params.yaml").write_text("model: {path: edited}\n")
    state = code_state(tmp_path)
    assert state[T.GIT_DIRTY] == "true" and T.PARAMS_PROFILE not in state


def test_concurrent_items_hang_under_the_orchestrators_run_without_failing_it(tmp_path, monkeypatch):
    """On the H200 (eight items at once) every item resumed the execution's parent run, re-tagged it with its own
    pid and ended it on exit; the next item's dead-run sweep then marked the whole execution FAILED mid-run. Now an
    item's run only hangs under the parent: an item process that ended leaves the parent RUNNING, the
    orchestrator's."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from selfcal.config import parse_params
    from selfcal.lineage.tracking import EXECUTION_ENV, open_pipeline_run, stage_run
    from tests.helpers import REPO, small_params, write_params

    raw = small_params(tmp_path / "model", tmp_path)
    params = parse_params(raw, root=tmp_path)
    monkeypatch.setenv(EXECUTION_ENV, "prefect-test")
    parent = open_pipeline_run(params, "prefect-test")  # the orchestrator (this process) opens it
    path = write_params(tmp_path / "params.yaml", raw)
    item = (
        "from selfcal.config import load_params; from selfcal.lineage.tracking import stage_run\n"
        f"with stage_run(load_params({str(path)!r}), 'generate', 'self-0') as run: pass\n"
    )
    subprocess.run([sys.executable, "-c", item], check=True, cwd=REPO)  # an item that ran and whose process ended
    with stage_run(params, "compress", "self-0-gptq"):  # the next item: its sweep must leave the parent alone
        pass
    client = MlflowClient(tracking_uri=raw["tracking"]["tracking_uri"])
    run = client.get_run(parent)
    assert run.info.status == "RUNNING", run.data.tags
    exp = run.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(c.info.run_name for c in children) == ["compress@self-0-gptq", "generate@self-0"]
    assert all(c.info.status == "FINISHED" for c in children)


def test_a_stage_that_opened_its_executions_parent_run_and_failed_ends_both_failed(tmp_path, monkeypatch):
    """A plain `dvc repro` has no orchestrator: its first stage opens the parent run; when that stage raises,
    the parent ends FAILED with it, as a `with mlflow.start_run()` ends it, not FINISHED."""
    from mlflow import MlflowClient

    from selfcal.config import parse_params
    from selfcal.lineage.tracking import EXECUTION_ENV, stage_run
    from tests.helpers import small_params

    raw = small_params(tmp_path / "model", tmp_path)
    params = parse_params(raw, root=tmp_path)
    monkeypatch.setenv(EXECUTION_ENV, "dvc-test")
    with pytest.raises(RuntimeError, match="injected"), stage_run(params, "generate", "self-0"):
        raise RuntimeError("injected")
    client = MlflowClient(tracking_uri=raw["tracking"]["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("selfcal").experiment_id])
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [
        ("generate@self-0", "FAILED"),
        ("pipeline dvc-test", "FAILED"),
    ]


def test_an_earlier_evaluation_restored_by_dvcs_run_cache_verifies_and_lineage_shows_its_metrics(
    tiny_model, tmp_path, capsys
):
    """An audit: `dvc exp run -S evaluation.limit=100`, then `dvc repro` with the params back: DVC restored the
    first evaluation record from its run-cache (running no code), the registry's tags still named the
    experiment's, and `verify` called the file tampered with, `lineage` showed the experiment's numbers. The
    file is an earlier evaluate run's record, byte for byte: verify says so and passes, lineage shows that
    run's metrics; a changed byte still fails."""
    overrides = {"calibration.sources": {"vocab": {"kind": "vocab"}}, "evaluation.tasks": []}
    params = parse_params(small_params(tiny_model, tmp_path, **overrides), root=tmp_path)
    generate(params, "vocab", 0, progress=False)
    compress(params, "vocab", 0, "gptq")
    first = evaluate(params, "vocab-s0-gptq", progress=False)
    record = layout.evaluation_file(params, "vocab-s0-gptq")
    restored = record.read_bytes()
    other = parse_params(
        small_params(tiny_model, tmp_path, **overrides, **{"evaluation.perplexity.wikitext2.max_windows": 2}),
        root=tmp_path,
    )
    second = evaluate(other, "vocab-s0-gptq", progress=False)
    assert second.perplexity["wikitext2"].perplexity != first.perplexity["wikitext2"].perplexity
    record.write_bytes(restored)  # what DVC's run-cache puts back
    code, out, err = _cli(capsys, params, "verify", _name("vocab"))
    assert code == 0, err
    assert "record, restored by DVC's run-cache; the newest is run " in out
    import mlflow

    reads = collections.Counter()
    real = mlflow.MlflowClient.get_logged_model

    def counted(client, model_id):
        reads[model_id] += 1
        return real(client, model_id)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlflow.MlflowClient, "get_logged_model", counted)
        code, out, _ = _cli(capsys, params, "lineage", _name("vocab"), "--json")
    met = json.loads(out)["metrics"]
    assert met["values"]["ppl.wikitext2"] == pytest.approx(first.perplexity["wikitext2"].perplexity)
    assert "restored by DVC's run-cache" in met["note"]
    assert list(reads.values()) == [1]  # the version's LoggedModel read once, though two runs had to be told apart
    with flipped(record, offset=10):
        code, _, err = _cli(capsys, params, "verify", _name("vocab"))
        assert code == 2 and f"verify: {record}: sha256 mismatch" in err


def test_lineage_shows_the_evaluation_settings_beside_the_metrics(audited, capsys):
    """An audit: after `dvc exp run -S evaluation.limit=10`, `lineage` showed 10-item accuracies where it had
    shown 40-item ones, with nothing to tell them apart. The evaluate run logs its evaluation params; lineage
    prints the ones that change what a number means, and --json has them all."""
    code, out, _ = _cli(capsys, audited, "lineage", _name("self"))
    assert code == 0
    (line,) = [x for x in out.splitlines() if x.startswith("  settings")]
    assert "tasks=[]" in line and "limit=20" in line and "engine=fast" in line
    code, out, _ = _cli(capsys, audited, "lineage", _name("self"), "--json")
    settings = json.loads(out)["metrics"]["settings"]
    assert settings["limit"] == "20" and settings["perplexity.wikitext2.max_windows"] == "4"


def test_generating_a_set_again_keeps_the_one_a_model_was_registered_from(tiny_model, tmp_path, capsys, caplog):
    """A second `selfcal generate` of one item (same params and seed, so the same tokens) rewrote the manifest's
    run facts, and `verify` of the model made from the set then failed: "superseded: another run wrote another
    calibration set there" naming the very same digest. The set is kept now; a set that differs is rewritten."""
    import logging

    overrides = {"calibration.sources": {"self": {"kind": "self"}}, "evaluation.tasks": []}
    params = parse_params(small_params(tiny_model, tmp_path, **overrides), root=tmp_path)
    generate(params, "self", 0, progress=False)
    compress(params, "self", 0, "gptq")
    evaluate(params, "self-s0-gptq", progress=False)
    manifest = layout.calibration_dir(params, "self", 0) / "manifest.json"
    before = manifest.read_bytes()
    with caplog.at_level(logging.INFO, logger="selfcal.generate"):
        again = generate(params, "self", 0, progress=False)
    assert manifest.read_bytes() == before and "already holds this very set" in caplog.text
    assert again.content_digest == json.loads(before)["content_digest"]
    capsys.readouterr()
    code, out, err = _cli(capsys, params, "verify", _name("self"))
    assert code == 0 and out.startswith("verify: ok:"), err
    rerun = json.loads(before) | {"created_utc": "2030-01-01T00:00:00+00:00"}  # a rewrite by another run (no DVC)
    manifest.write_text(json.dumps(rerun, indent=2) + "\n")
    code, _, err = _cli(capsys, params, "verify", _name("self"))
    assert code == 2 and "self-s0: superseded: another run wrote the same calibration set there (" in err, err
    other = parse_params(small_params(tiny_model, tmp_path, **overrides, **{"calibration.n_samples": 3}), root=tmp_path)
    assert generate(other, "self", 0, progress=False).n_samples == 3 and manifest.read_bytes() != before
