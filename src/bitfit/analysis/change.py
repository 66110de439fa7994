"""Which biases move: the paper's bias-change figure, and gradient magnitudes, per role and layer.

Change of a role in a layer is the paper's ``(1/dim) * ||b0 - bf||_1`` (mean absolute change;
a role spread over several tensors of one layer pools them). It comes straight from a BitFit
artifact, which stores each trained bias as its difference from the base (no base weights
needed: the model's layout is rebuilt from the stored config on the meta device), or from two
models in memory (``change_table(model_map, before, after)``), which also works for full
fine-tuning.

Gradient magnitude is the mean absolute gradient per scalar of the role. ``bitfit compare``
records it during training (:class:`GradRecorder`: a hook per trainable bias tensor, summed
over every backward pass, divided by their number). ``bitfit analyze --task`` measures it
instead on a few batches of the task's training data through the trained model
(:func:`measure_gradients`). Under softmax attention b_k receives no gradient (it adds the
same q.b_k to every score of a row, which the softmax cancels), so b_k's gradient is ~0 and it
barely moves (rounding noise amplified by Adam, weight decay); with rotary position embeddings it does train
(``ModelMap.zero_grad_roles``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from ..core.config import LAYER_ROLES, PAPER_NAMES, ROLES
from ..errors import ArtifactError, BitFitError
from ..core.io import atomic_write_text
from ..core.roles import ModelMap, discover

FIELDS = ("role", "paper", "layer", "dim", "value")


# ----------------------------------------------------------------------------- tables
def _add(acc: dict, role: str, layer, values: torch.Tensor) -> None:
    key = (role, layer)
    l1, n = acc.get(key, (0.0, 0))
    acc[key] = (l1 + float(values.abs().sum()), n + int(values.numel()))


def _rows(acc: dict) -> list[dict]:
    order = {r: i for i, r in enumerate(ROLES)}
    rows = [
        {"role": r, "paper": PAPER_NAMES.get(r, ""), "layer": "" if layer is None else layer, "dim": n,
         "value": l1 / n if n else float("nan")}
        for (r, layer), (l1, n) in acc.items()
    ]
    return sorted(rows, key=lambda d: (order.get(d["role"], 99), _layer_sort(d["layer"])))


def _layer_sort(layer) -> tuple:
    s = str(layer)
    if s == "":
        return (2, "", -1)
    stack, _, num = s.rpartition(".")
    return (0 if stack in ("", "encoder") else 1, stack, int(num) if num.isdigit() else -1)


def change_table(model_map: ModelMap, before: dict, after: dict) -> list[dict]:
    """Rows (role, paper, layer, dim, value=mean |after - before|) over the slots in both dicts."""
    acc: dict = {}
    for slot in model_map.slots:
        if slot.name not in before or slot.name not in after:
            continue
        diff = after[slot.name].detach().float().cpu() - before[slot.name].detach().float().cpu()
        for role, idx in slot.roles.items():
            _add(acc, role, slot.layer_key, diff if idx is None else diff[idx])
    return _rows(acc)


def snapshot_biases(model: nn.Module, model_map: Optional[ModelMap] = None) -> dict:
    """slot name -> copy of the effective bias (parametrized or plain) for every existing bias."""
    from ..core.prepare import bias_tensor, get_state

    state = get_state(model)
    mm = model_map or (state.model_map if state else discover(model))
    added = set(state.added) if state else set()
    out = {}
    for s in mm.slots:
        if s.exists or s.name in added:
            try:
                b = bias_tensor(model, s.name)
            except AttributeError:
                continue
            if isinstance(b, torch.Tensor):
                out[s.name] = b.detach().float().cpu().clone()
    return out


def _meta_model(meta: dict) -> nn.Module:
    """The artifact's architecture built from its stored config on the meta device (no weights)."""
    import transformers

    base = meta["base_model"]
    arch = base.get("architecture") or ""
    cfg = dict(base.get("config") or {})
    model_type = cfg.pop("model_type", None) or base.get("model_type")
    if not model_type:
        raise ArtifactError("the artifact's config has no model_type; pass --base to analyze it")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    cls = getattr(transformers, arch, None)
    with torch.device("meta"):
        if cls is not None and hasattr(cls, "_from_config"):
            return cls._from_config(config)
        return transformers.AutoModel.from_config(config)


