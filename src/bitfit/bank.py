"""Many BitFit tasks over one frozen base model: the bias bank.

A BitFit task differs from its base only in its biases (and its head), so one copy of the
base weights can serve any number of tasks. :class:`BiasBank` keeps the base once and, per
task, only what the task's artifact holds: the trained bias values and the head.

Each call runs every row with its own task's biases and head, with one of two strategies:

``"group"``
    Rows are grouped by task. For each group the task's bias values are copied into the
    shared base modules (added biases are added by a hook), the task's head is put in place,
    and the group runs. One forward pass per distinct task.
``"gather"``
    One forward pass over all rows. A forward hook on every bias slot adds
    ``delta[task_of_row]`` (task bias minus base bias) to the module's output, broadcast over
    the sequence; LayerNorm/RMSNorm biases are added after the norm the same way. The head
    children dispatch their rows to each task's head.

``"auto"`` (default) picks per call with :func:`choose_strategy` (rule measured by
``benchmarks/bank_throughput.py``; see docs/SERVING.md). After every call, also one that
raised, the base model is exactly what it was (bit for bit, no hooks left).
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .errors import BitFitError

# Crossover measured by benchmarks/bank_throughput.py (docs/SERVING.md): the per-row gathered
# pass wins once the groups get small, i.e. when the average rows per distinct task is at
# most this many.
GATHER_MAX_ROWS_PER_TASK = 4.0

STRATEGIES = ("auto", "group", "gather")


def choose_strategy(n_rows: int, n_tasks: int) -> str:
    """The strategy ``"auto"`` uses for a batch of ``n_rows`` rows over ``n_tasks`` distinct tasks."""
    if n_tasks <= 1:
        return "group"
    return "gather" if n_rows / n_tasks <= GATHER_MAX_ROWS_PER_TASK else "group"


# ---------------------------------------------------------------------------------- helpers
def _split_name(name: str) -> tuple[str, str]:
    return tuple(name.rsplit(".", 1)) if "." in name else ("", name)  # type: ignore[return-value]


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


class _Task:
    """What the bank keeps per task: bias values, the head children, label facts."""

    def __init__(self, name, swap, hooked, heads, num_labels, id2label, problem_type, meta):
        self.name = name
        self.swap = swap  # slot name -> full bias value (base module has this bias)
        self.hooked = hooked  # slot name -> bias value added after a module the base has no bias in
        self.heads = heads  # head child name -> module holding this task's head
        self.num_labels = num_labels
        self.id2label = id2label
        self.problem_type = problem_type
        self.meta = meta

    def own_tensors(self, base_ptrs: set) -> list:
        out = list(self.swap.values()) + list(self.hooked.values())
        for m in self.heads.values():
            for t in list(m.parameters()) + list(m.buffers()):
                if t.untyped_storage().data_ptr() not in base_ptrs:
                    out.append(t)
        return out


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


class _GatherUnsupported(BitFitError):
    pass


class _RowDispatch(nn.Module):
    """Stands in for a head child during a gathered pass: each row goes to its task's head."""

    def __init__(self, name: str, groups: list):
        super().__init__()
        self.child_name = name
        self.groups = groups  # list of (module, row index LongTensor, n_labels)
        self.n_rows = sum(int(idx.numel()) for _, idx, _ in groups)

    def forward(self, *args, **kwargs):
        n = self.n_rows

        def take(v, idx):
            return v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v

        outs = []
        for module, idx, _ in self.groups:
            a = [take(v, idx) for v in args]
            k = {key: take(v, idx) for key, v in kwargs.items()}
            outs.append((idx, module(*a, **k)))
        first = outs[0][1]
        if not isinstance(first, torch.Tensor):
            raise _GatherUnsupported(f"head {self.child_name!r} returns {type(first).__name__}, not a tensor")
        width = max(o.shape[-1] for _, o in outs)
        result = first.new_zeros((n, *first.shape[1:-1], width))
        for idx, o in outs:
            if o.shape[1:-1] != first.shape[1:-1]:
                raise _GatherUnsupported(f"head {self.child_name!r} gives rows of different shapes")
            result[idx, ..., : o.shape[-1]] = o
        return result


