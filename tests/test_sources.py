"""Calibration baselines from small local files, and their error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selfcal.calibration import corpus, sources
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
    return sources.SourceRequest(n=n, seq_len=seq_len, seed=seed, batch_size=4, root=tmp_path, name=name, progress=False)


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
    total = len(corpus.windows(corpus.token_stream(_docs(3, 20), tokenizer), 16))
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


def test_ji_synthesis_prompts_filters_and_keeps_n(tmp_path, tokenizer, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    docs = _docs(20)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = JiSourceConfig(kind="ji", prompt_path="p.jsonl")
    r = sources.get("ji").build(spec, _req(tmp_path, n=8, seq_len=12, name="ji"), model=model, tokenizer=tokenizer)
    assert r.tokens.shape == (8, 12)
    assert r.provenance["generated"] == 10 and r.provenance["kept"] == 8  # ceil(8 / 0.8) generated, 20% dropped
    assert (r.tokens[:, 0] == tokenizer.bos_token_id).all()
    first_words = {tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in WORDS} | {
        tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in WORDS
    }
    assert set(r.tokens[:, 1]) <= first_words  # token 2 comes from a real text's start


def test_self_source_first_token_restricted_to_stop_words(tmp_path, tokenizer, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    words = ["the", "a", "and"]
    allowed = set(sources.first_tokens_of(words, tokenizer))
    spec = SelfSourceConfig(kind="self", first_token_words=words)
    r = sources.get("self").build(spec, _req(tmp_path, n=8, seq_len=24, name="self"), model=model, tokenizer=tokenizer)
    assert set(r.tokens[:, 1]) <= allowed
    free = sources.get("self").build(SelfSourceConfig(kind="self"), _req(tmp_path, n=8, seq_len=24, name="self"), model=model, tokenizer=tokenizer)
    assert not set(free.tokens[:, 1]) <= allowed
