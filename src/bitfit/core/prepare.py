"""Make a model a BitFit model in place: freeze, add missing biases, unfreeze the selection."""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import parametrize

from .config import DEFAULT_ADDED_BIAS_STD, BitFitConfig
from ..errors import AlreadyPreparedError, BitFitConfigError, BitFitError
from .roles import BiasSlot, ModelMap, discover
from .select import Selection, resolve
from .sharded import gathered

STATE_ATTR = "_bitfit_state"
# On a model with dynamic biases (bitfit.methods.dynamic): the attention mask of the current call and the
# hook handles. Packed layers (bitfit.fast.packing) read it to keep such a model's rows padded.
DYNAMIC_ATTR = "_bitfit_dynamic_ctx"

# Steps that packages above core add to `apply`. Core knows nothing of them; they register when imported,
# and importing bitfit imports them (bitfit/__init__.py), so every apply runs them.
_FINISHERS: list = []  # fn(model, config) after the selection trains: bitfit.fast.lean.finish_apply
_ENTRY_CHOOSER = None  # fn(model, model_map, selection, config, batches, entries) -> entries: bitfit.methods.sparse


def register_finisher(fn) -> None:
    """Run ``fn(model, config)`` at the end of every :func:`apply` (once per function)."""
    if fn not in _FINISHERS:
        _FINISHERS.append(fn)


def register_entry_chooser(fn) -> None:
    """Let ``fn`` choose the bias entries a ``budget`` trains (sparse BitFit)."""
    global _ENTRY_CHOOSER
    _ENTRY_CHOOSER = fn


class SliceMask(nn.Module):
    """Parametrization of a fused bias of which only some slices train.

    ``module.bias`` becomes ``where(mask, trained, frozen)``: the unselected slices are the
    frozen values bit for bit whatever an optimizer does to the underlying tensor (weight
    decay included), and they receive no gradient.
    """

    def __init__(self, mask: torch.Tensor, frozen: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.clone(), persistent=False)
        self.register_buffer("frozen", frozen.detach().clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, x, self.frozen.to(x.dtype))


def _add_bias_after(module: nn.Module, inputs, output):
    """Forward hook of a norm that has no bias of its own: add the (added) bias after it."""
    return output + module.bias.to(output.dtype)


@dataclass
class BitFitState:
    """What `apply` did to a model; kept on the model so save/merge/report can reproduce it."""

    config: BitFitConfig
    model_map: ModelMap
    selection: Selection
    added: list = field(default_factory=list)  # slot names whose bias was added (zero-initialised)
    partial: dict = field(default_factory=dict)  # slot name -> LongTensor of trained indices
    hooks: dict = field(default_factory=dict)  # slot name -> hook handle (norm biases)
    base: dict = field(default_factory=dict)  # trained slot / head param -> copy of its value at apply (save, unmerge)

    def trained_slots(self) -> list[BiasSlot]:
        return [s for s in self.model_map.slots if s.name in self.selection.chosen]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / accelerate / torch.compile wrappers."""
    seen = 0
    while seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model, seen = inner, seen + 1
    return model


def get_state(model: nn.Module) -> Optional[BitFitState]:
    return getattr(unwrap(model), STATE_ATTR, None)


def bitfit_model(model: nn.Module) -> Optional[nn.Module]:
    """The module that holds the BitFit state of ``model``: ``model`` itself (inside DDP / accelerate /
    torch.compile wrappers) or, for a peft model of the BitFit method (``get_peft_model`` with a
    :class:`bitfit.peft.BitFitPeftConfig`), the transformers model inside it. None for any other model.

    ``get_state`` does not look through peft (a peft model is not a plain BitFit model); the trainer uses
    this to give both routes the same optimizer (head learning rate, role / layer groups)."""
    target = unwrap(model)
    if getattr(target, STATE_ATTR, None) is not None:
        return target
    tuners = sys.modules.get("bitfit.peft.model")  # loaded whenever a BitFit peft model exists
    if tuners is not None and isinstance(getattr(target, "base_model", None), tuners.BitFitModel):
        inner = unwrap(target.get_base_model())
        if getattr(inner, STATE_ATTR, None) is not None:
            return inner
    return None


def _get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def bias_tensor(model: nn.Module, slot_name: str) -> torch.Tensor:
    """The effective bias of a slot (parametrized or plain)."""
    module = _get_module(model, slot_name.rsplit(".", 1)[0] if "." in slot_name else "")
    return module.bias


def trainable_bias_param(model: nn.Module, slot_name: str) -> nn.Parameter:
    """The parameter an optimizer updates for a slot (the original under a parametrization)."""
    module = _get_module(model, slot_name.rsplit(".", 1)[0] if "." in slot_name else "")
    if parametrize.is_parametrized(module, "bias"):
        return module.parametrizations.bias.original
    return module.bias


def add_bias(model: nn.Module, slot: BiasSlot, dtype: Optional[torch.dtype] = None) -> nn.Parameter:
    """Give ``slot``'s module a zero bias. Outputs are unchanged (x + 0 == x)."""
    module = _get_module(model, slot.module_name)
    ref = module.weight
    param = nn.Parameter(torch.zeros(slot.size, dtype=dtype or ref.dtype, device=ref.device))
    if slot.kind in ("linear", "conv1d", "layernorm", "conv"):
        module.bias = param
        return param
    if slot.kind == "norm":  # RMSNorm / T5LayerNorm: forward ignores .bias; a hook adds it
        if getattr(module, "bias", None) is not None:
            raise BitFitError(f"{slot.module_name} already has a bias attribute; cannot add one")
        module.__dict__.pop("bias", None)
        module.register_parameter("bias", param)
        return param
    raise BitFitError(f"cannot add a bias to {slot.module_name} ({type(module).__name__})")


