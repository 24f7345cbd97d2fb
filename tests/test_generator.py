"""Self-calibration generator: BOS-only starts, EOS restarts in lockstep, seeds, batch invariance,
and every set checked against a full recomputation without any cache (``replay``)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from selfcal.calibration.generator import generate_self_calibration
from selfcal.calibration.lockstep import LockstepRows, StaticKVCache, plan_for
from selfcal.calibration.replay import replay, segments
from selfcal.calibration.sampling import row_uniforms
from selfcal.calibration.schedule import LinearSchedule
from selfcal.hashing import sha256_tokens

BOS, EOS = 1, 2


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


def boosted(model, boosts: dict[int, float]):
    """The same model with fixed logit offsets on some tokens: a model made to emit them often."""
    import copy

    m = copy.deepcopy(model)
    bias = torch.zeros(m.config.vocab_size)
    for tok, b in boosts.items():
        bias[tok] = b
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + bias.to(out))
    return m


def gen(model, **kw):
    args = dict(
        n=6,
        seq_len=40,
        bos_id=BOS,
        eos_id=EOS,
        schedule=LinearSchedule(1.0, 1.0, 10),
        seed=0,
        batch_size=6,
        progress=False,
    )
    args.update(kw)
    return generate_self_calibration(model, **args)


def check_replay(model, tokens, *, seed=0, eos=(EOS,), schedule=LinearSchedule(1.0, 1.0, 10), **kw):
    report = replay(
        model,
        tokens,
        seed=seed,
        rows=range(len(tokens)),
        bos_id=BOS,
        eos_ids=list(eos),
        schedule=schedule,
        **kw,
    )
    assert report.identical, (
        f"{report.mismatches} tokens differ from the full recompute, first at {report.first_mismatch}"
    )
    return report


def test_every_row_starts_with_bos_and_matches_a_full_recompute_without_cache(model):
    sched = LinearSchedule(1.5, 0.5, 5)
    tokens, stats = gen(model, n=3, seq_len=48, schedule=sched)
    assert (tokens[:, 0] == BOS).all() and (tokens >= 0).all()
    assert stats.forward_steps == 47, "lockstep: seq_len - 1 steps, whatever the generations"
    check_replay(model, tokens, schedule=sched)


def test_many_restarts_each_generation_is_an_independent_sample_from_bos(model):
    """EOS made frequent (about one token in five): every EOS is followed by BOS, and every
    generation, recomputed alone from its BOS with no cache, gives exactly the same tokens."""
    chatty = boosted(model, {EOS: 4.5})
    sched = LinearSchedule(2.0, 1.0, 6)
    tokens, stats = gen(chatty, n=5, seq_len=64, schedule=sched)
    gens = sum(len(segments(list(r), [EOS])) for r in tokens)
    assert gens >= 5 * 4, f"the boosted model should restart often, saw {gens} generations"
    assert stats.generations == gens
    for row in tokens:
        for i in range(len(row) - 1):
            if row[i] == EOS:
                assert row[i + 1] == BOS
    # Log-probs recorded on the engine agree with the full recompute's.
    plan = plan_for(bos_id=BOS, eos_id=EOS, schedule=sched)
    engine = LockstepRows(chatty, plan, row_uniforms(0, range(5), 64), logprobs=True, window_chunk=16)
    engine.run()
    np.testing.assert_array_equal(engine.out.numpy(), tokens)
    report = check_replay(chatty, tokens, schedule=sched, logprobs=engine.logprobs.numpy())
    assert report.generations == gens and report.max_logprob_diff < 1e-4


def test_window_chunks_and_batch_sizes_do_not_change_the_set(model):
    full, _ = gen(model, batch_size=6)
    for kw in ({"batch_size": 1}, {"batch_size": 4}, {"window_chunk": 1}, {"window_chunk": 7}, {"batch_size": "auto"}):
        np.testing.assert_array_equal(full, gen(model, **kw)[0], err_msg=str(kw))


def test_every_device_generates_with_the_repeatable_attention_and_the_set_records_it(model, tmp_path):
    """On the H200 the fused SDPA kernel gave another set in every row from the same seed twice on one box
    (benchmarks/results/gen-determinism-h200-smollm2-lease5.json); the two matmuls gave the same set. So no
    device may default to the fused kernel, and the set's provenance says which attention made it."""
    from selfcal.calibration import sources
    from selfcal.calibration.lockstep import ATTENTION_NAME, SDPA_ATTENTION_NAME, default_attention

    for device in ("cpu", "cuda", "cuda:1"):
        assert default_attention(torch.device(device)) == ATTENTION_NAME, device
    tokens, stats = gen(model)
    assert stats.attention == ATTENTION_NAME
    fused, fused_stats = gen(model, attention=SDPA_ATTENTION_NAME)  # still selectable, for the benchmarks
    assert fused_stats.attention == SDPA_ATTENTION_NAME and fused.shape == tokens.shape

    tokenizer = SimpleNamespace(bos_token_id=BOS, eos_token_id=EOS, cls_token_id=None, convert_ids_to_tokens=None)
    spec = SimpleNamespace(t_initial=1.0, t_final=1.0, schedule_steps=10, top_k=None, top_p=None, first_token_words=[])
    request = sources.SourceRequest(n=2, seq_len=16, seed=0, batch_size=2, root=tmp_path, name="self", progress=False)
    result = sources.get("self").build(spec, request, model=model, tokenizer=tokenizer)
    assert result.provenance["attention"] == ATTENTION_NAME


