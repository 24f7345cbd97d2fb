"""The fast evaluation path against plain lm-eval (issue 18): the same requests, the same per-example
log-likelihoods (float32 on the CPU: within 1e-4), the same greedy flags, the same accuracies to the last
example, on every task; and the prepared requests built once per tokenizer, then read back."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from selfcal.evaluation import fast
from selfcal.evaluation.prepared import prepared, task_key
from selfcal.evaluation.tasks import resolve_tasks

pytestmark = pytest.mark.usefixtures("shared_data")

TASKS = [
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "lambada_openai",
    "openbookqa",
    "piqa",
    "rte",
    "winogrande",
]
LIMIT = 12


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model)


def _plain(model, tokenizer, spec):
    """lm-eval's own run of one task, with every request's response (log_samples)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from selfcal.evaluation.harness import task_name
    from selfcal.evaluation.tasks import task_manager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    name = task_name(spec)
    out = simple_evaluate(
        model=lm, tasks=[spec], num_fewshot=0, limit=LIMIT, log_samples=True, task_manager=task_manager()
    )
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return out["results"][name], samples


@pytest.mark.parametrize("name", TASKS)
def test_fast_path_gives_lm_evals_loglikelihoods_and_accuracies(model_and_tokenizer, shared_data, name, tmp_path):
    model, tokenizer = model_and_tokenizer
    (spec,), _ = resolve_tasks([name], shared_data)
    window = fast.max_length(model, tokenizer)
    task, how = prepared(spec, tokenizer, limit=LIMIT, cache_dir=tmp_path)
    assert how == "built" and task.n_docs == LIMIT
    try:
        plain, samples = _plain(model, tokenizer, spec)
    except AssertionError:  # lm-eval refuses the task on this 128-token model: so must the fast path
        with pytest.raises(fast.ContextTooLong):
            fast.score(model, task, window=window)
        return
    # a small token budget: many batches, so batching and de-duplication are exercised too
    ll, greedy = fast.score(model, task, window=window, batch_tokens=256)
    expected_ll, expected_greedy = [], []
    for sample in samples:
        for resp in sample["resps"]:
            expected_ll.append(float(resp[0][0]))
            expected_greedy.append(bool(resp[0][1]))
    assert len(expected_ll) == task.n_requests
    np.testing.assert_allclose(ll, expected_ll, rtol=1e-4, atol=1e-4)
    assert list(greedy) == expected_greedy
    ours = fast.aggregate(task, ll, greedy)
    assert ours["acc"] == plain["acc,none"]  # to the last example
    if "acc_norm,none" in plain:
        assert ours["acc_norm"] == plain["acc_norm,none"]
    assert ours["acc_stderr"] == pytest.approx(plain["acc_stderr,none"])


def test_prepared_requests_are_built_once_per_tokenizer_and_read_back(model_and_tokenizer, shared_data, tmp_path):
    from selfcal.evaluation import prepared as prep
    from tests.helpers import build_tokenizer

    _, tokenizer = model_and_tokenizer
    (spec,), _ = resolve_tasks(["arc_easy"], shared_data)
    first, how = prepared(spec, tokenizer, limit=5, cache_dir=tmp_path)
    assert how == "built"
    prep._LOADED.clear()  # a new process
    again, how = prepared(spec, tokenizer, limit=5, cache_dir=tmp_path)
    assert how == "cache" and again.key == first.key
    assert np.array_equal(again.tokens, first.tokens) and again.gold == first.gold
    assert prepared(spec, tokenizer, limit=5, cache_dir=tmp_path)[1] == "memory"
    assert task_key(spec, tokenizer, 6) != first.key  # another slice of the task
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "other", vocab_size=300))
    assert task_key(spec, other, 5) != first.key  # another tokenizer, other token ids
    import copy

    padded = copy.deepcopy(tokenizer)
    padded.pad_token = padded.eos_token  # what lm-eval's HFLM does to the tokenizer it is handed
    assert task_key(spec, padded, 5) == first.key


