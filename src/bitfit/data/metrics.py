"""The official GLUE metrics, computed with scikit-learn and SciPy.

Names follow the GLUE / ``evaluate`` convention: ``matthews_correlation`` (CoLA), ``accuracy``,
``f1`` (MRPC, QQP: binary F1 of the positive class 1), ``pearson`` and ``spearmanr`` (STS-B).
Tasks with two metrics also get ``combined_score`` (their mean), the score the best checkpoint
is chosen by, as in transformers' ``run_glue.py``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DataError

METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
}


def primary_metric(task: str) -> str:
    """The metric the best checkpoint is chosen by (``combined_score`` where a task has two)."""
    names = METRICS.get(task, ("accuracy",))
    return names[0] if len(names) == 1 else "combined_score"


def _fnum(x) -> float:
    x = float(x)
    return 0.0 if np.isnan(x) else x


def compute(names: Sequence[str], predictions, references) -> dict[str, float]:
    """Compute the metrics ``names`` of predictions (class ids or floats) against references."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    preds = np.asarray(predictions)
    refs = np.asarray(references)
    if preds.shape != refs.shape:
        raise DataError(f"{len(preds)} predictions for {len(refs)} references")
    if len(refs) == 0:
        raise DataError("cannot compute metrics on an empty evaluation set")
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(accuracy_score(refs, preds))
        elif name == "f1":
            out[name] = float(f1_score(refs, preds, pos_label=1, average="binary", zero_division=0.0))
        elif name == "matthews_correlation":
            out[name] = _fnum(matthews_corrcoef(refs, preds))
        elif name == "pearson":
            out[name] = _fnum(pearsonr(preds.astype(float), refs.astype(float))[0]) if np.std(preds) > 0 else 0.0
        elif name == "spearmanr":
            out[name] = _fnum(spearmanr(preds, refs)[0]) if np.std(preds) > 0 else 0.0
        elif name == "mse":
            out[name] = float(np.mean((preds.astype(float) - refs.astype(float)) ** 2))
        else:
            raise DataError(f"unknown metric {name!r}")
    if len(out) > 1:
        out["combined_score"] = float(np.mean(list(out.values())))
    return out


def glue_metrics(task: str, predictions, references) -> dict[str, float]:
    """The official metric(s) of GLUE ``task`` (``cola``, ``sst2``, ... ``mnli``)."""
    if task not in METRICS:
        raise DataError(f"unknown GLUE task {task!r}; choose one of: {', '.join(METRICS)}")
    return compute(METRICS[task], predictions, references)


def classification_metrics(predictions, references, num_labels: int, pos_label: int = 1) -> dict[str, float]:
    """Metrics for a user's own classification data: accuracy, plus macro F1 when more than 2 labels
    and binary F1 (of class id ``pos_label``) for 2."""
    from sklearn.metrics import f1_score

    out = compute(("accuracy",), predictions, references)
    if num_labels == 2:
        out["f1"] = float(f1_score(references, predictions, pos_label=pos_label, average="binary",
                                   zero_division=0.0))
    else:
        out["macro_f1"] = float(f1_score(references, predictions, average="macro", zero_division=0.0))
    return out


def regression_metrics(predictions, references) -> dict[str, float]:
    out = compute(("pearson", "spearmanr"), predictions, references)
    out.pop("combined_score", None)
    out["mse"] = float(np.mean((np.asarray(predictions, float) - np.asarray(references, float)) ** 2))
    return out
