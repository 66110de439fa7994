"""Many BitFit tasks over one frozen base model: the bias bank (:class:`BiasBank`).

A BitFit task differs from its base only in its biases (and its head), so one copy of the
base weights can serve any number of tasks. :class:`BiasBank` keeps the base once and, per
task, only what the task's artifact holds: the trained bias values and the head. This module
owns the bank's public face: loading the base for its tasks, adding and removing tasks, the
call strategies, running a batch (:meth:`BiasBank.__call__`) and mixed-task decoding
(:meth:`BiasBank.generate`). The per-task and per-slot storage is :mod:`bitfit.serving.store`;
how each row gets its own task's biases inside the layers is :mod:`bitfit.serving.rowbias`.

Per bias slot the bank keeps one table ``[tasks that train it, size]`` (the tasks' own
values, nothing else). A call runs every row with its own task's biases and head; the
biases are applied *inside* the layers' own computation, bit for bit what each task's own
model computes on the same batch.

Strategies: ``"gather"`` runs all rows in one pass (the head children dispatch their rows to
each task's head); ``"group"`` runs one pass per task over that task's rows (the fallback for
models that flatten activations to ``[batch*seq, hidden]`` inside a layer, e.g. OPT's MLP);
``"auto"`` (default) uses ``gather`` whenever the batch holds more than one task. The base
model's parameters are never written; after every call (also one that raised) the base's
modules are back to their own classes.

:meth:`BiasBank.generate` decodes a batch whose rows belong to different causal-LM tasks in
one ``generate`` call (KV cache included).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import BitFitError
from .rowbias import CallPlan, GatherUnsupported, installed, split_name
from .store import BankTask, SlotTable, build_task, repack, tensor_bytes

# Kept for compatibility: the per-row pass now costs what the plain base costs, so ``auto``
# gathers at any number of rows per task (docs/SERVING.md, benchmarks/bank_throughput.py).
GATHER_MAX_ROWS_PER_TASK = float("inf")

STRATEGIES = ("auto", "group", "gather")


def choose_strategy(n_rows: int, n_tasks: int) -> str:
    """The strategy ``"auto"`` uses for a batch of ``n_rows`` rows over ``n_tasks`` distinct tasks."""
    if n_tasks <= 1:
        return "group"
    return "gather" if n_rows / n_tasks <= GATHER_MAX_ROWS_PER_TASK else "group"



@dataclass
class BankOutput:
    """Result of one bank call.

    ``logits[i]`` is row i's output under its own task's head (a tensor whose last dimension
    is that task's label count, ``num_labels[i]``). ``padded()`` stacks them into one
    ``[rows, max_labels]`` tensor filled with ``fill`` where a task has fewer labels.
    """

    logits: list
    tasks: list
    num_labels: list
    strategy: str

    def padded(self, fill: float = float("nan")) -> torch.Tensor:
        width = max(self.num_labels)
        rest = self.logits[0].shape[:-1]
        out = torch.full((len(self.logits), *rest, width), fill, dtype=self.logits[0].dtype)
        for i, row in enumerate(self.logits):
            out[i, ..., : row.shape[-1]] = row
        return out

    def __len__(self) -> int:
        return len(self.logits)



_MAX_PLANS = 256  # cached task lists per bank (each plan holds references only, no tensor copies)


# ------------------------------------------------------------------------------------- bank
class BiasBank:
    """Serve many BitFit tasks from one frozen base model.

    ``base_model``: the plain (not prepared) base model with a task-head class, e.g. from
    ``AutoModelForSequenceClassification`` (its own head is replaced per task), or a local
    path / Hub name / alias / ``.gguf`` file to load with its tasks' head class
    (``AutoModelForCausalLM`` for instruction-tuned tasks, else sequence classification; a GGUF
    file is dequantized as ``bitfit train`` does, ``gguf_file=`` names one inside a folder).
    ``tasks``: name -> artifact folder (saved with :func:`bitfit.save`, or a ``bitfit train``
    run folder), loaded Artifact, or in-memory BitFit model of the same base. Every task must
    come from this base: its fingerprint is checked (``strict=False`` only warns).

    ``bank(input_ids=..., attention_mask=..., tasks=[...])`` returns a :class:`BankOutput`
    with one row of logits per input row, each under its own task's biases and head.
    """

    def __init__(
        self,
        base_model: Union[nn.Module, str],
        tasks: Optional[dict] = None,
        *,
        strategy: str = "auto",
        strict: bool = True,
        gguf_file: Optional[str] = None,
    ):
        self.strict = strict
        if strategy not in STRATEGIES:
            raise BitFitError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        if isinstance(base_model, (str,)) or hasattr(base_model, "__fspath__"):
            tasks = _read_sources(tasks, strict)  # a missing or damaged artifact is reported before the base loads
            base_model = self._load_base(str(base_model), kind=_tasks_kind(tasks, str(base_model), gguf_file),
                                         gguf_file=gguf_file)
        elif gguf_file is not None:
            raise BitFitError("gguf_file names a file in the base_model folder; pass base_model as a path")
        if not isinstance(base_model, nn.Module):
            raise BitFitError(f"BiasBank needs a torch.nn.Module base model, got {type(base_model).__name__}")
        from ..core.prepare import get_state, unwrap
        from ..core.roles import head_module_names

        if get_state(base_model) is not None:
            raise BitFitError(
                "the bank's base model is itself a BitFit model (bitfit.apply was called on it); pass the plain "
                "frozen base model it was prepared from, and the BitFit models as tasks"
            )
        self.base = unwrap(base_model)
        self._lock = threading.RLock()
        # held by a thread adding or removing a task while it waits for the lock; calls pass through it before
        # taking the lock, so a thread calling the bank in a tight loop does not starve the adding thread
        self._gate = threading.Lock()
        self._tasks: dict[str, BankTask] = {}
        self._head_names, _ = head_module_names(self.base)
        self._modules = dict(self.base.named_modules())
        self._gather_ok = True  # set False when the model turns out not to allow per-row biases
        self._tables: dict[str, SlotTable] = {}  # slot name -> the tasks' values for it
        self._plans: dict = {}  # (task names, device) -> CallPlan of a call over those tasks
        self._dirty = False  # tasks were added or removed since the tables were last packed
        self._fingerprint: Optional[str] = None  # the base's, computed once (the bank never writes the base)
        self.stats = {"calls": 0, "rows": 0, "group": 0, "gather": 0}
        # upkeep work done so far: table re-packs (one before the first call after adds/removes) and base
        # fingerprints (one per bank)
        self.upkeep = {"repacks": 0, "fingerprints": 0}
        for name, source in (tasks or {}).items():
            self.add_task(name, source)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _load_base(name: str, kind: str = "classification", gguf_file: Optional[str] = None):
        """The base model at ``name`` (folder, Hub name, alias, ``.gguf`` file; ``gguf_file``: a GGUF file in
        the folder ``name``, loaded dequantized as ``bitfit train`` loads it) with the head class of ``kind``
        (``"classification"`` or ``"causal-lm"``)."""
        import transformers

        from ..core.models import load_model

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its own (random) head is never used
        try:
            return load_model(name, task=kind, **kwargs).eval()
        finally:
            transformers.logging.set_verbosity(verbosity)

    @property
    def tasks(self) -> list:
        return list(self._tasks)

    def __contains__(self, name) -> bool:
        return name in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def task_info(self, name: str) -> dict:
        t = self._get(name)
        return {
            "name": t.name,
            "num_labels": t.num_labels,
            "labels": [t.id2label.get(i, f"LABEL_{i}") for i in range(t.num_labels)],
            "problem_type": t.problem_type,
            # what each input is: "pairs" ([text, text_pair]), "texts", or "any" where the task's run folder does
            # not say (no task.json next to the artifact)
            "inputs": {True: "pairs", False: "texts"}.get(t.pairs, "any"),
        }

    def _row_groups(self, tasks: list, device) -> list:
        """(task, its row indices) per task of a call, in first-seen order; under the lock, tables packed."""
        self._packed()
        order: dict[str, list] = {}
        for i, t in enumerate(tasks):
            self._get(t)
            order.setdefault(t, []).append(i)
        return [(self._tasks[t], torch.tensor(r, dtype=torch.long, device=device)) for t, r in order.items()]

    def _get(self, name: str) -> BankTask:
        try:
            return self._tasks[name]
        except KeyError:
            known = ", ".join(sorted(self._tasks)) or "none"
            raise BitFitError(f"unknown task {name!r}; the bank holds: {known}. Add it with bank.add_task") from None

    def add_task(self, name: str, source, *, replace: bool = False, pairs: Optional[bool] = None) -> None:
        """Add task ``name`` from an artifact folder, Artifact, or in-memory BitFit model.

        ``pairs``: whether the task takes text pairs (True) or single texts (False); by default what the
        task.json of a ``bitfit train`` run folder says, else not known (``task_info(name)["inputs"] == "any"``).

        Only the task's own tensors are kept (bias values and head); the base is shared. Safe while other
        threads call the bank: an artifact folder is read before the bank's lock is taken; the checks against
        the base (which a running call changes for its duration: module classes, head children) run under it.
        """
        if not isinstance(name, str) or not name:
            raise BitFitError(f"task names must be non-empty strings, got {name!r}")
        if name in self._tasks and not replace:
            raise BitFitError(f"task {name!r} is already in the bank; remove_task it first or pass replace=True")
        from ..artifacts import read_artifact, task_tensors

        if isinstance(source, str) or hasattr(source, "__fspath__"):
            pairs = _takes_pairs(source) if pairs is None else pairs
            source = read_artifact(source, strict=self.strict)
        with self._gate, self._lock:
            if name in self._tasks and not replace:
                raise BitFitError(f"task {name!r} is already in the bank; remove_task it first or pass replace=True")
            tt = task_tensors(self.base, source, strict=self.strict, base_fingerprint=self._base_fingerprint())
            task = self._build_task(name, tt)
            task.pairs = pairs
            if name in self._tasks:
                self._drop(name)
            self._store(task)

    def _base_fingerprint(self) -> str:
        """The base's fingerprint (:func:`bitfit.artifacts.fingerprint`), computed on first use (under the lock:
        not while a call has the base's modules switched)."""
        if self._fingerprint is None:
            from ..artifacts import fingerprint

            self._fingerprint = fingerprint(self.base)
            self.upkeep["fingerprints"] += 1
        return self._fingerprint

    def remove_task(self, name: str) -> None:
        with self._gate, self._lock:
            self._get(name)
            self._drop(name)

    def _store(self, task: BankTask) -> None:
        """Move the task's bias values into the slot tables (their only copy) and keep views."""
        touched = []
        for values, added in ((task.swap, False), (task.hooked, True)):
            for slot, value in values.items():
                table = self._tables.get(slot)
                if table is None:
                    table = self._tables[slot] = SlotTable(slot, self._modules[split_name(slot)[0]], added)
                table.add(task.name, value)
                touched.append(table)
        self._tasks[task.name] = task
        self._refresh(touched)

    def _drop(self, name: str) -> None:
        task = self._tasks.pop(name)
        touched = []
        for slot in list(task.swap) + list(task.hooked):
            table = self._tables[slot]
            table.remove(name)
            if not table.owners:
                del self._tables[slot]
            else:
                touched.append(table)
        self._refresh(touched)

    def _refresh(self, tables) -> None:
        """After a task was added or removed: every cached call plan is dropped (they name the old packs) and the
        tables are re-packed before the next call (:meth:`_packed`), once however many tasks changed."""
        self._plans.clear()
        self._dirty = True

    def _packed(self) -> None:
        """Re-pack the slot tables (:func:`bitfit.serving.store.repack`) if tasks changed since the last pack
        (under the lock)."""
        if self._dirty:
            repack(self._tables, self._tasks)
            self._dirty = False
            self.upkeep["repacks"] += 1

    def _build_task(self, name: str, tt) -> BankTask:
        """Task ``name`` from its tensors, checked against this bank's base
        (:func:`bitfit.serving.store.build_task`)."""
        return build_task(self.base, self._modules, self._head_names, name, tt)

    # ---------------------------------------------------------------------- memory
    def memory(self) -> dict:
        """Bytes held: ``base`` (shared model), ``tasks`` (name -> the task's own tensors), ``total``.

        A task's biases live in the bank's per-slot tables (views), counted by their own size."""
        with self._lock:
            self._packed()
            base_tensors = list(self.base.parameters()) + list(self.base.buffers())
            base_ptrs = {t.untyped_storage().data_ptr() for t in base_tensors}
            per_task = {}
            for n, t in self._tasks.items():
                biases = sum(v.numel() * v.element_size() for v in list(t.swap.values()) + list(t.hooked.values()))
                heads = [x for m in t.heads.values() for x in list(m.parameters()) + list(m.buffers())
                         if x.untyped_storage().data_ptr() not in base_ptrs]
                per_task[n] = biases + tensor_bytes(heads)
            base = tensor_bytes(base_tensors)
            return {"base": base, "tasks": per_task, "total": base + sum(per_task.values())}

    # ----------------------------------------------------------------------- calls
    def __call__(self, tasks: Sequence[str], strategy: Optional[str] = None, **inputs) -> BankOutput:
        """Run a batch; ``tasks[i]`` names row i's task. Other keywords go to the model (input_ids,
        attention_mask, token_type_ids, pixel_values, ...); tensors with a first dimension of
        len(tasks) are split per row."""
        strategy = strategy or self.strategy
        if strategy not in STRATEGIES:
            raise BitFitError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if isinstance(tasks, str) or not isinstance(tasks, Sequence):
            raise BitFitError("tasks must be a list with one task name per row")
        tasks = list(tasks)
        n = len(tasks)
        if n == 0:
            raise BitFitError("empty batch: tasks has no rows")
        row_inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
        if not row_inputs:
            raise BitFitError("no input tensors given (input_ids=..., attention_mask=..., ...)")
        for k, v in row_inputs.items():
            if v.shape[0] != n:
                raise BitFitError(f"{k} has {v.shape[0]} rows but tasks names {n}; give one task per row")
        with self._gate:
            pass  # a thread adding or removing a task goes first
        with self._lock:
            groups = self._row_groups(tasks, next(iter(row_inputs.values())).device)
            if strategy == "auto":
                strategy = choose_strategy(n, len(groups))
                if strategy == "gather" and not self._gather_ok:
                    strategy = "group"
            was_training = self.base.training
            if was_training:
                self.base.eval()
            try:
                with torch.no_grad():
                    if strategy == "gather":
                        try:
                            logits = self._run_gather(groups, n, inputs)
                        except GatherUnsupported:
                            if self.strategy != "auto":
                                raise
                            self._gather_ok = False
                            strategy = "group"
                            logits = self._run_group(groups, n, inputs)
                    else:
                        logits = self._run_group(groups, n, inputs)
            finally:
                if was_training:
                    self.base.train()
            self.stats["calls"] += 1
            self.stats["rows"] += n
            self.stats[strategy] += 1
            nl = [self._tasks[t].num_labels for t in tasks]
        return BankOutput(logits, tasks, nl, strategy)

    @staticmethod
    def _logits(out):
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(logits, torch.Tensor):
            raise BitFitError(f"the base model returned {type(out).__name__} without logits")
        return logits

    def _plan(self, names: tuple, device) -> "CallPlan":
        """The call plan of a list of distinct tasks (cached until a task is added or removed)."""
        key = (names, device)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = CallPlan(self.base, self._tables, self._tasks, self._head_names, names, device)
        return plan

    def _installed(self, tasks: list, row_task: Optional[torch.Tensor], n: int, groups=None):
        """Per-row biases (and heads) of ``tasks`` (the distinct tasks of the batch) in place on the base for one
        forward pass or one ``generate`` call (:func:`bitfit.serving.rowbias.installed`, with their cached plan)."""
        plan = self._plan(tuple(t.name for t in tasks), None if row_task is None else row_task.device)
        return installed(plan, row_task, n, groups)

    def _run_group(self, groups, n, inputs) -> list:
        """One pass per task over its own rows (each module runs its own op with the task's bias)."""
        result: list = [None] * n
        base = self.base
        for task, idx in groups:
            if len(groups) == 1:
                sub = inputs
            else:
                sub = {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
                       for k, v in inputs.items()}
            with self._installed([task], None, int(idx.numel())):
                logits = self._logits(base(**sub))
            L = task.num_labels
            for j, i in enumerate(idx.tolist()):
                result[i] = logits[j][..., :L] if task.heads else logits[j]
        return result

    def _row_task(self, groups, n: int, device) -> torch.Tensor:
        row_task = [0] * n
        for k, (_, idx) in enumerate(groups):
            for i in idx.tolist():
                row_task[i] = k
        return torch.tensor(row_task, dtype=torch.long, device=device)

    def _run_gather(self, groups, n, inputs) -> list:
        """One pass over all rows, each with its own task's biases (in the layers' own ops) and head."""
        if len(groups) == 1:
            return self._run_group(groups, n, inputs)
        device = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).device
        row_task = self._row_task(groups, n, device)
        with self._installed([t for t, _ in groups], row_task, n, groups):
            logits = self._logits(self.base(**inputs))
        result = list(logits.unbind(0))
        width = logits.shape[-1]
        for task, idx in groups:
            L = task.num_labels
            if task.heads and L != width:  # a head narrower than the widest: its rows' own labels
                for i in idx.tolist():
                    result[i] = result[i][..., :L]
        return result

    # -------------------------------------------------------------------- generation
    def generate(self, tasks: Sequence[str], input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 **kwargs):
        """Decode a batch whose rows belong to different causal-LM tasks in one ``generate`` call.

        ``tasks[i]`` names row i's task; the other arguments are those of the base model's
        ``generate`` (``max_new_tokens``, ``do_sample``, ``num_beams``, ``pad_token_id``, ...; pad
        prompts on the left). Each row's biases are applied inside the layers on every step, the
        KV cache included, so greedy decoding gives each row what its task's own model gives on the
        same batch. Returns what the base's ``generate`` returns (token ids ``[rows x n, length]``).
        """
        if not callable(getattr(self.base, "generate", None)) or not hasattr(self.base, "can_generate") \
                or not self.base.can_generate():
            raise BitFitError(
                f"bank.generate needs a causal-LM base model (AutoModelForCausalLM); this bank's base is "
                f"{type(self.base).__name__}"
            )
        if isinstance(tasks, str) or not isinstance(tasks, Sequence):
            raise BitFitError("tasks must be a list with one task name per row")
        tasks = list(tasks)
        n = len(tasks)
        if n == 0:
            raise BitFitError("empty batch: tasks has no rows")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != n:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise BitFitError(f"input_ids must be [rows, length] with one row per task; got {shape} for {n} tasks")
        gen_cfg = getattr(self.base, "generation_config", None)
        beams = int(kwargs.get("num_beams") or getattr(gen_cfg, "num_beams", 1) or 1)
        returns = int(kwargs.get("num_return_sequences") or getattr(gen_cfg, "num_return_sequences", 1) or 1)
        expand = beams if beams > 1 else returns  # how generate repeats each prompt row
        rows = [t for t in tasks for _ in range(expand)]
        with self._gate:
            pass  # a thread adding or removing a task goes first
        with self._lock:
            device = input_ids.device
            groups = self._row_groups(rows, device)
            row_task = None if len(groups) == 1 else self._row_task(groups, len(rows), device)
            was_training = self.base.training
            if was_training:
                self.base.eval()
            try:
                with torch.no_grad(), self._installed([t for t, _ in groups], row_task, len(rows), groups):
                    try:
                        out = self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                    except GatherUnsupported as exc:
                        raise BitFitError(
                            f"mixed-task generation is not supported for {type(self.base).__name__}: {exc}; "
                            "generate one task at a time"
                        ) from None
            finally:
                if was_training:
                    self.base.train()
            self.stats["calls"] += 1
            self.stats["rows"] += n
            self.stats["gather" if row_task is not None else "group"] += 1
        return out


