"""Reliability guards (issue 16): hashes that reproduce, bad input refused in one line before compute,
paths that stay inside the workspace."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from selfcal.cli import main
from selfcal.config import load_params, parse_params
from selfcal.errors import ConfigError
from selfcal.pipeline import layout
from tests.helpers import params_error, small_params, write_params


def _err(data) -> str:
    return params_error(data)


# -- YAML ---------------------------------------------------------------------------------------
def test_a_duplicate_key_is_refused_with_both_lines(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("model:\n  path: a\ncalibration:\n  seq_len: 8\n  seq_len: 16\n")
    with pytest.raises(ConfigError) as e:
        load_params(p)
    assert f"{p}:5:3: not valid YAML: duplicate key 'seq_len' (first at line 4)" == str(e.value)


def test_a_syntax_error_names_line_and_column(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("model:\n  path: a\n calibration: [\n")
    with pytest.raises(ConfigError) as e:
        load_params(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3:") and "not valid YAML" in msg and "\n" not in msg


def test_a_profile_with_a_duplicate_key_is_refused(tmp_path):
    from selfcal.profiles import read_profile

    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "x.yaml").write_text("a: 1\na: 2\n")
    with pytest.raises(ConfigError, match=r"x.yaml:2:1: not valid YAML: duplicate key 'a'"):
        read_profile(tmp_path, "x")


# -- schema holes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seeds", [[True], [0, False], [-1], ["1"]])
def test_seeds_are_non_negative_integers_not_bools(tiny_model, tmp_path, seeds):
    msg = _err(small_params(tiny_model, tmp_path, **{"calibration.seeds": seeds}))
    assert msg.startswith("params.yaml: calibration.seeds.")


@pytest.mark.parametrize(
    ("source", "key", "value", "why"),
    [
        ({"kind": "self"}, "t_initial", 1e-45, "1e-45 is below 0.001: sampling there is greedy in all but name"),
        ({"kind": "self"}, "t_final", float("nan"), "Input should be a finite number"),
        ({"kind": "ji", "prompt_path": "x.jsonl"}, "temperature", 1e-9, "1e-09 is below 0.001"),
    ],
)
def test_a_temperature_that_would_sample_nan_is_refused(tiny_model, tmp_path, source, key, value, why):
    """An audit's t_initial = t_final = 1e-45 passed check and generate made a set of the vocabulary's last
    id throughout: logits / t overflowed to inf, softmax to NaN, and the inverse CDF fell to the last index."""
    data = small_params(tiny_model, tmp_path, **{"calibration.sources.s": {**source, key: value}})
    msg = _err(data)
    assert msg.startswith(f"params.yaml: calibration.sources.s.{key}: ") and why in msg, msg


def test_temperature_zero_is_greedy_and_allowed_where_it_means_greedy(tiny_model, tmp_path):
    from selfcal.config import parse_params

    data = small_params(tiny_model, tmp_path, **{"calibration.sources.s": {"kind": "self", "t_initial": 0.0}})
    assert parse_params(data, source="params.yaml", root=tmp_path).calibration.sources["s"].t_initial == 0.0
    ji = {"kind": "ji", "prompt_path": "x.jsonl", "temperature": 0.0}
    assert "Input should be greater than 0" in _err(small_params(tiny_model, tmp_path, **{"calibration.sources.s": ji}))


def _misspell_section(d):
    d["calibraton"] = d.pop("calibration")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_misspell_section, "params.yaml: calibraton: unknown key (did you mean 'calibration'? it is required and "
         "missing)"),
        (lambda d: d["calibration"].update(batch_size=0),
         "params.yaml: calibration.batch_size: Input should be greater than or equal to 1 or 'auto'"),
        (lambda d: d["evaluation"].update(batch_size=-1),
         "params.yaml: evaluation.batch_size: Input should be greater than or equal to 1 or 'auto'"),
        (lambda d: d["calibration"]["sources"]["self"].update(kind="selff"),
         "params.yaml: calibration.sources.self.kind: unknown kind 'selff'; known: 'self', 'corpus', 'vocab', 'ji'"),
        (lambda d: d["calibration"]["sources"]["self"].pop("kind"),
         "params.yaml: calibration.sources.self.kind: required key is missing; known: 'self', 'corpus', 'vocab', 'ji'"),
        (lambda d: d["calibration"].update(n_sample=3, seq_len=0),
         "params.yaml: calibration.n_sample: unknown key (did you mean 'n_samples'?) (+1 more)"),
        (lambda d: d["calibration"]["sources"].update(hot={"kind": "self", "t_initail": 2.0}),
         "params.yaml: calibration.sources.hot.t_initail: unknown key (did you mean 't_initial'?)"),
        (lambda d: d["calibration"]["sources"].update(web={"kind": "corpus", "path": "x.jsonl", "text_feild": "t"}),
         "params.yaml: calibration.sources.web.text_feild: unknown key (did you mean 'text_field'?)"),
        (lambda d: d["compression"].update(wanda={"sparsty": 0.5}),
         "params.yaml: compression.wanda.sparsty: unknown key (did you mean 'sparsity'?)"),
        (lambda d: d.setdefault("tracking", {}).update(zzz=1),
         "params.yaml: tracking.zzz: unknown key; known: enabled, experiment, registered_model_name, tracking_uri"),
    ],
)  # fmt: skip
def test_a_schema_error_names_what_the_user_wrote_in_one_line(tiny_model, tmp_path, change, expected):
    """An audit: a misspelt section was reported as the section it left missing, with the typo behind
    "(+1 more)"; `int | 'auto'` fields leaked pydantic's union labels (batch_size.constrained-int) and hid
    'auto'; an unknown source kind came as pydantic's own tag message. A misspelt optional key names the key
    it meant (inside a source of any name and kind too), or, with none close, the keys that are known."""
    data = small_params(tiny_model, tmp_path)
    change(data)
    assert _err(data) == expected


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("calibration.seeds", [0, 0], "seeds must be unique"),  # two identical sets, one model registered twice
        ("calibration.sources.s", {"kind": "self", "top_p": 0.0}, "greater than 0"),  # no token left to sample
        ("calibration.sources.s", {"kind": "ji", "prompt_path": "x.jsonl", "drop_fraction": 1.0}, "less than 1"),
    ],
)
def test_a_value_no_stage_can_work_with_is_refused_by_the_schema(tiny_model, tmp_path, key, value, why):
    msg = _err(small_params(tiny_model, tmp_path, **{key: value}))
    assert msg.startswith(f"params.yaml: {key.removesuffix('.s')}") and why in msg, msg


def test_a_tracking_uri_is_not_checked_while_tracking_is_off():
    from types import SimpleNamespace

    from selfcal.pipeline.check import check_tracking_uri

    off = SimpleNamespace(tracking=SimpleNamespace(enabled=False, tracking_uri="htp://nohost"))
    assert check_tracking_uri(off) is None  # nothing will be logged there: no reason to refuse the params
    with pytest.raises(ConfigError, match="'htp://nohost' is no MLflow store URI"):
        check_tracking_uri(SimpleNamespace(tracking=SimpleNamespace(enabled=True, tracking_uri="htp://nohost")))


def test_evaluation_batch_size_zero_is_refused(tiny_model, tmp_path):
    msg = _err(small_params(tiny_model, tmp_path, **{"evaluation.batch_size": 0}))
    assert msg.startswith("params.yaml: evaluation.batch_size")


@pytest.mark.parametrize("name", ["-h", "--version", ".hidden", "a/b", ""])
def test_a_source_name_must_be_a_safe_folder_and_cli_word(tiny_model, tmp_path, name):
    data = small_params(tiny_model, tmp_path)
    data["calibration"]["sources"] = {name: data["calibration"]["sources"]["self"]}
    assert "must start with a letter or digit" in _err(data)


@pytest.mark.parametrize("name", ["1e3", "0x1F", "0o17", "12", "1_000"])
def test_a_source_name_dvcs_yaml_reads_as_a_number_is_refused(tiny_model, tmp_path, name):
    """PyYAML (YAML 1.1) reads `1e3:` as a string, DVC's ruamel (1.2) as 1000.0: its matrix then had no
    generate@1e3-* item, and `dvc repro` dropped the source without a word."""
    data = small_params(tiny_model, tmp_path)
    data["calibration"]["sources"] = {name: data["calibration"]["sources"]["self"], "s1e3": {"kind": "vocab"}}
    expected = f"source name {name!r} reads as a number in DVC's YAML; give it a letter"
    assert _err(data) == f"params.yaml: calibration.sources: {expected}"
    del data["calibration"]["sources"][name]
    parse_params(data, root=tmp_path)  # a name with a letter is fine
    data["calibration"]["sources"]["0b2"] = {"kind": "vocab"}  # no binary number: a string to YAML 1.2 too
    parse_params(data, root=tmp_path)


@pytest.mark.parametrize(
    ("word", "what"), [("on", "bool True"), ("null", "null"), ("2024-01-01", "date 2024-01-01"), ("12", "int 12")]
)
def test_a_source_name_yaml_reads_as_a_value_is_named_as_written_not_as_a_key_nobody_wrote(tmp_path, word, what):
    """`on:` is True to PyYAML: the error said `calibration.sources.1: Input should be a valid string`."""
    (tmp_path / "params.yaml").write_text(
        f"model: {{path: x}}\ncalibration:\n  sources:\n    {word}: {{kind: vocab}}\n    ok: {{kind: vocab}}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_params(tmp_path / "params.yaml")
    assert str(e.value) == (
        f"{tmp_path / 'params.yaml'}: calibration.sources: a source name reads as {what} in YAML, not as a name "
        "(unquoted on/off/yes/no, null, numbers and dates are values): give it a letter-led name"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("calibration.n_samples", True), ("calibration.seq_len", True), ("evaluation.batch_size", True),
     ("evaluation.limit", False)],
)  # fmt: skip
def test_a_yes_or_no_where_a_number_goes_is_refused(tiny_model, tmp_path, key, value):
    """pydantic's lax mode took `n_samples: true` as 1 (and `seq_len: true` as 1, then refused it as "greater than
    or equal to 2"); true/false are only taken by yes/no keys."""
    section, name = key.split(".")
    msg = _err(small_params(tiny_model, tmp_path, **{key: value}))
    assert msg == f"params.yaml: {section}: {name}: {str(value).lower()} is a yes/no, not a number or a name", msg
    parse_params(small_params(tiny_model, tmp_path, **{"model.trust_remote_code": False}), root=tmp_path)


