import torch

from selfcal.calibration.sampling import filter_logits, inverse_cdf, row_uniforms, sample_tokens


def test_inverse_cdf_follows_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.clamp_min(1e-30).log().expand(20000, 4)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = sample_tokens(logits, 1.0, u)
    freq = torch.bincount(tokens, minlength=4).double() / 20000
    assert freq[1] == 0  # zero-probability token never drawn
    assert torch.allclose(freq, probs.double(), atol=0.015)


def test_temperature_sharpens_and_zero_is_argmax():
    logits = torch.tensor([[0.0, 1.0, 0.5]])
    assert sample_tokens(logits, 0.0, torch.tensor([0.99])).item() == 1
    u = torch.rand(5000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cold = sample_tokens(logits.expand(5000, 3), 0.2, u)
    hot = sample_tokens(logits.expand(5000, 3), 5.0, u)
    assert (cold == 1).float().mean() > (hot == 1).float().mean() + 0.3


def test_top_k_and_top_p_restrict_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    assert not torch.isinf(filter_logits(logits)).any()


def test_row_streams_do_not_depend_on_which_rows_are_drawn_together():
    all_rows = row_uniforms(7, range(0, 6), 16)
    some_rows = row_uniforms(7, range(3, 5), 16)
    assert torch.equal(all_rows[3:5], some_rows)
    assert not torch.equal(row_uniforms(8, range(0, 6), 16), all_rows)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_k=3)).tolist() == [[True, True, True, False]]


def test_top_p_drops_a_token_once_the_mass_before_it_reaches_top_p():
    # Four equal tokens (0.25 each, exact): the first two hold 0.5, so at top_p 0.5 the third is dropped.
    assert torch.isfinite(filter_logits(torch.zeros(1, 4), top_p=0.5)).sum() == 2


def test_a_zero_mass_token_is_never_drawn_even_at_the_ends_of_the_unit_interval():
    assert inverse_cdf(torch.log(torch.tensor([[0.0, 0.5, 0.5]])), torch.tensor([0.0], dtype=torch.float64)) == 1
    # A float32 softmax whose sum is below 1 in float64 (7.5e-8 short), the last token masked: the
    # largest uniform must still land inside the mass, not past it on the masked token.
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(1))
    logits[0, -1] = float("-inf")
    assert torch.softmax(logits, -1).double().sum() < 1
    u = torch.tensor([1 - 2**-53], dtype=torch.float64)
    assert inverse_cdf(logits, u).item() == 62
