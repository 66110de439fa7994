"""int8 training matmuls on PyTorch's fbgemm engine (``frozen_dtype="int8-fbgemm"``): fast on x86 CPUs
whose only int8 instructions are AVX2's (``vpmaddubsw``), where ``torch._int_mm`` (bitfit.fast.int8) and
bf16 matmuls run many times slower than float32.

The frozen weights stay float32 (evaluation, saving and merging are the float32 path's, bit for bit); in
training mode a frozen ``nn.Linear`` runs its two matmuls through fbgemm:

- forward ``x @ W^T``: ``torch.ops.quantized.linear_dynamic`` on W prepacked with per-output-row int8
  scales;
- input gradient ``g @ W``: the same op on W^T prepacked with per-input-column scales (BitFit needs no
  weight gradient); the bias gradient is the float32 sum of ``g``.

``linear_dynamic`` quantises its input with one scale per tensor, which loses much on activations and
gradients whose rows (tokens) differ in size. Each row is therefore divided by its absolute maximum
first and the output row multiplied back: every row then spans [-1, 1] and the per-tensor scale is in
effect a per-row one (the scheme of bitfit.fast.int8). Without VNNI fbgemm multiplies uint8 by int8
with ``vpmaddubsw``, whose 16-bit pair sums saturate for full-range operands; where a short check
(:func:`weight_levels`) sees that saturation, the weights are quantised to 7 bits (+-63) instead of 8.

The API is ``torch.ops.quantized`` (the quantized-engine ops behind ``torch.ao.quantization``'s dynamic
Linear), not torchao: torchao's CPU int8 dynamic-activation kernel is ``torch._int_mm``, the kernel
that is slow without VNNI/AMX, and its quantised tensors have no backward. PyTorch has deprecated the
quantized tensor types; where these ops are missing or fail, :func:`available` is False and the
Linears keep float32 matmuls (the mode is then float32 exactly).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
from torch import nn

MODE = "int8-fbgemm"


def _ops():
    q = getattr(torch.ops, "quantized", None)
    return getattr(q, "linear_prepack"), getattr(q, "linear_dynamic")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """The fbgemm engine and the ops this mode runs exist and work in this PyTorch build."""
    try:
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return False
        w = torch.ones(8, 16)
        packed = pack_weight(w, 63)  # 7-bit: no saturation on any fbgemm kernel (see weight_levels)
        y = _ops()[1](torch.ones(4, 16), packed, False)
        return bool(torch.allclose(y, torch.full((4, 8), 16.0), rtol=0.05))
    except Exception:  # a build without the quantized ops, or a PyTorch that removed them
        return False


def pack_weight(w: torch.Tensor, levels: int):
    """fbgemm's prepacked form of ``w`` ([out, in] float), symmetric int8 per output row at ``levels``."""
    prepack = _ops()[0]
    w = w.detach().float().contiguous()
    scale = (w.abs().amax(dim=1).clamp_min(1e-30) / levels).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor types are deprecated; the mode checks they still run
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            qw = torch.quantize_per_channel(w, scale, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
            return prepack(qw, None)
        finally:
            torch.backends.quantized.engine = previous


@functools.lru_cache(maxsize=None)
def weight_levels() -> int:
    """127 where fbgemm's int8 products cannot saturate on this CPU (VNNI), else 63: full-range uint8
    activations times full-range int8 weights overflow ``vpmaddubsw``'s 16-bit pair sums. Measured with
    the worst case (every product at its maximum), so it follows whatever kernel fbgemm picks."""
    w = torch.full((16, 256), 1.0)
    x = torch.ones(16, 256)
    x[:, 0] = -1.0  # range [-1, 1]: the activations quantise to 255 almost everywhere
    want = x @ w.t()
    got = _ops()[1](x, pack_weight(w, 127), False)
    return 127 if torch.allclose(got, want, rtol=0.02) else 63


def rowwise_linear(x2: torch.Tensor, packed) -> torch.Tensor:
    """``x2 @ W^T`` (float32, [rows, in]) with ``packed`` = fbgemm's prepacked W, each row of ``x2``
    quantised on its own scale."""
    amax = x2.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)
    y = _ops()[1](x2 / amax, packed, False)
    return y.mul_(amax)


class FbgemmMatmuls(torch.autograd.Function):
    """``x @ W^T + b`` and its input gradient on fbgemm int8 kernels (no weight gradient: W is frozen)."""

    @staticmethod
    def forward(ctx, x, bias, packed_fwd, packed_bwd, out_dtype):
        shape = x.shape
        y = rowwise_linear(x.reshape(-1, shape[-1]).float(), packed_fwd)
        if bias is not None:
            y.add_(bias.float())
        ctx.packed_bwd = packed_bwd
        ctx.in_shape, ctx.in_dtype, ctx.has_bias = shape, x.dtype, bias is not None
        return y.to(out_dtype).view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g2 = grad.reshape(-1, grad.shape[-1]).float()
        grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = rowwise_linear(g2, ctx.packed_bwd).to(ctx.in_dtype).view(ctx.in_shape)
        return grad_x, grad_bias, None, None, None


class FbgemmForward:
    """Instance-level ``forward`` of a frozen Linear: fbgemm int8 matmuls in CPU training, the module's
    own forward otherwise. The prepacked weights are made on first use and again whenever the weight
    changes (an in-place edit or a new tensor); they are not pickled or deep-copied (a copy packs its own)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self._packed = None
        self._key = None

    def __getstate__(self):
        return {"module": self.module, "_packed": None, "_key": None}

    def packed(self):
        w = self.module.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        if self._packed is None or self._key != key:
            levels = weight_levels()
            with torch.no_grad():
                self._packed = (pack_weight(w, levels), pack_weight(w.t(), levels))
            self._key = key
        return self._packed

    def __call__(self, x):
        module = self.module
        w = module.weight
        if (
            not module.training or not torch.is_grad_enabled() or not x.is_floating_point()
            or x.device.type != "cpu" or w.device.type != "cpu" or w.requires_grad or x.numel() == 0
        ):
            return type(module).forward(module, x)
        out_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        fwd, bwd = self.packed()
        return FbgemmMatmuls.apply(x, module.bias, fwd, bwd, out_dtype)


def quantize_frozen_linears(model: nn.Module) -> list:
    """Give every frozen ``nn.Linear`` of ``model`` the fbgemm int8 training forward (nothing where the
    engine is not :func:`available`). Returns the module names."""
    if not available():
        return []
    names = []
    for name, module in model.named_modules():
        w = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        if w is None or w.requires_grad or not w.is_floating_point() or w.dim() != 2:
            continue
        current = module.__dict__.get("forward")
        if current is not None and not isinstance(current, FbgemmForward):
            continue  # somebody else's instance forward (the other int8 mode's included): leave it alone
        module.forward = FbgemmForward(module)
        names.append(name)
    return names


def drop_fbgemm(model: nn.Module) -> None:
    """Undo :func:`quantize_frozen_linears`."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), FbgemmForward):
            del module.__dict__["forward"]


def describe(n: int) -> Optional[str]:
    if not n:
        return None
    bits = "8-bit" if weight_levels() == 127 else "7-bit (no VNNI: fbgemm's int16 pair sums would saturate)"
    return (f"int8 training matmuls on fbgemm in {n} frozen Linear layers (forward and input gradient, row-wise "
            f"activation scales, {bits} per-channel weights); weights, evaluation and everything else float32")