@pytest.mark.parametrize(
    ("key", "value"), [("compression.methods", ["gptq", "gptq"]), ("evaluation.tasks", ["arc_easy"] * 2)]
)
def test_a_method_or_task_listed_twice_is_refused(tiny_model, tmp_path, key, value):
    """The same method twice is one DVC item (DVC collapses it); the same task twice was scored twice."""
    assert (
        _err(small_params(tiny_model, tmp_path, **{key: value})) == f"params.yaml: {key}: {value[0]!r} is listed twice"
    )


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--jobs", "0"], "argument --jobs/-j: 0 is less than 1"),
        (["--timeout", "0"], "argument --timeout: 0 is not above 0"),
        (["--timeout", "inf"], "argument --timeout: inf is not above 0"),
        (["--retries", "-1"], "argument --retries: -1 is less than 0"),
        (["--retry-delay", "-5"], "argument --retry-delay: -5 is not at least 0"),
        (["--retry-delay", "x"], "argument --retry-delay: 'x' is not a number of seconds"),
    ],
)
def test_run_refuses_counts_and_durations_no_attempt_could_use_in_one_line(capsys, argv, why):
    """`run --timeout 0` started Prefect's server and killed every item at once (47 lines, two tracebacks)."""
    from selfcal.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", *argv])
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1] == f"selfcal run: error: {why}"


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("htp://x", "'htp://x' is no MLflow store URI"),
        ("/nonexistent/dir", "no MLflow store at /nonexistent/dir (no such folder)"),
        ("file:///nonexistent/dir", "no MLflow store at /nonexistent/dir (no such folder)"),
        ("sqlite:////nonexistent/mlflow.db", "no MLflow store at /nonexistent/mlflow.db"),
        ("http://127.0.0.1:9", "the MLflow server at http://127.0.0.1:9 does not answer"),
        ("http://u:secret@127.0.0.1:9", "the MLflow server at http://u:***@127.0.0.1:9 does not answer"),
    ],
)
@pytest.mark.parametrize("command", [["models"], ["lineage", "m:1"], ["verify", "m"]])
def test_an_audit_command_on_a_store_it_cannot_read_says_so_in_one_line_at_once(capsys, uri, why, command):
    """`models --tracking-uri htp://x` and a missing folder were MLflow tracebacks; a dead server was minutes of
    MLflow's retries, then "no such model version", which blamed the model for the server."""
    import time

    from selfcal.cli import main

    t0 = time.monotonic()
    assert main([*command, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"selfcal: error: --tracking-uri: {why}"), err
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize(
    ("ji", "why"),
    [
        ({"pool_size": 1}, "pool_size: a pool of 1 keeps no text (the filter keeps those strictly below the 80th"),
        ({"pool_size": 4, "max_new_tokens": 8}, "pool_size: at most 3 kept texts of at most 2 + 8 tokens give at most "
         "33 tokens, too few for a window of calibration.seq_len 64"),
    ],
)  # fmt: skip
def test_a_ji_pool_that_cannot_fill_one_window_is_refused_by_check(tiny_model, tmp_path, capsys, ji, why):
    """A pool of one always failed (the perplexity filter is strict), and a pool too small for one window failed
    too, each only after the model had generated and scored the whole pool."""
    (tmp_path / "prompts.jsonl").write_text('{"text": "Once upon a time"}\n' * 4)
    source = {"kind": "ji", "prompt_path": str(tmp_path / "prompts.jsonl"), "max_new_tokens": 16, **ji}
    data = small_params(tiny_model, tmp_path, **{"calibration.seq_len": 64, "calibration.sources": {"ji": source}})
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"selfcal: error: calibration.sources.ji.{why}"), err
    source.update(pool_size=8, max_new_tokens=16)  # 6 texts of up to 19 tokens: 114 >= 65, it may fill one
    assert _check(tmp_path, data, capsys)[0] == 0


