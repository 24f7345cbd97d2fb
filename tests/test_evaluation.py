"""Evaluation: local tasks score like lm-eval's built-in ones, perplexity by hand, skips and errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from selfcal.config import parse_params
from selfcal.errors import ConfigError, DataError
from selfcal.evaluation.perplexity import perplexity_of_windows, token_windows
from selfcal.evaluation.tasks import _builtin_config, local_task_config, resolve_tasks, task_manager
from tests.helpers import DATA, small_params


class UniformLM(torch.nn.Module):
    """Equal logits for every token: a decoder of zero hidden states and a head of zero weights."""

    def __init__(self, vocab: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.head = torch.nn.Linear(4, vocab, bias=False)
        torch.nn.init.zeros_(self.head.weight)

    def decoder(self, input_ids, **_):
        return SimpleNamespace(last_hidden_state=torch.zeros(*input_ids.shape, 4))

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.head(self.decoder(input_ids).last_hidden_state))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    ids = torch.arange(100) % 7
    windows = token_windows(ids, 10)
    assert windows.shape == (10, 10)
    out = perplexity_of_windows(UniformLM(7), windows, batch_size=3, progress=False)
    assert out["perplexity"] == pytest.approx(7.0)
    assert out["tokens"] == 10 * 9  # each window predicts its tokens 2..10


def test_windows_are_cut_from_the_start_and_a_trailing_partial_window_is_dropped():
    ids = torch.arange(11)
    assert token_windows(ids, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 8, 9, 10 dropped
    assert token_windows(ids, 4, max_windows=1).tolist() == [[0, 1, 2, 3]]
    with pytest.raises(DataError, match="text has 3 tokens, fewer than one window of 4"):
        token_windows(torch.arange(3), 4)


def test_perplexity_matches_a_hand_computed_value(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([1, 40, 41, 42, 43, 44, 45, 46, 47])
    windows = token_windows(ids, 4, max_windows=2)  # [1,40,41,42], [43,44,45,46]; 47 dropped
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
            nll -= sum(float(logp[i, w[i + 1]]) for i in range(3))
    out = perplexity_of_windows(model, windows, progress=False)
    assert out["perplexity"] == pytest.approx(math.exp(nll / 6), rel=1e-5)


def _hub_layout(rows, question_key):
    """The same examples in the hub dataset's layout (choices {text, label}, answerKey)."""
    out = []
    for r in rows:
        labels = [chr(ord("A") + i) for i in range(len(r["choices"]))]
        out.append(
            {
                question_key: r[question_key],
                "choices": {"text": r["choices"], "label": labels},
                "answerKey": labels[r["gold"]],
            }
        )
    return out


