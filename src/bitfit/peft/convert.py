"""The peft-format BitFit adapter folder and its conversion to and from a bitfit artifact folder.

No peft import here: converting, and ``bitfit.load`` of a peft-format folder, work without peft.

A peft-format BitFit adapter is a bitfit artifact under peft's file names:

* ``adapter_config.json``: a :class:`~bitfit.peft.BitFitPeftConfig` (``"peft_type": "BITFIT"``,
  the selection fields) whose ``bitfit_meta`` field holds the artifact header of
  ``bitfit_config.json`` (base model name, config and fingerprint, per-slot roles and encoding,
  head layout and labels, storage dtype), less the file checksum.
* ``adapter_model.safetensors``: the artifact's tensors under peft-style keys
  (``base_model.model.<name in the model>``):

  ============================  ==========================================================
  artifact key                  peft key
  ============================  ==========================================================
  ``bias:<slot>`` (value)       ``base_model.model.<slot>``
  ``bias:<slot>`` (delta)       ``base_model.model.<slot>.bitfit_delta``
  ``head:<param>``              ``base_model.model.<param>``
  ``fix_idx:<slot>``            ``base_model.model.<slot>.bitfit_fix_idx``
  ``fix_val:<slot>``            ``base_model.model.<slot>.bitfit_fix_val``
  ``scale:<key>`` (int8)        the peft key of ``<key>`` + ``.bitfit_scale``
  ============================  ==========================================================

So the two formats hold the same bytes and convert both ways without a model, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import safetensors.torch
import torch

from ..errors import ArtifactError

PEFT_TYPE = "BITFIT"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_SUFFIX = {"delta": ".bitfit_delta", "fix_idx": ".bitfit_fix_idx", "fix_val": ".bitfit_fix_val",
           "scale": ".bitfit_scale"}
# peft task type per transformers architecture suffix (for the adapter_config.json of a converted artifact)
_TASK_TYPES = (
    ("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)
# the fields of BitFitPeftConfig besides peft's own (kept in step with bitfit/peft/config.py; a test checks)
SELECTION_FIELDS = ("preset", "roles", "include", "exclude", "layers", "add_missing", "train_head",
                    "pooler_head", "skip_zero_grad", "frozen_dtype", "lean")
# the value of a field that a saved config or header lacks: what it meant before the field existed
LEGACY_DEFAULTS = {"preset": "all", "add_missing": False, "train_head": True, "pooler_head": False,
                   "skip_zero_grad": False, "lean": True}

PathLike = Union[str, os.PathLike]


@dataclass
class Packed:
    """A bitfit artifact as it lies on disk: the header (``bitfit_config.json``) and the raw stored tensors."""

    meta: dict
    raw: dict


# ----------------------------------------------------------------------------- bitfit artifact folders
def read_bitfit_dir(path: PathLike) -> Packed:
    """The header and raw tensors of a bitfit artifact folder, after bitfit's own validation."""
    from ..artifacts import CONFIG_NAME, WEIGHTS_NAME, read_artifact

    p = Path(os.path.expanduser(str(path)))
    read_artifact(p)  # every check bitfit.load makes on the files (checksum, keys, sizes)
    meta = json.loads((p / CONFIG_NAME).read_text())
    return Packed(meta, safetensors.torch.load_file(str(p / WEIGHTS_NAME)))


