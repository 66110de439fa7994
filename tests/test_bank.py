"""bitfit.BiasBank: many tasks over one frozen base, both strategies, restore, add/remove, memory."""

import copy

import pytest
import torch
from families import inputs_for, make
from torch import nn

import bitfit
from bitfit.serving.bank import BiasBank, choose_strategy
from bitfit.errors import BitFitError
from bitfit.core.roles import head_module_names


def with_labels(model, n_labels, seed):
    """A copy of ``model`` whose head ends in ``n_labels`` outputs (fresh random last layer)."""
    m = copy.deepcopy(model)
    old = m.config.num_labels
    g = torch.Generator().manual_seed(seed)
    heads, _ = head_module_names(m)
    for h in heads:
        for name, mod in list(m.get_submodule(h).named_modules()):
            if isinstance(mod, nn.Linear) and mod.out_features == old:
                new = nn.Linear(mod.in_features, n_labels, bias=mod.bias is not None)
                with torch.no_grad():
                    new.weight.copy_(torch.randn(new.weight.shape, generator=g) * 0.5)
                    if new.bias is not None:
                        new.bias.copy_(torch.randn(n_labels, generator=g))
                parent = m.get_submodule(f"{h}.{name}".rsplit(".", 1)[0]) if name else m
                setattr(parent, name.rsplit(".", 1)[-1] if name else h, new)
    m.config.num_labels = n_labels
    if hasattr(m, "num_labels"):
        m.num_labels = n_labels
    return m


def task_model(base, n_labels, seed, **apply_kw):
    """A 'trained' BitFit task of ``base``: every trainable tensor moved randomly."""
    m = with_labels(base, n_labels, seed) if n_labels != base.config.num_labels else copy.deepcopy(base)
    bitfit.apply(m, **apply_kw)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def alone(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), k
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, type(m).__name__


def make_base(family, **overrides):
    """A tiny random model whose biases are non-zero (HF initialises them to 0, which would hide
    a bank that forgot to subtract the base value)."""
    model = make(family, **overrides)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture
def tiny_bert():
    return make_base("bert")


def build(family, specs):
    """base + {name: task model} for specs [(name, n_labels, apply kwargs)]."""
    base = make_base(family)
    models = {name: task_model(base, nl, seed=i + 1, **kw) for i, (name, nl, kw) in enumerate(specs)}
    return base, models


@pytest.mark.filterwarnings("ignore:.*have no bias in this")
@pytest.mark.parametrize("strategy", ["group", "gather", "auto"])
@pytest.mark.parametrize(
    "family,specs",
    [
        ("bert", [("a", 2, {}), ("b", 3, {}), ("r", 1, {"preset": "paper-subset"})]),
        ("qwen2", [("a", 2, {"add_missing": True}), ("b", 4, {})]),  # added biases incl. RMSNorm
        ("gpt2", [("a", 2, {}), ("b", 5, {})]),
    ],
)
def test_rows_equal_each_task_alone(family, specs, strategy):
    base, models = build(family, specs)
    snap = snapshot(base)
    bank = BiasBank(base, models, strategy=strategy)
    names = [s[0] for s in specs]
    n = 7
    inputs = inputs_for(family, batch=n, seq=6)
    tasks = [names[i % len(names)] for i in range(n)]
    out = bank(tasks=tasks, **inputs)
    assert len(out) == n and out.tasks == tasks
    assert out.strategy == (strategy if strategy != "auto" else choose_strategy(n, len(names)))
    ref = {name: alone(m, inputs) for name, m in models.items()}
    for i, t in enumerate(tasks):
        nl = dict((s[0], s[1]) for s in specs)[t]
        assert out.logits[i].shape == (nl,)
        assert out.num_labels[i] == nl
        torch.testing.assert_close(out.logits[i], ref[t][i], rtol=1e-5, atol=1e-5)
    # the tasks really differ from each other and from the base
    assert not torch.allclose(ref[names[0]][:, :2], ref[names[1]][:, :2], atol=1e-3)
    pad = out.padded()
    assert pad.shape == (n, max(s[1] for s in specs))
    assert torch.isnan(pad[tasks.index(names[0]), specs[0][1]:]).all() or specs[0][1] == pad.shape[1]
    assert_same_state(base, snap)