@pytest.mark.parametrize(
    "task,file,question_key",
    [("arc_easy", "arc_easy/test.jsonl", "question"), ("openbookqa", "openbookqa/test.jsonl", "question_stem")],
)
def test_local_task_scores_like_the_builtin_task_on_the_same_examples(
    shared_data, tiny_model, tmp_path, task, file, question_key
):
    """Local adapter vs lm-eval's unmodified config (only data_files swapped) fed the hub layout."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in open(DATA / file)][:40]
    (tmp_path / "local" / file).parent.mkdir(parents=True)
    (tmp_path / "local" / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "hub.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _hub_layout(rows, question_key)))
    builtin = _builtin_config(task)
    for key in ("tag", "training_split", "validation_split", "fewshot_split", "dataset_name"):
        builtin.pop(key, None)
    builtin.update(
        {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(tmp_path / "hub.jsonl")}},
            "test_split": "test",
        }
    )
    local = local_task_config(task, tmp_path / "local")
    assert {k: v for k, v in local.items() if k not in ("doc_to_target", "doc_to_choice", "dataset_kwargs")} == {
        k: v for k, v in builtin.items() if k not in ("doc_to_target", "doc_to_choice", "dataset_kwargs")
    }
    lm = HFLM(
        pretrained=AutoModelForCausalLM.from_pretrained(tiny_model).eval(),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model),
        batch_size=16,
    )
    scores = []
    for spec in (builtin, local):
        out = simple_evaluate(
            model=lm, tasks=[spec], num_fewshot=0, log_samples=True, bootstrap_iters=0, task_manager=task_manager()
        )
        samples = out["samples"][task]
        scores.append((out["results"][task]["acc,none"], [s["target"] for s in samples], [s["resps"] for s in samples]))
    assert scores[0] == scores[1]


def test_storycloze_without_data_is_skipped_and_said(tmp_path):
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl").write_text(
        json.dumps({"question": "q", "choices": ["a", "b"], "gold": 0}) + "\n"
    )
    specs, skipped = resolve_tasks(["arc_easy", "storycloze_2016"], tmp_path)
    assert [s["task"] for s in specs] == ["arc_easy"]
    assert "distributed on request only" in skipped["storycloze_2016"]
    with pytest.raises(DataError, match=r"boolq/validation.jsonl: data file for task 'boolq' not found"):
        resolve_tasks(["boolq"], tmp_path)


def test_missing_task_file_fails_before_the_model_loads(shared_data, tiny_model, tmp_path):
    from selfcal.pipeline.evaluate import evaluate

    (tmp_path / "data").mkdir()
    params = parse_params(
        small_params(
            tiny_model, tmp_path, **{"evaluation.data_dir": str(tmp_path / "data"), "tracking.enabled": False}
        ),
        root=tmp_path,
    )
    with pytest.raises(ConfigError, match=r"has no data for 1 listed task\(s\): arc_easy \(arc_easy/test.jsonl\)"):
        evaluate(params, "dense", progress=False)
    assert not (tmp_path / "artifacts" / "metrics").exists()


def test_a_task_lm_eval_cannot_score_fails_alone_with_its_reason(shared_data, tiny_model, tmp_path):
    """PIQA's first answers run to 93 tokens, ARC-Easy's to 38: a 64-token model scores only ARC."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfcal.evaluation.harness import run_tasks
    from tests.helpers import build_tiny_model

    short = build_tiny_model(tmp_path / "short", max_positions=64)
    specs, _ = resolve_tasks(["arc_easy", "piqa"], DATA)
    model = AutoModelForCausalLM.from_pretrained(short).eval()
    out = run_tasks(model, AutoTokenizer.from_pretrained(short), specs, limit=5, batch_size="auto")
    assert list(out["tasks"]) == ["arc_easy"] and out["tasks"]["arc_easy"]["n"] == 5
    assert out["tasks"]["arc_easy"]["seconds"] > 0 and out["tasks"]["arc_easy"]["batch_size"] == 16  # CPU "auto"
    assert out["failed"] == {"piqa": "lm-eval cannot score it: a request exceeds the model's 64-token context"}


def _record(name, method, accs, *, failed=None, skipped=None, ppl=None, source=None):
    from selfcal.records import EvaluationRecord, PerplexityScore, TaskScore, ZeroShot

    source = source or ("none" if method == "none" else "self")
    tasks = {t: TaskScore(acc=a, seconds=1.0) for t, a in accs.items()}
    perplexity = (
        {
            "wikitext2": PerplexityScore(
                perplexity=ppl, nll=1.0, tokens=10, windows=1, seq_len=11, stride=11, source="x", seconds=0.1
            )
        }
        if ppl
        else {}
    )
    return EvaluationRecord(
        name=name,
        method=method,
        source=source,
        model_digest="d",
        device="cpu",
        wall_seconds=1.0,
        zero_shot=ZeroShot(tasks=tasks, failed=failed or {}, batch_size=8, seconds=1.0),
        skipped_tasks=skipped or {},
        perplexity=perplexity,
        mean_acc=sum(accs.values()) / len(accs),
        mean_acc_tasks=sorted(accs),
    )


def test_report_names_tasks_that_were_not_scored():
    from selfcal.pipeline.aggregate import summarise, to_markdown, unscored_tasks

    rows = [
        _record(
            "dense",
            "none",
            {"arc_easy": 0.5},
            failed={"piqa": "too long"},
            skipped={"storycloze_2016": "no data"},
            ppl=12.5,
        )
    ]
    cols, table = summarise(rows)
    assert cols == ["acc.arc_easy", "mean_acc", "ppl.wikitext2"]
    md = to_markdown(cols, table, unscored_tasks(rows))
    assert "| none | none | 1 | 50.0 | 50.0 | 12.50 |" in md
    assert "- `piqa` not scored (dense: too long)" in md and "- `storycloze_2016` not scored (dense: no data)" in md


