"""Loading a task onto a base: checking that an artifact fits the model before touching it
(:func:`_plan`), writing its values, and :func:`load`. Other on-disk forms of a task (the
peft-format adapter folder) are read through readers registered with :func:`register_reader`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..core.config import BitFitConfig
from ..core.prepare import apply, get_state, trainable_bias_param, unwrap
from ..core.roles import discover
from ..core.select import resolve
from ..errors import ArtifactError, BitFitError
from ..methods.dynamic import remove as remove_dynamic
from .base import check_fingerprint
from .format import CONFIG_NAME, Artifact, damaged
from .merging import check_restorable, restore_base
from .read import read_artifact, slot_value

_READERS: dict = {}  # marker file name -> reader(folder) -> Artifact


def register_reader(marker: str, reader) -> None:
    """Let :func:`load` read another on-disk form of a BitFit task: a folder holding the file
    ``marker`` and no ``bitfit_config.json`` is read by ``reader(folder)``, which returns an
    :class:`Artifact` (or an artifact folder). ``import bitfit`` registers the peft-format adapter
    folder (``adapter_config.json``, read by ``bitfit.peft``) this way, so this package needs no
    knowledge of ``bitfit.peft``."""
    _READERS[marker] = reader


def _registered_form(path):
    """``path`` as read by the registered reader whose marker file its folder holds, else ``path``."""
    if not isinstance(path, (str, os.PathLike)):
        return path
    folder = Path(os.path.expanduser(str(path)))
    if (folder / CONFIG_NAME).is_file():
        return path
    for marker, reader in _READERS.items():
        if (folder / marker).is_file():
            return reader(folder)
    return path


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
    """Check that ``art`` fits ``target`` without touching it; returns (BitFitConfig, ModelMap, the trained
    entries of a sparse artifact or None)."""
    meta, where = art.meta, art.path
    try:
        cfg = BitFitConfig.from_dict(meta["bitfit_config"])
    except BitFitError as exc:
        raise ArtifactError(f"artifact {where}: its BitFit config is not valid here: {exc}") from None
    except TypeError as exc:
        raise damaged(where, f"bitfit_config is malformed ({exc})") from None
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
    A peft-format BitFit adapter folder (``adapter_config.json``, docs/PEFT.md) loads the same way
    (see :func:`register_reader`).
    """
    art = read_artifact(_registered_form(path), strict=strict)
    if isinstance(base_model, (str, os.PathLike)):
        model = _load_base(str(base_model), art.meta)
    elif isinstance(base_model, nn.Module):
        model = base_model
    else:
        raise ArtifactError(f"base_model must be a torch model or a model name, got {type(base_model).__name__}")
    target = unwrap(model)
    cfg, _, entries = _plan(target, art)
    check_fingerprint(target, art.meta, strict, art.path)
    state = get_state(target)
    if state is not None:
        check_restorable(target, state)
        remove_dynamic(target)
        restore_base(target, state)
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
            value = slot_value(art, name, None if base is None else base.float().cpu())
            param.copy_(value.to(param.dtype).reshape(param.shape))
        else:
            base = state.base.get(name)  # None: an added bias (stored as its value)
            value = slot_value(art, name, None if base is None else base.float().cpu()[idx.cpu()])
            param[idx.to(param.device)] = value.to(param.dtype).to(param.device)
    params = dict(target.named_parameters())
    for name in art.meta.get("norm_weights", {}):
        p = params[name]
        value = slot_value(art, name, state.base[name].float().cpu().reshape(-1), norm=True)
        p.copy_(value.to(p.dtype).reshape(p.shape))
    for name in art.meta["head"]["params"]:
        p = params[name]
        if name not in state.base:  # an untrained head (train_head=False): keep its base value for unmerge
            state.base[name] = p.detach().clone()
        p.copy_(art.tensors[f"head:{name}"].to(p.dtype).reshape(p.shape))
