"""BitFitConfig: what to train, documented field by field and validated on creation."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from .errors import BitFitConfigError

# Bias roles (paper names in brackets). The order is the order used in reports and figures.
LAYER_ROLES = (
    "query",  # b_q
    "key",  # b_k
    "value",  # b_v
    "attn_out",  # b_m1
    "ln_attn",  # b_LN1
    "ffn_in",  # b_m2
    "ffn_out",  # b_m3
    "ln_ffn",  # b_LN2
    "cross_query",
    "cross_key",
    "cross_value",
    "cross_out",
    "ln_cross",
)
MODEL_ROLES = ("embed_ln", "embed_proj", "pooler", "final_ln", "projection")
ROLES = LAYER_ROLES + MODEL_ROLES + ("other",)
HEAD = "head"
PAPER_NAMES = {
    "query": "b_q",
    "key": "b_k",
    "value": "b_v",
    "attn_out": "b_m1",
    "ln_attn": "b_LN1",
    "ffn_in": "b_m2",
    "ffn_out": "b_m3",
    "ln_ffn": "b_LN2",
}

PRESETS: dict[str, tuple[str, ...]] = {
    # The paper's set: every bias of the stack (plus the head, which is governed by train_head).
    "all": ROLES,
    # The paper's subset: b_q and b_m2.
    "paper-subset": ("query", "ffn_in"),
    "attention": ("query", "key", "value", "attn_out", "cross_query", "cross_key", "cross_value", "cross_out"),
    "ffn": ("ffn_in", "ffn_out"),
    "layernorm": ("ln_attn", "ln_ffn", "ln_cross", "embed_ln", "final_ln"),
    # Head only: the paper's "frozen" baseline.
    "none": (),
}

FROZEN_DTYPES = ("float32", "bfloat16", "float16", "int8")


def _as_tuple(value: Union[None, str, Sequence[str]], name: str) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        items = tuple(value)
    except TypeError:
        raise BitFitConfigError(f"{name} must be a list of role names or regexes, got {value!r}") from None
    for item in items:
        if not isinstance(item, str) or not item:
            raise BitFitConfigError(f"{name} entries must be non-empty strings, got {item!r}")
    return items


def is_role(name: str) -> bool:
    return name in ROLES or name == HEAD


def _check_pattern(item: str, name: str) -> None:
    if is_role(item):
        return
    try:
        re.compile(item)
    except re.error as exc:
        raise BitFitConfigError(
            f"{name} entry {item!r} is neither a role ({', '.join(ROLES)}) nor a valid regex: {exc}"
        ) from None


def parse_layers(spec: Union[None, str, int, Sequence[int]], n_layers: int) -> Optional[set[int]]:
    """Turn a layer spec into a set of layer indices for a stack of ``n_layers`` layers.

    Accepts a Python slice string (``"-2:"``, ``":4"``, ``"2:6"``), a comma list (``"0,3,-1"``),
    an int, or a list of ints. Negative indices count from the end.
    """
    if spec is None:
        return None
    idx = list(range(n_layers))
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, str):
        s = spec.strip()
        if ":" in s:
            parts = s.split(":")
            if len(parts) > 3:
                raise BitFitConfigError(f"layers={spec!r} is not a valid slice like '-2:' or '0:6'")
            try:
                nums = [int(p) if p.strip() else None for p in parts]
            except ValueError:
                raise BitFitConfigError(f"layers={spec!r} is not a valid slice like '-2:' or '0:6'") from None
            return set(idx[slice(*nums)])
        try:
            spec = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise BitFitConfigError(f"layers={spec!r}: use a slice like '-2:' or a list like '0,5,11'") from None
    out = set()
    for i in spec:
        if not isinstance(i, int) or not -n_layers <= i < n_layers:
            raise BitFitConfigError(f"layers: index {i!r} is out of range for a stack of {n_layers} layers")
        out.add(idx[i])
    return out


@dataclass
class BitFitConfig:
    """Which biases of a transformer train. Every field is validated when the config is created."""

    preset: str = field(
        default="all",
        metadata={
            "help": "Bias set: 'all' (the paper's: every bias of the stack), 'paper-subset' (b_q + b_m2), "
            "'attention', 'ffn', 'layernorm', or 'none' (head only: the paper's frozen baseline)."
        },
    )
    roles: Optional[Sequence[str]] = field(
        default=None,
        metadata={"help": "Explicit role list; replaces the preset's roles (e.g. ['query', 'value'])."},
    )
    include: Optional[Sequence[str]] = field(
        default=None,
        metadata={"help": "Roles or parameter-name regexes added to the selection."},
    )
    exclude: Optional[Sequence[str]] = field(
        default=None,
        metadata={"help": "Roles or parameter-name regexes removed from the selection (applied last)."},
    )
    layers: Optional[Union[str, int, Sequence[int]]] = field(
        default=None,
        metadata={
            "help": "Restrict to these layers of each stack: a slice ('-2:' = last two) or a list ('0,5'). "
            "Biases outside the layer stack (embeddings, pooler, final norm) are then not trained."
        },
    )
    add_missing: bool = field(
        default=False,
        metadata={
            "help": "Add zero-initialised biases where a selected role has none (LLaMA, T5, Qwen2 o_proj/MLP, "
            "RMSNorm). Outputs stay bit-identical until training moves them."
        },
    )
    train_head: bool = field(
        default=True,
        metadata={
            "help": "Train the task head (classifier/score/qa_outputs...; CLIP's logit_scale, see bitfit.clip). "
            "A tied lm_head never trains."
        },
    )
    pooler_head: bool = field(
        default=True,
        metadata={
            "help": "Train a pooler the checkpoint never trained (all-zero bias: sentence-transformers models such "
            "as all-MiniLM-L6-v2 pool by mean and ship BERT's pooler at its initial values) as part of the task "
            "head, weight and bias. False keeps it frozen, its bias a BitFit bias (the paper's set; artifacts "
            "saved before this option load that way). A pretrained pooler (bert-base) is never affected."
        },
    )
    skip_zero_grad: bool = field(
        default=False,
        metadata={
            "help": "Leave out biases whose gradient is zero by construction (b_k under softmax attention)."
        },
    )
    frozen_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "Store and run the frozen weights in this dtype ('bfloat16', 'float16'); trained tensors and "
            "norms stay float32. 'int8': bfloat16, plus int8 training matmuls in the frozen Linear layers "
            "(fastest on CPUs with AVX512-VNNI and no AMX; eval runs bf16). 'auto': the fastest of float32 / "
            "bfloat16 / int8 on this hardware (a short cached probe, bitfit.hardware); resolved when the config "
            "is applied. None keeps the model's dtype."
        },
    )
    train_norm_weights: bool = field(
        default=False,
        metadata={
            "help": "Also train the gains (the 1-D ``weight``) of the LayerNorm/RMSNorm modules whose role the "
            "selection covers: BitFit extended to every 1-D vector of the stack. Saved, loaded and merged with "
            "the biases (the artifact's norm_weights section)."
        },
    )
    lean: bool = field(
        default=True,
        metadata={
            "help": "Memory-lean training mode: dropout keeps bool masks and attention (BERT-style families) runs "
            "as one fused softmax-dropout-matmul that keeps only q/k/v and the softmax output. Same gradients "
            "as the stock modules; False restores them. Eval-mode outputs are identical either way."
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.preset, str) or self.preset not in PRESETS:
            raise BitFitConfigError(
                f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESETS)}"
            )
        self.roles = _as_tuple(self.roles, "roles")
        self.include = _as_tuple(self.include, "include")
        self.exclude = _as_tuple(self.exclude, "exclude")
        if self.roles is not None:
            bad = [r for r in self.roles if r not in ROLES]
            if bad:
                raise BitFitConfigError(
                    f"unknown role(s) {bad} in roles=; known roles: {', '.join(ROLES)}"
                )
        for name in ("include", "exclude"):
            for item in getattr(self, name) or ():
                _check_pattern(item, name)
        both = set(self.include or ()) & set(self.exclude or ())
        if both:
            raise BitFitConfigError(
                f"contradictory options: {sorted(both)} is both included and excluded; drop it from one of them"
            )
        if self.exclude and HEAD in self.exclude and self.include and HEAD in self.include:
            raise BitFitConfigError("contradictory options: 'head' both included and excluded")
        if self.layers is not None and not isinstance(self.layers, (str, int, list, tuple)):
            raise BitFitConfigError(f"layers must be a slice string, an int or a list of ints, got {self.layers!r}")
        if isinstance(self.layers, str):
            parse_layers(self.layers, 1000)  # syntax check only; ranges are checked against the model
        for name in ("add_missing", "train_head", "pooler_head", "skip_zero_grad", "train_norm_weights", "lean"):
            if not isinstance(getattr(self, name), bool):
                raise BitFitConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.frozen_dtype is not None:
            fd = str(self.frozen_dtype).replace("torch.", "")
            fd = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16"}.get(fd, fd)
            if fd not in FROZEN_DTYPES + ("auto",):
                raise BitFitConfigError(
                    f"frozen_dtype={self.frozen_dtype!r} is not supported; use one of "
                    f"{', '.join(FROZEN_DTYPES + ('auto',))}"
                )
            self.frozen_dtype = None if fd == "float32" else fd

    # ------------------------------------------------------------------ helpers
    def selected_roles(self) -> tuple[str, ...]:
        return tuple(self.roles) if self.roles is not None else PRESETS[self.preset]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("roles", "include", "exclude"):
            if d[k] is not None:
                d[k] = list(d[k])
        if isinstance(d["layers"], tuple):
            d["layers"] = list(d["layers"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BitFitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BitFitConfigError(f"unknown BitFitConfig field(s): {sorted(unknown)}")
        data = dict(data)
        data.setdefault("pooler_head", False)  # saved before the option existed: the pooler stayed in the body
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
