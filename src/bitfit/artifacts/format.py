"""What a BitFit artifact is: its file names, format versions, storage dtypes, the schema of its
config (``bitfit_config.json``) and the tensors that config declares, and the in-memory types
:class:`Artifact` (a read artifact) and :class:`TaskTensors` (one task's full values over a base).

An artifact is a folder with two files:

* ``bitfit_model.safetensors``: per trained bias slot the *difference* from the base value
  (``bias:<slot>``; for a fused slot of which only some slices train, only those indices), the
  value of biases the base lacks (added by ``add_missing``), and the task head
  (``head:<param>``). With ``dtype="int8"`` every tensor has a symmetric per-tensor scale
  (``scale:<key>``). In float32 a difference that does not round-trip bit for bit
  (``base + (v - base) != v`` in float32) is repaired by a few exact values
  (``fix_idx:<slot>``/``fix_val:<slot>``), so loading is exact; a slot where more than 1/16
  of the elements would need that is stored as its value. Sparse BitFit (a ``budget``) stores
  the trained indices of each partly trained bias as ``entries:<slot>``. Trained norm gains
  (``train_norm_weights``) are stored like biases under ``norm:<param>``.
* ``bitfit_config.json``: format version, base model name/config/fingerprint, the
  BitFitConfig, per-slot roles, head layout and labels, storage dtype, a checksum of the
  tensor file. No pickle anywhere.

The integrity fields (``weights_sha256``, ``base_model.fingerprint``) are required unless
``strict=False``. docs/ARTIFACTS.md describes all of it. Writing lives in ``store``/``saving``,
reading in ``read``.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..core.config import ROLES
from ..errors import ArtifactError

FORMAT = "bitfit-artifact"
FORMAT_VERSION = 3  # the newest this bitfit reads; 2 = with a norm_weights section (train_norm_weights),
# 3 = sparse BitFit (a budget: the trained entries of each bias stored as ``entries:<slot>``)
PLAIN_FORMAT_VERSION = 1  # what an artifact without trained norm gains is written as (older bitfits read it)
NORM_FORMAT_VERSION = 2  # with trained norm gains
SPARSE_FORMAT_VERSION = 3  # sparse BitFit (a budget)
WEIGHTS_NAME = "bitfit_model.safetensors"
CONFIG_NAME = "bitfit_config.json"
DTYPES = ("float32", "float16", "int8")


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


def damaged(path, what: str) -> ArtifactError:
    """The error for an artifact whose files do not follow this format."""
    return ArtifactError(f"artifact {path} is damaged: {what}. Save it again with bitfit.save")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{32,64}$")
_STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8}
_INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)


def _is_int(x, lo: int = 0) -> bool:
    return type(x) is int and x >= lo  # not bool


def validate_meta(meta, path, strict: bool = True) -> None:
    if not isinstance(meta, dict):
        raise damaged(path, f"{CONFIG_NAME} holds a JSON {_json_kind(meta)}, not an object: it is not a bitfit artifact config")
    if meta.get("format") != FORMAT:
        raise damaged(path, f"{CONFIG_NAME} is not a bitfit artifact config (no \"format\": \"{FORMAT}\")")
    if "format_version" not in meta:
        raise damaged(path, "format_version is missing")
    ver = meta["format_version"]
    if not _is_int(ver, 1):
        raise damaged(path, f"format_version must be a positive integer, got {json.dumps(ver)}")
    if ver > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact {path} has format version {ver} (written by bitfit {meta.get('bitfit_version', '?')}); this "
            f"bitfit reads versions up to {FORMAT_VERSION}: upgrade bitfit (pip install -U bitfit)"
        )
    if meta.get("dtype") not in DTYPES:
        raise damaged(path, f"unknown storage dtype {meta.get('dtype')!r}")
    for key, typ in (("base_model", dict), ("bitfit_config", dict), ("slots", dict), ("head", dict), ("added", list)):
        if not isinstance(meta.get(key), typ):
            raise damaged(path, f"field {key!r} is missing or not a {typ.__name__}")
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
            raise damaged(path, f"{key} must be {what}, got {json.dumps(v)[:80]}")
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
            raise damaged(path, f"slot {name} has no roles/size")
        bad = [r for r in s["roles"] if r not in ROLES]
        if bad:
            raise ArtifactError(
                f"artifact {path}: slot {name} has unknown role(s) {bad}; known roles: {', '.join(ROLES)}. "
                "It was written by another bitfit version: upgrade bitfit"
            )
        if s.get("encoding") not in ("delta", "value"):
            raise damaged(path, f"slot {name} has unknown encoding {s.get('encoding')!r}")
        if not isinstance(s.get("added"), bool):
            raise damaged(path, f"slot {name}: \"added\" must be true or false")
        if s.get("indices") is not None and not _is_int(s["indices"], 1):
            raise damaged(path, f"slot {name}: \"indices\" must be a positive integer or null")
        if s.get("fixes") is not None and not _is_int(s["fixes"]):
            raise damaged(path, f"slot {name}: \"fixes\" must be a non-negative integer")
    norms = meta.get("norm_weights", {})
    if not isinstance(norms, dict):
        raise damaged(path, "field 'norm_weights' is not an object")
    for name, s in norms.items():
        if not isinstance(s, dict) or not _is_int(s.get("size"), 1):
            raise damaged(path, f"norm gain {name} has no size")
        if s.get("encoding") not in ("delta", "value"):
            raise damaged(path, f"norm gain {name} has unknown encoding {s.get('encoding')!r}")
        if s.get("fixes") is not None and not _is_int(s["fixes"]):
            raise damaged(path, f"norm gain {name}: \"fixes\" must be a non-negative integer")
    sparse = meta.get("sparse")
    if sparse is not None and (not isinstance(sparse, dict) or not _is_int(sparse.get("entries"), 1)):
        raise damaged(path, "field 'sparse' must be an object with a positive \"entries\" count")
    if any(a not in meta["slots"] for a in meta["added"]):
        raise damaged(path, "\"added\" names a bias that is not among the slots")
    head = meta["head"]
    if not isinstance(head.get("params"), dict):
        raise damaged(path, "head.params is missing")
    for name, shape in head["params"].items():
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise damaged(path, f"head parameter {name} has shape {json.dumps(shape)[:80]}, not a list of sizes")
    if head.get("num_labels") is not None and not _is_int(head["num_labels"], 1):
        raise damaged(path, f"head.num_labels must be a positive integer, got {json.dumps(head['num_labels'])}")
    for key in ("id2label", "label2id"):
        m = head.get(key)
        if m is not None and not isinstance(m, dict):
            raise damaged(path, f"head.{key} must be an object")
    if head.get("id2label") and not all(str(k).lstrip("-").isdigit() for k in head["id2label"]):
        raise damaged(path, "head.id2label keys must be label indices")
    if head.get("label2id") and not all(_is_int(v) for v in head["label2id"].values()):
        raise damaged(path, "head.label2id values must be label indices")


def _json_kind(x) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}.get(
        type(x), type(x).__name__)


def expected_tensors(meta) -> dict:
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
