"""Fused attention for lean training: softmax -> dropout -> matmul in one autograd function that keeps
only q, k, v and one signed softmax (the dropout mask in its sign bit), registered as a transformers
attention interface that falls back to the model's own function wherever it does not apply; over
padding-free layers (:mod:`bitfit.fast.packing`) runs of rows attend on their own or in one node."""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from . import packing
from ..core.roles import module_family
from .dropout import dropout_scale, keep_mask

# modeling modules whose eager attention is the standard matmul*scaling (+mask) -> softmax ->
# dropout -> matmul that the fused function reproduces exactly
FUSED_FAMILIES = {
    "bert", "roberta", "xlm_roberta", "camembert", "electra", "distilbert", "vit", "opt", "bart",
    "mbart", "llama", "qwen2", "mistral", "data2vec", "deit",
}
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "position_bias", "head_mask")

class FusedAttention(torch.autograd.Function):
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
            keep = keep_mask(probs, p)
            scale = dropout_scale(p, probs.dtype, probs.device)
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


def _stock_attention(module, impl):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if impl in (None, "eager"):
        return eager
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)


LEAN_PREFIX = "bitfit_lean:"
# Without dropout the fused path still runs for short sequences: torch's CPU flash-attention backward
# (what sdpa runs) costs more than the whole rest of a short-sequence BitFit step (MiniLM, bf16, one
# thread: a step 315 -> 160 ms at 32 tokens, 821 -> 451 ms at 128; 600 -> 541 at 256, level at 512),
# while the fused path keeps the [heads, keys, keys] softmax, so long sequences stay on sdpa.
FUSED_MAX_KEYS_WITHOUT_DROPOUT = 128


def fused_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention-interface function: fused path in CPU training, the model's own function otherwise; over
    packed layers (bitfit.fast.packing) each run of rows of similar length attends on its own."""
    plan = packing.current()
    if plan is not None and runs_in_one(module, query, key, plan, dropout, kwargs):
        if scaling is None:
            scaling = query.size(-1) ** -0.5
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        return packing.run_attention(plan, query, key, value, scaling, dtype)
    if plan is not None:
        return packing.packed_attention(plan, _attend, module, query, key, value, scaling=scaling, dropout=dropout,
                                        **kwargs)
    return _attend(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def runs_in_one(module, query, key, plan, dropout, kwargs) -> bool:
    """The packed runs' attention runs as one autograd node (bitfit.fast.packing.run_attention): training without
    dropout, runs no longer than the fused path takes, one key head a query head, the standard eager semantics.
    Evaluation keeps the model's own (sdpa) function run by run: on a CPU its fused kernels beat three plain ops
    there (MiniLM, SST-2 dev, bf16: 1.8 s against 2.0 s), while in training one node saves a dozen a run and
    their backward (a packed SST-2 step 6-11% faster)."""
    return dropout == 0.0 and fused_applies(module, query, key, dropout, kwargs, keys=plan.runs[0][2])


def fused_applies(module, query, key, dropout, kwargs, keys: int) -> bool:
    """The fused function can stand in for the model's attention: CPU training, attention dropout or at most
    FUSED_MAX_KEYS_WITHOUT_DROPOUT ``keys``, one key head a query head, a family with the standard eager
    semantics and none of the arguments it does not take."""
    return (
        module.training
        and (dropout > 0.0 or keys <= FUSED_MAX_KEYS_WITHOUT_DROPOUT)
        and query.device.type == "cpu"
        and query.shape[1] == key.shape[1]
        and module_family(module) in FUSED_FAMILIES
        and not any(kwargs.get(k) is not None for k in _UNSUPPORTED_KWARGS)
    )


def _attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    impl = module.config._attn_implementation
    orig = impl[len(LEAN_PREFIX):] if impl and impl.startswith(LEAN_PREFIX) else impl
    usable = torch.is_grad_enabled() and fused_applies(module, query, key, dropout, kwargs, keys=key.shape[-2])
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
        out = FusedAttention.apply(q, k, v, mask, float(scaling), float(dropout), causal)
    return out.transpose(1, 2).contiguous(), None


def register(orig: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = LEAN_PREFIX + orig
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, fused_attention_forward)
    mask_fn = ALL_MASK_ATTENTION_FUNCTIONS[orig]
    if ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name) is not mask_fn:
        type(ALL_MASK_ATTENTION_FUNCTIONS).register(name, mask_fn)
    return name


def attention_applies(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("eager", "sdpa"):
        return None
    for module in model.modules():
        if getattr(module, "config", None) is config and module_family(module) in FUSED_FAMILIES and (
            "Attention" in type(module).__name__
        ):
            if hasattr(sys.modules.get(type(module).__module__), "ALL_ATTENTION_FUNCTIONS"):
                return impl
    return None
