"""Lean BitFit training: a low-precision frozen base and less saved activation.

BitFit's frozen weights need no gradient, no optimizer state and no more precision than
inference needs. Two independent switches, both set by :func:`bitfit.apply`:

``frozen_dtype="bfloat16"`` (or ``"float16"``)
    The frozen weights of Linear / Embedding / Conv1D / Conv layers are stored in that dtype;
    every trained tensor and every norm parameter is float32, so an optimizer only ever sees
    float32. The model's forward runs under ``torch.autocast`` in that dtype (CPU or GPU), which
    casts each op's inputs consistently, so mixed-dtype pitfalls (a bf16 weight with a float32
    bias or input) cannot occur; trained float32 tensors are cast inside the graph and their
    gradients arrive in float32. Floating outputs (logits, hidden states) are returned as
    float32.

``frozen_dtype="int8"``
    As ``"bfloat16"``, and in training mode every frozen ``nn.Linear`` runs its two matmuls (the
    forward and the input gradient; BitFit needs no weight gradient) in int8: the weight is
    quantized once per output row, activations and incoming gradients per token row, and the
    int32 products are rescaled in float32 (the SwitchBack scheme of Wortsman et al., 2023,
    whose third, weight-gradient matmul BitFit never computes). Eval mode, and so every
    evaluation and the deployed model, runs the bf16 path. On CPUs with AVX512-VNNI int8
    matmuls run at about twice the bf16 rate.

``frozen_dtype="int8-fbgemm"``
    The frozen weights stay float32 and nothing runs under autocast; in training mode every frozen
    ``nn.Linear`` runs its forward and input-gradient matmuls on PyTorch's fbgemm int8 kernels with
    row-wise activation/gradient scales (:mod:`bitfit.fast.int8_fbgemm`): fast on CPUs with AVX2 only,
    where bf16 and ``torch._int_mm`` are emulated. Evaluation is the float32 path, bit for bit.

``lean=True`` (the default)
    In training mode, two memory-lean replacements of stock pieces, exact in float32:

    - *lean dropout*: ``nn.Dropout`` modules keep their mask as ``bool`` (1 byte a value)
      instead of CPU dropout's float noise tensor (4 bytes); the mask is drawn exactly as
      torch draws it, so under a fixed seed the result is bit-identical to stock dropout.
    - *fused attention*: softmax -> dropout -> matmul in one autograd function that keeps only
      q, k, v and the softmax output, with the dropout mask folded into that output's sign bit
      (softmax outputs are >= 0), instead of the softmax output, the noise tensor and their
      product. Used by families whose attention goes through transformers' attention interface
      with the standard eager semantics (BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, MiniLM,
      DistilBERT, ViT, OPT, BART, LLaMA/Qwen2/Mistral when their attention dropout is active),
      and without dropout on CPU up to ``FUSED_MAX_KEYS_WITHOUT_DROPOUT`` keys, where torch's CPU
      flash-attention backward is the slowest part of a short-sequence step. Elsewhere (eval mode,
      longer sequences without dropout, GPU where SDPA's fused kernels are already lean, or
      grouped-query/sliding-window/soft-capped attention) the stock function runs.
    - *lean gated MLP*: the SwiGLU MLPs of LLaMA, Qwen2/3 and Mistral (``down(silu(gate(x)) *
      up(x))``) keep only ``gate(x)`` and ``up(x)`` for backward and recompute the SiLU there,
      instead of also keeping its output: a third less of the MLP's saved activations, which are
      most of a decoder layer's. Backward runs the stock ops on the same values (bit-identical).
    - *padding-free layers* (on a CPU, training and evaluation): for encoder families that pack
      (``bitfit.fast.packing.PACK_FAMILIES``: BERT, RoBERTa, XLM-R, CamemBERT, ELECTRA, DistilBERT) a
      right-padded batch's real tokens travel packed from the first layer to the last, and attention
      regroups them into runs of rows of similar length; the same values up to rounding, without the
      padding's cost (a random SST-2 batch is ~3x padding); without dropout a layer's runs attend in one
      autograd node (``bitfit.fast.packing.run_attention``). Dropout then draws on the packed tokens,
      so only ``set_lean(model, True, pack=False)`` is bit-identical to stock under a seed.

``set_lean(model, False)`` (or ``apply(..., lean=False)``) restores the stock path.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import packing
from ..core import prepare, report
from ..core.roles import module_family
from ..errors import BitFitConfigError, BitFitError
from .attention import attention_applies, register
from .dropout import FAST_DRAW, LeanDropout
from . import int8_fbgemm
from .int8 import drop_int8, quantize_frozen_linears

LEAN_ATTR = "_bitfit_lean"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}



def _to_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32"}.get(name, name)
    if name not in _DTYPES:
        raise BitFitConfigError(
            f"frozen_dtype={dtype!r} is not supported; use one of bfloat16, float16, float32, int8, int8-fbgemm"
        )
    return _DTYPES[name]


@dataclass
class LeanState:
    """What this module did to a model (kept at ``model._bitfit_lean``)."""

    frozen_dtype: Optional[torch.dtype] = None
    lean: bool = False
    dropouts: list = field(default_factory=list)  # module names swapped to LeanDropout
    attention: bool = False  # fused attention applies to this family
    mlps: list = field(default_factory=list)  # gated MLP modules with the lean forward
    pack: bool = False  # padding-free encoder layers on a CPU, training and evaluation (bitfit.fast.packing)
    attn_impl: Optional[str] = None  # the model's own attention implementation (restored outside training)
    cast: int = 0  # number of frozen weight tensors stored in frozen_dtype
    int8: list = field(default_factory=list)  # Linear modules whose training matmuls run in int8
    int8_fbgemm: list = field(default_factory=list)  # Linear modules whose training matmuls run on fbgemm int8
    auto: Optional[object] = None  # bitfit.fast.hardware.DtypeChoice when frozen_dtype="auto" chose the dtype

    def describe(self) -> list:
        out = []
        if self.auto is not None:
            out.append(self.auto.describe())
        if self.frozen_dtype is not None:
            out.append(
                f"frozen weights stored and run in {str(self.frozen_dtype).replace('torch.', '')} "
                f"({self.cast} tensors; trained tensors and norms float32, forward under autocast)"
            )
        if self.int8:
            out.append(
                f"int8 training matmuls in {len(self.int8)} frozen Linear layers (forward and input gradient, "
                "row-wise scales); eval mode runs bf16"
            )
        if self.int8_fbgemm:
            out.append(int8_fbgemm.describe(len(self.int8_fbgemm)))
        if self.lean:
            parts = []
            if self.dropouts:
                parts.append(f"lean dropout ({len(self.dropouts)} modules, bool masks)")
            if self.attention:
                parts.append("fused softmax-dropout-matmul attention")
            if self.mlps:
                parts.append(f"lean gated MLP ({len(self.mlps)} modules, SiLU recomputed in backward)")
            if self.pack:
                parts.append("padding-free layers (real tokens only, attention in length runs)")
            out.append("lean training mode: " + (", ".join(parts) if parts else "nothing applies to this family"))
        return out


def get_lean(model: nn.Module) -> Optional[LeanState]:
    from ..core.prepare import unwrap

    return getattr(unwrap(model), LEAN_ATTR, None)


# ------------------------------------------------------------------ frozen dtype


def _weight_modules():
    kinds = [nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d]
    try:
        from transformers.pytorch_utils import Conv1D

        kinds.append(Conv1D)
    except Exception:  # pragma: no cover
        pass
    return tuple(kinds)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or (
        "norm" in type(module).__name__.lower()
    )


def cast_frozen(model: nn.Module, dtype="bfloat16") -> int:
    """Store the frozen weights of ``model``'s Linear/Embedding/Conv layers in ``dtype``.

    Every trainable parameter and every norm parameter becomes float32 (also when the base was
    loaded in bf16). The model's forward then runs under autocast in ``dtype``. Returns the
    number of weight tensors cast. Called by ``bitfit.apply(..., frozen_dtype=...)``.
    """
    from ..core.prepare import unwrap

    target = unwrap(model)
    name = str(dtype).replace("torch.", "").replace("_", "-")
    int8, fbgemm = name == "int8", name == int8_fbgemm.MODE
    dt = torch.bfloat16 if int8 else torch.float32 if fbgemm else _to_dtype(dtype)
    lean = _lean_state(target)
    if int8:
        lean.int8 = quantize_frozen_linears(target)
    if fbgemm:  # float32 frozen weights (cast below where the base was loaded in another dtype)
        lean.int8_fbgemm = int8_fbgemm.quantize_frozen_linears(target)
        if not int8_fbgemm.available():
            warnings.warn("frozen_dtype='int8-fbgemm': PyTorch's fbgemm engine does not run here, so the frozen "
                          "Linear layers train with float32 matmuls (the float32 path exactly)", stacklevel=2)
    weight_kinds = _weight_modules()
    seen = set()
    n = 0
    for module in target.modules():
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                if p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
            continue
        if isinstance(module, weight_kinds):
            w = module._parameters.get("weight")
            if w is None or id(w) in seen:
                continue
            seen.add(id(w))
            if not w.requires_grad and w.is_floating_point() and (dt != torch.float32 or fbgemm):
                if w.dtype != dt:
                    w.data = w.data.to(dt)
                n += 1
    for p in target.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    lean.frozen_dtype = None if dt == torch.float32 else dt
    lean.cast = n
    _install_forward(target)
    return n


# ------------------------------------------------------------------ lean gated MLP

# families whose MLP forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
_GATED_MLP_FAMILIES = {"llama", "qwen2", "qwen3", "mistral"}


class _SiLUMul(torch.autograd.Function):
    """``silu(gate) * up`` saving ``gate`` and ``up`` only; backward recomputes ``silu(gate)`` and runs the
    ops stock autograd runs (mul's two gradients, ``silu_backward``): bit-identical gradients."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        g_gate = g_up = None
        if ctx.needs_input_grad[1]:
            g_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            g_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return g_gate, g_up


class _LeanGatedMLP:
    """Instance-level ``forward`` of a SwiGLU MLP: :class:`_SiLUMul` in CPU training, the stock forward otherwise."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x):
        m = self.module
        if not (m.training and torch.is_grad_enabled() and x.device.type == "cpu"):
            return type(m).forward(m, x)
        return m.down_proj(_SiLUMul.apply(m.gate_proj(x), m.up_proj(x)))


def _is_gated_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return (
        module_family(module) in _GATED_MLP_FAMILIES and type(module).__name__.endswith("MLP")
        and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))
        and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation")
        and "forward" not in act.__dict__  # nobody replaced the activation's forward (a kernel)
    )


def _set_lean_mlps(target: nn.Module, on: bool) -> list:
    names = []
    for name, module in target.named_modules():
        current = module.__dict__.get("forward")
        if not on:
            if isinstance(current, _LeanGatedMLP):
                del module.__dict__["forward"]
            continue
        if isinstance(current, _LeanGatedMLP):
            names.append(name)
        elif current is None and _is_gated_mlp(module):
            module.forward = _LeanGatedMLP(module)
            names.append(name)
    return names


# ------------------------------------------------------------------ the forward wrapper


class _Forward:
    """Instance-level ``forward`` of a lean model: autocast and/or the fused attention switch.

    A plain object (not a closure) so ``copy.deepcopy`` and pickling carry it to the copy.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        try:
            self.__signature__ = inspect.signature(type(module).forward.__get__(module))
        except (TypeError, ValueError):  # pragma: no cover
            pass
        self.__doc__ = type(module).forward.__doc__

    def __call__(self, *args, **kwargs):
        module = self.module
        lean = getattr(module, LEAN_ATTR, None)
        forward = type(module).forward
        if lean is None:
            return forward(module, *args, **kwargs)
        with contextlib.ExitStack() as stack:
            if lean.frozen_dtype is not None:
                device = next(module.parameters()).device.type
                stack.enter_context(torch.autocast(device, dtype=lean.frozen_dtype))
            if lean.lean and (lean.int8 or lean.int8_fbgemm) and module.training:
                stack.callback(FAST_DRAW.reset, FAST_DRAW.set(True))
            if lean.lean and lean.attention and not _checkpointing(module):
                plan = None
                if lean.pack and not args and packing.wanted(kwargs, module) \
                        and kwargs["attention_mask"].device.type == "cpu":
                    plan = packing.plan(kwargs["attention_mask"])  # training and evaluation alike
                config = module.config
                saved = config._attn_implementation_internal
                if (module.training or plan is not None) and saved in ("eager", "sdpa"):
                    config._attn_implementation_internal = register(saved)
                    stack.callback(setattr, config, "_attn_implementation_internal", saved)
                    if plan is not None:
                        stack.callback(packing.deactivate, packing.activate(plan))
            out = forward(module, *args, **kwargs)
        if lean.frozen_dtype is not None:
            out = _to_float32(out)
        return out


def packs(model: nn.Module) -> bool:
    """Forwards of ``model`` (training and evaluation) run padding-free layers (bitfit.fast.packing) when their batch
    is right-padded and on a CPU: lean mode with the fused attention on a family that packs, without gradient
    checkpointing."""
    from ..core.prepare import unwrap

    target = unwrap(model)
    lean = getattr(target, LEAN_ATTR, None)
    return bool(lean is not None and lean.lean and lean.pack and lean.attention and not _checkpointing(target))


def _checkpointing(model: nn.Module) -> bool:
    """Gradient (activation) checkpointing is on: backward recomputes each layer outside this forward, with
    the model's own attention function, so the forward must run that one too (the saved tensors must match;
    checkpointing keeps no attention activations anyway)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _to_float32(out):
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return type(out)(_to_float32(o) for o in out)
    if isinstance(out, dict):  # ModelOutput
        for key in list(out.keys()):
            val = out[key]
            new = _to_float32(val)
            if new is not val:
                out[key] = new
        return out
    return out


def _install_forward(target: nn.Module) -> None:
    if not isinstance(target.__dict__.get("forward"), _Forward):
        if "forward" in target.__dict__:
            raise BitFitError(
                "this model's forward was already replaced on the instance; apply bitfit before wrapping it"
            )
        target.forward = _Forward(target)


def _lean_state(target: nn.Module) -> LeanState:
    state = getattr(target, LEAN_ATTR, None)
    if state is None:
        state = LeanState()
        object.__setattr__(target, LEAN_ATTR, state)
    return state


# ------------------------------------------------------------------ switches


def set_lean(model: nn.Module, on: bool = True, pack: bool = True) -> LeanState:
    """Turn the memory-lean training mode on or off (off = stock modules, bit for bit). ``pack=False`` keeps
    the lean modules but runs the layers on padded batches (bitfit.fast.packing changes how dropout's draws fall
    on tokens, so the lean modules alone are bit-identical to stock under a seed; with packing the same
    holds up to rounding without dropout)."""
    from ..core.prepare import get_state, unwrap

    target = unwrap(model)
    lean = _lean_state(target)
    if on:
        names = []
        for name, module in target.named_modules():
            if type(module) is nn.Dropout:
                module.__class__ = LeanDropout
                names.append(name)
            elif type(module) is LeanDropout:
                names.append(name)
        lean.dropouts = names
        impl = attention_applies(target)
        lean.attention = impl is not None
        lean.attn_impl = impl
        lean.mlps = _set_lean_mlps(target, True)
        packing.remove(target)
        lean.pack = bool(pack and lean.attention and packing.install(target))
        lean.lean = True
        _install_forward(target)
    else:
        for module in target.modules():
            if type(module) is LeanDropout:
                module.__class__ = nn.Dropout
        _set_lean_mlps(target, False)
        packing.remove(target)
        lean.lean, lean.dropouts, lean.attention, lean.mlps, lean.pack = False, [], False, [], False
    state = get_state(target)
    if state is not None and hasattr(state.config, "lean"):
        state.config.lean = bool(on)
    return lean


def finish_apply(target: nn.Module, cfg) -> None:
    """Called at the end of ``bitfit.apply``: frozen dtype and lean mode as the config says.
    ``frozen_dtype="auto"`` is resolved here (bitfit.fast.hardware) and the config records the result, so
    an artifact saved from this model reloads in the same precision on any machine."""
    auto = None
    if cfg.frozen_dtype == "auto":
        from .hardware import choose_frozen_dtype

        try:
            device = next(p.device for p in target.parameters())
        except StopIteration:
            device = torch.device("cpu")
        auto = choose_frozen_dtype(device)
        cfg.frozen_dtype = auto.frozen_dtype
        _lean_state(target).auto = auto
    if cfg.frozen_dtype is not None:
        cast_frozen(target, cfg.frozen_dtype)
    if getattr(cfg, "lean", False):
        set_lean(target, True)


def remove(model: nn.Module) -> None:
    """Undo what ``finish_apply`` installed (lean modules, the instance forward, the lean state).

    Weights cast by ``frozen_dtype`` keep that dtype."""
    from ..core.prepare import unwrap

    target = unwrap(model)
    if target.__dict__.get(LEAN_ATTR) is None:
        return
    set_lean(target, False)
    drop_int8(target)
    int8_fbgemm.drop_fbgemm(target)
    if isinstance(target.__dict__.get("forward"), _Forward):
        del target.__dict__["forward"]
    object.__delattr__(target, LEAN_ATTR)


def saved_activation_bytes(fn, params=()):
    """``(bytes, fn())``: bytes of the distinct storages autograd saves while ``fn()`` runs.

    Storages of ``params`` (the model's weights, which backward reads but nobody allocates for
    it) are not counted.
    """
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip and ptr not in seen:
                seen[ptr] = t.untyped_storage().nbytes()
        except Exception:  # pragma: no cover
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(seen.values()), result


def _modes(model: nn.Module) -> list:
    lean = get_lean(model)
    return lean.describe() if lean is not None else []


prepare.register_finisher(finish_apply)
report.MODE_READERS.append(_modes)
