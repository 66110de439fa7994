"""Many BitFit tasks over one frozen base model: the bias bank.

A BitFit task differs from its base only in its biases (and its head), so one copy of the
base weights can serve any number of tasks. :class:`BiasBank` keeps the base once and, per
task, only what the task's artifact holds: the trained bias values and the head.

Per bias slot the bank keeps one table ``[tasks that train it, size]`` (the tasks' own
values, nothing else). A call runs every row with its own task's biases and head; the
biases are applied *inside* the layers' own computation:

* for the duration of a call, each biased module of the base whose slot a task in the batch
  trains has its class switched to a bank subclass (no hook, no copy, no parameter written);
  the bank sets, once per call, the per-row bias rows ``table[row's task]`` on the module;
* ``nn.Linear`` / GPT-2's ``Conv1D``: the output buffer is filled with the row's bias
  (broadcast over tokens) and the matmul accumulates into it (``addmm_``): the same
  arithmetic as the base's own ``addmm(bias, x, W.T)``, so each row is bit for bit what its
  task's own model computes on the same batch;
* ``nn.LayerNorm``: ``addcmul(bias_rows, layer_norm(x), weight)``, bit for bit the fused
  affine norm; added biases after a norm (RMSNorm) or other module types: ``out + bias_rows``
  (as the BitFit model's own hook computes);
* one task in the batch: the module calls ``F.linear(x, W, task_bias)`` (the task's own op);
* which modules a list of tasks touches, their bank classes and where their rows come from is
  worked out once per task list (a call plan, dropped when a task is added or removed), so a
  call's own Python work is one gather per pack of slot tables and two class switches a module.

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

import copy
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitFitError

# Kept for compatibility: the per-row pass now costs what the plain base costs, so ``auto``
# gathers at any number of rows per task (docs/SERVING.md, benchmarks/bank_throughput.py).
GATHER_MAX_ROWS_PER_TASK = float("inf")

STRATEGIES = ("auto", "group", "gather")


def choose_strategy(n_rows: int, n_tasks: int) -> str:
    """The strategy ``"auto"`` uses for a batch of ``n_rows`` rows over ``n_tasks`` distinct tasks."""
    if n_tasks <= 1:
        return "group"
    return "gather" if n_rows / n_tasks <= GATHER_MAX_ROWS_PER_TASK else "group"


# ---------------------------------------------------------------------------------- helpers
def _split_name(name: str) -> tuple[str, str]:
    return tuple(name.rsplit(".", 1)) if "." in name else ("", name)  # type: ignore[return-value]


def _get_child(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


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
    """Stands in for a head child during a gathered pass: each row goes to its task's head. One instance per
    head child and task list is kept in the bank's call plan; :meth:`route` sets a call's rows."""

    def __init__(self, name: str):
        super().__init__()
        self.child_name = name
        self.__dict__["groups"] = []  # list of (module, row index LongTensor, n_labels)

    def route(self, groups: list, n: int) -> "_RowDispatch":
        d = self.__dict__
        d["groups"] = groups
        d["n_rows"] = n
        order = torch.cat([idx for _, idx, _ in groups])  # batch row of each stacked output row
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        d["inverse"] = inverse  # stacked position of each batch row
        return self

    def release(self) -> None:
        self.__dict__["groups"] = []  # no reference to a call's heads or rows is kept
        self.__dict__.pop("inverse", None)

    def forward(self, *args, **kwargs):
        n = self.n_rows

        def take(v, idx):
            return v.index_select(0, idx) if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v

        outs = []
        for module, idx, _ in self.groups:
            a = [take(v, idx) for v in args]
            k = {key: take(v, idx) for key, v in kwargs.items()}
            outs.append(module(*a, **k))
        first = outs[0]
        if not isinstance(first, torch.Tensor):
            raise _GatherUnsupported(f"head {self.child_name!r} returns {type(first).__name__}, not a tensor")
        width = max(o.shape[-1] for o in outs)
        for o in outs:
            if o.shape[1:-1] != first.shape[1:-1]:
                raise _GatherUnsupported(f"head {self.child_name!r} gives rows of different shapes")
        # the groups' outputs, zero-padded to one width, stacked in group order, then put back in row order by
        # one gather (no per-group scatter)
        stacked = torch.cat([o if o.shape[-1] == width else F.pad(o, (0, width - o.shape[-1])) for o in outs])
        return stacked.index_select(0, self.inverse.to(stacked.device))


# ----------------------------------------------------------------- per-row bias modules
# During a call the bank switches the class of each biased module it touches to one of these
# subclasses and stores the bias rows on the module (``__dict__["_bitfit_rows"]``): a tensor
# ``[size]`` (every row the same task) or ``[rows, size]`` (row i: its task's value). Nothing
# else changes: the module keeps its own parameters; its own class comes back after the call.
_ROWS = "_bitfit_rows"
_CDIM = "_bitfit_cdim"


def _not_batch_first(module: nn.Module, x, n: int) -> _GatherUnsupported:
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
    return _GatherUnsupported(
        f"per-row biases need batch-first activations; {type(module).__name__} got {shape} for {n} rows"
    )


def _addmm_rows(module: nn.Module, x: torch.Tensor, wt: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x @ wt + rows[row]`` for ``x`` ``[rows, ..., in]``: the output is filled with each row's bias
    and the matmul accumulates into it, which is what ``addmm(bias, x, wt)`` does for one bias."""
    n, size = rows.shape
    if x.dim() < 2 or x.shape[0] != n:
        raise _not_batch_first(module, x, n)
    lead = x.shape[:-1]
    out = torch.empty((*lead, size), dtype=x.dtype, device=x.device)
    out.copy_(rows.view(n, *([1] * (len(lead) - 1)), size))
    if x.dim() == 2 or x.is_contiguous():  # the layout F.linear runs as one addmm
        out.view(-1, size).addmm_(x.reshape(-1, x.shape[-1]), wt)
        return out
    return torch.matmul(x, wt).add_(out)