def _write_folder(out: PathLike, files: dict) -> Path:
    """Write ``{file name: bytes}`` into folder ``out`` atomically (temp folder beside it, then renames;
    other files in an existing folder are kept)."""
    from ..artifacts.store import make_side_folder, remove_stale_side_folders

    out = Path(os.path.abspath(os.path.expanduser(str(out))))
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a folder; give a folder path")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_side_folders(out, "convert")  # what killed conversions to ``out`` left
        tmp = make_side_folder(out, "convert")  # mode 0o777 & ~umask (mkdtemp would make the folder 0700)
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if not out.exists():
            os.rename(tmp, out)
        else:
            for name in files:  # the config (named last by the callers) goes into place last
                os.replace(tmp / name, out / name)
            tmp.rmdir()
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"could not write {out} ({exc.strerror or exc}); nothing was changed there: free disk "
                            "space or choose a folder you can write to") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def bitfit_files(packed: Packed) -> dict:
    """``{file name: bytes}`` of the bitfit artifact folder holding ``packed``."""
    from ..artifacts import CONFIG_NAME, FORMAT, WEIGHTS_NAME

    weights = safetensors.torch.save(_contiguous(packed.raw), metadata={"format": "pt", "bitfit": FORMAT})
    meta = dict(packed.meta, weights_sha256=hashlib.sha256(weights).hexdigest())
    return {WEIGHTS_NAME: weights, CONFIG_NAME: json.dumps(meta, indent=2, sort_keys=True).encode()}


def write_bitfit_dir(packed: Packed, out: PathLike) -> Path:
    return _write_folder(out, bitfit_files(packed))


def to_artifact(packed: Packed, where: Optional[PathLike] = None):
    """``packed`` as a validated :class:`bitfit.artifacts.Artifact` (what ``bitfit.load`` takes);
    ``where`` is the folder its error messages name."""
    from ..artifacts import read_artifact

    from ..artifacts import CONFIG_NAME, WEIGHTS_NAME

    with tempfile.TemporaryDirectory(prefix="bitfit-peft-") as d:
        tmp = Path(d) / "artifact"
        try:
            art = read_artifact(write_bitfit_dir(packed, tmp))
        except ArtifactError as exc:
            # the checks run on a converted copy in a temporary folder: the message names the adapter's own
            # folder and files instead
            msg = str(exc).replace(str(tmp), str(where) if where is not None else "(adapter)")
            msg = msg.replace(WEIGHTS_NAME, PEFT_WEIGHTS_NAME).replace(CONFIG_NAME, PEFT_CONFIG_NAME)
            raise ArtifactError(msg) from None
    art.path = Path(where) if where is not None else None
    return art


def pack(model) -> Packed:
    """What ``bitfit.save`` writes for the BitFit model ``model``, in memory."""
    from ..artifacts import save

    with tempfile.TemporaryDirectory(prefix="bitfit-peft-") as d:
        return read_bitfit_dir(save(model, Path(d) / "artifact"))