def _base_values(art, base, path) -> dict:
    """Slot name (as the artifact names it) -> the base's bias (float32) for every slot the artifact stores as
    its trained value rather than its change (``"encoding": "value"``; added biases start at zero and need none)."""
    from ..artifacts import fingerprint, locate

    meta = art.meta
    added = set(meta.get("added") or [])
    wanted = [n for n, s in meta["slots"].items() if s.get("encoding") == "value" and n not in added]
    if not wanted:
        return {}
    if base is None:
        base = meta["base_model"].get("name")
    if base is None or base == "":
        raise ArtifactError(
            f"{path}: {len(wanted)} bias slots are stored as their trained values, and their change needs the base "
            "model's values, but the artifact does not name its base: pass base= (bitfit analyze --base MODEL)"
        )
    if isinstance(base, (str, Path)):
        from ..core.models import load_model, quiet_loading

        try:
            with quiet_loading():
                base = load_model(str(base), task="base")
        except BitFitError as exc:
            raise ArtifactError(
                f"{path}: {len(wanted)} bias slots are stored as their trained values; loading the base model to "
                f"compute their change failed ({exc}); pass base= (bitfit analyze --base MODEL)"
            ) from None
    want_fp = meta["base_model"].get("fingerprint")
    if want_fp and fingerprint(base) != want_fp:
        raise ArtifactError(f"{path}: the given base model is not the one this artifact was trained on (its frozen "
                            "weights differ): pass the run's own base model")
    prefix = meta.get("prefix") or meta["base_model"].get("prefix") or ""
    params = dict(base.named_parameters())
    out = {}
    for name in wanted:
        here = locate(base, name, prefix)
        bias = params.get(here) if here else None
        if bias is None:
            raise ArtifactError(f"{path}: bias slot {name} is not in the given base model")
        out[name] = bias.detach().float().reshape(-1).cpu()
    return out


def artifact_change_table(path, model_map: Optional[ModelMap] = None, base=None) -> tuple[list[dict], ModelMap, dict]:
    """Change rows straight from a BitFit artifact, the model map, the meta.

    An artifact stores most slots as their change from the base (``"encoding": "delta"``), which is read as it
    is; a slot stored as its trained value (``"encoding": "value"``, chosen when the change cannot be written
    exactly) is compared with the base model's value: ``base`` (a model, or a name/folder), by default the base
    the artifact names. Its frozen weights must match the artifact's fingerprint."""
    from ..artifacts import read_artifact

    art = read_artifact(path)
    mm = model_map or discover(_meta_model(art.meta))
    base_values = _base_values(art, base, path)
    acc: dict = {}
    for name, s in art.meta["slots"].items():
        try:
            slot = mm.slot(name)
        except KeyError:
            raise ArtifactError(f"artifact slot {name} is not a bias slot of its own architecture") from None
        stored = art.tensors[f"bias:{name}"].float()  # a difference, or a value (an added bias's base is 0)
        sub = None
        if s.get("indices") is not None:
            idx = art.tensors.get(f"entries:{name}")  # sparse BitFit stores its trained indices (the rest: no change)
            sub = slot.indices(s["roles"]) if idx is None else idx
        if name in base_values:
            b = base_values[name]
            stored = stored - (b if sub is None else b[sub])
        if sub is None:
            full = stored
            roles = slot.roles
        else:
            full = torch.full((slot.size,), float("nan") if art.tensors.get(f"entries:{name}") is None else 0.0)
            full[sub] = stored
            roles = {r: slot.roles[r] for r in s["roles"]}
        for role, idx in roles.items():
            _add(acc, role, slot.layer_key, full if idx is None else full[idx])
    return _rows(acc), mm, art.meta


