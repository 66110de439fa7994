"""Task artifacts: save / load only what BitFit trained, merge into a plain model, unmerge.

An artifact is a folder with two files:

* ``bitfit_model.safetensors``: per trained bias slot the *difference* from the base value
  (``bias:<slot>``; for a fused slot of which only some slices train, only those indices), the
  value of biases the base lacks (added by ``add_missing``), and the task head
  (``head:<param>``). With ``dtype="int8"`` every tensor has a symmetric per-tensor scale
  (``scale:<key>``). In float32 a difference that does not round-trip bit for bit
  (``base + (v - base) != v`` in float32) is repaired by a few exact values
  (``fix_idx:<slot>``/``fix_val:<slot>``), so loading is exact; a slot where more than 1/16
  of the elements would need that is stored as its value.
* ``bitfit_config.json``: format version, base model name/config/fingerprint, the
  BitFitConfig, per-slot roles, head layout and labels, storage dtype, a checksum of the
  tensor file. No pickle anywhere.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import safetensors
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import ROLES, BitFitConfig
from .errors import ArtifactError, BitFitError
from .lean import remove as remove_lean
from .prepare import STATE_ATTR, apply, bias_tensor, get_state, trainable_bias_param, unwrap
from .roles import discover
from .select import resolve

FORMAT = "bitfit-artifact"
FORMAT_VERSION = 1
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
    body, prefix = _body(target)
    h = hashlib.sha256()
    for name, p in sorted(body.named_parameters(), key=lambda kv: kv[0]):
        if prefix + name in skip or ".parametrizations." in name or p.is_meta:
            continue
        flat = p.detach().reshape(-1)
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


def _locate(model: nn.Module, slot_name: str, saved_prefix: str = "") -> Optional[str]:
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
    tensors: dict = {}
    slots_meta: dict = {}
    for slot in state.trained_slots():
        roles = list(state.selection.chosen[slot.name])
        idx = state.partial.get(slot.name)
        added = slot.name in state.added
        entry = {
            "roles": roles, "size": slot.size, "kind": slot.kind, "added": added,
            "indices": None if idx is None else int(idx.numel()),
        }
        if with_tensors:
            value = bias_tensor(target, slot.name).detach().float().cpu()
            base = None if added else _base_value(target, slot.name)
            if idx is not None:
                value = value[idx.cpu()]
                base = None if base is None else base[idx.cpu()]
            key = f"bias:{slot.name}"
            if base is None:
                entry["encoding"] = "value"
                _quantise(key, value, dtype, tensors)
            else:
                entry["encoding"] = "delta"
                if dtype == "float32":
                    d, fix_idx, fix_val = _exact_delta(value, base)
                    if 16 * fix_idx.numel() > value.numel():  # many unreachable: store the value (smaller)
                        entry["encoding"] = "value"
                        tensors[key] = value.contiguous()
                    else:
                        tensors[key] = d.contiguous()
                        if fix_idx.numel():
                            small = value.numel() <= torch.iinfo(torch.int16).max
                            tensors[f"fix_idx:{slot.name}"] = fix_idx.to(torch.int16 if small else torch.int32)
                            tensors[f"fix_val:{slot.name}"] = fix_val
                        entry["fixes"] = int(fix_idx.numel())
                else:
                    _quantise(key, value - base, dtype, tensors)
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
    from . import __version__

    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
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
        "bitfit_config": state.config.to_dict(),
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
    return meta, tensors


def save(model: nn.Module, path, dtype: str = "float32", label_names=None, base_name: Optional[str] = None) -> Path:
    """Save what BitFit trained in ``model`` to the folder ``path``; returns the folder.

    dtype: "float32" (exact), "float16" or "int8" (symmetric per-tensor scale). The write is
    atomic: files go to a temporary folder beside ``path`` and are renamed into place, so an
    interrupted save leaves either the previous artifact or none, never half of one.
    """
    dtype = _check_dtype(dtype)
    meta, tensors = _collect(model, dtype, label_names, base_name)
    path = Path(os.path.expanduser(str(path)))
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a folder; give a folder path for the artifact")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        weights = tmp / WEIGHTS_NAME
        safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt", "bitfit": FORMAT})
        meta["weights_sha256"] = _sha256(weights)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if not path.exists():
            os.rename(tmp, path)
        else:  # keep other files in the folder; the config (with the checksum) goes last
            os.replace(tmp / WEIGHTS_NAME, path / WEIGHTS_NAME)
            os.replace(tmp / CONFIG_NAME, path / CONFIG_NAME)
            tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- read
def _bad(path, what: str) -> ArtifactError:
    return ArtifactError(f"artifact {path} is damaged: {what}. Save it again with bitfit.save")


def _validate_meta(meta, path) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(path, f"{CONFIG_NAME} is not a bitfit artifact config (no \"format\": \"{FORMAT}\")")
    ver = meta.get("format_version")
    if not isinstance(ver, int):
        raise _bad(path, "format_version is missing")
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
    for name, s in meta["slots"].items():
        if not isinstance(s, dict) or not isinstance(s.get("roles"), list) or not isinstance(s.get("size"), int):
            raise _bad(path, f"slot {name} has no roles/size")
        bad = [r for r in s["roles"] if r not in ROLES]
        if bad:
            raise ArtifactError(
                f"artifact {path}: slot {name} has unknown role(s) {bad}; known roles: {', '.join(ROLES)}. "
                "It was written by another bitfit version: upgrade bitfit"
            )
        if s.get("encoding") not in ("delta", "value"):
            raise _bad(path, f"slot {name} has unknown encoding {s.get('encoding')!r}")
    if not isinstance(meta["head"].get("params"), dict):
        raise _bad(path, "head.params is missing")


def _expected_keys(meta) -> dict:
    """stored key -> expected numel (None: scalar scale / free-sized fix)."""
    keys = {}
    for name, s in meta["slots"].items():
        n = s["size"] if s.get("indices") is None else s["indices"]
        keys[f"bias:{name}"] = n
        if s.get("fixes"):
            keys[f"fix_idx:{name}"] = s["fixes"]
            keys[f"fix_val:{name}"] = s["fixes"]
    for name, shape in meta["head"]["params"].items():
        n = 1
        for d in shape:
            n *= int(d)
        keys[f"head:{name}"] = n
    if meta["dtype"] == "int8":
        for k in [k for k in keys if not k.startswith("fix_")]:
            keys[f"scale:{k}"] = 1
    return keys


def read_artifact(path) -> Artifact:
    """Read and validate an artifact folder (or its config file); tensors come back as float32."""
    if isinstance(path, Artifact):
        return path
    p = Path(os.path.expanduser(str(path)))
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        p = p.parent
    if not p.is_dir():
        raise ArtifactError(f"no artifact at {p}: the folder does not exist (bitfit.save writes one)")
    cfg_file, w_file = p / CONFIG_NAME, p / WEIGHTS_NAME
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise ArtifactError(f"artifact {p} is incomplete: {f.name} is missing. Save it again with bitfit.save")
    try:
        meta = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(p, f"{CONFIG_NAME} is not valid JSON ({exc})") from None
    _validate_meta(meta, p)
    try:
        raw = safetensors.torch.load_file(str(w_file))
    except Exception as exc:  # SafetensorError, OSError: truncated or garbage
        raise _bad(p, f"{WEIGHTS_NAME} cannot be read, it is truncated or not a safetensors file "
                      f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    want = meta.get("weights_sha256")
    if want is not None and _sha256(w_file) != want:
        raise _bad(p, f"{WEIGHTS_NAME} does not match {CONFIG_NAME} (checksum differs: replaced or modified)")
    expected = _expected_keys(meta)
    missing = sorted(set(expected) - set(raw))
    extra = sorted(set(raw) - set(expected))
    if missing:
        raise _bad(p, f"{len(missing)} tensor(s) missing from {WEIGHTS_NAME}, e.g. {missing[0]}")
    if extra:
        raise _bad(p, f"{len(extra)} unexpected tensor(s) in {WEIGHTS_NAME}, e.g. {extra[0]}")
    for k, n in expected.items():
        if raw[k].numel() != n:
            raise _bad(p, f"tensor {k} has {raw[k].numel()} values, the config says {n}")
    tensors = {}
    for k, t in raw.items():
        if k.startswith("scale:"):
            continue
        if k.startswith("fix_idx:"):
            name = k[len("fix_idx:"):]
            s = meta["slots"][name]
            n = s["size"] if s.get("indices") is None else s["indices"]
            if t.is_floating_point() or (t.numel() and (int(t.min()) < 0 or int(t.max()) >= n)):
                raise _bad(p, f"tensor {k} holds indices outside its bias (0..{n - 1})")
            tensors[k] = t.to(torch.int64)
            continue
        if meta["dtype"] == "int8" and not k.startswith("fix_val:"):
            tensors[k] = t.to(torch.float32) * raw[f"scale:{k}"].to(torch.float32)
        else:
            tensors[k] = t.to(torch.float32)
    for name, shape in meta["head"]["params"].items():
        tensors[f"head:{name}"] = tensors[f"head:{name}"].reshape(shape)
    return Artifact(meta, tensors, p)


# ----------------------------------------------------------------------------- task tensors
def _slot_value(art: Artifact, name: str, base: Optional[torch.Tensor]) -> torch.Tensor:
    """The stored part of slot ``name`` (trained indices only for a fused slot), float32."""
    s = art.meta["slots"][name]
    stored = art.tensors[f"bias:{name}"]
    if s["encoding"] == "value":
        return stored.clone()
    if base is None:
        raise ArtifactError(f"artifact stores a difference for {name} but the base model has no such bias")
    v = base + stored
    if s.get("fixes"):
        v[art.tensors[f"fix_idx:{name}"]] = art.tensors[f"fix_val:{name}"]
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
        meta, _ = _collect(src, with_tensors=False)
        if strict and src is not base:
            _check_fingerprint(base, meta, strict, "in memory")
        biases = {s.name: bias_tensor(src, s.name).detach().float().cpu().clone() for s in state.trained_slots()}
        params = dict(src.named_parameters())
        head = {n: params[n].detach().float().cpu().clone() for n in state.model_map.head_params}
        return TaskTensors(biases, list(state.added), head, _meta_summary(meta))
    art = read_artifact(source)
    _check_fingerprint(base, art.meta, strict, art.path)
    prefix = art.meta["base_model"].get("prefix", "")
    biases = {}
    for name, s in art.meta["slots"].items():
        full = None
        if not s["added"]:
            here = _locate(base, name, prefix)
            full = _base_value(base, here) if here is not None else None
            if full is None:
                raise ArtifactError(f"artifact {art.path} has a bias for {name}, which this base model does not have")
            if full.numel() != s["size"]:
                raise ArtifactError(f"{name}: artifact size {s['size']}, base model size {full.numel()}")
        if s.get("indices") is None:
            biases[name] = _slot_value(art, name, full)
        else:
            idx = _indices_from_meta(base, art.meta, name, prefix)
            if full is None:
                full = torch.zeros(s["size"])
            full = full.clone()
            full[idx] = _slot_value(art, name, full[idx])
            biases[name] = full
    head = {n: art.tensors[f"head:{n}"].clone() for n in art.meta["head"]["params"]}
    return TaskTensors(biases, list(art.meta["added"]), head, _meta_summary(art.meta))


def _indices_from_meta(model: nn.Module, meta: dict, name: str, prefix: str) -> torch.Tensor:
    """Trained indices of a fused slot, reproduced from the model's roles and the stored roles."""
    here = _locate(model, name, prefix)
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
    import transformers

    from .models import load_model, resolve_model

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
    mm = state.model_map if state is not None else discover(target)
    try:
        sel = resolve(mm, cfg)
    except BitFitError as exc:
        raise ArtifactError(f"artifact {where} does not fit this model: {exc}") from None
    arch = meta["base_model"].get("architecture")
    hint = f" (the artifact was saved from a {arch})" if arch and arch != type(target).__name__ else ""
    want, have = set(meta["slots"]), set(sel.chosen)
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
        if n != s.get("indices"):
            raise ArtifactError(f"artifact {where}: {name} trains {s.get('indices')} indices there, {n} here")
    params = dict(target.named_parameters())
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
    return cfg, mm