# ------------------------------------------------------------------------------------- bank
class BiasBank:
    """Serve many BitFit tasks from one frozen base model.

    ``base_model``: the plain (not prepared) base model with a task-head class, e.g. from
    ``AutoModelForSequenceClassification`` (its own head is replaced per task), or a local
    path / Hub name / alias to load that way. ``tasks``: name -> artifact folder (saved with
    :func:`bitfit.save`), loaded Artifact, or in-memory BitFit model of the same base. Every
    task must come from this base: its fingerprint is checked (``strict=False`` only warns).

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
    ):
        self.strict = strict
        if strategy not in STRATEGIES:
            raise BitFitError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        if isinstance(base_model, (str,)) or hasattr(base_model, "__fspath__"):
            base_model = self._load_base(str(base_model))
        if not isinstance(base_model, nn.Module):
            raise BitFitError(f"BiasBank needs a torch.nn.Module base model, got {type(base_model).__name__}")
        from .prepare import get_state, unwrap
        from .roles import head_module_names

        if get_state(base_model) is not None:
            raise BitFitError(
                "the bank's base model is itself a BitFit model (bitfit.apply was called on it); pass the plain "
                "frozen base model it was prepared from, and the BitFit models as tasks"
            )
        self.base = unwrap(base_model)
        self._lock = threading.RLock()
        self._tasks: dict[str, _Task] = {}
        self._head_names, _ = head_module_names(self.base)
        self._modules = dict(self.base.named_modules())
        self._gather_ok = True  # set False when the model turns out not to allow per-row biases
        self.stats = {"calls": 0, "rows": 0, "group": 0, "gather": 0}
        for name, source in (tasks or {}).items():
            self.add_task(name, source)

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _load_base(name: str):
        import transformers

        from .models import load_model

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # its own (random) head is never used
        try:
            return load_model(name, task="classification").eval()
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
        }

    def _get(self, name: str) -> _Task:
        try:
            return self._tasks[name]
        except KeyError:
            known = ", ".join(sorted(self._tasks)) or "none"
            raise BitFitError(f"unknown task {name!r}; the bank holds: {known}. Add it with bank.add_task") from None

    def add_task(self, name: str, source, *, replace: bool = False) -> None:
        """Add task ``name`` from an artifact folder, Artifact, or in-memory BitFit model.

        Only the task's own tensors are kept (bias values and head); the base is shared.
        """
        if not isinstance(name, str) or not name:
            raise BitFitError(f"task names must be non-empty strings, got {name!r}")
        if name in self._tasks and not replace:
            raise BitFitError(f"task {name!r} is already in the bank; remove_task it first or pass replace=True")
        from .artifact import task_tensors

        tt = task_tensors(self.base, source, strict=self.strict)
        task = self._build_task(name, tt)
        with self._lock:
            self._tasks[name] = task

    def remove_task(self, name: str) -> None:
        with self._lock:
            self._get(name)
            del self._tasks[name]

    def _build_task(self, name: str, tt) -> _Task:
        meta = dict(getattr(tt, "meta", {}) or {})
        added = set(getattr(tt, "added", []) or [])
        swap, hooked = {}, {}
        from .artifact import _locate

        prefix = meta.get("base_prefix", "") or ""
        for saved_slot, value in tt.biases.items():
            slot = _locate(self.base, saved_slot, prefix) or saved_slot
            mod_name, leaf = _split_name(slot)
            module = self._modules.get(mod_name)
            if module is None or leaf != "bias":
                raise BitFitError(
                    f"task {name!r} has a bias for {slot!r}, which this base model does not have: the task was "
                    "trained on a different base (architecture); load its own base model"
                )
            cur = getattr(module, "bias", None)
            value = value.detach()
            if isinstance(cur, torch.Tensor) and saved_slot not in added:
                if cur.shape != value.shape:
                    raise BitFitError(
                        f"task {name!r}: bias {slot!r} has shape {tuple(value.shape)} but the base has "
                        f"{tuple(cur.shape)}; the task was trained on a different base"
                    )
                swap[slot] = value.to(cur.device, cur.dtype).contiguous()
            else:
                if saved_slot not in added:
                    raise BitFitError(
                        f"task {name!r} has a bias for {slot!r}, which this base model does not have; the task was "
                        "trained on a different base"
                    )
                if isinstance(cur, torch.Tensor):
                    raise BitFitError(
                        f"task {name!r} adds a bias at {slot!r} but the base already has one there; pass the "
                        "plain base model (not a prepared or merged one)"
                    )
                ref = getattr(module, "weight", None)
                if not isinstance(ref, torch.Tensor):
                    raise BitFitError(f"task {name!r}: cannot add a bias after {mod_name!r} (no weight)")
                hooked[slot] = value.to(ref.device, ref.dtype).contiguous()
        heads = self._build_heads(name, tt.head or {})
        _check_finite(name, {**swap, **hooked}, heads)
        cfg = getattr(self.base, "config", None)
        num_labels = meta.get("num_labels") or getattr(cfg, "num_labels", None) or 1
        id2label = meta.get("id2label") or ({} if tt.head else dict(getattr(cfg, "id2label", {}) or {}))
        id2label = {int(k): str(v) for k, v in id2label.items()}
        problem_type = meta.get("problem_type") or (
            "regression" if num_labels == 1 else "single_label_classification"
        )
        return _Task(name, swap, hooked, heads, int(num_labels), id2label, problem_type, meta)

    def _build_heads(self, name: str, head: dict) -> dict:
        if not head:
            return {}
        if not self._head_names:
            raise BitFitError(
                f"task {name!r} has a trained head ({', '.join(sorted(head)[:3])}...) but the base model "
                f"{type(self.base).__name__} has no task head to hold it; load the base with its head class, "
                "e.g. AutoModelForSequenceClassification.from_pretrained(...)"
            )
        heads = {}
        by_child: dict[str, dict] = {}
        for pname, value in head.items():
            child = pname.split(".", 1)[0]
            if child not in self._head_names or "." not in pname:
                raise BitFitError(
                    f"task {name!r} has head parameter {pname!r}, but the base model's head is "
                    f"{self._head_names}; the task was trained with another head class"
                )
            by_child.setdefault(child, {})[pname.split(".", 1)[1]] = value
        for child, params in by_child.items():
            base_child = getattr(self.base, child)
            # Copy the module structure only: parameters the task does not replace stay shared.
            memo = {id(t): t for t in list(base_child.parameters()) + list(base_child.buffers())}
            mod = copy.deepcopy(base_child, memo)
            existing = dict(mod.named_parameters())
            for pname, value in params.items():
                if pname not in existing:
                    raise BitFitError(f"task {name!r}: head parameter {child}.{pname} does not exist in the base head")
                owner_name, leaf = _split_name(pname)
                owner = mod.get_submodule(owner_name) if owner_name else mod
                ref = existing[pname]
                value = value.detach().to(ref.device, ref.dtype).clone()
                setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
            mod.eval()
            heads[child] = mod
        return heads

    # ---------------------------------------------------------------------- memory
    def memory(self) -> dict:
        """Bytes held: ``base`` (shared model), ``tasks`` (name -> the task's own tensors), ``total``."""
        base_tensors = list(self.base.parameters()) + list(self.base.buffers())
        base_ptrs = {t.untyped_storage().data_ptr() for t in base_tensors}
        per_task = {n: _tensor_bytes(t.own_tensors(base_ptrs)) for n, t in self._tasks.items()}
        base = _tensor_bytes(base_tensors)
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
        with self._lock:
            order: dict[str, list] = {}
            for i, t in enumerate(tasks):
                self._get(t)
                order.setdefault(t, []).append(i)
            device = next(iter(row_inputs.values())).device
            groups = [
                (self._tasks[t], torch.tensor(rows, dtype=torch.long, device=device)) for t, rows in order.items()
            ]
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
                        except _GatherUnsupported:
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

    def _run_group(self, groups, n, inputs) -> list:
        result: list = [None] * n
        base = self.base
        for task, idx in groups:
            sub = {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
                   for k, v in inputs.items()}
            saved, hooks, heads = {}, [], {}
            try:
                for slot, value in task.swap.items():
                    mod_name, _ = _split_name(slot)
                    b = self._modules[mod_name].bias
                    saved[slot] = b.detach().clone()
                    b.data.copy_(value)
                for slot, value in task.hooked.items():
                    mod_name, _ = _split_name(slot)
                    module = self._modules[mod_name]
                    hooks.append(module.register_forward_hook(_const_hook(value, _channel_dim(module))))
                for child, mod in task.heads.items():
                    heads[child] = getattr(base, child)
                    setattr(base, child, mod)
                logits = self._logits(base(**sub))
            finally:
                for child, mod in heads.items():
                    setattr(base, child, mod)
                for h in hooks:
                    h.remove()
                for slot, value in saved.items():
                    self._modules[_split_name(slot)[0]].bias.data.copy_(value)
            L = task.num_labels
            for j, i in enumerate(idx.tolist()):
                result[i] = logits[j][..., :L] if task.heads else logits[j]
        return result

    def _run_gather(self, groups, n, inputs) -> list:
        base = self.base
        device = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).device
        # row -> index into the per-call table of the distinct tasks in this batch
        row_task = torch.empty(n, dtype=torch.long, device=device)
        for k, (_, idx) in enumerate(groups):
            row_task[idx] = k
        slots: dict[str, list] = {}
        for k, (task, _) in enumerate(groups):
            for slot in list(task.swap) + list(task.hooked):
                slots.setdefault(slot, []).append(k)
        hooks, heads = [], {}
        try:
            for slot in slots:
                mod_name, _ = _split_name(slot)
                module = self._modules[mod_name]
                base_b = getattr(module, "bias", None)
                rows = []
                for task, _ in groups:
                    v = task.swap.get(slot)
                    if v is None:
                        v = task.hooked.get(slot)
                    if v is None:  # this task keeps the base value here
                        rows.append(None)
                    else:
                        rows.append(v)
                ref = next(r for r in rows if r is not None)
                if isinstance(base_b, torch.Tensor):  # swapped slot: add task minus base
                    b0 = base_b.detach()
                    table = torch.stack([(r - b0) if r is not None else torch.zeros_like(ref) for r in rows])
                else:
                    table = torch.stack([r if r is not None else torch.zeros_like(ref) for r in rows])
                delta = table[row_task]  # [rows, size]
                hooks.append(module.register_forward_hook(_row_hook(delta, n, _channel_dim(module), slot)))
            for child in self._head_names:
                per = []
                for task, idx in groups:
                    per.append((task.heads.get(child, getattr(base, child)), idx, task.num_labels))
                if not any(child in task.heads for task, _ in groups):
                    continue
                heads[child] = getattr(base, child)
                setattr(base, child, _RowDispatch(child, per))
            logits = self._logits(base(**inputs))
        finally:
            for child, mod in heads.items():
                setattr(base, child, mod)
            for h in hooks:
                h.remove()
        result: list = [None] * n
        for task, idx in groups:
            L = task.num_labels
            for i in idx.tolist():
                result[i] = logits[i][..., :L] if task.heads else logits[i]
        return result


