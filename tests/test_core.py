"""bitfit.apply / roles / presets / report on tiny models of every family.

Expected counts are computed here from the config dimensions, never by calling the library.
"""

import re
import warnings

import pytest
import torch
import transformers as T
from families import FAM, inputs_for, logits_of, make

import bitfit
from bitfit.errors import AlreadyPreparedError, BitFitConfigError


def expected_bias_roles(family, cfg):
    """role -> bias parameters for preset 'all' (with add_missing where the model has none)."""
    if family in ("bert", "roberta", "electra", "mpnet", "distilbert", "vit"):
        if family == "distilbert":
            H, I, L = cfg.dim, cfg.hidden_dim, cfg.n_layers
        else:
            H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
        r = {k: L * H for k in ("query", "key", "value", "attn_out", "ln_attn", "ffn_out", "ln_ffn")}
        r["ffn_in"] = L * I
        if family == "vit":
            r["embed_proj"] = H
            r["final_ln"] = H
        else:
            r["embed_ln"] = getattr(cfg, "embedding_size", H) if family == "electra" else H
        if family == "electra":
            r["embed_proj"] = H
        if family == "bert":
            r["pooler"] = H
        return r
    if family in ("gpt2", "bloom"):
        H = cfg.hidden_size
        L = cfg.num_hidden_layers
        r = {k: L * H for k in ("query", "key", "value", "attn_out", "ln_attn", "ffn_out", "ln_ffn")}
        r["ffn_in"] = L * 4 * H
        r["final_ln"] = H
        if family == "bloom":
            r["embed_ln"] = H
        return r
    if family == "opt":
        H, L = cfg.hidden_size, cfg.num_hidden_layers
        r = {k: L * H for k in ("query", "key", "value", "attn_out", "ln_attn", "ffn_out", "ln_ffn")}
        r["ffn_in"] = L * cfg.ffn_dim
        r["final_ln"] = H
        return r
    if family in ("qwen2", "llama"):
        H, L, I = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size
        kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)
        r = {"query": L * H, "key": L * kv, "value": L * kv, "attn_out": L * H, "ln_attn": L * H,
             "ffn_in": L * 2 * I, "ffn_out": L * H, "ln_ffn": L * H, "final_ln": H}
        return r
    if family == "t5":
        d, inner, F, L = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff, cfg.num_layers
        Ld = cfg.num_decoder_layers
        r = {"query": (L + Ld) * inner, "key": (L + Ld) * inner, "value": (L + Ld) * inner,
             "attn_out": (L + Ld) * d, "ln_attn": (L + Ld) * d, "ffn_in": (L + Ld) * F,
             "ffn_out": (L + Ld) * d, "ln_ffn": (L + Ld) * d,
             "cross_query": Ld * inner, "cross_key": Ld * inner, "cross_value": Ld * inner,
             "cross_out": Ld * d, "ln_cross": Ld * d, "final_ln": 2 * d}
        return r
    if family == "bart":
        d, Le, Ld = cfg.d_model, cfg.encoder_layers, cfg.decoder_layers
        r = {k: (Le + Ld) * d for k in ("query", "key", "value", "attn_out", "ln_attn", "ffn_out", "ln_ffn")}
        r["ffn_in"] = Le * cfg.encoder_ffn_dim + Ld * cfg.decoder_ffn_dim
        r.update({k: Ld * d for k in ("cross_query", "cross_key", "cross_value", "cross_out", "ln_cross")})
        r["embed_ln"] = 2 * d
        return r
    raise AssertionError(family)


def expected_head(family, cfg):
    H = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or cfg.dim
    n = cfg.num_labels
    if family in ("bert", "vit"):
        return H * n + n
    if family in ("roberta", "electra", "mpnet", "bart", "distilbert"):
        return H * H + H + H * n + n
    if family in ("gpt2", "bloom", "opt", "qwen2"):
        return H * n  # score has no bias
    return 0  # causal / seq2seq LM: tied lm_head never trains


NEEDS_ADD = {"qwen2", "llama", "t5"}


@pytest.mark.parametrize("family", list(FAM))
def test_all_preset_counts_per_role(family):
    model = make(family)
    cfg = model.config
    bitfit.apply(model, preset="all", add_missing=family in NEEDS_ADD)
    rep = bitfit.report(model)
    exp = expected_bias_roles(family, cfg)
    got = {r: c["trainable"] for r, c in rep.by_role.items() if r != "head"}
    assert got == exp
    assert rep.head == expected_head(family, cfg)
    assert rep.trainable == sum(exp.values()) + expected_head(family, cfg)
    assert rep.total == sum(p.numel() for p in model.parameters())
    assert rep.other == []
    # requires_grad matches the report exactly
    n_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_grad == rep.trainable


