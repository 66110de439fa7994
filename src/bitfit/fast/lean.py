"""Lean BitFit training: a low-precision frozen base and less saved activation.

BitFit's frozen weights need no gradient, no optimizer state and no more precision than
inference needs. Two independent switches, both set by :func:`bitfit.apply`:

``frozen_dtype="bfloat16"`` (or ``"float16"``)
    The frozen weights of Linear / Embedding / Conv1D / Conv layers are stored in that dtype;
    every trained tensor and every norm parameter is float32, so an optimizer only ever sees
    float32. The model's forward runs under ``torch.autocast`` in that dtype (CPU or GPU), which
    casts each op's inputs consistently, so mixed-dtype pitfalls (a bf16 weight with a float32
    bias or input) cannot occur; trained float32 tensors are cast inside the graph and their
    gradients arrive in float32. Floating outputs (logits, hidden states) are returned as
    float32.

``frozen_dtype="int8"``
    As ``"bfloat16"``, and in training mode every frozen ``nn.Linear`` runs its two matmuls (the
    forward and the input gradient; BitFit needs no weight gradient) in int8: the weight is
    quantized once per output row, activations and incoming gradients per token row, and the
    int32 products are rescaled in float32 (the SwitchBack scheme of Wortsman et al., 2023,
    whose third, weight-gradient matmul BitFit never computes). Eval mode, and so every
    evaluation and the deployed model, runs the bf16 path. On CPUs with AVX512-VNNI int8
    matmuls run at about twice the bf16 rate.

``lean=True`` (the default)
    In training mode, two memory-lean replacements of stock pieces, exact in float32:

    - *lean dropout*: ``nn.Dropout`` modules keep their mask as ``bool`` (1 byte a value)
      instead of CPU dropout's float noise tensor (4 bytes); the mask is drawn exactly as
      torch draws it, so under a fixed seed the result is bit-identical to stock dropout.
    - *fused attention*: softmax -> dropout -> matmul in one autograd function that keeps only
      q, k, v and the softmax output, with the dropout mask folded into that output's sign bit
      (softmax outputs are >= 0), instead of the softmax output, the noise tensor and their
      product. Used by families whose attention goes through transformers' attention interface
      with the standard eager semantics (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, MiniLM,
      DistilBERT, ViT, OPT, BART, LLaMA/Qwen2/Mistral when their attention dropout is active),
      and without dropout on CPU up to ``FUSED_MAX_KEYS_WITHOUT_DROPOUT`` keys, where torch's CPU
      flash-attention backward is the slowest part of a short-sequence step. Elsewhere (eval mode,
      longer sequences without dropout, GPU where SDPA's fused kernels are already lean, or
      grouped-query/sliding-window/soft-capped attention) the stock function runs.
    - *lean gated MLP*: the SwiGLU MLPs of LLaMA, Qwen2/3 and Mistral (``down(silu(gate(x)) *
      up(x))``) keep only ``gate(x)`` and ``up(x)`` for backward and recompute the SiLU there,
      instead of also keeping its output: a third less of the MLP's saved activations, which are
      most of a decoder layer's. Backward runs the stock ops on the same values (bit-identical).
    - *padding-free layers* (on a CPU, training and evaluation): for encoder families that pack
      (``bitfit.fast.packing.PACK_FAMILIES``: BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT) a
      right-padded batch's real tokens travel packed from the first layer to the last, and attention
      regroups them into runs of rows of similar length; the same values up to rounding, without the
      padding's cost (a random SST-2 batch is ~3x padding); without dropout a layer's runs attend in one
      autograd node (``bitfit.fast.packing.run_attention``). Dropout then draws on the packed tokens,
      so only ``set_lean(model, True, pack=False)`` is bit-identical to stock under a seed.

``set_lean(model, False)`` (or ``apply(..., lean=False)``) restores the stock path.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import packing
from ..errors import BitFitConfigError, BitFitError

LEAN_ATTR = "_bitfit_lean"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INT8_W, INT8_S = "_bitfit_int8_weight", "_bitfit_int8_scale"  # non-persistent buffers of int8 Linears

# modeling modules whose eager attention is the standard matmul*scaling (+mask) -> softmax ->
# dropout -> matmul that the fused function reproduces exactly
_FUSED_FAMILIES = {
    "bert", "roberta", "xlm_roberta", "camembert", "electra", "distilbert", "vit", "opt", "bart",
    "mbart", "llama", "qwen2", "mistral", "data2vec", "deit",
}
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias", "head_mask")


def _to_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(name, name)
    if name not in _DTYPES:
        raise BitFitConfigError(
            f"frozen_dtype={dtype!r} is not supported; use one of bfloat16, float16, float32, int8"
        )
    return _DTYPES[name]


@dataclass
class LeanState:
    """What this module did to a model (kept at ``model._bitfit_lean``)."""

    frozen_dtype: Optional[torch.dtype] = None
    lean: bool = False
    dropouts: list = field(default_factory=list)  # module names swapped to LeanDropout
    attention: bool = False  # fused attention applies to this family
    mlps: list = field(default_factory=list)  # gated MLP modules with the lean forward
    pack: bool = False  # padding-free encoder layers on a CPU, training and evaluation (bitfit.fast.packing)
    attn_impl: Optional[str] = None  # the model's own attention implementation (restored outside training)
    cast: int = 0  # number of frozen weight tensors stored in frozen_dtype
    int8: list = field(default_factory=list)  # Linear modules whose training matmuls run in int8
    auto: Optional[object] = None  # bitfit.fast.hardware.DtypeChoice when frozen_dtype="auto" chose the dtype

    def describe(self) -> list:
        out = []
        if self.auto is not None:
            out.append(self.auto.describe())
        if self.frozen_dtype is not None:
            out.append(
                f"frozen weights stored and run in {str(self.frozen_dtype).replace('torch.', '')} "
                f"({self.cast} tensors; trained tensors and norms float32, forward under autocast)"
            )
        if self.int8:
            out.append(
                f"int8 training matmuls in {len(self.int8)} frozen Linear layers (forward and input gradient, "
                "row-wise scales); eval mode runs bf16"
            )
        if self.lean:
            parts = []
            if self.dropouts:
                parts.append(f"lean dropout ({len(self.dropouts)} modules, bool masks)")
            if self.attention:
                parts.append("fused softmax-dropout-matmul attention")
            if self.mlps:
                parts.append(f"lean gated MLP ({len(self.mlps)} modules, SiLU recomputed in backward)")
            if self.pack:
                parts.append("padding-free layers (real tokens only, attention in length runs)")
            out.append("lean training mode: " + (", ".join(parts) if parts else "nothing applies to this family"))
        return out


def get_lean(model: nn.Module) -> Optional[LeanState]:
    from ..core.prepare import unwrap

    return getattr(unwrap(model), LEAN_ATTR, None)


# ------------------------------------------------------------------ frozen dtype


def _weight_modules():
    kinds = [nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d]
    try:
        from transformers.pytorch_utils import Conv1D

        kinds.append(Conv1D)
    except Exception:  # pragma: no cover
        pass
    return tuple(kinds)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or (
        "norm" in type(module).__name__.lower()
    )


def cast_frozen(model: nn.Module, dtype="bfloat16") -> int:
    """Store the frozen weights of ``model``'s Linear/Embedding/Conv layers in ``dtype``.

    Every trainable parameter and every norm parameter becomes float32 (also when the base was
    loaded in bf16). The model's forward then runs under autocast in ``dtype``. Returns the
    number of weight tensors cast. Called by ``bitfit.apply(..., frozen_dtype=...)``.
    """
    from ..core.prepare import unwrap

    target = unwrap(model)
    int8 = str(dtype).replace("torch.", "") == "int8"
    dt = torch.bfloat16 if int8 else _to_dtype(dtype)
    lean = _lean_state(target)
    if int8:
        lean.int8 = quantize_frozen_linears(target)
    weight_kinds = _weight_modules()
    seen = set()
    n = 0
    for module in target.modules():
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
            continue
        if isinstance(module, weight_kinds):
            w = module._parameters.get("weight")
            if w is None or id(w) in seen:
                continue
            seen.add(id(w))
            if not w.requires_grad and w.is_floating_point() and dt != torch.float32:
                if w.dtype != dt:
                    w.data = w.data.to(dt)
                n += 1
    for p in target.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    lean.frozen_dtype = None if dt == torch.float32 else dt
    lean.cast = n
    _install_forward(target)
    return n


# ------------------------------------------------------------------ int8 training matmuls


def _rowwise_int8(x2: torch.Tensor, col_scale: Optional[torch.Tensor] = None):
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


class _Int8Matmuls(torch.autograd.Function):
    """``x @ W^T + b`` and its input gradient as int8 matmuls (no weight gradient: W is frozen)."""

    @staticmethod
    def forward(ctx, x, bias, wq, w_scale, out_dtype):
        shape = x.shape
        xq, xs = _rowwise_int8(x.reshape(-1, shape[-1]))
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
            gq, gs = _rowwise_int8(g2, w_scale)  # the weight's row scales belong to the summed dimension
            grad_x = torch._int_mm(gq, wq).float().mul_(gs).to(ctx.in_dtype).view(ctx.in_shape)
        return grad_x, grad_bias, None, None, None


class _Int8Forward:
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
        return _Int8Matmuls.apply(x, module.bias, wq, module._buffers[INT8_S], out_dtype)


def quantize_frozen_linears(model: nn.Module) -> list:
    """Give every frozen ``nn.Linear`` of ``model`` an int8 copy of its weight (per-row scales, as
    non-persistent buffers: they follow ``.to()`` and never reach a state dict) and the int8
    training forward. Returns the module names."""
    names = []
    for name, module in model.named_modules():
        w = module._parameters.get("weight") if isinstance(module, nn.Linear) else None
        if w is None or w.requires_grad or not w.is_floating_point() or w.dim() != 2:
            continue
        if "forward" in module.__dict__ and not isinstance(module.__dict__["forward"], _Int8Forward):
            continue  # somebody else's instance forward: leave the module alone
        with torch.no_grad():
            wq, scale = _rowwise_int8(w.detach())
        module.register_buffer(INT8_W, wq, persistent=False)
        module.register_buffer(INT8_S, scale.reshape(-1), persistent=False)
        module.forward = _Int8Forward(module)
        names.append(name)
    return names


def drop_int8(model: nn.Module) -> None:
    """Undo :func:`quantize_frozen_linears`."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _Int8Forward):
            del module.__dict__["forward"]
        module._buffers.pop(INT8_W, None)
        module._buffers.pop(INT8_S, None)


