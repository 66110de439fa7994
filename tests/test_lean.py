"""bf16 frozen base and the memory-lean training mode (bitfit.fast.lean)."""

import copy

import pytest
import torch
from families import inputs_for, make
from torch import nn

import bitfit
from bitfit.errors import BitFitConfigError
from bitfit.fast.dropout import LeanDropout, lean_dropout
from bitfit.fast.lean import get_lean, saved_activation_bytes, set_lean

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = nn.Linear

WEIGHTED = (nn.Linear, nn.Embedding, Conv1D)


def _labels(family, batch):
    if family == "llama":
        return batch["input_ids"]
    return torch.tensor([0, 1, 1, 0])


def _effective(model):
    """name -> tensor as the forward sees it (parametrized fused biases resolved)."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if ".parametrizations." not in n}
    for mname, module in model.named_modules():
        if hasattr(module, "parametrizations") and "bias" in module.parametrizations:
            out[f"{mname}.bias"] = module.bias.detach().clone()
    return out


def assert_grads_match(g0, g1):
    """Every trainable tensor's gradient equal to 1e-5 of the model's gradient scale (largest entry),
    and to 1e-4 relative (norm) for tensors with a non-negligible gradient (b_k's is zero by construction)."""
    assert g0.keys() == g1.keys()
    scale = max(g.abs().max() for g in g0.values())
    for name in g0:
        err = (g0[name] - g1[name]).abs().max()
        assert err <= 1e-5 * scale, (name, err, scale)
        if g0[name].abs().max() > 1e-3 * scale:
            assert (g0[name] - g1[name]).norm() <= 1e-4 * g0[name].norm(), name


# ------------------------------------------------------------------ bf16 frozen base

BF16_CASES = [("bert", {}), ("gpt2", {"preset": "paper-subset"}), ("llama", {"add_missing": True})]


@pytest.mark.parametrize("family,options", BF16_CASES)
def test_bf16_dtypes_outputs_and_grads(family, options):
    ref = make(family)
    model = make(family)
    bitfit.apply(model, frozen_dtype="bfloat16", **options)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    n_bf16 = 0
    for mname, module in model.named_modules():
        if isinstance(module, WEIGHTED) and not module.weight.requires_grad:
            assert module.weight.dtype == torch.bfloat16, mname
            n_bf16 += 1
        if "norm" in type(module).__name__.lower():
            assert all(p.dtype == torch.float32 for p in module.parameters(recurse=False)), mname
    assert n_bf16 == get_lean(model).cast > 0

    batch = inputs_for(family)
    with torch.no_grad():
        want = ref(**batch).logits
        got = model(**batch).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max() <= 0.03 * want.abs().max() + 1e-3
    assert not torch.equal(got, want)  # really ran in bf16

    model.train()
    batch = inputs_for(family, batch=4)
    loss = model(**batch, labels=_labels(family, batch)).loss
    assert loss.dtype == torch.float32
    loss.backward()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("family,options", BF16_CASES)
def test_bf16_training_moves_only_selected(family, options):
    model = make(family)
    bitfit.apply(model, frozen_dtype="bfloat16", **options)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
    before = _effective(model)
    model.train()
    batch = inputs_for(family, batch=4)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=_labels(family, batch)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    after = _effective(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    trained_names = {n.replace(".parametrizations.bias.original", ".bias") for n in trainable}
    assert changed == trained_names
    assert losses[-1] < losses[0]


def test_bf16_base_loaded_in_bf16():
    model = make("bert").to(torch.bfloat16)
    bitfit.apply(model, frozen_dtype="bf16")
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.bert.embeddings.LayerNorm.weight.dtype == torch.float32
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    model.train()
    batch = inputs_for("bert", batch=4)
    model(**batch, labels=_labels("bert", batch)).loss.backward()
    assert model.bert.encoder.layer[0].attention.self.query.bias.grad.dtype == torch.float32


def test_bf16_model_deepcopies_and_keeps_signature():
    import inspect

    model = make("bert")
    bitfit.apply(model, frozen_dtype="bfloat16")
    assert "input_ids" in inspect.signature(model.forward).parameters  # Trainer's column filter reads it
    twin = copy.deepcopy(model)
    batch = inputs_for("bert")
    with torch.no_grad():
        twin.classifier.bias.add_(1.0)
        a, b = model(**batch).logits, twin(**batch).logits
    assert torch.allclose(b - a, torch.ones_like(a), atol=1e-2)  # the copy runs its own weights


def test_frozen_dtype_validation():
    with pytest.raises(BitFitConfigError, match="frozen_dtype"):
        bitfit.BitFitConfig(frozen_dtype="int4")
    with pytest.raises(BitFitConfigError, match="lean"):
        bitfit.BitFitConfig(lean="yes")
    assert bitfit.BitFitConfig(frozen_dtype="bf16").frozen_dtype == "bfloat16"
    assert bitfit.BitFitConfig().lean is True


# ------------------------------------------------------------------ lean mode: same gradients as stock


def _grads(family, lean, attn, seed=11):
    model = make(family, attn_implementation=attn, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3) \
        if family in ("bert", "roberta", "electra", "vit") else make(family, attn_implementation=attn)
    bitfit.apply(model, lean=lean)
    if lean:  # the same dropout draws as stock need the padded layers (tests/test_packing.py: packed ones)
        set_lean(model, True, pack=False)
    model.train()
    batch = inputs_for(family, batch=4, seq=9)
    if "attention_mask" in batch:
        batch["attention_mask"][0, -3:] = 0  # padding: the mask path is exercised
    torch.manual_seed(seed)
    loss = model(**batch, labels=_labels(family, batch)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return model, loss.detach(), grads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "distilbert", "vit"])
def test_lean_gradients_match_stock(family, attn):
    stock, loss0, g0 = _grads(family, False, attn)
    lean, loss1, g1 = _grads(family, True, attn)
    state = get_lean(lean)
    assert state.attention and state.dropouts
    assert not any(type(m) is LeanDropout for m in stock.modules())
    assert lean.config._attn_implementation == attn  # restored after the forward
    if attn == "eager":  # the fused function runs eager attention's ops on the same values, same draws
        assert torch.equal(loss0, loss1)
    else:
        # stock sdpa runs torch's fused CPU kernel (a blocked, online softmax whose blocking depends on the
        # CPU's vector width), the lean path matmul -> softmax -> matmul: the same dropout draws, float32
        # rounding apart (a few ulp of a loss near 0.7, seen on AVX2-only CPUs), so 1e-5 relative.
        torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-7)
    assert len(g0) > 10
    assert_grads_match(g0, g1)