def _linear_forward(self, input: torch.Tensor) -> torch.Tensor:
    rows = self.__dict__[_ROWS]
    if rows.dim() == 1:
        return F.linear(input, self.weight, rows)
    return _addmm_rows(self, input, self.weight.t(), rows)


def _conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    """transformers' Conv1D (GPT-2): ``addmm(bias, x, weight)`` with a [in, out] weight."""
    rows = self.__dict__[_ROWS]
    if rows.dim() == 1:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(rows, x.view(-1, x.size(-1)), self.weight).view(size_out)
    return _addmm_rows(self, x, self.weight, rows)


def _layer_norm_forward(self, input: torch.Tensor) -> torch.Tensor:
    rows = self.__dict__[_ROWS]
    if rows.dim() == 1:
        return F.layer_norm(input, self.normalized_shape, self.weight, rows, self.eps)
    n, size = rows.shape
    if input.dim() < 2 or input.shape[0] != n:
        raise _not_batch_first(self, input, n)
    ones, zeros = _unit_affine(size, input.dtype, input.device)
    # the normalised input, through the affine kernel with weight 1 and bias 0 (the same values as no affine,
    # about twice as fast on CPU), then weight and the rows' biases in one pass
    z = F.layer_norm(input, self.normalized_shape, ones, zeros, self.eps)
    view = rows.view(n, *([1] * (input.dim() - 2)), size)
    if self.weight is None:
        return z.add_(view)
    return torch.addcmul(view, z, self.weight, out=z)  # bit for bit the fused affine norm


_UNIT: dict = {}


def _unit_affine(size: int, dtype, device) -> tuple:
    """Cached all-ones weight and all-zeros bias of one size, dtype and device (for per-row norms)."""
    key = (size, dtype, device)
    hit = _UNIT.get(key)
    if hit is None:
        hit = _UNIT[key] = (torch.ones(size, dtype=dtype, device=device), torch.zeros(size, dtype=dtype, device=device))
    return hit


