"""params.yaml validation: one line, naming the key, before any compute."""

import pytest

from selfcal.cli import main
from selfcal.config import load_params, parse_params
from selfcal.errors import ConfigError, ModelNotFoundError
from selfcal.pipeline.common import base_model, check_context
from tests.helpers import params_error, small_params, write_params


def _err(data) -> str:
    return params_error(data)


def test_valid_params_parse(tiny_model, tmp_path):
    p = parse_params(small_params(tiny_model, tmp_path))
    assert p.calibration.sources["self"].t_initial == 1.0
    assert p.compression.gptq.group_size == 128


def test_unknown_key_is_named(tiny_model, tmp_path):
    data = small_params(tiny_model, tmp_path)
    data["calibration"]["n_sample"] = 3
    assert _err(data) == "params.yaml: calibration.n_sample: unknown key (did you mean 'n_samples'?)"


def test_unknown_key_inside_a_source_is_named(tiny_model, tmp_path):
    data = small_params(tiny_model, tmp_path)
    data["calibration"]["sources"]["self"]["top_z"] = 3
    assert "calibration.sources.self.top_z: unknown key" in _err(data)


def test_unknown_method_is_named(tiny_model, tmp_path):
    msg = _err(small_params(tiny_model, tmp_path, **{"compression.methods": ["gptq", "magic"]}))
    assert msg.startswith("params.yaml: compression.methods: ") and "'magic'" in msg


def test_unknown_task_and_bad_values(tiny_model, tmp_path):
    assert "evaluation.tasks" in _err(small_params(tiny_model, tmp_path, **{"evaluation.tasks": ["nope"]}))
    assert "calibration.n_samples" in _err(small_params(tiny_model, tmp_path, **{"calibration.n_samples": 0}))
    assert "t_initial" in _err(
        small_params(tiny_model, tmp_path, **{"calibration.sources": {"self": {"kind": "self", "t_initial": -1}}})
    )


def test_missing_required_section():
    assert _err({"model": {"path": "x"}}) == "params.yaml: calibration: required key is missing"


def test_missing_model_path_names_the_key(tmp_path):
    params = parse_params(small_params(tmp_path / "no-such-model", tmp_path), root=tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"^model.path: local model directory .* does not exist$"):
        base_model(params)
    (tmp_path / "weights.jsonl").write_text("{}\n")  # a file where a folder belongs: said so, not "does not exist"
    params = parse_params(small_params(tmp_path / "weights.jsonl", tmp_path), root=tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"^model.path: '.*weights.jsonl' is a file, not a model directory$"):
        base_model(params)


def test_offline_hub_id_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    params = parse_params(small_params("someorg/some-model", tmp_path))  # type: ignore[arg-type]
    with pytest.raises(ModelNotFoundError, match="not in the hub cache"):
        base_model(params)