def test_without_dropout_short_rows_take_the_fused_path_with_stock_gradients(monkeypatch):
    """No dropout (BitFit's default): up to FUSED_MAX_KEYS_WITHOUT_DROPOUT keys the fused function runs (CPU
    flash-attention backward is slow there); past it, SDPA. Gradients match the stock path either way."""
    import bitfit.fast.attention as L

    calls = []
    real = L.FusedAttention.apply
    monkeypatch.setattr(L.FusedAttention, "apply", lambda *a: calls.append(a[0].shape[-2]) or real(*a))

    def grads(lean, seq):
        model = make("bert", attn_implementation="sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=64)
        bitfit.apply(model, lean=lean)
        if lean:  # the padded fused path (packed layers attend through bitfit.fast.packing, tests/test_packing.py)
            set_lean(model, True, pack=False)
        model.train()
        batch = inputs_for("bert", batch=4, seq=seq)
        batch["attention_mask"][0, -2:] = 0
        model(**batch, labels=_labels("bert", batch)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    monkeypatch.setattr(L, "FUSED_MAX_KEYS_WITHOUT_DROPOUT", 12)
    for seq, fused in ((9, True), (20, False)):
        calls.clear()
        stock = grads(False, seq)
        assert calls == []
        lean = grads(True, seq)
        assert bool(calls) == fused and all(c == seq for c in calls), (seq, calls)
        assert_grads_match(stock, lean)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_keeps_the_stock_attention(dropout):
    """Checkpointing recomputes each layer in backward, outside the lean forward: the forward must run the
    model's own attention too, or the recomputed tensors differ from the saved ones (torch's CheckpointError)."""
    def grads(lean):
        model = make("bert", attn_implementation="sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=dropout)
        bitfit.apply(model, lean=lean)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = inputs_for("bert", batch=4, seq=9)
        torch.manual_seed(3)
        model(**batch, labels=_labels("bert", batch)).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    stock, lean = grads(False), grads(True)
    assert_grads_match(stock, lean)


def test_lean_fallback_family_keeps_stock_attention():
    stock, loss0, g0 = _grads("gpt2", False, "eager")
    lean, loss1, g1 = _grads("gpt2", True, "eager")
    state = get_lean(lean)
    assert not state.attention and len(state.dropouts) > 0  # dropout is lean, attention is stock
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)


def test_lean_saves_less_and_eval_is_identical():
    def saved(lean):
        model = make("bert", attn_implementation="eager", max_position_embeddings=128)
        bitfit.apply(model, lean=lean)
        model.train()
        batch = inputs_for("bert", batch=4, seq=64)
        n, loss = saved_activation_bytes(lambda: model(**batch, labels=_labels("bert", batch)).loss,
                                         params=list(model.parameters()))
        loss.backward()
        model.eval()
        with torch.no_grad():
            logits = model(**inputs_for("bert")).logits
        return n, logits

    n_stock, out_stock = saved(False)
    n_lean, out_lean = saved(True)
    assert n_lean < 0.8 * n_stock, (n_lean, n_stock)
    assert torch.equal(out_stock, out_lean)


def test_set_lean_switches_back_and_forth():
    model = make("bert")
    bitfit.apply(model)
    assert bitfit.get_state(model).config.lean is True
    assert sum(type(m) is LeanDropout for m in model.modules()) == 8
    set_lean(model, False)
    assert not any(type(m) is LeanDropout for m in model.modules())
    assert bitfit.get_state(model).config.lean is False
    assert not get_lean(model).attention
    set_lean(model, True)
    assert get_lean(model).attention
    assert any("lean training mode" in m for m in bitfit.report(model).modes)


def test_lean_dropout_function_matches_torch():
    x = torch.randn(5, 300, requires_grad=True)
    torch.manual_seed(3)
    y0 = torch.nn.functional.dropout(x, 0.25, True)
    (g0,) = torch.autograd.grad(y0.square().sum(), x)
    torch.manual_seed(3)
    y1 = lean_dropout(x, 0.25, True)
    (g1,) = torch.autograd.grad(y1.square().sum(), x)
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert lean_dropout(x, 0.25, training=False) is x
    # what backward keeps: a bool mask (1 byte a value), not a float noise tensor
    n, _ = saved_activation_bytes(lambda: lean_dropout(x, 0.25, True), params=[x])
    assert n <= x.numel() + 64


def test_skip_zero_grad_is_reported():
    model = make("bert")
    bitfit.apply(model, skip_zero_grad=True)
    rep = bitfit.report(model)
    assert rep.by_role["key"]["trainable"] == 0
    assert len(rep.skipped_zero_grad) == 2
    assert "b_k" in rep.to_markdown() and "skip_zero_grad" in rep.to_markdown()


def assert_eval_loss_falls(model):
    """15 AdamW steps on one BERT batch lower the eval-mode loss by more than 0.05."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = inputs_for("bert", batch=4)
    labels = _labels("bert", batch)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(**batch, labels=labels).loss.item()

    first = eval_loss()
    torch.manual_seed(0)
    for _ in range(15):
        model.train()
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    assert eval_loss() < first - 0.05


def test_bf16_lean_together_trains():
    model = make("bert", attn_implementation="sdpa")
    bitfit.apply(model, frozen_dtype="bfloat16")
    state = get_lean(model)
    assert state.attention and state.frozen_dtype == torch.bfloat16
    assert_eval_loss_falls(model)


def test_artifact_roundtrip_onto_bf16_base(tmp_path):
    artifact = pytest.importorskip("bitfit.artifacts")
    trained = make("bert")
    bitfit.apply(trained, frozen_dtype="bfloat16")
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.5)
    artifact.save(trained, tmp_path / "a")
    for base_dtype in ("float32", "bfloat16"):
        base = make("bert")
        if base_dtype == "bfloat16":
            bitfit.apply(base, frozen_dtype="bfloat16")
        loaded = artifact.load(base, tmp_path / "a")
        for name, p in trained.named_parameters():
            if p.requires_grad:
                q = dict(loaded.named_parameters())[name]
                assert q.dtype == torch.float32 and torch.equal(q, p), name


@pytest.mark.slow
def test_lean_gradients_match_stock_on_minilm(minilm_dir):
    import transformers as T

    def grads(lean):
        torch.manual_seed(0)  # the new classification head
        model = T.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
        bitfit.apply(model, lean=lean)
        if lean:
            set_lean(model, True, pack=False)  # MiniLM's dropout: the stock draws need the padded layers
        model.train()
        tok = T.AutoTokenizer.from_pretrained(minilm_dir)
        batch = tok(["a cheerful, moving film", "dull and far too long for its own good"],
                    padding=True, return_tensors="pt")
        torch.manual_seed(0)
        model(**batch, labels=torch.tensor([1, 0])).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    assert_grads_match(grads(False), grads(True))


def test_attention_switch_is_restored_when_forward_fails():
    model = make("bert", attn_implementation="sdpa")
    bitfit.apply(model)
    model.train()
    with pytest.raises(Exception):
        model(input_ids=torch.tensor([[1, 2, 999]]))  # token id beyond the vocabulary
    assert model.config._attn_implementation == "sdpa"
    assert "bitfit_lean" not in model.config.to_json_string()


# ------------------------------------------------------------------ int8 training matmuls


def _int8_pair(family="bert", **options):
    ref = make(family, pretrained_pooler=False)  # all-zero pooler bias, kept frozen in the body: as these
    options.setdefault("pooler_head", False)  # tolerances were set on
    m8, mb = copy.deepcopy(ref), copy.deepcopy(ref)
    bitfit.apply(m8, frozen_dtype="int8", **options)
    bitfit.apply(mb, frozen_dtype="bfloat16", **options)
    return m8, mb


def test_int8_quantizes_frozen_linears_only():
    from bitfit.fast.int8 import INT8_S, INT8_W

    m8, _ = _int8_pair()
    state = get_lean(m8)
    linears = [n for n, mod in m8.named_modules() if isinstance(mod, nn.Linear) and not mod.weight.requires_grad]
    assert sorted(state.int8) == sorted(linears) and len(linears) == 2 * 6 + 1  # 2 layers x 6, pooler
    assert "classifier" not in state.int8  # the head trains its weight: float32 matmul
    assert any("int8 training matmuls in 13 frozen Linear layers" in m for m in bitfit.report(m8).modes)
    assert all(p.dtype == torch.float32 for p in m8.parameters() if p.requires_grad)
    # non-persistent: a state dict (and so a merged or saved model) never carries them
    assert not [k for k in m8.state_dict() if "int8" in k]
    mod = m8.get_submodule(linears[0])
    w = mod.weight.detach().float()
    wq, scale = mod._buffers[INT8_W], mod._buffers[INT8_S]
    assert wq.dtype == torch.int8 and wq.abs().max() == 127
    assert (wq.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-2  # bf16 weight vs fp32 grid


def test_int8_eval_is_the_bf16_path_and_grads_are_close():
    m8, mb = _int8_pair()
    batch = inputs_for("bert", batch=4)
    labels = _labels("bert", batch)
    for m in (m8, mb):
        m.eval()
    with torch.no_grad():
        assert torch.equal(m8(**batch).logits, mb(**batch).logits)
    grads = []
    for m in (m8, mb):
        m.train()
        torch.manual_seed(3)
        out = m(**batch, labels=labels)
        assert out.logits.dtype == torch.float32
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    g8, gb = grads
    assert g8.keys() == gb.keys()
    # dropout draws differ between the two (int8 mode draws faster masks), so compare without dropout
    grads = []
    for m in (m8, mb):
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        m.zero_grad()
        m(**batch, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad})
    g8, gb = grads
    scale = max(g.abs().max() for g in gb.values())
    for name in gb:
        assert g8[name].dtype == torch.float32
        if gb[name].abs().max() > 1e-2 * scale:  # int8 rounding: a few per cent, never a different direction
            cos = torch.nn.functional.cosine_similarity(g8[name].flatten(), gb[name].flatten(), dim=0)
            assert cos > 0.99, (name, cos)
            assert (g8[name] - gb[name]).norm() <= 0.1 * gb[name].norm(), name


def test_fast_dropout_draw_keeps_the_right_fraction():
    from bitfit.fast.dropout import FAST_DRAW, fast_keep_mask, lean_dropout

    torch.manual_seed(0)
    for p in (0.1, 0.5):
        keep = fast_keep_mask((1000, 1000), p, "cpu")
        assert keep.dtype == torch.bool and abs(keep.float().mean().item() - (1 - p)) < 2e-3
        assert abs(keep[:, ::4].float().mean().item() - (1 - p)) < 4e-3  # every 16-bit lane is uniform
        assert abs(keep[:, 3::4].float().mean().item() - (1 - p)) < 4e-3
    x = torch.ones(200, 500, requires_grad=True)
    token = FAST_DRAW.set(True)
    try:
        y = lean_dropout(x, 0.2)
    finally:
        FAST_DRAW.reset(token)
    assert set(y.unique().tolist()) == {0.0, 1.25} and abs((y > 0).float().mean().item() - 0.8) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # gradient = the same mask and scale


def test_int8_function_matches_float_matmul():
    from bitfit.fast.int8 import Int8Matmuls, rowwise_int8

    torch.manual_seed(0)
    w = torch.randn(48, 32)
    wq, ws = rowwise_int8(w)
    x = torch.randn(2, 5, 32, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    y = Int8Matmuls.apply(x, b, wq, ws.reshape(-1), torch.float32)
    ref = x @ w.t() + b
    assert y.shape == (2, 5, 48)
    assert (y - ref).norm() / ref.norm() < 0.02
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    assert torch.allclose(gb, g.sum((0, 1)))  # the bias gradient is exact
    assert (gx - g @ w).norm() / (g @ w).norm() < 0.02


def test_int8_trains_and_switches_off():
    from bitfit.fast.lean import remove

    model = make("bert")
    bitfit.apply(model, frozen_dtype="int8")
    assert_eval_loss_falls(model)
    clone = copy.deepcopy(model)  # the int8 forward and buffers travel with a copy
    assert len(get_lean(clone).int8) == 13
    remove(model)
    assert not [n for n, _ in model.named_buffers() if "int8" in n]
    assert all("forward" not in mod.__dict__ for mod in model.modules())


def test_compare_method_option_selects_int8():
    from bitfit.training import baselines

    model = baselines.prepare(make("bert"), "bitfit/frozen_dtype=int8")
    assert len(get_lean(model).int8) == 13
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        p.numel() for p in bitfit.apply(make("bert")).parameters() if p.requires_grad)


# ------------------------------------------------------------------ lean gated MLP (LLaMA-style SwiGLU)


def _tiny_decoder(family, seed=0):
    import transformers as T

    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config, "mistral": T.MistralConfig}[family]
    cfg = cls(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("frozen_dtype", [None, "bfloat16"])
def test_lean_gated_mlp_is_bit_identical_and_saves_less(family, frozen_dtype):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (2, 24), generator=g)
    runs = {}
    for lean in (False, True):
        model = _tiny_decoder(family)
        bitfit.apply(model, add_missing=True, frozen_dtype=frozen_dtype, lean=lean)
        model.train()
        assert len(get_lean(model).mlps if lean else []) == (2 if lean else 0)
        params = [*model.parameters(), *model.buffers()]
        n, loss = saved_activation_bytes(lambda: model(input_ids=ids, labels=ids).loss, params)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        runs[lean] = (n, loss.detach(), grads, logits)
    (n0, l0, g0, o0), (n1, l1, g1, o1) = runs[False], runs[True]
    assert torch.equal(l0, l1) and torch.equal(o0, o1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0), family
    itemsize = 2 if frozen_dtype else 4
    assert n0 - n1 >= 2 * (2 * 24 * 64 * itemsize), (n0, n1)  # one [batch, seq, intermediate] less per layer


def test_lean_gated_mlp_switches_off_and_deepcopies():
    model = _tiny_decoder("llama")
    bitfit.apply(model, add_missing=True)
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    assert all("forward" in m.__dict__ for m in mlps)
    assert any("lean gated MLP (2 modules" in m for m in bitfit.report(model).modes)
    clone = copy.deepcopy(model)
    assert clone.model.layers[0].mlp.forward.module is clone.model.layers[0].mlp
    set_lean(model, False)
    assert not any("forward" in m.__dict__ for m in mlps) and get_lean(model).mlps == []
    set_lean(model, True)
    assert len(get_lean(model).mlps) == 2
