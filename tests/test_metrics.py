"""Every GLUE task's official metric against values computed by hand."""

import math

import numpy as np
import pytest

from bitfit.data import METRICS, TASKS, glue_metrics, primary_metric
from bitfit.data.metrics import classification_metrics, regression_metrics
from bitfit.errors import DataError
from bitfit.training.tasks import TaskInfo, make_compute_metrics


def test_cola_matthews_by_hand():
    preds, refs = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    # TP=2 TN=1 FP=1 FN=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    out = glue_metrics("cola", preds, refs)
    assert out == {"matthews_correlation": pytest.approx(1 / 6)}
    assert glue_metrics("cola", [1, 1, 1], [1, 0, 1])["matthews_correlation"] == 0.0  # constant prediction


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1_by_hand(task):
    preds = [1, 1, 1, 0, 0, 1, 0, 0]
    refs = [1, 0, 1, 1, 0, 1, 0, 1]
    # TP=3 FP=1 FN=2 TN=2: acc 5/8, precision 3/4, recall 3/5, F1 = 2PR/(P+R) = 2/3
    out = glue_metrics(task, preds, refs)
    assert out["accuracy"] == pytest.approx(5 / 8)
    assert out["f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert out["combined_score"] == pytest.approx((5 / 8 + 2 / 3) / 2)
    assert primary_metric(task) == "combined_score"


def test_stsb_pearson_spearman_by_hand():
    preds, refs = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]
    # deviations (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5): sum of products 4, sums of squares 5 -> 0.8
    out = glue_metrics("stsb", preds, refs)
    assert out["pearson"] == pytest.approx(0.8)
    assert out["spearmanr"] == pytest.approx(0.8)  # same ranks
    # Pearson is not rank based: a monotone but non-linear prediction keeps spearman at 1
    out = glue_metrics("stsb", [1.0, 2.0, 3.0, 100.0], [1.0, 2.0, 3.0, 4.0])
    assert out["spearmanr"] == pytest.approx(1.0)
    x, y = np.array([1.0, 2.0, 3.0, 100.0]), np.array([1.0, 2.0, 3.0, 4.0])
    dx, dy = x - x.mean(), y - y.mean()
    assert out["pearson"] == pytest.approx((dx @ dy) / math.sqrt((dx @ dx) * (dy @ dy)))
    assert out["pearson"] < 0.9


@pytest.mark.parametrize("task", ["sst2", "mnli", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task):
    n = TASKS[task].num_labels
    refs = [i % n for i in range(10)]
    preds = list(refs)
    preds[0] = (preds[0] + 1) % n
    preds[3] = (preds[3] + 1) % n
    assert glue_metrics(task, preds, refs) == {"accuracy": pytest.approx(0.8)}
    assert primary_metric(task) == "accuracy"


def test_registry_covers_glue():
    assert set(METRICS) == set(TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert primary_metric("cola") == "matthews_correlation"
    assert TASKS["stsb"].is_regression and TASKS["mnli"].num_labels == 3


def test_errors():
    with pytest.raises(DataError, match="unknown GLUE task"):
        glue_metrics("squad", [1], [1])
    with pytest.raises(DataError, match="2 predictions for 3"):
        glue_metrics("rte", [1, 0], [1, 0, 1])


def test_own_data_metrics():
    out = classification_metrics([0, 1, 2, 2], [0, 1, 1, 2], 3)
    assert out["accuracy"] == 0.75
    # per-class F1: class0 1, class1 2/3 (P=1,R=.5), class2 2/3 (P=.5,R=1) -> macro 7/9
    assert out["macro_f1"] == pytest.approx(7 / 9)
    r = regression_metrics([1.0, 2.0, 4.0], [1.0, 2.0, 3.0])
    assert r["mse"] == pytest.approx(1 / 3)


def test_compute_metrics_from_logits():
    info = TaskInfo("glue", "mrpc", ["not_equivalent", "equivalent"], False, ["accuracy", "f1"], "combined_score")

    class P:
        predictions = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0], [1.0, 0.0]])
        label_ids = np.array([1, 0, 0, 0])

    out = make_compute_metrics(info)(P)
    assert out["accuracy"] == 0.75 and out["f1"] == pytest.approx(2 / 3)
    reg = TaskInfo("glue", "stsb", [], True, ["pearson", "spearmanr"], "combined_score")

    class R:
        predictions = np.array([[1.0], [2.0], [3.0], [4.0]])
        label_ids = np.array([1.0, 3.0, 2.0, 4.0])

    assert make_compute_metrics(reg)(R)["pearson"] == pytest.approx(0.8)