def _check_finite(name: str, biases: dict, heads: dict) -> None:
    """Refuse a task whose biases or head hold NaN/inf: it would answer NaN (an error) for every row."""
    tensors = list(biases.items()) + [
        (f"{child}.{pname}", p) for child, mod in heads.items() for pname, p in mod.named_parameters()
    ]
    bad = [slot for slot, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise BitFitError(
            f"task {name!r} holds NaN/inf values in {bad[0]}{more}: its training diverged or the artifact is "
            "damaged; retrain it (e.g. with a lower learning rate) or use an earlier checkpoint"
        )


def _channel_dim(module: nn.Module) -> int:
    """Where a module's output keeps its bias dimension: 1 for convolutions, else the last."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


def _shape_for(out: torch.Tensor, size: int, channel_dim: int, batch: bool) -> list:
    shape = [1] * out.dim()
    shape[channel_dim] = size
    if batch:
        shape[0] = out.shape[0]
    return shape


def _const_hook(value: torch.Tensor, channel_dim: int):
    def hook(module, args, out):
        if not isinstance(out, torch.Tensor):
            raise BitFitError(f"cannot add a bias after {type(module).__name__}: it returns {type(out).__name__}")
        return out + value.to(out.dtype).view(_shape_for(out, value.shape[0], channel_dim, False))

    return hook


def _row_hook(delta: torch.Tensor, n: int, channel_dim: int, slot: str):
    def hook(module, args, out):
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.shape[0] != n:
            raise _GatherUnsupported(
                f"per-row biases need batch-first outputs; {slot} gave "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            )
        return out + delta.to(out.dtype).view(_shape_for(out, delta.shape[1], channel_dim, True))

    return hook


__all__ = ["BiasBank", "BankOutput", "choose_strategy", "GATHER_MAX_ROWS_PER_TASK"]
