"""Parameters under a sharding engine: FSDP2 (``fully_shard``: every parameter a ``DTensor`` holding a shard
of rows) and DeepSpeed ZeRO-3 (partitioned parameters whose ``shape``/``numel()`` read 0; the real ones are
``ds_shape``/``ds_numel``).

BitFit reads whole values only of what it trains (biases, a head, norm gains: kilobytes) and never gathers
the frozen base. The gathers here are collectives: on a sharded model every rank must make the same calls
in the same order (``bitfit.save`` and ``bitfit.merge`` are called on every rank; rank 0 alone writes).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn.utils import parametrize


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def is_zero3(t) -> bool:
    """A DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(t, "ds_id")


def has_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2) or a ZeRO-3 partitioned parameter."""
    return any(is_dtensor(p) or is_zero3(p) for p in model.parameters())


def full_shape(t: torch.Tensor) -> tuple:
    """The shape of the whole tensor: a ZeRO-3 parameter's ``ds_shape`` (its ``shape`` reads 0), a DTensor's
    global shape, else ``t.shape``."""
    ds = getattr(t, "ds_shape", None)
    return tuple(ds) if ds is not None else tuple(t.shape)


def plain_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's ``fully_shard`` swaps it for a subclass ``FSDP<Name>``."""
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("torch.distributed."):
            return cls
    return type(model)


def full_numel(t: torch.Tensor) -> int:
    ds = getattr(t, "ds_numel", None)
    return int(ds) if ds is not None else int(t.numel())


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole value of ``t`` as a plain tensor: a DTensor is gathered (a collective), anything else is
    returned as it is."""
    if is_dtensor(t):
        return t.full_tensor()
    return t


def full_bias(module: nn.Module) -> torch.Tensor:
    """The effective (parametrized or plain) ``bias`` of ``module`` as a plain tensor, gathered when sharded."""
    if parametrize.is_parametrized(module, "bias"):
        plist = module.parametrizations.bias
        if is_dtensor(plist.original):
            value = full(plist.original)
            for p in plist:
                value = p(value)
            return value
    return full(module.bias)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def on_rank0(fn: Callable, what: str):
    """Run ``fn()`` on rank 0 only and return its result on every rank; the other ranks wait for it. When
    it raises on rank 0, every rank raises (the others a RuntimeError naming rank 0's error), so no rank
    is left waiting. Without a process group ``fn`` simply runs."""
    if not distributed():
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - passed on to the other ranks, then raised again
            error = exc
    box = [None if error is None else f"{type(error).__name__}: {error}", result]
    torch.distributed.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise RuntimeError(f"{what} failed on rank 0 ({box[0]})")
    return box[1]


def sample_bits(items: Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]]) -> list[torch.Tensor]:
    """For each ``(tensor, flat indices or None)``: the values at those positions of the flattened whole
    tensor (all of it for None), rounded to bfloat16, as int16 bit patterns on CPU.

    A DTensor is not gathered: each rank reads the sampled positions that lie in its own shard, and one
    all-reduce over the default process group (every rank must call) puts the samples together. Where
    several ranks hold a position (replicated mesh dimensions) they hold the same value, and the sum of
    the bit patterns divided by the number of holders is that value exactly.
    """
    items = list(items)
    out: list = [None] * len(items)
    pending = []  # (position in items, local positions' mask, their values as int64 bits)
    for i, (t, idx) in enumerate(items):
        if is_zero3(t) and getattr(t, "ds_tensor", None) is not None and t.numel() != full_numel(t):
            pending.append((i, *_zero3_local(t, idx)))
            continue
        t = t.detach()  # (a detached tensor no longer carries the ZeRO-3 attributes)
        if not is_dtensor(t):
            flat = t.reshape(-1)
            if idx is not None:
                flat = flat[idx.to(flat.device)]
            out[i] = flat.to(torch.float32).to(torch.bfloat16).cpu().view(torch.int16)
            continue
        shape = tuple(t.shape)
        if idx is None:
            idx = torch.arange(t.numel(), dtype=torch.int64)
        chunk = t.__create_chunk_list__()[0]  # this rank's block: offsets and sizes in the global tensor
        coords = torch.unravel_index(idx, shape) if shape else ()
        own = torch.ones(idx.numel(), dtype=torch.bool)
        for c, off, size in zip(coords, chunk.offsets, chunk.sizes):
            own &= (c >= off) & (c < off + size)
        local = t.to_local()
        bits = torch.zeros(idx.numel(), dtype=torch.int64)
        if bool(own.any()):
            where = tuple((c[own] - off).to(local.device) for c, off in zip(coords, chunk.offsets))
            vals = local[where] if shape else local.reshape(1)
            bits[own] = vals.to(torch.float32).to(torch.bfloat16).cpu().view(torch.int16).to(torch.int64)
        pending.append((i, own, bits, local.device))
    if pending:
        bits = torch.cat([b for _, _, b, _ in pending])
        count = torch.cat([o.to(torch.int64) for _, o, _, _ in pending])
        both = torch.stack([bits, count]).to(pending[0][3])
        if distributed():
            torch.distributed.all_reduce(both)
        both = both.cpu()
        if bool((both[1] == 0).any()):
            raise RuntimeError("a sampled position of a sharded tensor is held by no rank")
        values = (both[0] // both[1]).to(torch.int16)
        start = 0
        for i, own, _, _ in pending:
            out[i] = values[start:start + own.numel()]
            start += own.numel()
    return out


def _zero3_local(t, idx):
    """(owned mask, int64 bf16 bits, device) of the sampled positions in this rank's ZeRO-3 partition: the
    flattened tensor is cut into equal partitions, rank r holding ``[r * size, (r + 1) * size)``."""
    if idx is None:
        idx = torch.arange(full_numel(t), dtype=torch.int64)
    part = t.ds_tensor.detach().reshape(-1)
    size = int(getattr(t.ds_tensor, "ds_numel", part.numel()))
    group = getattr(t, "ds_process_group", None)
    r = torch.distributed.get_rank(group=group) if distributed() else 0
    own = (idx >= r * size) & (idx < (r + 1) * size)
    bits = torch.zeros(idx.numel(), dtype=torch.int64)
    if bool(own.any()):
        vals = part[(idx[own] - r * size).to(part.device)]
        bits[own] = vals.to(torch.float32).to(torch.bfloat16).cpu().view(torch.int16).to(torch.int64)
    return own, bits, part.device


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: Optional[int] = None):
    """Inside: ZeRO-3 partitioned ``params`` whole (``deepspeed.zero.GatheredParameters``; with
    ``modifier_rank``, what that rank writes to them is partitioned again on exit). Without DeepSpeed or
    partitioned parameters it does nothing."""
    zero = [p for p in params if is_zero3(p)]
    if not zero:
        yield
        return
    import deepspeed  # a partitioned parameter exists only where deepspeed is installed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=modifier_rank):
        yield