# ------------------------------------------------------------------ lean dropout


# Set (by the model's lean forward) while a training forward of an int8 model runs: that path is not
# bit-identical to stock anyway, so dropout may use a cheaper draw than torch's bernoulli_.
_FAST_DRAW = contextvars.ContextVar("bitfit_fast_draw", default=False)
_DRAW_BITS = 15


def _fast_keep_mask(shape, p: float, device) -> torch.Tensor:
    """Keep mask with P(keep) = 1 - p to 2**-15: 15 random bits per value, four values carved out of
    every 64-bit word of one ``random_()`` call (about 5x cheaper than ``bernoulli_`` on CPU)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # [0, 2**63)
    bits = words.view(torch.int16)[:n].view(shape).bitwise_and_((1 << _DRAW_BITS) - 1)
    return bits >= round(p * (1 << _DRAW_BITS))


def _keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    if _FAST_DRAW.get() and x.device.type == "cpu":
        return _fast_keep_mask(x.shape, p, x.device)
    # The draw torch's CPU dropout makes (empty_like(input).bernoulli_(1 - p)) made straight into a
    # bool tensor: CPU bernoulli_ consumes the generator the same way for every dtype, so under a
    # fixed seed this is the stock path's mask exactly (the tests check it).
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p)


def _scale(p: float, dtype: torch.dtype, device) -> torch.Tensor:
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
    return _MaskedScale.apply(x, _keep_mask(x, p).logical_not_(), _scale(p, x.dtype, x.device))


class LeanDropout(nn.Dropout):
    """``nn.Dropout`` with the same draws whose backward keeps a bool mask, not a float tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, True)
        return lean_dropout(x, self.p, self.training)