def test_model_device_cuda_without_cuda_is_noted_by_check_and_refused_where_the_stages_run(
    tiny_model, tmp_path, capsys
):
    """`check` passed it and `dvc repro` failed at generate: the guard runs where DVC runs the stages, so it
    refuses; `check` alone (maybe on a coordinator without the workers' CUDA) and a fanning-out flow's guard note
    it and pass."""
    import torch

    from selfcal.pipeline.guard import guard

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = small_params(tiny_model, tmp_path, **{"model.device": "cuda"})
    assert main(["--params", str(write_params(tmp_path / "params.yaml", data)), "check"]) == 0
    assert "note: model.device is cuda and this machine has no CUDA device" in capsys.readouterr().out
    params = parse_params(data, root=tmp_path)
    with pytest.raises(ConfigError, match="model.device: 'cuda' requested but no CUDA device is available"):
        guard(params)
    assert "note: model.device is cuda" in guard(params, stages_here=False)


def test_the_store_probe_counts_any_answer_and_refuses_a_port_that_speaks_no_http(monkeypatch):
    """A TLS handshake the probe cannot verify is MLflow's client's business (MLFLOW_TRACKING_INSECURE_TLS); an
    SSH banner on the port was a traceback (http.client's BadStatusLine is no OSError)."""
    import socket
    import ssl
    import threading
    import urllib.error
    import urllib.request

    from selfcal.lineage.tracking import _probe_server

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)

        def banner():
            conn, _ = server.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            conn.close()

        threading.Thread(target=banner, daemon=True).start()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        with pytest.raises(ConfigError, match=rf"^--tracking-uri: the MLflow server at {uri} does not answer \(Bad"):
            _probe_server(uri, "--tracking-uri")

    def unverified(*args, **kwargs):
        raise urllib.error.URLError(ssl.SSLError(1, "CERTIFICATE_VERIFY_FAILED"))

    monkeypatch.setattr(urllib.request, "urlopen", unverified)
    _probe_server("https://mlflow.internal", "--tracking-uri")  # it answered: no error


def test_a_database_store_needs_its_driver_and_a_host_that_answers():
    """An auditor pointing --tracking-uri at the server's own PostgreSQL got SQLAlchemy's traceback: `postgresql://`
    wants psycopg 3 (not installed; psycopg2 is), and a host that is down."""
    import importlib.util
    import socket

    from selfcal.lineage.tracking import _probe_database

    if importlib.util.find_spec("psycopg") is None:
        with pytest.raises(ConfigError, match=r"^--tracking-uri: postgresql needs the psycopg driver, which is not"):
            _probe_database("postgresql://u:secret@127.0.0.1/db", "--tracking-uri")
    with pytest.raises(ConfigError, match=r"^--tracking-uri: the database at 127\.0\.0\.1:9 does not answer"):
        _probe_database("postgresql+psycopg2://u:secret@127.0.0.1:9/db", "--tracking-uri")
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
    except OSError:
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    _probe_database("postgresql+psycopg2://postgres@127.0.0.1/test", "--tracking-uri")  # default port 5432


