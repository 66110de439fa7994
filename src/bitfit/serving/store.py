"""The bias bank's task storage: what it keeps per task and per bias slot, and how a task is checked.

A BitFit task differs from its base only in its biases (and its head). This module owns:

* :func:`build_task`: a task's tensors (:func:`bitfit.artifacts.task_tensors`) checked against the
  base (slot names, shapes, added biases, head parameters, NaN/inf) and turned into a
  :class:`BankTask` with its own head modules (sharing every parameter it does not replace);
* :class:`SlotTable`: per bias slot, one ``[tasks that train it, size]`` table holding the tasks'
  values (their only copy), and :class:`BiasPack`, which stores tables with the same owners side by
  side so a mixed call gathers them with one ``index_select``;
* :func:`repack`: re-packing the tables and pointing each task's bias views at them before the first
  call after tasks were added or removed; :func:`tensor_bytes` for the bank's memory report.

How the rows of these tables reach the layers during a call is :mod:`bitfit.serving.rowbias`.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ..errors import BitFitError
from .rowbias import bank_class, channel_dim, module_kind, split_name


def tensor_bytes(tensors) -> int:
    """Bytes held by the storages of ``tensors`` (each storage counted once)."""
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


class BankTask:
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
        self.pairs: Optional[bool] = None  # takes text pairs (True), single texts (False), or not known (None)

    def own_tensors(self, base_ptrs: set) -> list:
        out = list(self.swap.values()) + list(self.hooked.values())
        for m in self.heads.values():
            for t in list(m.parameters()) + list(m.buffers()):
                if t.untyped_storage().data_ptr() not in base_ptrs:
                    out.append(t)
        return out


class SlotTable:
    """One bias slot: the values of the tasks that train it, stacked ``[tasks, size]`` (their only copy)."""

    def __init__(self, slot: str, module: nn.Module, added: bool):
        self.slot = slot
        self.module = module
        self.added = added  # the base has no bias here
        self.kind = module_kind(module, added)
        self.cls = bank_class(type(module), self.kind)
        self.cdim = channel_dim(module)
        self.values: Optional[torch.Tensor] = None
        self.owners: list = []
        self.row_of: dict = {}  # owner -> row of ``values``, set by :func:`repack`
        self.pending: list = []  # values of owners added since the last repack (``[1, size]`` each), in order
        self.pack: Optional[BiasPack] = None  # the tables with the same owners, dtype and device, side by side
        self.offset = 0  # this table's first column in its pack
        self.adds_own_bias = self.kind == "post" and not added  # the module's forward adds its base bias itself

    def fill(self) -> torch.Tensor:
        """The value for a task that does not train this slot: the base's bias (zeros if added)."""
        ref = self.values[0]
        return torch.zeros_like(ref) if self.added else self.module.bias.detach().to(ref.dtype)

    def rows(self, picks: list, row_task: torch.Tensor) -> torch.Tensor:
        """Bias rows of a batch in which some tasks do not train this slot (theirs is the base's value):
        ``picks`` = table row (or -1) per distinct task of the batch, ``row_task`` = the distinct-task index of
        every batch row. (Slots every task of a batch trains are gathered per pack, see
        :class:`bitfit.serving.rowbias.CallPlan`.)"""
        fill = self.fill()
        return self.as_added(torch.stack([self.values[p] if p >= 0 else fill for p in picks]).index_select(0, row_task))

    def as_added(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` as what the bank adds after the module: task minus base where the module adds its own bias."""
        return rows - self.module.bias.detach().to(rows.dtype) if self.adds_own_bias else rows

    def add(self, name: str, value: torch.Tensor) -> None:
        """Append task ``name``'s value. It joins ``values`` at the next :func:`repack`: adding copies nothing, so
        adding many tasks in a row costs one copy of the table, not one per task."""
        self.pending.append(value.reshape(1, -1))
        self.owners.append(name)

    def settle(self) -> None:
        """Move the pending values into ``values`` (one copy)."""
        if self.pending:
            self.values = torch.cat(([] if self.values is None else [self.values]) + self.pending)
            self.pending = []

    def remove(self, name: str) -> None:
        self.settle()
        row = self.owners.index(name)
        keep = [i for i in range(len(self.owners)) if i != row]
        self.values = self.values[keep] if keep else None  # indexing with a list copies
        self.owners.pop(row)

    def value(self, name: str) -> torch.Tensor:
        return self.values[self.row_of[name]]


class BiasPack:
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


def repack(tables: dict, tasks: dict) -> None:
    """Settle the slot tables' pending values, re-pack the tables (:class:`BiasPack`) and point every owner's
    bias views at them; tables with the same owners share one ``row_of`` dict, so a call looks each batch's rows
    up once per owner list. The bank runs this once before a call that follows any number of adds and removes.

    ``tables``: slot name -> :class:`SlotTable`; ``tasks``: task name -> :class:`BankTask`."""
    shared: dict = {}
    packs: dict = {}
    for table in tables.values():
        table.settle()
        owners = tuple(table.owners)
        row_of = shared.get(owners)
        if row_of is None:
            row_of = shared[owners] = {n: i for i, n in enumerate(owners)}
        table.row_of = row_of
        key = (owners, table.values.dtype, table.values.device)
        packs.setdefault(key, []).append(table)
    for group in packs.values():
        BiasPack(group)
    for table in tables.values():
        for owner, row in zip(table.owners, table.values.unbind(0)):  # views, one C call per table
            t = tasks[owner]
            (t.hooked if table.added else t.swap)[table.slot] = row


# ------------------------------------------------------------------------ building a task
def head_of(head_names, pname: str) -> Optional[str]:
    """The head module (a path: ``classifier``, ``bert.pooler``) among ``head_names`` that holds parameter
    ``pname``."""
    return next((h for h in sorted(head_names, key=len, reverse=True) if pname.startswith(h + ".")), None)


def build_task(base: nn.Module, modules: dict, head_names, name: str, tt) -> BankTask:
    """Task ``name`` from its tensors ``tt`` (:class:`bitfit.artifacts.TaskTensors`), checked against ``base``
    (``modules``: its named modules; ``head_names``: its head children)."""
    from ..artifacts import locate

    meta = dict(getattr(tt, "meta", {}) or {})
    added = set(getattr(tt, "added", []) or [])
    swap, hooked = {}, {}
    head = dict(tt.head or {})
    prefix = meta.get("base_prefix", "") or ""
    for saved_slot, value in tt.biases.items():
        slot = locate(base, saved_slot, prefix) or saved_slot
        if saved_slot not in added and head_of(head_names, slot) is not None:
            # saved with pooler_head=False: the untrained pooler's bias was a BitFit bias; here that pooler
            # is a per-task head module (its weight stays the base's)
            head[slot] = value
            continue
        mod_name, leaf = split_name(slot)
        module = modules.get(mod_name)
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
    heads = build_heads(base, head_names, name, head)
    check_finite(name, {**swap, **hooked}, heads)
    cfg = getattr(base, "config", None)
    num_labels = meta.get("num_labels") or getattr(cfg, "num_labels", None) or 1
    id2label = meta.get("id2label") or ({} if tt.head else dict(getattr(cfg, "id2label", {}) or {}))
    id2label = {int(k): str(v) for k, v in id2label.items()}
    problem_type = meta.get("problem_type") or (
        "regression" if num_labels == 1 else "single_label_classification"
    )
    return BankTask(name, swap, hooked, heads, int(num_labels), id2label, problem_type, meta)


def build_heads(base: nn.Module, head_names, name: str, head: dict) -> dict:
    """Task ``name``'s head children: copies of the base's head modules holding the task's trained head
    parameters (``head``: parameter name -> value); parameters the task does not replace stay shared."""
    if not head:
        return {}
    if not head_names:
        raise BitFitError(
            f"task {name!r} has a trained head ({', '.join(sorted(head)[:3])}...) but the base model "
            f"{type(base).__name__} has no task head to hold it; load the base with its head class, "
            "e.g. AutoModelForSequenceClassification.from_pretrained(...)"
        )
    heads = {}
    by_child: dict[str, dict] = {}
    for pname, value in head.items():
        child = head_of(head_names, pname)
        if child is None:
            raise BitFitError(
                f"task {name!r} has head parameter {pname!r}, but the base model's head is "
                f"{head_names}; the task was trained with another head class"
            )
        by_child.setdefault(child, {})[pname[len(child) + 1:]] = value
    for child, params in by_child.items():
        base_child = base.get_submodule(child)
        # Copy the module structure only: parameters the task does not replace stay shared.
        memo = {id(t): t for t in list(base_child.parameters()) + list(base_child.buffers())}
        mod = copy.deepcopy(base_child, memo)
        existing = dict(mod.named_parameters())
        for pname, value in params.items():
            if pname not in existing:
                raise BitFitError(f"task {name!r}: head parameter {child}.{pname} does not exist in the base head")
            owner_name, leaf = split_name(pname)
            owner = mod.get_submodule(owner_name) if owner_name else mod
            ref = existing[pname]
            value = value.detach().to(ref.device, ref.dtype).clone()
            setattr(owner, leaf, nn.Parameter(value, requires_grad=False))
        mod.eval()
        heads[child] = mod
    return heads


def check_finite(name: str, biases: dict, heads: dict) -> None:
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


__all__ = ["BankTask", "BiasPack", "SlotTable", "build_heads", "build_task", "check_finite", "head_of", "repack",
           "tensor_bytes"]