def test_both_engines_take_the_default_attention_when_they_run_and_report_the_one_they_used(model, monkeypatch):
    """The lockstep rows and Ji's pool ask ``lockstep.default_attention`` at run time (no copy taken at
    import), so the default decides every device's sets and the record says which attention made them."""
    from selfcal.calibration import lockstep
    from selfcal.calibration.pool import PoolSampling, generate_pool

    monkeypatch.setattr(lockstep, "default_attention", lambda device: lockstep.SDPA_ATTENTION_NAME)
    assert gen(model)[1].attention == lockstep.SDPA_ATTENTION_NAME
    plain = PoolSampling(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0)

    def pool_attention() -> str:
        prompts = [[BOS, 5], [BOS, 6]]
        return generate_pool(
            model, prompts, max_new_tokens=4, eos_ids=[EOS], sampling=plain, seed=0, batch_size=2
        ).attention

    assert pool_attention() == lockstep.SDPA_ATTENTION_NAME
    monkeypatch.undo()
    assert pool_attention() == lockstep.ATTENTION_NAME


def test_same_seed_same_hash_different_seed_different_hash(model):
    a = sha256_tokens(gen(model, seed=3)[0])
    assert a == sha256_tokens(gen(model, seed=3)[0])
    assert a != sha256_tokens(gen(model, seed=4)[0])


def test_greedy_temperature_is_deterministic_across_seeds(model):
    sched = LinearSchedule(0.0, 0.0, 0)
    np.testing.assert_array_equal(gen(model, schedule=sched, seed=1)[0], gen(model, schedule=sched, seed=2)[0])


def test_a_per_row_schedule_restarts_with_each_generation(model):
    """Temperature 0 for the first 3 tokens of every generation, then 1: the first three tokens
    after each BOS are the greedy continuation of BOS, in every row and after every restart."""
    chatty = boosted(model, {EOS: 4.0})
    sched = LinearSchedule(0.0, 1.0, 3)  # step 0 at t=0 (greedy), steps >= 3 at t=1
    tokens, _ = gen(chatty, n=6, seq_len=64, schedule=sched, seed=5)
    firsts = {int(row[s + 1]) for row in tokens for s, e in segments(list(row), [EOS]) if e - s > 1}
    assert len(firsts) == 1, f"step 0 of every generation is greedy, saw first tokens {firsts}"
    check_replay(chatty, tokens, schedule=sched, seed=5)


def test_top_k_top_p_and_first_token_constraint_run_on_the_device_per_row(model):
    chatty = boosted(model, {EOS: 3.0})
    allowed = [10, 11, 12]
    tokens, _ = gen(chatty, n=4, seq_len=48, top_k=20, top_p=0.9, first_token_ids=allowed, seed=2)
    for row in tokens:
        for s, e in segments(list(row), [EOS]):
            if e - s > 1:
                assert row[s + 1] in allowed
    check_replay(chatty, tokens, seed=2, top_k=20, top_p=0.9, first_token_ids=allowed)