class GradRecorder:
    """Mean |gradient| of every trainable bias, recorded by tensor hooks during training."""

    def __init__(self, model: nn.Module, model_map: Optional[ModelMap] = None):
        from ..core.prepare import get_state, trainable_bias_param

        state = get_state(model)
        self.model_map = model_map or (state.model_map if state else discover(model))
        added = set(state.added) if state else set()
        self.sums: dict = {}
        self.calls: dict = {}
        self.handles = []
        for s in self.model_map.slots:
            if not (s.exists or s.name in added):
                continue
            try:
                p = trainable_bias_param(model, s.name)
            except AttributeError:
                continue
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                continue
            self.sums[s.name] = torch.zeros(p.numel(), dtype=torch.float64)
            self.calls[s.name] = 0
            self.handles.append(p.register_hook(self._hook(s.name)))

    def _hook(self, name):
        def fn(grad):
            self.sums[name] += grad.detach().abs().reshape(-1).double().cpu()
            self.calls[name] += 1

        return fn

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def means(self) -> dict:
        """slot name -> mean |grad| per element over the recorded backward passes."""
        return {n: (s / self.calls[n]).float() for n, s in self.sums.items() if self.calls[n]}

    def table(self, roles_trained: Optional[dict] = None) -> list[dict]:
        return grad_table(self.model_map, self.means(), roles_trained)


def grad_table(model_map: ModelMap, means: dict, roles_trained: Optional[dict] = None) -> list[dict]:
    """Rows of mean |grad| per role and layer; ``roles_trained`` (slot -> roles) limits fused slots."""
    acc: dict = {}
    for slot in model_map.slots:
        g = means.get(slot.name)
        if g is None:
            continue
        roles = roles_trained.get(slot.name, tuple(slot.roles)) if roles_trained else tuple(slot.roles)
        for role in roles:
            idx = slot.roles[role]
            _add(acc, role, slot.layer_key, g if idx is None else g[idx])
    return _rows(acc)


def measure_gradients(model: nn.Module, batches: Iterable[dict], model_map: Optional[ModelMap] = None) -> dict:
    """Mean |grad| of every existing bias over ``batches`` (dicts with labels) through ``model``.

    Bias tensors are made to require grad for the measurement and restored afterwards; nothing
    is updated.
    """
    from ..core.prepare import get_state, trainable_bias_param

    state = get_state(model)
    mm = model_map or (state.model_map if state else discover(model))
    flags = {id(p): p.requires_grad for p in model.parameters()}
    params = {}
    for s in mm.slots:
        if s.exists or (state and s.name in state.added):
            p = trainable_bias_param(model, s.name)
            p.requires_grad_(True)
            params[s.name] = p
    was_training = model.training
    model.eval()  # no dropout: the gradient of the trained model itself
    rec_sums = {n: torch.zeros(p.numel(), dtype=torch.float64) for n, p in params.items()}
    n_batches = 0
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            out = model(**batch)
            if getattr(out, "loss", None) is None:
                raise BitFitError("measure_gradients needs batches with labels (the model returned no loss)")
            out.loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    rec_sums[n] += p.grad.detach().abs().reshape(-1).double().cpu()
            n_batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), False))
        model.train(was_training)
    if not n_batches:
        raise BitFitError("measure_gradients got no batches")
    return {n: (s / n_batches).float() for n, s in rec_sums.items()}


# ----------------------------------------------------------------------------- ranking
def rank(rows: list[dict]) -> dict:
    """Roles and layers ranked by their pooled mean value (largest first)."""

    def pooled(key):
        acc: dict = {}
        for r in rows:
            if r["dim"] and not math.isnan(r["value"]):
                s, n = acc.get(r[key], (0.0, 0))
                acc[r[key]] = (s + r["value"] * r["dim"], n + r["dim"])
        return sorted(((k, s / n) for k, (s, n) in acc.items()), key=lambda kv: -kv[1])

    roles = [{"role": k, "paper": PAPER_NAMES.get(k, ""), "value": v} for k, v in pooled("role")]
    layers = [{"layer": k, "value": v} for k, v in pooled("layer") if k != ""]
    return {"roles": roles, "layers": layers}


def zero_grad_note(model_map: ModelMap) -> str:
    if model_map.zero_grad_roles:
        return (
            "b_k (role 'key') receives no gradient under softmax attention: it adds the same constant q.b_k to "
            "every attention score of a row, which the softmax cancels. Its gradient is zero up to float rounding, so it "
            "barely moves (Adam's normalisation of rounding noise and weight decay are all that move it); "
            "skip_zero_grad=True leaves it out of training."
        )
    return (
        "this model uses rotary position embeddings, which rotate b_k per position, so b_k does receive a "
        "gradient here (unlike under plain softmax attention with absolute/relative positions)."
    )


