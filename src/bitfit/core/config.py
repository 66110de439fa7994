"""BitFitConfig: what to train, documented field by field and validated on creation."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from ..errors import BitFitConfigError

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

FROZEN_DTYPES = ("float32", "bfloat16", "float16", "int8-fbgemm", "int8")
IMPORTANCE_SCORES = ("grad", "fisher")  # bitfit.methods.sparse: how an entry's importance is measured
IMPORTANCE_UNITS = ("entry", "vector")  # bitfit.methods.sparse: what is chosen
SPARSE_FIELDS = ("budget", "importance", "importance_unit", "importance_batches")


def parse_budget(value) -> Union[None, int, float]:
    """A budget as given (int, float, or text such as "0.5" / "1000") -> a fraction in (0, 1] (float) or a
    count >= 1 (int); anything else is a BitFitConfigError that says which form to use."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise BitFitConfigError(f"budget={value!r} is not a number; give a fraction of the selection's "
                                        "bias entries (0.5) or a count of entries (1000)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BitFitConfigError(f"budget must be a fraction in (0, 1] or a whole count >= 1, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise BitFitConfigError(f"budget={value} trains nothing; give a count >= 1 or a fraction in (0, 1]")
        return value
    if not math.isfinite(value) or value <= 0:
        raise BitFitConfigError(f"budget={value!r} trains nothing; give a fraction in (0, 1] or a count >= 1")
    if value > 1:
        hint = f" pass budget={int(value)} (an int) for a count of entries," if value.is_integer() else ""
        raise BitFitConfigError(
            f"budget={value!r} is ambiguous: a float budget is a fraction in (0, 1] of the selection's bias "
            f"entries;{hint or ' a count must be a whole number,'} or a fraction such as 0.5"
        )
    return float(value)


ADDED_BIAS_INITS = ("zero", "normal", "uniform")
DEFAULT_ADDED_BIAS_STD = 1e-3


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
    added_bias_init: str = field(
        default="zero",
        metadata={
            "help": "Initial value of the biases add_missing adds: 'zero' (default: outputs unchanged until "
            "training), 'normal' (N(0, std^2)) or 'uniform' (U(-sqrt(3) std, sqrt(3) std): the same std). A random "
            "init changes the outputs before the first step. Only the trained entries of an added bias are drawn."
        },
    )
    added_bias_init_std: Optional[float] = field(
        default=None,
        metadata={"help": f"Standard deviation of a 'normal' or 'uniform' added_bias_init (default "
                  f"{DEFAULT_ADDED_BIAS_STD:g}); an error with 'zero'."},
    )
    added_bias_init_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": "Seed of the random added_bias_init (its own generator: torch's global random state is not "
            "touched). None: torch.initial_seed(), i.e. what torch.manual_seed / transformers.set_seed / "
            "`bitfit train --seed` last set, so a seeded run draws the same biases."
        },
    )
    train_head: bool = field(
        default=True,
        metadata={
            "help": "Train the task head (classifier/score/qa_outputs...; CLIP's logit_scale, see bitfit.methods.clip). "
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
            "(fastest on CPUs with AVX512-VNNI and no AMX; eval runs bf16). 'int8-fbgemm': float32 weights, int8 "
            "training matmuls on PyTorch's fbgemm engine (fast on AVX2-only CPUs; eval runs float32). 'auto': the "
            "fastest of float32 / float16 / bfloat16 / int8-fbgemm / int8 on this hardware (a short cached probe, bitfit.fast.hardware); resolved when the config "
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
    budget: Optional[Union[int, float, str]] = field(
        default=None,
        metadata={
            "help": "Sparse BitFit (bitfit.methods.sparse): train only this many of the selection's bias entries, those with "
            "the highest importance on a few training batches. A float in (0, 1] is a fraction of the selection's "
            "bias entries (rounded half up, at least 1), an int >= 1 a count; the head is not counted and always "
            "trains. bitfit.apply then needs batches= (or entries=). None trains every selected entry."
        },
    )
    importance: str = field(
        default="grad",
        metadata={"help": "With budget: the importance of a bias entry, summed over the scoring batches: 'grad' "
                  "(|dL/db|) or 'fisher' ((dL/db)^2, the empirical Fisher of each batch gradient)."},
    )
    importance_unit: str = field(
        default="entry",
        metadata={"help": "With budget: choose single bias 'entry's, or whole bias 'vector's ranked by their mean "
                  "importance (the last vector taken is cut to its best entries, so the count stays exact)."},
    )
    importance_batches: int = field(
        default=8,
        metadata={"help": "With budget: how many training batches the importance is measured on (bitfit.apply "
                  "with batches= uses the first N it yields)."},
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
            fd = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16",
                  "int8_fbgemm": "int8-fbgemm"}.get(fd, fd)
            if fd not in FROZEN_DTYPES + ("auto",):
                raise BitFitConfigError(
                    f"frozen_dtype={self.frozen_dtype!r} is not supported; use one of "
                    f"{', '.join(FROZEN_DTYPES + ('auto',))}"
                )
            self.frozen_dtype = None if fd == "float32" else fd
        self.budget = parse_budget(self.budget)
        if self.importance not in IMPORTANCE_SCORES:
            raise BitFitConfigError(f"importance={self.importance!r} is not a score; use one of "
                                    f"{', '.join(IMPORTANCE_SCORES)}")
        if self.importance_unit not in IMPORTANCE_UNITS:
            raise BitFitConfigError(f"importance_unit={self.importance_unit!r}: use one of {', '.join(IMPORTANCE_UNITS)}")
        if isinstance(self.importance_batches, bool) or not isinstance(self.importance_batches, int) \
                or self.importance_batches < 1:
            raise BitFitConfigError(f"importance_batches must be an int >= 1, got {self.importance_batches!r}")
        if self.budget is not None and self.train_norm_weights:
            raise BitFitConfigError("budget= chooses bias entries; it does not combine with train_norm_weights=True "
                                    "(drop one of them)")
        self._check_added_bias_init()

    def _check_added_bias_init(self) -> None:
        init, std, seed = self.added_bias_init, self.added_bias_init_std, self.added_bias_init_seed
        if init not in ADDED_BIAS_INITS:
            raise BitFitConfigError(
                f"added_bias_init={init!r} is not supported; use one of {', '.join(ADDED_BIAS_INITS)}"
            )
        if init == "zero":
            if std is not None or seed is not None:
                given = "added_bias_init_std" if std is not None else "added_bias_init_seed"
                raise BitFitConfigError(f"{given} applies to a random added_bias_init ('normal' or 'uniform'); "
                                        "the default 'zero' draws nothing")
            return
        if not self.add_missing:
            raise BitFitConfigError(f"added_bias_init={init!r} initialises the biases add_missing adds; pass "
                                    "add_missing=True (--add-missing)")
        if std is not None:
            if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std <= 0:
                raise BitFitConfigError(f"added_bias_init_std must be a finite number > 0, got {std!r}")
            self.added_bias_init_std = float(std)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise BitFitConfigError(f"added_bias_init_seed must be an int >= 0, got {seed!r}")

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