def test_the_evaluate_stage_records_the_fast_path(tiny_model, tmp_path, shared_data):
    from selfcal.config import parse_params
    from selfcal.pipeline.evaluate import evaluate
    from tests.helpers import small_params

    p = parse_params(small_params(tiny_model, tmp_path, **{"tracking.enabled": False}), root=tmp_path)
    record = evaluate(p, "dense", progress=False)
    score = record.zero_shot.tasks["arc_easy"]
    assert record.zero_shot.engine == "fast" and score.requests == 4 * 20 and score.prepared == "built"
    assert Path(p.state_dir / "prepared-tasks").is_dir()
    again = evaluate(p, "dense", progress=False).zero_shot.tasks["arc_easy"]
    assert again.acc == score.acc and again.prepared == "memory"


@pytest.mark.parametrize("name", ["hellaswag", "winogrande"])  # configs with !function entries
def test_the_prepared_key_is_the_same_in_another_process(model_and_tokenizer, shared_data, tiny_model, name):
    """lm-eval resolves a task's functions to Python objects whose repr holds a memory address: the key must
    not depend on it, or every evaluate process would rebuild the task."""
    import subprocess
    import sys

    from tests.helpers import REPO

    _, tokenizer = model_and_tokenizer
    (spec,), _ = resolve_tasks([name], shared_data)
    code = (
        "import sys; from pathlib import Path; from transformers import AutoTokenizer;"
        "from selfcal.evaluation.prepared import task_key; from selfcal.evaluation.tasks import resolve_tasks;"
        f"(spec,), _ = resolve_tasks([{name!r}], Path({str(shared_data)!r}));"
        f"print(task_key(spec, AutoTokenizer.from_pretrained({str(tiny_model)!r}), 5))"
    )
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == task_key(spec, tokenizer, 5)


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    """One checkpoint per method, made by the pipeline's own compress step on the tiny model."""
    from selfcal.config import parse_params
    from selfcal.pipeline import layout
    from selfcal.pipeline.compress import compress
    from selfcal.pipeline.generate import generate
    from tests.helpers import small_params

    work = tmp_path_factory.mktemp("methods")
    methods = ["gptq", "awq", "sparsegpt", "wanda"]
    overrides = {
        "tracking.enabled": False,
        "compression.methods": methods,
        "compression.awq": {"group_size": 32},
        "compression.sparsegpt": {},
        "compression.wanda": {},
    }
    p = parse_params(small_params(tiny_model, work, **overrides), root=work)
    generate(p, "self", 0, progress=False)
    for method in methods:
        compress(p, "self", 0, method)
    return {m: layout.checkpoint_dir(p, "self", 0, m) for m in methods}


@pytest.mark.parametrize("method", ["gptq", "awq", "sparsegpt", "wanda"])
def test_fast_path_gives_lm_evals_numbers_on_a_checkpoint_of_each_method(checkpoints, shared_data, method, tmp_path):
    """A compressed-tensors checkpoint as the evaluate stage loads it (quantized ones decompress on their first
    forward through the whole model, which the fast path makes before it calls the decoder alone)."""
    from selfcal.modelio import ModelRef, load_model, load_tokenizer

    ref = ModelRef(name=method, local_dir=checkpoints[method])
    model, tokenizer = load_model(ref, dtype="float32", device="cpu"), load_tokenizer(ref)
    window = fast.max_length(model, tokenizer)
    for name in ("arc_easy",):  # every task's arithmetic is covered above; here, each method's checkpoint
        (spec,), _ = resolve_tasks([name], shared_data)
        task, _ = prepared(spec, tokenizer, limit=LIMIT, cache_dir=tmp_path)
        plain, samples = _plain(model, tokenizer, spec)
        ll, greedy = fast.score(model, task, window=window, batch_tokens=256)
        expected = [float(r[0][0]) for s in samples for r in s["resps"]]
        np.testing.assert_allclose(ll, expected, rtol=1e-4, atol=1e-4)
        assert list(greedy) == [bool(r[0][1]) for s in samples for r in s["resps"]]
        assert fast.aggregate(task, ll, greedy)["acc"] == plain["acc,none"], (method, name)