def _takes_pairs(folder) -> Optional[bool]:
    """Whether the task in run folder ``folder`` takes text pairs, from its task.json
    (:func:`bitfit.data.glue.takes_pairs`); None without a readable one."""
    import json
    import os

    path = os.path.join(os.path.expanduser(str(folder)), "task.json")
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return None
    from ..data.glue import takes_pairs

    return takes_pairs(record)


def _read_sources(tasks: Optional[dict], strict: bool = True) -> Optional[dict]:
    """``tasks`` with artifact folders read (:func:`bitfit.artifacts.read_artifact`): their records name the
    head class the base is loaded with."""
    if not tasks:
        return tasks
    from ..artifacts import read_artifact

    return {name: read_artifact(str(src), strict=strict) if isinstance(src, str) or hasattr(src, "__fspath__")
            else src for name, src in tasks.items()}


def _source_kind(source) -> Optional[str]:
    """``"causal-lm"`` / ``"classification"`` for a task trained with that head class, else None."""
    if isinstance(source, nn.Module):
        from ..core.prepare import unwrap

        arch = type(unwrap(source)).__name__
    else:
        arch = ((getattr(source, "meta", None) or {}).get("base_model") or {}).get("architecture") or ""
    if arch.endswith("ForCausalLM"):
        return "causal-lm"
    if arch.endswith("ForSequenceClassification"):
        return "classification"
    return None


def _tasks_kind(tasks: Optional[dict], name: str, gguf_file: Optional[str]) -> str:
    """The head class a bank loads its base ``name`` with: that of its tasks (causal LM for instruction-tuned
    tasks, sequence classification otherwise); without tasks, a causal LM for a GGUF file (llama.cpp's models
    are causal LMs), else sequence classification."""
    kinds = {n: _source_kind(src) for n, src in (tasks or {}).items()}
    found = {k for k in kinds.values() if k}
    if len(found) > 1:
        lm = sorted(n for n, k in kinds.items() if k == "causal-lm")
        raise BitFitError(
            f"tasks {', '.join(lm)} are causal-LM tasks and the others classification tasks; one bank holds one kind "
            "over one base model: make one bank per kind")
    if found:
        return found.pop()
    return "causal-lm" if gguf_file or str(name).endswith(".gguf") else "classification"



__all__ = ["BiasBank", "BankOutput", "choose_strategy", "GATHER_MAX_ROWS_PER_TASK"]
