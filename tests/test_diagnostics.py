"""Calibration-set diagnostics: hand-checked values and the inspect command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfcal.calibration import diagnostics as d
from selfcal.calibration.calibset import save_calibration_set
from selfcal.cli import main
from tests.helpers import calibration_fields


def test_seq_rep_counts_repeated_ngrams():
    assert d.seq_rep(np.array([[1, 2, 3, 4, 5, 6]]), 4) == 0.0
    # 4-grams of 1 2 1 2 1 2: (1212), (2121), (1212): 2 unique of 3
    assert d.seq_rep(np.array([[1, 2, 1, 2, 1, 2]]), 4) == pytest.approx(1 - 2 / 3)
    # The mean over sequences, not the sum.
    assert d.seq_rep(np.array([[1, 2, 3, 4, 5, 6], [1, 2, 1, 2, 1, 2]]), 4) == pytest.approx((1 - 2 / 3) / 2)


def test_repetition_is_the_share_of_tokens_seen_earlier_in_their_sequence():
    # Row 1: 1 2 1 3 1 -> positions 3 and 5 repeat (2 of 5). Row 2: 4 4 4 4 4 -> 4 of 5 repeat.
    # Row 3: 5 6 7 8 9 -> none; a token seen only in another row (1) never counts.
    toks = np.array([[1, 2, 1, 3, 1], [4, 4, 4, 4, 4], [5, 6, 7, 8, 1]])
    assert d.repetition(toks) == pytest.approx((2 + 4 + 0) / 15)
    assert d.repetition(np.array([[1, 2, 3]])) == 0.0


def test_ngram_diversity_is_the_mean_of_distinct_ratios_and_the_product_keeps_its_name():
    toks = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
    div = d.ngram_diversity(toks)
    # 8 unigrams (1 unique), 6 bigrams (1), 4 trigrams (1), 2 four-grams (1)
    assert div["distinct_1"] == pytest.approx(1 / 8)
    assert div["distinct_4"] == pytest.approx(1 / 2)
    assert div["ngram_diversity"] == pytest.approx((1 / 8 + 1 / 6 + 1 / 4 + 1 / 2) / 4)
    assert div["distinct_product"] == pytest.approx((1 / 8) * (1 / 6) * (1 / 4) * (1 / 2))
    assert d.ngram_diversity(np.array([[1, 2, 3, 4, 5]]))["ngram_diversity"] == pytest.approx(1.0)
    assert d.vocab_coverage(np.array([[0, 1, 2, 2]]), 10) == pytest.approx(0.3)


def test_random_vocabulary_source_matches_the_analytic_coverage_and_repetition():
    """Uniform tokens: coverage 1 - exp(-nL/V) of the vocabulary, and per-sequence repetition
    (1/L) * sum_i [1 - (1 - 1/V)^(i-1)], about (L - 1) / (2V) for L << V. (The paper's vocab row
    on Gemma, n L = 262,144 over V = 256,000: coverage .64, repetition .00.)"""
    from selfcal.calibration import sources
    from selfcal.config import VocabSourceConfig

    V = 4096
    tok = type("Tok", (), {"all_special_ids": [], "__len__": lambda self: V})()
    req = sources.SourceRequest(n=32, seq_len=128, seed=0, batch_size=8, progress=False)
    r = sources.get("vocab").build(VocabSourceConfig(kind="vocab"), req, tokenizer=tok)
    n, L = r.tokens.shape
    assert abs(d.vocab_coverage(r.tokens, V) - (1 - np.exp(-n * L / V))) < 0.01
    expected_rep = np.mean([1 - (1 - 1 / V) ** (i - 1) for i in range(1, L + 1)])
    assert expected_rep == pytest.approx((L - 1) / (2 * V), rel=0.02)
    assert d.repetition(r.tokens) == pytest.approx(expected_rep, abs=0.004)


def test_set_perplexity_is_the_mean_of_per_sequence_perplexities(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    toks = np.random.default_rng(1).integers(3, 500, size=(3, 10))
    ppl = d.set_perplexity(model, toks, batch_size=2)
    per_seq, pooled = [], []
    with torch.no_grad():
        for row in toks:
            ids = torch.as_tensor(row[None], dtype=torch.long)
            loss = model(input_ids=ids, labels=ids).loss  # mean NLL of tokens 2..L
            per_seq.append(float(torch.exp(loss)))
            pooled.append(float(loss))
    assert ppl["perplexity"] == pytest.approx(np.mean(per_seq), rel=1e-5)
    assert ppl["pooled_perplexity"] == pytest.approx(np.exp(np.mean(pooled)), rel=1e-5)
    assert ppl["perplexity"] > ppl["pooled_perplexity"]  # Jensen: a mean of exps exceeds the exp of the mean


def test_zipf_recovers_the_exponent():
    ranks = np.arange(1, 201)
    counts = np.round(1e5 * ranks**-1.3).astype(int)
    tokens = np.repeat(ranks, counts)[None, :]
    assert d.zipf_coefficient(tokens) == pytest.approx(1.3, abs=0.05)


def test_zipf_is_fitted_on_the_5000_most_frequent_tokens():
    """Not a power law (3 + 10^4 / rank), so the slope depends on the ranks fitted: all of the top
    5,000, and none of the rarer tokens beyond them."""
    ranks = np.arange(1, 5001)
    counts = 3 + np.round(1e4 / ranks).astype(int)
    expected = -np.polyfit(np.log(ranks), np.log(counts), 1)[0]
    top = np.repeat(ranks, counts)
    assert d.zipf_coefficient(top[None, :]) == pytest.approx(expected, rel=1e-9)
    rare = np.arange(5001, 5601)  # seen once each
    assert d.zipf_coefficient(np.concatenate([top, rare])[None, :]) == pytest.approx(expected, rel=1e-9)


def test_segment_lengths_split_at_the_start_token():
    stats = d.segment_lengths(np.array([[1, 5, 6, 2, 1, 7, 2, 1]]), 1)
    assert stats["segments"] == 3
    assert stats["segment_len_max"] == 4 and stats["segment_len_min"] == 1
    assert stats["segment_len_median"] == 3 and stats["segment_len_mean"] == pytest.approx(8 / 3)  # 4, 3, 1


def test_activation_distance_is_zero_for_identical_and_grows_with_shift():
    a = [(torch.zeros(4), torch.ones(4))]
    assert d.activation_distance(a, a)["mean_rel_distance_avg"] == pytest.approx(0.0)
    b = [(torch.ones(4), torch.ones(4) * 4)]
    far = d.activation_distance(a, b)
    assert far["mean_rel_distance_avg"] == pytest.approx(1.0)
    assert far["logvar_abs_distance_avg"] == pytest.approx(np.log(4), rel=1e-3)


def test_layer_input_stats_match_a_direct_computation(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    toks = np.random.default_rng(0).integers(3, 500, size=(5, 12))
    stats = d.layer_input_stats(model, toks, batch_size=2)
    with torch.no_grad():
        hidden = model(input_ids=torch.as_tensor(toks), output_hidden_states=True).hidden_states
    assert len(stats) == model.config.num_hidden_layers
    h1 = hidden[1].double().reshape(-1, hidden[1].shape[-1])
    torch.testing.assert_close(stats[1][0], h1.mean(0), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(stats[1][1], h1.var(0, unbiased=False), rtol=1e-5, atol=1e-8)


def test_inspect_command_on_a_set_and_a_model(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toks = np.random.default_rng(0).integers(3, 500, size=(4, 16)).astype(np.int32)
    save_calibration_set(tmp_path / "set", toks, ["x"] * 4, **calibration_fields(toks))
    assert main(["inspect", str(tmp_path / "set"), "--model", str(tiny_model)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 4 and out["seq_len"] == 16
    assert out["perplexity"] > 1 and 0 < out["vocab_coverage"] <= 1
    assert "activation" not in out
    assert main(["inspect", str(tmp_path / "missing"), "--model", str(tiny_model)]) == 2
    assert "calibration tokens missing" in capsys.readouterr().err
    # a --reference the command line gave is named as such, not as the params key nobody set
    assert main(["inspect", str(tmp_path / "set"), "--model", str(tiny_model), "--reference", "nope.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfcal: error: --reference") and "calibration.diagnostics" not in err, err
    # a set and --source/--seed: one of them would be ignored
    assert main(["inspect", str(tmp_path / "set"), "--model", str(tiny_model), "--seed", "3"]) == 2
    assert "not both" in capsys.readouterr().err


def test_inspect_draws_a_bar_over_each_pass_of_the_model_and_none_with_no_progress(
    tiny_model, tmp_path, capfd, monkeypatch
):
    """inspect ran three passes of the model (the set's perplexity, its activations, the reference's) with no bar:
    minutes of silence on a 128 x 2048 set on a CPU."""
    monkeypatch.chdir(tmp_path)
    toks = np.random.default_rng(0).integers(3, 500, size=(4, 16)).astype(np.int32)
    save_calibration_set(tmp_path / "set", toks, ["x"] * 4, **calibration_fields(toks))
    (tmp_path / "ref.txt").write_text("a few words of text that the tiny tokenizer cuts up. " * 20)
    cmd = ["inspect", str(tmp_path / "set"), "--model", str(tiny_model), "--reference", "ref.txt"]
    capfd.readouterr()
    assert main(cmd) == 0
    err = capfd.readouterr().err
    for desc in ("set perplexity", "set activations", "reference activations"):
        assert f"{desc}: 100%" in err, err
    assert main([*cmd, "--no-progress"]) == 0
    err = capfd.readouterr().err  # (in-process, the libraries' bars stay: tqdm read TQDM_DISABLE at its import)
    assert not any(desc in err for desc in ("perplexity:", "activations:")), err


def test_a_one_off_inspection_runs_beside_a_run_that_holds_the_workspace(tiny_model, tmp_path, capsys, monkeypatch):
    """`selfcal inspect SET --model M` writes nothing, yet in a workspace (a params.yaml there) it took the
    workspace lock: refused while a pipeline run went on, which is when one wants to look at a set."""
    from tests.helpers import hold_workspace, small_params, write_params

    write_params(tmp_path / "params.yaml", small_params(tiny_model, tmp_path))
    monkeypatch.chdir(tmp_path)
    toks = np.random.default_rng(0).integers(3, 500, size=(4, 16)).astype(np.int32)
    save_calibration_set(tmp_path / "set", toks, ["x"] * 4, **calibration_fields(toks))
    with hold_workspace(tmp_path, "a run still going"):
        assert main(["inspect", str(tmp_path / "set"), "--model", str(tiny_model), "--no-progress"]) == 0
        assert json.loads(capsys.readouterr().out)["n"] == 4
        assert main(["inspect", "--source", "self", "--seed", "0"]) == 2  # the stage writes: it still waits its turn
        assert "a run still going" in capsys.readouterr().err