def _post_forward(self, *args, **kwargs):
    """Any other module: its own forward, then ``+ rows`` along its channel dimension (the rows hold
    the task's value for an added bias, task minus base where the module has a bias of its own)."""
    out = type(self)._bitfit_orig.forward(self, *args, **kwargs)
    rows = self.__dict__[_ROWS]
    cdim = self.__dict__[_CDIM]
    if not isinstance(out, torch.Tensor):
        raise BitFitError(f"cannot add a bias after {type(self).__name__}: it returns {type(out).__name__}")
    shape = [1] * out.dim()
    shape[cdim] = rows.shape[-1]
    if rows.dim() == 2:
        if out.dim() < 2 or out.shape[0] != rows.shape[0]:
            raise _not_batch_first(self, out, rows.shape[0])
        shape[0] = rows.shape[0]
    return out + rows.to(out.dtype).view(shape)


_FORWARDS = {"linear": _linear_forward, "conv1d": _conv1d_forward, "norm": _layer_norm_forward,
             "post": _post_forward}
_CLASSES: dict = {}


def _bank_class(cls: type, kind: str) -> type:
    key = (cls, kind)
    sub = _CLASSES.get(key)
    if sub is None:
        sub = type(f"BitFitBank{cls.__name__}", (cls,), {"forward": _FORWARDS[kind], "_bitfit_orig": cls,
                                                           "__module__": __name__})
        _CLASSES[key] = sub
    return sub


def _kind(module: nn.Module, added: bool) -> str:
    """How the bank applies per-row biases to ``module`` (see the module docstring)."""
    cls = type(module)
    if isinstance(module, nn.Linear) and cls.forward is nn.Linear.forward:
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = None
    if Conv1D is not None and isinstance(module, Conv1D) and cls.forward is Conv1D.forward:
        return "conv1d"
    if (not added and isinstance(module, nn.LayerNorm) and cls.forward is nn.LayerNorm.forward
            and len(module.normalized_shape) == 1):
        return "norm"
    return "post"


