"""From a BitFitConfig and a model's bias slots to the exact set of trainable tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .config import HEAD, ROLES, BitFitConfig, parse_layers
from ..errors import BitFitConfigError
from .roles import BiasSlot, ModelMap

NORM_KINDS = ("layernorm", "norm")  # slots whose module has a 1-D gain (``weight``) besides the bias


@dataclass
class Selection:
    """What trains: per slot name the chosen roles, plus head parameters."""

    chosen: dict = field(default_factory=dict)  # slot name -> tuple of roles
    missing: dict = field(default_factory=dict)  # slot name -> roles chosen but the bias does not exist
    head_params: list = field(default_factory=list)
    skipped_zero_grad: list = field(default_factory=list)  # slot names/roles left out as zero-gradient
    norm_weights: list = field(default_factory=list)  # train_norm_weights: "<norm module>.weight" names that train

    def roles_for(self, slot: BiasSlot) -> tuple:
        return self.chosen.get(slot.name, ())


def _matches(slot: BiasSlot, pattern: str) -> bool:
    return re.search(pattern, slot.name) is not None


def resolve(model_map: ModelMap, config: BitFitConfig) -> Selection:
    """Apply preset/roles, include, layers and exclude to the model's slots."""
    wanted = set(config.selected_roles())
    include = list(config.include or ())
    exclude = list(config.exclude or ())
    train_head = config.train_head
    if HEAD in include:
        if not train_head:
            raise BitFitConfigError("contradictory options: include=['head'] with train_head=False")
        include.remove(HEAD)
    if HEAD in exclude:
        train_head = False
        exclude.remove(HEAD)

    name_includes = []
    for item in include:
        if item in ROLES:
            wanted.add(item)
        else:
            name_includes.append(item)
    role_excludes = {e for e in exclude if e in ROLES}
    name_excludes = [e for e in exclude if e not in ROLES]
    clash = role_excludes & set(config.roles or ())
    if clash:
        raise BitFitConfigError(f"contradictory options: role(s) {sorted(clash)} are both in roles= and exclude=")

    for pat in name_includes + name_excludes:
        if not any(_matches(s, pat) for s in model_map.slots):
            raise BitFitConfigError(
                f"pattern {pat!r} matches no bias of this {model_map.family} model; "
                f"use a role name ({', '.join(ROLES)}) or a regex over names such as {model_map.slots[0].name!r}"
                if model_map.slots
                else f"pattern {pat!r} matches nothing: this model has no bias slots"
            )

    layer_sets = None
    if config.layers is not None:
        if not model_map.n_layers:
            raise BitFitConfigError("layers= was given but this model has no numbered layer stack")
        layer_sets = {stack: parse_layers(config.layers, n) for stack, n in model_map.n_layers.items()}

    sel = Selection()
    for slot in model_map.slots:
        roles = {r for r in slot.roles if r in wanted}
        if any(_matches(slot, p) for p in name_includes):
            roles = set(slot.roles)
        roles -= role_excludes
        if any(_matches(slot, p) for p in name_excludes):
            roles = set()
        if layer_sets is not None and (slot.layer is None or slot.layer not in layer_sets.get(slot.stack, set())):
            roles = set()
        if config.skip_zero_grad:
            dropped = roles & set(model_map.zero_grad_roles)
            if dropped:
                sel.skipped_zero_grad.append(slot.name)
                roles -= dropped
        if not roles:
            continue
        ordered = tuple(r for r in slot.roles if r in roles)
        if config.train_norm_weights and slot.kind in NORM_KINDS and slot.has_weight:
            sel.norm_weights.append(f"{slot.module_name}.weight")
        if slot.exists or config.add_missing:
            sel.chosen[slot.name] = ordered
        else:
            sel.missing[slot.name] = ordered
    if train_head:
        sel.head_params = list(model_map.head_params)
    return sel
