"""params.yaml validation: one line, naming the key, before any compute."""

import pytest

from selfcal.cli import main
from selfcal.config import load_params, parse_params
from selfcal.errors import ConfigError, ModelNotFoundError
from selfcal.pipeline.common import base_model, check_context

from tests.helpers import small_params, write_params


def _err(data) -> str:
    with pytest.raises(ConfigError) as e:
        parse_params(data, source="params.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_valid_params_parse(tiny_model, tmp_path):
    p = parse_params(small_params(tiny_model, tmp_path))
    assert p.calibration.sources["self"].t_initial == 1.0
    assert p.compression.gptq.group_size == 128


def test_unknown_key_is_named(tiny_model, tmp_path):
    data = small_params(tiny_model, tmp_path)
    data["calibration"]["n_sample"] = 3
    assert _err(data) == "params.yaml: calibration.n_sample: unknown key"


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
    assert "t_initial" in _err(small_params(tiny_model, tmp_path, **{"calibration.sources": {"self": {"kind": "self", "t_initial": -1}}}))


def test_missing_required_section():
    assert _err({"model": {"path": "x"}}) == "params.yaml: calibration: required key is missing"


def test_missing_model_path_names_the_key(tmp_path):
    params = parse_params(small_params(tmp_path / "no-such-model", tmp_path), root=tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"^model.path: local model directory .* does not exist$"):
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
    from tests.helpers import REPO

    for path in [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))]:
        load_params(path)


def test_every_local_task_builds_with_lm_evals_prompts_and_full_counts():
    """Each adapter is lm-eval's own config with only the data source swapped: the docs
    load from ../shared/data with the split sizes lm-eval uses."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    from selfcal.errors import DataError
    from selfcal.evaluation.tasks import TASKS, local_task_config
    from tests.helpers import DATA

    if not Path(DATA).is_dir():
        pytest.skip("no ../shared/data")
    expected = {"arc_easy": 2376, "arc_challenge": 1172, "openbookqa": 500, "boolq": 3270, "hellaswag": 10042,
                "lambada_openai": 5153, "piqa": 1838, "rte": 277, "winogrande": 1267}
    manager = TaskManager()
    for name, count in expected.items():
        task = manager.load([local_task_config(name, DATA)])["tasks"][name]
        docs = list(task.eval_docs)
        assert len(docs) == count, name
    hs = manager.load([local_task_config("hellaswag", DATA)])["tasks"]["hellaswag"]
    assert hs.doc_to_text(next(iter(hs.eval_docs))) == "Roof shingle removal: A man is sitting on a roof. He"
    assert set(TASKS) - set(expected) == {"storycloze_2016"}
    with pytest.raises(DataError, match="storycloze/validation.jsonl: data file for task 'storycloze_2016' not found"):
        local_task_config("storycloze_2016", DATA)
