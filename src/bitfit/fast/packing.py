"""Padding-free training steps for encoder models: the transformer layers see only the batch's real tokens.

A random batch of short sentences is mostly padding (SST-2, batch 32: 13 real tokens a row on average,
padded to 39), and every padded position costs a full pass through every layer. Everything in an encoder
layer except attention works token by token, so between the first layer's input and the last layer's
output the hidden states can travel *packed*: the real tokens of all rows as one sequence ``(1, N, H)``.
Only attention needs rows again; it regroups the packed tokens into a few runs of rows of similar length
(sorted by length, cut where the padding would cost more than another call), pads each run to its own
longest row, attends with a key-padding mask and packs the result back. The embeddings before the first
layer and the pooler/head after the last see the usual padded ``(B, L, H)`` tensors, so position ids, token
types and the head's first-token pooling are untouched.

In training without dropout (``bitfit train``'s default) all runs of a layer attend in one autograd node
(:func:`run_attention`): a run's padded query/key/value are gathered straight into ``(heads x rows, length,
dim)`` batches and backward regroups the gradients the way the forward regroups the output, instead of a
dozen autograd nodes a run; with attention dropout, and in evaluation (where the model's own sdpa kernels
beat plain ops), the runs attend one by one through the model's attention function (:func:`packed_attention`).

Exact by construction: a real token never sees a padded one (masked keys), so packing changes only which
matmul rows are computed, not any real token's value; the tests check logits and the trained biases'
gradients against the padded step on every supported family. Used by the lean training mode on a CPU
(``bitfit.fast.lean``) for the families in :data:`PACK_FAMILIES` when the batch is right-padded, attention runs
our fused function, and nobody asked for per-layer hidden states or attention maps.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..core.prepare import DYNAMIC_ATTR
from ..core.roles import module_family
from .subbatch import length_runs, right_padded

#: encoder families whose layers are token-wise apart from an attention that goes through transformers'
#: attention interface with a padding-only mask, and whose positions are added before the first layer
PACK_FAMILIES = {"bert", "roberta", "xlm_roberta", "camembert", "electra", "distilbert"}

#: the fixed cost of one more attention run, in padded key positions (rows x longest); small, since a run
#: is a few small matmuls, not a pass through the model
RUN_OVERHEAD_TOKENS = 64

_PLAN: contextvars.ContextVar = contextvars.ContextVar("bitfit_packing", default=None)


@dataclass
class Plan:
    """Where a batch's real tokens live, packed and in attention runs."""

    batch: int
    length: int
    index: torch.Tensor  # (N,) flat positions (row * length + column) of the real tokens, row-major
    runs: list  # per run: (gather (R*Lr,) into [packed tokens; one zero row], rows R, run length Lr, lengths (R,))
    unpack: torch.Tensor  # (N,) where each packed token sits in the runs' outputs laid end to end
    active: bool = False  # the first layer has packed the hidden states and the last has not unpacked them yet
    masks: Optional[dict] = None  # per dtype: the runs' additive key-padding masks
    fast: Optional[dict] = None  # per (heads, dtype): what run_attention needs of each run


