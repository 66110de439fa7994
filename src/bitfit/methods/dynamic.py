"""Dynamic biases: ``b(x) = b + delta(x)``, a per-input shift of a BitFit bias.

Each targeted Linear/Conv1D of a BitFit model gets a tiny low-rank net on its own input ``x``:
``delta(x) = U · pool(D · x)`` with ``D`` (rank x d_in, random) and ``U`` (d_out x rank, **zero**), so
``delta = 0`` and the outputs are the BitFit model's until training moves ``U``. ``pool`` averages over the
sequence, with the attention mask when the layer's input has the model's [batch, seq] shape:

* ``"mean"``: over all (unmasked) tokens of the row: one shift per row (encoders, classification);
* ``"causal"``: a running mean over tokens ``0..t``, one shift per position, so position ``t`` sees no later
  token (a causal LM must not: the loss would read the future). A 2-D input (BERT's pooler) is its own pool.

``pool="auto"`` picks ``"causal"`` for the stacks of a model that generates (every stack of a decoder-only
LM, the decoder of an encoder-decoder) and ``"mean"`` elsewhere. With a key/value cache (``generate``) each
call pools only the tokens it is given: generate with ``use_cache=False`` for the exact running mean.

What trains: the BitFit selection (biases + head) plus every ``D`` and ``U``. The free merge is gone: a
shift that depends on the input is no bias, so :func:`bitfit.merge` and :func:`bitfit.save` (whose artifact
holds static biases only) refuse such a model; :func:`save` writes every trained tensor to one safetensors
file instead and :func:`remove` takes the nets off again (``bitfit.unmerge`` does too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..core.prepare import DYNAMIC_ATTR
from ..errors import ArtifactError, BitFitConfigError

ATTR = "bitfit_dynamic"  # the net's name on the module it shifts
WEIGHTS = "dynamic_bias.safetensors"
POOLS = ("auto", "mean", "causal")
# (bitfit.fast.packing.wanted keeps a model that holds it on padded layers: the pools need rows)


class DynamicBias(nn.Module):
    """``delta(x) = pool(x @ D^T) @ U^T`` for a layer with ``d_in`` inputs and ``d_out`` outputs."""

    def __init__(self, d_in: int, d_out: int, rank: int, causal: bool, generator: torch.Generator, device=None):
        super().__init__()
        bound = d_in ** -0.5  # nn.Linear's default range
        self.down = nn.Parameter((torch.rand(rank, d_in, generator=generator) * 2 - 1).mul_(bound).to(device))
        self.up = nn.Parameter(torch.zeros(d_out, rank, device=device))
        self.causal = causal
        self._ctx: dict = {}

    def extra_repr(self) -> str:
        return f"d_in={self.down.shape[1]}, rank={self.down.shape[0]}, d_out={self.up.shape[0]}, " \
               f"pool={'causal' if self.causal else 'mean'}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(self.down.dtype) @ self.down.t()  # pool after the projection: the same, rank/d_in the work
        if z.dim() >= 3:
            mask = self._ctx.get("mask")
            m = mask.to(z.dtype)[..., None] if mask is not None and tuple(mask.shape) == tuple(z.shape[:2]) \
                else torch.ones_like(z[..., :1])
            if self.causal:
                z = (z * m).cumsum(1) / m.cumsum(1).clamp_min(1.0)
            else:
                z = (z * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
        return z @ self.up.t()


def _shift(module: nn.Module, inputs, output):
    return output + getattr(module, ATTR)(inputs[0]).to(output.dtype)


def _keep_mask(ctx: dict):
    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        ctx["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    return hook


def _dims(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return int(w.shape[0]), int(w.shape[1])  # transformers' Conv1D: weight [in, out]


def _causal_stacks(model: nn.Module) -> Optional[str]:
    """'all' (decoder-only LM), 'decoder' (encoder-decoder LM) or None: the stacks whose pool is causal."""
    can = getattr(model, "can_generate", None)
    if not (callable(can) and can()):
        return None
    return "decoder" if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "all"


def has_dynamic(model: nn.Module) -> bool:
    from ..core.prepare import unwrap

    return any(isinstance(m, DynamicBias) for m in unwrap(model).modules())


def refuse(model: nn.Module, doing: str) -> None:
    """A one-line error when ``model`` has dynamic biases (``doing``: "merge", "save" ...)."""
    if has_dynamic(model):
        raise ArtifactError(
            f"cannot {doing}: this model has dynamic biases (bitfit.methods.dynamic): their shift depends on the input, "
            "so it is neither a static bias nor foldable into the weights. Save every trained tensor with "
            "bitfit.methods.dynamic.save(model, folder), or bitfit.methods.dynamic.remove(model) to drop the nets"
        )


def apply_dynamic(model: nn.Module, rank: int = 4, targets: Union[None, str, Sequence[str]] = None,
                  pool: str = "auto", seed: int = 0, **bitfit_options) -> nn.Module:
    """BitFit (``bitfit.apply(model, **bitfit_options)``, unless ``model`` is a BitFit model already) plus a
    dynamic shift on every selected Linear/Conv1D bias of ``targets`` (roles, e.g. ``["query", "ffn_in"]``
    or ``"query+ffn_in"``; default: all of them). A fused bias of which only some slices train (GPT-2's
    ``c_attn`` under ``paper-subset``) gets no net. ``seed`` draws the ``D`` matrices (its own generator).
    Returns ``model``; outputs are unchanged until training."""
    from ..core.config import ROLES
    from ..core.prepare import apply, get_state, unwrap

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise BitFitConfigError(f"dynamic biases: rank must be an int >= 1, got {rank!r}")
    if pool not in POOLS:
        raise BitFitConfigError(f"dynamic biases: pool={pool!r}; use one of {', '.join(POOLS)}")
    if isinstance(targets, str):
        targets = [t for t in targets.replace("+", ",").split(",") if t.strip()]
    targets = None if targets is None else [t.strip() for t in targets]
    bad = [t for t in targets or () if t not in ROLES]
    if bad or targets == []:
        raise BitFitConfigError(f"dynamic biases: targets {bad or targets} are not roles; known roles: "
                                f"{', '.join(ROLES)}")
    target = unwrap(model)
    if has_dynamic(target):
        raise BitFitConfigError("this model already has dynamic biases")
    state = get_state(target)
    if state is None:
        apply(target, **bitfit_options)
        state = get_state(target)
    elif bitfit_options:
        raise BitFitConfigError("the model is a BitFit model already: pass no BitFit options to apply_dynamic")
    causal_in = _causal_stacks(target) if pool == "auto" else ("all" if pool == "causal" else None)
    gen = torch.Generator().manual_seed(int(seed))
    slots = []
    for slot in state.trained_slots():
        roles = state.selection.chosen[slot.name]
        if slot.kind not in ("linear", "conv1d") or slot.name in state.partial:
            continue
        if targets is not None and not set(roles) & set(targets):
            continue
        slots.append(slot)
    if not slots:
        which = f"has a role in {targets}" if targets else "to shift"
        raise BitFitConfigError(f"dynamic biases: no Linear/Conv1D bias of the selection {which} in this "
                                f"{state.model_map.family} model (LLaMA-style models need add_missing=True)")
    ctx: dict = {"handles": []}
    for slot in slots:
        module = target.get_submodule(slot.module_name)
        d_in, d_out = _dims(module)
        causal = causal_in == "all" or (causal_in == "decoder" and slot.stack == "decoder")
        net = DynamicBias(d_in, d_out, rank, causal, gen, device=module.weight.device)
        net._ctx = ctx
        module.add_module(ATTR, net)
        ctx["handles"].append(module.register_forward_hook(_shift))
    ctx["handles"].append(target.register_forward_pre_hook(_keep_mask(ctx), with_kwargs=True))
    object.__setattr__(target, DYNAMIC_ATTR, ctx)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Take the dynamic nets off ``model`` (the BitFit part stays); a no-op on a model without them."""
    from ..core.prepare import unwrap

    target = unwrap(model)
    ctx = target.__dict__.pop(DYNAMIC_ATTR, None)
    for handle in (ctx or {}).get("handles", ()):
        handle.remove()
    for m in target.modules():
        if isinstance(getattr(m, ATTR, None), DynamicBias):
            delattr(m, ATTR)
    return model


def trained_tensors(model: nn.Module) -> dict:
    """name -> every trainable tensor (biases, dynamic nets, head) of ``model``, on the CPU."""
    from ..core.prepare import unwrap

    return {n: p.detach().cpu().contiguous() for n, p in unwrap(model).named_parameters() if p.requires_grad}


def save(model: nn.Module, folder) -> Path:
    """Write every trained tensor of a dynamic-bias model to ``folder/dynamic_bias.safetensors`` (plain
    parameter names; ``load_state_dict(strict=False)`` onto the same base prepared with the same
    :func:`apply_dynamic` options puts them back). Not a BitFit artifact: it does not merge."""
    import safetensors.torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS + ".tmp")
    safetensors.torch.save_file(trained_tensors(model), str(tmp), metadata={"bitfit": "dynamic-bias"})
    os.replace(tmp, folder / WEIGHTS)
    return folder


__all__ = ["DynamicBias", "apply_dynamic", "remove", "save", "has_dynamic", "refuse", "trained_tensors", "POOLS"]
