"""Calibration baselines from small local files, and their error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfcal import textdata
from selfcal.calibration import sources
from selfcal.config import CorpusSourceConfig, JiSourceConfig, SelfSourceConfig, VocabSourceConfig
from selfcal.errors import DataError
from tests.helpers import STORIES

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason="needs the stories260K tokenizer")

WORDS = "the cat sat on a mat and then a dog ran to the park where birds sang all day long".split()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(STORIES)


def _docs(k: int, words: int = 60) -> list[str]:
    rng = np.random.default_rng(k)
    return [" ".join(rng.choice(WORDS, words)) for _ in range(k)]


def _req(tmp_path, n=4, seq_len=16, seed=0, name="c4"):
    return sources.SourceRequest(
        n=n, seq_len=seq_len, seed=seed, batch_size=4, root=tmp_path, name=name, progress=False
    )


def _corpus(path, **kw):
    return CorpusSourceConfig(kind="corpus", path=str(path), **kw)


def test_jsonl_txt_dir_and_parquet_give_windows(tmp_path, tokenizer):
    docs = _docs(30)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d, "url": "x"}) + "\n" for d in docs))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("\n\n".join(docs[:15]))
    (tmp_path / "d" / "b.txt").write_text("\n\n".join(docs[15:]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": docs}), tmp_path / "c.parquet")
    results = [
        sources.get("corpus").build(_corpus("c.jsonl"), _req(tmp_path), tokenizer=tokenizer),
        sources.get("corpus").build(_corpus("d"), _req(tmp_path), tokenizer=tokenizer),
        sources.get("corpus").build(_corpus("c.parquet", text_field="content"), _req(tmp_path), tokenizer=tokenizer),
    ]
    for r in results:
        assert r.tokens.shape == (4, 16) and r.tokens.dtype == np.int32
        assert r.provenance["documents"] == 30
    # Same text, same tokenization, same fixed shuffle: identical sets whatever the file format.
    assert np.array_equal(results[0].tokens, results[1].tokens)
    assert np.array_equal(results[0].tokens, results[2].tokens)


def test_seeds_take_disjoint_windows_and_are_reproducible(tmp_path, tokenizer):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(40)))
    spec = _corpus("c.jsonl")
    sets = [sources.get("corpus").build(spec, _req(tmp_path, seed=s), tokenizer=tokenizer).tokens for s in range(3)]
    rows = [tuple(r) for s in sets for r in s]
    assert len(set(rows)) == len(rows), "no window may appear in two sets"
    again = sources.get("corpus").build(spec, _req(tmp_path, seed=1), tokenizer=tokenizer).tokens
    assert np.array_equal(again, sets[1])


def test_corpus_too_small_is_a_clear_error_unless_overlap_allowed(tmp_path, tokenizer):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(3, 20)))
    build = sources.get("corpus").build
    with pytest.raises(DataError, match=r"fewer than the 100 requested"):
        build(_corpus("c.jsonl"), _req(tmp_path, n=100), tokenizer=tokenizer)
    total = len(textdata.windows(textdata.token_stream(_docs(3, 20), tokenizer), 16))
    with pytest.raises(DataError, match=rf"enough for {total // 2} disjoint set\(s\) of 2 .* allow_overlap: true"):
        build(_corpus("c.jsonl"), _req(tmp_path, n=2, seed=50), tokenizer=tokenizer)
    ok = build(_corpus("c.jsonl", allow_overlap=True), _req(tmp_path, n=2, seed=50), tokenizer=tokenizer)
    assert ok.tokens.shape == (2, 16) and ok.provenance["overlap_allowed"] is True


def test_missing_empty_and_wrong_field(tmp_path, tokenizer):
    build = sources.get("corpus").build
    with pytest.raises(DataError, match=r"^calibration.sources.c4.path: corpus .*nope.jsonl' does not exist$"):
        build(_corpus("./nope.jsonl"), _req(tmp_path), tokenizer=tokenizer)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match="corpus is empty"):
        build(_corpus("empty.txt"), _req(tmp_path), tokenizer=tokenizer)
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="row 0 has no field 'text'"):
        build(_corpus("c.jsonl"), _req(tmp_path), tokenizer=tokenizer)


def test_offline_hub_dataset_fails_with_a_message(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^calibration.sources.c4.path: 'allenai/c4' is not a local file"):
        sources.get("corpus").build(_corpus("allenai/c4", hub_config="en"), _req(tmp_path), tokenizer=tokenizer)


def test_vocab_source_is_uniform_over_non_special_tokens(tmp_path, tokenizer):
    build = sources.get("vocab").build
    r = build(VocabSourceConfig(kind="vocab"), _req(tmp_path, n=64, seq_len=256, seed=3), tokenizer=tokenizer)
    assert not set(np.unique(r.tokens)) & set(tokenizer.all_special_ids)
    assert len(np.unique(r.tokens)) > 0.95 * r.provenance["vocabulary_size"]
    counts = np.bincount(r.tokens.ravel(), minlength=len(tokenizer))[3:]
    # Uniform multinomial counts have a coefficient of variation of about 1/sqrt(mean).
    assert abs(counts.std() / counts.mean() - 1 / np.sqrt(counts.mean())) < 0.04
    same = build(VocabSourceConfig(kind="vocab"), _req(tmp_path, n=64, seq_len=256, seed=3), tokenizer=tokenizer)
    other = build(VocabSourceConfig(kind="vocab"), _req(tmp_path, n=64, seq_len=256, seed=4), tokenizer=tokenizer)
    assert np.array_equal(same.tokens, r.tokens) and not np.array_equal(other.tokens, r.tokens)
    assert set(np.unique(r.tokens)) == set(range(len(tokenizer))) - set(tokenizer.all_special_ids)  # to the last id


def test_vocab_source_draws_every_non_special_token_in_the_requested_shape(tmp_path):
    tok = type("Tok", (), {"all_special_ids": [0, 1, 2], "__len__": lambda self: 16})()
    r = sources.get("vocab").build(VocabSourceConfig(kind="vocab"), _req(tmp_path, n=8, seq_len=64), tokenizer=tok)
    assert r.tokens.shape == (8, 64)
    assert set(np.unique(r.tokens).tolist()) == set(range(3, 16))  # the last id too
    assert r.provenance["vocabulary_size"] == 13


def _eos_prone(tiny_model, bias: float = 2.5):
    """The tiny model with a bias on EOS (id 2), so sampled generations end early and often."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    head.weight = model.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()
        head.bias[2] = bias
    model.lm_head = head
    return model


