"""Folding a task into the model (:func:`merge`: a plain transformers model, added biases made
real through the architecture's config switches) and taking it out again (:func:`unmerge`: the
base bit for bit). :func:`restore_base` is also how ``load`` clears a previous task."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.prepare import STATE_ATTR, get_state, trainable_bias_param, unwrap
from ..core.sharded import gathered, is_dtensor, plain_class
from ..errors import ArtifactError
from ..fast.lean import remove as remove_lean
from ..methods.dynamic import refuse as refuse_dynamic
from ..methods.dynamic import remove as remove_dynamic
from .base import submodule
from .finite import refuse_nonfinite


def check_restorable(target: nn.Module, state) -> None:
    """Refuse before anything changes when a base value needed to restore the base was not kept."""
    missing = [s.name for s in state.trained_slots() if s.name not in state.added and s.name not in state.base]
    missing += [n for n in state.selection.head_params + state.selection.norm_weights if n not in state.base]
    if missing:
        raise ArtifactError(
            f"cannot restore the base: no copy of the base value of {len(missing)} tensor(s) was kept "
            f"(e.g. {missing[0]}); reload the base model instead"
        )


def _detach_bitfit(target: nn.Module, state, keep_trained: bool) -> None:
    """Remove norm hooks and fused-slice masks (keeping the trained values, or the base ones)."""
    for handle in state.hooks.values():
        handle.remove()
    for slot in state.trained_slots():
        module = submodule(target, slot.module_name)
        if parametrize.is_parametrized(module, "bias"):
            parametrize.remove_parametrizations(module, "bias", leave_parametrized=keep_trained)


def _drop_state(target: nn.Module) -> None:
    """A plain model again: every parameter trainable, no lean mode, no BitFit state."""
    for p in target.parameters():
        p.requires_grad_(True)
    remove_lean(target)
    object.__delattr__(target, STATE_ATTR)


@torch.no_grad()
def restore_base(target: nn.Module, state) -> None:
    """The base values back in place, added biases removed and the BitFit state dropped."""
    _detach_bitfit(target, state, keep_trained=False)
    for slot in state.trained_slots():
        module = submodule(target, slot.module_name)
        if slot.name in state.added:
            if slot.kind == "norm":
                del module._parameters["bias"]
            else:
                module.bias = None
        else:
            b = state.base[slot.name]
            module.bias.copy_(b.to(module.bias.dtype))
    params = dict(target.named_parameters())
    for name in list(state.model_map.head_params) + list(state.selection.norm_weights):
        if name in state.base:
            params[name].copy_(state.base[name].to(params[name].dtype))
    _drop_state(target)


def unmerge(model: nn.Module) -> nn.Module:
    """Turn a BitFit model back into its base, in place: the base biases and head bit for bit,
    added biases removed, every parameter trainable again, no BitFit state left."""
    target = unwrap(model)
    state = get_state(target)
    if state is None:
        raise ArtifactError("unmerge needs a BitFit model (from bitfit.apply or bitfit.load); this one has no BitFit state")
    check_restorable(target, state)
    remove_dynamic(target)
    restore_base(target, state)
    return model


def _candidate_switches(config) -> list[str]:
    d = config.to_dict() if config is not None else {}
    return sorted(k for k, v in d.items() if v is False and "bias" in k.lower())


def _meta_instance(target: nn.Module, config):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plain_class(target)(config)


def _switch_plan(target: nn.Module, state, needed: set) -> tuple[dict, set, set]:
    """Config switches that give every module in ``needed`` a bias.

    Returns (switch -> True, modules given a bias by those switches, modules still uncovered).
    Each candidate switch is tried on a meta-device instance of the model class, so what it
    does is read from the architecture's own code, not guessed.
    """
    config = getattr(target, "config", None)
    if config is None or not needed:
        return {}, set(), set(needed)
    have_bias = {n for n, m in target.named_modules() if isinstance(getattr(m, "bias", None), torch.Tensor)}
    added = {s.module_name for s in state.trained_slots() if s.name in state.added}
    base_bias = have_bias - added
    chosen, gains = {}, set()
    for flag in _candidate_switches(config):
        cfg2 = copy.deepcopy(config)
        setattr(cfg2, flag, True)
        try:
            m2 = _meta_instance(target, cfg2)
        except Exception:
            continue
        g = {n for n, m in m2.named_modules() if isinstance(getattr(m, "bias", None), torch.Tensor)} - base_bias
        if g & (needed - gains):
            chosen[flag] = True
            gains |= g
    return chosen, gains, needed - gains


def _refuse_sharded_rewrite(target: nn.Module, state, extra: list) -> None:
    """Under FSDP2 a parameter cannot be replaced or added in place (the engine holds each shard by its
    module and name): refuse, before anything changes, a merge that would do so."""
    masked = [s.name for s in state.trained_slots() if parametrize.is_parametrized(submodule(target, s.module_name),
                                                                                  "bias")]
    sharded = any(is_dtensor(p) for p in target.parameters())
    if sharded and (masked or extra):
        what = (f"{len(masked)} fused bias(es) trained in slices (e.g. {masked[0]})" if masked
                else f"{len(extra)} untrained module(s) that need a zero bias (e.g. {extra[0]})")
        raise ArtifactError(f"cannot merge this sharded (FSDP2) model in place: {what} would replace or add "
                            f"parameters the engine holds; save the artifact with bitfit.save and merge it onto the "
                            "base in one process (bitfit.load, then bitfit.merge)")


def merge(model: nn.Module) -> nn.Module:
    """Fold the BitFit task into ``model`` in place and return it as a plain transformers model.

    Fused-slice parametrizations become plain biases, added biases become real ones with the
    architecture's config switch set (``attention_bias``/``mlp_bias`` on LLaMA-style configs),
    the BitFit state is removed and every parameter is trainable again. Its ``save_pretrained``
    folder loads with ``from_pretrained`` without bitfit. Where the architecture has no place
    for an added bias (RMSNorm bias, T5 projections), merge refuses and changes nothing.
    """
    target = unwrap(model)
    state = get_state(target)
    if state is None:
        raise ArtifactError("merge needs a BitFit model (from bitfit.apply or bitfit.load); this one has no BitFit state")
    refuse_dynamic(target, "merge")
    refuse_nonfinite(target, state, "merge")
    added = [s for s in state.trained_slots() if s.name in state.added]
    arch = plain_class(target).__name__
    keep = "; keep the artifact form instead (bitfit.save, then bitfit.load onto the base)"
    norms = [s for s in added if s.kind == "norm"]
    if norms:
        cls = type(submodule(target, norms[0].module_name)).__name__
        raise ArtifactError(
            f"cannot merge: {len(norms)} added norm bias(es) (e.g. {norms[0].name}) have no place in {arch}: its "
            f"{cls} has no bias parameter and no config switch adds one{keep}"
        )
    needed = {s.module_name for s in added}
    switches, gains, uncovered = _switch_plan(target, state, needed)
    if uncovered:
        ex = sorted(uncovered)
        raise ArtifactError(
            f"cannot merge: {len(ex)} added bias(es) (e.g. {ex[0]}.bias) have no place in {arch}: no switch of its "
            f"config gives those modules a bias{keep}"
        )
    extra = sorted(gains - needed)
    _refuse_sharded_rewrite(target, state, extra)
    ref = {}
    if switches:  # the merged model must have exactly the tensors a fresh model of the new config has
        cfg2 = copy.deepcopy(target.config)
        for k, v in switches.items():
            setattr(cfg2, k, v)
        ref = {k: tuple(v.shape) for k, v in _meta_instance(target, cfg2).state_dict().items()}
    for name in extra:  # modules the switches give a bias that the task did not train: zero biases
        if f"{name}.bias" not in ref:
            raise ArtifactError(f"cannot merge: switch(es) {sorted(switches)} would also need a bias on {name}{keep}")
    trained = [trainable_bias_param(target, s.name) for s in state.trained_slots()]
    with torch.no_grad(), gathered(trained, modifier_rank=0):  # ZeRO-3: the masked biases whole while folded
        _detach_bitfit(target, state, keep_trained=True)
        for name in extra:
            m = submodule(target, name)
            w = m.weight
            m.bias = nn.Parameter(torch.zeros(ref[f"{name}.bias"], dtype=w.dtype, device=w.device))
        for k, v in switches.items():
            setattr(target.config, k, v)
    _drop_state(target)
    if switches:
        got = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        if got != ref:
            diff = sorted(set(got) ^ set(ref)) or [k for k in got if got[k] != ref.get(k)]
            warnings.warn(f"merged {arch} differs from a fresh {arch} of its config at {diff[:3]}", stacklevel=2)
    return model
