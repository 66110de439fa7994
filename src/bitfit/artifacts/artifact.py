"""Task artifacts: save / load only what BitFit trained, merge into a plain model, unmerge.

An artifact is a folder with two files:

* ``bitfit_model.safetensors``: per trained bias slot the *difference* from the base value
  (``bias:<slot>``; for a fused slot of which only some slices train, only those indices), the
  value of biases the base lacks (added by ``add_missing``), and the task head
  (``head:<param>``). With ``dtype="int8"`` every tensor has a symmetric per-tensor scale
  (``scale:<key>``). In float32 a difference that does not round-trip bit for bit
  (``base + (v - base) != v`` in float32) is repaired by a few exact values
  (``fix_idx:<slot>``/``fix_val:<slot>``), so loading is exact; a slot where more than 1/16
  of the elements would need that is stored as its value. Sparse BitFit (a ``budget``) stores
  the trained indices of each partly trained bias as ``entries:<slot>``.
* ``bitfit_config.json``: format version, base model name/config/fingerprint, the
  BitFitConfig, per-slot roles, head layout and labels, storage dtype, a checksum of the
  tensor file. No pickle anywhere.

The integrity fields (``weights_sha256``, ``base_model.fingerprint``) are required unless
``strict=False``; stored dtypes and shapes must be what the config declares; NaN/inf is
refused on save, load, merge and in the bank; a save replaces an existing folder atomically
(see :func:`save`). docs/ARTIFACTS.md describes all of it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.config import ROLES, SPARSE_FIELDS, BitFitConfig
from ..methods.dynamic import refuse as refuse_dynamic
from ..methods.dynamic import remove as remove_dynamic
from ..errors import ArtifactError, BitFitError
from ..core.io import file_mode
from ..fast.lean import remove as remove_lean
from ..core.prepare import STATE_ATTR, apply, bias_tensor, get_state, trainable_bias_param, unwrap
from ..core.roles import discover
from ..core.select import resolve

FORMAT = "bitfit-artifact"
FORMAT_VERSION = 3  # the newest this bitfit reads; 2 = with a norm_weights section (train_norm_weights),
# 3 = sparse BitFit (a budget: the trained entries of each bias stored as ``entries:<slot>``)
PLAIN_FORMAT_VERSION = 1  # what an artifact without trained norm gains is written as (older bitfits read it)
NORM_FORMAT_VERSION = 2  # with trained norm gains
SPARSE_FORMAT_VERSION = 3  # sparse BitFit (a budget)
WEIGHTS_NAME = "bitfit_model.safetensors"
CONFIG_NAME = "bitfit_config.json"
DTYPES = ("float32", "float16", "int8")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "half": "float16", "f16": "float16",
                  "torch.float32": "float32", "torch.float16": "float16", "torch.int8": "int8"}
_SAMPLE = 1024  # elements per frozen tensor that enter the fingerprint


# ----------------------------------------------------------------------------- data classes
@dataclass
class Artifact:
    """A read and validated artifact. ``tensors``: stored key -> float32 tensor (dequantised);
    ``fix_idx:*`` entries are int64 index tensors."""

    meta: dict
    tensors: dict
    path: Optional[Path] = None


@dataclass
class TaskTensors:
    """Everything one task adds to a frozen base, as full float32 values.

    ``biases``: slot name (as in the saved model, e.g. ``bert.encoder.layer.0.attention.self.query.bias``)
    -> the full effective bias (size = slot size; untrained slices of a fused bias are the base
    values); ``added``: slot names the base has no bias for; ``head``: head parameter name ->
    value; ``meta``: num_labels, id2label, label2id, problem_type, fingerprint, base_prefix,
    architecture, bitfit_config, slots.
    """

    biases: dict
    added: list
    head: dict
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def _check_dtype(dtype) -> str:
    d = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    if d not in DTYPES:
        raise ArtifactError(f"dtype={dtype!r} is not a storage dtype; use one of {', '.join(DTYPES)}")
    return d


def _body(model: nn.Module) -> tuple[nn.Module, str]:
    """The transformer body (``model.<base_model_prefix>``) and the prefix of its names in ``model``."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    sub = getattr(model, prefix, None) if prefix else None
    if isinstance(sub, nn.Module) and sub is not model:
        return sub, prefix + "."
    return model, ""


def fingerprint(model: nn.Module) -> str:
    """Hash of a deterministic sample of every frozen weight of the model's body.

    Bias slots, the head and parametrization internals are left out, so the fingerprint is
    the same before and after ``bitfit.apply``/``load`` and for any head class over the same
    body. Values are rounded to bfloat16 first: the same weights stored in float32 or bfloat16
    give the same fingerprint.
    """
    target = unwrap(model)
    state = get_state(target)
    mm = state.model_map if state is not None else discover(target)
    skip = {s.name for s in mm.slots} | set(mm.head_params)
    kept = {}
    if mm.pooler_head:  # an untrained pooler in the head: its weight is hashed all the same, from its base
        # value (the tensors hashed do not depend on pooler_head, nor on training)
        weights = {n for n in mm.head_params if n.startswith(f"{mm.pooler_head}.") and not n.endswith(".bias")}
        skip -= weights
        kept = {n: state.base[n] for n in weights if state is not None and n in state.base}
    # trained norm gains count with their pretrained values
    kept.update({n: state.base[n] for n in (state.selection.norm_weights if state is not None else ())})
    body, prefix = _body(target)
    h = hashlib.sha256()
    for name, p in sorted(body.named_parameters(), key=lambda kv: kv[0]):
        if prefix + name in skip or ".parametrizations." in name or p.is_meta:
            continue
        flat = kept.get(prefix + name, p).detach().reshape(-1)
        n = flat.numel()
        if n > _SAMPLE:
            idx = torch.arange(_SAMPLE, dtype=torch.int64) * (n - 1) // (_SAMPLE - 1)
            flat = flat[idx.to(flat.device)]
        vals = flat.to(torch.float32).to(torch.bfloat16).cpu().view(torch.int16).numpy().tobytes()
        h.update(f"{name}:{tuple(p.shape)}\n".encode())
        h.update(vals)
    return f"sha256:{h.hexdigest()[:32]}"


def _module(model: nn.Module, module_name: str) -> nn.Module:
    return model.get_submodule(module_name) if module_name else model


def locate(model: nn.Module, slot_name: str, saved_prefix: str = "") -> Optional[str]:
    """``slot_name`` as it is called in ``model`` (adds/strips the body prefix), or None."""
    mod_name = slot_name.rsplit(".", 1)[0] if "." in slot_name else ""
    own_prefix = _body(model)[1]
    cands = [mod_name]
    if saved_prefix and mod_name.startswith(saved_prefix):
        cands.append(own_prefix + mod_name[len(saved_prefix):])
    elif own_prefix and not mod_name.startswith(own_prefix):
        cands.append(own_prefix + mod_name)
    for c in cands:
        try:
            _module(model, c)
            return f"{c}.bias" if c else "bias"
        except AttributeError:
            continue
    return None


