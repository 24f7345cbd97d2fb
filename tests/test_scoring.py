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
