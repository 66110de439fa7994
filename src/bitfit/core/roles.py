"""What each bias *is*: roles assigned from the module a bias sits in, per model family.

A bias is recognised by its module (class and position in the model), never by a
``"bias" in name`` substring, which would also catch ``relative_attention_bias`` embeddings,
``final_logits_bias`` buffers and similar.

Every bias-capable module of the transformer stack (Linear, GPT-2 Conv1D, LayerNorm/RMSNorm,
patch Conv) becomes a :class:`BiasSlot`, whether or not it has a bias yet; slots without a
bias can be given a zero one by ``add_missing``. A fused q/k/v bias is one slot with several
roles, each owning an index set into the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .config import HEAD
from .sharded import full_shape

try:  # transformers' GPT-2 style Conv1D (weight is [in, out])
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

# Families whose every bias we map to a named role (tested). Anything else uses the same
# generic rules and reports what it could not place as role "other".
KNOWN_FAMILIES = {
    "bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "mpnet", "gpt2",
    "bloom", "opt", "qwen2", "llama", "mistral", "t5", "mt5", "bart", "mbart", "vit",
    "clip", "clip_text_model", "clip_vision_model",
}
# Under softmax attention with position information outside the keys (absolute, ALiBi, T5
# relative), b_k gets no gradient: it adds the same constant q.b_k to every score of a row,
# which the softmax ignores. Rotary embeddings rotate b_k per position, so there it does train.
SOFTMAX_ATTENTION_ROLES = ("key", "cross_key")

# Top-level children that are language-model heads (huge, usually tied): never a task head.
LM_HEAD_NAMES = {
    "lm_head", "cls", "generator_lm_head", "generator_predictions", "lm_loss", "predictions",
    "vocab_projector", "vocab_transform", "vocab_layer_norm", "output_projection",
}

# Pretrained maps into a dual encoder's shared space (CLIP*WithProjection): part of the body, never a task head.
PROJECTION_NAMES = {"visual_projection", "text_projection"}
# Task heads recognised by name where the model has no ``base_model_prefix`` body (CLIPForImageClassification).
TASK_HEAD_NAMES = {"classifier", "score", "qa_outputs", "classification_head"}

LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")
STACK_RE = re.compile(r"(?:^|\.)(encoder|decoder)(?:\.|$)")
# The towers of a dual encoder (CLIP): each is a stack of its own ("text.0", "vision.0" in reports).
TOWER_RE = re.compile(r"(?:^|\.)(text|vision)_model(?:\.|$)")
# Top-level scalars of a contrastive dual encoder (CLIP's temperature; SigLIP's logit bias): the "head"
# of a zero-shot classifier, whose classes are text prompts through the text tower (bitfit.methods.clip).
SCALAR_HEADS = ("logit_scale", "logit_bias")

_CROSS = r"(?:crossattention|EncDecAttention|encoder_attn|cross_attn|cross_attention)"
_ATTN = r"(?:self_attention|attention|attn|self_attn|SelfAttention|mixer)"

# Rules for modules inside a numbered layer, matched against the path *after* "layer.N.".
# First match wins. A role string, or a fused-layout name handled by _fused_indices.
_IN_LAYER_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(rf"(?:^|\.){_CROSS}\.(?:self\.)?(?:query|q_proj|q|q_lin|q_attn)$"), "cross_query"),
    (re.compile(rf"(?:^|\.){_CROSS}\.(?:self\.)?(?:key|k_proj|k|k_lin)$"), "cross_key"),
    (re.compile(rf"(?:^|\.){_CROSS}\.(?:self\.)?(?:value|v_proj|v|v_lin)$"), "cross_value"),
    (re.compile(rf"(?:^|\.){_CROSS}\.c_attn$"), "@kv"),
    (re.compile(rf"(?:^|\.){_CROSS}\.(?:output\.dense|o|o_proj|out_proj|c_proj|dense|out_lin)$"), "cross_out"),
    (re.compile(r"(?:^|\.)(?:encoder_attn_layer_norm|ln_cross_attn|crossattention\.output\.LayerNorm)$"), "ln_cross"),
    (re.compile(r"(?:^|\.)(?:query|q_proj|q|q_lin|wq|query_proj)$"), "query"),
    (re.compile(r"(?:^|\.)(?:key|k_proj|k|k_lin|wk|key_proj)$"), "key"),
    (re.compile(r"(?:^|\.)(?:value|v_proj|v|v_lin|wv|value_proj)$"), "value"),
    (re.compile(r"(?:^|\.)c_attn$"), "@qkv"),
    (re.compile(r"(?:^|\.)query_key_value$"), "@qkv_heads"),
    (re.compile(r"(?:^|\.)(?:qkv_proj|Wqkv|qkv)$"), "@qkv"),
    (
        re.compile(
            rf"(?:^|\.)attention\.output\.dense$|(?:^|\.){_ATTN}\.(?:dense|o|o_proj|out_proj|c_proj|out_lin|wo)$"
            r"|(?:^|\.)(?:o_proj|out_proj|out_lin)$"
        ),
        "attn_out",
    ),
    (
        re.compile(
            r"(?:^|\.)(?:attention\.output\.LayerNorm|attention\.LayerNorm|sa_layer_norm|ln_1|input_layernorm"
            r"|self_attn_layer_norm|layernorm_before|attention_norm|norm1|layer_norm1)$"
        ),
        "ln_attn",
    ),
    (
        re.compile(
            r"(?:^|\.)(?:intermediate\.dense|fc1|lin1|c_fc|dense_h_to_4h|wi|wi_0|wi_1|gate_proj|up_proj"
            r"|gate_up_proj|w1|w3|fc_in)$"
        ),
        "ffn_in",
    ),
    (re.compile(r"(?:^|\.)(?:output\.dense|fc2|lin2|mlp\.c_proj|dense_4h_to_h|wo|down_proj|w2|fc_out)$"), "ffn_out"),
    (
        re.compile(
            r"(?:^|\.)(?:output\.LayerNorm|output_layer_norm|ln_2|post_attention_layernorm|final_layer_norm"
            r"|layernorm_after|ffn_norm|norm2|layer_norm2)$"
        ),
        "ln_ffn",
    ),
    (re.compile(r"(?:^|\.)(?:layer_norm|LayerNorm|norm)$"), "@norm_by_parent"),
]

_MODEL_RULES: list[tuple[re.Pattern, str]] = [
    (
        re.compile(
            r"(?:^|\.)(?:embeddings\.LayerNorm|word_embeddings_layernorm|layernorm_embedding|embeddings\.layer_norm"
            r"|emb_ln|embeddings\.norm|pre_layrnorm|pre_layernorm)$"
        ),
        "embed_ln",
    ),
    (
        re.compile(r"(?:^|\.)(?:embeddings_project|project_in|project_out|patch_embeddings\.projection|embed_proj"
                   r"|embeddings\.patch_embedding)$"),
        "embed_proj",
    ),
    (re.compile(r"(?:^|\.)pooler\.dense$"), "pooler"),
    (re.compile(r"(?:^|\.)(?:ln_f|norm|final_layer_norm|layernorm|layer_norm|final_layernorm|post_layernorm)$"),
     "final_ln"),
    # CLIP's projections into the shared embedding space: bias-free Linears (a bias only with add_missing)
    (re.compile(r"^(?:visual_projection|text_projection)$"), "projection"),
]


@dataclass
class BiasSlot:
    """One place a bias lives (or could live): a module's ``bias`` parameter."""

    module_name: str
    kind: str  # "linear" | "conv1d" | "layernorm" | "norm" | "conv" | "param"
    size: int
    roles: dict  # role -> LongTensor of indices into the bias, or None for the whole tensor
    layer: Optional[int] = None
    stack: Optional[str] = None
    exists: bool = True
    has_weight: bool = False  # a norm module with a 1-D gain parameter of the bias's size (train_norm_weights)

    @property
    def name(self) -> str:
        return f"{self.module_name}.bias" if self.module_name else "bias"

    @property
    def layer_key(self) -> Optional[str]:
        if self.layer is None:
            return None
        return f"{self.stack}.{self.layer}" if self.stack else str(self.layer)

    @property
    def fused(self) -> bool:
        return len(self.roles) > 1

    def indices(self, roles) -> Optional[torch.Tensor]:
        """Index set covering ``roles`` of this slot; None if that is the whole tensor."""
        roles = [r for r in self.roles if r in roles]
        if len(roles) == len(self.roles):
            return None
        idx = torch.cat([self.roles[r] for r in roles]) if roles else torch.empty(0, dtype=torch.long)
        return torch.sort(idx).values

    def role_size(self, role: str) -> int:
        idx = self.roles[role]
        return self.size if idx is None else int(idx.numel())