# ----------------------------------------------------------------------------- output
def write_csv(rows: list[dict], path) -> Path:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIELDS))
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in FIELDS})
    path = Path(path)
    atomic_write_text(path, buf.getvalue())
    return path


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{**r, "dim": int(r["dim"]), "value": float(r["value"])} for r in csv.DictReader(f)]


def grid(rows: list[dict]):
    """(matrix, role labels, layer labels) over the layer roles present, in the paper's order."""
    import numpy as np

    layer_rows = [r for r in rows if r["layer"] != ""]
    roles = [r for r in LAYER_ROLES if any(x["role"] == r for x in layer_rows)]
    layers = sorted({x["layer"] for x in layer_rows}, key=_layer_sort)
    m = np.full((len(roles), len(layers)), np.nan)
    for x in layer_rows:
        if x["role"] in roles:
            m[roles.index(x["role"]), layers.index(x["layer"])] = x["value"]
    labels = [PAPER_NAMES.get(r, r) for r in roles]
    return m, labels, layers


def write_report(out_dir, change_rows: list[dict], grad_rows: Optional[list[dict]], model_map: ModelMap,
                 title: str = "") -> dict:
    """bias_change.csv/.png, bias_grad.csv/.png (when given), ranking.json and ranking.md in ``out_dir``."""
    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"change_csv": str(write_csv(change_rows, out / "bias_change.csv"))}
    m, rl, cl = grid(change_rows)
    if m.size:
        files["change_png"] = plots.heatmap(
            m, rl, cl, str(out / "bias_change.png"), title=f"mean |b0 - bf| per role and layer{title}",
            cbar_label="(1/dim) ||b0 - bf||_1")
    result = {"change": rank(change_rows), "note": zero_grad_note(model_map), "files": files}
    if grad_rows:
        files["grad_csv"] = str(write_csv(grad_rows, out / "bias_grad.csv"))
        gm, grl, gcl = grid(grad_rows)
        if gm.size:
            files["grad_png"] = plots.heatmap(gm, grl, gcl, str(out / "bias_grad.png"),
                                              title=f"mean |grad| per role and layer{title}", cbar_label="mean |grad|")
        result["grad"] = rank(grad_rows)
    atomic_write_text(out / "ranking.json", json.dumps(result, indent=2))
    md = ranking_markdown(result)
    atomic_write_text(out / "ranking.md", md)
    files["ranking"] = str(out / "ranking.md")
    return result


def ranking_markdown(result: dict) -> str:
    lines = []
    for kind, what in (("change", "mean absolute change (1/dim)·||b0 − bf||₁"), ("grad", "mean |gradient|")):
        if kind not in result:
            continue
        r = result[kind]
        lines += [f"### Roles by {what}", "", "| rank | role | paper | value |", "|---:|---|---|---:|"]
        lines += [f"| {i + 1} | {x['role']} | {x['paper']} | {x['value']:.3g} |" for i, x in enumerate(r["roles"])]
        lines += ["", f"### Layers by {what}", "", "| rank | layer | value |", "|---:|---|---:|"]
        lines += [f"| {i + 1} | {x['layer']} | {x['value']:.3g} |" for i, x in enumerate(r["layers"])]
        lines.append("")
    lines.append(f"Note: {result['note']}")
    return "\n".join(lines) + "\n"


def find_artifacts(run_dir) -> list[Path]:
    """Artifact folders (with bitfit_config.json) under ``run_dir``, itself included."""
    from ..artifacts import CONFIG_NAME

    root = Path(run_dir)
    return sorted({p.parent for p in root.rglob(CONFIG_NAME)})


__all__ = [
    "change_table", "snapshot_biases", "artifact_change_table", "GradRecorder", "grad_table", "measure_gradients",
    "rank", "zero_grad_note", "write_csv", "read_csv", "grid", "write_report", "ranking_markdown", "find_artifacts",
]
