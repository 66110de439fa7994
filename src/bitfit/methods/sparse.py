"""Sparse BitFit: train only the most important bias entries, under an exact budget.

The importance of a bias entry is measured on a few labelled batches before training, with every
parameter as it is: ``grad`` sums ``|dL/db|`` over the batches, ``fisher`` sums ``(dL/db)^2``. The
gradient of a bias is the gradient of its module's output summed over every position, so a forward
hook that adds a zero vector to the output gives it for every slot of the selection, whether the
bias exists yet or would be added (``add_missing``), without touching the model.

The ``budget`` (a fraction of the selection's bias entries, or a count) is met exactly: entries are
ranked by score, ties by their place in the model (slot order, then index), so the same model and
batches always choose the same entries. :func:`bitfit.apply` with ``budget=`` and ``batches=`` (or
``entries=``) trains the chosen entries through the same mask a fused q/k/v slice uses
(:class:`bitfit.core.prepare.SliceMask`): every other entry is its pretrained value bit for bit whatever the
optimizer does. The head is not counted and trains as in BitFit.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..core.config import IMPORTANCE_SCORES, IMPORTANCE_UNITS, BitFitConfig, parse_budget
from ..errors import BitFitConfigError, BitFitError, DataError
from ..core.roles import ModelMap, discover
from ..core.prepare import register_entry_chooser
from ..core.select import Selection, resolve


def candidates(model_map: ModelMap, selection: Selection) -> dict:
    """slot name -> the indices of its bias the selection covers (all, or a fused slot's role slices),
    in model order."""
    out = {}
    for slot in model_map.slots:
        roles = selection.chosen.get(slot.name)
        if roles:
            idx = slot.indices(roles)
            out[slot.name] = torch.arange(slot.size) if idx is None else idx
    return out


def budget_count(budget, available: int) -> int:
    """The exact number of entries ``budget`` means among ``available``: a fraction rounds half up (at
    least 1), a count is itself; more than ``available`` is a BitFitConfigError."""
    b = parse_budget(budget)
    if b is None:
        raise BitFitConfigError("no budget given")
    n = max(1, int(b * available + 0.5)) if isinstance(b, float) else b
    if n > available:
        raise BitFitConfigError(
            f"budget={budget!r} asks for {n} bias entries but the selection has only {available}; give at most "
            f"{available}, or a fraction such as 0.5"
        )
    return n


def _batch_to(batch, device):
    if not isinstance(batch, dict) and not hasattr(batch, "keys"):
        raise DataError(f"each batch must be a dict of model inputs with labels, got {type(batch).__name__}")
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def importance_scores(model: nn.Module, batches: Iterable, slots: list, score: str = "grad",
                      max_batches: Optional[int] = None, loss_fn: Optional[Callable] = None) -> dict:
    """slot name -> float64 score of every entry of its bias (full size), summed over ``batches``.

    ``slots``: the :class:`bitfit.core.roles.BiasSlot` objects to score (``bitfit.discover(model).slots``).
    ``batches``: dicts of model inputs with labels (``model(**batch).loss`` is the loss, or
    ``loss_fn(model, batch)``); the first ``max_batches`` are used. Dropout is off while scoring and no
    parameter takes part in autograd; the parameters, their gradients, requires_grad flags and the
    model's training mode are left as they were.
    """
    if score not in IMPORTANCE_SCORES:
        raise BitFitConfigError(f"score={score!r}: use one of {', '.join(IMPORTANCE_SCORES)}")
    slot_names = [s.name for s in slots]
    slots = {s.name: s for s in slots}
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    zeros, handles = {}, []

    def hook_for(name):
        def add_zero(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.shape[-1] != zeros[name].numel():
                raise BitFitError(f"cannot score {name}: its module's output is not a [..., {zeros[name].numel()}] tensor")
            return output + zeros[name].to(output.dtype)
        return add_zero

    for name in slot_names:
        slot = slots[name]
        zeros[name] = torch.zeros(slot.size, device=device, requires_grad=True)
        module = model.get_submodule(slot.module_name) if slot.module_name else model
        handles.append(module.register_forward_hook(hook_for(name)))
    sums = {name: torch.zeros(slots[name].size, dtype=torch.float64) for name in slot_names}
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    used = 0
    try:
        for p, _ in flags:  # only the zero vectors need a gradient: no weight-gradient graph is kept
            p.requires_grad_(False)
        for batch in itertools.islice(batches, max_batches):
            batch = _batch_to(batch, device)
            loss = loss_fn(model, batch) if loss_fn is not None else getattr(model(**batch), "loss", None)
            if not isinstance(loss, torch.Tensor):
                raise DataError("scoring batches need labels: the model returned no loss (give batches with "
                                "'labels', or loss_fn=)")
            grads = torch.autograd.grad(loss, [zeros[n] for n in slot_names], allow_unused=True)
            for name, g in zip(slot_names, grads):
                if g is not None:
                    g = g.detach().double().cpu()
                    sums[name] += g.abs() if score == "grad" else g * g
            used += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    if not used:
        raise DataError("no batch to score the bias entries on: batches= yielded nothing")
    bad = [n for n, s in sums.items() if not bool(torch.isfinite(s).all())]
    if bad:
        raise BitFitError(f"the importance of {bad[0]} is not finite (the loss diverged on the scoring batches)")
    return sums


def choose(scores: dict, cands: dict, count: int, unit: str = "entry") -> dict:
    """The ``count`` best entries among ``cands`` (slot name -> candidate indices) by ``scores``: slot name ->
    sorted indices, slots with none left out. ``unit="vector"``: whole slots by mean score, the last one
    cut to its best entries. Ties go to the earlier slot (in ``cands``' order), then the lower index."""
    if unit not in IMPORTANCE_UNITS:
        raise BitFitConfigError(f"unit={unit!r}: use one of {', '.join(IMPORTANCE_UNITS)}")
    names = list(cands)
    if unit == "entry":
        flat = torch.cat([scores[n][cands[n]] for n in names])
        order = torch.sort(flat, descending=True, stable=True).indices[:count]
        sizes = torch.tensor([cands[n].numel() for n in names])
        ends = torch.cumsum(sizes, 0)
        owner = torch.bucketize(order, ends, right=True)
        out = {}
        for i, n in enumerate(names):
            local = order[owner == i] - (ends[i] - sizes[i])
            if local.numel():
                out[n] = torch.sort(cands[n][local]).values
        return out
    means = torch.tensor([float(scores[n][cands[n]].mean()) for n in names], dtype=torch.float64)
    out, left = {}, count
    for i in torch.sort(means, descending=True, stable=True).indices.tolist():
        if left == 0:
            break
        n = names[i]
        idx = cands[n]
        if idx.numel() > left:
            idx = idx[torch.sort(scores[n][idx], descending=True, stable=True).indices[:left]]
        out[n] = torch.sort(idx).values
        left -= idx.numel()
    return {n: out[n] for n in names if n in out}


def select_entries(model: nn.Module, batches: Iterable, budget, score: str = "grad", unit: str = "entry",
                   config: Optional[BitFitConfig] = None, max_batches: Optional[int] = None,
                   loss_fn: Optional[Callable] = None, **options) -> dict:
    """Choose ``budget`` bias entries of ``model`` by their importance on ``batches``.

    ``model``: the plain model (before :func:`bitfit.apply`). The candidates are the bias entries of the
    BitFit selection given by ``config`` or by keyword ``options`` (``preset``, ``roles``, ``layers``,
    ``add_missing`` ... as for bitfit.apply; default: every bias). ``budget``: a fraction in (0, 1] of
    the candidates or a count. ``score``: "grad" (sum of |dL/db|) or "fisher" (sum of (dL/db)^2).
    ``unit``: "entry" or "vector". Returns slot name -> sorted LongTensor of the chosen indices; the
    counts add up to the budget exactly. Pass it to ``bitfit.apply(model, budget=..., entries=...)``.
    """
    from ..core.prepare import get_state, unwrap

    target = unwrap(model)
    if get_state(target) is not None:
        raise BitFitError("select_entries scores a plain model: call it before bitfit.apply (or let bitfit.apply "
                          "do it: bitfit.apply(model, budget=..., batches=...))")
    cfg = config if config is not None else BitFitConfig(**options)
    mm = discover(target, pooler_head=cfg.pooler_head)
    cands = candidates(mm, resolve(mm, cfg))
    if not cands:
        raise BitFitConfigError("the selection has no bias entry to choose from; widen it")
    count = budget_count(budget, sum(int(c.numel()) for c in cands.values()))
    scores = importance_scores(target, batches, [mm.slot(n) for n in cands], score, max_batches, loss_fn)
    return choose(scores, cands, count, unit)


def check_entries(model_map: ModelMap, selection: Selection, entries: dict, budget) -> dict:
    """``entries`` validated against the selection: known slots, sorted distinct indices among each
    slot's candidates, as many in all as ``budget`` means. Returns them as int64 tensors in model order."""
    if not isinstance(entries, dict):
        raise BitFitConfigError(f"entries must be a dict of bias name -> indices, got {type(entries).__name__}")
    cands = candidates(model_map, selection)
    unknown = sorted(set(entries) - set(cands))
    if unknown:
        raise BitFitConfigError(f"entries names {len(unknown)} bias(es) outside the selection, e.g. {unknown[0]}")
    out = {}
    for name, c in cands.items():
        if name not in entries:
            continue
        idx = torch.as_tensor(entries[name]).reshape(-1).to(torch.long).cpu()
        if not idx.numel() or not bool(torch.isin(idx, c).all()) or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all())):
            raise BitFitConfigError(f"entries[{name!r}] must be sorted distinct indices of the selected part of that "
                                    f"bias (0..{model_map.slot(name).size - 1})")
        out[name] = idx
    n = sum(int(i.numel()) for i in out.values())
    want = budget_count(budget, sum(int(c.numel()) for c in cands.values()))
    if n != want:
        raise BitFitConfigError(f"entries hold {n} bias entries but budget={budget!r} means {want} here")
    return out


