"""The one NLL loop: window scores as the whole model gives them, with logits made a few rows at a time."""

from __future__ import annotations

import pytest
import torch

from selfcal.scoring import window_nll


def _whole_model_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """What ``window_nll`` computed before: the whole model's logits for every window at once (float32
    cross-entropy, summed in float64)."""
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
    return nll.double().sum(dim=1)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(3, 500, (7, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rows", [1, 2, 5, None])
def test_window_scores_equal_the_whole_models_at_any_logit_budget(model, windows, rows):
    vocab = model.config.vocab_size
    budget = 10**12 if rows is None else rows * (windows.shape[1] - 1) * vocab
    got = window_nll(model, windows, batch_size=3, budget=budget)
    assert got.dtype == torch.float64 and got.shape == (7,)
    torch.testing.assert_close(got, _whole_model_nll(model, windows), rtol=1e-12, atol=1e-10)


def test_the_head_never_sees_more_rows_than_the_budget_allows(model, windows):
    """The memory bound itself: logits for at most two windows at a time, whatever the batch size."""
    seen: list[tuple[int, ...]] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        budget = 2 * (windows.shape[1] - 1) * model.config.vocab_size
        window_nll(model, windows, batch_size=7, budget=budget)
    finally:
        hook.remove()
    scored = [s for s in seen if s[1] > 1]  # the one-token pass that warms a model up comes first, at most once
    assert scored and max(s[0] for s in scored) == 2
    assert sum(s[0] for s in scored) == 7  # every window once: 2 + 2 + 2 + 1
    assert all(s[1] == windows.shape[1] - 1 for s in scored)  # the last position predicts nothing: no logits


def test_a_budget_smaller_than_one_window_still_scores_a_row_at_a_time(model, windows):
    got = window_nll(model, windows, batch_size=4, budget=1)
    torch.testing.assert_close(got, _whole_model_nll(model, windows), rtol=1e-12, atol=1e-10)


def _granite(logits_scaling: float):
    """A tiny Granite: its forward divides the head's logits by ``logits_scaling``."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2}
    return GraniteForCausalLM(GraniteConfig(vocab_size=64, num_hidden_layers=2, logits_scaling=logits_scaling, **sizes))


def test_a_model_that_changes_its_logits_after_the_head_is_scored_whole_and_right(caplog):
    """Granite divides its logits by ``logits_scaling`` in its own forward, after the head: the head called
    apart would be off by that factor (up to 0.27 nats per window on this model), so the whole model scores it."""
    from selfcal import scoring

    model = _granite(8.0).double().eval()
    windows = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    with caplog.at_level("WARNING", logger="selfcal.scoring"):
        got = window_nll(model, windows, batch_size=2, budget=1)
    assert "its logits are not its head's output: scoring whole batches" in caplog.text
    torch.testing.assert_close(got, _whole_model_nll(model, windows), rtol=1e-12, atol=1e-10)
    decoder, head = scoring.decoder_and_head(model)
    assert isinstance(decoder, scoring._WholeModel)
    hidden = decoder(input_ids=windows[:1], output_hidden_states=True).hidden_states
    assert (
        len(hidden) == model.config.num_hidden_layers + 1
    )  # layer inputs for inspect's statistics, as the model gives them


def test_the_logit_width_is_the_output_layers_and_no_windows_cost_no_forward(model):
    from selfcal.scoring import vocabulary

    assert vocabulary(model) == model.get_output_embeddings().out_features == model.config.vocab_size

    class Refuses(torch.nn.Module):
        def forward(self, *a, **k):
            raise AssertionError("no forward for no windows")

    refuses = Refuses()
    refuses.p = torch.nn.Parameter(torch.zeros(1))
    assert window_nll(refuses, torch.zeros((0, 16), dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize(("scale", "splits"), [(1.0, True), (1.01, False), (0.99, False), (16.0, False)])
def test_the_check_tells_a_plain_head_from_one_scaled_by_a_percent(scale, splits):
    from selfcal import scoring

    assert scoring._splits(_granite(scale).eval()) is splits


def test_a_budget_one_float_short_of_two_windows_scores_one_at_a_time(model, windows):
    seen: list[tuple[int, ...]] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        budget = 2 * (windows.shape[1] - 1) * model.config.vocab_size - 1
        got = window_nll(model, windows, batch_size=7, budget=budget)
    finally:
        hook.remove()
    assert [s[0] for s in seen if s[1] == windows.shape[1] - 1] == [1] * 7  # not the 4-token check's passes
    torch.testing.assert_close(got, _whole_model_nll(model, windows), rtol=1e-12, atol=1e-10)


def test_a_soft_capped_head_is_called_apart_and_scores_as_the_whole_model():
    """Gemma 2 caps its logits (tanh(z / cap) * cap) after the head: ``output_head`` applies the same cap, so its
    decoder and head are called apart, and score as the whole model does."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from selfcal import scoring

    torch.manual_seed(0)
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2}
    config = Gemma2Config(vocab_size=64, num_hidden_layers=2, head_dim=8, final_logit_softcapping=2.0, **sizes)
    model = Gemma2ForCausalLM(config).double().eval()
    assert scoring._splits(model) is True
    windows = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    got = window_nll(model, windows, batch_size=2, budget=1)
    torch.testing.assert_close(got, _whole_model_nll(model, windows), rtol=1e-12, atol=1e-10)
