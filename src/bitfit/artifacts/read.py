"""Reading an artifact folder into a validated :class:`Artifact`, and turning a stored slot
(a difference from the base with exact fixes, or a value) back into its float32 value."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import safetensors.torch
import torch

from ..errors import ArtifactError
from .finite import first_nonfinite
from .format import CONFIG_NAME, WEIGHTS_NAME, Artifact, damaged, expected_tensors, validate_meta
from .store import reading, sha256


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
        raise damaged(shown, f"{CONFIG_NAME} is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    try:
        validate_meta(meta, shown, strict)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise damaged(shown, f"{CONFIG_NAME} has an unexpected structure ({type(exc).__name__}: {exc})") from None
    try:
        raw = safetensors.torch.load_file(str(w_file))
    except PermissionError as exc:
        raise ArtifactError(f"artifact {shown}: cannot read {WEIGHTS_NAME} ({exc.strerror or exc}); check its permissions") from None
    except Exception as exc:  # SafetensorError, OSError: truncated or garbage
        raise damaged(shown, f"{WEIGHTS_NAME} cannot be read, it is truncated or not a safetensors file "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    want = meta.get("weights_sha256")
    try:
        if want is not None and sha256(w_file) != want:
            raise damaged(shown, f"{WEIGHTS_NAME} does not match {CONFIG_NAME} (checksum differs: replaced or modified)")
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
        bad = first_nonfinite(path.tensors.items())
        if bad:
            raise ArtifactError(f"artifact {path.path or '(in memory)'} holds non-finite values: tensor {bad}")
        return path
    p = Path(os.path.abspath(os.path.expanduser(str(path))))
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        p = p.parent
    with reading(p) as src:  # no save swaps the folder while we read its two files
        meta, raw = _read_files(src, p, strict)
    expected = expected_tensors(meta)
    missing = sorted(set(expected) - set(raw))
    extra = sorted(set(raw) - set(expected))
    if missing:
        raise damaged(p, f"{len(missing)} tensor(s) missing from {WEIGHTS_NAME}, e.g. {missing[0]}")
    if extra:
        raise damaged(p, f"{len(extra)} unexpected tensor(s) in {WEIGHTS_NAME}, e.g. {extra[0]}")
    for k, (dtypes, shape) in expected.items():
        t = raw[k]
        if t.dtype not in dtypes:
            raise damaged(p, f"tensor {k} is stored as {_dt(t.dtype)}, the config says {'/'.join(_dt(d) for d in dtypes)} "
                          f"(dtype {meta['dtype']!r})")
        if tuple(t.shape) != shape:
            if k.startswith("bias:") and t.numel() != shape[0]:
                raise damaged(p, f"tensor {k} has {t.numel()} values, the config says {shape[0]}")
            raise damaged(p, f"tensor {k} has shape {list(t.shape)}, the config says {list(shape)}")
    bad = first_nonfinite(raw.items())
    if bad:
        raise ArtifactError(
            f"artifact {p} holds non-finite values: tensor {bad}; the model had diverged when it was saved. "
            "Retrain (e.g. with a lower learning rate) or use an earlier artifact"
        )
    if meta["dtype"] == "int8":
        zero = [k for k in expected if k.startswith("scale:") and not float(raw[k]) > 0]
        if zero:
            raise damaged(p, f"tensor {zero[0]} is not a positive scale")
    tensors = {}
    for k, t in raw.items():
        if k.startswith("scale:"):
            continue
        if k.startswith("fix_idx:"):
            name = k[len("fix_idx:"):]
            s = meta["norm_weights"][name[len("norm:"):]] if name.startswith("norm:") else meta["slots"][name]
            n = s["size"] if s.get("indices") is None else s["indices"]
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
                raise damaged(p, f"tensor {k} holds indices outside its bias (0..{n - 1})")
            tensors[k] = t.to(torch.int64)
            continue
        if k.startswith("entries:"):
            s = meta["slots"][k[len("entries:"):]]
            idx = t.to(torch.int64)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= s["size"]
                                or not bool((idx[1:] > idx[:-1]).all())):
                raise damaged(p, f"tensor {k} is not a sorted set of distinct indices of its bias (0..{s['size'] - 1})")
            tensors[k] = idx
            continue
        if meta["dtype"] == "int8" and not k.startswith("fix_val:"):
            tensors[k] = t.to(torch.float32) * raw[f"scale:{k}"].to(torch.float32)
        else:
            tensors[k] = t.to(torch.float32)
    return Artifact(meta, tensors, p)


def slot_value(art: Artifact, name: str, base: Optional[torch.Tensor], norm: bool = False) -> torch.Tensor:
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