def test_any_of_several_eos_ids_ends_a_generation(model):
    chatty = boosted(model, {EOS: 3.5, 7: 3.5})
    tokens, _ = gen(chatty, n=6, seq_len=64, eos_id=[EOS, 7])
    ended = {EOS: 0, 7: 0}
    for row in tokens:
        for i in range(len(row) - 1):
            if row[i] in ended:
                assert row[i + 1] == BOS, f"a generation must restart after EOS id {row[i]}"
                ended[int(row[i])] += 1
    assert ended[EOS] > 0 and ended[7] > 0
    check_replay(chatty, tokens, eos=(EOS, 7))
    # With only the first id as EOS, 7 is an ordinary token: the generation goes on after it.
    single, _ = gen(chatty, n=6, seq_len=64, eos_id=EOS)
    assert any(row[i] == 7 and row[i + 1] != BOS for row in single for i in range(len(row) - 1))


def test_a_bos_that_is_also_an_eos_starts_a_generation_and_ends_none(model):
    """Phi-2's BOS is its EOS (<|endoftext|>), and a tokenizer without BOS starts from EOS: the BOS each generation
    starts from was taken for a sampled EOS, so every row was BOS, BOS, BOS ... and nothing was sampled."""
    tokens, stats = gen(model, n=4, seq_len=40, eos_id=[EOS, BOS])
    assert (tokens[:, 1] != BOS).all(), tokens[:, :4]
    plain, _ = gen(model, n=4, seq_len=40, eos_id=EOS)
    np.testing.assert_array_equal(tokens[:, :2], plain[:, :2])  # the same first draw from the same BOS
    check_replay(model, tokens, eos=(EOS, BOS))
    # a model made to sample BOS often: a sampled BOS ends its generation, and the next one starts from BOS
    chatty = boosted(model, {BOS: 4.0})
    tokens, stats = gen(chatty, n=5, seq_len=64, eos_id=[EOS, BOS])
    gens = sum(len(segments(list(r), [EOS, BOS])) for r in tokens)
    assert stats.generations == gens and 5 * 4 <= gens < 5 * 32  # restarts, but not on every token
    for row in tokens:
        starts = [s for s, _ in segments(list(row), [EOS, BOS])]
        assert all(row[s] == BOS and (s == 0 or row[s - 1] in (EOS, BOS)) for s in starts)
    check_replay(chatty, tokens, eos=(EOS, BOS))
    assert segments([BOS, 5, BOS, BOS, 6, 7], [BOS]) == [(0, 3), (3, 6)]


def test_the_static_cache_is_what_the_decoder_layers_call():
    cache = StaticKVCache(layers=2, batch=3, kv_heads=2, length=8, head_dim=4, dtype=torch.float32, device="cpu")
    cache.slot.fill_(5)
    cache.window = 6
    k = torch.randn(3, 2, 1, 4)
    keys, values = cache.update(k, -k, 1)
    assert keys.shape == (3, 2, 6, 4)
    torch.testing.assert_close(keys[:, :, 5:6], k)
    torch.testing.assert_close(cache.values[1][:, :, 5:6], -k)
    assert cache.keys[0].abs().sum() == 0 and cache.keys[1][:, :, :5].abs().sum() == 0


def test_a_sliding_window_decoder_is_refused_in_one_line():
    from selfcal.calibration.lockstep import check_supported

    cfg = SimpleNamespace(layer_types=["sliding_attention", "full_attention"], model_type="toy", sliding_window=4)
    with pytest.raises(NotImplementedError, match="full attention"):
        check_supported(SimpleNamespace(config=cfg))


def test_eos_ids_come_from_the_tokenizer_and_every_id_the_generation_config_lists():
    from selfcal.calibration.sources import eos_ids

    tok = SimpleNamespace(eos_token_id=2)
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[1, 106, 2]))
    assert eos_ids(tok, model) == [2, 1, 106]
    assert eos_ids(tok, SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))) == [2]
    assert eos_ids(tok) == [2]