def _base_value(model: nn.Module, slot_name: str) -> Optional[torch.Tensor]:
    """The base (pre-task) value of a bias slot of ``model`` in float32 on CPU, or None if the base has none."""
    state = get_state(model)
    if state is not None:
        if slot_name in state.added:
            return None
        if slot_name in state.base:
            return state.base[slot_name].detach().float().cpu()
        if slot_name in state.partial:
            mod = _module(model, slot_name.rsplit(".", 1)[0])
            return mod.parametrizations.bias[0].frozen.detach().float().cpu()
        if slot_name in state.selection.chosen:
            return None  # trained but no copy of the base kept: stored as a value
    mod = _module(model, slot_name.rsplit(".", 1)[0] if "." in slot_name else "")
    b = getattr(mod, "bias", None)
    if not isinstance(b, torch.Tensor):
        return None
    return b.detach().float().cpu()


def _json_config(config) -> dict:
    if config is None:
        return {}
    try:
        return json.loads(config.to_json_string(use_diff=False))
    except Exception:
        return json.loads(json.dumps(config.to_dict(), default=str))


def _nonfinite(t: torch.Tensor) -> Optional[tuple]:
    """(NaN count, inf count, numel) of a floating tensor with a non-finite value, else None."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        return None
    t = t.detach()
    if bool(torch.isfinite(t).all()):
        return None
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum()), t.numel()


def _first_nonfinite(named) -> Optional[str]:
    """"<name> holds a NaN and b inf of its n values (k tensors in all)" for the first non-finite tensor, else None."""
    bad = [(name, c) for name, c in ((n, _nonfinite(t)) for n, t in named) if c is not None]
    if not bad:
        return None
    name, (nan, inf, n) = bad[0]
    more = f"; {len(bad)} tensors are non-finite in all" if len(bad) > 1 else ""
    return f"{name} holds {nan} NaN and {inf} inf of its {n} values{more}"


def _trained_tensors(target: nn.Module, state):
    """(name, tensor) of every trained bias slot (full) and head parameter of a BitFit model."""
    for slot in state.trained_slots():
        yield slot.name, bias_tensor(target, slot.name)
    params = dict(target.named_parameters())
    for name in list(state.model_map.head_params) + list(state.selection.norm_weights):
        if name in params:
            yield name, params[name]


def _refuse_nonfinite(target: nn.Module, state, doing: str) -> None:
    bad = _first_nonfinite(_trained_tensors(target, state))
    if bad:
        raise ArtifactError(
            f"cannot {doing}: trained tensor {bad} (training diverged); lower the learning rate or go back to "
            "a checkpoint whose tensors are finite. Nothing was changed"
        )


# ----------------------------------------------------------------------------- save
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
    if base is not None and _nonfinite(value - base) is not None:
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
        _refuse_nonfinite(target, state, "save")
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
            value = bias_tensor(target, slot.name).detach().float().cpu().reshape(-1)
            base = None if added else _base_value(target, slot.name)
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
            _quantise(f"head:{name}", p, dtype, tensors)

    norm_meta = {}
    for name in state.selection.norm_weights:  # train_norm_weights: the gains, as differences from the base
        p = params[name]
        entry = {"size": int(p.numel())}
        if with_tensors:
            _encode(f"norm:{name}", f"norm:{name}", p.detach().float().cpu().reshape(-1),
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
            "architecture": type(target).__name__,
            "model_type": getattr(config, "model_type", None),
            "prefix": _body(target)[1],
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
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if path.is_symlink():  # replace the folder the link points to, keep the link
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a folder; give a folder path for the artifact")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent, exclusive=True) as locked:
        _recover(path, locked)
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"{path} exists and is not a folder; give a folder path for the artifact")
        tmp = _make_side_folder(path, "tmp")
        try:
            _write_files(tmp, meta, tensors)
            if not path.exists():
                os.rename(tmp, path)
                _fsync_dir(path.parent)
            elif not _swap(path, tmp):
                _replace_in_place(path, tmp)
        except BaseException:
            if tmp.exists() and not _extras(tmp):  # (with other files in it: left for _recover)
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- atomic folder replace
_LOCK_TIMEOUT_S = 120.0
_OLD_STYLE_STALE_S = 600.0  # tempfile.mkdtemp leftovers of older bitfit versions (no pid in the name)
_SIDE = re.compile(r"^(?P<kind>tmp|bak)-(?:(?P<pid>\d+)-[0-9a-f]{8}|(?P<old>[a-z0-9_]{8}))$")


@contextlib.contextmanager
def _locked(folder: Path, exclusive: bool):
    """flock on the folder holding artifacts: saves (exclusive) and reads (shared) of artifacts in
    it never interleave, so a reader never sees a folder mid-swap. Yields whether a lock is held
    (False where the platform or file system has none: the rename protocol alone then applies)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        held, deadline = False, time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ArtifactError(
                        f"{folder} has been locked by another bitfit save or load for {_LOCK_TIMEOUT_S:.0f} s; "
                        "wait for that process to finish (or stop it) and try again"
                    ) from None
                time.sleep(0.005)
            except OSError:  # no flock on this file system
                break
        yield held
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _make_side_folder(path: Path, kind: str) -> Path:
    """A new empty folder ``.NAME.<kind>-<pid>-<hex>`` beside ``path`` (mode 0o777 & ~umask)."""
    for _ in range(100):
        side = path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(side, 0o777)  # the kernel applies the umask (mkdtemp would make it 0700)
            return side
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary folder beside {path}")


