"""The bank's per-row bias path: bit for bit equal to each task's own model, no hooks, no writes to
the base, memory = base + the tasks' own tensors, and multi-task generation (LLaMA-style, GPT-2)."""

import copy

import pytest
import torch
from families import inputs_for, make
from test_bank import build, make_base, snapshot, task_model
from torch import nn

import bitfit
from bitfit.serving.bank import BiasBank
from bitfit.errors import BitFitError


def alone(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.filterwarnings("ignore:.*have no bias in this")
@pytest.mark.parametrize("family,specs", [
    ("bert", [("a", 2, {}), ("b", 3, {}), ("c", 2, {"preset": "paper-subset"}), ("d", 2, {"add_missing": True})]),
    ("gpt2", [("a", 2, {}), ("b", 2, {"preset": "ffn"})]),
    ("qwen2", [("a", 2, {"add_missing": True}), ("b", 2, {})]),
])
def test_mixed_batch_bit_exact_with_each_task(family, specs):
    """Row i of a mixed batch equals row i of its task's own model on the same batch, bit for bit
    (same ops: the output is filled with the row's bias and the matmul accumulates into it)."""
    base, models = build(family, specs)
    bank = BiasBank(base, models)
    names = [s[0] for s in specs]
    n = 9
    inputs = inputs_for(family, batch=n, seq=6)
    tasks = [names[(i * 7) % len(names)] for i in range(n)]
    out = bank(tasks=tasks, **inputs)
    assert out.strategy == "gather"
    ref = {name: alone(m, inputs) for name, m in models.items()}
    body_only = family != "bert"  # heads run on each task's own rows (other M): compare within tolerance
    for i, t in enumerate(tasks):
        if body_only:
            torch.testing.assert_close(out.logits[i], ref[t][i], rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(out.logits[i], ref[t][i]), (i, t, out.logits[i], ref[t][i])


def test_hidden_states_bit_exact_and_no_hooks():
    """The body's output (every layer's biases, LayerNorms included) is bit for bit each task's own."""
    base, models = build("bert", [("a", 2, {}), ("b", 2, {}), ("c", 2, {"preset": "paper-subset"})])
    bank = BiasBank(base, models)
    inputs = inputs_for("bert", batch=6, seq=5)
    tasks = ["a", "b", "c", "c", "a", "b"]
    seen = {}

    def probe(module, args, out):  # on the base's encoder: sees the bank's pass
        seen["hooks"] = [type(m).__name__ for m in base.modules() if m._forward_hooks or m._forward_pre_hooks]
        seen["classes"] = {type(m).__name__ for m in base.modules()}
        seen["hidden"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    h = base.bert.register_forward_hook(probe)
    try:
        bank(tasks=tasks, **inputs)
    finally:
        h.remove()
    assert seen["hooks"] == ["BertModel"]  # only the probe itself: no per-module hook on the hot path
    assert {"BitFitBankLinear", "BitFitBankLayerNorm"} <= seen["classes"]
    assert not any(type(m).__name__.startswith("BitFitBank") for m in base.modules())  # switched back
    for i, t in enumerate(tasks):
        m = bitfit.merge(copy.deepcopy(models[t]))
        with torch.no_grad():
            ref = m.bert(**inputs).last_hidden_state
        assert torch.equal(seen["hidden"][i], ref[i]), t


def test_base_never_written_and_memory_is_base_plus_tasks(tiny_bert):
    base = make_base("bert")
    snap = snapshot(base)
    ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    models = {"a": task_model(base, 2, 1), "b": task_model(base, 3, 2, add_missing=True),
              "c": task_model(base, 2, 3, preset="paper-subset")}
    bank = BiasBank(base, models)
    mem = bank.memory()
    for name, m in models.items():
        st = bitfit.get_state(m)
        n_bias = sum(s.size for s in st.trained_slots())
        n_head = sum(dict(m.named_parameters())[p].numel() for p in st.selection.head_params)
        assert mem["tasks"][name] == 4 * (n_bias + n_head), name
    # the slot tables are the only copy of the tasks' biases (tables with the same owners share one pack)
    storages = {t.values.untyped_storage().data_ptr(): t.values.untyped_storage().nbytes()
                for t in bank._tables.values()}
    assert len(storages) < len(bank._tables)  # packed: fewer storages than slots
    table_bytes = sum(storages.values())
    bias_bytes = sum(4 * sum(s.size for s in bitfit.get_state(m).trained_slots()) for m in models.values())
    assert table_bytes == bias_bytes
    assert mem["total"] == mem["base"] + sum(mem["tasks"].values())

    # writes to the base's parameters: none, during the call either
    for p in base.parameters():
        p.requires_grad_(False)
    versions = {n: p._version for n, p in base.named_parameters()}
    inputs = inputs_for("bert", batch=6)
    out = bank(tasks=["a", "b", "c", "b", "a", "c"], **inputs)
    out1 = bank(tasks=["b"] * 6, **inputs)
    assert {n: p._version for n, p in base.named_parameters()} == versions
    assert {n: p.data_ptr() for n, p in base.named_parameters()} == ptrs
    for k, v in snap.items():
        assert torch.equal(base.state_dict()[k], v), k
    ref_b = alone(models["b"], inputs)
    torch.testing.assert_close(out.logits[1], ref_b[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out1.padded(), ref_b, rtol=1e-6, atol=1e-6)


def test_remove_and_replace_keep_tables_consistent(tiny_bert):
    base = make_base("bert")
    models = {k: task_model(base, 2, i + 1) for i, k in enumerate("abcd")}
    bank = BiasBank(base, models)
    inputs = inputs_for("bert", batch=4)
    bank.remove_task("b")
    bank.add_task("e", task_model(base, 3, 9, preset="attention"))
    bank.add_task("a", models["d"], replace=True)  # 'a' now answers like 'd'
    out = bank(tasks=["a", "c", "d", "e"], **inputs)
    torch.testing.assert_close(out.logits[0], alone(models["d"], inputs)[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.logits[1], alone(models["c"], inputs)[1], rtol=1e-6, atol=1e-6)
    assert all(len(t.owners) == t.values.shape[0] for t in bank._tables.values())
    mem = bank.memory()
    assert set(mem["tasks"]) == {"a", "c", "d", "e"}
    assert sum(t.values.numel() * 4 for t in bank._tables.values()) == sum(
        sum(v.numel() * 4 for v in list(t.swap.values()) + list(t.hooked.values())) for t in bank._tasks.values())
    for name in list(bank.tasks):
        bank.remove_task(name)
    assert bank._tables == {}


def test_call_plans_are_reused_and_dropped_when_tasks_change(tiny_bert):
    """A task list's call plan is worked out once and reused; adding, replacing or removing a task drops
    every plan, so the next call with the same task list runs the new values (bit for bit each task's own
    model), and a finished call leaves no per-row state on the base."""
    base = make_base("bert")
    models = {k: task_model(base, 2 + i % 2, i + 1) for i, k in enumerate("abc")}
    bank = BiasBank(base, models)
    inputs = inputs_for("bert", batch=6)
    tasks = ["a", "b", "c", "c", "b", "a"]
    for _ in range(3):
        bank(tasks=tasks, **inputs)
        bank(tasks=["b"] * 6, **inputs)
    assert len(bank._plans) == 2  # one for the mixed list, one for 'b' alone
    plan = next(iter(bank._plans.values()))
    bank.add_task("a", models["c"], replace=True)  # 'a' now answers like 'c'
    assert bank._plans == {}
    out = bank(tasks=tasks, **inputs)
    assert next(iter(bank._plans.values())) is not plan
    ref = {k: alone(m, inputs) for k, m in models.items()}
    for i, t in enumerate(tasks):
        want = ref["c" if t == "a" else t][i]
        assert torch.equal(out.logits[i], want), (i, t)
    bank.remove_task("b")
    assert bank._plans == {}
    with pytest.raises(BitFitError, match="unknown task 'b'"):
        bank(tasks=tasks, **inputs)
    out = bank(tasks=["c", "a"] * 3, **inputs)
    assert all(torch.equal(out.logits[i], ref["c"][i]) for i in range(6))
    for m in base.modules():  # nothing of a call left on the base
        assert not type(m).__name__.startswith("BitFitBank") and "_bitfit_rows" not in m.__dict__
    for plan in bank._plans.values():
        assert all(d.groups == [] for *_, d in plan.dispatch)  # no reference to a call's heads or rows


# ------------------------------------------------------------------------------ generation
def lm_tasks(family, specs, **overrides):
    """A causal-LM base with non-zero biases and 'trained' BitFit tasks (no head)."""
    import transformers as T

    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=64, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0)
        torch.manual_seed(0)
        base = T.GPT2LMHeadModel(cfg).eval()
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith("bias"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.2)
    else:
        base = make("llama", **overrides)
    models = {}
    for i, (name, kw) in enumerate(specs):
        m = copy.deepcopy(base)
        bitfit.apply(m, **kw)
        g = torch.Generator().manual_seed(i + 11)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
        models[name] = m.eval()
    return base, models


GEN = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.mark.filterwarnings("ignore:.*have no bias in this")
@pytest.mark.parametrize("family,specs", [
    ("llama", [("a", {"add_missing": True}), ("b", {"add_missing": True, "preset": "attention"}),
               ("c", {"add_missing": True, "preset": "ffn"})]),
    ("gpt2", [("a", {}), ("b", {}), ("c", {"preset": "paper-subset"})]),
])
def test_mixed_task_generation_equals_each_task(family, specs):
    base, models = lm_tasks(family, specs)
    snap = snapshot(base)
    bank = BiasBank(base, models)
    g = torch.Generator().manual_seed(3)
    n = 6
    ids = torch.randint(3, 50, (n, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding on two rows
    mask[4, :1] = 0
    ids[mask == 0] = 0
    tasks = ["a", "b", "c", "c", "a", "b"]
    out = bank.generate(tasks, input_ids=ids, attention_mask=mask, **GEN)
    assert out.shape == (n, 5 + GEN["max_new_tokens"])
    own = {}
    for name, m in models.items():
        with torch.no_grad():
            own[name] = m.generate(input_ids=ids, attention_mask=mask, **GEN)
    for i, t in enumerate(tasks):
        assert torch.equal(out[i], own[t][i]), (i, t, out[i], own[t][i])
    # the tasks really decode differently
    assert len({tuple(own[t][0].tolist()) for t in own}) > 1
    # one task alone, equal-length prompts: each row as that task's model decodes it alone
    solo = bank.generate(["b"] * 2, input_ids=ids[[0, 2]], attention_mask=torch.ones(2, 5, dtype=torch.long), **GEN)
    for j, i in enumerate([0, 2]):
        with torch.no_grad():
            ref = models["b"].generate(input_ids=ids[i:i + 1], attention_mask=torch.ones(1, 5, dtype=torch.long),
                                       **GEN)
        assert torch.equal(solo[j], ref[0])
    assert not any(type(m).__name__.startswith("BitFitBank") for m in base.modules())
    for k, v in snap.items():
        assert torch.equal(base.state_dict()[k], v), k


@pytest.mark.filterwarnings("ignore:.*have no bias in this")
def test_generation_with_beams_and_several_returns():
    base, models = lm_tasks("gpt2", [("a", {}), ("b", {})])
    bank = BiasBank(base, models)
    ids = torch.randint(3, 50, (2, 4), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    out = bank.generate(["a", "b"], input_ids=ids, attention_mask=mask, **kw)
    assert out.shape[0] == 4
    for j, t in enumerate(["a", "b"]):
        with torch.no_grad():
            ref = models[t].generate(input_ids=ids, attention_mask=mask, **kw)
        assert torch.equal(out[2 * j: 2 * j + 2], ref[2 * j: 2 * j + 2]), t


def test_generate_refuses_classifier_and_bad_rows(tiny_bert):
    bank = BiasBank(tiny_bert, {"a": task_model(tiny_bert, 2, 1)})
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(BitFitError, match="causal-LM base"):
        bank.generate(["a", "a"], input_ids=ids)
    base, models = lm_tasks("gpt2", [("a", {})])
    bank = BiasBank(base, models)
    with pytest.raises(BitFitError, match="one row per task"):
        bank.generate(["a"], input_ids=ids)
    with pytest.raises(BitFitError, match="unknown task"):
        bank.generate(["a", "zz"], input_ids=ids)


def test_models_that_flatten_rows_fall_back_to_group():
    """OPT's MLP runs on [batch*seq, hidden]: the per-row pass notices and the bank groups by task."""
    base, models = build("opt", [("a", 2, {}), ("b", 3, {})])
    bank = BiasBank(base, models, strategy="gather")
    inputs = inputs_for("opt", batch=4)
    with pytest.raises(BitFitError, match="batch-first"):
        bank(tasks=["a", "b", "a", "b"], **inputs)
    assert not any(type(m).__name__.startswith("BitFitBank") for m in base.modules())
    bank = BiasBank(base, models)
    out = bank(tasks=["a", "b", "a", "b"], **inputs)
    assert out.strategy == "group"
    torch.testing.assert_close(out.logits[1], alone(models["b"], inputs)[1], rtol=1e-6, atol=1e-6)
    assert isinstance(base.model.decoder.layers[0].fc1, nn.Linear)