def test_two_strategies_agree_and_single_task(tiny_bert):
    base = tiny_bert
    models = {"a": task_model(base, 2, 1), "b": task_model(base, 3, 2)}
    bank = BiasBank(base, models)
    inputs = inputs_for("bert", batch=5)
    tasks = ["a", "b", "b", "a", "b"]
    g = bank(tasks=tasks, strategy="group", **inputs)
    h = bank(tasks=tasks, strategy="gather", **inputs)
    for x, y in zip(g.logits, h.logits):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    one = bank(tasks=["b"] * 5, **inputs)
    assert one.strategy == "group"
    torch.testing.assert_close(one.padded(), alone(models["b"], inputs), rtol=1e-5, atol=1e-5)
    assert bank.stats == {"calls": 3, "rows": 15, "group": 2, "gather": 1}


def test_choose_strategy_rule():
    # one pass with per-row biases costs what the plain base costs (docs/SERVING.md): gather for any mix
    assert choose_strategy(64, 1) == "group"
    assert choose_strategy(64, 2) == "gather"
    assert choose_strategy(32, 32) == "gather"
    assert choose_strategy(8, 2) == "gather"
    assert choose_strategy(1, 1) == "group"


def test_base_restored_after_exception_mid_call(tiny_bert):
    base = tiny_bert
    models = {"a": task_model(base, 2, 1), "b": task_model(base, 3, 2, add_missing=True)}
    snap = snapshot(base)
    bank = BiasBank(base, models)
    inputs = inputs_for("bert", batch=4)
    calls = {"n": 0, "at": 0}

    def boom(module, args, out):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise RuntimeError("boom")

    layer = base.bert.encoder.layer[1].output.dense
    # group: fail inside the second group (task 'b' swapped in, hooks on); gather: in the one pass
    for strategy, at in (("group", 2), ("gather", 1)):
        calls.update(n=0, at=at)
        h = layer.register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                bank(tasks=["a", "b", "a", "b"], strategy=strategy, **inputs)
        finally:
            h.remove()
        assert_same_state(base, snap)
        assert base.classifier is not None and isinstance(base.classifier, nn.Linear)
    # and the bank still works afterwards
    out = bank(tasks=["a", "b", "a", "b"], **inputs)
    torch.testing.assert_close(out.logits[1], alone(models["b"], inputs)[1], rtol=1e-5, atol=1e-5)
    assert_same_state(base, snap)