def _contiguous(tensors: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


# ----------------------------------------------------------------------------- key mapping
def _encoding(meta: dict, slot: str) -> str:
    return meta["slots"][slot].get("encoding", "value")


def peft_key(key: str, meta: dict) -> str:
    """The peft key of artifact key ``key`` (see the module docstring)."""
    kind, _, name = key.partition(":")
    if kind == "scale":
        return peft_key(name, meta) + _SUFFIX["scale"]
    if kind == "bias":
        return KEY_PREFIX + name + (_SUFFIX["delta"] if _encoding(meta, name) == "delta" else "")
    if kind == "head":
        return KEY_PREFIX + name
    if kind in ("fix_idx", "fix_val"):
        return KEY_PREFIX + name + _SUFFIX[kind]
    raise ArtifactError(f"unknown artifact tensor {key!r}")


def artifact_key(key: str, meta: dict, where="") -> str:
    """The artifact key of peft key ``key``; the inverse of :func:`peft_key`."""
    name = key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key
    if name.endswith(_SUFFIX["scale"]):
        return "scale:" + artifact_key(name[: -len(_SUFFIX["scale"])], meta, where)
    for kind in ("fix_idx", "fix_val"):
        if name.endswith(_SUFFIX[kind]):
            return f"{kind}:{name[: -len(_SUFFIX[kind])]}"
    delta = name.endswith(_SUFFIX["delta"])
    if delta:
        name = name[: -len(_SUFFIX["delta"])]
    if name in meta["slots"]:
        if delta != (_encoding(meta, name) == "delta"):
            raise ArtifactError(f"adapter {where}: tensor {key} does not match the encoding of {name} in its header")
        return f"bias:{name}"
    if name in meta["head"].get("params", {}) and not delta:
        return f"head:{name}"
    raise ArtifactError(f"adapter {where}: tensor {key} is neither a trained bias nor a head parameter of its header")


def to_peft_tensors(packed: Packed) -> dict:
    if packed.meta.get("norm_weights"):
        raise ArtifactError("this artifact trained norm gains (train_norm_weights): the peft adapter form holds "
                            "biases and the head only; keep the bitfit artifact (bitfit.load / bitfit merge)")
    return {peft_key(k, packed.meta): v for k, v in packed.raw.items()}


def with_stored_encoding(meta: dict, tensors: dict) -> dict:
    """``meta`` with each slot's value-dependent fields (``encoding``, ``fixes``) read off the peft tensors.

    save writes a slot as an exact difference or as its value, whichever the values allow, so two saves of
    one adapter can differ there and nowhere else in the header. When peft loads weights into an adapter it
    already has (the Trainer's best checkpoint at the end of a run: ``load_adapter`` into the live adapter),
    the header in memory is the last save's, not the checkpoint's; the tensors say how they were stored."""
    slots = {}
    for name, entry in meta["slots"].items():
        entry = dict(entry)
        if KEY_PREFIX + name + _SUFFIX["delta"] in tensors:
            entry["encoding"] = "delta"
            fix = tensors.get(KEY_PREFIX + name + _SUFFIX["fix_idx"])
            if meta.get("dtype", "float32") == "float32":
                entry["fixes"] = int(fix.numel()) if fix is not None else 0
        elif KEY_PREFIX + name in tensors:
            entry["encoding"] = "value"
            entry.pop("fixes", None)
        slots[name] = entry
    return dict(meta, slots=slots)


def check_header(meta, where="") -> None:
    """Refuse an adapter header (``bitfit_meta``) whose structure is not the one save_pretrained writes."""
    if not isinstance(meta, dict) or not isinstance(meta.get("slots"), dict) or not isinstance(meta.get("head"), dict):
        raise ArtifactError(
            f"adapter {where} has no bitfit header (adapter_config.json field 'bitfit_meta'); it was not written "
            "by bitfit.peft. Save it again with save_pretrained of a BitFit peft model"
        )
    bad = [f"slots[{name!r}]" for name, entry in meta["slots"].items() if not isinstance(entry, dict)]
    if not isinstance(meta["head"].get("params", {}), dict):
        bad.append("head.params")
    for name in ("base_model", "bitfit_config"):
        if meta.get(name) is not None and not isinstance(meta[name], dict):
            bad.append(name)
    if bad:
        raise ArtifactError(
            f"adapter {where}: {PEFT_CONFIG_NAME} is damaged: bitfit_meta.{bad[0]} is not a JSON object (as "
            "save_pretrained writes it); restore the folder from a good copy or save the adapter again"
        )


def read_peft_config(path: PathLike) -> dict:
    """The content of ``path/adapter_config.json``; a file that is not a JSON object is refused clearly."""
    p = Path(os.path.expanduser(str(path)))
    cfg_file = p / PEFT_CONFIG_NAME
    fix = "restore the folder from a good copy or save the adapter again (save_pretrained)"
    try:
        cfg = json.loads(cfg_file.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"no peft adapter at {p}: {PEFT_CONFIG_NAME} is missing") from None
    except OSError as exc:
        raise ArtifactError(f"adapter {p}: {PEFT_CONFIG_NAME} cannot be read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"adapter {p}: {PEFT_CONFIG_NAME} is not valid JSON ({exc}); the file is damaged: "
                            f"{fix}") from None
    except RecursionError:
        raise ArtifactError(f"adapter {p}: {PEFT_CONFIG_NAME} is nested too deeply to be an adapter config; the "
                            f"file is damaged: {fix}") from None
    if not isinstance(cfg, dict):
        kind = {list: "a list", type(None): "null", str: "a string", bool: "true/false"}.get(type(cfg), "a number")
        raise ArtifactError(f"adapter {p}: {PEFT_CONFIG_NAME} holds {kind}, not the JSON object of an adapter "
                            f"config; the file is damaged: {fix}")
    return cfg


def read_peft_tensors(path: PathLike) -> dict:
    """The tensors of ``path/adapter_model.safetensors``; a missing or damaged file is refused clearly."""
    p = Path(os.path.expanduser(str(path)))
    w_file = p / PEFT_WEIGHTS_NAME
    if not w_file.is_file():
        raise ArtifactError(f"adapter {p} is incomplete: {PEFT_WEIGHTS_NAME} is missing; copy the whole adapter "
                            "folder again, or save the adapter again (save_pretrained)")
    try:
        return safetensors.torch.load_file(str(w_file))
    except Exception as exc:
        size = w_file.stat().st_size
        raise ArtifactError(
            f"adapter {p}: {PEFT_WEIGHTS_NAME} ({size} bytes) cannot be read ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); the file is damaged or truncated: copy the adapter "
            "folder again from a good copy, or save the adapter again (save_pretrained)"
        ) from None


def check_peft_dir(path: PathLike) -> None:
    """Every check ``PeftModel.from_pretrained`` of a local BitFit adapter folder needs, before the base model is
    touched: the config, the header, the tensors and bitfit's artifact checks, each naming the folder and file."""
    p = Path(os.path.expanduser(str(path)))
    cfg = read_peft_config(p)
    check_header(cfg.get("bitfit_meta"), p)
    packed = from_peft_tensors(cfg.get("bitfit_meta"), read_peft_tensors(p), p, stored_encoding=True)
    to_artifact(packed, p)


def from_peft_tensors(meta: Optional[dict], tensors: dict, where="", stored_encoding: bool = False) -> Packed:
    """The :class:`Packed` artifact of a peft adapter's header (``bitfit_meta``) and tensors.
    ``stored_encoding``: the slots' encodings come from the tensors (see :func:`with_stored_encoding`)."""
    check_header(meta, where)
    if stored_encoding:
        meta = with_stored_encoding(meta, tensors)
    raw = {}
    for k, v in tensors.items():
        ak = artifact_key(k, meta, where)
        if ak in raw:
            raise ArtifactError(f"adapter {where}: two tensors map to {ak}")
        raw[ak] = v.detach().cpu()
    return Packed({k: v for k, v in meta.items() if k != "weights_sha256"}, raw)


# ----------------------------------------------------------------------------- peft adapter folders
def task_type_for(architecture: Optional[str]) -> Optional[str]:
    for suffix, task in _TASK_TYPES:
        if architecture and architecture.endswith(suffix):
            return task
    return None


TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # peft's


def peft_config_dict(meta: dict, task_type: Optional[str] = None, inference_mode: bool = True) -> dict:
    """The ``adapter_config.json`` content for an artifact header (what BitFitPeftConfig.to_dict() gives)."""
    if task_type is not None and task_type not in TASK_TYPES:
        raise ArtifactError(f"task type {task_type!r} is not one of peft's: {', '.join(TASK_TYPES)}")
    try:
        from peft import __version__ as peft_version
    except ImportError:
        peft_version = None
    sel = meta.get("bitfit_config") or {}
    out = {
        "peft_type": PEFT_TYPE,
        "task_type": task_type if task_type is not None else task_type_for(meta["base_model"].get("architecture")),
        "base_model_name_or_path": meta["base_model"].get("name"),
        "revision": None,
        "inference_mode": inference_mode,
        "auto_mapping": None,
        "peft_version": peft_version,
        "strict_base": True,
        "bitfit_meta": {k: v for k, v in meta.items() if k != "weights_sha256"},
    }
    for name in SELECTION_FIELDS:
        out[name] = sel.get(name, LEGACY_DEFAULTS.get(name))
    return out


def is_peft_adapter(path) -> bool:
    """True for a folder that holds a peft adapter (``adapter_config.json``) and no bitfit artifact."""
    from ..artifacts import CONFIG_NAME

    try:
        p = Path(os.path.expanduser(str(path)))
    except TypeError:
        return False
    return p.is_dir() and (p / PEFT_CONFIG_NAME).is_file() and not (p / CONFIG_NAME).is_file()


def read_peft_dir(path: PathLike) -> tuple[dict, Packed]:
    """(adapter_config.json content, the artifact it holds) of a peft-format BitFit adapter folder."""
    p = Path(os.path.expanduser(str(path)))
    cfg = read_peft_config(p)
    kind = cfg.get("peft_type")
    if kind != PEFT_TYPE:
        raise ArtifactError(
            f"{p} holds a peft {kind} adapter, not a BitFit one (peft_type {PEFT_TYPE}); load it with "
            "peft.PeftModel.from_pretrained"
        )
    return cfg, from_peft_tensors(cfg.get("bitfit_meta"), read_peft_tensors(p), p)


def peft_files(packed: Packed, config: dict) -> dict:
    weights = safetensors.torch.save(_contiguous(to_peft_tensors(packed)), metadata={"format": "pt"})
    return {PEFT_WEIGHTS_NAME: weights, PEFT_CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode()}


def read_peft_adapter(path: PathLike):
    """A peft-format BitFit adapter folder as a validated :class:`bitfit.artifacts.Artifact`
    (``bitfit.load`` uses this for such folders)."""
    _, packed = read_peft_dir(path)
    return to_artifact(packed, path)


# ----------------------------------------------------------------------------- public conversion
def to_bitfit(peft_dir: PathLike, out_dir: PathLike) -> Path:
    """Convert a peft-format BitFit adapter folder into a bitfit artifact folder; returns ``out_dir``.

    No model is needed and the tensors are copied bit for bit: ``bitfit.load(base, out_dir)``
    gives the same logits as ``PeftModel.from_pretrained(base, peft_dir)``.
    """
    _, packed = read_peft_dir(peft_dir)
    to_artifact(packed, peft_dir)  # bitfit's validation before anything is written
    return write_bitfit_dir(packed, out_dir)


def from_bitfit(bitfit_dir: PathLike, out_dir: PathLike, task_type: Optional[str] = None) -> Path:
    """Convert a bitfit artifact folder into a peft-format BitFit adapter folder; returns ``out_dir``.

    ``task_type`` (peft's, e.g. ``"SEQ_CLS"``) defaults to the one matching the saved architecture.
    Load the result with ``import bitfit.peft`` then ``peft.PeftModel.from_pretrained(base, out_dir)``.
    """
    packed = read_bitfit_dir(bitfit_dir)
    return _write_folder(out_dir, peft_files(packed, peft_config_dict(packed.meta, task_type)))


def convert(src: PathLike, out_dir: PathLike, task_type: Optional[str] = None) -> tuple[str, Path]:
    """Convert ``src`` to the other format: (``"bitfit"`` or ``"peft"``: the format written, folder)."""
    from ..artifacts import CONFIG_NAME

    p = Path(os.path.expanduser(str(src)))
    if (p / CONFIG_NAME).is_file():
        return "peft", from_bitfit(p, out_dir, task_type)
    if (p / PEFT_CONFIG_NAME).is_file():
        if task_type is not None:
            raise ArtifactError("task_type only applies when converting a bitfit artifact to the peft format")
        return "bitfit", to_bitfit(p, out_dir)
    raise ArtifactError(
        f"{p} is neither a bitfit artifact ({CONFIG_NAME}) nor a peft adapter ({PEFT_CONFIG_NAME})"
        if p.is_dir() else f"{p} is not a folder"
    )


__all__ = ["to_bitfit", "from_bitfit", "convert", "is_peft_adapter", "read_peft_adapter", "Packed", "pack"]
