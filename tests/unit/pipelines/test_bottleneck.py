"""pipelines.bottleneck: the quantiser, its coding table (fit_prior) and its rate estimate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.bottleneck import Encoder, Quantizer, fit_prior, rate_bits
from pipelines.codecs import Codec, decode, encode


def test_quantizer_checks_its_arguments_and_starts_uniform() -> None:
    for channels, max_symbol in ((0, 15), (4, 0), (-1, -1)):
        with pytest.raises(ValueError, match="channels >= 1 and max_symbol >= 1"):
            Quantizer(channels, max_symbol)
    q = Quantizer(3, 2)
    p = q.prior()
    assert p.channels == 3 and p.low == -2 and p.high == 2
    np.testing.assert_allclose(p.pmf, np.full((3, 5), 0.2))
    assert "symbols=[-2, 2]" in repr(q)


def test_quantizer_rounds_and_clamps_in_eval() -> None:
    q = Quantizer(2, 3).eval()
    y = torch.tensor([[[-9.0, -3.4, -2.6, -0.4, 0.49, 0.51, 1.5, 2.5, 3.49, 7.0], [0.0] * 10]])
    out = q(y)
    assert out.shape == y.shape and out.dtype == y.dtype
    expected = torch.tensor([-3.0, -3.0, -3.0, -0.0, 0.0, 1.0, 2.0, 2.0, 3.0, 3.0])  # ties to even
    assert torch.equal(out[0, 0], expected)
    assert torch.equal(out, torch.round(out)) and out.abs().max() <= 3


def test_quantizer_straight_through_gradient_in_train() -> None:
    q = Quantizer(1, 3).train()
    y = torch.tensor([[[-5.0, -1.3, 0.2, 0.7, 2.6, 4.0]]], requires_grad=True)
    out = q(y)
    # the forward value is the rounded code in training too (the decoder trains on what is sent) ...
    assert torch.equal(out.detach(), torch.tensor([[[-3.0, -1.0, 0.0, 1.0, 3.0, 3.0]]]))
    w = torch.arange(1.0, 7.0).view(1, 1, 6)
    (out * w).sum().backward()
    # ... while the gradient passes rounding unchanged (identity) and stops where the clamp bites
    assert y.grad is not None
    assert torch.equal(y.grad, torch.tensor([[[0.0, 2.0, 3.0, 4.0, 5.0, 0.0]]]))
    # in eval the rounding has no gradient at all
    y2 = torch.tensor([[[0.2, 0.7]]], requires_grad=True)
    q.eval()(y2).sum().backward()
    assert y2.grad is not None and torch.equal(y2.grad, torch.zeros_like(y2))


def _identity_encoder(channels: int = 2, max_symbol: int = 2) -> Encoder:
    return Encoder(nn.Identity(), Quantizer(channels, max_symbol))


def test_fit_prior_is_the_smoothed_histogram_of_the_codes() -> None:
    enc = _identity_encoder().train()
    # channel 0: codes -2, -1, 0, 0, 2 (+ 2.6 clamps to 2); channel 1: always 1 (0.6 rounds to 1)
    x = torch.tensor(
        [
            [[-2.2, -1.0], [1.0, 0.6]],
            [[0.1, -0.2], [1.0, 1.2]],
            [[2.0, 2.6], [0.9, 1.4]],
        ]
    )  # (batch 3, channels 2, length 2)
    prior = fit_prior(enc, x, batch_size=2, smoothing=0.5)
    counts = np.array([[1, 1, 2, 0, 2], [0, 0, 0, 6, 0]], dtype=np.float64) + 0.5
    np.testing.assert_allclose(prior.pmf, counts / counts.sum(axis=1, keepdims=True), rtol=1e-6)
    assert prior.low == -2 and prior.high == 2
    assert enc.training  # the mode is restored
    # the table is the quantiser's buffer now: the model carries it, and the codec uses it
    assert enc.symbol_prior().digest == prior.digest
    np.testing.assert_allclose(enc.quant.get_buffer("pmf").numpy(), prior.pmf, rtol=1e-6)
    # the batch size only splits the work
    again = fit_prior(_identity_encoder(), x, batch_size=256, smoothing=0.5)
    assert again.digest == prior.digest
    # no smoothing: a symbol never seen has probability 0
    bare = fit_prior(_identity_encoder(), x, smoothing=0.0)
    assert bare.pmf[1, 3] == 1.0 and bare.pmf[0, 3] == 0.0


def test_fit_prior_codes_cost_fewer_bits_than_the_uniform_table() -> None:
    torch.manual_seed(0)
    enc = _identity_encoder(channels=3, max_symbol=15).eval()
    x = torch.randn(64, 3, 20) * torch.tensor([0.5, 2.0, 6.0]).view(1, 3, 1)
    codes = enc(x)
    uniform_bits = enc.symbol_prior().bits(codes.numpy())
    assert uniform_bits == pytest.approx(codes.numel() * np.log2(31))
    prior = fit_prior(enc, x)
    assert prior.bits(codes.numpy()) < 0.6 * uniform_bits
    # and the ans codec, coding against the fitted table, gets its bytes back exactly
    t = encode(codes, Codec.ANS, prior)
    assert torch.equal(torch.from_numpy(decode(t, prior)), codes)
    assert t.nbytes < prior.bits(codes.numpy()) / 8 * 1.02 + 12


def test_rate_bits_is_differentiable_and_falls_as_values_concentrate() -> None:
    q = Quantizer(2, 15)  # density: logistic with loc 0, scale ~1 per channel
    shape = (16, 2, 50)
    rates = []
    for spread in (8.0, 3.0, 1.0, 0.3):
        torch.manual_seed(1)
        y = torch.randn(shape) * spread
        torch.manual_seed(2)  # the same rounding noise every time
        rates.append(float(rate_bits(q, y).detach()))
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)), rates
    assert rates[-1] > 0
    per_window_symbols = 2 * 50
    assert rates[0] < per_window_symbols * 40  # bounded: -log2 of the clamped probability floor
    # the gradient reaches the values (towards the density's mode) and the density's parameters
    y = (torch.randn(shape) * 3).requires_grad_()
    rate_bits(q, y).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert q.loc.grad is not None and q.log_scale.grad is not None and q.log_scale.grad.abs().sum() > 0


def test_rate_bits_falls_when_the_density_learns_where_values_are() -> None:
    torch.manual_seed(3)
    y = torch.randn(8, 1, 100) * 0.5 + 6.0  # concentrated away from the density's initial mode
    q = Quantizer(1, 15)
    torch.manual_seed(4)
    before = float(rate_bits(q, y).detach())
    with torch.no_grad():
        q.loc.fill_(6.0)
        q.log_scale.fill_(float(np.log(0.5)))
    torch.manual_seed(4)
    after = float(rate_bits(q, y).detach())
    assert after < 0.5 * before


def test_model_code_at_cut_1_is_integer_within_the_prior() -> None:
    from pipelines.training import load_trained

    model = load_trained("uci_har").model.eval()
    prior = model.symbol_prior(1)
    assert prior is not None and model.symbol_prior(0) is None
    assert all(model.symbol_prior(k) is None for k in range(2, model.n_stages + 1))
    torch.manual_seed(0)
    with torch.no_grad():
        code = model.run(torch.randn(4, *model.input_shape), 0, 1)
    assert code.shape[1:] == model.activation_shape(1) and code.shape[1] == prior.channels
    assert torch.equal(code, torch.round(code)) and prior.low <= code.min() and code.max() <= prior.high