def test_seq_len_beyond_context_window(tiny_model, tmp_path):
    params = parse_params(small_params(tiny_model, tmp_path, **{"calibration.seq_len": 4096}))
    _, config = base_model(params)
    with pytest.raises(ConfigError, match="calibration.seq_len: 4096 exceeds the model's context window of 128"):
        check_context(config, params.calibration.seq_len, "calibration.seq_len")


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_cli_prints_one_line_and_exits_2(tiny_model, tmp_path, capsys):
    data = small_params(tiny_model, tmp_path, **{"calibration.seq_len": 4096})
    path = write_params(tmp_path / "params.yaml", data)
    assert main(["--params", str(path), "generate", "--source", "self", "--seed", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "selfcal: error: calibration.seq_len: 4096 exceeds the model's context window of 128 tokens"
    assert not (tmp_path / "artifacts").exists(), "nothing may be written before the error"


def test_shipped_params_and_profiles_validate():
    from selfcal.pipeline.check import check_dvc_params
    from selfcal.profiles import known_profiles, read_profile
    from tests.helpers import REPO

    load_params(REPO / "params.yaml")
    check_dvc_params(REPO / "params.yaml", REPO / "dvc.yaml")
    for name in known_profiles(REPO):  # as `selfcal run --profile NAME` reads it: dvc.yaml's keys spelt out too
        read_profile(REPO, name)


def test_a_profile_missing_a_key_dvc_yaml_interpolates_is_refused_before_it_is_installed(tmp_path):
    """DVC knows no schema defaults: a profile without `paths:` passed the schema, then every stage failed in
    DVC ("Could not find 'paths.artifacts'"); now refused in one line, params.yaml untouched."""
    import shutil

    import yaml

    from selfcal.errors import ConfigError
    from selfcal.profiles import apply_profile
    from tests.helpers import REPO

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text("kept: as it was\n")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    del data["paths"]
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "nopaths.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"^nopaths\.yaml: paths\.artifacts: dvc\.yaml's stage '\w+' reads it"):
        apply_profile(tmp_path, "nopaths")
    assert (tmp_path / "params.yaml").read_text() == "kept: as it was\n"


def test_every_local_task_builds_with_lm_evals_prompts_and_full_counts():
    """Each adapter is lm-eval's own config with only the data source swapped: the docs
    load from ../shared/data with the split sizes lm-eval uses."""
    from pathlib import Path

    from selfcal.errors import DataError
    from selfcal.evaluation.tasks import TASKS, local_task_config, task_manager
    from tests.helpers import DATA

    if not Path(DATA).is_dir():
        pytest.skip("no ../shared/data")
    expected = {
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "openbookqa": 500,
        "boolq": 3270,
        "hellaswag": 10042,
        "lambada_openai": 5153,
        "piqa": 1838,
        "rte": 277,
        "winogrande": 1267,
    }
    manager = task_manager()
    for name, count in expected.items():
        task = manager.load([local_task_config(name, DATA)])["tasks"][name]
        docs = list(task.eval_docs)
        assert len(docs) == count, name
    hs = manager.load([local_task_config("hellaswag", DATA)])["tasks"]["hellaswag"]
    assert hs.doc_to_text(next(iter(hs.eval_docs))) == "Roof shingle removal: A man is sitting on a roof. He"
    assert set(TASKS) - set(expected) == {"storycloze_2016"}
    with pytest.raises(DataError, match="storycloze/validation.jsonl: data file for task 'storycloze_2016' not found"):
        local_task_config("storycloze_2016", DATA)


def _check_workspace(tmp_path, data: dict):
    """params.yaml + the project's dvc.yaml in one folder, as `selfcal check` finds them."""
    import shutil

    from tests.helpers import REPO

    shutil.copy2(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    return write_params(tmp_path / "params.yaml", data)


def test_check_refuses_a_method_whose_params_section_dvc_cannot_find(tiny_model, tmp_path, capsys):
    # No perplexity set: `check` reads it, and the unit tier runs without ../shared.
    data = small_params(
        tiny_model,
        tmp_path,
        **{"compression.methods": ["gptq", "wanda"], "evaluation.perplexity": {}, "evaluation.tasks": []},
    )
    path = _check_workspace(tmp_path, data)
    assert main(["--params", str(path), "check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfcal: error: params.yaml: compression.wanda: dvc.yaml's stage 'compress' reads it")
    data["compression"]["wanda"] = {}  # DVC accepts an empty section: the schema's defaults apply
    _check_workspace(tmp_path, data)
    assert main(["--params", str(path), "check"]) == 0
    assert capsys.readouterr().out.startswith("ok: params valid")


def test_check_refuses_first_token_words_that_are_not_one_token(tiny_model, tmp_path, capsys):
    data = small_params(tiny_model, tmp_path, **{"evaluation.perplexity": {}, "evaluation.tasks": []})
    data["calibration"]["sources"]["self"]["first_token_words"] = ["the", "xylophonist"]
    path = _check_workspace(tmp_path, data)
    assert main(["--params", str(path), "check"]) == 2
    assert capsys.readouterr().err.strip() == (
        "selfcal: error: calibration.sources.self.first_token_words: not a single token after BOS with "
        "this tokenizer: ['xylophonist', 'Xylophonist']"
    )


def test_dvc_param_keys_expand_the_matrices():
    from selfcal.pipeline.check import dvc_param_keys
    from tests.helpers import REPO

    raw = {
        "calibration": {"sources": {"self": {}, "c4": {}}, "seeds": [0, 1]},
        "compression": {"methods": ["gptq", "awq"]},
    }
    keys = dvc_param_keys(REPO / "dvc.yaml", raw)
    assert ("compress", "compression.awq") in keys and ("compress", "compression.gptq") in keys
    assert ("generate", "calibration.sources.c4") in keys and ("generate", "calibration.sources.self") in keys
    assert all("${" not in k for _, k in keys)


def test_paper_profile_is_the_papers_grid():
    from tests.helpers import REPO

    p = load_params(REPO / "profiles" / "paper.yaml")
    assert sorted(p.calibration.sources) == ["c4", "cosmopedia", "ji", "self", "vocab", "wikitext"]
    assert p.calibration.seeds == [0, 1, 2, 3, 4] and (p.calibration.n_samples, p.calibration.seq_len) == (128, 2048)
    assert sorted(p.compression.methods) == ["awq", "gptq", "sparsegpt", "wanda"]
    assert len(p.evaluation.tasks) == 10 and "wikitext2" in p.evaluation.perplexity
    assert p.calibration.sources["ji"].prompt_path.endswith("wikipedia_sample/wiki.utf8")
    awq = p.compression.awq
    assert awq.symmetric and awq.n_grid == 12 and awq.clip_search.min_ratio == 0.5
    # n_grid 12 with duo scaling is ModelOpt's alpha grid 0, 0.1, ..., 1.0 (plus identity)
    from llmcompressor.modifiers.transform.awq import AWQModifier

    grid = AWQModifier(n_grid=awq.n_grid, duo_scaling=True)._get_grid_search_params()
    assert [round(r, 6) for r, duo in grid if duo] == [round(0.1 * k, 6) for k in range(11)]


def test_clip_search_translates_to_the_observer_grid_of_modelopts_clip_ratios():
    from selfcal.compression.methods.awq import AWQConfig
    from selfcal.compression.methods.base import weight_scheme as _scheme

    scheme = _scheme(AWQConfig(clip_search={"min_ratio": 0.5, "step": 0.05}))["group_0"].weights
    assert scheme.observer == "memoryless_mse"
    kw = scheme.observer_kwargs
    total = int(kw["maxshrink"] * kw["grid"])  # llm-compressor's mse_quant._grid_search_mse
    ratios = [round(1 - i / kw["grid"], 6) for i in range(total)]
    assert ratios == [round(1 - 0.05 * i, 6) for i in range(11)]  # 1.0, 0.95, ..., 0.5


def test_a_dvc_experiment_copy_reads_paths_outside_the_workspace_from_the_original_and_logs_to_its_store(
    tmp_path, capsys, monkeypatch
):
    """An audit: `dvc exp run --queue` / `--temp` run in a copy of the workspace's tracked files under
    .dvc/tmp/exps/, where the README's own queued sweep failed at the guard (`../shared` resolved to
    .dvc/tmp/exps/shared), and, with absolute paths, registered its models in a sqlite store inside the copy,
    deleted with it. Paths leading out of the copy are taken from the original workspace; paths inside stay in
    the copy (DVC collects the outputs there); the default store is the original workspace's."""
    import shutil

    from selfcal.cli import main
    from selfcal.lineage.tracking import tracking_uri
    from selfcal.paths import experiment_origin, resolve_path, shown_path
    from tests.helpers import REPO, SHARED

    ws = tmp_path / "ws"
    (tmp_path / "shared").symlink_to(SHARED)
    copy = ws / ".dvc" / "tmp" / "exps" / "standalone" / "tmpa1b2c3"
    copy.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, copy / name)
    assert experiment_origin(copy) == ws.resolve() and experiment_origin(ws) is None
    assert resolve_path("../shared/models", copy) == (SHARED / "models").resolve()
    assert resolve_path("artifacts", copy) == (copy / "artifacts").resolve()
    beside = tmp_path / "beside" / "x.txt"  # as records name it, from the copy as from the workspace
    assert shown_path(beside, copy) == shown_path(beside, ws) == "../beside/x.txt"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = load_params(copy / "params.yaml")
    assert params.tracking.tracking_uri is None
    assert tracking_uri(params) == f"sqlite:///{(ws / '.selfcal' / 'mlflow.db').resolve()}"
    assert main(["--params", str(copy / "params.yaml"), "check"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("ok: params valid; model ../shared/models/stories260K")


@pytest.mark.parametrize(
    ("old", "new", "why"),
    [
        ("seeds: [0, 1]", "seeds: [0, 010]", r"calibration\.seeds\[1\]: selfcal reads 8 \(YAML 1\.1\) and DVC reads 10 "
         r"\(YAML 1\.2; dvc\.yaml's stage '\w+' uses it\)"),
        ("artifacts: artifacts", "artifacts: 1e3", r"paths\.artifacts: selfcal reads '1e3' \(YAML 1\.1\) and DVC reads "
         r"1000\.0"),
        ("limit: 200 ", "limit: 0200 ", r"evaluation\.limit: selfcal reads 128 \(YAML 1\.1\) and DVC reads 200"),
        ("artifacts: artifacts", "artifacts: ../outside", r"paths\.artifacts: .*/outside is outside the DVC "
         r"repository .*, and DVC 3 saves no outputs outside it"),
    ],
)  # fmt: skip
def test_a_value_dvc_reads_otherwise_or_cannot_use_is_refused_by_check(tmp_path, old, new, why):
    """selfcal reads YAML 1.1, DVC 1.2: `seeds: [0, 010]` passed check, then DVC's matrix made `*-10` items that
    every stage refused; `paths.artifacts: 1e3` sent DVC's outputs to `1000.0/`, `../outside` failed `dvc repro`
    after the first set was made (DVC 3 keeps no outputs outside the repository)."""
    import shutil

    from selfcal.errors import ConfigError
    from selfcal.pipeline.check import check_dvc_params
    from tests.helpers import REPO

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    text = (REPO / "params.yaml").read_text()
    assert text.count(old) == 1
    (tmp_path / "params.yaml").write_text(text)
    check_dvc_params(tmp_path / "params.yaml", tmp_path / "dvc.yaml")  # as shipped: both read it alike
    (tmp_path / "params.yaml").write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=rf"^params\.yaml: {why}"):
        check_dvc_params(tmp_path / "params.yaml", tmp_path / "dvc.yaml")


@pytest.mark.parametrize(
    ("old", "new"), [("dampening_frac: 0.01", "dampening_frac: 1e-2"), ("symmetric: true", "symmetric: yes")]
)
def test_a_params_value_both_readers_take_alike_is_not_refused(tmp_path, old, new):
    """`1e-2` is a string to PyYAML and 0.01 to DVC, and the schema makes the string 0.01 too; `yes` is True to
    PyYAML and "yes" to DVC, which only hashes it: neither changes what runs, so neither is refused (both are
    where their spelling counts: `paths.artifacts: 1e3` above)."""
    import shutil

    from selfcal.pipeline.check import check_dvc_params
    from tests.helpers import REPO

    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    text = (REPO / "params.yaml").read_text()
    assert text.count(old) == 1
    (tmp_path / "params.yaml").write_text(text.replace(old, new))
    check_dvc_params(tmp_path / "params.yaml", tmp_path / "dvc.yaml")
    assert load_params(tmp_path / "params.yaml").compression.gptq.dampening_frac == 0.01