def test_ji_prompts_are_the_first_two_ids_with_bos(tokenizer):
    prompts = sources.ji_prompts(["the cat sat", "a dog ran far"], tokenizer, 2)
    assert tokenizer.bos_token_id == 1
    assert prompts == [[1, tokenizer("the cat sat")["input_ids"][1]], [1, tokenizer("a dog ran far")["input_ids"][1]]]


def test_ji_synthesis_stops_at_eos_and_records_its_pool(tmp_path, tokenizer, tiny_model):
    model = _eos_prone(tiny_model)
    docs = _docs(20)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = JiSourceConfig(kind="ji", prompt_path="p.jsonl", pool_size=12, max_new_tokens=80)
    r = sources.get("ji").build(spec, _req(tmp_path, n=6, seq_len=16, name="ji"), model=model, tokenizer=tokenizer)
    prov = r.provenance
    assert r.tokens.shape == (6, 16)
    assert prov["pool_size"] == prov["generated"] == 12
    assert prov["stopped_at_eos"] > 6 and prov["new_tokens_mean"] < 70  # EOS ends a generation (no min_new_tokens)
    assert prov["new_tokens_max"] <= 80
    assert prov["kept_texts"] <= 0.8 * prov["scored"] + 1e-9
    assert len(prov["window_starts"]) == 6
    with pytest.raises(DataError, match=r"pool_size: 50 prompts needed, p.jsonl gives 20 usable texts"):
        sources.get("ji").build(
            spec.model_copy(update={"pool_size": 50}),
            _req(tmp_path, n=6, seq_len=16, name="ji"),
            model=model,
            tokenizer=tokenizer,
        )


