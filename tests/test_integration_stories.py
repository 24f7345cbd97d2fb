"""Integration tier: the real pretrained stories260K model from ../shared."""

from __future__ import annotations

import pytest
import torch

from selfcal.calibration.generator import generate_self_calibration
from selfcal.calibration.schedule import LinearSchedule
from selfcal.modelio import load_model, load_tokenizer, resolve_model
from tests.helpers import STORIES

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not STORIES.is_dir(), reason=f"{STORIES} not found"),
]


@pytest.fixture(scope="module")
def stories():
    ref = resolve_model(str(STORIES))
    return load_model(ref), load_tokenizer(ref)


def _mean_nll(model, tokens) -> float:
    ids = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_greedy_self_calibration_tells_a_story(stories):
    model, tok = stories
    tokens, _ = generate_self_calibration(
        model,
        n=2,
        seq_len=48,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        schedule=LinearSchedule(0.0, 0.0, 0),
        seed=0,
        batch_size=2,
        progress=False,
    )
    text = tok.decode(tokens[0].tolist(), skip_special_tokens=True)
    assert text.startswith("Once upon a time"), text


def test_sampled_set_is_what_the_model_finds_likely(stories):
    """At t=1 the set should be far more likely under the model than random tokens."""
    model, tok = stories
    tokens, stats = generate_self_calibration(
        model,
        n=8,
        seq_len=128,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        schedule=LinearSchedule(1.0, 1.0, 10),
        seed=0,
        batch_size=8,
        progress=False,
    )
    assert stats.generations >= 8
    random = torch.randint(3, tok.vocab_size, tokens.shape, generator=torch.Generator().manual_seed(0))
    random[:, 0] = tok.bos_token_id
    assert _mean_nll(model, tokens) < 0.5 * _mean_nll(model, random)


@pytest.mark.parametrize("method", ["gptq", "awq", "sparsegpt", "wanda"])
def test_every_method_compresses_the_real_model_and_verifies(stories, tmp_path, method):
    """stories260K's 172-wide down-projections are left dense by gptq/awq (group 32), which
    AWQ must survive: its up->down mapping then has nothing to balance."""
    from selfcal.compression.apply import compress, plan
    from selfcal.config import CompressionConfig
    from selfcal.modelio import fingerprint, model_config
    from selfcal.records import CalibrationRef

    model, tok = stories
    tokens, _ = generate_self_calibration(
        model,
        n=8,
        seq_len=64,
        bos_id=tok.bos_token_id,
        eos_id=tok.eos_token_id,
        schedule=LinearSchedule(1.0, 1.0, 10),
        seed=0,
        batch_size=8,
        progress=False,
    )
    ref = resolve_model(str(STORIES))
    quant = {"group_size": 32, "skip_indivisible": True}
    cfg = CompressionConfig(methods=[method], gptq=quant, awq=quant)
    the_plan = plan(method, cfg, model_config(ref))
    fresh = load_model(ref)
    calib = CalibrationRef(digest="0" * 64, source="self", seed=0, path="-", n_samples=8, seq_len=tokens.shape[1])
    manifest = compress(
        fresh,
        tok,
        tokens,
        the_plan,
        tmp_path / method,
        base_model=fingerprint(ref),
        calibration=calib,
        device="cpu",
        base_dir=ref.local_dir,
    )
    v = manifest.verification
    if method in ("gptq", "awq"):
        assert len(the_plan.skipped_layers) == 5 and v["max_values_per_group"] <= 16
    else:
        assert v["min_nm_compliance"] == 1.0 and v["mean_sparsity"] == pytest.approx(0.5)