def plan(attention_mask: torch.Tensor, overhead: Optional[int] = None) -> Optional[Plan]:
    """A :class:`Plan` for a right-padded 2-D ``attention_mask``, or None where packing does not apply or
    gains nothing (no padding, left padding, an empty row)."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 or attention_mask.numel() == 0:
        return None
    if overhead is None:
        overhead = RUN_OVERHEAD_TOKENS
    m = attention_mask.bool()
    b, t = m.shape
    if bool(m.all()) or not right_padded(m):
        return None
    lengths = m.sum(1)
    index = m.reshape(-1).nonzero().squeeze(1)
    n = index.numel()
    # packed position of every padded position (n: the zero row appended for padding)
    where = torch.full((b * t,), n, dtype=torch.long, device=m.device)
    where[index] = torch.arange(n, device=m.device)
    runs, offset = [], 0
    unpack = torch.empty(n, dtype=torch.long, device=m.device)
    for rows, lr in length_runs(m, overhead):
        cols = torch.arange(lr, device=m.device)
        flat = (rows[:, None] * t + cols[None, :]).reshape(-1)
        gather = where[flat]
        real = gather < n
        unpack[gather[real]] = offset + real.nonzero().squeeze(1)
        runs.append((gather, rows.numel(), lr, lengths[rows]))
        offset += rows.numel() * lr
    return Plan(batch=b, length=t, index=index, runs=runs, unpack=unpack)


def current() -> Optional[Plan]:
    p = _PLAN.get()
    return p if p is not None and p.active else None


def activate(p: Plan):
    """Make ``p`` the plan of the forward that follows; returns the token for :func:`deactivate`."""
    return _PLAN.set(p)


def deactivate(token) -> None:
    _PLAN.reset(token)


def _run_masks(p: Plan, dtype: torch.dtype, device) -> list:
    if p.masks is None:
        p.masks = {}
    if dtype not in p.masks:
        low = torch.finfo(dtype).min
        out = []
        for _, rows, lr, lengths in p.runs:
            keep = torch.arange(lr, device=device)[None, :] < lengths[:, None]
            mask = torch.zeros(rows, 1, 1, lr, dtype=dtype, device=device).masked_fill_(~keep[:, None, None, :], low)
            out.append(mask)
        p.masks[dtype] = out
    return p.masks[dtype]


def packed_attention(p: Plan, attend, module, query, key, value, **kwargs):
    """Attention over packed ``(1, heads, N, dim)`` query/key/value: each run of rows padded to its own
    length, ``attend(module, q, k, v, mask, **kwargs)`` (an attention-interface function returning
    ``(out (rows, len, heads, dim), weights)``), and the real tokens packed back: ``((1, N, heads, dim), None)``."""
    h = query.shape[1]

    def extended(x):  # (1, h, N, d) -> (N + 1, h, d), the last row zeros (what padded positions gather)
        x = x[0].transpose(0, 1)
        return torch.cat([x, x.new_zeros(1, h, x.shape[-1])])

    qe, ke, ve = extended(query), extended(key), extended(value)
    masks = _run_masks(p, query.dtype, query.device)
    outs = []
    for (gather, rows, lr, _), mask in zip(p.runs, masks):
        q, k, v = (x.index_select(0, gather).view(rows, lr, h, -1).transpose(1, 2) for x in (qe, ke, ve))
        out, _ = attend(module, q, k, v, mask.to(q.dtype), **kwargs)
        outs.append(out.reshape(rows * lr, h, -1))
    out = torch.cat(outs).index_select(0, p.unpack)
    return out.unsqueeze(0), None


class _RunAttention(torch.autograd.Function):
    """Attention of all of a plan's runs in one autograd node: ``softmax(q k^T * scaling + key mask) @ v`` per run,
    without dropout, on packed ``(h, N, d)`` query/key/value, returning the packed ``(N, h, d)`` output.

    What the generic path does with a dozen autograd nodes a run (gathers, views, the fused function, the
    output's regrouping), each with its own backward, this does with plain ops: a run's padded q/k/v are
    gathered straight into ``(h * rows, len, d)`` batches (padded positions read a real token: their keys are
    masked, their query rows dropped), and backward returns the packed gradients by the same regrouping
    the forward's output takes."""

    @staticmethod
    def forward(ctx, query, key, value, p, scaling):
        out, saved = _run_attention(p, query, key, value, scaling, save=True)
        ctx.plan, ctx.scaling = p, scaling
        ctx.save_for_backward(*(t for run in saved for t in run))
        return out

    @staticmethod
    def backward(ctx, grad):
        p, scaling, flat = ctx.plan, ctx.scaling, ctx.saved_tensors
        saved = [flat[i:i + 4] for i in range(0, len(flat), 4)]
        _, h, d = grad.shape
        dtype = saved[0][0].dtype
        # (h, N + 1, d): the last position a zero gradient, for what padded query positions produced
        g = torch.cat([grad.to(dtype).transpose(0, 1), grad.new_zeros(h, 1, d, dtype=dtype)], 1)
        gq, gk, gv = [], [], []
        for (gather, _, rows, lr, _), (q, k, v, probs) in zip(_fast_runs(p, h, dtype, g.device), saved):
            gr = g.index_select(1, gather).view(h * rows, lr, d)
            gv.append(torch.bmm(probs.transpose(1, 2), gr).view(h, rows * lr, d))
            gs = torch._softmax_backward_data(torch.bmm(gr, v.transpose(1, 2)), probs, -1, probs.dtype).mul_(scaling)
            gq.append(torch.bmm(gs, k).view(h, rows * lr, d))
            gk.append(torch.bmm(gs.transpose(1, 2), q).view(h, rows * lr, d))
        return tuple(torch.cat(x, 1).index_select(1, p.unpack) for x in (gq, gk, gv)) + (None, None)


def _fast_runs(p: Plan, h: int, dtype: torch.dtype, device) -> list:
    """Per run: (gather with padding at the zero row, gather with padding on a real token, rows, length,
    additive key mask ``(h * rows, 1, length)`` or None where every row of the run is full)."""
    if p.fast is None:
        p.fast = {}
    if (h, dtype) not in p.fast:
        n, out = p.index.numel(), []
        for (gather, rows, lr, lengths), mask in zip(p.runs, _run_masks(p, dtype, device)):
            # the run-by-run path's (rows, 1, 1, len) masks, repeated per head; none where no row is padded
            mask = mask.view(1, rows, 1, lr).expand(h, rows, 1, lr).reshape(h * rows, 1, lr) \
                if bool((lengths < lr).any()) else None
            out.append((gather, gather.clamp(max=n - 1), rows, lr, mask))
        p.fast[(h, dtype)] = out
    return p.fast[(h, dtype)]


def _run_attention(p: Plan, query, key, value, scaling, save=False):
    """``(out (N, h, d), per run (q, k, v, softmax) where ``save``)`` for packed ``(h, N, d)`` query/key/value."""
    h, _, d = query.shape
    outs, saved = [], []
    for _, safe, rows, lr, mask in _fast_runs(p, h, query.dtype, query.device):
        q, k, v = (x.index_select(1, safe).view(h * rows, lr, d) for x in (query, key, value))
        # the generic path's ops and roundings (matmul, then scale, then mask), so both give the same values
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scaling)
        if mask is not None:
            scores = scores.add_(mask)
        probs = torch.softmax(scores, -1)
        del scores
        outs.append(torch.bmm(probs, v).view(h, rows * lr, d))
        if save:
            saved.append((q, k, v, probs))
    out = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    return out.transpose(0, 1).index_select(0, p.unpack), saved


