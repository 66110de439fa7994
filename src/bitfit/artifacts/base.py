"""The frozen base an artifact belongs to: its fingerprint (which base a task was trained on),
the body prefix of its parameter names, where a saved bias slot sits in a model, and the base
(pre-task) value of a slot that a stored difference applies to."""

from __future__ import annotations

import hashlib
import warnings
from typing import Optional

import torch
from torch import nn

from ..core.prepare import get_state, unwrap
from ..core.roles import discover
from ..core.sharded import full_numel, full_shape, sample_bits
from ..errors import ArtifactError

_SAMPLE = 1024  # elements per frozen tensor that enter the fingerprint


def body_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The transformer body (``model.<base_model_prefix>``) and the prefix of its names in ``model``."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    sub = getattr(model, prefix, None) if prefix else None
    if isinstance(sub, nn.Module) and sub is not model:
        return sub, prefix + "."
    return model, ""


def fingerprint(model: nn.Module) -> str:
    """Hash of a deterministic sample of every frozen weight of the model's body.

    Bias slots, the head and parametrization internals are left out, so the fingerprint is
    the same before and after ``bitfit.apply``/``load`` and for any head class over the same
    body. Values are rounded to bfloat16 first: the same weights stored in float32 or bfloat16
    give the same fingerprint.
    """
    target = unwrap(model)
    state = get_state(target)
    mm = state.model_map if state is not None else discover(target)
    skip = {s.name for s in mm.slots} | set(mm.head_params)
    kept = {}
    if mm.pooler_head:  # an untrained pooler in the head: its weight is hashed all the same, from its base
        # value (the tensors hashed do not depend on pooler_head, nor on training)
        weights = {n for n in mm.head_params if n.startswith(f"{mm.pooler_head}.") and not n.endswith(".bias")}
        skip -= weights
        kept = {n: state.base[n] for n in weights if state is not None and n in state.base}
    # trained norm gains count with their pretrained values
    kept.update({n: state.base[n] for n in (state.selection.norm_weights if state is not None else ())})
    body, prefix = body_of(target)
    hashed, samples = [], []
    for name, p in sorted(body.named_parameters(), key=lambda kv: kv[0]):
        if prefix + name in skip or ".parametrizations." in name or p.is_meta:
            continue
        t = kept.get(prefix + name, p)
        n = full_numel(t)
        idx = torch.arange(_SAMPLE, dtype=torch.int64) * (n - 1) // (_SAMPLE - 1) if n > _SAMPLE else None
        hashed.append(f"{name}:{full_shape(p)}\n".encode())
        samples.append((t, idx))
    # a sharded (FSDP2 / ZeRO-3) weight is sampled from the ranks' shards, never gathered: same values, same hash
    h = hashlib.sha256()
    for head, bits in zip(hashed, sample_bits(samples)):
        h.update(head)
        h.update(bits.numpy().tobytes())
    return f"sha256:{h.hexdigest()[:32]}"


def submodule(model: nn.Module, module_name: str) -> nn.Module:
    """The module ``module_name`` of ``model`` (``""``: the model itself)."""
    return model.get_submodule(module_name) if module_name else model


def locate(model: nn.Module, slot_name: str, saved_prefix: str = "") -> Optional[str]:
    """``slot_name`` as it is called in ``model`` (adds/strips the body prefix), or None."""
    mod_name = slot_name.rsplit(".", 1)[0] if "." in slot_name else ""
    own_prefix = body_of(model)[1]
    cands = [mod_name]
    if saved_prefix and mod_name.startswith(saved_prefix):
        cands.append(own_prefix + mod_name[len(saved_prefix):])
    elif own_prefix and not mod_name.startswith(own_prefix):
        cands.append(own_prefix + mod_name)
    for c in cands:
        try:
            submodule(model, c)
            return f"{c}.bias" if c else "bias"
        except AttributeError:
            continue
    return None


def base_value(model: nn.Module, slot_name: str) -> Optional[torch.Tensor]:
    """The base (pre-task) value of a bias slot of ``model`` in float32 on CPU, or None if the base has none."""
    state = get_state(model)
    if state is not None:
        if slot_name in state.added:
            return None
        if slot_name in state.base:
            return state.base[slot_name].detach().float().cpu()
        if slot_name in state.partial:
            mod = submodule(model, slot_name.rsplit(".", 1)[0])
            return mod.parametrizations.bias[0].frozen.detach().float().cpu()
        if slot_name in state.selection.chosen:
            return None  # trained but no copy of the base kept: stored as a value
    mod = submodule(model, slot_name.rsplit(".", 1)[0] if "." in slot_name else "")
    b = getattr(mod, "bias", None)
    if not isinstance(b, torch.Tensor):
        return None
    return b.detach().float().cpu()


def check_fingerprint(model: nn.Module, meta: dict, strict: bool, where, got: Optional[str] = None) -> None:
    """Refuse (``strict``) or warn when ``model``'s frozen weights are not the base the artifact ``meta`` names.
    ``got``: ``fingerprint(model)`` when the caller has it already (computed once for a model it never writes)."""
    want = meta["base_model"].get("fingerprint")
    if not want:
        return
    got = got or fingerprint(model)
    if got == want:
        return
    name = meta["base_model"].get("name") or meta["base_model"].get("architecture")
    msg = (
        f"the artifact {where} was trained on base model {name!r} (fingerprint {want}) but this model's frozen "
        f"weights differ (fingerprint {got}); load it onto {name!r}"
    )
    if strict:
        raise ArtifactError(msg + ", or pass strict=False to load anyway")
    warnings.warn(msg + "; loading anyway because strict=False", stacklevel=3)
