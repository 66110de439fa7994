"""int8 training matmuls for frozen Linears (``frozen_dtype="int8"``): per-row absmax quantisation,
the forward and input-gradient matmuls in int8 (no weight gradient: the weight is frozen), and the
switches that give a model's frozen Linears this forward or take it away."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

INT8_W, INT8_S = "_bitfit_int8_weight", "_bitfit_int8_scale"  # non-persistent buffers of int8 Linears

def rowwise_int8(x2: torch.Tensor, col_scale: Optional[torch.Tensor] = None):
    """(int8 rows, float32 per-row scale) with ``x2 * col_scale ~= q * scale`` (symmetric absmax per row).

    Element-wise work runs on float32 copies with in-place ops: mixed-dtype and broadcast
    ops (int32 * float, addcmul) are several times slower on CPU."""
    y = x2.float()
    fresh = y is not x2
    if col_scale is not None:
        y = y.mul_(col_scale) if fresh else y * col_scale
        fresh = True
    amax = y.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
    inv = amax.reciprocal().mul_(127.0)
    y = y.mul_(inv) if fresh else y * inv
    return y.round_().to(torch.int8), amax.div_(127.0)


class Int8Matmuls(torch.autograd.Function):
    """``x @ W^T + b`` and its input gradient as int8 matmuls (no weight gradient: W is frozen)."""

    @staticmethod
    def forward(ctx, x, bias, wq, w_scale, out_dtype):
        shape = x.shape
        xq, xs = rowwise_int8(x.reshape(-1, shape[-1]))
        y = torch._int_mm(xq, wq.t()).float().mul_(xs).mul_(w_scale)
        if bias is not None:
            y.add_(bias.float())
        ctx.save_for_backward(wq, w_scale)
        ctx.in_shape, ctx.in_dtype, ctx.has_bias = shape, x.dtype, bias is not None
        return y.to(out_dtype).view(*shape[:-1], wq.shape[0])

    @staticmethod
    def backward(ctx, grad):
        wq, w_scale = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).float()
        grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            gq, gs = rowwise_int8(g2, w_scale)  # the weight's row scales belong to the summed dimension
            grad_x = torch._int_mm(gq, wq).float().mul_(gs).to(ctx.in_dtype).view(ctx.in_shape)
        return grad_x, grad_bias, None, None, None


class Int8Forward:
    """Instance-level ``forward`` of a frozen Linear: int8 matmuls in training, the module's own otherwise."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x):
        module = self.module
        wq = module._buffers.get(INT8_W)
        if (
            wq is None or not module.training or not torch.is_grad_enabled() or not x.is_floating_point()
            or x.device != wq.device or x.numel() == 0
            or (x.device.type == "cuda" and (x.numel() // x.shape[-1] <= 16 or x.shape[-1] % 8 or wq.shape[0] % 8))
        ):
            return type(module).forward(module, x)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return Int8Matmuls.apply(x, module.bias, wq, module._buffers[INT8_S], out_dtype)


def quantize_frozen_linears(model: nn.Module) -> list:
    """Give every frozen ``nn.Linear`` of ``model`` an int8 copy of its weight (per-row scales, as
    non-persistent buffers: they follow ``.to()`` and never reach a state dict) and the int8
    training forward. Returns the module names."""
    names = []
    for name, module in model.named_modules():
        w = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        if w is None or w.requires_grad or not w.is_floating_point() or w.dim() != 2:
            continue
        if "forward" in module.__dict__ and not isinstance(module.__dict__["forward"], Int8Forward):
            continue  # somebody else's instance forward: leave the module alone
        with torch.no_grad():
            wq, scale = rowwise_int8(w.detach())
        module.register_buffer(INT8_W, wq, persistent=False)
        module.register_buffer(INT8_S, scale.reshape(-1), persistent=False)
        module.forward = Int8Forward(module)
        names.append(name)
    return names


def drop_int8(model: nn.Module) -> None:
    """Undo :func:`quantize_frozen_linears`."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), Int8Forward):
            del module.__dict__["forward"]
        module._buffers.pop(INT8_W, None)
        module._buffers.pop(INT8_S, None)
