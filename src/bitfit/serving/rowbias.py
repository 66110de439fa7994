"""Per-row biases inside one forward pass: the machinery a mixed-task bank call installs on the base.

This module owns how the rows of one batch each run with their own task's biases and head, without
copying or writing the base's parameters:

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
* head children are replaced for the call by a :class:`RowDispatch` that sends each row to its
  task's head;
* which modules a list of tasks touches, their bank classes and where their rows come from is
  worked out once per task list (a :class:`CallPlan`), so a call's own Python work is one gather
  per pack of slot tables and two class switches a module (:func:`installed`).

The slot tables the rows come from are kept by :mod:`bitfit.serving.store`; the bank itself
(:mod:`bitfit.serving.bank`) decides when to install them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BitFitError


def split_name(name: str) -> tuple[str, str]:
    """``("parent.path", "leaf")`` of a dotted module or parameter name (``""`` parent at the top)."""
    return tuple(name.rsplit(".", 1)) if "." in name else ("", name)  # type: ignore[return-value]


def channel_dim(module: nn.Module) -> int:
    """Where a module's output keeps its bias dimension: 1 for convolutions, else the last."""
    return 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1


class GatherUnsupported(BitFitError):
    """The model's layers do not keep batch-first activations (or a head returns no tensor), so rows of
    different tasks cannot share one pass; the bank falls back to one pass per task."""


class RowDispatch(nn.Module):
    """Stands in for a head child during a gathered pass: each row goes to its task's head. One instance per
    head child and task list is kept in the bank's call plan; :meth:`route` sets a call's rows."""

    def __init__(self, name: str):
        super().__init__()
        self.child_name = name
        self.__dict__["groups"] = []  # list of (module, row index LongTensor, n_labels)

    def route(self, groups: list, n: int) -> "RowDispatch":
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
            raise GatherUnsupported(f"head {self.child_name!r} returns {type(first).__name__}, not a tensor")
        width = max(o.shape[-1] for o in outs)
        for o in outs:
            if o.shape[1:-1] != first.shape[1:-1]:
                raise GatherUnsupported(f"head {self.child_name!r} gives rows of different shapes")
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


def _not_batch_first(module: nn.Module, x, n: int) -> GatherUnsupported:
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
    return GatherUnsupported(
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


def bank_class(cls: type, kind: str) -> type:
    """The bank subclass of module class ``cls`` whose forward applies per-row biases the ``kind`` way."""
    key = (cls, kind)
    sub = _CLASSES.get(key)
    if sub is None:
        sub = type(f"BitFitBank{cls.__name__}", (cls,), {"forward": _FORWARDS[kind], "_bitfit_orig": cls,
                                                           "__module__": __name__})
        _CLASSES[key] = sub
    return sub


def module_kind(module: nn.Module, added: bool) -> str:
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


# ------------------------------------------------------------------------------ call plans
class CallPlan:
    """What a call over one list of distinct tasks installs, worked out once: which slot tables the batch
    touches, each table's module and bank class, and where its rows come from (a pack every task trains:
    one gather for the pack, its tables' rows are views of it; a slot only some tasks train: per call,
    with the base's value for the others). Holds references, no copies; the bank drops its plans
    whenever a task is added or removed.

    ``tables``: slot name -> :class:`bitfit.serving.store.SlotTable`; ``tasks``: name -> the bank's
    task record; ``head_names``: the base's head children."""

    def __init__(self, base: nn.Module, tables: dict, tasks: dict, head_names, names: tuple, device):
        self.single: list = []  # one task: (module, class, cdim, table, table row)
        self.packs: list = []  # several tasks: (pack, table row per task, column sizes, [(module, class, cdim, table)])
        self.partial: list = []  # several tasks: (module, class, cdim, table, table row or -1 per task)
        by_pack: dict = {}
        for table in tables.values():
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
        chosen = [tasks[nm] for nm in names]

        def where(child: str) -> tuple:  # the head child's parent module and attribute name
            owner, leaf = split_name(child)
            return (base.get_submodule(owner) if owner else base), leaf

        self.single_heads = [(*where(c), mod) for c, mod in chosen[0].heads.items()] if len(names) == 1 else []
        self.dispatch = [] if len(names) == 1 else [
            (*where(child), child, RowDispatch(child)) for child in head_names
            if any(child in t.heads for t in chosen)
        ]


@contextmanager
def installed(plan: CallPlan, row_task: Optional[torch.Tensor], n: int, groups=None):
    """Per-row biases (and heads) of a call's tasks in place on the base for one forward pass or one
    ``generate`` call; afterwards (also after an error) every module has its own class and head back.

    ``plan``: the call plan of the batch's distinct tasks; ``row_task``: the index into those tasks of
    every row (None when there is one task: each module then runs its own op with that task's bias).
    ``groups``: (task, row index tensor) pairs for the head dispatch (several tasks only).
    The bias rows are gathered here, once per call: one ``index_select`` per pack of slot tables,
    whose views the modules read.
    """
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
            if isinstance(replaced, RowDispatch):
                replaced.release()
        for module in reversed(switched):
            _restore(module)


__all__ = ["CallPlan", "GatherUnsupported", "RowDispatch", "bank_class", "channel_dim", "installed", "module_kind",
           "split_name"]