def test_window_scores_of_a_fresh_quantized_checkpoint_equal_the_whole_models(checkpoints):
    """``window_nll`` calls the decoder and the head apart, on a model straight from disk: a packed GPTQ checkpoint
    must have made its first forward through the whole model by then (its weights are decompressed there)."""
    import torch

    from selfcal.modelio import ModelRef, load_model
    from selfcal.scoring import window_nll

    model = load_model(ModelRef(name="gptq", local_dir=checkpoints["gptq"]), dtype="float32", device="cpu")
    windows = torch.randint(3, 500, (3, 16), generator=torch.Generator().manual_seed(1))
    got = window_nll(model, windows, batch_size=2, budget=1)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].float()
    whole = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").double().sum(1)
    torch.testing.assert_close(got, whole, rtol=1e-6, atol=1e-6)


def _synthetic(requests, doc_of, choice_of, gold, completion_len, metrics=("acc", "acc_norm")):
    """A PreparedTask from (context, continuation) token lists."""
    from selfcal.evaluation.prepared import PreparedTask

    lengths = [len(c) + len(t) for c, t in requests]
    return PreparedTask(
        name="synthetic",
        output_type="multiple_choice",
        metrics=metrics,
        doc_of=np.array(doc_of),
        choice_of=np.array(choice_of),
        tokens=np.array([t for c, cont in requests for t in (*c, *cont)], dtype=np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        ctx_len=np.array([len(c) for c, _ in requests]),
        gold=gold,
        completion_len=completion_len,
        n_total=len(gold) + 1,
        key="k",
    )


def test_aggregate_breaks_ties_to_the_first_choice_and_reports_acc_norm_only_where_lm_eval_does():
    """numpy's argmax takes the first of equal values; a task without acc_norm in its metrics (BoolQ, WinoGrande)
    gets none, as lm-eval's results have none."""
    reqs = [([1], [5])] * 4
    ll = np.array([-1.0, -1.0, -2.0, -3.0])  # document 0: a tie; document 1: choice 0 by acc, choice 1 per character
    task = _synthetic(reqs, [0, 0, 1, 1], [0, 1, 0, 1], gold=[1, 0], completion_len=[[1.0, 1.0], [1.0, 2.0]])
    assert fast.aggregate(task, ll, np.zeros(4, bool)) == {"acc": 0.5, "acc_stderr": 0.5, "acc_norm": 0.0}
    plain = _synthetic(reqs, [0, 0, 1, 1], [0, 1, 0, 1], [1, 0], [[1.0, 1.0], [1.0, 2.0]], metrics=("acc",))
    assert fast.aggregate(plain, ll, np.zeros(4, bool)) == {"acc": 0.5, "acc_stderr": 0.5}


def test_requests_sharing_an_input_are_scored_alike_and_greedy_continuations_flagged(model_and_tokenizer):
    """Against the whole model's log-softmax by hand: requests that read one input (single-token continuations
    of one context) each get their own log-probability, a continuation of the model's argmax tokens is greedy,
    a continuation as long as the window is scored, one token longer refused (lm-eval: len(cont) <= max_length)."""
    import torch

    model, tokenizer = model_and_tokenizer
    ctx = [1, 40, 41, 42]
    with torch.no_grad():
        g1 = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
        g2 = int(model(torch.tensor([[*ctx, g1]])).logits[0, -1].argmax())
    other = [t for t in (7, 8, 9) if t != g1][:2]
    reqs = [(ctx, [g1, g2]), (ctx, [other[0]]), (ctx, [other[1]]), (ctx, [g1])]
    task = _synthetic(reqs, [0, 1, 1, 2], [0, 0, 1, 0], gold=[0, 1, 0], completion_len=[[1.0], [1.0, 1.0], [1.0]])
    expected = []
    for c, cont in reqs:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([c + cont])).logits[0], -1)
        expected.append(sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(cont)))
    ll, greedy = fast.score(model, task, window=128, batch_tokens=5)
    np.testing.assert_allclose(ll, expected, rtol=1e-5, atol=1e-5)
    assert list(greedy) == [True, False, False, True]
    reqs_ = fast.Requests(task, 128)  # two inputs (ctx + g1, and ctx), of 5 and 4 tokens
    assert list(reqs_.batches(9)) == [[0], [1]] and list(reqs_.batches(10)) == [[0, 1]]
    fast.score(model, task, window=2)
    with pytest.raises(fast.ContextTooLong):
        fast.score(model, task, window=1)
    out = fast.run_task(model, tokenizer, task)
    assert (out["n"], out["n_total"], out["requests"]) == (3, 4, 4)