def _side_name(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _write_files(folder: Path, meta: dict, tensors: dict) -> None:
    """Tensor file, then the config with its checksum; both flushed to disk, then the folder."""
    weights = folder / WEIGHTS_NAME
    safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt", "bitfit": FORMAT})
    os.chmod(weights, file_mode())  # safetensors creates it 0600 whatever the umask
    fd = os.open(weights, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    meta["weights_sha256"] = _sha256(weights)
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def _extras(folder: Path) -> list:
    """Entries of an artifact folder that are not the artifact's own two files."""
    try:
        return sorted(n for n in os.listdir(folder) if n not in (WEIGHTS_NAME, CONFIG_NAME))
    except OSError:
        return []


def _move_extras(src: Path, dst: Path) -> bool:
    """Move every non-artifact entry of ``src`` into ``dst`` (never over an existing one); True if all moved."""
    ok = True
    for n in _extras(src):
        if os.path.lexists(dst / n):
            ok = False
            continue
        try:
            os.rename(src / n, dst / n)
        except OSError:
            ok = False
    return ok


def _swappable(path: Path) -> bool:
    try:
        return not os.path.ismount(path) and not os.path.samefile(path, os.getcwd())
    except OSError:
        return True


def _swap(path: Path, tmp: Path) -> bool:
    """Replace the folder ``path`` by the complete folder ``tmp``; False (nothing changed) if
    ``path`` cannot be renamed (a mount point, the working directory, no permission)."""
    if not _swappable(path):
        return False
    bak = _side_name(path, "bak")
    try:
        os.rename(path, bak)
    except OSError:
        return False
    try:
        if not _move_extras(bak, tmp):
            raise ArtifactError(f"could not move the other files of {path} into the new artifact folder")
        os.rename(tmp, path)
    except BaseException:  # put the old folder back as it was
        _move_extras(tmp, bak)
        if not os.path.lexists(path):
            os.rename(bak, path)
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(bak, ignore_errors=True)
    return True


def _replace_in_place(path: Path, tmp: Path) -> None:
    """Fallback where the folder cannot be renamed: file by file, the config (with the checksum)
    last. A kill between the two renames leaves a folder that refuses to load (checksum), never
    one that loads wrong values."""
    os.replace(tmp / WEIGHTS_NAME, path / WEIGHTS_NAME)
    os.replace(tmp / CONFIG_NAME, path / CONFIG_NAME)
    _fsync_dir(path)
    tmp.rmdir()


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds an artifact whose tensor file matches the checksum in its config."""
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        want = meta.get("weights_sha256") if isinstance(meta, dict) else None
        return isinstance(want, str) and _sha256(folder / WEIGHTS_NAME) == want
    except (OSError, ValueError, RecursionError):
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _leftovers(path: Path, locked: bool) -> list:
    """Stale side folders of killed saves to ``path``: (kind, folder, mtime).

    Ours: a folder named ``.NAME.tmp-<pid>-<hex>`` / ``.NAME.bak-<pid>-<hex>`` (or an older
    bitfit's ``.NAME.tmp-<8 chars>``). Stale: while we hold the folder lock no live save can be
    using one (every save holds it throughout); without a lock, one whose process is gone. An
    older bitfit's folder (no pid) counts as stale after 10 minutes.
    """
    head = f".{path.name}."
    out = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return out
    for e in entries:
        if not e.name.startswith(head):
            continue
        m = _SIDE.match(e.name[len(head):])
        if m is None:
            continue
        try:
            if not e.is_dir(follow_symlinks=False):
                continue
            mtime = e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if m.group("old") is not None:
            stale = time.time() - mtime > _OLD_STYLE_STALE_S
        else:
            stale = locked or not _pid_alive(int(m.group("pid")))
        if stale:
            out.append((m.group("kind"), Path(e.path), mtime))
    return out


def _recover(path: Path, locked: bool) -> Optional[Path]:
    """Finish what killed saves to ``path`` left; returns the folder to read ``path`` from (None if none).

    If ``path`` is missing (a save was killed between renaming the old folder away and the new
    one into place), the complete new folder is renamed to ``path`` (else the old one is put
    back). Files other than the artifact's own two are moved into ``path``, then the side folders
    are removed. Call with the folder lock held (``_locked(path.parent, exclusive=True)``).
    """
    stale = _leftovers(path, locked)
    target: Optional[Path] = path if path.is_dir() else None
    if target is None and stale:
        def rank(x):  # a complete new folder, else a complete old one, else the old folder as it was
            done = _complete(x[1])
            return done, x[0] == ("tmp" if done else "bak"), x[2]

        winner = max(stale, key=rank)
        if winner[0] == "bak" or _complete(winner[1]):
            try:
                os.rename(winner[1], path)
                _fsync_dir(path.parent)
                target = path
            except OSError:  # no write permission: read it where it is
                return winner[1]
            stale.remove(winner)
    for _, side, _ in stale:  # never delete a side folder still holding other files of the user's
        if (_move_extras(side, target) if target is not None else not _extras(side)):
            shutil.rmtree(side, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- read
def _bad(path, what: str) -> ArtifactError:
    return ArtifactError(f"artifact {path} is damaged: {what}. Save it again with bitfit.save")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{32,64}$")
_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def _is_int(x, lo: int = 0) -> bool:
    return type(x) is int and x >= lo  # not bool


def _validate_meta(meta, path, strict: bool = True) -> None:
    if not isinstance(meta, dict):
        raise _bad(path, f"{CONFIG_NAME} holds a JSON {_json_kind(meta)}, not an object: it is not a bitfit artifact config")
    if meta.get("format") != FORMAT:
        raise _bad(path, f"{CONFIG_NAME} is not a bitfit artifact config (no \"format\": \"{FORMAT}\")")
    if "format_version" not in meta:
        raise _bad(path, "format_version is missing")
    ver = meta["format_version"]
    if not _is_int(ver, 1):
        raise _bad(path, f"format_version must be a positive integer, got {json.dumps(ver)}")
    if ver > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact {path} has format version {ver} (written by bitfit {meta.get('bitfit_version', '?')}); this "
            f"bitfit reads versions up to {FORMAT_VERSION}: upgrade bitfit (pip install -U bitfit)"
        )
    if meta.get("dtype") not in DTYPES:
        raise _bad(path, f"unknown storage dtype {meta.get('dtype')!r}")
    for key, typ in (("base_model", dict), ("bitfit_config", dict), ("slots", dict), ("head", dict), ("added", list)):
        if not isinstance(meta.get(key), typ):
            raise _bad(path, f"field {key!r} is missing or not a {typ.__name__}")
    # integrity fields: the tensor file's checksum and the frozen base's fingerprint
    missing = []
    for where, key, pattern, what in (
        (meta, "weights_sha256", _SHA256, "64 hex digits"),
        (meta["base_model"], "fingerprint", _FINGERPRINT, '"sha256:" and hex digits'),
    ):
        v = where.get(key)
        if v is None:
            missing.append(key)
        elif not isinstance(v, str) or not pattern.match(v):
            raise _bad(path, f"{key} must be {what}, got {json.dumps(v)[:80]}")
    if missing:
        what = " and ".join(missing)
        if strict:
            raise ArtifactError(
                f"artifact {path} has no {what} in {CONFIG_NAME}, so it cannot be verified (damaged, or not written "
                "by bitfit.save); save it again with bitfit.save, or pass strict=False to load it unverified"
            )
        warnings.warn(f"artifact {path} has no {what}: loading it unverified because strict=False", stacklevel=4)
    for name, s in meta["slots"].items():
        if not isinstance(s, dict) or not isinstance(s.get("roles"), list) or not _is_int(s.get("size"), 1):
            raise _bad(path, f"slot {name} has no roles/size")
        bad = [r for r in s["roles"] if r not in ROLES]
        if bad:
            raise ArtifactError(
                f"artifact {path}: slot {name} has unknown role(s) {bad}; known roles: {', '.join(ROLES)}. "
                "It was written by another bitfit version: upgrade bitfit"
            )
        if s.get("encoding") not in ("delta", "value"):
            raise _bad(path, f"slot {name} has unknown encoding {s.get('encoding')!r}")
        if not isinstance(s.get("added"), bool):
            raise _bad(path, f"slot {name}: \"added\" must be true or false")
        if s.get("indices") is not None and not _is_int(s["indices"], 1):
            raise _bad(path, f"slot {name}: \"indices\" must be a positive integer or null")
        if s.get("fixes") is not None and not _is_int(s["fixes"]):
            raise _bad(path, f"slot {name}: \"fixes\" must be a non-negative integer")
    norms = meta.get("norm_weights", {})
    if not isinstance(norms, dict):
        raise _bad(path, "field 'norm_weights' is not an object")
    for name, s in norms.items():
        if not isinstance(s, dict) or not _is_int(s.get("size"), 1):
            raise _bad(path, f"norm gain {name} has no size")
        if s.get("encoding") not in ("delta", "value"):
            raise _bad(path, f"norm gain {name} has unknown encoding {s.get('encoding')!r}")
        if s.get("fixes") is not None and not _is_int(s["fixes"]):
            raise _bad(path, f"norm gain {name}: \"fixes\" must be a non-negative integer")
    sparse = meta.get("sparse")
    if sparse is not None and (not isinstance(sparse, dict) or not _is_int(sparse.get("entries"), 1)):
        raise _bad(path, "field 'sparse' must be an object with a positive \"entries\" count")
    if any(a not in meta["slots"] for a in meta["added"]):
        raise _bad(path, "\"added\" names a bias that is not among the slots")
    head = meta["head"]
    if not isinstance(head.get("params"), dict):
        raise _bad(path, "head.params is missing")
    for name, shape in head["params"].items():
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise _bad(path, f"head parameter {name} has shape {json.dumps(shape)[:80]}, not a list of sizes")
    if head.get("num_labels") is not None and not _is_int(head["num_labels"], 1):
        raise _bad(path, f"head.num_labels must be a positive integer, got {json.dumps(head['num_labels'])}")
    for key in ("id2label", "label2id"):
        m = head.get(key)
        if m is not None and not isinstance(m, dict):
            raise _bad(path, f"head.{key} must be an object")
    if head.get("id2label") and not all(str(k).lstrip("-").isdigit() for k in head["id2label"]):
        raise _bad(path, "head.id2label keys must be label indices")
    if head.get("label2id") and not all(_is_int(v) for v in head["label2id"].values()):
        raise _bad(path, "head.label2id values must be label indices")


def _json_kind(x) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(x), type(x).__name__)


def _expected(meta) -> dict:
    """stored key -> (allowed dtypes, shape) as the config declares them."""
    store = (_STORE_DTYPES[meta["dtype"]],)
    keys = {}
    for name, s in meta["slots"].items():
        n = s["size"] if s.get("indices") is None else s["indices"]
        keys[f"bias:{name}"] = (store, (n,))
        if _is_sparse(meta) and s.get("indices") is not None:
            keys[f"entries:{name}"] = (_INDEX_DTYPES, (n,))
        if s.get("fixes"):
            keys[f"fix_idx:{name}"] = (_INDEX_DTYPES, (s["fixes"],))
            keys[f"fix_val:{name}"] = ((torch.float32,), (s["fixes"],))
    for name, shape in meta["head"]["params"].items():
        keys[f"head:{name}"] = (store, tuple(shape))
    for name, s in meta.get("norm_weights", {}).items():
        keys[f"norm:{name}"] = (store, (s["size"],))
        if s.get("fixes"):
            keys[f"fix_idx:norm:{name}"] = (_INDEX_DTYPES, (s["fixes"],))
            keys[f"fix_val:norm:{name}"] = ((torch.float32,), (s["fixes"],))
    if meta["dtype"] == "int8":
        for k in [k for k in keys if not k.startswith(("fix_", "entries:"))]:
            keys[f"scale:{k}"] = ((torch.float32,), ())
    return keys


def _is_sparse(meta) -> bool:
    """The artifact of a sparse BitFit run (a budget): its trained indices are stored."""
    return isinstance(meta.get("bitfit_config"), dict) and meta["bitfit_config"].get("budget") is not None


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _read_files(p: Path, shown: Path, strict: bool) -> tuple[dict, dict]:
    """(validated meta, raw tensors) of the folder ``p`` (``shown`` in messages)."""
    cfg_file, w_file = p / CONFIG_NAME, p / WEIGHTS_NAME
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise ArtifactError(f"artifact {shown} is incomplete: {f.name} is missing. Save it again with bitfit.save")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ArtifactError(f"artifact {shown}: cannot read {CONFIG_NAME} ({exc.strerror or exc}); check its permissions") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, too deep
        raise _bad(shown, f"{CONFIG_NAME} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    try:
        _validate_meta(meta, shown, strict)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise _bad(shown, f"{CONFIG_NAME} has an unexpected structure ({type(exc).__name__}: {exc})") from None
    try:
        raw = safetensors.torch.load_file(str(w_file))
    except PermissionError as exc:
        raise ArtifactError(f"artifact {shown}: cannot read {WEIGHTS_NAME} ({exc.strerror or exc}); check its permissions") from None
    except Exception as exc:  # SafetensorError, OSError: truncated or garbage
        raise _bad(shown, f"{WEIGHTS_NAME} cannot be read, it is truncated or not a safetensors file "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    want = meta.get("weights_sha256")
    try:
        if want is not None and _sha256(w_file) != want:
            raise _bad(shown, f"{WEIGHTS_NAME} does not match {CONFIG_NAME} (checksum differs: replaced or modified)")
    except OSError as exc:
        raise ArtifactError(f"artifact {shown}: cannot read {WEIGHTS_NAME} ({exc.strerror or exc}); check its permissions") from None
    return meta, raw


def read_artifact(path, strict: bool = True) -> Artifact:
    """Read and validate an artifact folder (or its config file); tensors come back as float32.

    Every problem is an :class:`ArtifactError` naming the folder: missing or unreadable files,
    truncated tensors, JSON that is not an artifact config, an unknown ``format_version``, a
    tensor whose dtype or shape differs from what the config declares, a checksum mismatch, NaN
    or inf values. The integrity fields (``weights_sha256``, ``base_model.fingerprint``) are
    required unless ``strict=False`` (then a warning). A folder caught mid-replace by a killed
    ``bitfit.save`` is put back first.
    """
    if isinstance(path, Artifact):
        bad = _first_nonfinite(path.tensors.items())
        if bad:
            raise ArtifactError(f"artifact {path.path or '(in memory)'} holds non-finite values: tensor {bad}")
        return path
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        p = p.parent
    src = p
    if not p.is_dir():
        if os.path.lexists(p):
            raise ArtifactError(f"no artifact at {p}: it is a file, not a folder (bitfit.save writes a folder)")
        src = None
        if p.parent.is_dir():
            with _locked(p.parent, exclusive=True) as locked:  # a save killed mid-replace: put the folder back
                src = _recover(p, locked)
        if src is None:
            raise ArtifactError(f"no artifact at {p}: the folder does not exist (bitfit.save writes one)")
    with _locked(p.parent, exclusive=False):  # no save swaps the folder while we read its two files
        meta, raw = _read_files(src, p, strict)
    expected = _expected(meta)
    missing = sorted(set(expected) - set(raw))
    extra = sorted(set(raw) - set(expected))
    if missing:
        raise _bad(p, f"{len(missing)} tensor(s) missing from {WEIGHTS_NAME}, e.g. {missing[0]}")
    if extra:
        raise _bad(p, f"{len(extra)} unexpected tensor(s) in {WEIGHTS_NAME}, e.g. {extra[0]}")
    for k, (dtypes, shape) in expected.items():
        t = raw[k]
        if t.dtype not in dtypes:
            raise _bad(p, f"tensor {k} is stored as {_dt(t.dtype)}, the config says {'/'.join(_dt(d) for d in dtypes)} "
                          f"(dtype {meta['dtype']!r})")
        if tuple(t.shape) != shape:
            if k.startswith("bias:") and t.numel() != shape[0]:
                raise _bad(p, f"tensor {k} has {t.numel()} values, the config says {shape[0]}")
            raise _bad(p, f"tensor {k} has shape {list(t.shape)}, the config says {list(shape)}")
    bad = _first_nonfinite(raw.items())
    if bad:
        raise ArtifactError(
            f"artifact {p} holds non-finite values: tensor {bad}; the model had diverged when it was saved. "
            "Retrain (e.g. with a lower learning rate) or use an earlier artifact"
        )
    if meta["dtype"] == "int8":
        zero = [k for k in expected if k.startswith("scale:") and not float(raw[k]) > 0]
        if zero:
            raise _bad(p, f"tensor {zero[0]} is not a positive scale")
    tensors = {}
    for k, t in raw.items():
        if k.startswith("scale:"):
            continue
        if k.startswith("fix_idx:"):
            name = k[len("fix_idx:"):]
            s = meta["norm_weights"][name[len("norm:"):]] if name.startswith("norm:") else meta["slots"][name]
            n = s["size"] if s.get("indices") is None else s["indices"]
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                raise _bad(p, f"tensor {k} holds indices outside its bias (0..{n - 1})")
            tensors[k] = t.to(torch.int64)
            continue
        if k.startswith("entries:"):
            s = meta["slots"][k[len("entries:"):]]
            idx = t.to(torch.int64)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= s["size"]
                                or not bool((idx[1:] > idx[:-1]).all())):
                raise _bad(p, f"tensor {k} is not a sorted set of distinct indices of its bias (0..{s['size'] - 1})")
            tensors[k] = idx
            continue
        if meta["dtype"] == "int8" and not k.startswith("fix_val:"):
            tensors[k] = t.to(torch.float32) * raw[f"scale:{k}"].to(torch.float32)
        else:
            tensors[k] = t.to(torch.float32)
    return Artifact(meta, tensors, p)


# ----------------------------------------------------------------------------- task tensors
def _slot_value(art: Artifact, name: str, base: Optional[torch.Tensor], norm: bool = False) -> torch.Tensor:
    """The stored part of slot ``name`` (trained indices only for a fused slot), float32; ``norm``: the
    trained norm gain ``name`` (section norm_weights)."""
    s = art.meta["norm_weights"][name] if norm else art.meta["slots"][name]
    key = f"norm:{name}" if norm else name
    stored = art.tensors[f"norm:{name}" if norm else f"bias:{name}"]
    if s["encoding"] == "value":
        return stored.clone()
    if base is None:
        raise ArtifactError(f"artifact stores a difference for {name} but the base model has no such bias")
    v = base + stored
    if s.get("fixes"):
        v[art.tensors[f"fix_idx:{key}"]] = art.tensors[f"fix_val:{key}"]
    return v


def _slot_indices(model_map, name: str, roles) -> Optional[torch.Tensor]:
    slot = model_map.slot(name)
    return slot.indices(roles)


def _meta_summary(meta: dict) -> dict:
    head = meta["head"]
    id2label = head.get("id2label")
    return {
        "num_labels": head.get("num_labels"),
        "id2label": {int(k): v for k, v in id2label.items()} if id2label else None,
        "label2id": head.get("label2id"),
        "problem_type": head.get("problem_type"),
        "fingerprint": meta["base_model"].get("fingerprint"),
        "base_name": meta["base_model"].get("name"),
        "base_prefix": meta["base_model"].get("prefix", ""),
        "architecture": meta["base_model"].get("architecture"),
        "bitfit_config": meta["bitfit_config"],
        "slots": meta["slots"],
        "dtype": meta.get("dtype"),
    }


def _check_fingerprint(model: nn.Module, meta: dict, strict: bool, where) -> None:
    want = meta["base_model"].get("fingerprint")
    if not want:
        return
    got = fingerprint(model)
    if got == want:
        return
    name = meta["base_model"].get("name") or meta["base_model"].get("architecture")
    msg = (
        f"the artifact {where} was trained on base model {name!r} (fingerprint {want}) but this model's frozen "
        f"weights differ (fingerprint {got}); load it onto {name!r}"
    )
    if strict:
        raise ArtifactError(msg + ", or pass strict=False to load anyway")
    warnings.warn(msg + "; loading anyway because strict=False", stacklevel=3)


_NO_GAINS = ("{where} trained norm gains (train_norm_weights): a bias bank (and bitfit serve, which uses one) swaps biases "
             "and heads only; use bitfit.load (or merge) for it")


def task_tensors(base_model: nn.Module, source, strict: bool = True) -> TaskTensors:
    """Full float32 bias values, added slots and head of one task over ``base_model``.

    ``source``: an artifact folder, an :class:`Artifact`, or a BitFit model in memory.
    ``base_model`` (a plain or BitFit model over the same body) supplies the base values the
    artifact's differences apply to; it is not modified. Slot names are those of the saved
    model; ``meta["base_prefix"]`` is its body prefix (e.g. ``"bert."``).
    """
    base = unwrap(base_model)
    if isinstance(source, nn.Module):
        src = unwrap(source)
        state = get_state(src)
        if state is None:
            raise ArtifactError("task_tensors: the source model is not a BitFit model (no bitfit.apply on it)")
        if state.selection.norm_weights:
            raise ArtifactError(_NO_GAINS.format(where="the model in memory"))
        meta, _ = _collect(src, with_tensors=False)
        if strict and src is not base:
            _check_fingerprint(base, meta, strict, "in memory")
        biases = {s.name: bias_tensor(src, s.name).detach().float().cpu().clone() for s in state.trained_slots()}
        params = dict(src.named_parameters())
        head = {n: params[n].detach().float().cpu().clone() for n in state.model_map.head_params}
        return check_finite(TaskTensors(biases, list(state.added), head, _meta_summary(meta)), "the model in memory")
    art = read_artifact(source, strict=strict)
    if art.meta.get("norm_weights"):
        raise ArtifactError(_NO_GAINS.format(where=f"artifact {art.path}"))
    _check_fingerprint(base, art.meta, strict, art.path)
    prefix = art.meta["base_model"].get("prefix", "")
    biases = {}
    for name, s in art.meta["slots"].items():
        full = None
        if not s["added"]:
            here = locate(base, name, prefix)
            full = _base_value(base, here) if here is not None else None
            if full is None:
                raise ArtifactError(f"artifact {art.path} has a bias for {name}, which this base model does not have")
            if full.numel() != s["size"]:
                raise ArtifactError(f"{name}: artifact size {s['size']}, base model size {full.numel()}")
        if s.get("indices") is None:
            biases[name] = _slot_value(art, name, full)
        else:
            idx = art.tensors.get(f"entries:{name}")  # sparse BitFit: stored; else the roles' slices
            idx = _indices_from_meta(base, art.meta, name, prefix) if idx is None else idx
            if full is None:
                full = torch.zeros(s["size"])
            full = full.clone()
            full[idx] = _slot_value(art, name, full[idx])
            biases[name] = full
    head = {n: art.tensors[f"head:{n}"].clone() for n in art.meta["head"]["params"]}
    return check_finite(TaskTensors(biases, list(art.meta["added"]), head, _meta_summary(art.meta)),
                        f"artifact {art.path or '(in memory)'}")


def check_finite(tt: TaskTensors, where: str = "the task") -> TaskTensors:
    """``tt`` if every bias and head tensor is finite; else an ArtifactError naming the tensor.

    :func:`task_tensors` calls it on what it returns, so a bias bank never holds a NaN/inf task."""
    bad = _first_nonfinite(list(tt.biases.items()) + list(tt.head.items()))
    if bad:
        raise ArtifactError(
            f"{where} cannot be used: tensor {bad} (training diverged, or the base's biases are not finite); "
            "retrain with a lower learning rate or use an earlier artifact"
        )
    return tt



def _indices_from_meta(model: nn.Module, meta: dict, name: str, prefix: str) -> torch.Tensor:
    """Trained indices of a fused slot, reproduced from the model's roles and the stored roles."""
    here = locate(model, name, prefix)
    state = get_state(model)
    mm = state.model_map if state is not None else discover(model)
    s = meta["slots"][name]
    try:
        idx = _slot_indices(mm, here, s["roles"])
    except KeyError:
        raise ArtifactError(f"slot {name} of the artifact is not a bias slot of this model") from None
    if idx is None or idx.numel() != s["indices"]:
        raise ArtifactError(
            f"slot {name}: the artifact trained {s['indices']} indices of roles {s['roles']} but this model's "
            f"layout gives {s['size'] if idx is None else idx.numel()}"
        )
    return idx


# ----------------------------------------------------------------------------- load
def _load_base(name: str, meta: dict) -> nn.Module:
    from ..core.models import quiet_loading

    with quiet_loading():  # the artifact restores the head: no "MISSING ... newly initialized" report
        return _load_base_model(name, meta)


def _load_base_model(name: str, meta: dict) -> nn.Module:
    import transformers

    from ..core.models import load_model, resolve_model

    arch = meta["base_model"].get("architecture") or ""
    head = meta["head"]
    kwargs = {}
    if head.get("id2label"):
        kwargs["id2label"] = {int(k): v for k, v in head["id2label"].items()}
        kwargs["label2id"] = head.get("label2id") or {v: int(k) for k, v in head["id2label"].items()}
    if head.get("problem_type"):
        kwargs["problem_type"] = head["problem_type"]
    if arch.endswith("ForSequenceClassification"):
        return load_model(name, num_labels=head.get("num_labels"), task="classification", **kwargs)
    if arch.endswith("ForCausalLM"):
        return load_model(name, task="causal-lm")
    cls = getattr(transformers, arch, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        return load_model(name, task="base")
    if head.get("num_labels") is not None and head.get("params"):
        kwargs["num_labels"] = head["num_labels"]
    try:
        return cls.from_pretrained(resolve_model(name), **kwargs)
    except (OSError, ValueError) as exc:
        raise BitFitError(f"could not load base model {name!r} as {arch}: {exc}") from None


def _plan(target: nn.Module, art: Artifact):
    """Check that ``art`` fits ``target`` without touching it; returns (BitFitConfig, ModelMap)."""
    meta, where = art.meta, art.path
    try:
        cfg = BitFitConfig.from_dict(meta["bitfit_config"])
    except BitFitError as exc:
        raise ArtifactError(f"artifact {where}: its BitFit config is not valid here: {exc}") from None
    except TypeError as exc:
        raise _bad(where, f"bitfit_config is malformed ({exc})") from None
    state = get_state(target)
    mm = state.model_map if state is not None else discover(target, pooler_head=cfg.pooler_head)
    try:
        sel = resolve(mm, cfg)
    except BitFitError as exc:
        raise ArtifactError(f"artifact {where} does not fit this model: {exc}") from None
    arch = meta["base_model"].get("architecture")
    hint = f" (the artifact was saved from a {arch})" if arch and arch != type(target).__name__ else ""
    want, have = set(meta["slots"]), set(sel.chosen)
    sparse = cfg.budget is not None
    if sparse and want <= have:
        have = want  # a budget trains the chosen entries' biases only
    if want != have:
        only_a = sorted(want - have)
        only_m = sorted(have - want)
        raise ArtifactError(
            f"artifact {where} does not fit this {type(target).__name__}{hint}: "
            + (f"{len(only_a)} of its biases are not in the model's selection (e.g. {only_a[0]})" if only_a else "")
            + ("; " if only_a and only_m else "")
            + (f"{len(only_m)} selected biases of the model are not in the artifact (e.g. {only_m[0]})" if only_m else "")
        )
    for name, s in meta["slots"].items():
        slot = mm.slot(name)
        if list(sel.chosen[name]) != list(s["roles"]) or slot.size != s["size"]:
            raise ArtifactError(
                f"artifact {where}: {name} has roles {s['roles']} and size {s['size']} there, but "
                f"{list(sel.chosen[name])} and size {slot.size} in this model{hint}; shapes do not fit"
            )
        if bool(s["added"]) != (not slot.exists):
            raise ArtifactError(
                f"artifact {where}: {name} was {'added' if s['added'] else 'present'} in the saved base but "
                f"{'exists' if slot.exists else 'is missing'} in this model: not the same architecture"
            )
        idx = slot.indices(sel.chosen[name])
        n = None if idx is None else int(idx.numel())
        if n != s.get("indices") and not sparse:
            raise ArtifactError(f"artifact {where}: {name} trains {s.get('indices')} indices there, {n} here")
    entries = None
    if sparse:
        from ..methods.sparse import check_entries

        entries = {name: art.tensors[f"entries:{name}"] if s.get("indices") is not None else torch.arange(s["size"])
                   for name, s in meta["slots"].items()}
        try:
            entries = check_entries(mm, sel, entries, cfg.budget)
        except BitFitError as exc:
            raise ArtifactError(f"artifact {where}: its trained entries do not fit this model: {exc}") from None
    params = dict(target.named_parameters())
    norms = meta.get("norm_weights", {})
    if set(norms) != set(sel.norm_weights):
        raise ArtifactError(
            f"artifact {where} trained the norm gains of {len(norms)} modules, but its config selects "
            f"{len(sel.norm_weights)} in this {type(target).__name__}{hint}; not the same architecture"
        )
    for name, s in norms.items():
        if params[name].numel() != s["size"]:
            raise ArtifactError(f"artifact {where}: norm gain {name} has size {s['size']} there, "
                                f"{params[name].numel()} in this model{hint}; shapes do not fit")
    head = meta["head"]["params"]
    if set(head) != set(mm.head_params):
        raise ArtifactError(
            f"artifact {where} has head parameters {sorted(head)} but this model's head is {sorted(mm.head_params)}"
            f"{hint}; load the base with the artifact's head class"
        )
    for name, shape in head.items():
        if list(params[name].shape) != list(shape):
            n = meta["head"].get("num_labels")
            raise ArtifactError(
                f"artifact {where}: head parameter {name} has shape {list(shape)} but {list(params[name].shape)} in "
                f"this model; load the base with num_labels={n}"
            )
    return cfg, mm, entries


def load(base_model, path, strict: bool = True) -> nn.Module:
    """Load the task artifact at ``path`` onto ``base_model`` and return the BitFit model.

    ``base_model``: a model (the same frozen base the artifact was trained on; a BitFit model
    carrying another task is first restored to its base) or a str (local folder, Hub name or
    alias such as "minilm"; loaded with the artifact's head class and label count). The
    fingerprint of the frozen weights must match the artifact's unless ``strict=False``.
    Everything is checked before the model is touched: a failure leaves it as it was.
    A peft-format BitFit adapter folder (``adapter_config.json``, docs/PEFT.md) loads the same way.
    """
    peft_dir = Path(os.path.expanduser(str(path))) if isinstance(path, (str, os.PathLike)) else None
    if peft_dir is not None and (peft_dir / "adapter_config.json").is_file() and not (peft_dir / CONFIG_NAME).is_file():
        from ..peft.convert import read_peft_adapter  # bitfit.peft reads it (no peft needed)

        path = read_peft_adapter(peft_dir)
    art = read_artifact(path, strict=strict)
    if isinstance(base_model, (str, os.PathLike)):
        model = _load_base(str(base_model), art.meta)
    elif isinstance(base_model, nn.Module):
        model = base_model
    else:
        raise ArtifactError(f"base_model must be a torch model or a model name, got {type(base_model).__name__}")
    target = unwrap(model)
    cfg, _, entries = _plan(target, art)
    _check_fingerprint(target, art.meta, strict, art.path)
    state = get_state(target)
    if state is not None:
        _check_restorable(target, state)
        remove_dynamic(target)
        _restore_base(target, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply(target, config=cfg, entries=entries)
    _write(target, art)
    config = getattr(target, "config", None)
    head = art.meta["head"]
    if config is not None and head.get("params"):
        if head.get("id2label"):
            config.id2label = {int(k): v for k, v in head["id2label"].items()}
            config.label2id = head.get("label2id") or {v: int(k) for k, v in head["id2label"].items()}
        if head.get("problem_type"):
            config.problem_type = head["problem_type"]
    return model


@torch.no_grad()
def _write(target: nn.Module, art: Artifact) -> None:
    state = get_state(target)
    for name, s in art.meta["slots"].items():
        param = trainable_bias_param(target, name)
        idx = state.partial.get(name)
        if idx is None:
            base = state.base.get(name)
            value = _slot_value(art, name, None if base is None else base.float().cpu())
            param.copy_(value.to(param.dtype).reshape(param.shape))
        else:
            base = state.base.get(name)  # None: an added bias (stored as its value)
            value = _slot_value(art, name, None if base is None else base.float().cpu()[idx.cpu()])
            param[idx.to(param.device)] = value.to(param.dtype).to(param.device)
    params = dict(target.named_parameters())
    for name in art.meta.get("norm_weights", {}):
        p = params[name]
        value = _slot_value(art, name, state.base[name].float().cpu().reshape(-1), norm=True)
        p.copy_(value.to(p.dtype).reshape(p.shape))
    for name in art.meta["head"]["params"]:
        p = params[name]
        if name not in state.base:  # an untrained head (train_head=False): keep its base value for unmerge
            state.base[name] = p.detach().clone()
        p.copy_(art.tensors[f"head:{name}"].to(p.dtype).reshape(p.shape))


# ----------------------------------------------------------------------------- unmerge
def _check_restorable(target: nn.Module, state) -> None:
    missing = [s.name for s in state.trained_slots() if s.name not in state.added and s.name not in state.base]
    missing += [n for n in state.selection.head_params + state.selection.norm_weights if n not in state.base]
    if missing:
        raise ArtifactError(
            f"cannot restore the base: no copy of the base value of {len(missing)} tensor(s) was kept "
            f"(e.g. {missing[0]}); reload the base model instead"
        )


def _detach_bitfit(target: nn.Module, state, keep_trained: bool) -> None:
    """Remove norm hooks and fused-slice masks (keeping the trained values, or the base ones)."""
    for handle in state.hooks.values():
        handle.remove()
    for slot in state.trained_slots():
        module = _module(target, slot.module_name)
        if parametrize.is_parametrized(module, "bias"):
            parametrize.remove_parametrizations(module, "bias", leave_parametrized=keep_trained)


def _drop_state(target: nn.Module) -> None:
    """A plain model again: every parameter trainable, no lean mode, no BitFit state."""
    for p in target.parameters():
        p.requires_grad_(True)
    remove_lean(target)
    object.__delattr__(target, STATE_ATTR)


@torch.no_grad()
def _restore_base(target: nn.Module, state) -> None:
    _detach_bitfit(target, state, keep_trained=False)
    for slot in state.trained_slots():
        module = _module(target, slot.module_name)
        if slot.name in state.added:
            if slot.kind == "norm":
                del module._parameters["bias"]
            else:
                module.bias = None
        else:
            b = state.base[slot.name]
            module.bias.copy_(b.to(module.bias.dtype))
    params = dict(target.named_parameters())
    for name in list(state.model_map.head_params) + list(state.selection.norm_weights):
        if name in state.base:
            params[name].copy_(state.base[name].to(params[name].dtype))
    _drop_state(target)


def unmerge(model: nn.Module) -> nn.Module:
    """Turn a BitFit model back into its base, in place: the base biases and head bit for bit,
    added biases removed, every parameter trainable again, no BitFit state left."""
    target = unwrap(model)
    state = get_state(target)
    if state is None:
        raise ArtifactError("unmerge needs a BitFit model (from bitfit.apply or bitfit.load); this one has no BitFit state")
    _check_restorable(target, state)
    remove_dynamic(target)
    _restore_base(target, state)
    return model


# ----------------------------------------------------------------------------- merge
def _candidate_switches(config) -> list[str]:
    d = config.to_dict() if config is not None else {}
    return sorted(k for k, v in d.items() if v is False and "bias" in k.lower())


def _meta_instance(target: nn.Module, config):
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return type(target)(config)


def _switch_plan(target: nn.Module, state, needed: set) -> tuple[dict, set, set]:
    """Config switches that give every module in ``needed`` a bias.

    Returns (switch -> True, modules given a bias by those switches, modules still uncovered).
    Each candidate switch is tried on a meta-device instance of the model class, so what it
    does is read from the architecture's own code, not guessed.
    """
    config = getattr(target, "config", None)
    if config is None or not needed:
        return {}, set(), set(needed)
    have_bias = {n for n, m in target.named_modules() if isinstance(getattr(m, "bias", None), torch.Tensor)}
    added = {s.module_name for s in state.trained_slots() if s.name in state.added}
    base_bias = have_bias - added
    chosen, gains = {}, set()
    for flag in _candidate_switches(config):
        cfg2 = copy.deepcopy(config)
        setattr(cfg2, flag, True)
        try:
            m2 = _meta_instance(target, cfg2)
        except Exception:
            continue
        g = {n for n, m in m2.named_modules() if isinstance(getattr(m, "bias", None), torch.Tensor)} - base_bias
        if g & (needed - gains):
            chosen[flag] = True
            gains |= g
    return chosen, gains, needed - gains


def merge(model: nn.Module) -> nn.Module:
    """Fold the BitFit task into ``model`` in place and return it as a plain transformers model.

    Fused-slice parametrizations become plain biases, added biases become real ones with the
    architecture's config switch set (``attention_bias``/``mlp_bias`` on LLaMA-style configs),
    the BitFit state is removed and every parameter is trainable again. Its ``save_pretrained``
    folder loads with ``from_pretrained`` without bitfit. Where the architecture has no place
    for an added bias (RMSNorm bias, T5 projections), merge refuses and changes nothing.
    """
    target = unwrap(model)
    state = get_state(target)
    if state is None:
        raise ArtifactError("merge needs a BitFit model (from bitfit.apply or bitfit.load); this one has no BitFit state")
    refuse_dynamic(target, "merge")
    _refuse_nonfinite(target, state, "merge")
    added = [s for s in state.trained_slots() if s.name in state.added]
    arch = type(target).__name__
    keep = "; keep the artifact form instead (bitfit.save, then bitfit.load onto the base)"
    norms = [s for s in added if s.kind == "norm"]
    if norms:
        cls = type(_module(target, norms[0].module_name)).__name__
        raise ArtifactError(
            f"cannot merge: {len(norms)} added norm bias(es) (e.g. {norms[0].name}) have no place in {arch}: its "
            f"{cls} has no bias parameter and no config switch adds one{keep}"
        )
    needed = {s.module_name for s in added}
    switches, gains, uncovered = _switch_plan(target, state, needed)
    if uncovered:
        ex = sorted(uncovered)
        raise ArtifactError(
            f"cannot merge: {len(ex)} added bias(es) (e.g. {ex[0]}.bias) have no place in {arch}: no switch of its "
            f"config gives those modules a bias{keep}"
        )
    extra = sorted(gains - needed)
    ref = {}
    if switches:  # the merged model must have exactly the tensors a fresh model of the new config has
        cfg2 = copy.deepcopy(target.config)
        for k, v in switches.items():
            setattr(cfg2, k, v)
        ref = {k: tuple(v.shape) for k, v in _meta_instance(target, cfg2).state_dict().items()}
    for name in extra:  # modules the switches give a bias that the task did not train: zero biases
        if f"{name}.bias" not in ref:
            raise ArtifactError(f"cannot merge: switch(es) {sorted(switches)} would also need a bias on {name}{keep}")
    with torch.no_grad():
        _detach_bitfit(target, state, keep_trained=True)
        for name in extra:
            m = _module(target, name)
            w = m.weight
            m.bias = nn.Parameter(torch.zeros(ref[f"{name}.bias"], dtype=w.dtype, device=w.device))
        for k, v in switches.items():
            setattr(target.config, k, v)
    _drop_state(target)
    if switches:
        got = {k: tuple(v.shape) for k, v in target.state_dict().items()}
        if got != ref:
            diff = sorted(set(got) ^ set(ref)) or [k for k in got if got[k] != ref.get(k)]
            warnings.warn(f"merged {arch} differs from a fresh {arch} of its config at {diff[:3]}", stacklevel=2)
    return model


__all__ = ["save", "load", "merge", "unmerge", "read_artifact", "task_tensors", "check_finite", "fingerprint",
           "Artifact", "TaskTensors", "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME", "DTYPES"]