# ------------------------------------------------------------------ fused attention


class _FusedAttention(torch.autograd.Function):
    """softmax(q k^T * scaling + mask) -> dropout -> @ v, saving q, k, v and one signed softmax."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling, p, causal):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
        if causal:
            L, S = scores.shape[-2:]
            tri = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
            scores = scores.masked_fill(~tri, torch.finfo(scores.dtype).min)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        probs = torch.softmax(scores, dim=-1)  # low precision: CPU kernels accumulate in float32
        del scores
        if p > 0.0:
            keep = _keep_mask(probs, p)
            scale = _scale(p, probs.dtype, probs.device)
            signed = torch.where(keep, probs, probs.neg())  # sign bit = dropped (softmax >= 0)
            del keep
            dropped = signed.relu().mul_(scale)  # = probs * noise of stock dropout
        else:
            scale = None
            dropped = probs
            signed = probs
        out = torch.matmul(dropped, v)
        ctx.save_for_backward(q, k, v, signed)
        ctx.scaling = scaling
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, signed = ctx.saved_tensors
        scale = ctx.scale
        if scale is not None:
            drop = torch.signbit(signed)
            probs = signed.abs()
            dropped = signed.relu().mul_(scale)
        else:
            drop, probs, dropped = None, signed, signed
        grad = grad.to(v.dtype)
        gv = torch.matmul(dropped.transpose(-1, -2), grad) if ctx.needs_input_grad[2] else None
        del dropped
        gq = gk = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gp = torch.matmul(grad, v.transpose(-1, -2))
            if drop is not None:
                gp = gp.mul_(scale).masked_fill_(drop, 0)
            gs = torch._softmax_backward_data(gp, probs, -1, probs.dtype)
            gs = gs.mul_(ctx.scaling)
            if ctx.needs_input_grad[0]:
                gq = torch.matmul(gs, k)
            if ctx.needs_input_grad[1]:
                gk = torch.matmul(gs.transpose(-1, -2), q)
        return gq, gk, gv, None, None, None, None


def _family(module: nn.Module) -> str:
    mod = type(module).__module__
    return mod.rsplit(".", 1)[-1].removeprefix("modeling_")


def _stock_attention(module, impl):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if impl in (None, "eager"):
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)


_LEAN_PREFIX = "bitfit_lean:"
# Without dropout the fused path still runs for short sequences: torch's CPU flash-attention backward
# (what sdpa runs) costs more than the whole rest of a short-sequence BitFit step (MiniLM, bf16, one
# thread: a step 315 -> 160 ms at 32 tokens, 821 -> 451 ms at 128; 600 -> 541 at 256, level at 512),
# while the fused path keeps the [heads, keys, keys] softmax, so long sequences stay on sdpa.
FUSED_MAX_KEYS_WITHOUT_DROPOUT = 128


def _fused_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention-interface function: fused path in CPU training, the model's own function otherwise; over
    packed layers (bitfit.fast.packing) each run of rows of similar length attends on its own."""
    plan = packing.current()
    if plan is not None and _runs_in_one(module, query, key, plan, dropout, kwargs):
        if scaling is None:
            scaling = query.size(-1) ** -0.5
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        return packing.run_attention(plan, query, key, value, scaling, dtype)
    if plan is not None:
        return packing.packed_attention(plan, _attend, module, query, key, value, scaling=scaling, dropout=dropout,
                                        **kwargs)
    return _attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _runs_in_one(module, query, key, plan, dropout, kwargs) -> bool:
    """The packed runs' attention runs as one autograd node (bitfit.fast.packing.run_attention): training without
    dropout, runs no longer than the fused path takes, one key head a query head, the standard eager semantics.
    Evaluation keeps the model's own (sdpa) function run by run: on a CPU its fused kernels beat three plain ops
    there (MiniLM, SST-2 dev, bf16: 1.8 s against 2.0 s), while in training one node saves a dozen a run and
    their backward (a packed SST-2 step 6-11% faster)."""
    return dropout == 0.0 and _fused_applies(module, query, key, dropout, kwargs, keys=plan.runs[0][2])


