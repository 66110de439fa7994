"""The finite-values rule: a NaN or inf in a trained tensor (training diverged) is refused when a
model is saved or merged, when an artifact is read, and when a task goes into a bias bank."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.sharded import full, full_bias
from ..errors import ArtifactError
from .format import TaskTensors


def nonfinite(t: torch.Tensor) -> Optional[tuple]:
    """(NaN count, inf count, numel) of a floating tensor with a non-finite value, else None."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    t = t.detach()
    if bool(torch.isfinite(t).all()):
        return None
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum()), t.numel()


def first_nonfinite(named) -> Optional[str]:
    """"<name> holds a NaN and b inf of its n values (k tensors in all)" for the first non-finite tensor, else None."""
    bad = [(name, c) for name, c in ((n, nonfinite(t)) for n, t in named) if c is not None]
    if not bad:
        return None
    name, (nan, inf, n) = bad[0]
    more = f"; {len(bad)} tensors are non-finite in all" if len(bad) > 1 else ""
    return f"{name} holds {nan} NaN and {inf} inf of its {n} values{more}"


def _trained_tensors(target: nn.Module, state):
    """(name, tensor) of every trained bias slot (full) and head parameter of a BitFit model."""
    for slot in state.trained_slots():  # a sharded (DTensor) one gathered: kilobytes, never the frozen base
        yield slot.name, full_bias(target.get_submodule(slot.module_name) if slot.module_name else target)
    params = dict(target.named_parameters())
    for name in list(state.model_map.head_params) + list(state.selection.norm_weights):
        if name in params:
            yield name, full(params[name])


def refuse_nonfinite(target: nn.Module, state, doing: str) -> None:
    bad = first_nonfinite(_trained_tensors(target, state))
    if bad:
        raise ArtifactError(
            f"cannot {doing}: trained tensor {bad} (training diverged); lower the learning rate or go back to "
            "a checkpoint whose tensors are finite. Nothing was changed"
        )


def check_finite(tt: TaskTensors, where: str = "the task") -> TaskTensors:
    """``tt`` if every bias and head tensor is finite; else an ArtifactError naming the tensor.

    :func:`task_tensors` calls it on what it returns, so a bias bank never holds a NaN/inf task."""
    bad = first_nonfinite(list(tt.biases.items()) + list(tt.head.items()))
    if bad:
        raise ArtifactError(
            f"{where} cannot be used: tensor {bad} (training diverged, or the base's biases are not finite); "
            "retrain with a lower learning rate or use an earlier artifact"
        )
    return tt