def test_ji_filter_keeps_texts_below_the_80th_percentile_of_whole_text_perplexity(tokenizer, tiny_model):
    """sample_ppl.py: ppl = exp(model(ids, labels=ids).loss) per text, prompt included; keep ppl < percentile 80."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    texts = _docs(10, words=12) + [""]  # BOS alone: nothing to predict, left out
    kept, info = sources.perplexity_filter(model, tokenizer, texts, 0.2, batch_size=3)
    ppl = []
    with torch.no_grad():
        for t in texts[:10]:
            ids = torch.tensor([tokenizer(t)["input_ids"]])
            ppl.append(float(torch.exp(model(input_ids=ids, labels=ids).loss)))
    threshold = np.percentile(ppl, 80)
    assert kept == [t for t, v in zip(texts[:10], ppl, strict=True) if v < threshold]
    assert len(kept) == 8 and info["scored"] == 10 and info["generated"] == 11
    assert info["ppl_threshold"] == pytest.approx(threshold, rel=1e-4)


def test_scoring_batches_hold_at_most_batch_size_rows_and_the_logit_budget_one_row_always_goes():
    from selfcal.scoring import sequence_batches

    lengths = [5, 3, 9, 2]  # shortest first: 3 (2), 1 (3), 0 (5), 2 (9)
    assert list(sequence_batches(lengths, batch_size=3, vocab_size=10, budget=60)) == [[3, 1], [0], [2]]
    # a budget that never binds: the batches are the sorted order cut every batch_size rows, as before the budget
    assert list(sequence_batches(lengths, batch_size=3, vocab_size=10, budget=10**9)) == [[3, 1, 0], [2]]
    assert list(sequence_batches([], batch_size=3, vocab_size=10)) == []


def test_ji_filter_scores_within_the_logit_budget_and_the_budget_does_not_change_what_it_keeps(tokenizer, tiny_model):
    """Lease 7: the filter's batch of 128 texts asked the shared H200 for 36.75 GiB of logits and died after
    the pool was made. A batch now holds rows x width x vocabulary <= the budget; the scores are the same."""
    from transformers import AutoModelForCausalLM

    from selfcal.scoring import sequence_mean_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    sequences = [list(tokenizer(t)["input_ids"]) for t in _docs(9, words=14)] + [[1]]
    vocab = model.config.vocab_size
    widest = max(len(x) for x in sequences)
    seen = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    try:
        free = sequence_mean_nll(model, sequences, batch_size=16, budget=10**12)
        assert [rows for rows, _ in seen] == [9]  # one batch: the budget never binds (the one-token row has no score)
        seen.clear()
        bounded = sequence_mean_nll(model, sequences, batch_size=16, budget=2 * widest * vocab)
    finally:
        hook.remove()
    assert len(seen) >= 5 and all(rows * width * vocab <= 2 * widest * vocab for rows, width in seen)
    assert torch.isnan(free[-1]) and torch.isnan(bounded[-1])
    torch.testing.assert_close(bounded[:-1], free[:-1], rtol=1e-5, atol=1e-6)


def test_ji_windows_are_get_selfgens_random_windows_of_the_space_joined_text(tokenizer):
    import random

    texts = _docs(6, words=30)
    tokens, starts, total = sources.selfgen_windows(texts, tokenizer, n=5, seq_len=16, seed=3)
    enc = tokenizer(" ".join(texts), return_tensors="pt").input_ids  # Wanda/lib/data.py get_selfgen, verbatim
    random.seed(3)
    expected = []
    for _ in range(5):
        i = random.randint(0, enc.shape[1] - 16 - 1)
        expected.append(enc[0, i : i + 16].tolist())
    assert tokens.tolist() == expected and total == enc.shape[1] and len(starts) == 5
    assert enc[0, 0] == tokenizer.bos_token_id  # one BOS, at the start of the joined text


def test_wikiextractor_files_give_one_document_per_article_without_title_or_stubs(tmp_path):
    (tmp_path / "wiki.utf8").write_text(
        '<doc id="1" url="u" title="Alpha">\nAlpha\n\nAlpha is a letter.\nSecond line.\n</doc>\n'
        '<doc id="2" url="u" title="Stub">\nStub\n\n\n</doc>\n'
        '<doc id="3" url="u" title="A &amp; B">\nA & B\n\nA and B.\n</doc>\n'
    )
    docs = textdata.read_documents("wiki.utf8", root=tmp_path)
    assert docs == ["Alpha is a letter.\nSecond line.", "A and B."]


def test_self_source_first_token_restricted_to_stop_words(tmp_path, tokenizer, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    words = ["the", "he", "she"]
    allowed = set(sources.first_tokens_of(words, tokenizer))
    assert len(allowed) == 6  # lower case and capitalised, each one token right after BOS
    spec = SelfSourceConfig(kind="self", first_token_words=words)
    r = sources.get("self").build(spec, _req(tmp_path, n=8, seq_len=24, name="self"), model=model, tokenizer=tokenizer)
    assert set(r.tokens[:, 1]) <= allowed
    free = sources.get("self").build(
        SelfSourceConfig(kind="self"), _req(tmp_path, n=8, seq_len=24, name="self"), model=model, tokenizer=tokenizer
    )
    assert not set(free.tokens[:, 1]) <= allowed


def test_self_source_samples_with_its_schedule_and_the_requests_seed(tmp_path, tokenizer, tiny_model):
    """The source hands its params to the generator as they are named: t_initial at the first token of a
    generation, t_final from schedule_steps on, and the request's seed."""
    from transformers import AutoModelForCausalLM

    from selfcal.calibration.generator import generate_self_calibration
    from selfcal.calibration.schedule import LinearSchedule

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    spec = SelfSourceConfig(kind="self", t_initial=0.0, t_final=2.0, schedule_steps=8)
    r = sources.get("self").build(
        spec, _req(tmp_path, seq_len=24, seed=5, name="self"), model=model, tokenizer=tokenizer
    )
    expected, _ = generate_self_calibration(
        model, n=4, seq_len=24, bos_id=1, eos_id=2, schedule=LinearSchedule(0.0, 2.0, 8), seed=5, progress=False
    )
    np.testing.assert_array_equal(r.tokens, expected)