def load(base_model, path, strict: bool = True) -> nn.Module:
    """Load the task artifact at ``path`` onto ``base_model`` and return the BitFit model.

    ``base_model``: a model (the same frozen base the artifact was trained on; a BitFit model
    carrying another task is first restored to its base) or a str (local folder, Hub name or
    alias such as "minilm"; loaded with the artifact's head class and label count). The
    fingerprint of the frozen weights must match the artifact's unless ``strict=False``.
    Everything is checked before the model is touched: a failure leaves it as it was.
    """
    art = read_artifact(path)
    if isinstance(base_model, (str, os.PathLike)):
        model = _load_base(str(base_model), art.meta)
    elif isinstance(base_model, nn.Module):
        model = base_model
    else:
        raise ArtifactError(f"base_model must be a torch model or a model name, got {type(base_model).__name__}")
    target = unwrap(model)
    cfg, _ = _plan(target, art)
    _check_fingerprint(target, art.meta, strict, art.path)
    state = get_state(target)
    if state is not None:
        _check_restorable(target, state)
        _restore_base(target, state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply(target, config=cfg)
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
            base = state.base[name].float().cpu()
            value = _slot_value(art, name, base[idx.cpu()])
            param[idx.to(param.device)] = value.to(param.dtype).to(param.device)
    params = dict(target.named_parameters())
    for name in art.meta["head"]["params"]:
        p = params[name]
        if name not in state.base:  # an untrained head (train_head=False): keep its base value for unmerge
            state.base[name] = p.detach().clone()
        p.copy_(art.tensors[f"head:{name}"].to(p.dtype).reshape(p.shape))


# ----------------------------------------------------------------------------- unmerge
def _check_restorable(target: nn.Module, state) -> None:
    missing = [s.name for s in state.trained_slots() if s.name not in state.added and s.name not in state.base]
    missing += [n for n in state.selection.head_params if n not in state.base]
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
    for name in state.model_map.head_params:
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


__all__ = ["save", "load", "merge", "unmerge", "read_artifact", "task_tensors", "fingerprint",
           "Artifact", "TaskTensors", "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME", "DTYPES"]