def added_bias_generator(cfg: BitFitConfig) -> Optional[torch.Generator]:
    """The generator of a random ``added_bias_init`` (None for 'zero'): seeded with ``added_bias_init_seed``,
    else with ``torch.initial_seed()``; torch's global random state is not consumed."""
    if cfg.added_bias_init == "zero":
        return None
    seed = cfg.added_bias_init_seed if cfg.added_bias_init_seed is not None else torch.initial_seed()
    return torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def init_added_bias(param: torch.Tensor, cfg: BitFitConfig, gen: torch.Generator, idx=None) -> None:
    """Draw an added bias from ``cfg.added_bias_init``; with ``idx`` (a fused bias of which some slices train)
    only those entries, the others stay zero. The whole tensor is drawn either way, so the next slot's draw
    does not depend on the selection inside this one."""
    std = cfg.added_bias_init_std or DEFAULT_ADDED_BIAS_STD
    n = param.numel()
    if cfg.added_bias_init == "normal":
        value = torch.randn(n, generator=gen) * std
    else:  # uniform with the same standard deviation
        value = (torch.rand(n, generator=gen) * 2 - 1) * (std * 3**0.5)
    if idx is not None:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[idx.cpu()] = True
        value = torch.where(keep, value, torch.zeros(()))
    param.copy_(value.reshape(param.shape).to(param.dtype))


def add_norm_hook(model: nn.Module, slot: BiasSlot):
    module = _get_module(model, slot.module_name)
    return module.register_forward_hook(_add_bias_after)


