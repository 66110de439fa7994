"""Building what an artifact stores from a BitFit model (its config and tensors: exact float32
differences from the base, or float16/int8 values) and :func:`save`, which hands them to the
crash-safe writer in ``store``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..core.config import SPARSE_FIELDS
from ..core.prepare import get_state, unwrap
from ..core.sharded import full, full_bias, has_sharded, on_rank0, plain_class
from ..errors import ArtifactError
from ..methods.dynamic import refuse as refuse_dynamic
from .base import base_value, body_of, fingerprint, submodule
from .finite import nonfinite, refuse_nonfinite
from .format import DTYPES, FORMAT, NORM_FORMAT_VERSION, PLAIN_FORMAT_VERSION, SPARSE_FORMAT_VERSION
from .store import write_folder

_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "half": "float16", "f16": "float16",
                  "torch.float32": "float32", "torch.float16": "float16", "torch.int8": "int8"}


def _check_dtype(dtype) -> str:
    d = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    if d not in DTYPES:
        raise ArtifactError(f"dtype={dtype!r} is not a storage dtype; use one of {', '.join(DTYPES)}")
    return d


def _json_config(config) -> dict:
    if config is None:
        return {}
    try:
        return json.loads(config.to_json_string(use_diff=False))
    except Exception:
        return json.loads(json.dumps(config.to_dict(), default=str))


def _exact_delta(value: torch.Tensor, base: torch.Tensor):
    """float32 ``d`` with ``base + d == value`` bit for bit where possible; the rest as exact fixes."""
    d = value - base
    bad = (base + d).view(torch.int32) != value.view(torch.int32)
    if bad.any():
        for direction in (float("inf"), float("-inf")):
            alt = torch.nextafter(d, torch.full_like(d, direction))
            ok = bad & ((base + alt).view(torch.int32) == value.view(torch.int32))
            d = torch.where(ok, alt, d)
            bad = bad & ~ok
    idx = torch.nonzero(bad).reshape(-1)
    return d, idx, value[idx].clone()


def _quantise(key: str, t: torch.Tensor, dtype: str, out: dict) -> None:
    t = t.detach().float().cpu().contiguous()
    if dtype == "float32":
        out[key] = t
    elif dtype == "float16":
        h = t.half()
        if not torch.isfinite(h).all() and torch.isfinite(t).all():
            raise ArtifactError(f"{key} has values beyond the float16 range (|x| > 65504); save with dtype='float32'")
        out[key] = h
    else:
        amax = float(t.abs().max()) if t.numel() else 0.0
        scale = amax / 127.0 if amax > 0 else 1.0
        out[key] = torch.clamp(torch.round(t / scale), -127, 127).to(torch.int8)
        out[f"scale:{key}"] = torch.tensor(scale, dtype=torch.float32)


def _encode(key: str, name: str, value: torch.Tensor, base: Optional[torch.Tensor], dtype: str, tensors: dict,
            entry: dict) -> None:
    """Store ``value`` under ``key``: as the difference from ``base`` (exact in float32, with fixes under
    ``fix_idx:<name>``/``fix_val:<name>``) or, without a usable base, as the value; ``entry`` records how."""
    if base is not None and nonfinite(value - base) is not None:
        base = None  # the difference overflows float32 (or the base is not finite): store the value
    if base is None:
        entry["encoding"] = "value"
        _quantise(key, value, dtype, tensors)
        return
    entry["encoding"] = "delta"
    if dtype != "float32":
        _quantise(key, value - base, dtype, tensors)
        return
    d, fix_idx, fix_val = _exact_delta(value, base)
    if 16 * fix_idx.numel() > value.numel():  # many unreachable: store the value (smaller)
        entry["encoding"] = "value"
        tensors[key] = value.contiguous()
        return
    tensors[key] = d.contiguous()
    if fix_idx.numel():
        small = value.numel() <= torch.iinfo(torch.int16).max
        tensors[f"fix_idx:{name}"] = fix_idx.to(torch.int16 if small else torch.int32)
        tensors[f"fix_val:{name}"] = fix_val
    entry["fixes"] = int(fix_idx.numel())


def _collect(model: nn.Module, dtype: str = "float32", label_names=None, base_name=None,
             with_tensors: bool = True) -> tuple[dict, dict]:
    """(meta, tensors to store) for a BitFit model."""
    target = unwrap(model)
    state = get_state(target)
    if state is None:
        raise ArtifactError(
            "this model is not a BitFit model (no bitfit.apply or bitfit.load on it); "
            "call bitfit.apply(model, ...) and train it before saving"
        )
    refuse_dynamic(target, "store it as a BitFit artifact (static biases and head)")
    if with_tensors:
        refuse_nonfinite(target, state, "save")
    tensors: dict = {}
    slots_meta: dict = {}
    sparse = state.config.budget is not None
    for slot in state.trained_slots():
        roles = list(state.selection.chosen[slot.name])
        idx = state.partial.get(slot.name)
        added = slot.name in state.added
        entry = {
            "roles": roles, "size": slot.size, "kind": slot.kind, "added": added,
            "indices": None if idx is None else int(idx.numel()),
        }
        if with_tensors:
            value = full_bias(submodule(target, slot.module_name)).detach().float().cpu().reshape(-1)
            base = None if added else base_value(target, slot.name)
            base = None if base is None else base.reshape(-1)
            if idx is not None:
                value = value[idx.cpu()]
                base = None if base is None else base[idx.cpu()]
                if sparse:  # chosen by importance: not reproducible from the roles, so stored
                    tensors[f"entries:{slot.name}"] = idx.cpu().to(torch.int32).contiguous()
            _encode(f"bias:{slot.name}", slot.name, value, base, dtype, tensors, entry)
        slots_meta[slot.name] = entry

    params = dict(target.named_parameters())
    head_params = {}
    for name in state.model_map.head_params:
        p = params.get(name)
        if p is None:
            raise ArtifactError(f"head parameter {name} is missing from the model")
        head_params[name] = list(p.shape)
        if with_tensors:
            _quantise(f"head:{name}", full(p), dtype, tensors)

    norm_meta = {}
    for name in state.selection.norm_weights:  # train_norm_weights: the gains, as differences from the base
        p = params[name]
        entry = {"size": int(p.numel())}
        if with_tensors:
            _encode(f"norm:{name}", f"norm:{name}", full(p).detach().float().cpu().reshape(-1),
                    state.base[name].detach().float().cpu().reshape(-1), dtype, tensors, entry)
        norm_meta[name] = entry

    config = getattr(target, "config", None)
    num_labels = getattr(config, "num_labels", None) if head_params else None
    id2label = {str(k): v for k, v in (getattr(config, "id2label", None) or {}).items()} if head_params else None
    if label_names is not None:
        label_names = [str(x) for x in label_names]
        if num_labels is not None and len(label_names) != num_labels:
            raise ArtifactError(f"label_names has {len(label_names)} names but the head has {num_labels} labels")
        id2label = {str(i): n for i, n in enumerate(label_names)}
    label2id = {v: int(k) for k, v in id2label.items()} if id2label else None
    name = base_name or (getattr(config, "_name_or_path", None) or None)
    from .. import __version__

    bitfit_config = state.config.to_dict()
    if not bitfit_config.get("train_norm_weights"):
        bitfit_config.pop("train_norm_weights", None)  # an artifact older bitfits read as before
    if not sparse:
        for k in SPARSE_FIELDS:
            bitfit_config.pop(k, None)
    for k in ("added_bias_init", "added_bias_init_std", "added_bias_init_seed"):
        bitfit_config.pop(k)  # how added biases started is not needed: their saved value is the trained one
    meta = {
        "format": FORMAT,
        "format_version": SPARSE_FORMAT_VERSION if sparse else NORM_FORMAT_VERSION if norm_meta else PLAIN_FORMAT_VERSION,
        "bitfit_version": __version__,
        "dtype": dtype,
        "base_model": {
            "name": name,
            "architecture": plain_class(target).__name__,  # not FSDP2's FSDP<Name> subclass
            "model_type": getattr(config, "model_type", None),
            "prefix": body_of(target)[1],
            "fingerprint": fingerprint(target),
            "config": _json_config(config),
        },
        "family": state.model_map.family,
        "bitfit_config": bitfit_config,
        "slots": slots_meta,
        "added": list(state.added),
        "head": {
            "params": head_params,
            "trained": bool(state.selection.head_params),
            "num_labels": num_labels,
            "id2label": id2label,
            "label2id": label2id,
            "problem_type": getattr(config, "problem_type", None) if head_params else None,
        },
    }
    if norm_meta:
        meta["norm_weights"] = norm_meta
    if sparse:  # the trained count: the chosen entries, not the sizes of the biases they sit in
        meta["sparse"] = {"entries": sum(s["size"] if s["indices"] is None else s["indices"]
                                         for s in slots_meta.values())}
    return meta, tensors


def meta_of(model: nn.Module) -> dict:
    """The config an artifact of the BitFit ``model`` would have (tensors are not computed)."""
    return _collect(model, with_tensors=False)[0]


def save(model: nn.Module, path, dtype: str = "float32", label_names=None, base_name: Optional[str] = None) -> Path:
    """Save what BitFit trained in ``model`` to the folder ``path``; returns the folder.

    dtype: "float32" (exact), "float16" or "int8" (symmetric per-tensor scale). A model with a
    NaN or inf in a trained tensor is refused (nothing is written). The write is atomic, also
    over an existing artifact: the new files go to a hidden folder ``.NAME.tmp-<pid>-<hex>``
    beside ``path`` and are flushed to disk; then the old folder is renamed to
    ``.NAME.bak-<pid>-<hex>``, its other files (logs, tokenizer, checkpoints) are moved into
    the new folder, the new folder is renamed to ``path`` and the backup removed. A save killed
    at any moment leaves either the old or the new artifact (the next save or load puts back a
    folder caught mid-swap and removes what killed saves left). Files and folders are created
    with the modes the umask gives (``0o666 & ~umask``, ``0o777 & ~umask``).
    """
    dtype = _check_dtype(dtype)
    meta, tensors = _collect(model, dtype, label_names, base_name)
    if has_sharded(unwrap(model)):  # every rank gathered the trained tensors; rank 0 alone writes
        return on_rank0(lambda: write_folder(path, meta, tensors), "bitfit.save")
    return write_folder(path, meta, tensors)