def test_a_mismatch_is_measured_against_the_reference_interval():
    from selfcal.calibration.replay import tie_distance

    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    assert tie_distance(logits, 1.0, 0.6, 1) == 0.0  # 0.6 lies in token 1's [0.5, 0.75)
    assert abs(tie_distance(logits, 1.0, 0.6, 0) - 0.1) < 1e-9  # 0.1 past token 0's interval
    assert abs(tie_distance(logits, 1.0, 0.6, 2) - 0.15) < 1e-9
    assert abs(tie_distance(logits, 1.0, 0.3, 1) - 0.2) < 1e-9  # 0.2 below token 1's [0.5, 0.75)
    gap = torch.log(torch.tensor([[0.5, 0.0, 0.5]]))
    assert tie_distance(gap, 1.0, 0.5, 1) == float("inf")  # a zero-mass token has no interval to be near


def test_the_engines_per_row_temperatures_are_the_schedules(model):
    """The engine computes the schedule on the device for every row's step since its BOS; it must be
    ``LinearSchedule`` itself, also when the schedule has no ramp (steps 0: t_final from the first token)."""
    steps = torch.arange(12)
    for sched in (LinearSchedule(1.5, 0.5, 5), LinearSchedule(0.0, 2.0, 3), LinearSchedule(0.3, 1.7, 0)):
        engine = LockstepRows(model, plan_for(bos_id=BOS, eos_id=EOS, schedule=sched), row_uniforms(0, range(1), 4))
        expected = torch.tensor([sched(int(i)) for i in steps], dtype=torch.float32)
        torch.testing.assert_close(engine._temperatures(steps), expected, rtol=0, atol=0, msg=str(sched))


def test_generation_stats_add_up_over_batches(model):
    """Several batches: the stats count every batch's generations, forward steps and tokens."""
    whole, one = gen(model, n=6, seq_len=20, batch_size=6)
    split, three = gen(model, n=6, seq_len=20, batch_size=2)
    np.testing.assert_array_equal(whole, split)
    assert three.generations == one.generations >= 6
    assert three.forward_steps == 3 * 19 and one.forward_steps == 19
    assert three.tokens == one.tokens == 6 * 20


def test_replay_reports_each_kind_of_fault_and_checks_any_rows(model):
    """The generator's check must be able to fail: a wrong token, a generation that does not start at
    BOS, a wrong token in a two-token generation, a log-prob off; and rows other than 0.. replay
    with their own uniforms. The engine records log-prob 0 at each restart's BOS (nothing was sampled)."""
    chatty = boosted(model, {EOS: 3.0})
    sched = LinearSchedule(1.0, 1.0, 10)
    plan = plan_for(bos_id=BOS, eos_id=EOS, schedule=sched)
    engine = LockstepRows(chatty, plan, row_uniforms(0, range(4), 32), logprobs=True)
    engine.run()
    tokens, lp = engine.out.numpy(), engine.logprobs.numpy()
    restarts = tokens[:, :-1] == EOS  # position q + 1 is the BOS of a new generation
    assert restarts.any() and (lp[:, 1:][restarts] == 0).all()

    def check(toks, rows, **kw):
        return replay(chatty, toks, seed=0, rows=rows, bos_id=BOS, eos_ids=[EOS], schedule=sched, **kw)

    assert check(tokens, range(4), logprobs=lp).identical
    assert check(tokens[2:], [2, 3]).identical
    bad = tokens.copy()
    plain = [(r, q) for r in (1, 3) for q in range(1, 32) if tokens[r, q] not in (BOS, EOS)]
    (q1, q3) = (next(q for r, q in plain if r == 1), max(q for r, q in plain if r == 3))
    for r, q in ((1, q1), (3, q3)):
        bad[r, q] = 3 if tokens[r, q] != 3 else 4
    report = check(bad, range(4))
    assert report.mismatches >= 2 and report.first_mismatch == (1, q1) and report.max_tie_distance > 0
    no_bos = tokens.copy()
    no_bos[0, 0] = 5
    report = check(no_bos, range(4))
    assert not report.identical and report.first_mismatch == (0, 0)
    empty = np.tile([BOS, EOS], (1, 16))  # sixteen generations of one token each, all EOS
    assert check(empty, [0]).mismatches > 0
    off = lp.copy()
    off[0, 1] += 0.5
    assert check(tokens, range(4), logprobs=off).max_logprob_diff > 0.4