def test_mean_acc_is_compared_over_the_task_set_every_row_scored():
    """A row that scored an extra task (or missed one) must not get a mean over another set."""
    from selfcal.pipeline.aggregate import common_tasks, summarise, to_markdown

    rows = [
        _record("a", "gptq", {"arc_easy": 0.6, "piqa": 0.7}),
        _record("b", "wanda", {"arc_easy": 0.4, "piqa": 0.5, "boolq": 0.9}),
    ]
    assert common_tasks(rows) == ["arc_easy", "piqa"]
    cols, table = summarise(rows)
    by_method = {e["method"]: e for e in table}
    assert by_method["gptq"]["mean_acc"] == pytest.approx(0.65)
    assert by_method["wanda"]["mean_acc"] == pytest.approx(0.45)  # not 0.6: boolq is outside the shared set
    assert "`mean_acc` is over the 2 task(s) every row scored: arc_easy, piqa." in to_markdown(
        cols, table, {}, common_tasks(rows)
    )


def test_identical_sets_have_a_zero_std_one_set_none_and_the_table_prints_exactly_that():
    """Greedy decoding from BOS ignores the seed: the temperature grid's 0 -> 0 sets are one set, std 0.0, shown
    as "± 0.0" so they do not read as one set; one set has no std at all (None, the mean alone)."""
    from selfcal.pipeline.aggregate import summarise, to_csv, to_markdown

    twins = [_record(f"z{i}", "sparsegpt", {"arc_easy": 0.324}, source="t00-00") for i in range(2)]
    cols, table = summarise([*twins, _record("o", "sparsegpt", {"arc_easy": 0.345}, source="t20-00")])
    zero, one = table
    assert zero["acc.arc_easy.std"] == 0.0 and one["acc.arc_easy.std"] is None
    rows = to_markdown(cols, table).splitlines()[2:4]
    assert rows == ["| sparsegpt | t00-00 | 2 | 32.4 ± 0.0 | 32.4 ± 0.0 |", "| sparsegpt | t20-00 | 1 | 34.5 | 34.5 |"]
    assert to_csv(cols, table).splitlines()[2] == "sparsegpt,t20-00,1,0.345,,0.345,,sparsegpt/t20-00"  # no std: empty


def test_a_metric_one_set_lacks_is_averaged_over_the_sets_that_have_it_not_counted_as_zero():
    from selfcal.pipeline.aggregate import report_metrics, summarise

    rows = [
        _record("d", "none", {"arc_easy": 0.5}),
        _record("a", "gptq", {"arc_easy": 0.6}, ppl=10.0),
        _record("b", "gptq", {"arc_easy": 0.4}),  # no perplexity
    ]
    cols, table = summarise(rows)
    dense, gptq = table
    assert gptq["n_sets"] == 2 and gptq["acc.arc_easy"] == pytest.approx(0.5)
    assert gptq["acc.arc_easy.std"] == pytest.approx(0.1 * 2**0.5)  # sample std: sqrt((0.1² + 0.1²) / 1)
    assert gptq["ppl.wikitext2"] == 10.0 and gptq["ppl.wikitext2.std"] is None  # one set has it: its value, no std
    assert dense["ppl.wikitext2"] is None and dense["ppl.wikitext2.std"] is None
    assert report_metrics(cols, table) == {
        "none": {"none": {"acc.arc_easy": 0.5, "mean_acc": 0.5}},
        "gptq": {"self": {"acc.arc_easy": pytest.approx(0.5), "mean_acc": pytest.approx(0.5), "ppl.wikitext2": 10.0}},
    }


