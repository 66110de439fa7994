"""Learning rates per bias role and per layer, the "halve every N epochs" schedule, and the pull of trained
norm gains toward their pretrained values (docs/TRAINING.md, "Learning rates per role and layer").

* ``role_lr_multipliers`` (``--role_lr_multipliers "query=2,ffn_out=0.5"``): the tensors of a role train at
  ``learning_rate x multiplier`` (roles as in :data:`bitfit.core.config.ROLES`; unnamed roles x 1). A norm gain
  (``train_norm_weights``) follows the role of its norm (``ln_attn``, ``ln_ffn``, ``embed_ln`` ...).
* ``layer_lr_decay`` (``--layer_lr_decay 0.9``): layer-wise decay. In a stack of ``n`` layers, layer ``i``
  (0 = lowest) trains at ``learning_rate x decay ** (n - 1 - i)``: the top layer at the base rate. Tensors
  below the stack (``embed_ln``, ``embed_proj``) get ``decay ** n``, the lowest rate; those above it
  (``pooler``, ``final_ln``, other tensors outside the layers) the base rate. Encoder and decoder stacks
  decay each from their own top layer.
* Both multiply; the task head keeps its own ``head_learning_rate`` (no multiplier, no decay).
* ``halve_every_epochs`` (``--halve_every_epochs 2``): after the usual linear warm-up (``--warmup_steps``)
  the learning rate is halved at the end of every N-th epoch: ``lr(step) = lr x warm(step) x 0.5 **
  floor(step / (N x steps_per_epoch))`` with ``warm(step) = step / warmup`` during warm-up, else 1, and
  ``steps_per_epoch`` the optimizer steps of one epoch (batches / gradient accumulation, rounded up: the
  Trainer's own count). A :class:`torch.optim.lr_scheduler.LambdaLR`; every param group is scaled alike.
* ``norm_weight_l2`` (``--norm_weight_l2 0.1``): a decoupled pull of every trained norm gain ``g`` toward its
  pretrained value ``g0``, applied after each optimizer step like AdamW's weight decay but toward ``g0``:
  ``g <- g - lr x lambda x (g - g0)`` with the gain's current group learning rate. Not added to the loss.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..core.config import HEAD, ROLES
from ..errors import BitFitConfigError

# `bitfit compare`'s bitfit-rolelr preset: the paper (sec. 4, fig. 2) finds that b_q and b_m2 (query and the
# FFN's intermediate projection, role ffn_in) change most; they get twice the learning rate of the others.
PAPER_ROLE_LR = "query=2,ffn_in=2"
BELOW_STACK_ROLES = ("embed_ln", "embed_proj")  # layer_lr_decay: the lowest rate


def check_factor(flag: str, value) -> float:
    """``value`` as a float if it is a finite number > 0, else a one-line BitFitConfigError naming ``flag``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BitFitConfigError(f"{flag}: {value!r} is not a number") from None
    if isinstance(value, bool) or not math.isfinite(v) or v <= 0:
        raise BitFitConfigError(f"{flag} must be a finite number > 0, got {value!r}")
    return v


def parse_role_multipliers(spec: Union[None, str, dict]) -> dict:
    """``"query=2,ffn_out=0.5"`` (or a dict) -> ``{"query": 2.0, "ffn_out": 0.5}``; errors for unknown roles,
    malformed parts, repeated roles and factors that are not finite and > 0."""
    if spec is None:
        return {}
    flag = "--role_lr_multipliers"
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise BitFitConfigError(f"{flag}: {part.strip()!r} must look like ROLE=FACTOR (e.g. query=2,ffn_out=0.5)")
            role, value = part.split("=", 1)
            items.append((role.strip(), value.strip()))
    else:
        raise BitFitConfigError(f"{flag} must be a string like 'query=2,ffn_out=0.5' or a dict, got {spec!r}")
    out: dict = {}
    for role, value in items:
        if role == HEAD:
            raise BitFitConfigError(f"{flag}: the head has its own learning rate; use --head_learning_rate")
        if role not in ROLES:
            raise BitFitConfigError(f"{flag}: unknown role {role!r}; known roles: {', '.join(ROLES)}")
        if role in out:
            raise BitFitConfigError(f"{flag}: role {role!r} is given twice")
        out[role] = check_factor(f"{flag} {role}", value)
    return out


def _layer_factor(slot, n_layers: dict, decay: Optional[float]) -> float:
    if not decay or decay == 1.0:
        return 1.0
    n = n_layers.get(slot.stack) or (max(n_layers.values()) if n_layers else 0)
    if slot.layer is not None:
        return decay ** (n - 1 - slot.layer)
    if any(r in BELOW_STACK_ROLES for r in slot.roles):
        return decay ** n
    return 1.0