def test_scoring_shows_a_bar_over_the_tasks_inputs_only_when_asked_and_scores_alike(model_and_tokenizer, capsys):
    """The longest part of evaluate (a full HellaSwag: minutes on a CPU) had no bar; `--no-progress` keeps it off."""
    model, _ = model_and_tokenizer
    reqs = [([1, 40, 41], [7]), ([1, 40, 41], [8]), ([1, 50], [9, 10])]
    task = _synthetic(reqs, [0, 0, 1], [0, 1, 0], gold=[0, 0], completion_len=[[1.0, 1.0], [2.0]])
    quiet = fast.score(model, task, window=128, batch_tokens=3)
    assert capsys.readouterr().err == ""
    shown = fast.score(model, task, window=128, batch_tokens=3, progress=True)
    err = capsys.readouterr().err
    assert f"{task.name}:   0%" in err and "0/2 [" in err  # over the two unique inputs (cleared when done)
    np.testing.assert_array_equal(quiet[0], shown[0])
    np.testing.assert_array_equal(quiet[1], shown[1])


def test_gold_indices_past_the_choices_and_unknown_answers_are_minus_100():
    """``ConfigurableTask.process_results``: an index (or each of a list) must be < len(choices), a string must be
    one of the choices; anything else is -100, which no prediction matches."""
    from selfcal.evaluation.prepared import _gold

    def task(target):
        return SimpleNamespace(multiple_input=False, doc_to_target=lambda doc: target)

    choices = ["a", "b"]
    assert [_gold(task(t), {}, choices) for t in (0, 1, 2, "b", "c")] == [0, 1, -100, 1, -100]
    assert _gold(task([1, 2]), {}, choices) == [1, -100]


def test_empty_contexts_start_with_bos_and_the_tokenizer_key_sees_the_bos_token(model_and_tokenizer):
    """lm-eval's HFLM.prefix_token_id (BOS, else EOS) stands in for an empty context; so a tokenizer whose BOS
    differs makes other requests and another prepared key."""
    import copy

    from lm_eval.api.instance import Instance

    from selfcal.evaluation.prepared import _token_lm, tokenizer_digest

    _, tokenizer = model_and_tokenizer
    recorder = _token_lm(tokenizer)
    recorder.loglikelihood([Instance("loglikelihood", {}, ("", " cat"), 0)], disable_tqdm=True)
    assert recorder.recorded == [([tokenizer.bos_token_id], tokenizer.encode(" cat", add_special_tokens=False))]
    changed = copy.deepcopy(tokenizer)
    changed.bos_token = "<unk>"
    assert tokenizer_digest(changed) != tokenizer_digest(tokenizer)


def test_prepared_counts_and_acc_norm_lengths_are_lm_evals(model_and_tokenizer, tmp_path):
    """n_total is the split's size, not the limited slice; completion_len is each choice's length as rendered."""
    import json

    _, tokenizer = model_and_tokenizer
    docs = [
        {"question": "Which sat on the mat?", "choices": ["the cat ", " a dog"], "gold": 0},
        {"question": "What boils?", "choices": ["water", "  salt  "], "gold": 1},
        {"question": "Who smiled?", "choices": ["he", "she"], "gold": 0},
    ]
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (spec,), _ = resolve_tasks(["arc_easy"], tmp_path)
    task, _ = prepared(spec, tokenizer, limit=2, cache_dir=None)
    assert (task.n_docs, task.n_total, task.gold) == (2, 3, [0, 1])
    assert task.completion_len == [[8.0, 6.0], [5.0, 8.0]]