def test_a_folder_store_mlflow_will_not_serve_and_a_uri_from_the_environment_are_one_line_naming_their_origin(
    tiny_model, tmp_path, capsys, monkeypatch
):
    """MLflow 3 refuses its folder store (maintenance mode) with a traceback; a URI that came from
    $MLFLOW_TRACKING_URI was blamed on tracking.tracking_uri, which the params leave unset."""
    from urllib.parse import quote

    from selfcal.cli import main

    (tmp_path / "my runs").mkdir()
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert main(["models", "--tracking-uri", f"file://{quote(str(tmp_path / 'my runs'))}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfcal: error: models: MLflow: "), err
    data = small_params(tiny_model, tmp_path)
    del data["tracking"]["tracking_uri"]
    write_params(tmp_path / "params.yaml", data)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://x")
    assert main(["models"]) == 2
    assert capsys.readouterr().err.strip() == (
        "selfcal: error: $MLFLOW_TRACKING_URI: 'htp://x' is no MLflow store URI (sqlite:///FILE, postgresql://..., "
        "http(s)://HOST, or a folder)"
    )


# -- paths ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["../../../x", "/etc", "self-s0-gptq/../../x", ".."])
def test_an_evaluate_target_is_a_checkpoint_name_never_a_path(tiny_model, tmp_path, target):
    p = parse_params(small_params(tiny_model, tmp_path), root=tmp_path)
    with pytest.raises(ConfigError, match="is not a checkpoint name"):
        layout.checkpoint_path(p, target)


def test_selfcal_evaluate_with_a_path_writes_nothing(tiny_model, tmp_path, capsys, monkeypatch):
    path = write_params(tmp_path / "params.yaml", small_params(tiny_model, tmp_path))
    monkeypatch.chdir(tmp_path)
    rc = main(["--params", str(path), "evaluate", "../../../x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "is not a checkpoint name" in err[0]
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("*.json"))


# -- the checkpoint digest covers what determines the model, not how the run went ---------------------
def test_the_same_inputs_give_the_same_checkpoint_digest(tiny_model, tmp_path):
    from selfcal.pipeline.compress import compress
    from selfcal.pipeline.generate import generate

    digests, facts = [], []
    for i in range(2):
        work = tmp_path / f"run{i}"
        p = parse_params(small_params(tiny_model, work, **{"tracking.enabled": False}), root=work)
        generate(p, "self", 0, progress=False)
        manifest = compress(p, "self", 0, "gptq")
        ckpt = layout.checkpoint_dir(p, "self", 0, "gptq")
        digests.append(manifest.content_digest)
        facts.append(json.loads((ckpt / "run.json").read_text()))
        report = json.loads((ckpt / "compression.json").read_text())
        assert not {"compress_seconds", "verify_seconds", "peak_rss_bytes"} & set(report), "run facts in the digest"
        assert "run.json" in manifest.files  # listed, so verify still catches a flipped byte in it
    assert digests[0] == digests[1]
    assert set(facts[0]) >= {"compress_seconds", "verify_seconds", "peak_rss_bytes"}


# -- one lock for every writer -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--source", "self", "--seed", "0"],
        ["compress", "--source", "self", "--seed", "0", "--method", "gptq"],
        ["evaluate", "dense"],
        ["inspect", "--source", "self", "--seed", "0"],
        ["aggregate"],
    ],
    ids=lambda a: a[0],
)
def test_a_held_workspace_refuses_every_writing_command_naming_the_holder(tiny_model, tmp_path, capsys, argv):
    from tests.helpers import hold_workspace

    path = write_params(tmp_path / "params.yaml", small_params(tiny_model, tmp_path))
    with hold_workspace(tmp_path, "selfcal run --profile paper") as owner:
        rc = main(["--params", str(path), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert f"is in use by selfcal run --profile paper (pid {owner} on " in err[0] and "since 20" in err[0]
    assert not (tmp_path / "artifacts").exists(), "nothing may be written"


def test_a_held_workspace_refuses_a_stage_command(tiny_model, tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, hold_workspace

    write_params(tmp_path / "params.yaml", small_params(tiny_model, tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "stages.generate", "--source", "self", "--seed", "0"]
    with hold_workspace(tmp_path, "dvc repro") as owner:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"is in use by dvc repro (pid {owner}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists()


def test_the_lock_holder_ends_with_its_owner_and_children_of_the_owner_go_on(tmp_path):
    import subprocess
    import sys
    import time

    from selfcal.workspace_lock import held_by_ancestor, read_holder, write_guard

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    holder = subprocess.Popen(
        [sys.executable, "-m", "selfcal.workspace_lock", str(tmp_path), str(owner.pid), "dvc repro"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    rec = read_holder(tmp_path)
    assert rec.owner == owner.pid and not held_by_ancestor(rec)
    assert held_by_ancestor(rec, pid=owner.pid)  # the owner's own stages are part of its run
    owner.kill()
    owner.wait()
    holder.wait(timeout=10)  # the holder notices its owner is gone and lets go
    t0 = time.monotonic()
    with write_guard(tmp_path, label="next"):
        assert time.monotonic() - t0 < 5


# -- check reads what the stages will read; no tracebacks from bad inputs ------------------------------
def _check(tmp_path, data, capsys) -> tuple[int, list[str]]:
    path = write_params(tmp_path / "params.yaml", data)
    rc = main(["--params", str(path), "check"])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("calibration.sources.c4", "max_documents", 1), ("calibration.sources.c4", "hub_split", "validation"),
     ("evaluation.perplexity.wikitext2", "hub_config", "en")],
)  # fmt: skip
def test_a_hub_only_key_on_a_local_file_is_refused_by_check(tiny_model, tmp_path, capsys, section, key, value):
    """An audit's `max_documents: 1` on the local C4 file made the same set as without it: the key caps what a
    hub dataset streams, and a local file is read whole. Set on a local path, it is refused, not ignored."""
    (tmp_path / "c4.jsonl").write_text("".join(f'{{"text": "document {i} " }}\n' for i in range(50)))
    data = small_params(tiny_model, tmp_path)
    data["calibration"]["sources"]["c4"] = {"kind": "corpus", "path": "./c4.jsonl", "allow_overlap": True}
    node = data
    for part in section.split("."):
        node = node[part]
    node[key] = value
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1, err
    assert f"{section}.{key}: applies to a hub dataset only, and " in err[0] and "read whole: remove the key" in err[0]


def test_a_binary_corpus_is_refused_by_check_in_one_line(tiny_model, tmp_path, capsys):
    (tmp_path / "blob.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 50)
    data = small_params(tiny_model, tmp_path)
    data["calibration"]["sources"]["c4"] = {"kind": "corpus", "path": "./blob.txt"}
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and "blob.txt: not UTF-8 text (byte 0x89 at offset 0)" in err[0]


def test_a_diagnostics_reference_too_short_for_the_sets_is_refused_by_check_and_its_stride_makes_it_fit(
    tiny_model, tmp_path, capsys
):
    """The H200 lease: c4_demo gives 81 windows of 2048 for sets of 128; check passed, every inspect item failed
    in DVC. Now check counts the reference's windows; calibration.diagnostics.window_stride makes it fit, and the
    stage then reads overlapping windows from it."""
    from selfcal.pipeline.generate import generate
    from selfcal.pipeline.inspect import inspect_stage

    (tmp_path / "ref.txt").write_text("a few words of text that the tiny tokenizer cuts up. " * 3)
    data = small_params(tiny_model, tmp_path, **{"tracking.enabled": False})  # sets of 4 x 32 tokens
    data["calibration"]["diagnostics"] = {"reference_path": "./ref.txt"}
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1, err
    assert "calibration.diagnostics.reference_path: corpus gives" in err[0] and "fewer than the 4 requested" in err[0]
    data["calibration"]["diagnostics"]["window_stride"] = 2
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 0, err
    params = parse_params(data, root=tmp_path)
    generate(params, "self", 0, progress=False)
    result = inspect_stage(params, "self", 0)
    assert result["activation"]["reference"] == "./ref.txt"


def test_a_corpus_too_small_for_the_sets_is_refused_by_check_and_a_window_stride_makes_it_fit(
    tiny_model, tmp_path, capsys
):
    """The Cosmopedia stand-in gives 124 windows of 2048 for sets of 128: check passed and generate failed in DVC.
    Now check tokenizes the corpus (no model) and says so; overlapping windows (window_stride) make it fit."""
    from selfcal import textdata

    (tmp_path / "small.txt").write_text("a few words of text that the tiny tokenizer cuts up. " * 3)
    data = small_params(tiny_model, tmp_path)  # sets of 4 x 32 tokens
    data["calibration"]["sources"]["c4"] = {"kind": "corpus", "path": "./small.txt"}
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1, err
    assert "calibration.sources.c4: corpus gives" in err[0] and "fewer than the 4 requested" in err[0]
    total = int(err[0].split("corpus gives ")[1].split()[0])
    assert total < 4
    data["calibration"]["sources"]["c4"].update(window_stride=4, allow_overlap=True)
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 0, err
    stream = np.arange(100)
    assert textdata.windows(stream, 32, 16).shape == (textdata.window_count(100, 32, 16), 32) == (5, 32)
    assert (textdata.windows(stream, 32, 16)[1] == np.arange(16, 48)).all()
    assert (textdata.windows(stream, 32) == textdata.windows(stream, 32, 32)).all()


def test_a_missing_perplexity_file_is_refused_by_check(tiny_model, tmp_path, capsys):
    data = small_params(tiny_model, tmp_path)
    data["evaluation"]["perplexity"] = {"wikitext2": {"path": "./nowhere/wiki.txt"}}
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and "evaluation.perplexity.wikitext2.path" in err[0]


def test_a_perplexity_text_short_of_one_window_is_refused_by_check_and_before_the_model_loads(
    tiny_model, tmp_path, capsys, monkeypatch
):
    """A text shorter than one window passed check; the evaluate stage failed only after the zero-shot tasks had
    run, with an error that named no key."""
    from selfcal.pipeline import evaluate

    (tmp_path / "short.txt").write_text("hello world\n")
    data = small_params(tiny_model, tmp_path, **{"evaluation.tasks": [], "evaluation.data_dir": None})
    data["evaluation"]["perplexity"] = {"tiny": {"path": str(tmp_path / "short.txt"), "seq_len": 64}}
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1, err
    assert re.fullmatch(
        r"selfcal: error: evaluation\.perplexity\.tiny: the text has \d+ tokens, fewer than one window of 64; "
        r"give a longer text or a smaller evaluation\.perplexity\.tiny\.seq_len",
        err[0],
    ), err
    params = parse_params(data, root=tmp_path)

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(evaluate, "load_model", no_model)
    with pytest.raises(ConfigError, match="fewer than one window of 64"):
        evaluate.evaluate(params, layout.DENSE, progress=False)
    assert not layout.evaluation_file(params, layout.DENSE).exists()
    data["evaluation"]["perplexity"]["tiny"]["seq_len"] = 2  # the same text fills windows of 2: check passes
    assert _check(tmp_path, data, capsys)[0] == 0


@pytest.mark.parametrize("weights", ["pickle", "none", "corrupt"])
def test_a_model_folder_without_good_safetensors_is_named_in_one_line(tiny_model, tmp_path, capsys, weights):
    import shutil

    bad = tmp_path / "model"
    shutil.copytree(tiny_model, bad)
    for f in bad.glob("*.safetensors"):
        if weights == "corrupt":
            f.write_bytes(f.read_bytes()[:100])
        else:
            f.unlink()
    if weights == "pickle":
        (bad / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    rc, err = _check(tmp_path, small_params(bad, tmp_path), capsys)
    expect = {"pickle": "has only pickle weights", "none": "has no weights", "corrupt": "corrupt safetensors header"}
    assert rc == 2 and len(err) == 1 and expect[weights] in err[0], err


def test_an_artifacts_path_that_is_a_file_is_refused_before_anything_runs(tiny_model, tmp_path, capsys):
    data = small_params(tiny_model, tmp_path)
    (tmp_path / "art").write_text("not a folder")
    data["paths"] = {**data.get("paths", {}), "artifacts": "./art"}
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and "is a file, not a folder" in err[0]
    path = write_params(tmp_path / "params.yaml", data)
    assert main(["--params", str(path), "generate", "--source", "self", "--seed", "0"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("paths.state", "./state-file", "paths.state: "),  # a file: MLflow's sqlite store and the run lock live there
        ("tracking.experiment", " ", "tracking.experiment: must not be empty"),
        ("tracking.tracking_uri", "htp://nohost", "tracking.tracking_uri: 'htp://nohost' is no MLflow store URI"),
    ],
)
def test_check_refuses_tracking_settings_a_stage_would_die_on(tiny_model, tmp_path, capsys, key, value, why):
    """An audit found each passing `selfcal check` and the guard, then every stage dying in MLflow with a
    traceback (FileExistsError, 'Invalid experiment name', UnsupportedModelRegistryStoreURIException)."""
    (tmp_path / "state-file").write_text("not a folder")
    data = small_params(tiny_model, tmp_path, **{key: value})
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and why in err[0], err
    assert not (tmp_path / "artifacts").exists()


def test_an_mlflow_tracking_uri_from_the_environment_is_checked_too(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://nohost")
    data = small_params(tiny_model, tmp_path, **{"tracking.tracking_uri": None})  # the environment's, then
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and err == [
        "selfcal: error: $MLFLOW_TRACKING_URI: 'htp://nohost' is no MLflow store URI (sqlite:///FILE, "
        "postgresql://..., http(s)://HOST, or a folder)"
    ]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store.db'}")
    assert _check(tmp_path, data, capsys)[0] == 0


@pytest.mark.parametrize("ignore", [["lm_headd"], ["lm_head", "re:.*gate_projj"]])
def test_an_ignore_entry_that_matches_no_layer_is_refused_by_check(tiny_model, tmp_path, capsys, ignore):
    """An audit's `ignore: [lm_headd]` passed check and compress quantized lm_head (tied to the embeddings):
    the typo matched nothing, so nothing stayed dense."""
    data = small_params(tiny_model, tmp_path, **{"compression.gptq.ignore": ignore})
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1, err
    assert f"compression.gptq.ignore: {ignore[-1]!r} matches no linear layer of this model (" in err[0]
    data["compression"]["gptq"]["ignore"] = ["lm_head", "re:.*gate_proj"]  # both name layers: fine
    assert _check(tmp_path, data, capsys)[0] == 0


@pytest.mark.parametrize("stage", [["generate"], ["compress", "--method", "gptq"]])
def test_a_seed_the_params_do_not_list_is_refused_before_anything_is_written(tiny_model, tmp_path, capsys, stage):
    """An audit's `selfcal generate --source self --seed 7` (seeds [0, 1]) wrote artifacts/calibration/self-s7,
    which no DVC item tracks; the help said 'one of calibration.seeds'."""
    path = write_params(tmp_path / "params.yaml", small_params(tiny_model, tmp_path))
    assert main(["--params", str(path), stage[0], "--source", "self", "--seed", "7", *stage[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["selfcal: error: calibration.seeds: 7 is not listed ([0]); list it there first, so the set is an "
                   "item of the pipeline"]  # fmt: skip
    assert not (tmp_path / "artifacts").exists()


# -- leftovers of killed writers -------------------------------------------------------------------------
def test_runs_of_dead_processes_are_marked_failed_and_live_ones_left(tmp_path):
    import os
    import subprocess

    from mlflow import MlflowClient

    from selfcal.lineage import tags as T
    from selfcal.lineage.tracking import fail_dead_runs

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("selfcal")
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    host = socket.gethostname()
    killed = client.create_run(exp, tags={T.PID: str(dead.pid), T.HOST: host}).info.run_id
    live = client.create_run(exp, tags={T.PID: str(os.getpid()), T.HOST: host}).info.run_id
    other_host = client.create_run(exp, tags={T.PID: str(dead.pid), T.HOST: "elsewhere"}).info.run_id
    assert fail_dead_runs(client, exp) == [killed]
    assert client.get_run(killed).info.status == "FAILED"
    assert "died" in client.get_run(killed).data.tags[T.FAILED_REASON]
    assert client.get_run(live).info.status == "RUNNING" and client.get_run(other_host).info.status == "RUNNING"


def test_a_writer_holding_the_workspace_sweeps_scratch_killed_writers_left(tiny_model, tmp_path, capsys):
    data = small_params(tiny_model, tmp_path, **{"tracking.enabled": False})
    path = write_params(tmp_path / "params.yaml", data)
    left = tmp_path / "artifacts" / "calibration" / ".self-s0.tmp-0123abcd"
    left.mkdir(parents=True)
    (left / "tokens.safetensors").write_bytes(b"half")
    assert main(["--params", str(path), "generate", "--source", "self", "--seed", "0"]) == 0
    assert not left.exists()
    assert (tmp_path / "artifacts" / "calibration" / "self-s0" / "manifest.json").is_file()


def test_trust_remote_code_is_said_by_check(tiny_model, tmp_path, capsys):
    overrides = {"model.trust_remote_code": True, "evaluation.perplexity": {}, "evaluation.tasks": []}
    data = small_params(tiny_model, tmp_path, **overrides)
    path = write_params(tmp_path / "params.yaml", data)
    assert main(["--params", str(path), "check"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: model.trust_remote_code is true: the model folder's own Python code will run" in out


def test_an_unreachable_hub_is_said_at_once(tiny_model, tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = small_params(tiny_model, tmp_path, **{"evaluation.data_dir": None, "evaluation.perplexity": {}})
    t0 = time.monotonic()
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and time.monotonic() - t0 < 10
    assert "evaluation.data_dir: null reads arc_easy from the Hugging Face hub, which is unreachable" in err[0]
    assert "HF_HUB_OFFLINE is set" in err[0]


# -- a registration that failed after the checkpoint was written --------------------------------------------
def test_a_failed_registration_is_retried_without_recompressing(tiny_model, tmp_path, monkeypatch):
    import selfcal.pipeline.compress as step
    from selfcal.lineage import tags as T
    from selfcal.lineage.tracking import open_client
    from selfcal.pipeline.generate import generate

    p = parse_params(small_params(tiny_model, tmp_path), root=tmp_path)
    generate(p, "self", 0, progress=False)

    def down(*args, **kwargs):
        raise ConnectionError("tracking server unreachable (injected)")

    monkeypatch.setattr(step, "register_checkpoint", down)
    with pytest.raises(ConnectionError):
        step.compress(p, "self", 0, "gptq")
    ckpt = layout.checkpoint_dir(p, "self", 0, "gptq")
    assert (ckpt / "manifest.json").is_file(), "the checkpoint was written before registration failed"
    monkeypatch.undo()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the stranded checkpoint was recomputed")

    monkeypatch.setattr(step, "apply_compression", must_not_run)
    manifest = step.compress(p, "self", 0, "gptq")
    client = open_client(p.tracking.tracking_uri)
    versions = client.search_model_versions(f"tags.`{T.CHECKPOINT_DIGEST}` = '{manifest.content_digest}'")
    assert len(versions) == 1 and versions[0].tags[T.CODE_DIGEST]
    # Registered now: a further run (dvc repro --force) recomputes, it does not register twice.
    with pytest.raises(AssertionError, match="recomputed"):
        step.compress(p, "self", 0, "gptq")


def test_a_stranded_checkpoint_with_other_params_is_recomputed(tiny_model, tmp_path, monkeypatch):
    import selfcal.pipeline.compress as step
    from selfcal.pipeline.generate import generate

    p = parse_params(small_params(tiny_model, tmp_path), root=tmp_path)
    generate(p, "self", 0, progress=False)
    monkeypatch.setattr(step, "register_checkpoint", lambda *a, **k: (_ for _ in ()).throw(ConnectionError("down")))
    with pytest.raises(ConnectionError):
        step.compress(p, "self", 0, "gptq")
    monkeypatch.undo()
    other = parse_params(
        small_params(tiny_model, tmp_path, **{"compression.gptq": {"group_size": 128, "dampening_frac": 0.05}}),
        root=tmp_path,
    )
    calls = []
    real = step.apply_compression
    monkeypatch.setattr(step, "apply_compression", lambda *a, **k: calls.append(1) or real(*a, **k))
    step.compress(other, "self", 0, "gptq")
    assert calls == [1]


# -- lineage records trust_remote_code; check covers task files, the registered name, the architecture -------
def test_trust_remote_code_is_recorded_on_the_registered_version(tiny_model, tmp_path):
    from selfcal.lineage import tags as T
    from selfcal.lineage.tracking import open_client
    from selfcal.pipeline.compress import compress
    from selfcal.pipeline.generate import generate

    p = parse_params(small_params(tiny_model, tmp_path, **{"model.trust_remote_code": True}), root=tmp_path)
    generate(p, "self", 0, progress=False)
    compress(p, "self", 0, "gptq")
    (version,) = open_client(p.tracking.tracking_uri).search_model_versions("name = 'tiny-llama-gptq-self'")
    assert version.tags[T.TRUST_REMOTE_CODE] == "true"


def test_check_refuses_a_data_dir_without_a_listed_tasks_file(tiny_model, tmp_path, capsys):
    (tmp_path / "tasks" / "arc_easy").mkdir(parents=True)
    (tmp_path / "tasks" / "arc_easy" / "test.jsonl").write_text('{"question": "q"}\n')
    data = small_params(
        tiny_model,
        tmp_path,
        **{"evaluation.data_dir": "./tasks", "evaluation.tasks": ["arc_easy", "piqa"], "evaluation.perplexity": {}},
    )
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1, err
    assert "evaluation.data_dir" in err[0] and "piqa/validation.jsonl" in err[0] and "piqa" in err[0]


def test_check_refuses_a_data_dir_that_does_not_exist(tiny_model, tmp_path, capsys):
    data = small_params(tiny_model, tmp_path, **{"evaluation.data_dir": "./nope", "evaluation.perplexity": {}})
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and "evaluation.data_dir" in err[0] and "does not exist" in err[0], err


@pytest.mark.parametrize(
    ("template", "why"),
    [("{base:d}", "registered_model_name"), ("..", "registered_model_name"), ("{base}" * 40, "256")],
)
def test_check_refuses_a_registered_name_mlflow_would_refuse(tiny_model, tmp_path, capsys, template, why):
    data = small_params(
        tiny_model, tmp_path, **{"tracking.registered_model_name": template, "evaluation.perplexity": {}}
    )
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1 and why in err[0], err


def test_an_architecture_the_layer_checks_do_not_know_is_one_line(tiny_model, tmp_path, capsys):
    import shutil

    odd = tmp_path / "odd-model"
    shutil.copytree(tiny_model, odd)
    config = json.loads((odd / "config.json").read_text())
    config.update({"model_type": "wizardlm_9000", "architectures": ["Wizard9000ForCausalLM"]})
    (odd / "config.json").write_text(json.dumps(config))
    rc, err = _check(tmp_path, small_params(odd, tmp_path, **{"evaluation.perplexity": {}}), capsys)
    assert rc == 2 and len(err) == 1, err
    assert "Wizard9000ForCausalLM" in err[0] or "wizardlm_9000" in err[0]
    assert "Traceback" not in err[0]


# -- every stage runs its static plan (its step's preflight) before it loads a model -----------------
@pytest.mark.parametrize("stage", ["generate", "compress", "evaluate"])
def test_each_stage_refuses_what_its_preflight_refuses_before_loading_a_model(tiny_model, tmp_path, stage, monkeypatch):
    import selfcal.modelio as modelio
    from selfcal.pipeline.compress import compress
    from selfcal.pipeline.evaluate import evaluate
    from selfcal.pipeline.generate import generate

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the plan was checked")

    for module in ("selfcal.pipeline.generate", "selfcal.pipeline.compress", "selfcal.pipeline.evaluate"):
        monkeypatch.setattr(f"{module}.load_model", no_load)
    monkeypatch.setattr(modelio, "load_model", no_load)
    bad = {
        "generate": {"calibration.seq_len": 4096},
        "compress": {"tracking.registered_model_name": "{base:d}"},
        "evaluate": {"evaluation.perplexity": {"w": {"path": "./w.txt", "seq_len": 4096}}},
    }[stage]
    p = parse_params(small_params(tiny_model, tmp_path, **bad), root=tmp_path)
    run = {
        "generate": lambda: generate(p, "self", 0, progress=False),
        "compress": lambda: compress(p, "self", 0, "gptq"),
        "evaluate": lambda: evaluate(p, "dense", progress=False),
    }[stage]
    with pytest.raises(ConfigError):
        run()


def test_a_set_larger_than_this_machines_memory_is_refused_by_check_and_by_generate_before_the_model_loads(
    tiny_model, tmp_path, capsys, monkeypatch
):
    """`n_samples: 10000000000` passed `check`; `generate` then loaded the model and died in numpy's allocator
    with a traceback (9.3 TiB for the set's int32 array)."""
    from selfcal.pipeline import generate

    huge = 10**10
    data = small_params(tiny_model, tmp_path, **{"calibration.n_samples": huge})
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(
        f"selfcal: error: calibration.n_samples: a set of {huge} x 32 tokens takes 2.3 TiB in memory while it is made,"
        " more than this machine's "
    ), err

    def no_model(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(generate, "load_model", no_model)
    path = write_params(tmp_path / "params.yaml", data)
    assert main(["--params", str(path), "generate", "--source", "self", "--seed", "0"]) == 2
    assert "calibration.n_samples: a set of" in capsys.readouterr().err
    assert not (tmp_path / "artifacts" / "calibration").exists()

    # a source's own n_samples is named as such; the global one, small again, is fine
    data = small_params(tiny_model, tmp_path, **{"calibration.sources": {"self": {"kind": "self"}, "v": {
        "kind": "vocab", "n_samples": huge}}})  # fmt: skip
    rc, err = _check(tmp_path, data, capsys)
    assert rc == 2 and err[0].startswith("selfcal: error: calibration.sources.v.n_samples: a set of"), err

    # the bound: n x seq_len x 8 bytes (the vocabulary source's int64 draw), equal fits
    params = parse_params(small_params(tiny_model, tmp_path), root=tmp_path)
    generate.check_set_fits(params, memory=4 * 32 * 8)
    with pytest.raises(ConfigError, match=r"a set of 4 x 32 tokens takes 0\.0 GiB .* this machine's 0\.0 GiB"):
        generate.check_set_fits(params, memory=4 * 32 * 8 - 1)


def test_output_into_a_closed_pipe_ends_quietly_not_in_a_traceback():
    """`selfcal models | head -1` ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    code = (
        "import sys; from selfcal.pipeline.common import run_cli\n"
        "sys.exit(run_cli(lambda: [print('model', i) for i in range(200000)]))"
    )
    producer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert producer.stdout.readline() == b"model 0\n"
    producer.stdout.close()  # the reader is gone, as `head -1` after one line
    err = producer.stderr.read().decode()
    assert producer.wait(60) == 1 and err == "", err
    # another pipe that breaks is the command's own failure, not a reader gone: not hidden
    code = (
        "import subprocess, sys; from selfcal.pipeline.common import run_cli\n"
        "def broken():\n"
        "    p = subprocess.Popen(['true'], stdin=subprocess.PIPE); p.wait(); p.stdin.write(b'x' * 10**6)\n"
        "    p.stdin.flush()\n"
        "sys.exit(run_cli(broken))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.strip().endswith("BrokenPipeError: [Errno 32] Broken pipe")


def test_ctrl_c_is_one_line_and_exit_130_and_inspect_checks_its_source_and_seed_first(tiny_model, tmp_path, capsys):
    """Ctrl-C was an 80-line traceback; `inspect --source slef` said "calibration tokens missing (run the generate
    stage first)", advice generate would refuse, after opening an MLflow run it left FAILED."""
    from selfcal.pipeline.common import run_cli

    def interrupted():
        raise KeyboardInterrupt

    assert run_cli(interrupted) == 130 and capsys.readouterr().err == "selfcal: interrupted\n"
    path = write_params(tmp_path / "params.yaml", small_params(tiny_model, tmp_path))
    for args, why in (
        (["--source", "slef", "--seed", "0"], "calibration.sources: no source named 'slef'; defined: ['self']"),
        (["--source", "self", "--seed", "7"], "calibration.seeds: 7 is not listed ([0])"),
    ):
        assert main(["--params", str(path), "inspect", *args]) == 2
        assert capsys.readouterr().err.startswith(f"selfcal: error: {why}")
    assert not (tmp_path / "mlflow.db").exists()  # no stage run was opened


def test_an_unknown_evaluate_target_names_the_checkpoints_present(tiny_model, tmp_path, capsys, monkeypatch):
    path = write_params(tmp_path / "params.yaml", small_params(tiny_model, tmp_path))
    monkeypatch.chdir(tmp_path)
    assert main(["--params", str(path), "evaluate", "self-s0-gtpq"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint is there yet; 'dense' evaluates the base model" in err[0], err
    root = tmp_path / "artifacts" / "checkpoints"
    for i in range(8):
        (root / f"self-s{i}-gptq").mkdir(parents=True)
    assert main(["--params", str(path), "evaluate", "self-s0-gtpq"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].endswith(
        "(run the compress stage first; present: self-s0-gptq, self-s1-gptq, self-s2-gptq, self-s3-gptq, "
        "self-s4-gptq, self-s5-gptq and 2 more, or 'dense')"
    ), err


@pytest.mark.parametrize(
    "argv",
    [
        ["--params", "P.yaml", "-v", "--no-progress", "evaluate", "dense"],
        ["evaluate", "dense", "--params", "P.yaml", "-v", "--no-progress"],
        ["-v", "evaluate", "--no-progress", "dense", "--params", "P.yaml"],
    ],
)
def test_the_common_options_go_before_or_after_the_command(argv):
    from selfcal.cli import _parser

    args = _parser().parse_args(argv)
    assert (args.params, args.verbose, args.no_progress, args.target) == ("P.yaml", True, True, "dense")


def test_a_command_does_not_reset_the_common_options_given_before_it():
    from selfcal.cli import _parser

    for command in (["check"], ["run", "--jobs", "2"], ["models"]):
        args = _parser().parse_args(["--params", "P.yaml", "-v", *command])
        assert (args.params, args.verbose, args.no_progress) == ("P.yaml", True, False), command