@pytest.mark.parametrize("family", list(FAM))
def test_paper_subset_trains_query_and_ffn_in_only(family):
    model = make(family)
    bitfit.apply(model, preset="paper-subset", add_missing=family in NEEDS_ADD)
    rep = bitfit.report(model)
    exp = expected_bias_roles(family, model.config)
    trained = {r for r, c in rep.by_role.items() if c["trainable"] and r != "head"}
    assert trained == {"query", "ffn_in"}
    assert rep.trainable == exp["query"] + exp["ffn_in"] + expected_head(family, model.config)


def test_bert_base_paper_numbers(bert_base_dir):
    cfg = T.BertConfig.from_pretrained(bert_base_dir, num_labels=2)
    with torch.device("meta"):
        model = T.BertForSequenceClassification(cfg)
    total = sum(p.numel() for p in model.parameters())
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    head = H * 2 + 2
    assert total == 109_483_778
    bitfit.apply(model, preset="all")
    rep = bitfit.report(model)
    biases = L * (8 * H + I - H) + H + H  # 8 roles per layer (ffn_in is I wide) + embed LN + pooler
    assert biases == 102_912
    assert rep.trainable == biases + head
    assert rep.bias_total == 102_912
    assert round(100 * biases / total, 3) == 0.094

    with torch.device("meta"):
        model = T.BertForSequenceClassification(cfg)
    bitfit.apply(model, preset="paper-subset")
    rep = bitfit.report(model)
    assert rep.trainable - head == L * (H + I) == 46_080
    assert round(100 * 46_080 / total, 3) == 0.042


def test_packaged_minilm_reports_its_biases(minilm_dir):
    model = T.AutoModel.from_pretrained(minilm_dir)
    bitfit.apply(model)
    rep = bitfit.report(model)
    assert rep.bias_total == 26_112
    assert rep.trainable == 26_112  # no head on the bare encoder


@pytest.mark.parametrize(
    "preset,roles",
    [
        ("attention", {"query", "key", "value", "attn_out"}),
        ("ffn", {"ffn_in", "ffn_out"}),
        ("layernorm", {"ln_attn", "ln_ffn", "embed_ln"}),
        ("none", set()),
    ],
)
def test_other_presets(preset, roles):
    model = make("bert")
    bitfit.apply(model, preset=preset)
    rep = bitfit.report(model)
    trained = {r for r, c in rep.by_role.items() if c["trainable"] and r != "head"}
    assert trained == roles
    assert rep.head == 16 * 2 + 2


def test_layers_include_exclude():
    model = make("bert", num_hidden_layers=4)
    bitfit.apply(model, preset="all", layers="-2:", exclude=["key"], include=[r"pooler"])
    rep = bitfit.report(model)
    assert set(rep.by_layer) == {"2", "3"}
    H, I = 16, 32
    assert rep.by_layer["2"] == 8 * H + I - H - H  # all 8 roles minus key
    assert rep.by_role["key"]["trainable"] == 0
    assert rep.by_role["pooler"]["trainable"] == 0  # layers= drops non-layer biases; include by name ...
    # ... is applied before layers, so the pooler stays out; an explicit role include works the same way
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(re.search(r"layer\.[23]\.", n) or n.startswith("classifier") for n in names)


def test_include_by_name_regex_and_head_off():
    model = make("bert")
    bitfit.apply(model, preset="none", include=[r"layer\.1\.output\.dense"], train_head=False)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == ["bert.encoder.layer.1.output.dense.bias"]


def test_every_other_tensor_frozen_after_apply():
    model = make("roberta")
    bitfit.apply(model, preset="all")
    for name, p in model.named_parameters():
        is_bias = name.endswith(".bias") and not name.startswith("classifier")
        if name.startswith("classifier"):
            assert p.requires_grad, name
        elif is_bias:
            assert p.requires_grad, name
        else:
            assert not p.requires_grad, name


