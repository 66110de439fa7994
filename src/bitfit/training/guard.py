"""Stop a training run the moment it goes non-finite, before anything is saved.

:class:`NonFiniteGuard` is a ``transformers.TrainerCallback``. The trainer feeds it the real loss of every
training step (``observe_loss``; transformers' own logging replaces a NaN loss by the running average, so the
logged value cannot be trusted), and after every optimizer step it checks that loss and every trained tensor.
A NaN or inf raises :class:`bitfit.errors.BitFitError` naming the step, *before* the trainer's save of that
step: the checkpoints already on disk (the last good one) stay, and no artifact or metrics are written.

One ``.item()`` per optimizer step: the loss and the sum of every trained tensor are reduced on the device
first (a non-finite value anywhere makes the sum non-finite); the tensors are only inspected one by one
to name the culprit when that sum is not finite.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from ..errors import BitFitError

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin",
                "model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_complete_checkpoint(path) -> bool:
    """A Trainer checkpoint folder that was written to the end: trainer_state.json and model weights."""
    p = Path(path)
    return (p / "trainer_state.json").is_file() and any((p / f).is_file() for f in WEIGHT_FILES)


def last_complete_checkpoint(folder) -> Optional[str]:
    """The ``checkpoint-N`` folder with the highest N that is complete (see :func:`is_complete_checkpoint`),
    skipping a newest one that was cut off while being written; None if there is none."""
    p = Path(folder)
    if not p.is_dir():
        return None
    found = []
    for child in p.iterdir():
        m = _CHECKPOINT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    for _, child in sorted(found, reverse=True):
        if is_complete_checkpoint(child):
            return str(child)
    return None


def _describe(t: torch.Tensor) -> str:
    t = t.detach().float()
    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    parts = [f"{n} {w}" for n, w in ((n_nan, "nan"), (n_inf, "inf")) if n]
    return f"{', '.join(parts)} of {t.numel()} values"


class NonFiniteGuard(TrainerCallback):
    """Raise BitFitError when a training step's loss or a trained tensor becomes NaN/inf."""

    def __init__(self, model: Optional[torch.nn.Module] = None, check_params: bool = True):
        self.model = model
        self.check_params = check_params
        self._losses: list = []

    # -- fed by the trainer -------------------------------------------------------------------------------
    def observe_loss(self, loss) -> None:
        """Record the loss of one training (micro-)step; checked at the end of the optimizer step."""
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach().float().sum())
        elif loss is not None:
            self._losses.append(torch.tensor(float(loss)))

    # -- callback -----------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.model is None:
            self.model = model
        self._losses = []
        self._params = None  # listed again: a resumed or re-prepared model may train other tensors

    def _trained(self, model) -> list:
        # walking every parameter each step costs ~1 ms on a small model: the trained ones are listed once a run
        cached = getattr(self, "_params", None)
        if cached is None or cached[0] is not model:
            cached = self._params = (model, [(n, p) for n, p in model.named_parameters() if p.requires_grad])
        return cached[1]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model = self.model if self.model is not None else model
        losses, self._losses = self._losses, []
        params = self._trained(model) if model is not None and self.check_params else []
        parts = [loss.to(torch.float32) for loss in losses]
        device = parts[0].device if parts else (params[0][1].device if params else torch.device("cpu"))
        total = torch.zeros((), device=device)
        for t in parts:
            total = total + t.to(device)
        if params:
            sums = torch.stack([p.detach().float().sum().to(device) for _, p in params])
            total = total + sums.sum()
        if math.isfinite(float(total)):
            return control
        step = state.global_step
        for t in parts:
            value = float(t)
            if not math.isfinite(value):
                self._fail(args, step, f"loss is {value}")
        for name, p in params:
            if not bool(torch.isfinite(p.detach()).all()):
                self._fail(args, step, f"trained tensor {name} holds non-finite values ({_describe(p)}) after "
                                       "the optimizer update")
        return control  # only a finite overflow of the sum: nothing is wrong

    def _fail(self, args, step: int, what: str):
        out = getattr(args, "output_dir", None)
        lr = getattr(args, "learning_rate", None)
        ckpt = last_complete_checkpoint(out) if out else None
        kept = (f"the last good checkpoint {ckpt} is kept (resume from it with --resume_from_checkpoint {ckpt} "
                "and a lower learning rate)") if ckpt else "no checkpoint had been saved yet"
        raise BitFitError(
            f"training diverged at step {step}: {what}; lower --learning_rate"
            + (f" (it is {lr:g})" if isinstance(lr, (int, float)) else "")
            + " or --head-learning-rate, and check the labels for extreme values. No artifact or "
            + f"metrics were written to {os.fspath(out) if out else 'the output folder'}; {kept}")