def _fused_applies(module, query, key, dropout, kwargs, keys: int) -> bool:
    """The fused function can stand in for the model's attention: CPU training, attention dropout or at most
    FUSED_MAX_KEYS_WITHOUT_DROPOUT ``keys``, one key head a query head, a family with the standard eager
    semantics and none of the arguments it does not take."""
    return (
        module.training
        and (dropout > 0.0 or keys <= FUSED_MAX_KEYS_WITHOUT_DROPOUT)
        and query.device.type == "cpu"
        and query.shape[1] == key.shape[1]
        and _family(module) in _FUSED_FAMILIES
        and not any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS)
    )


def _attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    impl = module.config._attn_implementation
    orig = impl[len(_LEAN_PREFIX):] if impl and impl.startswith(_LEAN_PREFIX) else impl
    usable = torch.is_grad_enabled() and _fused_applies(module, query, key, dropout, kwargs, keys=key.shape[-2])
    if not usable:
        return _stock_attention(module, orig)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = orig == "sdpa" and mask is None and query.shape[2] > 1 and bool(is_causal)
    dtype = query.dtype
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = query.to(dtype), key.to(dtype), value.to(dtype)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(dtype)
        out = _FusedAttention.apply(q, k, v, mask, float(scaling), float(dropout), causal)
    return out.transpose(1, 2).contiguous(), None