def run_attention(p: Plan, query, key, value, scaling, dtype):
    """Attention over packed ``(1, heads, N, dim)`` query/key/value in ``dtype`` without dropout, all runs in one
    autograd node: ``((1, N, heads, dim), None)``, as an attention-interface function returns."""
    with torch.autocast(query.device.type, enabled=False):
        q, k, v = (x[0].to(dtype) for x in (query, key, value))
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out = _RunAttention.apply(q, k, v, p, float(scaling))
        else:
            out = _run_attention(p, q, k, v, float(scaling))[0]
    return out.unsqueeze(0), None


# ------------------------------------------------------------------ the layer hooks


def _pack_hook(module, args, kwargs):
    p = _PLAN.get()
    if p is None or p.active:
        return None
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != (p.batch, p.length):
        return None  # not the batch the plan was made for: this forward runs padded
    packed = hidden.reshape(p.batch * p.length, -1).index_select(0, p.index).unsqueeze(0)
    p.active = True
    if args:
        return (packed,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = packed
    return args, kwargs


def _unpack(p: Plan, packed: torch.Tensor) -> torch.Tensor:
    x = packed[0]
    full = x.new_zeros(p.batch * p.length, x.shape[-1]).index_copy(0, p.index, x)
    return full.view(p.batch, p.length, -1)


def _unpack_hook(module, args, kwargs, output):
    p = _PLAN.get()
    if p is None or not p.active:
        return None
    p.active = False
    if isinstance(output, torch.Tensor):
        return _unpack(p, output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (_unpack(p, output[0]),) + tuple(output[1:])
    raise RuntimeError(f"bitfit packing: unexpected output of {type(module).__name__}: {type(output).__name__}")


def find_layers(model: nn.Module) -> Optional[nn.ModuleList]:
    """The encoder's list of transformer layers, when ``model`` is of a family in :data:`PACK_FAMILIES` and
    has exactly one such list (an encoder-decoder or a model with two stacks gets None)."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            first = module[0]
            if module_family(first) in PACK_FAMILIES and all(type(m) is type(first) for m in module) and any(
                "Attention" in type(sub).__name__ for sub in first.modules()
            ):
                found.append(module)
    return found[0] if len(found) == 1 else None


def install(model: nn.Module) -> bool:
    """Register the pack/unpack hooks on ``model``'s first and last layer; False where the family has none."""
    layers = find_layers(model)
    if layers is None:
        return False
    remove(model)
    layers[0].register_forward_pre_hook(_pack_hook, with_kwargs=True)
    layers[-1].register_forward_hook(_unpack_hook, with_kwargs=True)
    return True


def remove(model: nn.Module) -> None:
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if fn in (_pack_hook, _unpack_hook)]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)


def wanted(kwargs: dict, model: nn.Module) -> bool:
    """The forward's inputs allow packing: a 2-D attention mask given by keyword, an encoder (not a BERT run
    as a causal decoder or with cross-attention), no request for per-layer outputs (hidden states or attention
    maps of the packed layers would not be the padded ones), and nothing inside the layers that works per row
    (dynamic biases)."""
    if DYNAMIC_ATTR in model.__dict__:  # dynamic biases pool over each row's tokens inside the layers
        return False
    config = getattr(model, "config", None)
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False) \
            or kwargs.get("encoder_hidden_states") is not None:
        return False  # causal or cross attention: the runs' masks hold key padding only
    for name in ("output_hidden_states", "output_attentions"):
        if kwargs.get(name) or (kwargs.get(name) is None and getattr(config, name, False)):
            return False
    mask = kwargs.get("attention_mask")
    return isinstance(mask, torch.Tensor) and mask.dim() == 2