@dataclass
class ModelMap:
    """All bias slots of a model, its head parameters, and facts the report needs."""

    family: str
    slots: list[BiasSlot]
    head_params: list[str]
    n_layers: dict  # stack (or None) -> number of layers
    generic: bool = False
    tied_head: list[str] = field(default_factory=list)
    rotary: bool = False  # rotary position embeddings: b_k does receive a gradient
    pooler_head: Optional[str] = None  # path of an untrained pooler trained as part of the head

    @property
    def zero_grad_roles(self) -> tuple:
        return () if self.rotary else SOFTMAX_ATTENTION_ROLES

    def slot(self, name: str) -> BiasSlot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)


# ----------------------------------------------------------------------------------- discovery
def _norm_like(module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return True
    name = type(module).__name__
    w = getattr(module, "weight", None)
    return ("Norm" in name) and isinstance(w, nn.Parameter) and w.dim() == 1


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if _norm_like(module):
        return "norm"
    if isinstance(getattr(module, "bias", None), nn.Parameter) and not isinstance(module, nn.Embedding):
        return "param"
    return None


def _out_size(module: nn.Module, kind: str) -> int:
    b = getattr(module, "bias", None)
    if isinstance(b, torch.Tensor):
        return full_shape(b)[0]  # a ZeRO-3 partitioned bias reads shape (0,): its ds_shape is the real one
    if kind == "linear":
        return module.out_features
    if kind == "conv1d":
        return module.nf
    if kind == "conv":
        return module.out_channels
    return full_shape(module.weight)[0]


def _heads(config, size: int, n_parts: int = 3) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) for a fused projection of ``size`` outputs."""
    nh = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    nkv = getattr(config, "num_key_value_heads", None) or nh
    hd = getattr(config, "head_dim", None)
    if not hd:
        hd = size // (nh + 2 * nkv)
    if nh * hd + 2 * nkv * hd != size:  # fall back to equal parts
        return 1, 1, size // n_parts
    return nh, nkv, hd


def _fused_indices(layout: str, size: int, config, cross: bool = False) -> dict:
    ar = torch.arange(size)
    if layout == "@kv":
        half = size // 2
        return {"cross_key": ar[:half], "cross_value": ar[half:]}
    if layout == "@qkv_heads":  # [heads, 3, head_dim] (BLOOM, GPT-NeoX)
        nh, _, hd = _heads(config, size)
        if nh * 3 * hd != size:
            nh, hd = 1, size // 3
        grid = ar.view(nh, 3, hd)
        return {"query": grid[:, 0].reshape(-1), "key": grid[:, 1].reshape(-1), "value": grid[:, 2].reshape(-1)}
    nh, nkv, hd = _heads(config, size)
    q = nh * hd
    kv = nkv * hd
    return {"query": ar[:q], "key": ar[q : q + kv], "value": ar[q + kv :]}


def _norm_role_from_parent(parent_cls: str) -> str:
    if "Cross" in parent_cls:
        return "ln_cross"
    if any(t in parent_cls for t in ("FF", "MLP", "Feed", "Mlp")):
        return "ln_ffn"
    if "Attention" in parent_cls:
        return "ln_attn"
    return "other"


def _classify(path: str, in_layer_path: Optional[str], parent_cls: str) -> str:
    if in_layer_path is not None:
        for rx, role in _IN_LAYER_RULES:
            if rx.search(in_layer_path):
                if role == "@norm_by_parent":
                    return _norm_role_from_parent(parent_cls)
                return role
        return "other"
    for rx, role in _MODEL_RULES:
        if rx.search(path):
            return role
    return "other"


def untrained_pooler(model: nn.Module) -> Optional[str]:
    """Path of a pooler the checkpoint never trained (``"bert.pooler"``), else None.

    BERT-style sequence classifiers put a pooler (dense + tanh over the first token) between the body
    and the classifier. Checkpoints trained without it (sentence-transformers models such as
    all-MiniLM-L6-v2 or all-mpnet-base-v2, which pool by mean) still ship one at its initial values:
    a random matrix and an all-zero bias. Frozen, that random projection sits in front of the head;
    trained biases cannot undo it. A bias that is exactly zero in every entry is the sign: training
    never leaves one there.
    """
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model:
        return None
    pooler = getattr(base, "pooler", None)
    dense = getattr(pooler, "dense", None) if isinstance(pooler, nn.Module) else None
    if not isinstance(dense, nn.Linear) or not isinstance(dense.bias, torch.Tensor):
        return None
    if dense.bias.is_meta or dense.weight.is_meta:
        return None
    with torch.no_grad():
        if bool(dense.bias.count_nonzero()) or not bool(dense.weight.count_nonzero()):
            return None
    return f"{prefix}.pooler"


def head_module_names(model: nn.Module, pooler_head: bool = True) -> tuple[list[str], list[str]]:
    """Modules that form the task head (top-level children, plus an untrained pooler's path when
    ``pooler_head``, see :func:`untrained_pooler`), and LM heads that never train."""
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if not isinstance(base, nn.Module) or base is model:
        children = [n for n, c in model.named_children() if any(True for _ in c.parameters())]
        heads = [n for n in children if n in TASK_HEAD_NAMES] if len(children) > 1 else []
        return heads, [n for n in children if n in LM_HEAD_NAMES]
    heads, lm = [], []
    try:
        emb = model.get_input_embeddings()
        emb_ptr = emb.weight.data_ptr() if emb is not None else None
    except Exception:
        emb_ptr = None
    for name, child in model.named_children():
        if name == prefix:
            continue
        tied = any(p.data_ptr() == emb_ptr for p in child.parameters()) if emb_ptr else False
        if name in PROJECTION_NAMES:
            continue
        if name in LM_HEAD_NAMES or tied:
            lm.append(name)
        elif any(True for _ in child.parameters()):
            heads.append(name)
    if heads and pooler_head:
        pooler = untrained_pooler(model)
        if pooler is not None:
            heads.append(pooler)
    return heads, lm


def discover(model: nn.Module, pooler_head: bool = True) -> ModelMap:
    """Find every bias slot of ``model`` and give it a role.

    ``pooler_head``: a pooler the checkpoint never trained (:func:`untrained_pooler`) belongs to the task
    head (its weight and bias are head parameters); False keeps it in the body (its bias a slot).
    """
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None) or type(model).__name__
    enc_dec = bool(getattr(config, "is_encoder_decoder", False))
    heads, lm_heads = head_module_names(model, pooler_head)
    skip_prefixes = tuple(f"{h}." for h in heads + lm_heads)
    head_params = [n for n, _ in model.named_parameters() if n.startswith(tuple(f"{h}." for h in heads))]
    head_params += [n for n, _ in model.named_parameters(recurse=False) if n in SCALAR_HEADS]

    modules = dict(model.named_modules())
    slots: list[BiasSlot] = []
    n_layers: dict = {}
    for name, module in modules.items():
        if not name or name.startswith(skip_prefixes) or name in heads or name in lm_heads:
            continue
        kind = _kind(module)
        if kind is None:
            continue
        bias = getattr(module, "bias", None)
        exists = isinstance(bias, torch.Tensor)
        if exists and not isinstance(bias, nn.Parameter):  # a buffer (e.g. a causal mask): not ours
            continue
        m = LAYER_RE.search(name)
        layer = int(m.group(1)) if m else None
        in_layer = name[m.end() :] if m else None
        stack = None
        if enc_dec:
            s = STACK_RE.search(name)
            stack = s.group(1) if s else None
        else:
            s = TOWER_RE.search(name)
            stack = s.group(1) if s else None
        parent_cls = type(modules.get(name.rsplit(".", 1)[0], model)).__name__ if "." in name else ""
        role = _classify(name, in_layer, parent_cls)
        if role == "other" and not exists:
            continue  # nothing to train and nothing we know how to add a bias to
        if role == "other" and kind == "param" and not exists:
            continue
        size = _out_size(module, kind)
        if role.startswith("@"):
            roles = _fused_indices(role, size, config)
        else:
            roles = {role: None}
        w = getattr(module, "weight", None)
        has_weight = kind in ("layernorm", "norm") and isinstance(w, nn.Parameter) and full_shape(w) == (size,)
        slots.append(BiasSlot(name, kind, size, roles, layer, stack, exists, has_weight))
        if layer is not None:
            n_layers[stack] = max(n_layers.get(stack, 0), layer + 1)
    generic = family not in KNOWN_FAMILIES
    rotary = any("Rotary" in type(m).__name__ or "RoPE" in type(m).__name__ for m in modules.values())
    pooler = next((h for h in heads if "." in h), None)
    return ModelMap(family, slots, head_params, n_layers, generic, lm_heads, rotary, pooler)


def roles_of(model_map: ModelMap) -> dict:
    """role -> total bias parameters of that role in the model (existing biases only)."""
    out: dict = {}
    for s in model_map.slots:
        if not s.exists:
            continue
        for r in s.roles:
            out[r] = out.get(r, 0) + s.role_size(r)
    return out


__all__ = ["BiasSlot", "ModelMap", "discover", "roles_of", "head_module_names", "untrained_pooler", "HEAD", "KNOWN_FAMILIES",
           "SCALAR_HEADS"]


def module_family(module) -> str:
    """The transformers family a module's class comes from (``modeling_bert`` -> ``"bert"``)."""
    mod = type(module).__module__
    return mod.rsplit(".", 1)[-1].removeprefix("modeling_")