class _SlotTable:
    """One bias slot: the values of the tasks that train it, stacked ``[tasks, size]`` (their only copy)."""

    def __init__(self, slot: str, module: nn.Module, added: bool):
        self.slot = slot
        self.module = module
        self.added = added  # the base has no bias here
        self.kind = _kind(module, added)
        self.cls = _bank_class(type(module), self.kind)
        self.cdim = _channel_dim(module)
        self.values: Optional[torch.Tensor] = None
        self.owners: list = []
        self.row_of: dict = {}
        self.pack: Optional[_Pack] = None  # the tables with the same owners, dtype and device, side by side
        self.offset = 0  # this table's first column in its pack
        self.adds_own_bias = self.kind == "post" and not added  # the module's forward adds its base bias itself

    def fill(self) -> torch.Tensor:
        """The value for a task that does not train this slot: the base's bias (zeros if added)."""
        ref = self.values[0]
        return torch.zeros_like(ref) if self.added else self.module.bias.detach().to(ref.dtype)

    def rows(self, picks: list, row_task: torch.Tensor) -> torch.Tensor:
        """Bias rows of a batch in which some tasks do not train this slot (theirs is the base's value):
        ``picks`` = table row (or -1) per distinct task of the batch, ``row_task`` = the distinct-task index of
        every batch row. (Slots every task of a batch trains are gathered per pack, see :class:`_Plan`.)"""
        fill = self.fill()
        return self.as_added(torch.stack([self.values[p] if p >= 0 else fill for p in picks]).index_select(0, row_task))

    def as_added(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` as what the bank adds after the module: task minus base where the module adds its own bias."""
        return rows - self.module.bias.detach().to(rows.dtype) if self.adds_own_bias else rows

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.reshape(1, -1)
        self.values = value.clone() if self.values is None else torch.cat([self.values, value])
        self.owners.append(name)
        self.row_of = {n: i for i, n in enumerate(self.owners)}

    def remove(self, name: str) -> None:
        row = self.row_of[name]
        keep = [i for i in range(len(self.owners)) if i != row]
        self.values = self.values[keep].clone() if keep else None
        self.owners.pop(row)
        self.row_of = {n: i for i, n in enumerate(self.owners)}

    def value(self, name: str) -> torch.Tensor:
        return self.values[self.row_of[name]]


class _Pack:
    """Slot tables with the same owners (in the same order), dtype and device, stored side by side in one
    ``[tasks, sum of sizes]`` tensor; each table's ``values`` is a view of its columns (still the only copy).
    A mixed call gathers a pack's rows once (one ``index_select``) instead of once per slot."""

    def __init__(self, tables: list):
        self.values = torch.cat([t.values for t in tables], dim=1) if len(tables) > 1 else tables[0].values
        off = 0
        for t in tables:
            size = t.values.shape[1]
            t.values, t.pack, t.offset = self.values[:, off:off + size], self, off
            off += size


_set_class = object.__setattr__  # nn.Module.__setattr__ costs ~5x more per switch, and a call switches every slot


def _switch(module: nn.Module, cls: type, rows: torch.Tensor, cdim: int) -> None:
    """Give ``module`` its per-row bias rows and its bank class for one call."""
    d = module.__dict__
    d[_ROWS] = rows
    d[_CDIM] = cdim
    _set_class(module, "__class__", cls)


def _restore(module: nn.Module) -> None:
    _set_class(module, "__class__", type(module)._bitfit_orig)
    d = module.__dict__
    d.pop(_ROWS, None)
    d.pop(_CDIM, None)


_MAX_PLANS = 256  # cached task lists per bank (each plan holds references only, no tensor copies)


class _Plan:
    """What a call over one list of distinct tasks installs, worked out once: which slot tables the batch
    touches, each table's module and bank class, and where its rows come from (a pack every task trains:
    one gather for the pack, its tables' rows are views of it; a slot only some tasks train: per call,
    with the base's value for the others). Holds references, no copies; the bank drops its plans
    whenever a task is added or removed."""

    def __init__(self, bank: "BiasBank", names: tuple, device):
        self.single: list = []  # one task: (module, class, cdim, table, table row)
        self.packs: list = []  # several tasks: (pack, table row per task, column sizes, [(module, class, cdim, table)])
        self.partial: list = []  # several tasks: (module, class, cdim, table, table row or -1 per task)
        by_pack: dict = {}
        for table in bank._tables.values():
            picks = [table.row_of.get(nm, -1) for nm in names]
            if all(p < 0 for p in picks):
                continue  # no task of the batch trains the slot: the base's own bias
            module = table.module
            if len(names) == 1:
                self.single.append((module, table.cls, table.cdim, table, picks[0]))
            elif all(p >= 0 for p in picks):
                by_pack.setdefault(id(table.pack), (table.pack, picks, []))[2].append(table)
            else:
                self.partial.append((module, table.cls, table.cdim, table, picks))
        for pack, picks, members in by_pack.values():
            members.sort(key=lambda t: t.offset)
            covered = sum(t.values.shape[1] for t in members)
            if covered != pack.values.shape[1]:  # pragma: no cover - a pack's tables share their owners
                raise BitFitError("internal error: a bias pack is only partly owned by its tasks")
            self.packs.append((pack, torch.tensor(picks, dtype=torch.long, device=device),
                               [t.values.shape[1] for t in members],
                               [(t.module, t.cls, t.cdim, t) for t in members]))
        tasks = [bank._tasks[nm] for nm in names]

        def where(child: str) -> tuple:  # the head child's parent module and attribute name
            owner, leaf = _split_name(child)
            return (bank.base.get_submodule(owner) if owner else bank.base), leaf

        self.single_heads = [(*where(c), mod) for c, mod in tasks[0].heads.items()] if len(names) == 1 else []
        self.dispatch = [] if len(names) == 1 else [
            (*where(child), child, _RowDispatch(child)) for child in bank._head_names
            if any(child in t.heads for t in tasks)
        ]


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
        self._tasks: dict[str, _Task] = {}
        self._head_names, _ = head_module_names(self.base)
        self._modules = dict(self.base.named_modules())
        self._gather_ok = True  # set False when the model turns out not to allow per-row biases
        self._tables: dict[str, _SlotTable] = {}  # slot name -> the tasks' values for it
        self._plans: dict = {}  # (task names, device) -> _Plan of a call over those tasks
        self.stats = {"calls": 0, "rows": 0, "group": 0, "gather": 0}
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
        from ..artifacts import task_tensors

        tt = task_tensors(self.base, source, strict=self.strict)
        task = self._build_task(name, tt)
        with self._lock:
            if name in self._tasks:
                self._drop(name)
            self._store(task)

    def remove_task(self, name: str) -> None:
        with self._lock:
            self._get(name)
            self._drop(name)

    def _store(self, task: _Task) -> None:
        """Move the task's bias values into the slot tables (their only copy) and keep views."""
        touched = []
        for values, added in ((task.swap, False), (task.hooked, True)):
            for slot, value in values.items():
                table = self._tables.get(slot)
                if table is None:
                    table = self._tables[slot] = _SlotTable(slot, self._modules[_split_name(slot)[0]], added)
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
            if table.values is None:
                del self._tables[slot]
            else:
                touched.append(table)
        self._refresh(touched)

    def _refresh(self, tables) -> None:
        """Re-pack the tables (:class:`_Pack`) and point every owner's bias views at them; tables with the
        same owners share one ``row_of`` dict, so a call looks each batch's rows up once per owner list.
        Every cached call plan is dropped (they name the old packs)."""
        self._plans.clear()
        shared: dict = {}
        packs: dict = {}
        for table in self._tables.values():
            table.row_of = shared.setdefault(tuple(table.owners), table.row_of)
            key = (tuple(table.owners), table.values.dtype, table.values.device)
            packs.setdefault(key, []).append(table)
        for group in packs.values():
            _Pack(group)
        for table in self._tables.values():
            for owner in table.owners:
                t = self._tasks[owner]
                (t.hooked if table.added else t.swap)[table.slot] = table.value(owner)

    def _head_of(self, pname: str) -> Optional[str]:
        """The head module (a path: ``classifier``, ``bert.pooler``) that holds parameter ``pname``."""
        return next((h for h in sorted(self._head_names, key=len, reverse=True) if pname.startswith(h + ".")), None)

    def _build_task(self, name: str, tt) -> _Task:
        meta = dict(getattr(tt, "meta", {}) or {})
        added = set(getattr(tt, "added", []) or [])
        swap, hooked = {}, {}
        head = dict(tt.head or {})
        from ..artifacts import locate

        prefix = meta.get("base_prefix", "") or ""
        for saved_slot, value in tt.biases.items():
            slot = locate(self.base, saved_slot, prefix) or saved_slot
            if saved_slot not in added and self._head_of(slot) is not None:
                # saved with pooler_head=False: the untrained pooler's bias was a BitFit bias; here that pooler
                # is a per-task head module (its weight stays the base's)
                head[slot] = value
                continue
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
        heads = self._build_heads(name, head)
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
            child = self._head_of(pname)
            if child is None:
                raise BitFitError(
                    f"task {name!r} has head parameter {pname!r}, but the base model's head is "
                    f"{self._head_names}; the task was trained with another head class"
                )
            by_child.setdefault(child, {})[pname[len(child) + 1:]] = value
        for child, params in by_child.items():
            base_child = _get_child(self.base, child)
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
        """Bytes held: ``base`` (shared model), ``tasks`` (name -> the task's own tensors), ``total``.

        A task's biases live in the bank's per-slot tables (views), counted by their own size."""
        base_tensors = list(self.base.parameters()) + list(self.base.buffers())
        base_ptrs = {t.untyped_storage().data_ptr() for t in base_tensors}
        per_task = {}
        for n, t in self._tasks.items():
            biases = sum(v.numel() * v.element_size() for v in list(t.swap.values()) + list(t.hooked.values()))
            heads = [x for m in t.heads.values() for x in list(m.parameters()) + list(m.buffers())
                     if x.untyped_storage().data_ptr() not in base_ptrs]
            per_task[n] = biases + _tensor_bytes(heads)
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

    def _plan(self, names: tuple, device) -> "_Plan":
        """The call plan of a list of distinct tasks (cached until a task is added or removed)."""
        key = (names, device)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = _Plan(self, names, device)
        return plan

    @contextmanager
    def _installed(self, tasks: list, row_task: Optional[torch.Tensor], n: int, groups=None):
        """Per-row biases (and heads) of ``tasks`` in place on the base for one forward pass or one
        ``generate`` call.

        ``tasks``: the distinct tasks of the batch; ``row_task``: the index into ``tasks`` of every
        row (None when there is one task: each module then runs its own op with that task's bias).
        ``groups``: (task, row index tensor) pairs for the head dispatch (several tasks only).
        The bias rows are gathered here, once per call: one ``index_select`` per pack of slot tables,
        whose views the modules read; which modules and packs a task list touches comes from its plan.
        """
        plan = self._plan(tuple(t.name for t in tasks), None if row_task is None else row_task.device)
        switched, heads = [], []
        try:
            if row_task is None:
                for module, cls, cdim, table, pick in plan.single:
                    _switch(module, cls, table.as_added(table.values[pick]), cdim)
                    switched.append(module)
                for parent, leaf, mod in plan.single_heads:
                    heads.append((parent, leaf, parent._modules[leaf]))
                    parent._modules[leaf] = mod  # what setattr does for a module, without its checks
            else:
                for pack, picks, sizes, entries in plan.packs:  # slots every task of the batch trains
                    views = pack.values.index_select(0, picks.index_select(0, row_task)).split(sizes, dim=1)
                    for (module, cls, cdim, table), rows in zip(entries, views):
                        _switch(module, cls, table.as_added(rows), cdim)
                        switched.append(module)
                for module, cls, cdim, table, picks in plan.partial:  # slots only some of them train
                    _switch(module, cls, table.rows(picks, row_task), cdim)
                    switched.append(module)
                for parent, leaf, child, dispatch in plan.dispatch:
                    own = parent._modules[leaf]
                    per = [(task.heads.get(child, own), idx, task.num_labels) for task, idx in groups]
                    heads.append((parent, leaf, own))
                    parent._modules[leaf] = dispatch.route(per, n)
            yield
        finally:
            for parent, leaf, own in heads:
                replaced = parent._modules[leaf]
                parent._modules[leaf] = own
                if isinstance(replaced, _RowDispatch):
                    replaced.release()
            for module in reversed(switched):
                _restore(module)

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
        with self._lock:
            order: dict[str, list] = {}
            for i, t in enumerate(rows):
                self._get(t)
                order.setdefault(t, []).append(i)
            device = input_ids.device
            groups = [(self._tasks[t], torch.tensor(r, dtype=torch.long, device=device)) for t, r in order.items()]
            row_task = None if len(groups) == 1 else self._row_task(groups, len(rows), device)
            was_training = self.base.training
            if was_training:
                self.base.eval()
            try:
                with torch.no_grad(), self._installed([t for t, _ in groups], row_task, len(rows), groups):
                    try:
                        out = self.base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                    except _GatherUnsupported as exc:
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


__all__ = ["BiasBank", "BankOutput", "choose_strategy", "GATHER_MAX_ROWS_PER_TASK"]
