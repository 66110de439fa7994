"""Trainable-parameter counts by role and layer; the paper's percentage."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .config import HEAD, PAPER_NAMES, ROLES
from .prepare import get_state, trainable_bias_param, unwrap
from .roles import discover
from .sharded import full_numel


@dataclass
class Report:
    """What trains in a model. ``trainable``/``total`` count scalar parameters."""

    family: str
    trainable: int
    total: int
    bias_total: int  # every existing bias of the stack (what preset 'all' trains without the head)
    by_role: dict  # role -> {"trainable": n, "total": n}
    by_layer: dict  # layer key -> trainable bias parameters
    head: int
    added: list = field(default_factory=list)
    other: list = field(default_factory=list)  # names of biases the generic mapping could not place
    zero_grad: list = field(default_factory=list)  # trained roles whose gradient is zero by construction
    skipped_zero_grad: list = field(default_factory=list)
    generic: bool = False
    prepared: bool = True
    modes: list = field(default_factory=list)  # frozen dtype / lean training mode in effect (bitfit.fast.lean)
    pooler_head: Optional[str] = None  # an untrained pooler that trains with the head
    biases: int = 0  # trainable bias values (trainable = biases + head + other_trainable)
    other_trainable: int = 0  # norm gains (train_norm_weights) and anything else unfrozen by hand

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def summary(self) -> str:
        """One line with the biases and the head apart, e.g. ``biases 25,728 (0.113%) + head 148,610 =
        174,338 of 22,713,986 trainable (0.768%)``: BitFit's small fraction is the biases'; a task head
        (with an untrained pooler, when it trains with the head) is a fixed cost on top."""
        pct = (lambda n: f"{100 * n / self.total:.3f}%") if self.total else (lambda n: "0%")
        parts = [f"biases {self.biases:,} ({pct(self.biases)})", f"head {self.head:,}"]
        if self.other_trainable:
            parts.append(f"other {self.other_trainable:,}")
        return f"{' + '.join(parts)} = {self.trainable:,} of {self.total:,} trainable ({pct(self.trainable)})"

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "trainable": self.trainable,
            "total": self.total,
            "fraction": self.fraction,
            "bias_total": self.bias_total,
            "head": self.head,
            "biases": self.biases,
            "other_trainable": self.other_trainable,
            "by_role": self.by_role,
            "by_layer": self.by_layer,
            "added": self.added,
            "other": self.other,
            "zero_grad": self.zero_grad,
            "skipped_zero_grad": self.skipped_zero_grad,
            "generic_mapping": self.generic,
            "prepared": self.prepared,
            "modes": self.modes,
            "pooler_head": self.pooler_head,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        lines = [
            f"**{self.family}**: {self.summary()}; the model has {self.bias_total:,} bias parameters.",
            "",
            "| role | paper | trainable | of |",
            "|---|---|---:|---:|",
        ]
        for role, c in self.by_role.items():
            lines.append(f"| {role} | {PAPER_NAMES.get(role, '')} | {c['trainable']:,} | {c['total']:,} |")
        if self.by_layer:
            lines += ["", "| layer | trainable |", "|---|---:|"]
            lines += [f"| {k} | {v:,} |" for k, v in self.by_layer.items()]
        notes = []
        if self.zero_grad:
            notes.append(
                f"role(s) {', '.join(self.zero_grad)} receive no gradient by construction: under softmax attention "
                "adding the same constant to every score of a row changes nothing (skip_zero_grad=True leaves them out)"
            )
        if self.skipped_zero_grad:
            notes.append(
                f"skip_zero_grad: {len(self.skipped_zero_grad)} key biases (b_k) left out of training; their "
                "gradient is exactly zero under softmax attention"
            )
        if self.added:
            notes.append(f"{len(self.added)} zero-initialised biases were added (add_missing)")
        if self.other:
            notes.append(
                f"generic mapping: {len(self.other)} biases got role 'other': " + ", ".join(self.other[:8])
                + (" ..." if len(self.other) > 8 else "")
            )
        if self.pooler_head:
            notes.append(
                f"the checkpoint never trained its pooler ({self.pooler_head}: all-zero bias, as in sentence-transformers "
                "models, which pool by mean): it trains as part of the head (pooler_head=False keeps it frozen)"
            )
        notes += list(self.modes)
        if not self.prepared:
            notes.append("this model is not a BitFit model yet: counts show what requires_grad says now")
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _role_order(role: str) -> int:
    return ROLES.index(role) if role in ROLES else len(ROLES)


def report(model: nn.Module) -> Report:
    """Count what trains in ``model`` (a BitFit model, or any model by its requires_grad flags)."""
    target = unwrap(model)
    state = get_state(target)
    model_map = state.model_map if state else discover(target)
    params = dict(target.named_parameters())
    total = sum(full_numel(p) for p in params.values())  # ZeRO-3: ds_numel

    by_role: dict = {}
    by_layer: dict = {}
    trainable_bias = 0
    counted = set()
    for slot in model_map.slots:
        exists = slot.exists or (state is not None and slot.name in state.added)
        if not exists:
            continue
        param = trainable_bias_param(target, slot.name)
        counted.add(id(param))
        chosen = state.selection.chosen.get(slot.name, ()) if state else (tuple(slot.roles) if param.requires_grad else ())
        part = state.partial.get(slot.name) if state else None  # the trained entries of a masked slot
        for role in slot.roles:
            n = slot.role_size(role)
            c = by_role.setdefault(role, {"trainable": 0, "total": 0})
            c["total"] += n
            if role in chosen and param.requires_grad:
                if part is not None:
                    idx = slot.roles[role]
                    n = int(part.numel()) if idx is None else int(torch.isin(part, idx).sum())
                c["trainable"] += n
                trainable_bias += n
                if slot.layer_key is not None:
                    by_layer[slot.layer_key] = by_layer.get(slot.layer_key, 0) + n
    head = sum(full_numel(params[n]) for n in model_map.head_params if n in params and params[n].requires_grad)
    counted |= {id(params[n]) for n in model_map.head_params if n in params}
    # anything else the user unfroze by hand still counts as trainable
    extra = sum(full_numel(p) for p in params.values() if p.requires_grad and id(p) not in counted)
    by_role = dict(sorted(by_role.items(), key=lambda kv: _role_order(kv[0])))
    if model_map.head_params:
        n_head = sum(full_numel(params[n]) for n in model_map.head_params if n in params)
        by_role[HEAD] = {"trainable": head, "total": n_head}
    bias_total = sum(c["total"] for r, c in by_role.items() if r != HEAD)
    zero_grad = [r for r in model_map.zero_grad_roles if by_role.get(r, {}).get("trainable")]
    return Report(
        family=model_map.family,
        trainable=trainable_bias + head + extra,
        total=total,
        bias_total=bias_total,
        by_role=by_role,
        by_layer=by_layer,
        head=head,
        added=list(state.added) if state else [],
        other=[s.name for s in model_map.slots if "other" in s.roles and s.exists],
        zero_grad=zero_grad,
        skipped_zero_grad=list(state.selection.skipped_zero_grad) if state else [],
        generic=model_map.generic,
        prepared=state is not None,
        modes=_modes(target),
        pooler_head=model_map.pooler_head,
        biases=trainable_bias,
        other_trainable=extra,
    )


# Readers of the training modes a model runs in (bitfit.fast.lean registers one): fn(model) -> list of str.
MODE_READERS: list = []


def _modes(target) -> list:
    return [mode for read in MODE_READERS for mode in read(target)]
