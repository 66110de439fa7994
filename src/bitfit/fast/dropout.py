"""Lean dropout: the same draws as torch's CPU dropout, saving a bool mask for backward instead of a
float noise tensor (1 byte a value instead of 4), and a cheaper draw for paths that are not
bit-identical to stock anyway (int8 training)."""

from __future__ import annotations

import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

# Set (by the model's lean forward) while a training forward of an int8 model runs: that path is not
# bit-identical to stock anyway, so dropout may use a cheaper draw than torch's bernoulli_.
FAST_DRAW = contextvars.ContextVar("bitfit_fast_draw", default=False)
DRAW_BITS = 15


def fast_keep_mask(shape, p: float, device) -> torch.Tensor:
    """Keep mask with P(keep) = 1 - p to 2**-15: 15 random bits per value, four values carved out of
    every 64-bit word of one ``random_()`` call (about 5x cheaper than ``bernoulli_`` on CPU)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # [0, 2**63)
    bits = words.view(torch.int16)[:n].view(shape).bitwise_and_((1 << DRAW_BITS) - 1)
    return bits >= round(p * (1 << DRAW_BITS))


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    if FAST_DRAW.get() and x.device.type == "cpu":
        return fast_keep_mask(x.shape, p, x.device)
    # The draw torch's CPU dropout makes (empty_like(input).bernoulli_(1 - p)) made straight into a
    # bool tensor: CPU bernoulli_ consumes the generator the same way for every dtype, so under a
    # fixed seed this is the stock path's mask exactly (the tests check it).
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)


def dropout_scale(p: float, dtype: torch.dtype, device) -> torch.Tensor:
    # stock: noise.div_(1 - p), computed in the tensor's dtype
    return torch.ones((), dtype=dtype, device=device).div_(1 - p)


class _MaskedScale(torch.autograd.Function):
    """x * noise with noise = scale where kept, 0 where dropped; saves only the bool drop mask."""

    @staticmethod
    def forward(ctx, x, drop, scale):
        ctx.save_for_backward(drop, scale)
        return x.mul(scale).masked_fill_(drop, 0)

    @staticmethod
    def backward(ctx, grad):
        drop, scale = ctx.saved_tensors
        return grad.mul(scale.to(grad.dtype)).masked_fill_(drop, 0), None, None


def lean_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout that saves a bool mask for backward (CPU); stock ``F.dropout`` elsewhere."""
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0 or not torch.is_grad_enabled() or not x.requires_grad:
        return F.dropout(x, p, training)
    return _MaskedScale.apply(x, keep_mask(x, p).logical_not_(), dropout_scale(p, x.dtype, x.device))


class LeanDropout(nn.Dropout):
    """``nn.Dropout`` with the same draws whose backward keeps a bool mask, not a float tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, True)
        return lean_dropout(x, self.p, self.training)