def test_first_token_words_use_the_start_of_text_spelling_and_refuse_multi_token_words(tokenizer):
    ids, bad = sources.first_token_candidates(["the", "She"], tokenizer)
    after_bos = [tokenizer(w)["input_ids"][1] for w in ("the", "The", "she", "She")]
    assert ids == after_bos == [265, 291, 358, 338] and bad == []
    # "once" is '▁on' 'ce' right after BOS (only "Once" is one token); "xylophonist" is many in both cases.
    _, bad = sources.first_token_candidates(["once", "xylophonist"], tokenizer)
    assert bad == ["once", "xylophonist", "Xylophonist"]
    from selfcal.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"^calibration.sources.self.first_token_words: not a single token after BOS .*'xylophonist'"
    ):
        sources.first_tokens_of(["xylophonist"], tokenizer, key="calibration.sources.self.first_token_words")


def test_seed_k_is_block_k_of_one_fixed_shuffle_and_overlap_draws_are_distinct_per_seed():
    """The disjoint blocks of 12 windows in sets of 4 use every window once; exactly n windows is one set;
    seed 3 is past the last block (refused, or with allow_overlap a draw of its own: n distinct windows)."""
    from selfcal.calibration import corpus

    windows = np.arange(24).reshape(12, 2)

    def pick(n, seed, overlap=False):
        return corpus.pick_windows(windows, n, seed, allow_overlap=overlap, name="calibration.sources.c4")

    blocks = [pick(4, k)[0][:, 0].tolist() for k in range(3)]
    assert sorted(sum(blocks, [])) == list(range(0, 24, 2))
    assert pick(12, 0)[1] == {"windows_total": 12, "disjoint_sets": 1, "block": 0, "overlap_allowed": False}
    with pytest.raises(DataError, match=r"enough for 3 disjoint set\(s\) of 4 \(seeds 0..2\); seed 3 would reuse"):
        pick(4, 3)
    assert len(pick(4, 3, overlap=True)[0]) == 4  # the first seed past the blocks is a draw, not an empty block
    drawn, info = pick(10, 3, overlap=True)
    assert len({tuple(w) for w in drawn}) == 10 and info["block"] is None and info["overlap_allowed"] is True
    assert np.array_equal(pick(10, 3, overlap=True)[0], drawn) and not np.array_equal(
        pick(10, 4, overlap=True)[0], drawn
    )