def _register(orig: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = _LEAN_PREFIX + orig
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _fused_attention_forward)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[orig]
    if ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name) is not mask_fn:
        type(ALL_MASK_ATTENTION_FUNCTIONS).register(name, mask_fn)
    return name


def _attention_applies(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        return None
    for module in model.modules():
        if getattr(module, "config", None) is config and _family(module) in _FUSED_FAMILIES and (
            "Attention" in type(module).__name__
        ):
            if hasattr(sys.modules.get(type(module).__module__), "ALL_ATTENTION_FUNCTIONS"):
                return impl
    return None


# ------------------------------------------------------------------ lean gated MLP

# families whose MLP forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
_GATED_MLP_FAMILIES = {"llama", "qwen2", "qwen3", "mistral"}


class _SiLUMul(torch.autograd.Function):
    """``silu(gate) * up`` saving ``gate`` and ``up`` only; backward recomputes ``silu(gate)`` and runs the
    ops stock autograd runs (mul's two gradients, ``silu_backward``): bit-identical gradients."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        g_gate = g_up = None
        if ctx.needs_input_grad[1]:
            g_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            g_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return g_gate, g_up


class _LeanGatedMLP:
    """Instance-level ``forward`` of a SwiGLU MLP: :class:`_SiLUMul` in CPU training, the stock forward otherwise."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x):
        m = self.module
        if not (m.training and torch.is_grad_enabled() and x.device.type == "cpu"):
            return type(m).forward(m, x)
        return m.down_proj(_SiLUMul.apply(m.gate_proj(x), m.up_proj(x)))


def _is_gated_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        _family(module) in _GATED_MLP_FAMILIES and type(module).__name__.endswith("MLP")
        and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")
        and "forward" not in act.__dict__  # nobody replaced the activation's forward (a kernel)
    )


def _set_lean_mlps(target: nn.Module, on: bool) -> list:
    names = []
    for name, module in target.named_modules():
        current = module.__dict__.get("forward")
        if not on:
            if isinstance(current, _LeanGatedMLP):
                del module.__dict__["forward"]
            continue
        if isinstance(current, _LeanGatedMLP):
            names.append(name)
        elif current is None and _is_gated_mlp(module):
            module.forward = _LeanGatedMLP(module)
            names.append(name)
    return names


# ------------------------------------------------------------------ the forward wrapper


class _Forward:
    """Instance-level ``forward`` of a lean model: autocast and/or the fused attention switch.

    A plain object (not a closure) so ``copy.deepcopy`` and pickling carry it to the copy.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        try:
            self.__signature__ = inspect.signature(type(module).forward.__get__(module))
        except (TypeError, ValueError):  # pragma: no cover
            pass
        self.__doc__ = type(module).forward.__doc__

    def __call__(self, *args, **kwargs):
        module = self.module
        lean = getattr(module, LEAN_ATTR, None)
        forward = type(module).forward
        if lean is None:
            return forward(module, *args, **kwargs)
        with contextlib.ExitStack() as stack:
            if lean.frozen_dtype is not None:
                device = next(module.parameters()).device.type
                stack.enter_context(torch.autocast(device, dtype=lean.frozen_dtype))
            if lean.lean and lean.int8 and module.training:
                stack.callback(_FAST_DRAW.reset, _FAST_DRAW.set(True))
            if lean.lean and lean.attention and not _checkpointing(module):
                plan = None
                if lean.pack and not args and packing.wanted(kwargs, module) \
                        and kwargs["attention_mask"].device.type == "cpu":
                    plan = packing.plan(kwargs["attention_mask"])  # training and evaluation alike
                config = module.config
                saved = config._attn_implementation_internal
                if (module.training or plan is not None) and saved in ("eager", "sdpa"):
                    config._attn_implementation_internal = _register(saved)
                    stack.callback(setattr, config, "_attn_implementation_internal", saved)
                    if plan is not None:
                        stack.callback(packing.deactivate, packing.activate(plan))
            out = forward(module, *args, **kwargs)
        if lean.frozen_dtype is not None:
            out = _to_float32(out)
        return out


def packs(model: nn.Module) -> bool:
    """Forwards of ``model`` (training and evaluation) run padding-free layers (bitfit.fast.packing) when their batch
    is right-padded and on a CPU: lean mode with the fused attention on a family that packs, without gradient
    checkpointing."""
    from ..core.prepare import unwrap

    target = unwrap(model)
    lean = getattr(target, LEAN_ATTR, None)
    return bool(lean is not None and lean.lean and lean.pack and lean.attention and not _checkpointing(target))


def _checkpointing(model: nn.Module) -> bool:
    """Gradient (activation) checkpointing is on: backward recomputes each layer outside this forward, with
    the model's own attention function, so the forward must run that one too (the saved tensors must match;
    checkpointing keeps no attention activations anyway)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return type(out)(_to_float32(o) for o in out)
    if isinstance(out, dict):  # ModelOutput
        for key in list(out.keys()):
            val = out[key]
            new = _to_float32(val)
            if new is not val:
                out[key] = new
        return out
    return out


