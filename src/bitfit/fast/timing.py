"""The time and load figures of a training run, defined once: ``metrics.json`` of `bitfit train`
(:func:`bitfit.training.run.run_train`) and `bitfit compare`'s run.json / table both take them from here.

Definitions (docs/COMPARE.md):

- ``train_time_s`` / ``train_cpu_s``: wall-clock time (``time.perf_counter``) / CPU time of this process,
  all threads (``time.process_time``), spent training inside ``Trainer.train``: the intervals that end at
  an optimizer step or at the end of an epoch. Evaluation, checkpoint saving, the logging done with them,
  and loading the best checkpoint at the end are not in it.
- ``step_time_s`` / ``step_cpu_s``: ``train_time_s`` / ``train_cpu_s`` divided by the optimizer steps
  taken in this call (``timed_steps``; gradient accumulation makes one step of several batches).
- ``total_time_s`` / ``total_cpu_s``: from the start of ``Trainer.train`` to the final dev metrics, all
  included: training, every evaluation, checkpointing, loading the best checkpoint.
- ``load``: the 1-minute load average (``os.getloadavg``), the CPU count and the torch threads, read
  at the start and at the end of a run. A step time is *measured while the machine was busy* when
  the load, at either end, exceeds the run's threads + 0.5 (:func:`busy`): other work shared the cores.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from transformers import TrainerCallback

BUSY_MARGIN = 0.5  # load above threads + this = other work on the machine

DEFINITIONS = {
    "step_time_s": "training wall time (no evaluation, no checkpointing) / optimizer steps",
    "step_cpu_s": "process CPU time (all threads) of the same training time / optimizer steps",
    "train_time_s": "wall time spent training inside Trainer.train (evaluation and checkpointing excluded)",
    "train_cpu_s": "process CPU time of train_time_s",
    "total_time_s": "wall time from the start of training to the final dev metrics, evaluation and checkpoints "
                    "included",
    "total_cpu_s": "process CPU time of total_time_s",
}


def _now() -> tuple:
    return time.perf_counter(), time.process_time()


class RunClock(TrainerCallback):
    """A Trainer callback that splits the time of ``trainer.train()`` into training and the rest.

    Every interval that ends at ``on_step_end`` or ``on_epoch_end`` is training; intervals that end at
    ``on_evaluate`` or ``on_save`` (evaluation, checkpoint saving and rotation, the logging between them)
    are not. :meth:`figures` returns the metrics defined in this module's docstring."""

    def __init__(self):
        self.steps = 0
        self.train_wall = self.train_cpu = 0.0
        self.start: Optional[tuple] = None
        self._mark: Optional[tuple] = None

    # ---- training intervals
    def _training(self):
        now = _now()
        if self._mark is not None:
            self.train_wall += now[0] - self._mark[0]
            self.train_cpu += now[1] - self._mark[1]
        self._mark = now

    def _other(self):
        self._mark = _now()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self._mark = _now()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        self._training()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._training()

    def on_evaluate(self, args, state, control, **kwargs):
        self._other()

    def on_save(self, args, state, control, **kwargs):
        self._other()

    def figures(self, steps: Optional[int] = None) -> dict:
        """The time figures of the run so far (call it once the final dev metrics are in). ``steps``:
        optimizer steps to divide by (default: the steps this clock saw)."""
        n = max(1, int(steps if steps is not None else self.steps))
        now = _now()
        start = self.start or now
        return {
            "step_time_s": self.train_wall / n, "step_cpu_s": self.train_cpu / n,
            "train_time_s": self.train_wall, "train_cpu_s": self.train_cpu,
            "total_time_s": now[0] - start[0], "total_cpu_s": now[1] - start[1], "timed_steps": n,
        }


def load_now(threads: Optional[int] = None) -> dict:
    """{"load1": 1-minute load average (None where the OS has none), "cpus": CPU count, "threads": torch
    intra-op threads of this process}."""
    try:
        load1: Optional[float] = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load1 = None
    if threads is None:
        try:
            import torch

            threads = torch.get_num_threads()
        except Exception:  # pragma: no cover
            threads = None
    return {"load1": load1, "cpus": os.cpu_count(), "threads": threads}


def busy(loads) -> bool:
    """True when any of the load readings exceeds its run's threads + 0.5 (other work shared the cores)."""
    for ld in loads or []:
        if not ld or ld.get("load1") is None:
            continue
        threads = ld.get("threads") or ld.get("cpus") or 1
        if ld["load1"] > threads + BUSY_MARGIN:
            return True
    return False


__all__ = ["RunClock", "DEFINITIONS", "load_now", "busy", "BUSY_MARGIN"]