def test_a_window_stride_cuts_the_corpus_windows_every_stride_tokens(tmp_path, tokenizer):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(3, 20)))
    r = sources.get("corpus").build(_corpus("c.jsonl", window_stride=4), _req(tmp_path, n=3), tokenizer=tokenizer)
    stream = textdata.token_stream(_docs(3, 20), tokenizer)
    assert r.provenance["windows_total"] == textdata.window_count(len(stream), 16, 4) > len(stream) // 16
    for row in r.tokens:
        starts = [s for s in range(0, len(stream) - 15, 4) if (stream[s : s + 16] == row).all()]
        assert starts, row


def test_the_token_stream_joins_documents_each_followed_by_eos(tokenizer):
    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    assert textdata.token_stream(["the cat sat", "a dog ran"], tokenizer).tolist() == [
        *enc("the cat sat"),
        eos,
        *enc("a dog ran"),
        eos,
    ]


def test_ji_window_starts_span_the_whole_joined_text_as_get_selfgen_draws_them(tokenizer):
    """``random.randint(0, L - seqlen - 1)``: with L - seqlen = 63 the bound decides every draw."""
    import random

    texts = _docs(6, words=30)
    enc = tokenizer(" ".join(texts))["input_ids"]
    seq_len = len(enc) - 63
    for seed in range(3):
        tokens, starts, _ = sources.selfgen_windows(texts, tokenizer, n=6, seq_len=seq_len, seed=seed)
        random.seed(seed)
        assert starts == [random.randint(0, len(enc) - seq_len - 1) for _ in range(6)]


def test_ji_windows_need_one_token_past_a_window_as_get_selfgen_does(tokenizer):
    """get_selfgen's ``randint(0, L - seqlen - 1)`` has one start when L = seqlen + 1, none when L = seqlen."""
    texts = _docs(6, words=30)
    length = len(tokenizer(" ".join(texts))["input_ids"])
    tokens, starts, _ = sources.selfgen_windows(texts, tokenizer, n=3, seq_len=length - 1, seed=0)
    assert starts == [0, 0, 0] and tokens.shape == (3, length - 1)
    with pytest.raises(DataError, match=f"too few for a window of {length}$"):
        sources.selfgen_windows(texts, tokenizer, n=3, seq_len=length, seed=0)


def test_most_kept_is_how_many_texts_the_perplexity_filter_keeps_from_a_pool():
    """sample_ppl.py keeps perplexities strictly below np.percentile(1 - drop): a pool of one keeps none."""
    import numpy as np

    from selfcal.calibration.sources import most_kept

    rng = np.random.default_rng(0)
    for n in range(1, 30):
        for drop in (0.0, 0.2, 0.25, 0.5, 0.9):
            ppl = rng.random(n)
            kept = int((ppl < np.percentile(ppl, 100 * (1 - drop))).sum()) if drop else n
            assert most_kept(n, drop) == kept, (n, drop)
    assert (most_kept(1, 0.2), most_kept(2, 0.2), most_kept(5000, 0.2)) == (0, 1, 4000)