def _merge_options(config: Optional[BitFitConfig], options: dict) -> BitFitConfig:
    if config is None:
        return BitFitConfig(**options)
    if not isinstance(config, BitFitConfig):
        raise BitFitConfigError(f"config must be a bitfit.BitFitConfig, got {type(config).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(BitFitConfig)}
    given = {k: v for k, v in options.items() if v != defaults[k]}
    if given:
        raise BitFitConfigError(
            f"pass either config= or keyword options, not both (got config= and {sorted(given)})"
        )
    return dataclasses.replace(config)  # a copy: apply records resolved values (frozen_dtype="auto") in it


def apply(
    model: nn.Module,
    preset: str = "all",
    roles=None,
    include=None,
    exclude=None,
    layers=None,
    add_missing: bool = False,
    train_head: bool = True,
    config: Optional[BitFitConfig] = None,
    *,
    skip_zero_grad: bool = False,
    frozen_dtype: Optional[str] = None,
    lean: bool = True,
    pooler_head: bool = True,
    train_norm_weights: bool = False,
    budget=None,
    importance: str = "grad",
    importance_unit: str = "entry",
    importance_batches: int = 8,
    batches=None,
    entries: Optional[dict] = None,
    added_bias_init: str = "zero",
    added_bias_init_std: Optional[float] = None,
    added_bias_init_seed: Optional[int] = None,
) -> nn.Module:
    """Turn ``model`` into a BitFit model in place and return it.

    Every parameter is frozen; the biases selected by ``preset`` (refined by ``roles``,
    ``include``, ``exclude`` and ``layers``) and the task head are made trainable. See
    :class:`bitfit.BitFitConfig` for every option. Calling it twice is an error.

    Sparse BitFit (``budget=``, :mod:`bitfit.methods.sparse`): only ``budget`` entries of the selected biases
    train, the most important ones on ``batches`` (labelled input dicts; the first
    ``importance_batches`` are scored), or exactly ``entries`` (bias name -> indices, from
    :func:`bitfit.methods.sparse.select_entries`).
    """
    if not isinstance(model, nn.Module):
        raise BitFitError(f"bitfit.apply needs a torch.nn.Module, got {type(model).__name__}")
    cfg = _merge_options(
        config,
        dict(
            preset=preset, roles=roles, include=include, exclude=exclude, layers=layers,
            add_missing=add_missing, train_head=train_head, skip_zero_grad=skip_zero_grad,
            frozen_dtype=frozen_dtype, lean=lean, pooler_head=pooler_head, train_norm_weights=train_norm_weights,
            budget=budget, importance=importance, importance_unit=importance_unit,
            importance_batches=importance_batches,
            added_bias_init=added_bias_init, added_bias_init_std=added_bias_init_std,
            added_bias_init_seed=added_bias_init_seed,
        ),
    )
    target = unwrap(model)
    if getattr(target, STATE_ATTR, None) is not None:
        raise AlreadyPreparedError(
            "this model is already a BitFit model (bitfit.apply was called on it before); "
            "load a fresh base model, or use bitfit.report(model) to see its selection"
        )
    model_map = discover(target, pooler_head=cfg.pooler_head)
    sel = resolve(model_map, cfg)
    _check_selection(model_map, sel, cfg)
    entries = _sparse_entries(target, model_map, sel, cfg, batches, entries)
    if entries is not None:  # only the slots with chosen entries train
        sel.chosen = {name: roles for name, roles in sel.chosen.items() if name in entries}

    for p in target.parameters():
        p.requires_grad_(False)

    state = BitFitState(cfg, model_map, sel)
    gen = added_bias_generator(cfg)
    for slot in model_map.slots:
        roles = sel.chosen.get(slot.name)
        if not roles:
            continue
        idx = slot.indices(roles) if entries is None else entries[slot.name]
        if idx is not None and idx.numel() == slot.size:
            idx = None  # every entry trains: no mask
        if not slot.exists:
            param = add_bias(target, slot)
            if gen is not None:
                init_added_bias(param, cfg, gen, idx)
            if slot.kind == "norm":
                state.hooks[slot.name] = add_norm_hook(target, slot)
            state.added.append(slot.name)
        module = _get_module(target, slot.module_name)
        if slot.name not in state.added:
            with gathered([module.bias]):  # ZeRO-3: a partitioned bias whole while its base value is copied
                state.base[slot.name] = module.bias.detach().clone()
        if idx is not None:
            mask = torch.zeros(slot.size, dtype=torch.bool, device=module.bias.device)
            mask[idx.to(mask.device)] = True
            parametrize.register_parametrization(module, "bias", SliceMask(mask, module.bias), unsafe=True)
            state.partial[slot.name] = idx
        trainable_bias_param(target, slot.name).requires_grad_(True)

    params = dict(target.named_parameters())
    for name in list(sel.head_params) + list(sel.norm_weights):  # the norms' gains: train_norm_weights
        params[name].requires_grad_(True)
        with gathered([params[name]]):  # their pretrained values kept (whole, under ZeRO-3 too)
            state.base[name] = params[name].detach().clone()

    object.__setattr__(target, STATE_ATTR, state)
    for finish in _FINISHERS:  # bitfit.fast: frozen_dtype (a bf16/int8 base) and the memory-lean training mode
        finish(target, cfg)
    return model


def _sparse_entries(target, model_map, sel, cfg, batches, entries):
    """The entries a ``budget`` trains (chosen on ``batches``, or ``entries`` checked), or None without one."""
    if cfg.budget is None:
        if entries is not None or batches is not None:
            raise BitFitConfigError("entries= / batches= choose bias entries under a budget: pass budget= too "
                                    "(a fraction such as 0.5, or a count)")
        return None
    if _ENTRY_CHOOSER is None:  # pragma: no cover - importing bitfit registers bitfit.methods.sparse
        raise BitFitConfigError("budget= needs bitfit.methods.sparse: import bitfit before calling apply")
    return _ENTRY_CHOOSER(target, model_map, sel, cfg, batches, entries)


def _check_selection(model_map: ModelMap, sel: Selection, cfg: BitFitConfig) -> None:
    asked_bias = cfg.preset != "none" or cfg.roles or cfg.include
    if asked_bias and not sel.chosen and not sel.norm_weights:
        if sel.missing:
            roles = sorted({r for rs in sel.missing.values() for r in rs})
            raise BitFitConfigError(
                f"the selection finds no existing bias in this {model_map.family} model: its {len(sel.missing)} "
                f"selected slots ({', '.join(roles)}) have no bias. Pass add_missing=True (--add-missing) to add "
                "zero-initialised biases there; outputs stay identical until training."
            )
        raise BitFitConfigError(
            f"the selection (preset={cfg.preset!r}, roles={cfg.roles}, include={cfg.include}, "
            f"exclude={cfg.exclude}, layers={cfg.layers!r}) matches no bias of this {model_map.family} model; "
            "widen it, or use preset='none' to train the head only"
        )
    if sel.missing:
        roles = sorted({r for rs in sel.missing.values() for r in rs})
        warnings.warn(
            f"{len(sel.missing)} selected bias slots ({', '.join(roles)}) have no bias in this "
            f"{model_map.family} model and are skipped; pass --add-missing (bitfit train / info; add_missing=True in Python) to add zero-initialised "
            "ones",
            stacklevel=3,
        )
    if cfg.train_norm_weights and not sel.norm_weights:
        raise BitFitConfigError(
            f"train_norm_weights=True but the selection covers no LayerNorm/RMSNorm with a gain in this "
            f"{model_map.family} model; select a norm role (ln_attn, ln_ffn, embed_ln, final_ln ...) or drop it"
        )
    if not sel.chosen and not sel.head_params and not sel.norm_weights:
        raise BitFitConfigError("nothing would train: no bias selected and train_head=False (or no head)")
