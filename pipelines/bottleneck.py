"""Learned bottlenecks: the narrow, quantised representation a split-aware model sends at its early cut.

Supervised compression for split computing (Matsubara et al., "Head network distillation", 2019/2020;
BottleFit, WoWMoM 2022; the Entropic Student, WACV 2022; the SC2 benchmark, TMLR 2023): the first
stage of a split-aware model is a cheap encoder ending in a :class:`Quantizer`, the second a decoder
that rebuilds what the original (teacher) model had at a later layer, and the teacher's remaining
layers follow. Cut 1 sends the quantised code, a few hundred integer symbols per window.

    Quantizer   clamp to [-L, L] and round (straight-through gradient while training); a learned
                per-channel discretised logistic density gives the rate term of the training loss
                (bits per window, as in the Entropic Student's factorised prior); after training
                ``fit_prior`` replaces the coding table by the smoothed histogram of the training
                codes, which is what the ANS codec (:mod:`pipelines.codecs`) codes against
    Encoder     a stage: ``body`` (convolutions) then ``quant``

The code is integer-valued in the model's own forward pass, so the local model, the split path and
every lossless codec (fp32, fp16 for |L| <= 2048, ANS) give bit-identical results at the bottleneck.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitsense.kinds import SymbolPrior

__all__ = ["Encoder", "Quantizer", "fit_prior", "rate_bits"]

_MIN_P = 1e-9


class Quantizer(nn.Module):
    """Rounds to integers in [-max_symbol, max_symbol]; carries the per-channel coding table."""

    def __init__(self, channels: int, max_symbol: int = 15) -> None:
        super().__init__()
        if channels < 1 or max_symbol < 1:
            raise ValueError(f"Quantizer needs channels >= 1 and max_symbol >= 1, got {channels}, {max_symbol}")
        self.channels = channels
        self.max_symbol = max_symbol
        n = 2 * max_symbol + 1
        # The coding table (probability of each symbol -L..L, per channel); uniform until fit_prior.
        self.register_buffer("pmf", torch.full((channels, n), 1.0 / n))
        # The training-time density (discretised logistic per channel) whose bits are the rate loss.
        self.loc = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y = y.clamp(-self.max_symbol, self.max_symbol)
        if self.training:
            return y + (torch.round(y) - y).detach()
        return torch.round(y)

    def prior(self) -> SymbolPrior:
        pmf = self.get_buffer("pmf").detach().to(torch.float64).cpu().numpy()
        return SymbolPrior(low=-self.max_symbol, pmf=pmf)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, symbols=[-{self.max_symbol}, {self.max_symbol}]"


def rate_bits(quant: Quantizer, y: torch.Tensor) -> torch.Tensor:
    """Estimated bits per window of the code of `y` (pre-quantisation, batch first), differentiable.

    Uniform noise stands in for rounding (Ballé et al., ICLR 2017); the density is the quantiser's
    learned discretised logistic per channel."""
    shape = [1, quant.channels] + [1] * (y.ndim - 2)
    mu = quant.loc.view(shape)
    s = torch.exp(quant.log_scale).view(shape) + 1e-3
    yn = y.clamp(-quant.max_symbol, quant.max_symbol) + torch.empty_like(y).uniform_(-0.5, 0.5)
    p = torch.sigmoid((yn + 0.5 - mu) / s) - torch.sigmoid((yn - 0.5 - mu) / s)
    return -torch.log2(p.clamp_min(_MIN_P)).sum() / y.shape[0]


class Encoder(nn.Module):
    """A bottleneck encoder stage: convolutions, then the quantiser."""

    def __init__(self, body: nn.Module, quant: Quantizer) -> None:
        super().__init__()
        self.body = body
        self.quant = quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant(self.body(x))

    def symbol_prior(self) -> SymbolPrior:
        return self.quant.prior()


@torch.no_grad()
def fit_prior(encoder: Encoder, x: torch.Tensor, batch_size: int = 256, smoothing: float = 0.5) -> SymbolPrior:
    """Set the coding table to the per-channel histogram of the codes of `x` (+ `smoothing` per symbol)."""
    was = encoder.training
    encoder.eval()
    q = encoder.quant
    counts = torch.zeros(q.channels, 2 * q.max_symbol + 1, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        code = encoder(x[i : i + batch_size]).to(torch.int64) + q.max_symbol  # (B, C, ...)
        flat = code.transpose(0, 1).reshape(q.channels, -1)
        counts += F.one_hot(flat, 2 * q.max_symbol + 1).sum(dim=1).to(torch.float64)
    counts += smoothing
    q.get_buffer("pmf").copy_((counts / counts.sum(dim=1, keepdim=True)).to(torch.float32))
    encoder.train(was)
    return q.prior()
