"""The methods BitFit is compared against, each a function that prepares a loaded model.

Every function takes a freshly loaded model (with its task head), freezes/wraps it and
returns the model to train. The count of trainable scalars is exact and is what
:func:`trainable_count` returns; tests check each one against the model's config dims.

Methods (``METHODS``; see :func:`parse_method` for the ``name/key=value`` spec syntax):

- ``bitfit`` (any preset, ``bitfit/preset=ffn``), ``paper-subset`` (b_q + b_m2), ``frozen``
  (head only: BitFit preset ``none``), ``full`` (everything trains);
- ``bitfit-peft``: the same BitFit through peft (``bitfit.peft``), saved as peft adapter files;
- ``lora`` (peft; r=8, alpha=16, peft's default targets = query/value on BERT-like models),
  ``beft``, ``ln_tuning``, ``ia3``: peft's own bias/scale/norm-only methods, where the
  installed peft has them;
- ``rand``: the paper's random-parameter baseline: exactly as many trainable scalars as BitFit
  ``all`` has biases (``rand/count=N``: N; ``rand/budget=0.25``: as many as ``bitfit-sparse/budget=0.25``
  trains with the default selection), drawn uniformly among all entries of the stack's weight matrices,
  trained as a sparse delta (gather/index_add in a forward hook: no dense weight gradient, optimizer
  state of exactly that size);
- ``bitfit-sparse``: sparse BitFit (:mod:`bitfit.methods.sparse`): of the selected biases only the ``budget``
  entries (default 0.5 of them) with the highest importance on a few training batches train;
  ``bitfit-sparse/budget=0.25/importance=fisher/importance_unit=vector/importance_batches=4``;
- ``bitfit-1d`` (all biases plus the LayerNorm/RMSNorm gains: every 1-D vector of the stack),
  ``bitfit-halving`` (BitFit with the learning rate halved every 2 epochs after warm-up) and
  ``bitfit-rolelr`` (BitFit with per-role learning rates, default ``query=2,ffn_in=2``: the paper's
  most-moving biases at twice the rate); their training options (:data:`TRAIN_OPTIONS`, e.g.
  ``bitfit-halving/halve_every_epochs=3``, ``bitfit-rolelr/role_lr_multipliers=query=3+ffn_in=3``,
  ``bitfit-rolelr/layer_lr_decay=0.9``) go to the Trainer, not to the prepare function;
- ``bitfit-dynamic`` (all biases plus a per-input shift of each Linear bias: a rank-4 net on the layer's
  pooled input, zero at the start; :mod:`bitfit.methods.dynamic`; ``bitfit-dynamic/rank=8/targets=query+ffn_in``);
- ``bitfit+last-N`` (all biases, plus every parameter of the last N layers) and
  ``bitfit+lora`` (all biases plus LoRA).

The task head trains in every method (peft methods through ``modules_to_save``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..errors import BitFitConfigError, BitFitError
from ..methods.lrgroups import PAPER_ROLE_LR
from ..core.roles import LAYER_RE, STACK_RE, TOWER_RE, discover, head_module_names
from .defaults import BITFIT_LR

try:  # GPT-2 style Conv1D: weight is [in, out]
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]


# ------------------------------------------------------------------------------ counting
def trainable_count(model: nn.Module) -> int:
    """Trainable scalars (each parameter object counted once); of a masked bias (a fused slot's role
    slices, sparse BitFit's entries) only the entries that train."""
    from ..core.prepare import bitfit_model, get_state

    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    target = bitfit_model(model)
    state = get_state(target) if target is not None else None
    for name, idx in (state.partial.items() if state is not None else ()):
        n -= state.model_map.slot(name).size - int(idx.numel())
    return n


def total_count(model: nn.Module) -> int:
    """All scalars of the model as it runs (rand's sparse deltas and peft adapters included)."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def base_count(model: nn.Module) -> int:
    """Scalars of the base model, without adapters/deltas/peft copies: the denominator of the %."""
    n = 0
    for name, p in model.named_parameters():
        if any(t in name for t in ("lora_", "beft_", "ia3_", "bitfit_rand", "modules_to_save", "ln_tuning_layers")):
            continue
        n += p.numel()
    return n


def bias_param_count(model: nn.Module) -> int:
    """How many scalars BitFit preset 'all' trains in the body (every existing bias; head excluded)."""
    return sum(s.size for s in discover(model).slots if s.exists)


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def _head_names(model: nn.Module) -> list[str]:
    return head_module_names(model)[0]


# ------------------------------------------------------------------------------ BitFit family
def bitfit(model: nn.Module, preset: str = "all", **options) -> nn.Module:
    """BitFit through :func:`bitfit.apply` (any preset or option it takes)."""
    from ..core.prepare import apply

    return apply(model, preset=preset, **options)


def bitfit_sparse(model: nn.Module, budget=0.5, batches=None, preset: str = "all", **options) -> nn.Module:
    """Sparse BitFit: ``budget`` entries of the selected biases, chosen by importance on ``batches``
    (``bitfit compare`` passes the run's training batches)."""
    if batches is None:
        raise BitFitConfigError("bitfit-sparse chooses bias entries on training batches; run it through bitfit "
                                "compare / run_train (or call bitfit.apply(model, budget=..., batches=...))")
    return bitfit(model, preset=preset, budget=budget, batches=batches, **options)


def bitfit_1d(model: nn.Module, preset: str = "all", **options) -> nn.Module:
    """BitFit plus the norm gains: every 1-D vector of the stack trains (``train_norm_weights=True``)."""
    return bitfit(model, preset=preset, train_norm_weights=True, **options)


def bitfit_dynamic(model: nn.Module, rank: int = 4, targets=None, pool: str = "auto", seed: int = 0,
                   preset: str = "all", **options) -> nn.Module:
    """BitFit plus dynamic biases (:func:`bitfit.methods.dynamic.apply_dynamic`): ``b + U · pool(D · x)`` on every
    selected Linear bias of ``targets`` (roles joined by '+'; default all)."""
    from ..methods.dynamic import apply_dynamic

    return apply_dynamic(model, rank=rank, targets=targets, pool=pool, seed=seed, preset=preset, **options)


def paper_subset(model: nn.Module, **options) -> nn.Module:
    """The paper's subset: b_q and b_m2 (plus the head)."""
    return bitfit(model, preset="paper-subset", **options)


def frozen(model: nn.Module, **options) -> nn.Module:
    """The paper's frozen baseline: only the task head trains."""
    return bitfit(model, preset="none", **options)


def full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _layer_of(name: str, stacks) -> Optional[tuple[Optional[str], int]]:
    m = LAYER_RE.search(name)
    if not m:
        return None
    for rx in (STACK_RE, TOWER_RE):  # encoder/decoder, or a dual encoder's text/vision tower
        s = rx.search(name[: m.start() + 1])
        if s and s.group(1) in stacks:
            return s.group(1), int(m.group(1))
    return None, int(m.group(1))


def bitfit_last_n(model: nn.Module, n: int = 1, preset: str = "all") -> nn.Module:
    """All biases (BitFit ``preset``) plus every parameter of the last ``n`` layers of each stack."""
    from ..core.prepare import get_state

    n = int(n)
    bitfit(model, preset=preset)
    n_layers = get_state(model).model_map.n_layers
    if not n_layers:
        raise BitFitError("bitfit+last-N needs a model with a numbered layer stack; this one has none")
    for stack, count in n_layers.items():
        if not 1 <= n <= count:
            raise BitFitConfigError(f"bitfit+last-{n}: the model has {count} layers; choose N between 1 and {count}")
    head = tuple(f"{h}." for h in _head_names(model))
    for name, p in model.named_parameters():
        if name.startswith(head):
            continue
        where = _layer_of(name, n_layers)
        if where is not None and where[1] >= n_layers.get(where[0], 0) - n:
            p.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------ peft methods
def _peft():
    try:
        import peft
    except ImportError:
        raise BitFitError("this method needs the 'peft' library: pip install peft") from None
    return peft


def _wrap_peft(model: nn.Module, config) -> nn.Module:
    peft = _peft()
    heads = _head_names(model)
    if heads:
        config.modules_to_save = sorted(set(config.modules_to_save or []) | set(heads))
    if type(model).__name__.endswith("ForSequenceClassification"):
        config.task_type = peft.TaskType.SEQ_CLS
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise BitFitConfigError(
            f"peft could not wrap this {getattr(model.config, 'model_type', type(model).__name__)} model "
            f"({str(exc).splitlines()[0]}); pass targets=... (module names) explicitly"
        ) from None


def bitfit_peft(model: nn.Module, preset: str = "all", **options) -> nn.Module:
    """BitFit through peft: ``get_peft_model`` with a :class:`bitfit.peft.BitFitPeftConfig`; trains what
    ``bitfit`` trains (same options), saves peft's adapter files."""
    peft = _peft()
    from ..peft import BitFitPeftConfig

    cfg = BitFitPeftConfig(preset=preset, **options)
    if type(model).__name__.endswith("ForSequenceClassification"):
        cfg.task_type = peft.TaskType.SEQ_CLS
    return get_peft_model(model, cfg)


def get_peft_model(model: nn.Module, config) -> nn.Module:
    """``peft.get_peft_model`` without the FutureWarning it triggers on transformers 5 (peft reads the model's
    ``is_gradient_checkpointing``, renamed ``is_activation_checkpointing``): nothing the user can change."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return _peft().get_peft_model(model, config)


def _targets(targets):
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [t for t in re.split(r"[+ ]", targets) if t]
    return list(targets)


def lora(model: nn.Module, r: int = 8, alpha: int = 16, targets=None, dropout: float = 0.1) -> nn.Module:
    """LoRA through peft. Default targets: query and value (peft's own default for the family)."""
    peft = _peft()
    targets = _targets(targets)
    if targets is None and getattr(model.config, "model_type", None) in ("bert", "roberta", "electra", "xlm-roberta"):
        targets = ["query", "value"]
    cfg = peft.LoraConfig(r=int(r), lora_alpha=int(alpha), lora_dropout=float(dropout), target_modules=targets)
    return _wrap_peft(model, cfg)


def _needs(name: str, cls: str):
    peft = _peft()
    if not hasattr(peft, cls):
        raise BitFitError(f"method {name!r} needs peft.{cls}, which the installed peft {peft.__version__} lacks")
    return getattr(peft, cls)


def beft(model: nn.Module, targets=None) -> nn.Module:
    """peft's BEFT: a trainable bias vector added after the target Linears (peft's default: value)."""
    return _wrap_peft(model, _needs("beft", "BeftConfig")(target_modules=_targets(targets)))


def ln_tuning(model: nn.Module, targets=None) -> nn.Module:
    """peft's LN tuning: every LayerNorm/RMSNorm of the stack trains (weight and bias)."""
    targets = _targets(targets)
    if targets is None:
        norms = [s.module_name for s in discover(model).slots if s.kind in ("layernorm", "norm")]
        if not norms:
            raise BitFitConfigError("ln_tuning: this model has no normalisation layer; pass targets=...")
        targets = sorted({n.rsplit(".", 1)[-1] for n in norms})
    return _wrap_peft(model, _needs("ln_tuning", "LNTuningConfig")(target_modules=targets))


def ia3(model: nn.Module, targets=None, feedforward=None) -> nn.Module:
    """peft's (IA)^3: learned scaling vectors (peft's default targets for the family)."""
    cfg = _needs("ia3", "IA3Config")(target_modules=_targets(targets), feedforward_modules=_targets(feedforward))
    return _wrap_peft(model, cfg)


def bitfit_lora(model: nn.Module, r: int = 8, alpha: int = 16, targets=None, dropout: float = 0.1,
                preset: str = "all") -> nn.Module:
    """Biases (those of BitFit ``preset``) plus LoRA; the head trains once (peft's copy of it).

    The model gets no BitFit state (peft owns the wrapper); the biases are unfrozen directly.
    """
    from ..core.config import BitFitConfig
    from ..core.select import resolve

    mm = discover(model)
    sel = resolve(mm, BitFitConfig(preset=preset))
    biases = []
    for s in mm.slots:
        roles = sel.chosen.get(s.name)
        if roles:
            if s.indices(roles) is not None:
                raise BitFitConfigError(f"bitfit+lora: preset {preset!r} selects part of a fused bias ({s.name}); "
                                        "use preset=all")
            biases.append(model.get_submodule(s.module_name).bias)
    wrapped = lora(model, r=r, alpha=alpha, targets=targets, dropout=dropout)
    for p in biases:
        p.requires_grad_(True)
    return wrapped


# ------------------------------------------------------------------------------ rand
class RandDelta(nn.Module):
    """A sparse trainable delta on a weight matrix: ``W_eff[rows[i], cols[i]] = W[...] + delta[i]``.

    Applied by a forward hook as ``y[..., rows] += x[..., cols] * delta`` (a gather and an
    index_add): the frozen weight gets no gradient, ``delta``'s gradient is a gather too, and the
    optimizer keeps state for ``len(delta)`` scalars only.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, dtype=torch.float32, device=None):
        super().__init__()
        self.register_buffer("rows", rows.to(device=device, dtype=torch.long))
        self.register_buffer("cols", cols.to(device=device, dtype=torch.long))
        self.delta = nn.Parameter(torch.zeros(len(rows), dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"entries={len(self.delta)}"


def _rand_hook(module: nn.Module, inputs, output):
    rd: RandDelta = module.bitfit_rand
    x = inputs[0]
    contrib = x.index_select(-1, rd.cols) * rd.delta.to(x.dtype)
    return output.index_add(-1, rd.rows, contrib.to(output.dtype))


def _weight_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The stack's weight matrices: Linear / Conv1D modules of the body (head and LM head excluded)."""
    heads, lm = head_module_names(model)
    skip = tuple(f"{h}." for h in heads + lm)
    out = []
    for name, m in model.named_modules():
        if not name or name in heads or name in lm or name.startswith(skip):
            continue
        if isinstance(m, nn.Linear) or (Conv1D and isinstance(m, Conv1D)):
            out.append((name, m))
    return out


def rand(model: nn.Module, count: Optional[int] = None, seed: int = 0, budget=None) -> nn.Module:
    """The paper's random-parameter baseline.

    ``count`` (default: exactly the number of bias scalars BitFit ``all`` trains on this model;
    ``budget``: as many as sparse BitFit trains with that budget and the default selection)
    entries are drawn uniformly without replacement among all entries of the stack's weight
    matrices (every Linear/Conv1D of the body: attention, FFN, pooler; embeddings and the head
    are not in the pool) and trained as sparse deltas; the task head trains as in BitFit.
    """
    if budget is not None:
        if count is not None:
            raise BitFitConfigError("rand: give count= or budget=, not both")
        from ..core.config import BitFitConfig
        from ..core.select import resolve
        from ..methods.sparse import budget_count, candidates

        mm = discover(model)
        count = budget_count(budget, sum(int(c.numel()) for c in candidates(mm, resolve(mm, BitFitConfig())).values()))
    n = bias_param_count(model) if count is None else int(count)
    mods = _weight_modules(model)
    sizes = torch.tensor([m.weight.numel() for _, m in mods], dtype=torch.long)
    pool = int(sizes.sum())
    if not 0 < n <= pool:
        raise BitFitConfigError(f"rand: cannot choose {n} entries among the {pool} weight-matrix entries")
    g = torch.Generator().manual_seed(int(seed))
    chosen = torch.sort(torch.randperm(pool, generator=g)[:n]).values
    offsets = torch.cumsum(sizes, 0)
    which = torch.bucketize(chosen, offsets, right=True)
    starts = offsets - sizes
    # the head trains as in BitFit (and gets BitFit's head learning rate in `bitfit train`): preset 'none'
    bitfit(model, preset="none")
    for i, (name, m) in enumerate(mods):
        local = chosen[which == i] - starts[i]
        if local.numel() == 0:
            continue
        w = m.weight
        if isinstance(m, nn.Linear):  # [out, in]
            rows, cols = local // w.shape[1], local % w.shape[1]
        else:  # Conv1D [in, out]
            cols, rows = local // w.shape[1], local % w.shape[1]
        m.bitfit_rand = RandDelta(rows, cols, dtype=torch.float32, device=w.device)
        m.register_forward_hook(_rand_hook)
    return model


def rand_effective_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """module name -> its weight with the sparse delta added (what the forward computes)."""
    out = {}
    for name, m in model.named_modules():
        rd = getattr(m, "bitfit_rand", None)
        if isinstance(rd, RandDelta):
            w = m.weight.detach().clone()
            d = rd.delta.detach().to(w.dtype)
            if isinstance(m, nn.Linear):
                w.index_put_((rd.rows, rd.cols), d, accumulate=True)
            else:
                w.index_put_((rd.cols, rd.rows), d, accumulate=True)
            out[name] = w
    return out


# ------------------------------------------------------------------------------ dispatch
@dataclass
class Method:
    name: str
    fn: Callable
    family: str  # "bitfit" (has a bitfit state, bitfit.save works), "dynamic" (a bitfit state and nets), "peft", "dense", "rand"
    lr: float  # default learning rate
    lr_grid: tuple  # default grid for --lr-grid auto
    help: str
    train_args: dict = field(default_factory=dict)  # ModelArguments defaults of the method (TRAIN_OPTIONS)
    needs_batches: bool = False  # prepared on training batches (prepare(..., batches=...)): bitfit-sparse

    @property
    def trains_bitfit(self) -> bool:
        """The method trains a BitFit model (bitfit.apply; inside peft's wrapper for bitfit-peft): BitFit's
        training defaults (frozen dtype, head learning rate, dropout) and options apply to it."""
        return self.family in ("bitfit", "dynamic") or self.name == "bitfit-peft"


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("bitfit", bitfit, "bitfit", BITFIT_LR, (1e-4, 4e-4, 1e-3, 2e-3, 4e-3), "BitFit, all biases (bitfit/preset=NAME for others)"),
        Method("paper-subset", paper_subset, "bitfit", BITFIT_LR, (4e-4, 1e-3, 2e-3, 4e-3), "b_q + b_m2 only"),
        Method("frozen", frozen, "bitfit", BITFIT_LR, (4e-4, 1e-3, 2e-3, 4e-3), "head only"),
        Method("full", full, "dense", 2e-5, (1e-5, 2e-5, 5e-5), "full fine-tuning"),
        Method("bitfit-peft", bitfit_peft, "peft", BITFIT_LR, (1e-4, 4e-4, 1e-3, 2e-3, 4e-3),
               "BitFit through peft (bitfit.peft.BitFitPeftConfig), all biases"),
        Method("lora", lora, "peft", 5e-4, (2e-4, 5e-4, 1e-3), "LoRA via peft (r=8, alpha=16, query/value)"),
        Method("beft", beft, "peft", 1e-3, (4e-4, 1e-3, 4e-3), "peft BEFT (bias on value projections)"),
        Method("ln_tuning", ln_tuning, "peft", 1e-3, (4e-4, 1e-3, 4e-3), "peft LN tuning"),
        Method("ia3", ia3, "peft", 3e-3, (1e-3, 3e-3, 1e-2), "peft (IA)^3"),
        Method("rand", rand, "rand", BITFIT_LR, (1e-4, 4e-4, 1e-3, 2e-3, 4e-3), "random weight entries, as many as BitFit's biases"),
        Method("bitfit-sparse", bitfit_sparse, "bitfit", BITFIT_LR, (1e-4, 4e-4, 1e-3, 2e-3, 4e-3),
               "sparse BitFit: the most important bias entries under a budget (default 0.5)", needs_batches=True),
        Method("bitfit-1d", bitfit_1d, "bitfit", BITFIT_LR, (1e-4, 4e-4, 1e-3, 2e-3, 4e-3),
               "all biases + LayerNorm/RMSNorm gains (every 1-D vector)"),
        Method("bitfit-halving", bitfit, "bitfit", BITFIT_LR, (1e-4, 4e-4, 1e-3, 2e-3, 4e-3),
               "BitFit, lr halved every 2 epochs after warm-up", {"halve_every_epochs": 2.0}),
        Method("bitfit-rolelr", bitfit, "bitfit", BITFIT_LR, (1e-4, 4e-4, 1e-3, 2e-3, 4e-3),
               f"BitFit, role lr multipliers {PAPER_ROLE_LR}", {"role_lr_multipliers": PAPER_ROLE_LR}),
        Method("bitfit-dynamic", bitfit_dynamic, "dynamic", BITFIT_LR, (1e-4, 4e-4, 1e-3, 2e-3, 4e-3),
               "BitFit + per-input bias shifts (rank-4 net on each Linear's pooled input; does not merge)"),
        Method("bitfit+last-N", bitfit_last_n, "dense", 1e-4, (5e-5, 1e-4, 3e-4), "all biases + last N layers fully"),
        Method("bitfit+lora", bitfit_lora, "peft", 5e-4, (2e-4, 5e-4, 1e-3), "all biases + LoRA"),
    ]
}

_INT_OPTS = {"r", "alpha", "n", "seed", "count", "importance_batches", "rank"}
_FLOAT_OPTS = {"dropout", "layer_lr_decay", "halve_every_epochs", "norm_weight_l2"}
# method options that are training options (ModelArguments fields read by the Trainer), not prepare options
TRAIN_OPTIONS = ("role_lr_multipliers", "layer_lr_decay", "halve_every_epochs", "norm_weight_l2")
BITFIT_ONLY_OPTIONS = ("role_lr_multipliers", "layer_lr_decay", "norm_weight_l2")


def train_options(spec: str) -> dict:
    """The training options of method ``spec``: its defaults (``Method.train_args``) updated by the spec's
    own (``bitfit-rolelr/layer_lr_decay=0.9``); ``+`` separates roles in ``role_lr_multipliers``."""
    name, opts = parse_method(spec)
    out = dict(METHODS[name].train_args)
    out.update({k: v for k, v in opts.items() if k in TRAIN_OPTIONS})
    if not METHODS[name].trains_bitfit:
        bad = [k for k in out if k in BITFIT_ONLY_OPTIONS]
        if bad:
            raise BitFitConfigError(f"method {spec!r}: {', '.join(bad)} apply to BitFit methods only (biases grouped "
                                    "by role and layer)")
    if out.get("norm_weight_l2") and name != "bitfit-1d":
        raise BitFitConfigError(f"method {spec!r}: norm_weight_l2 pulls trained norm gains toward their pretrained "
                                "values; only bitfit-1d trains them (bitfit-1d/norm_weight_l2=0.1)")
    if isinstance(out.get("role_lr_multipliers"), str):
        out["role_lr_multipliers"] = out["role_lr_multipliers"].replace("+", ",")
    return out


def parse_method(spec: str) -> tuple[str, dict]:
    """``"lora/r=16/alpha=32"`` -> ("lora", {"r": 16, "alpha": 32}); ``"bitfit+last-2"`` -> n=2.

    Options are ``/key=value`` after the name; ``targets`` takes module names joined by '+'.
    """
    parts = [p for p in spec.strip().split("/") if p]
    if not parts:
        raise BitFitConfigError("empty method name; choose from: " + ", ".join(METHODS))
    name, opts = parts[0], {}
    m = re.fullmatch(r"bitfit\+last-(\d+)", name)
    if m:
        name, opts["n"] = "bitfit+last-N", int(m.group(1))
    if name not in METHODS:
        raise BitFitConfigError(f"unknown method {name!r}; choose from: {', '.join(METHODS)} (bitfit+last-N as bitfit+last-2)")
    for p in parts[1:]:
        if "=" not in p:
            raise BitFitConfigError(f"method option {p!r} in {spec!r} must look like key=value (e.g. lora/r=16)")
        k, v = p.split("=", 1)
        try:
            opts[k] = int(v) if k in _INT_OPTS else float(v) if k in _FLOAT_OPTS else v
        except ValueError:
            raise BitFitConfigError(f"method option {k}={v!r} in {spec!r} must be a number") from None
    return name, opts


def method_info(spec: str) -> Method:
    return METHODS[parse_method(spec)[0]]


def prepare(model: nn.Module, spec: str, seed: Optional[int] = None, batches=None) -> nn.Module:
    """Prepare ``model`` for the method ``spec`` and return the model to train. ``batches``: labelled
    training batches, for the methods that choose what trains on data (bitfit-sparse)."""
    name, opts = parse_method(spec)
    if METHODS[name].needs_batches:
        opts["batches"] = batches
    if name in ("rand", "bitfit-dynamic") and seed is not None and "seed" not in opts:
        opts["seed"] = seed
    opts = {k: v for k, v in opts.items() if k not in TRAIN_OPTIONS}  # the Trainer's (train_options)
    fn = METHODS[name].fn
    try:
        return fn(model, **opts)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise BitFitConfigError(f"method {spec!r}: {exc}") from None
        raise


__all__ = [
    "METHODS", "Method", "prepare", "parse_method", "method_info", "trainable_count", "total_count", "base_count",
    "bias_param_count", "bitfit", "bitfit_peft", "bitfit_1d", "bitfit_sparse", "bitfit_dynamic", "train_options",
    "TRAIN_OPTIONS",
    "paper_subset", "frozen", "full", "lora", "beft", "ln_tuning", "ia3", "rand",
    "bitfit_last_n", "bitfit_lora", "RandDelta", "rand_effective_weights",
]
