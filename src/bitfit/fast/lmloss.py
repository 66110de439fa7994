"""Causal-LM loss without the full logits: the LM head and cross-entropy in chunks of tokens.

A causal LM's plain training loss builds ``[batch, seq, vocab]`` logits (151,936 columns on Qwen2.5),
a float32 copy, the log-softmax and its gradient: at seq 256 and batch 2 that is about 1.2 GB, more
than everything else a BitFit step keeps. Here the head and the loss are computed together:

- only the positions whose (shifted) label is not ``ignore_index`` are projected at all (instruction
  tuning labels only the response tokens);
- those rows go through the head in chunks of ``chunk_size`` tokens; each chunk's logits give the
  chunk's loss (``logsumexp - logit[target]``) and, in the same pass, their gradient
  ``(softmax - onehot) / n``, which is multiplied by the head weight at once: what is kept for
  backward is the hidden-state gradient of the selected rows (``[n, hidden]``), never logits or their
  gradient. Backward only scales it by the incoming gradient. (The technique of Liger-Kernel's fused
  linear cross-entropy and torchtune's chunked output loss, written here for BitFit.)
- A tied or frozen head needs no weight gradient (BitFit never trains a tied ``lm_head``); a trained
  head weight or bias gets its float32 gradient accumulated chunk by chunk.

Numerics follow the plain path op for op: the head matmul runs in the dtype autocast gives it
(``frozen_dtype="bfloat16"``: bf16 logits, upcast to float32 for the loss), the logit gradient is
rounded to that dtype before the input-gradient matmul, and under ``frozen_dtype="int8"`` the head's
training matmuls are the same row-wise int8 products :mod:`bitfit.fast.lean` runs (its quantization is per
token row, so chunking changes nothing). Loss and gradients equal the plain path's to float
tolerance (tests/test_lmloss.py).

:func:`model_loss` runs a Hugging Face causal LM this way (the Trainer of ``bitfit train --task
instruct`` uses it): the model's own forward runs (wrappers, autocast, lean modes, gradient
checkpointing, DDP all as usual) with the hidden states taken at the head's input and the head handed
an empty sequence; the loss follows the Hugging Face conventions (mean over label tokens, or the sum
over ``num_items_in_batch`` for gradient accumulation).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from ..errors import BitFitError

IGNORE_INDEX = -100
LOGITS_BUDGET = 32 * 2**20  # bytes of float32 logits per chunk (chunk_size default)
MAX_CHUNK = 4096

# causal-LM families whose head is a plain projection of the final hidden states (no logit soft-capping
# or scaling after it): the loss can be computed from the head's input
FAMILIES = {
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "bloom", "opt", "gpt_neox", "smollm3", "olmo", "olmo2",
    "phi3", "stablelm", "starcoder2", "gpt_bigcode", "gptj", "falcon",
}


def enabled() -> bool:
    """False when ``BITFIT_LM_LOSS=plain`` asks for the plain loss (full logits) in ``bitfit train``."""
    return os.environ.get("BITFIT_LM_LOSS", "chunked").strip().lower() != "plain"


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk: at most ``LOGITS_BUDGET`` bytes of float32 logits, a multiple of 16 rows (48 at a
    151,936-token vocab, 160 at 49,152)."""
    n = LOGITS_BUDGET // (4 * max(1, vocab_size))
    return int(max(16, min(MAX_CHUNK, n // 16 * 16)))


class _Int8Head:
    """The int8 training matmuls of a frozen Linear head (bitfit.fast.lean): weight, row scales, output dtype."""

    def __init__(self, wq: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype):
        self.wq, self.w_scale, self.out_dtype = wq, w_scale, out_dtype

    def logits(self, h: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        from .int8 import rowwise_int8

        xq, xs = rowwise_int8(h)
        y = torch._int_mm(xq, self.wq.t()).float().mul_(xs).mul_(self.w_scale)
        if bias is not None:
            y.add_(bias.float())
        return y.to(self.out_dtype)

    def grad_input(self, g: torch.Tensor) -> torch.Tensor:
        from .int8 import rowwise_int8

        gq, gs = rowwise_int8(g.to(self.out_dtype).float(), self.w_scale)
        return torch._int_mm(gq, self.wq).float().mul_(gs)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h @ W^T + b, target) * scale, with the gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, scale, chunk, cdtype, int8, need_grad):
        n = h.shape[0]
        w_c = weight if weight.dtype == cdtype else weight.to(cdtype)
        b_c = None if bias is None else (bias if bias.dtype == cdtype else bias.to(cdtype))
        gh = torch.empty_like(h) if need_grad[0] else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad[1] else None
        gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_grad[2] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        any_grad = any(need_grad)
        for s in range(0, n, chunk):
            hc = h[s: s + chunk]
            tc = targets[s: s + chunk]
            if int8 is not None:
                logits = int8.logits(hc, bias).float()
            else:
                hc_c = hc if hc.dtype == cdtype else hc.to(cdtype)
                logits = nn.functional.linear(hc_c, w_c, b_c).float()  # the plain path's logits.float()
            # log-sum-exp and softmax in place: one [chunk, vocab] float32 buffer
            picked = logits.gather(1, tc[:, None]).squeeze(1)
            top = logits.amax(dim=1, keepdim=True)
            g = logits.sub_(top).exp_()
            denom_c = g.sum(dim=1, keepdim=True)
            total += (top.squeeze(1) + denom_c.log().squeeze(1) - picked).sum()
            del logits
            if not any_grad:
                continue
            g.div_(denom_c)  # softmax
            g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
            g.mul_(scale)
            if gb is not None:
                gb += g.to(cdtype).float().sum(0) if int8 is None else g.to(int8.out_dtype).float().sum(0)
            if int8 is not None:
                if gh is not None:
                    gh[s: s + chunk] = int8.grad_input(g).to(h.dtype)
                continue
            g_c = g.to(cdtype)  # the plain path rounds the logit gradient to the head's dtype
            del g
            if gh is not None:
                gh[s: s + chunk] = (g_c @ w_c).to(h.dtype)
            if gw is not None:
                hc_c = hc if hc.dtype == cdtype else hc.to(cdtype)
                gw += (g_c.t() @ hc_c).float()
        ctx.save_for_backward(*(t for t in (gh, gw, gb) if t is not None))
        ctx.which = tuple(t is not None for t in (gh, gw, gb))
        ctx.wdtype = weight.dtype
        ctx.bdtype = None if bias is None else bias.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        gh, gw, gb = (saved.pop(0) if has else None for has in ctx.which)
        if gh is not None:
            gh = gh * grad_out.to(gh.dtype)
        if gw is not None:
            gw = (gw * grad_out).to(ctx.wdtype)
        if gb is not None:
            gb = (gb * grad_out).to(ctx.bdtype)
        return gh, gw, gb, None, None, None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, *, shift: bool = True, ignore_index: int = IGNORE_INDEX,
                    num_items_in_batch=None, chunk_size: Optional[int] = None,
                    compute_dtype: Optional[torch.dtype] = None, int8: Optional[_Int8Head] = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight^T (+ bias)`` against ``labels`` without materialising the logits.

    hidden: ``[..., seq, hidden]`` (``[batch, seq, hidden]``), labels ``[..., seq]``; with ``shift``
    (the causal-LM convention) position t predicts label t+1. Only positions whose target is not
    ``ignore_index`` are projected. Reduction as Hugging Face's causal-LM loss: the mean over target
    tokens, or their sum divided by ``num_items_in_batch`` when given (gradient accumulation). A batch
    without any target token gives a loss of 0 with zero gradients (the plain mean gives NaN).

    compute_dtype: the dtype of the head matmul (default: ``weight``'s, or autocast's when enabled);
    logits are upcast to float32 for the loss. The gradient reaches ``hidden`` (and ``weight`` /
    ``bias`` where they require it); nothing of size ``[tokens, vocab]`` is kept for backward.
    """
    if hidden.shape[:-1] != labels.shape:
        raise BitFitError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise BitFitError(f"head weight {tuple(weight.shape)} does not fit hidden size {hidden.shape[-1]}")
    labels = labels.to(hidden.device)
    if shift:
        labels = nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    idx = (y != ignore_index).nonzero().squeeze(1)
    h_sel = h.index_select(0, idx)
    targets = y.index_select(0, idx)
    n = int(idx.numel())
    if num_items_in_batch is not None:
        denom = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    else:
        denom = float(n)
    scale = 1.0 / denom if denom > 0 else 0.0
    if compute_dtype is None:
        dev = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    chunk = int(chunk_size or default_chunk_size(weight.shape[0]))
    grad_on = torch.is_grad_enabled()
    need = (grad_on and h_sel.requires_grad, grad_on and weight.requires_grad,
            grad_on and bias is not None and bias.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(h_sel, weight, bias, targets, scale, max(1, chunk),
                                                compute_dtype, int8, need)


def plain_lm_loss(hidden, weight, labels, bias=None, *, ignore_index: int = IGNORE_INDEX, num_items_in_batch=None,
                  compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The reference: full logits, then Hugging Face's causal-LM loss (shifted, float32)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    dt = compute_dtype or weight.dtype
    logits = nn.functional.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    return ForCausalLMLoss(logits, labels, weight.shape[0], num_items_in_batch=num_items_in_batch,
                           ignore_index=ignore_index)


# ------------------------------------------------------------------ Hugging Face models


def _base(model: nn.Module) -> nn.Module:
    from ..core.prepare import bitfit_model, unwrap

    return bitfit_model(model) or unwrap(model)  # a BitFit peft model: the transformers model inside


def applies(model: nn.Module) -> bool:
    """Whether :func:`model_loss` can compute ``model``'s loss: a causal LM of a known family whose head
    is a plain projection of the final hidden states."""
    base = _base(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in FAMILIES or getattr(config, "is_encoder_decoder", False):
        return False
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return False
    try:
        head = base.get_output_embeddings()
    except Exception:
        return False
    return isinstance(head, nn.Linear) and head.weight.dim() == 2


class _HeadInput:
    """Forward pre-hook on the head: keeps its input (the final hidden states), the dtype autocast would run
    it in and whether its int8 training matmuls would, and hands the head an empty sequence instead."""

    def __init__(self):
        self.hidden = None
        self.calls = 0
        self.cdtype = None
        self.int8 = None

    def __call__(self, module, args):
        if not args or not torch.is_tensor(args[0]) or args[0].dim() < 2:
            return None
        x = args[0]
        self.calls += 1
        self.hidden = x
        dev = x.device.type
        autocast = torch.is_autocast_enabled(dev)
        self.cdtype = torch.get_autocast_dtype(dev) if autocast else module.weight.dtype
        from .int8 import INT8_S, INT8_W, Int8Forward

        wq = module._buffers.get(INT8_W)
        if (wq is not None and isinstance(module.__dict__.get("forward"), Int8Forward) and module.training
                and torch.is_grad_enabled() and x.is_floating_point() and x.device.type == "cpu"
                and x.device == wq.device):
            self.int8 = _Int8Head(wq, module._buffers[INT8_S], self.cdtype if autocast else x.dtype)
        else:
            self.int8 = None
        return (x.narrow(x.dim() - 2, 0, 0),) + tuple(args[1:])


def model_loss(model: nn.Module, inputs: dict, num_items_in_batch=None, chunk_size: Optional[int] = None):
    """``(loss, outputs)`` of a Hugging Face causal LM on ``inputs`` (with ``labels``), the loss computed by
    :func:`chunked_lm_loss` from the head's input instead of full logits.

    ``model`` is called as usual (any wrapper: DDP, accelerate) with the labels removed; ``outputs`` is
    a ``CausalLMOutputWithPast`` holding only the loss (the logits were never computed).
    ``num_items_in_batch``: as the Trainer passes it (sum over it instead of the mean).
    """
    if "labels" not in inputs:
        raise BitFitError("model_loss needs labels in the inputs")
    base = _base(model)
    head = base.get_output_embeddings()
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    inputs.pop("num_items_in_batch", None)
    inputs.setdefault("use_cache", False)  # a training or eval-loss forward needs no key/value cache
    hook = _HeadInput()
    handle = head.register_forward_pre_hook(hook)
    try:
        outputs = model(**inputs)
    finally:
        handle.remove()
    if hook.calls != 1 or hook.hidden is None or hook.hidden.shape[:-1] != labels.shape:
        raise BitFitError(f"{type(base).__name__}: the LM head saw {hook.calls} call(s) "
                          f"{'' if hook.hidden is None else tuple(hook.hidden.shape)} for labels "
                          f"{tuple(labels.shape)}; this model's loss cannot be computed from the head's input")
    loss = chunked_lm_loss(hook.hidden, head.weight, labels, head.bias, num_items_in_batch=num_items_in_batch,
                           chunk_size=chunk_size, compute_dtype=hook.cdtype, int8=hook.int8)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return loss, CausalLMOutputWithPast(loss=loss)