def sample_batches(dataset, collate: Callable, n_batches: int, batch_size: int, seed: int = 0):
    """``n_batches`` batches of ``batch_size`` rows drawn (with ``seed``) from ``dataset``, collated: the
    scoring batches `bitfit train --budget` uses."""
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(dataset), generator=g)[: n_batches * batch_size].tolist()
    for i in range(0, len(order), batch_size):
        yield dict(collate([dataset[j] for j in order[i:i + batch_size]]))


__all__ = ["select_entries", "importance_scores", "choose", "candidates", "budget_count", "check_entries",
           "sample_batches"]


def choose_entries(target: nn.Module, model_map: ModelMap, sel: Selection, cfg: BitFitConfig, batches, entries):
    """The entries ``cfg.budget`` trains: ``entries`` checked, or the most important ones on ``batches``
    (what :func:`bitfit.apply` runs under a budget)."""
    if entries is None:
        if batches is None:
            raise BitFitConfigError(
                f"budget={cfg.budget!r} chooses bias entries by their importance on data: pass batches= (a few "
                "labelled training batches) or entries= (from bitfit.methods.sparse.select_entries)"
            )
        cands = candidates(model_map, sel)
        count = budget_count(cfg.budget, sum(int(c.numel()) for c in cands.values()))
        scores = importance_scores(target, batches, [model_map.slot(n) for n in cands], cfg.importance,
                                   cfg.importance_batches)
        entries = choose(scores, cands, count, cfg.importance_unit)
    return check_entries(model_map, sel, entries, cfg.budget)


register_entry_chooser(choose_entries)