# ------------------------------------------------------------------------- errors
def test_apply_twice_is_an_error():
    model = make("bert")
    bitfit.apply(model)
    with pytest.raises(AlreadyPreparedError, match="already a BitFit model"):
        bitfit.apply(model)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(preset="everything"), "unknown preset"),
        (dict(roles=["querry"]), "unknown role"),
        (dict(include=["key"], exclude=["key"]), "contradictory"),
        (dict(roles=["query"], exclude=["query"]), "contradictory"),
        (dict(include=["head"], train_head=False), "contradictory"),
        (dict(include=["nomatch_xyz"]), "matches no bias"),
        (dict(include=["("]), "valid regex"),
        (dict(layers="1:2:3:4"), "not a valid slice"),
        (dict(layers="7"), "out of range"),
        (dict(frozen_dtype="int4"), "not supported"),
        (dict(add_missing="yes"), "True or False"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    model = make("bert")
    with pytest.raises(BitFitConfigError, match=match):
        bitfit.apply(model, **kwargs)
    assert bitfit.get_state(model) is None
    assert all(p.requires_grad for p in model.parameters())  # untouched


def test_config_and_keywords_together_is_an_error():
    model = make("bert")
    with pytest.raises(BitFitConfigError, match="either config= or keyword"):
        bitfit.apply(model, preset="ffn", config=bitfit.BitFitConfig(preset="all"))


def test_config_object_and_round_trip():
    cfg = bitfit.BitFitConfig(preset="paper-subset", exclude=["pooler"], layers="0:1")
    again = bitfit.BitFitConfig.from_dict(cfg.to_dict())
    assert again == cfg
    model = make("bert")
    bitfit.apply(model, config=cfg)
    assert set(bitfit.report(model).by_layer) == {"0"}


def test_model_without_biases_needs_add_missing():
    model = make("llama")
    with pytest.raises(BitFitConfigError, match="add_missing=True"):
        bitfit.apply(model)


def test_partial_missing_warns():
    model = make("qwen2")
    with pytest.warns(UserWarning, match="add_missing"):
        bitfit.apply(model)
    rep = bitfit.report(model)
    H, L, kv = 16, 2, 8
    assert {r for r, c in rep.by_role.items() if c["trainable"]} == {"query", "key", "value", "head"}
    assert rep.trainable == L * (H + 2 * kv) + H * 2


# ------------------------------------------------------------------ added biases
@pytest.mark.parametrize("family", ["llama", "qwen2", "t5"])
def test_added_biases_keep_outputs_bit_identical(family):
    ref = make(family)
    model = make(family)
    before = logits_of(ref, family)
    bitfit.apply(model, preset="all", add_missing=True)
    after = logits_of(model, family)
    assert torch.equal(before, after)
    state = bitfit.get_state(model)
    assert state.added, "biases were added"
    assert all(n.endswith(".bias") for n in state.added)
    # and the added biases do act: moving one changes the output
    with torch.no_grad():
        for n in state.added:
            if "norm" in n or "layer_norm" in n:
                model.get_parameter(n).add_(0.5)
                break
    assert not torch.equal(logits_of(model, family), before)


def test_report_of_unknown_architecture_uses_other():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mix = torch.nn.Linear(4, 4)
            self.gate = torch.nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.gate(self.mix(x))

    model = torch.nn.Sequential(Block(), Block())
    bitfit.apply(model, preset="all")
    rep = bitfit.report(model)
    assert rep.generic
    assert rep.other == ["0.mix.bias", "1.mix.bias"]
    assert rep.trainable == 8
    assert "role 'other'" in rep.to_markdown()


def test_report_flags_zero_gradient_key_and_skip():
    model = make("bert")
    bitfit.apply(model)
    rep = bitfit.report(model)
    assert rep.zero_grad == ["key"]
    assert "no gradient by construction" in rep.to_markdown()
    model = make("bert")
    bitfit.apply(model, skip_zero_grad=True)
    rep = bitfit.report(model)
    assert rep.zero_grad == [] and rep.by_role["key"]["trainable"] == 0
    assert len(rep.skipped_zero_grad) == 2


def test_key_bias_gradient_is_zero_under_softmax():
    model = make("bert")
    model.train(False)
    bitfit.apply(model)
    out = model(**inputs_for("bert"), labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    g = model.bert.encoder.layer[0].attention.self.key.bias.grad
    q = model.bert.encoder.layer[0].attention.self.query.bias.grad
    assert g.abs().max() < 1e-6 * max(1.0, q.abs().max().item())
    assert q.abs().max() > 0


def test_report_dict_and_markdown():
    model = make("bert")
    bitfit.apply(model, preset="paper-subset")
    rep = bitfit.report(model)
    d = rep.to_dict()
    assert d["trainable"] == rep.trainable and abs(d["fraction"] - rep.trainable / rep.total) < 1e-12
    md = rep.to_markdown()
    assert "| query | b_q |" in md and "| ffn_in | b_m2 |" in md


def test_warning_free_on_full_model():
    model = make("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bitfit.apply(model)
