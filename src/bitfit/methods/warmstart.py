"""Head warm start: fit the task head's output layer on the frozen model's features before BitFit
trains (a linear probe, then bias tuning: the LP-FT recipe of Kumar et al., ICLR 2022).

A randomly initialised head on a frozen body is what stalls BitFit's first epochs: the biases get
gradients through a head that points nowhere, and small tasks (CoLA, RTE) sit at the majority
class for several epochs. One inference pass over (at most ``max_rows`` of) the training rows
gives the features that enter the head's last ``nn.Linear``; a regularised logistic regression
(classification) or ridge regression (regression) on them sets that layer's weight and bias.
Only the head changes; every other tensor is left bit-identical.

    from bitfit.methods.warmstart import warm_start_head
    info = warm_start_head(model, train_dataset, collator, regression=False)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import BitFitError


@dataclass
class WarmStart:
    """What :func:`warm_start_head` did."""

    layer: str  # the head Linear that was fitted
    rows: int  # training rows whose features were used
    train_score: float  # accuracy (classification) or Pearson r (regression) of the probe on those rows
    seconds: float

    def to_dict(self) -> dict:
        return dict(layer=self.layer, rows=self.rows, train_score=self.train_score, seconds=self.seconds)


def head_output_layer(model: nn.Module) -> Optional[tuple[str, nn.Linear]]:
    """(name, module) of the last ``nn.Linear`` of the trained task head, or None (no head / LM head)."""
    from ..core.prepare import get_state, unwrap

    model = unwrap(model)
    state = get_state(model)
    if state is None or not state.selection.head_params:
        return None
    heads = {n.split(".")[0] for n in state.selection.head_params}
    found = None
    for name, module in model.named_modules():
        if name.split(".")[0] in heads and isinstance(module, nn.Linear):
            found = (name, module)
    return found


@torch.no_grad()
def _features(model, layer: nn.Linear, loader, device, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []

    def hook(_m, args):
        feats.append(args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu())

    handle = layer.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm

        for batch in tqdm(loader, desc="head warm start", leave=False, disable=not progress or len(loader) < 10,
                          file=sys.stderr):
            labels.append(batch.pop("labels"))
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        handle.remove()
        model.train(was_training)
    x = torch.cat(feats)
    y = torch.cat(labels)
    if x.shape[0] != y.shape[0]:
        raise BitFitError(f"head warm start: the head saw {x.shape[0]} feature rows for {y.shape[0]} labels "
                          "(a head that pools per token is not supported); drop --warm_start_head")
    return x, y


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, bias: bool, iters: int = 100):
    """Multinomial logistic regression (mean cross-entropy + l2/2 |W|^2) by L-BFGS, in float64."""
    x, y = x.double(), y.long()
    w = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=bias)
    opt = torch.optim.LBFGS([w, b] if bias else [w], lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    acc = float(((x @ w.T + b).argmax(-1) == y).double().mean())
    return w, b, acc


def _fit_ridge(x: torch.Tensor, y: torch.Tensor, l2: float, bias: bool):
    """Ridge regression (mean squared error + l2 |w|^2), closed form in float64."""
    x, y = x.double(), y.double().reshape(-1)
    mx = x.mean(0) if bias else torch.zeros(x.shape[1], dtype=torch.float64)
    my = y.mean() if bias else torch.zeros((), dtype=torch.float64)
    xc, yc = x - mx, y - my
    n = x.shape[0]
    a = xc.T @ xc / n + l2 * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(a, xc.T @ yc / n)
    b = my - mx @ w
    pred = x @ w + b
    r = float(torch.corrcoef(torch.stack([pred, y]))[0, 1]) if n > 1 else float("nan")
    return w.reshape(1, -1), b.reshape(1), r


def warm_start_head(model: nn.Module, dataset, collator, *, regression: bool, batch_size: int = 64,
                    max_rows: int = 20000, l2: float = 1e-3, seed: int = 0,
                    progress: bool = True) -> Optional[WarmStart]:
    """Fit the output Linear of ``model``'s task head on the frozen features of ``dataset`` (rows with
    ``labels``). Returns None (and changes nothing) when the model has no trained task head."""
    import time

    found = head_output_layer(model)
    if found is None:
        return None
    name, layer = found
    t0 = time.time()
    n = len(dataset)
    rows = list(range(n))
    if n > max_rows:
        rows = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].tolist())
    sub = torch.utils.data.Subset(dataset, rows)
    loader = torch.utils.data.DataLoader(sub, batch_size=batch_size, collate_fn=collator)
    device = layer.weight.device
    x, y = _features(model, layer, loader, device, progress)
    if not torch.isfinite(x).all():
        raise BitFitError("head warm start: the frozen model produced non-finite features; check the base model")
    has_bias = layer.bias is not None
    if regression:
        if layer.out_features != 1:
            return None
        w, b, score = _fit_ridge(x, y, l2, has_bias)
    else:
        classes = layer.out_features
        if y.min() < 0 or y.max() >= classes:
            raise BitFitError(f"head warm start: labels outside 0..{classes - 1} for a {classes}-way head")
        w, b, score = _fit_logistic(x, y, classes, l2, has_bias)
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise BitFitError("head warm start: the probe did not converge to finite weights; "
                          "drop --warm_start_head")
    with torch.no_grad():
        layer.weight.copy_(w.to(layer.weight.dtype))
        if has_bias:
            layer.bias.copy_(b.to(layer.bias.dtype))
    return WarmStart(layer=name, rows=len(rows), train_score=score if not math.isnan(score) else 0.0,
                     seconds=time.time() - t0)
