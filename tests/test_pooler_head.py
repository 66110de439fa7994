"""An untrained pooler (all-zero bias, as sentence-transformers checkpoints ship BERT's) trains with the head."""

import json
import warnings

import torch
from families import inputs_for, logits_of, make
from test_artifact import train
from test_bank import task_model

import bitfit
from bitfit.artifacts import CONFIG_NAME, fingerprint
from bitfit.serving.bank import BiasBank
from bitfit.core.roles import untrained_pooler


def fresh(seed=0):
    """A tiny BERT classifier whose pooler is as a fresh init leaves it, other biases non-zero."""
    m = make("bert", seed=seed, pretrained_pooler=False)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") and "pooler" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def move(m, seed=3):
    return train(m, seed).eval()


def body_bias_count(m):
    return sum(p.numel() for n, p in m.named_parameters()
               if n.endswith("bias") and not n.startswith(("classifier.", "bert.pooler.")))


def test_detection_needs_an_all_zero_bias_and_a_head():
    m = fresh()
    assert untrained_pooler(m) == "bert.pooler"
    assert untrained_pooler(make("bert")) is None  # pooler bias non-zero: pretrained, stays in the body
    assert untrained_pooler(m.bert) is None  # no task head: nothing to train it with
    for family in ("roberta", "distilbert", "gpt2"):
        assert untrained_pooler(make(family)) is None


def test_exact_counts_with_and_without_the_option():
    m = fresh()
    hidden, n_labels = m.config.hidden_size, m.config.num_labels
    bitfit.apply(m)
    rep = bitfit.report(m)
    head = hidden * n_labels + n_labels + hidden * hidden + hidden
    assert rep.head == head and rep.pooler_head == "bert.pooler"
    assert rep.trainable == body_bias_count(m) + head
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == rep.trainable
    assert "never trained its pooler" in rep.to_markdown()
    assert m.bert.pooler.dense.weight.requires_grad and m.bert.pooler.dense.bias.requires_grad

    old = bitfit.apply(fresh(), pooler_head=False)
    rep = bitfit.report(old)
    assert not old.bert.pooler.dense.weight.requires_grad and old.bert.pooler.dense.bias.requires_grad
    assert rep.head == hidden * n_labels + n_labels and rep.pooler_head is None
    assert rep.trainable == body_bias_count(old) + hidden + rep.head  # the pooler bias is a BitFit bias

    pre = bitfit.apply(make("bert"))  # a pretrained pooler: only its bias trains, as in the paper
    assert not pre.bert.pooler.dense.weight.requires_grad
    assert bitfit.report(pre).head == hidden * n_labels + n_labels


def test_fingerprint_ignores_the_option_and_training():
    base = fresh()
    want = fingerprint(base)
    for kw in ({}, {"pooler_head": False}):
        m = move(bitfit.apply(fresh(), **kw))
        assert fingerprint(m) == want, kw


def test_save_load_merge_exact(tmp_path):
    m = move(bitfit.apply(fresh()))
    want = logits_of(m, "bert")
    bitfit.save(m, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(meta["head"]["params"])
    assert "bert.pooler.dense.bias" not in meta["slots"] and meta["bitfit_config"]["pooler_head"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fingerprint matches the untouched base
        loaded = bitfit.load(fresh(), tmp_path / "a")
    assert torch.equal(logits_of(loaded, "bert"), want)
    merged = bitfit.merge(loaded)
    assert torch.equal(logits_of(merged, "bert"), want)
    assert torch.equal(merged.bert.pooler.dense.weight, m.bert.pooler.dense.weight)


def test_artifact_saved_before_the_option_loads_with_the_pooler_in_the_body(tmp_path):
    m = move(bitfit.apply(fresh(), pooler_head=False))
    want = logits_of(m, "bert")
    bitfit.save(m, tmp_path / "old")
    cfg = tmp_path / "old" / CONFIG_NAME
    meta = json.loads(cfg.read_text())
    del meta["bitfit_config"]["pooler_head"]  # as written by earlier versions
    cfg.write_text(json.dumps(meta))
    loaded = bitfit.load(fresh(), tmp_path / "old")
    assert torch.equal(logits_of(loaded, "bert"), want)
    assert not loaded.bert.pooler.dense.weight.requires_grad


def test_bank_mixes_pooler_head_tasks_with_old_ones(tmp_path):
    base = fresh()
    new = task_model(base, 2, 1)
    old = task_model(base, 2, 2, pooler_head=False)
    bank = BiasBank(fresh(), {"new": new, "old": old})
    inputs = inputs_for("bert", batch=6, seq=5)
    tasks = ["new", "old", "old", "new", "new", "old"]
    out = bank(tasks=tasks, **inputs)
    with torch.no_grad():
        ref = {"new": new(**inputs).logits, "old": old(**inputs).logits}
    for i, t in enumerate(tasks):
        torch.testing.assert_close(out.logits[i], ref[t][i], rtol=1e-6, atol=1e-6)
    single = bank(tasks=["new"] * 6, **inputs)
    torch.testing.assert_close(torch.stack(list(single.logits)), ref["new"], rtol=1e-6, atol=1e-6)
