"""The prompted pool on the lockstep engine (Ji et al.'s synthesis): transformers' processors,
rows refilled from the pool, every generation equal to a full recomputation from its prompt."""

import numpy as np
import pytest
import torch

from selfcal.calibration.pool import PoolSampling, generate_pool, process_logits
from selfcal.calibration.sampling import inverse_cdf as draw
from selfcal.calibration.sampling import row_uniforms

BOS, EOS = 1, 2
JI = PoolSampling(temperature=0.6, top_k=50, top_p=0.95, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    bias = torch.zeros(m.config.vocab_size)
    bias[EOS] = 1.0  # generations end early and often: the pool's refills get exercised
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + bias.to(out))
    return m


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[BOS, int(t)] for t in torch.randint(3, 500, (n,), generator=g)]


def test_processors_are_transformers_own_in_its_order():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    ids = torch.randint(0, 300, (4, 9))
    hf = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.2),
            TemperatureLogitsWarper(0.6),
            TopKLogitsWarper(50),
            TopPLogitsWarper(0.95),
        ]
    )(ids, logits.clone())
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, ids, True)
    ours = process_logits(logits, JI, seen)
    torch.testing.assert_close(ours, hf, rtol=0, atol=0)


@pytest.mark.parametrize(
    "sampling",
    [
        PoolSampling(repetition_penalty=1.2),
        PoolSampling(temperature=0.6),
        PoolSampling(top_k=50),
        PoolSampling(top_p=0.95),
        PoolSampling(top_p=0.75),
    ],
    ids=["penalty", "temperature", "top_k", "top_p", "top_p_tie"],
)
def test_each_processor_alone_is_transformers_own(sampling):
    """One at a time, so none is hidden behind the others (in the whole chain top-p keeps a few
    tokens, rarely the penalised ones); ties at the top-p boundary (four equal tokens) included."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.cat([torch.randn(4, 300) * 3, torch.zeros(1, 300)])
    logits[4, 4:] = -30.0  # row 4: four equal tokens hold all the mass
    ids = torch.cat([torch.topk(logits[:4], 9).indices, torch.tensor([[0, 1, 2, 3, 5, 6, 7, 8, 9]])])
    seen = torch.zeros(5, 300, dtype=torch.bool).scatter_(1, ids, True)
    if sampling.repetition_penalty is not None:
        hf = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)
    elif sampling.temperature != 1.0:
        hf = TemperatureLogitsWarper(sampling.temperature)
    elif sampling.top_k is not None:
        hf = TopKLogitsWarper(sampling.top_k)
    else:
        hf = TopPLogitsWarper(sampling.top_p)
    expected = hf(ids, logits.clone())
    assert not torch.equal(expected, logits)
    torch.testing.assert_close(process_logits(logits, sampling, seen), expected, rtol=0, atol=0)


def test_the_default_sampling_leaves_the_logits_alone():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seen = torch.ones(3, 50, dtype=torch.bool)
    torch.testing.assert_close(process_logits(logits, PoolSampling(), seen), logits, rtol=0, atol=0)


def test_an_eos_inside_the_prompt_does_not_end_the_generation(model):
    """As ``generate`` stops only on an EOS it generated, a forced prompt token that is EOS goes on."""
    result = generate_pool(
        model, [[BOS, EOS], [BOS, EOS]], max_new_tokens=6, eos_ids=[EOS], sampling=JI, seed=0, batch_size=2
    )
    assert all(gen[:2] == [BOS, EOS] and len(gen) > 2 for gen in result.generations)


def replay_pool(model, ps, result, *, seed, sampling, max_new):
    """Each generation alone, from its prompt, full forward without cache, the same processors."""
    u = row_uniforms(seed, range(len(ps)), len(ps[0]) + max_new)
    bad = 0
    with torch.no_grad():
        for i, gen in enumerate(result.generations):
            assert gen[: len(ps[i])] == ps[i]
            for q in range(len(ps[i]), len(gen)):
                ids = torch.tensor([gen[:q]])
                logits = model(input_ids=ids).logits[:, -1]
                seen = torch.zeros_like(logits, dtype=torch.bool)
                seen[0, ids[0]] = True
                tok = int(draw(process_logits(logits, sampling, seen), u[i, q : q + 1])[0])
                bad += tok != gen[q]
    return bad


def test_every_generation_is_its_prompts_independent_sample(model):
    ps = prompts(10)
    result = generate_pool(model, ps, max_new_tokens=12, eos_ids=[EOS], sampling=JI, seed=3, batch_size=4)
    assert len(result.generations) == 10
    assert any(result.stopped_at_eos) and not all(result.stopped_at_eos), "both endings should occur"
    for gen, stopped in zip(result.generations, result.stopped_at_eos, strict=True):
        assert (gen[-1] == EOS) == stopped
        assert EOS not in gen[2:-1], "a generation ends at its first EOS"
        assert len(gen) <= 2 + 12 and (stopped or len(gen) == 14)
    assert replay_pool(model, ps, result, seed=3, sampling=JI, max_new=12) == 0
    # Rows were refilled from the pool: fewer steps than batches of 4 run to the longest row.
    assert result.forward_steps < 3 * 14


def test_the_pool_does_not_depend_on_the_batch_size(model):
    ps = prompts(7, seed=1)
    kw = dict(max_new_tokens=10, eos_ids=[EOS], sampling=JI, seed=5)
    ref = generate_pool(model, ps, batch_size=7, **kw).generations
    for b in (1, 3, 16, "auto"):
        assert generate_pool(model, ps, batch_size=b, **kw).generations == ref, b


def test_pure_sampling_pool_matches_a_recompute_without_penalty(model):
    ps = prompts(5, seed=2)
    plain = PoolSampling()
    result = generate_pool(model, ps, max_new_tokens=9, eos_ids=[EOS], sampling=plain, seed=0, batch_size=2)
    assert replay_pool(model, ps, result, seed=0, sampling=plain, max_new=9) == 0
    penalised = generate_pool(model, ps, max_new_tokens=9, eos_ids=[EOS], sampling=JI, seed=0, batch_size=2)
    assert penalised.generations != result.generations


def test_prompts_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="one length"):
        generate_pool(None, [[1, 2], [1]], max_new_tokens=2, eos_ids=[2], sampling=JI, seed=0)


def test_draw_is_inverse_cdf():
    scores = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    got = [int(draw(scores, torch.tensor([x], dtype=torch.float64))[0]) for x in (0.1, 0.6, 0.9)]
    assert got == [0, 1, 2]
    assert np.isfinite(scores).all()