def test_add_remove_task_and_memory(tiny_bert):
    base = tiny_bert
    ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    bank = BiasBank(base, {"a": task_model(base, 2, 1)})
    m0 = bank.memory()
    b = task_model(base, 3, 2)
    bank.add_task("b", b)
    m1 = bank.memory()
    assert {n: p.data_ptr() for n, p in base.named_parameters()} == ptrs
    assert m1["base"] == m0["base"]
    st = bitfit.get_state(b)
    n_bias = sum(s.size for s in st.trained_slots())
    n_head = sum(dict(b.named_parameters())[n].numel() for n in st.selection.head_params)
    assert m1["tasks"]["b"] == 4 * (n_bias + n_head)
    assert m1["total"] - m0["total"] == m1["tasks"]["b"]
    assert bank.tasks == ["a", "b"]
    assert bank.task_info("b")["num_labels"] == 3
    inputs = inputs_for("bert", batch=2)
    torch.testing.assert_close(bank(tasks=["b", "b"], **inputs).padded(), alone(b, inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(BitFitError, match="already in the bank"):
        bank.add_task("b", b)
    bank.remove_task("b")
    assert bank.tasks == ["a"] and "b" not in bank.memory()["tasks"]
    with pytest.raises(BitFitError, match="unknown task 'b'"):
        bank(tasks=["a", "b"], **inputs)
    with pytest.raises(BitFitError, match="unknown task"):
        bank.remove_task("b")


def test_bad_inputs_are_clean_errors(tiny_bert):
    bank = BiasBank(tiny_bert, {"a": task_model(tiny_bert, 2, 1)})
    inputs = inputs_for("bert", batch=2)
    with pytest.raises(BitFitError, match="one task per row"):
        bank(tasks=["a"], **inputs)
    with pytest.raises(BitFitError, match="strategy"):
        bank(tasks=["a", "a"], strategy="fast", **inputs)
    with pytest.raises(BitFitError, match="list"):
        bank(tasks="a", **inputs)
    with pytest.raises(BitFitError, match="not a BitFit model"):
        bank.add_task("x", make("bert"))
    with pytest.raises(BitFitError, match="itself a BitFit model"):
        BiasBank(task_model(tiny_bert, 2, 1))


def test_task_of_another_architecture_is_refused(tiny_bert):
    other = task_model(make("bert", num_hidden_layers=3), 2, 1)
    with pytest.raises(BitFitError, match="different base|weights differ"):
        BiasBank(tiny_bert, {"x": other})


def test_same_architecture_other_weights_is_refused(tiny_bert):
    other = task_model(make("bert", seed=5), 2, 1)
    with pytest.raises(BitFitError, match="weights differ"):
        BiasBank(tiny_bert, {"x": other})
    bank = BiasBank(tiny_bert, {"x": other}, strict=False)  # explicit opt-out loads anyway
    assert bank.tasks == ["x"]


@pytest.mark.filterwarnings("ignore:.*have no bias in this")
@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_artifact_folders(tmp_path, family):
    from safetensors import safe_open

    base = make_base(family, hidden_size=32, intermediate_size=64)
    models = {"a": task_model(base, 2, 1, add_missing=True), "b": task_model(base, 3, 2, preset="attention")}
    paths = {n: bitfit.save(m, tmp_path / n) for n, m in models.items()}
    snap = snapshot(base)
    bank = BiasBank(base, {"a": str(paths["a"])})
    before = bank.memory()
    ptrs = [p.data_ptr() for p in base.parameters()]
    bank.add_task("b", paths["b"])
    after = bank.memory()
    assert [p.data_ptr() for p in base.parameters()] == ptrs
    with safe_open(str(paths["b"] / "bitfit_model.safetensors"), "pt") as f:
        payload = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    grown = after["total"] - before["total"]
    assert grown == after["tasks"]["b"]
    assert 0.9 * payload <= grown <= 1.1 * payload, (grown, payload)
    inputs = inputs_for(family, batch=6, seq=5)
    tasks = ["a", "b", "b", "a", "a", "b"]
    for strategy in ("group", "gather"):
        out = bank(tasks=tasks, strategy=strategy, **inputs)
        ref = {n: alone(m, inputs) for n, m in models.items()}
        for i, t in enumerate(tasks):
            torch.testing.assert_close(out.logits[i], ref[t][i], rtol=1e-5, atol=1e-5)
    assert_same_state(base, snap)
    if family == "qwen2":
        assert bitfit.get_state(models["a"]).added  # the added-bias path was exercised


@pytest.mark.filterwarnings("ignore:.*have no bias in this")
@pytest.mark.parametrize("family", ["roberta", "distilbert", "bart", "vit", "t5", "opt"])
def test_more_families_both_strategies(family):
    """Other head layouts (two-module heads, eos pooling, pixel inputs, per-token logits) and OPT,
    whose flattened [batch*seq, hidden] activations make the bank fall back to grouping."""
    same_labels = family == "t5"  # T5ForConditionalGeneration: LM logits, no task head
    b_kw = {"add_missing": True, "preset": "attention"} if same_labels else {}
    base, models = build(family, [("a", 2, {"add_missing": True}), ("b", 2 if same_labels else 3, b_kw)])
    snap = snapshot(base)
    bank = BiasBank(base, models)
    inputs = inputs_for(family, batch=5)
    tasks = ["a", "b", "b", "a", "b"]
    ref = {n: alone(m, inputs) for n, m in models.items()}
    for strategy in ("group", "gather"):
        out = bank(tasks=tasks, strategy=strategy, **inputs)
        assert out.strategy == ("group" if family == "opt" else strategy)
        for i, t in enumerate(tasks):
            torch.testing.assert_close(out.logits[i], ref[t][i], rtol=1e-5, atol=1e-5)
    assert_same_state(base, snap)


def test_artifact_of_another_base_is_refused(tmp_path, tiny_bert):
    path = bitfit.save(task_model(make("bert", seed=5), 2, 1), tmp_path / "x")  # same shapes, other weights
    with pytest.raises(BitFitError, match="weights differ.*strict=False"):
        BiasBank(tiny_bert, {"x": path})
    with pytest.warns(UserWarning, match="weights differ"):
        bank = BiasBank(tiny_bert, {"x": path}, strict=False)
    assert bank.tasks == ["x"]