def _install_forward(target: nn.Module) -> None:
    if not isinstance(target.__dict__.get("forward"), _Forward):
        if "forward" in target.__dict__:
            raise BitFitError(
                "this model's forward was already replaced on the instance; apply bitfit before wrapping it"
            )
        target.forward = _Forward(target)


def _lean_state(target: nn.Module) -> LeanState:
    state = getattr(target, LEAN_ATTR, None)
    if state is None:
        state = LeanState()
        object.__setattr__(target, LEAN_ATTR, state)
    return state


# ------------------------------------------------------------------ switches


def set_lean(model: nn.Module, on: bool = True, pack: bool = True) -> LeanState:
    """Turn the memory-lean training mode on or off (off = stock modules, bit for bit). ``pack=False`` keeps
    the lean modules but runs the layers on padded batches (bitfit.fast.packing changes how dropout's draws fall
    on tokens, so the lean modules alone are bit-identical to stock under a seed; with packing the same
    holds up to rounding without dropout)."""
    from ..core.prepare import get_state, unwrap

    target = unwrap(model)
    lean = _lean_state(target)
    if on:
        names = []
        for name, module in target.named_modules():
            if type(module) is nn.Dropout:
                module.__class__ = LeanDropout
                names.append(name)
            elif type(module) is LeanDropout:
                names.append(name)
        lean.dropouts = names
        impl = _attention_applies(target)
        lean.attention = impl is not None
        lean.attn_impl = impl
        lean.mlps = _set_lean_mlps(target, True)
        packing.remove(target)
        lean.pack = bool(pack and lean.attention and packing.install(target))
        lean.lean = True
        _install_forward(target)
    else:
        for module in target.modules():
            if type(module) is LeanDropout:
                module.__class__ = nn.Dropout
        _set_lean_mlps(target, False)
        packing.remove(target)
        lean.lean, lean.dropouts, lean.attention, lean.mlps, lean.pack = False, [], False, [], False
    state = get_state(target)
    if state is not None and hasattr(state.config, "lean"):
        state.config.lean = bool(on)
    return lean


def finish_apply(target: nn.Module, cfg) -> None:
    """Called at the end of ``bitfit.apply``: frozen dtype and lean mode as the config says.
    ``frozen_dtype="auto"`` is resolved here (bitfit.fast.hardware) and the config records the result, so
    an artifact saved from this model reloads in the same precision on any machine."""
    auto = None
    if cfg.frozen_dtype == "auto":
        from .hardware import choose_frozen_dtype

        try:
            device = next(p.device for p in target.parameters())
        except StopIteration:
            device = torch.device("cpu")
        auto = choose_frozen_dtype(device)
        cfg.frozen_dtype = auto.frozen_dtype
        _lean_state(target).auto = auto
    if cfg.frozen_dtype is not None:
        cast_frozen(target, cfg.frozen_dtype)
    if getattr(cfg, "lean", False):
        set_lean(target, True)


def remove(model: nn.Module) -> None:
    """Undo what ``finish_apply`` installed (lean modules, the instance forward, the lean state).

    Weights cast by ``frozen_dtype`` keep that dtype."""
    from ..core.prepare import unwrap

    target = unwrap(model)
    if target.__dict__.get(LEAN_ATTR) is None:
        return
    set_lean(target, False)
    drop_int8(target)
    if isinstance(target.__dict__.get("forward"), _Forward):
        del target.__dict__["forward"]
    object.__delattr__(target, LEAN_ATTR)


def saved_activation_bytes(fn, params=()):
    """``(bytes, fn())``: bytes of the distinct storages autograd saves while ``fn()`` runs.

    Storages of ``params`` (the model's weights, which backward reads but nobody allocates for
    it) are not counted.
    """
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip and ptr not in seen:
                seen[ptr] = t.untyped_storage().nbytes()
        except Exception:  # pragma: no cover
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result