def lr_factors(model: nn.Module, role_multipliers: Optional[dict] = None,
               layer_lr_decay: Optional[float] = None) -> dict:
    """``id(parameter) -> learning-rate factor`` for every trained bias and norm gain of the BitFit model
    ``model`` (head parameters are not in it). A fused bias (GPT-2's c_attn ...) is one tensor, so its trained
    roles must share one multiplier; otherwise a BitFitConfigError."""
    from ..core.prepare import get_state, trainable_bias_param, unwrap

    target = unwrap(model)
    state = get_state(target)
    if state is None:
        raise BitFitConfigError("--role_lr_multipliers / --layer_lr_decay need a BitFit model (bitfit.apply): they "
                                "group its biases by role and layer; they do not apply to full fine-tuning")
    mult = dict(role_multipliers or {})
    if layer_lr_decay is not None:
        layer_lr_decay = check_factor("--layer_lr_decay", layer_lr_decay)
    n_layers = state.model_map.n_layers
    if layer_lr_decay not in (None, 1.0) and not n_layers:
        raise BitFitConfigError("--layer_lr_decay: this model has no numbered layer stack to decay over")
    params = dict(target.named_parameters())
    out: dict = {}
    for slot in state.model_map.slots:
        roles = state.selection.chosen.get(slot.name)
        gain = f"{slot.module_name}.weight"
        gain = gain if gain in state.selection.norm_weights else None
        if not roles and gain is None:
            continue
        roles = roles or tuple(slot.roles)
        fs = {mult.get(r, 1.0) for r in roles}
        if len(fs) > 1:
            raise BitFitConfigError(
                f"--role_lr_multipliers: {slot.name} holds roles {', '.join(roles)} in one tensor, which can have "
                f"only one learning rate; give them the same multiplier")
        f = fs.pop() * _layer_factor(slot, n_layers, layer_lr_decay)
        if slot.name in state.selection.chosen:
            out[id(trainable_bias_param(target, slot.name))] = f
        if gain is not None:
            out[id(params[gain])] = f
    return out


def trained_roles(model: nn.Module) -> set:
    """Roles with a trained tensor (bias or norm gain) in the BitFit model ``model``."""
    from ..core.prepare import get_state

    state = get_state(model)
    out = {r for roles in state.selection.chosen.values() for r in roles}
    for slot in state.model_map.slots:
        if f"{slot.module_name}.weight" in state.selection.norm_weights:
            out.update(slot.roles)
    return out


# ----------------------------------------------------------------------------- halving schedule
def steps_per_epoch(n_batches: int, gradient_accumulation_steps: int = 1) -> int:
    """Optimizer steps of one epoch of ``n_batches`` batches: transformers.Trainer's count (the last, shorter
    accumulation of an epoch is a step too)."""
    ga = max(1, int(gradient_accumulation_steps))
    return max(n_batches // ga + int(n_batches % ga > 0), 1)


def halving_lambda(warmup_steps: int, period: int):
    """The LambdaLR factor of step ``t``: linear warm-up over ``warmup_steps``, times 0.5 per full ``period``."""
    warmup_steps, period = int(warmup_steps), max(1, int(period))

    def factor(step: int) -> float:
        warm = step / max(1, warmup_steps) if step < warmup_steps else 1.0
        return warm * 0.5 ** (step // period)

    return factor


def halving_scheduler(optimizer, warmup_steps: int, period: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, halving_lambda(warmup_steps, period))


def halving_period(halve_every_epochs: float, steps_in_epoch: int) -> int:
    """Optimizer steps between two halvings: ``N x steps_in_epoch`` rounded half up, at least 1."""
    return max(1, math.floor(check_factor("--halve_every_epochs", halve_every_epochs) * steps_in_epoch + 0.5))


# ----------------------------------------------------------------------------- norm-gain pull
def add_norm_pull(optimizer, model: nn.Module, strength: float):
    """After every step of ``optimizer``: ``g <- g - lr x strength x (g - g0)`` for each trained norm gain ``g``
    of ``model`` (``g0`` its pretrained value, ``lr`` its param group's current learning rate). Returns the
    hook handle; None when the model trains no norm gain."""
    from ..core.prepare import get_state, unwrap

    strength = check_factor("--norm_weight_l2", strength)
    target = unwrap(model)
    state = get_state(target)
    if state is None or not state.selection.norm_weights:
        raise BitFitConfigError("--norm_weight_l2 pulls trained norm gains toward their pretrained values: it needs "
                                "--train_norm_weights")
    params = dict(target.named_parameters())
    gains = {id(params[n]): (params[n], state.base[n]) for n in state.selection.norm_weights}

    @torch.no_grad()
    def pull(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                hit = gains.get(id(p))
                if hit is not None:
                    p.sub_((p - hit[1].to(p.device, p.dtype)) * (group["lr"] * strength))

    return optimizer.register_step_post_hook(pull)


__all__ = ["PAPER_ROLE_LR", "parse_role_multipliers", "check_factor", "lr_factors", "trained_roles",
           "steps_per_epoch", "halving_lambda", "halving_scheduler", "halving_period", "add_norm_pull"]
