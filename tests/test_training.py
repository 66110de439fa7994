"""A few optimisation steps change only the selected tensors (plain loop and transformers.Trainer)."""

import pytest
import torch
import transformers as T
from families import inputs_for, make, train_steps

import bitfit
from bitfit.core.prepare import bias_tensor


def snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def effective_params(model):
    """name -> tensor as the forward sees it (parametrized biases resolved)."""
    out = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            if ".parametrizations." in f"{mname}.{pname}" or mname.endswith("parametrizations.bias"):
                continue
            out[f"{mname}.{pname}" if mname else pname] = getattr(module, pname).detach().clone()
        if hasattr(module, "parametrizations") and "bias" in module.parametrizations:
            out[f"{mname}.bias"] = module.bias.detach().clone()
    return out


@pytest.mark.parametrize("family", ["bert", "gpt2", "bloom", "distilbert"])
def test_plain_loop_changes_only_selected(family):
    model = make(family)
    bitfit.apply(model, preset="all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = effective_params(model)
    train_steps(model, family)
    after = effective_params(model)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # every trainable tensor moved (b_k too: the optimizer's weight decay moves it) and nothing else did
    assert changed == trainable


@pytest.mark.parametrize("family,fused", [("gpt2", "transformer.h.{}.attn.c_attn.bias"),
                                          ("bloom", "transformer.h.{}.self_attention.query_key_value.bias")])
def test_fused_qkv_slice_selection(family, fused):
    model = make(family)
    bitfit.apply(model, preset="paper-subset")  # b_q + b_m2: only the query slice of the fused bias
    slot = bitfit.get_state(model).model_map.slot(fused.format(0))
    q_idx, k_idx, v_idx = slot.roles["query"], slot.roles["key"], slot.roles["value"]
    assert len(q_idx) == len(k_idx) == len(v_idx) == 16
    before = bias_tensor(model, fused.format(0)).detach().clone()
    train_steps(model, family, weight_decay=0.5)  # weight decay must not leak into frozen slices
    after = bias_tensor(model, fused.format(0)).detach()
    assert not torch.equal(before[q_idx], after[q_idx])
    assert torch.equal(before[k_idx], after[k_idx])
    assert torch.equal(before[v_idx], after[v_idx])
    rep = bitfit.report(model)
    assert rep.by_role["query"]["trainable"] == 2 * 16 and rep.by_role["key"]["trainable"] == 0


def test_bloom_slices_are_interleaved_per_head():
    model = make("bloom")
    slot = bitfit.discover(model).slot("transformer.h.0.self_attention.query_key_value.bias")
    # BLOOM lays the fused output out as [heads, 3, head_dim]: 2 heads of 8
    assert slot.roles["query"].tolist() == list(range(0, 8)) + list(range(24, 32))
    assert slot.roles["key"].tolist() == list(range(8, 16)) + list(range(32, 40))


def test_trainer_changes_only_selected(tmp_path):
    model = make("bert")
    bitfit.apply(model, preset="paper-subset")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = snapshot(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (16, 8), generator=g)
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": int(i % 2)}
            for i in range(16)]
    args = T.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    T.Trainer(model=model, args=args, train_dataset=data).train()
    after = snapshot(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable


def test_added_biases_train_and_rest_stays(tmp_path):
    model = make("llama")
    bitfit.apply(model, preset="all", add_missing=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = effective_params(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = inputs_for("llama", batch=2)
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    after = effective_params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # every added bias moved, b_k too: rotary embeddings rotate it per position, so it gets a gradient
    assert changed == trainable
    assert bitfit.report(model).zero_grad == []
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)


def test_accelerate_loop_changes_only_selected():
    from accelerate import Accelerator

    model = make("gpt2")
    bitfit.apply(model, preset="paper-subset")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = effective_params(model)
    acc = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    wrapped, opt = acc.prepare(model, opt)
    assert bitfit.get_state(wrapped) is bitfit.get_state(model)
    wrapped.train()
    batch = inputs_for("gpt2", batch=4)
    for _ in range(3):
        loss = wrapped(**batch, labels=torch.tensor([0, 1, 1, 0])).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    after = effective_params(acc.unwrap_model(wrapped))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # c_attn's underlying tensor is trainable; through the mask only its query slice moves
    fused = {n.replace(".parametrizations.bias.original", ".bias") for n in trainable}
    assert changed == fused


def test_the_trainers_flop_count_is_the_stock_one_with_the_parameters_counted_once(tmp_path, monkeypatch):
    import transformers as T

    from families import make

    from bitfit.training.trainer import _trainer_class

    model = bitfit.apply(make("bert"))
    args = T.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    tr = _trainer_class()(model=model, args=args, train_dataset=[{"input_ids": [1]}])
    inputs = {"input_ids": torch.ones(4, 7, dtype=torch.long)}
    want = T.Trainer.floating_point_ops(tr, inputs)
    counts = []
    real = type(model).num_parameters
    monkeypatch.setattr(type(model), "num_parameters", lambda self, *a, **k: counts.append(1) or real(self, *a, **k))
    assert tr.floating_point_ops(inputs) == tr.floating_point_ops(inputs) == want > 0
    assert len(counts) == 1