def test_perplexity_sets_read_txt_verbatim_and_jsonl_documents_joined(tmp_path):
    from selfcal.evaluation.perplexity import read_perplexity_text

    (tmp_path / "a.txt").write_text("line one\n\nline two\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "doc one"}) + "\n" + json.dumps({"text": "doc two"}) + "\n")
    assert read_perplexity_text("a.txt", root=tmp_path) == "line one\n\nline two\n"
    assert read_perplexity_text("b.jsonl", root=tmp_path) == "doc one\n\ndoc two"
    with pytest.raises(DataError, match="does not exist"):
        read_perplexity_text("./missing.jsonl", root=tmp_path, key="evaluation.perplexity.c4.path")


def test_each_local_task_reads_only_its_own_split_and_on_request_data_is_never_missing(tmp_path):
    """A split key of lm-eval's YAML left in place (StoryCloze's test_split) would make lm-eval read a split the
    local file does not have; a task whose data comes on request only is skipped, not reported missing."""
    from selfcal.evaluation.tasks import TASKS, missing_task_files

    for name, task in TASKS.items():
        (tmp_path / task.file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / task.file).write_text("{}\n")
        cfg = local_task_config(name, tmp_path)
        split = task.split.removesuffix("_split")
        keys = ("training_split", "validation_split", "test_split", "fewshot_split")
        assert {k: cfg[k] for k in keys if k in cfg} == {task.split: split}, name
        assert cfg["dataset_kwargs"] == {"data_files": {split: str((tmp_path / task.file).resolve())}}, name
    files = missing_task_files(["arc_easy", "storycloze_2016"], tmp_path / "empty")
    assert files == [("arc_easy", "arc_easy/test.jsonl")]


def test_the_harness_runs_lm_eval_zero_shot_and_reports_its_numbers(monkeypatch):
    import lm_eval

    from selfcal.evaluation import harness

    seen = {}

    def simple_evaluate(**kwargs):
        seen.update(kwargs)
        return {
            "results": {"boolq": {"acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25}},
            "n-samples": {"boolq": {"effective": 4, "original": 9}},
        }

    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    out = harness._one_task(SimpleNamespace(batch_size=8), "boolq", limit=4, seed=7)
    assert (out["acc"], out["acc_stderr"], out["acc_norm"], out["n"], out["n_total"], out["batch_size"]) == (
        0.5,
        0.1,
        0.25,
        4,
        9,
        8,
    )
    assert (seen["tasks"], seen["num_fewshot"], seen["limit"]) == (["boolq"], 0, 4)
    assert {seen[k] for k in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")} == {7}
    # "auto" is lm-eval's search on any CUDA device (a model's parameters say "cuda:0"), a fixed batch on the CPU
    assert (
        harness.effective_batch_size("auto", "cuda:0") == "auto" and harness.effective_batch_size("auto", "cpu") == 16
    )
    assert harness.effective_batch_size("8", "cuda:0") == 8


def test_a_perplexity_text_longer_than_the_context_is_tokenized_whole_without_transformers_warning(tiny_model):
    """The whole text is one sequence on purpose (cut into windows after); transformers' "will result in indexing
    errors" warning was printed beside `selfcal check`'s one line and in every evaluate log."""
    from selfcal.evaluation.perplexity import text_ids
    from selfcal.modelio import ModelRef, load_tokenizer

    tokenizer = load_tokenizer(ModelRef(name="tiny", local_dir=tiny_model))
    tokenizer.model_max_length = 8
    text = "Once upon a time there was a little girl who liked to read stories. " * 4
    ids = text_ids(tokenizer, text)
    assert ids.tolist() == tokenizer(text, verbose=False).input_ids and len(ids) > 8
    assert not tokenizer.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_aggregate_names_how_many_records_are_missing_not_only_the_first(tmp_path):
    """After one item's walkthrough, aggregate named one missing record at a time."""
    from selfcal.pipeline.aggregate import load_evaluations

    (tmp_path / "dense.json").write_text("{}")
    files = [tmp_path / f"{n}.json" for n in ("dense", "self-s0-gptq", "self-s1-gptq", "c4-s0-gptq")]
    with pytest.raises(DataError) as e:
        load_evaluations(files)
    assert str(e.value) == (
        f"{files[1]}: evaluation record missing (and 2 more of the 4 the params define: self-s1-gptq, c4-s0-gptq; "
        "run the evaluate stage first)"
    )
