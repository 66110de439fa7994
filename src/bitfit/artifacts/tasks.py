"""One task's full tensors over a frozen base (:class:`TaskTensors`): every trained bias as its
full float32 value, the added slots and the head, from an artifact or a BitFit model in memory.
A bias bank (``bitfit.serving``) builds its tasks from these."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.prepare import bias_tensor, get_state, unwrap
from ..core.roles import discover
from ..errors import ArtifactError
from .base import base_value, check_fingerprint, locate
from .finite import check_finite
from .format import TaskTensors
from .read import read_artifact, slot_value
from .saving import meta_of


def _meta_summary(meta: dict) -> dict:
    head = meta["head"]
    id2label = head.get("id2label")
    return {
        "num_labels": head.get("num_labels"),
        "id2label": {int(k): v for k, v in id2label.items()} if id2label else None,
        "label2id": head.get("label2id"),
        "problem_type": head.get("problem_type"),
        "fingerprint": meta["base_model"].get("fingerprint"),
        "base_name": meta["base_model"].get("name"),
        "base_prefix": meta["base_model"].get("prefix", ""),
        "architecture": meta["base_model"].get("architecture"),
        "bitfit_config": meta["bitfit_config"],
        "slots": meta["slots"],
        "dtype": meta.get("dtype"),
    }


_NO_GAINS = ("{where} trained norm gains (train_norm_weights): a bias bank (and bitfit serve, which uses one) swaps biases "
             "and heads only; use bitfit.load (or merge) for it")


def task_tensors(base_model: nn.Module, source, strict: bool = True, base_fingerprint: Optional[str] = None
                 ) -> TaskTensors:
    """Full float32 bias values, added slots and head of one task over ``base_model``.

    ``source``: an artifact folder, an :class:`Artifact`, or a BitFit model in memory.
    ``base_model`` (a plain or BitFit model over the same body) supplies the base values the
    artifact's differences apply to; it is not modified. Slot names are those of the saved
    model; ``meta["base_prefix"]`` is its body prefix (e.g. ``"bert."``). ``base_fingerprint``:
    :func:`fingerprint` of ``base_model`` when the caller keeps it (a bias bank computes it once).
    """
    base = unwrap(base_model)
    if isinstance(source, nn.Module):
        src = unwrap(source)
        state = get_state(src)
        if state is None:
            raise ArtifactError("task_tensors: the source model is not a BitFit model (no bitfit.apply on it)")
        if state.selection.norm_weights:
            raise ArtifactError(_NO_GAINS.format(where="the model in memory"))
        meta = meta_of(src)
        if strict and src is not base:
            check_fingerprint(base, meta, strict, "in memory", base_fingerprint)
        biases = {s.name: bias_tensor(src, s.name).detach().float().cpu().clone() for s in state.trained_slots()}
        params = dict(src.named_parameters())
        head = {n: params[n].detach().float().cpu().clone() for n in state.model_map.head_params}
        return check_finite(TaskTensors(biases, list(state.added), head, _meta_summary(meta)), "the model in memory")
    art = read_artifact(source, strict=strict)
    if art.meta.get("norm_weights"):
        raise ArtifactError(_NO_GAINS.format(where=f"artifact {art.path}"))
    check_fingerprint(base, art.meta, strict, art.path, base_fingerprint)
    prefix = art.meta["base_model"].get("prefix", "")
    biases = {}
    for name, s in art.meta["slots"].items():
        full = None
        if not s["added"]:
            here = locate(base, name, prefix)
            full = base_value(base, here) if here is not None else None
            if full is None:
                raise ArtifactError(f"artifact {art.path} has a bias for {name}, which this base model does not have")
            if full.numel() != s["size"]:
                raise ArtifactError(f"{name}: artifact size {s['size']}, base model size {full.numel()}")
        if s.get("indices") is None:
            biases[name] = slot_value(art, name, full)
        else:
            idx = art.tensors.get(f"entries:{name}")  # sparse BitFit: stored; else the roles' slices
            idx = _indices_from_meta(base, art.meta, name, prefix) if idx is None else idx
            if full is None:
                full = torch.zeros(s["size"])
            full = full.clone()
            full[idx] = slot_value(art, name, full[idx])
            biases[name] = full
    head = {n: art.tensors[f"head:{n}"].clone() for n in art.meta["head"]["params"]}
    return check_finite(TaskTensors(biases, list(art.meta["added"]), head, _meta_summary(art.meta)),
                        f"artifact {art.path or '(in memory)'}")


def _indices_from_meta(model: nn.Module, meta: dict, name: str, prefix: str) -> torch.Tensor:
    """Trained indices of a fused slot, reproduced from the model's roles and the stored roles."""
    here = locate(model, name, prefix)
    state = get_state(model)
    mm = state.model_map if state is not None else discover(model)
    s = meta["slots"][name]
    try:
        idx = mm.slot(here).indices(s["roles"])
    except KeyError:
        raise ArtifactError(f"slot {name} of the artifact is not a bias slot of this model") from None
    if idx is None or idx.numel() != s["indices"]:
        raise ArtifactError(
            f"slot {name}: the artifact trained {s['indices']} indices of roles {s['roles']} but this model's "
            f"layout gives {s['size'] if idx is None else idx.numel()}"
        )
    return idx
