"""Every baseline trains exactly the parameter count it claims, and only those parameters move."""

import copy

import pytest
import torch
from families import inputs_for, make, train_steps

from bitfit.training import baselines as B
from bitfit.errors import BitFitConfigError

# tiny BERT dims (tests/families.py): hidden 16, 2 layers, ffn 32, 2 labels
H, L, I, LABELS = 16, 2, 32, 2
HEAD = H * LABELS + LABELS  # classifier weight + bias
BIASES_PER_LAYER = 4 * H + H + I + H + H  # q,k,v,o + LN1 + ffn_in + ffn_out + LN2
ALL_BIASES = L * BIASES_PER_LAYER + H + H  # + embeddings LN + pooler
LAYER_NON_BIAS = 4 * H * H + H + 2 * H * I + H  # q,k,v,o weights, LN1 weight, ffn weights, LN2 weight


def expected_counts():
    total = sum(p.numel() for p in make("bert").parameters())
    return {
        "bitfit": ALL_BIASES + HEAD,
        "paper-subset": L * (H + I) + HEAD,
        "frozen": HEAD,
        "full": total,
        "lora": L * 2 * (8 * H + H * 8) + HEAD,  # A: r x in, B: out x r on query and value
        "lora/r=4/targets=query+key+value": L * 3 * (4 * H + H * 4) + HEAD,
        "rand": ALL_BIASES + HEAD,
        "bitfit+last-1": ALL_BIASES + HEAD + LAYER_NON_BIAS,
        "bitfit+last-2": ALL_BIASES + HEAD + 2 * LAYER_NON_BIAS,
        "bitfit+lora": ALL_BIASES + HEAD + L * 2 * (8 * H + H * 8),
        "bitfit/preset=ffn": L * (I + H) + HEAD,
        "beft": L * H + HEAD,  # one bias vector after each value projection
        "ln_tuning": (2 * L + 1) * 2 * H + HEAD,  # every LayerNorm's weight and bias
        "ia3": L * (H + H + H + I) + HEAD,  # key, value, attn out (input side), ffn out (input side)
    }


@pytest.mark.parametrize("spec", list(expected_counts()))
def test_exact_trainable_count(spec):
    model = B.prepare(make("bert"), spec)
    assert B.trainable_count(model) == expected_counts()[spec]
    assert B.base_count(model) == expected_counts()["full"]


def test_rand_matches_bitfit_exactly_on_other_families():
    for fam in ("gpt2", "distilbert", "bloom"):
        bit = B.prepare(make(fam), "bitfit")
        rnd = B.prepare(make(fam), "rand")
        assert B.trainable_count(rnd) == B.trainable_count(bit)
        deltas = sum(m.bitfit_rand.delta.numel() for m in rnd.modules() if hasattr(m, "bitfit_rand"))
        assert deltas == B.bias_param_count(make(fam))


def test_parse_method_errors_and_options():
    assert B.parse_method("lora/r=16/alpha=32") == ("lora", {"r": 16, "alpha": 32})
    assert B.parse_method("bitfit+last-3") == ("bitfit+last-N", {"n": 3})
    with pytest.raises(BitFitConfigError, match="unknown method"):
        B.parse_method("adapterx")
    with pytest.raises(BitFitConfigError, match="key=value"):
        B.parse_method("lora/16")
    with pytest.raises(BitFitConfigError, match="between 1 and 2"):
        B.prepare(make("bert"), "bitfit+last-5")


def _named_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("spec", ["bitfit+last-1", "full", "lora", "frozen"])
def test_training_changes_only_trainable(spec):
    model = B.prepare(make("bert"), spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = _named_state(model)
    train_steps(model)
    after = _named_state(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable


def test_rand_trains_only_chosen_entries_through_a_gather():
    base = make("bert")
    model = B.prepare(copy.deepcopy(base), "rand", seed=3)
    batch = inputs_for("bert", batch=4)
    # a zero delta leaves the model bit-identical
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)
    weights_before = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "bitfit_rand")}
    opt = train_steps(model)
    # frozen dense weights never got a gradient; optimizer state is exactly the chosen count + head
    for name, m in model.named_modules():
        if hasattr(m, "bitfit_rand"):
            assert m.weight.grad is None and torch.equal(m.weight, weights_before[name])
    state_numel = sum(s["exp_avg"].numel() for s in opt.state.values())
    assert state_numel == ALL_BIASES + HEAD
    eff = B.rand_effective_weights(model)
    n_changed = 0
    for name, w in eff.items():
        m = model.get_submodule(name)
        diff = (w != weights_before[name]).nonzero()
        chosen = set(zip(m.bitfit_rand.rows.tolist(), m.bitfit_rand.cols.tolist()))
        assert {tuple(x) for x in diff.tolist()} <= chosen  # nothing outside the chosen entries moves
        n_changed += len(diff)
    assert n_changed > 0.95 * ALL_BIASES  # (almost) every chosen entry moved
    # the forward with hooks equals a plain model holding the effective weights
    merged = copy.deepcopy(base)
    sd = merged.state_dict()
    for name, w in eff.items():
        sd[f"{name}.weight"] = w
    for n, p in model.named_parameters():
        if n in sd and n.startswith("classifier"):
            sd[n] = p.detach()
    merged.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, merged(**batch).logits, rtol=1e-5, atol=1e-6)


def test_rand_is_uniform_over_weight_entries():
    model = B.prepare(make("bert", hidden_size=32, intermediate_size=64), "rand", seed=0)
    sizes, counts = [], []
    for _, m in model.named_modules():
        if hasattr(m, "bitfit_rand"):
            sizes.append(m.weight.numel())
            counts.append(m.bitfit_rand.delta.numel())
    frac = torch.tensor(counts, dtype=torch.float) / torch.tensor(sizes, dtype=torch.float)
    # every matrix gets about the same share (uniform draw over all entries)
    assert frac.std() / frac.mean() < 0.35
    # seeds give different draws; same seed the same one
    a = B.prepare(make("bert"), "rand", seed=1)
    b = B.prepare(make("bert"), "rand", seed=1)
    c = B.prepare(make("bert"), "rand", seed=2)
    q = "bert.encoder.layer.0.attention.self.query"
    assert torch.equal(a.get_submodule(q).bitfit_rand.rows, b.get_submodule(q).bitfit_rand.rows)
    assert not torch.equal(a.get_submodule(q).bitfit_rand.cols, c.get_submodule(q).bitfit_rand.cols) or \
        not torch.equal(a.get_submodule(q).bitfit_rand.rows, c.get_submodule(q).bitfit_rand.rows)


def test_bitfit_lora_trains_biases_and_adapters():
    model = B.prepare(make("bert"), "bitfit+lora")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in names)
    assert any(n.endswith("attention.self.key.bias") for n in names)
    assert any("modules_to_save" in n for n in names)
    before = _named_state(model)
    train_steps(model)
    after = _named_state(model)
    assert {n for n in before if not torch.equal(before[n], after[n])} == names
