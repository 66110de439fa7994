"""bitfit.save / bitfit.load / read_artifact / task_tensors: exact round trips and clean failures."""

import json
import os
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from families import inputs_for, logits_of, make

import bitfit
from bitfit.artifacts import CONFIG_NAME, WEIGHTS_NAME, Artifact, TaskTensors, fingerprint, read_artifact, task_tensors
from bitfit.errors import ArtifactError
from bitfit.core.prepare import bias_tensor


def base(family, seed=0, **kw):
    """A tiny model whose biases are all non-zero (so a difference differs from a value)."""
    m = make(family, seed=seed, **kw)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for mod in m.modules():
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.nn.Parameter):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return m


def train(m, seed=3):
    """Stand-in for training: move every trainable tensor (crossing zero for some elements)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CASES = [
    ("bert", dict()),
    ("gpt2", dict(preset="paper-subset")),  # fused c_attn: only the query slice trains
    ("bloom", dict(preset="paper-subset")),  # fused per-head layout
    ("llama", dict(add_missing=True)),  # every bias added (incl. RMSNorm hooks)
    ("t5", dict(add_missing=True)),
    ("bart", dict(roles=["query", "ln_ffn"])),
    ("qwen2", dict(add_missing=True)),  # q/k/v exist, o_proj/MLP/norm added
]


@pytest.mark.parametrize("family,kw", CASES, ids=[c[0] for c in CASES])
def test_roundtrip_bit_for_bit(family, kw, tmp_path):
    m = train(bitfit.apply(base(family), **kw))
    ref = logits_of(m, family)
    out = bitfit.save(m, tmp_path / "a")
    assert out == tmp_path / "a"
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = bitfit.load(base(family), out)
    assert torch.equal(logits_of(loaded, family), ref)
    # the loaded model is a BitFit model again with the same trainable set
    st, st0 = bitfit.get_state(loaded), bitfit.get_state(m)
    assert st.selection.chosen == st0.selection.chosen and st.added == st0.added
    tr = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert tr == {n for n, p in m.named_parameters() if p.requires_grad}
    assert bitfit.report(loaded).trainable == bitfit.report(m).trainable
    for name in st.selection.chosen:
        assert torch.equal(bias_tensor(loaded, name), bias_tensor(m, name))


def test_file_contents_are_only_trained_tensors(tmp_path):
    m = train(bitfit.apply(base("gpt2"), preset="paper-subset"))
    bitfit.save(m, tmp_path / "a", label_names=["neg", "pos"], base_name="tiny-gpt2")
    stored = safetensors.torch.load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    H, L = 16, 2
    # per layer: the query third of c_attn (H), the whole c_fc (4H); plus the score head (2 x H, no bias)
    bias_keys = sorted(k for k in stored if k.startswith("bias:"))
    assert len(bias_keys) == 2 * L
    assert sum(stored[k].numel() for k in bias_keys) == L * (H + 4 * H)
    assert set(k for k in stored if k.startswith("head:")) == {"head:score.weight"}
    assert all(k.split(":")[0] in ("bias", "head", "fix_idx", "fix_val") for k in stored)
    # a difference from the base, not the value
    name = "transformer.h.0.mlp.c_fc.bias"
    delta = stored[f"bias:{name}"]
    full = bias_tensor(m, name).detach()
    base_val = bitfit.get_state(m).base[name]
    assert torch.allclose(delta, full - base_val) and not torch.allclose(delta, full)
    # the fused slot: query indices only, roles recorded
    q = meta["slots"]["transformer.h.0.attn.c_attn.bias"]
    assert q["roles"] == ["query"] and q["indices"] == H and q["size"] == 3 * H
    assert meta["format_version"] == 1 and meta["dtype"] == "float32"
    assert meta["base_model"]["name"] == "tiny-gpt2"
    assert meta["base_model"]["architecture"] == "GPT2ForSequenceClassification"
    assert meta["base_model"]["config"]["n_embd"] == 16
    assert meta["base_model"]["fingerprint"] == fingerprint(base("gpt2"))
    assert meta["head"]["id2label"] == {"0": "neg", "1": "pos"} and meta["head"]["num_labels"] == 2
    assert meta["bitfit_config"]["preset"] == "paper-subset"
    loaded = bitfit.load(base("gpt2"), tmp_path / "a")
    assert loaded.config.id2label == {0: "neg", 1: "pos"}


def test_added_biases_stored_as_values(tmp_path):
    m = train(bitfit.apply(base("llama"), roles=["query", "ln_attn"], add_missing=True))
    bitfit.save(m, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert sorted(meta["added"]) == sorted(meta["slots"])  # llama has no bias at all
    assert all(s["encoding"] == "value" and s["added"] for s in meta["slots"].values())
    stored = safetensors.torch.load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    name = "model.layers.1.self_attn.q_proj.bias"
    assert torch.equal(stored[f"bias:{name}"], bias_tensor(m, name).detach())


def test_exact_delta_repairs_unrepresentable_differences():
    from bitfit.artifacts.saving import _exact_delta

    base_v = torch.tensor([3.0, 1e-3, 0.5, 0.0, 1.0])
    value = torch.tensor([2.0**-30, -1e-9, 0.5000001, -0.0, 1.25])
    d, idx, val = _exact_delta(value, base_v)
    rebuilt = base_v + d
    rebuilt[idx] = val
    assert torch.equal(rebuilt.view(torch.int32), value.view(torch.int32))
    assert idx.tolist() == [0, 1, 3]  # only the hopeless elements are stored whole (incl. -0.0 from 0.0)


def test_bias_crossing_zero_still_exact(tmp_path):
    m = bitfit.apply(base("bert"))
    q, k = "bert.encoder.layer.0.attention.self.query.bias", "bert.encoder.layer.0.attention.self.key.bias"
    with torch.no_grad():  # values the difference cannot reach exactly
        m.bert.encoder.layer[0].attention.self.query.bias[0] = 2.0**-40  # 1 of 16: an exact fix
        m.bert.encoder.layer[0].attention.self.key.bias[:3] = 2.0**-35  # 3 of 16 (> 1/16): stored whole
    ref = logits_of(m, "bert")
    bitfit.save(m, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert meta["slots"][q]["fixes"] == 1 and meta["slots"][q]["encoding"] == "delta"
    assert meta["slots"][k]["encoding"] == "value"
    stored = safetensors.torch.load_file(str(tmp_path / "a" / WEIGHTS_NAME))
    assert stored[f"fix_idx:{q}"].tolist() == [0] and stored[f"fix_idx:{q}"].dtype == torch.int16
    assert torch.equal(stored[f"bias:{k}"], m.bert.encoder.layer[0].attention.self.key.bias.detach())
    assert torch.equal(logits_of(bitfit.load(base("bert"), tmp_path / "a"), "bert"), ref)


# ---------------------------------------------------------------- contract for the bias bank
@pytest.mark.parametrize("family,kw", [CASES[0], CASES[1], CASES[3]], ids=["bert", "gpt2", "llama"])
def test_task_tensors_contract(family, kw, tmp_path):
    m = train(bitfit.apply(base(family), **kw))
    bitfit.save(m, tmp_path / "a")
    b = base(family)
    before = snapshot(b)
    st = bitfit.get_state(m)
    for source in (tmp_path / "a", str(tmp_path / "a"), read_artifact(tmp_path / "a"), m):
        tt = task_tensors(b, source)
        assert isinstance(tt, TaskTensors)
        assert set(tt.biases) == set(st.selection.chosen)
        for name, v in tt.biases.items():
            assert v.dtype == torch.float32
            assert torch.equal(v, bias_tensor(m, name).detach().float()), name
        assert sorted(tt.added) == sorted(st.added)
        params = dict(m.named_parameters())
        assert set(tt.head) == set(st.model_map.head_params)
        for n, v in tt.head.items():
            assert torch.equal(v, params[n].detach())
        assert tt.meta["num_labels"] == (m.config.num_labels if st.model_map.head_params else None)
        assert tt.meta["fingerprint"] == fingerprint(b)
    assert same_state(before, snapshot(b)) and bitfit.get_state(b) is None
    art = read_artifact(tmp_path / "a")
    assert isinstance(art, Artifact) and all(
        t.dtype == torch.float32 for k, t in art.tensors.items() if not k.startswith("fix_idx")
    )


def test_task_tensors_over_bare_body(tmp_path):
    """The bank may hold the bare body (BertModel): names carry the saved model's prefix."""
    import transformers as T

    m = train(bitfit.apply(base("bert")))
    bitfit.save(m, tmp_path / "a")
    body = T.BertModel(m.config)
    body.load_state_dict(base("bert").bert.state_dict())
    tt = task_tensors(body, tmp_path / "a")
    assert torch.equal(tt.biases["bert.encoder.layer.1.output.dense.bias"],
                       m.bert.encoder.layer[1].output.dense.bias.detach())
    assert tt.meta["base_prefix"] == "bert."


# ---------------------------------------------------------------- storage precision
@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("int8", 5e-2)])
def test_lossy_dtypes(dtype, tol, tmp_path):
    m = train(bitfit.apply(base("bert")))
    ref = logits_of(m, "bert")
    bitfit.save(m, tmp_path / "f32")
    bitfit.save(m, tmp_path / "q", dtype=dtype)
    stored = safetensors.torch.load_file(str(tmp_path / "q" / WEIGHTS_NAME))
    want = torch.float16 if dtype == "float16" else torch.int8
    assert all(t.dtype == want for k, t in stored.items() if k.startswith(("bias:", "head:")))
    if dtype == "int8":
        assert all(f"scale:{k}" in stored for k in stored if k.startswith(("bias:", "head:")))
    out = logits_of(bitfit.load(base("bert"), tmp_path / "q"), "bert")
    err = (out - ref).abs().max().item()
    assert 0 < err < tol
    def payload(p):  # tensor bytes (the header dominates the file size of a tiny model)
        return sum(t.numel() * t.element_size() for t in safetensors.torch.load_file(str(p / WEIGHTS_NAME)).values())

    assert payload(tmp_path / "q") < payload(tmp_path / "f32") * (0.51 if dtype == "float16" else 0.35)  # + 4-byte scales


def test_bad_dtype(tmp_path):
    m = bitfit.apply(base("bert"))
    with pytest.raises(ArtifactError, match="storage dtype"):
        bitfit.save(m, tmp_path / "a", dtype="int4")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_catches_other_base(tmp_path):
    m = train(bitfit.apply(base("bert")))
    bitfit.save(m, tmp_path / "a", base_name="my-bert")
    fp = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["base_model"]["fingerprint"]
    other = base("bert", seed=1)  # same config, other weights
    before = snapshot(other)
    with pytest.raises(ArtifactError) as e:
        bitfit.load(other, tmp_path / "a")
    assert "my-bert" in str(e.value) and fp in str(e.value) and "strict=False" in str(e.value)
    assert same_state(before, snapshot(other)) and bitfit.get_state(other) is None
    with pytest.warns(UserWarning, match="my-bert"):
        loaded = bitfit.load(other, tmp_path / "a", strict=False)
    assert bitfit.get_state(loaded) is not None


def test_fingerprint_properties():
    a = base("bert")
    fa = fingerprint(a)
    assert fa == fingerprint(base("bert"))  # deterministic
    assert fa != fingerprint(base("bert", seed=1))
    assert fingerprint(bitfit.apply(base("bert"))) == fa  # unchanged by apply
    assert fingerprint(train(bitfit.apply(base("bert")))) == fa  # biases and head are not part of it
    assert fingerprint(base("bert").to(torch.bfloat16)) == fa  # float32 vs bfloat16 storage
    import transformers as T

    body = T.BertModel(a.config)
    body.load_state_dict(a.bert.state_dict())
    assert fingerprint(body) == fa  # head class does not matter


# ---------------------------------------------------------------- clean failures
@pytest.fixture
def saved(tmp_path):
    m = train(bitfit.apply(base("bert")))
    bitfit.save(m, tmp_path / "a")
    return tmp_path / "a", m


def _edit_json(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    fn(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta))


def _targets():
    """A fresh base, and a BitFit model carrying another task: both must come out untouched."""
    fresh = base("bert")
    other_task = train(bitfit.apply(base("bert"), preset="paper-subset"), seed=9)
    return [fresh, other_task]


def _resave_tensors(path, fn):
    import hashlib

    t = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
    fn(t)
    safetensors.torch.save_file(t, str(path / WEIGHTS_NAME))
    _edit_json(path, lambda m: m.update(weights_sha256=hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()))


BREAKS = {
    "missing-folder": (lambda p: p.rename(p.with_name("gone")), "does not exist"),
    "missing-weights": (lambda p: (p / WEIGHTS_NAME).unlink(), "is missing"),
    "missing-config": (lambda p: (p / CONFIG_NAME).unlink(), "is missing"),
    "truncated-weights": (
        lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:300]), "truncated"
    ),
    "garbage-weights": (lambda p: (p / WEIGHTS_NAME).write_bytes(b"\x00" * 64), "truncated"),
    "corrupted-json": (lambda p: (p / CONFIG_NAME).write_text('{"format": "bitfit-artifact", "form'), "not valid JSON"),
    "not-an-artifact": (lambda p: (p / CONFIG_NAME).write_text('{"hello": 1}'), "not a bitfit artifact"),
    "newer-version": (lambda p: _edit_json(p, lambda m: m.update(format_version=99)), "upgrade bitfit"),
    "unknown-role": (
        lambda p: _edit_json(p, lambda m: m["slots"][next(iter(m["slots"]))].update(roles=["telepathy"])),
        "unknown role",
    ),
    "unknown-role-in-config": (
        lambda p: _edit_json(p, lambda m: m["bitfit_config"].update(roles=["telepathy"])),
        "unknown role",
    ),
    "checksum": (
        lambda p: _resave_tensors(p, lambda t: None) or _edit_json(p, lambda m: m.update(weights_sha256="0" * 64)),
        "checksum",
    ),
    "missing-key": (
        lambda p: _resave_tensors(p, lambda t: t.pop("bias:bert.pooler.dense.bias")), "missing from"
    ),
    "extra-key": (lambda p: _resave_tensors(p, lambda t: t.update({"bias:x": torch.zeros(2)})), "unexpected"),
    "wrong-numel": (
        lambda p: _resave_tensors(p, lambda t: t.update({"bias:bert.pooler.dense.bias": torch.zeros(5)})),
        "has 5 values",
    ),
    "head-shape": (
        lambda p: _edit_json(p, lambda m: m["head"]["params"].update({"classifier.weight": [3, 16]}))
        or _resave_tensors(p, lambda t: t.update({"head:classifier.weight": torch.zeros(3, 16)})),
        "num_labels",
    ),
    "slot-size": (
        lambda p: _edit_json(p, lambda m: m["slots"]["bert.pooler.dense.bias"].update(size=17))
        or _resave_tensors(p, lambda t: t.update({"bias:bert.pooler.dense.bias": torch.zeros(17)})),
        "do not fit",
    ),
    "other-architecture": (
        lambda p: _edit_json(p, lambda m: m["slots"].update(
            {"transformer.h.0.attn.c_attn.bias": m["slots"].pop("bert.pooler.dense.bias")}))
        or _resave_tensors(p, lambda t: t.update(
            {"bias:transformer.h.0.attn.c_attn.bias": t.pop("bias:bert.pooler.dense.bias")})),
        "does not fit",
    ),
}


@pytest.mark.parametrize("case", list(BREAKS))
def test_failures_are_clean_and_leave_model_untouched(case, saved):
    path, _ = saved
    breaker, msg = BREAKS[case]
    breaker(path)
    path = path if path.exists() else path
    for target in _targets():
        before, state = snapshot(target), bitfit.get_state(target)
        logits = logits_of(target, "bert")
        with pytest.raises(ArtifactError, match=msg):
            bitfit.load(target, path)
        assert same_state(before, snapshot(target))
        assert bitfit.get_state(target) is state
        assert torch.equal(logits_of(target, "bert"), logits)


# ---------------------------------------------------------------- atomic save
def test_atomic_save_leaves_nothing_on_failure(tmp_path, monkeypatch):
    m = train(bitfit.apply(base("bert")))
    real = safetensors.torch.save_file

    def half_then_die(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_die)
    with pytest.raises(OSError, match="disk full"):
        bitfit.save(m, tmp_path / "new")
    assert os.listdir(tmp_path) == []  # no target, no temp folder

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    bitfit.save(m, tmp_path / "old")
    (tmp_path / "old" / "train_log.txt").write_text("kept")
    old = {f: (tmp_path / "old" / f).read_bytes() for f in os.listdir(tmp_path / "old")}
    train(m, seed=5)
    monkeypatch.setattr(safetensors.torch, "save_file", half_then_die)
    with pytest.raises(OSError):
        bitfit.save(m, tmp_path / "old")
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert {f: (tmp_path / "old" / f).read_bytes() for f in os.listdir(tmp_path / "old")} == old
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    ref = logits_of(m, "bert")
    bitfit.save(m, tmp_path / "old")  # overwrite keeps other files in the folder
    assert (tmp_path / "old" / "train_log.txt").read_text() == "kept"
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert torch.equal(logits_of(bitfit.load(base("bert"), tmp_path / "old"), "bert"), ref)


def test_save_needs_bitfit_model(tmp_path):
    with pytest.raises(ArtifactError, match="bitfit.apply"):
        bitfit.save(base("bert"), tmp_path / "a")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- task switching, unmerge, str base
def test_loading_another_task_restores_base_first(tmp_path):
    a = train(bitfit.apply(base("llama"), roles=["query", "ln_attn"], add_missing=True), seed=1)
    b = train(bitfit.apply(base("llama"), preset="attention", add_missing=True), seed=2)
    bitfit.save(a, tmp_path / "a")
    bitfit.save(b, tmp_path / "b")
    m = bitfit.load(base("llama"), tmp_path / "a")
    assert torch.equal(logits_of(m, "llama"), logits_of(a, "llama"))
    m = bitfit.load(m, tmp_path / "b")
    assert torch.equal(logits_of(m, "llama"), logits_of(b, "llama"))
    assert not hasattr(m.model.layers[0].input_layernorm, "bias")  # a's added norm bias is gone
    m = bitfit.load(m, tmp_path / "a")
    assert torch.equal(logits_of(m, "llama"), logits_of(a, "llama"))


@pytest.mark.parametrize("family,kw", [CASES[1], CASES[3], CASES[4]], ids=["gpt2", "llama", "t5"])
def test_unmerge_restores_base_exactly(family, kw, tmp_path):
    ref = snapshot(base(family))
    ref_logits = logits_of(base(family), family)
    m = train(bitfit.apply(base(family), **kw))
    assert not torch.equal(logits_of(m, family), ref_logits)
    out = bitfit.unmerge(m)
    assert out is m and bitfit.get_state(m) is None
    assert same_state(ref, snapshot(m))
    assert torch.equal(logits_of(m, family), ref_logits)
    assert all(p.requires_grad for p in m.parameters())
    assert not any(len(mod._forward_hooks) for mod in m.modules())
    bitfit.apply(m, **kw)  # a plain base again: can be prepared anew
    with pytest.raises(ArtifactError, match="no BitFit state"):
        bitfit.unmerge(base(family))


def test_load_from_local_folder_name(tmp_path):
    b = base("bert", num_labels=3)
    b.save_pretrained(tmp_path / "base")
    m = train(bitfit.apply(base("bert", num_labels=3)))
    bitfit.save(m, tmp_path / "a", label_names=["a", "b", "c"])
    loaded = bitfit.load(str(tmp_path / "base"), tmp_path / "a")
    assert type(loaded).__name__ == "BertForSequenceClassification" and loaded.config.num_labels == 3
    assert loaded.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert torch.equal(logits_of(loaded, "bert"), logits_of(m, "bert"))


@pytest.mark.slow
def test_packaged_minilm_by_alias(tmp_path, minilm_dir):
    m = bitfit.core.models.load_model("minilm", num_labels=2, task="classification")
    bitfit.apply(m)
    train(m)
    bitfit.save(m, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    # the biases and classifier, plus the pooler all-MiniLM-L6-v2 never trained (384 x 384 float32), which
    # trains with the head (pooler_head)
    assert "bert.pooler.dense.weight" in meta["head"]["params"]
    assert (tmp_path / "a" / WEIGHTS_NAME).stat().st_size < 200_000 + 385 * 384 * 4
    loaded = bitfit.load("minilm", tmp_path / "a")
    ids = inputs_for("bert")
    with torch.no_grad():
        assert torch.equal(loaded(**ids).logits, m(**ids).logits)
    assert meta["base_model"]["name"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matching base raises no fingerprint warning
        bitfit.load("minilm", tmp_path / "a")


def test_untrained_head_is_stored_and_restored(tmp_path):
    """train_head=False: the head is not trained but is not part of the pretrained base either."""
    m = train(bitfit.apply(base("bert"), preset="paper-subset", train_head=False))
    assert not m.classifier.weight.requires_grad
    bitfit.save(m, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert meta["head"]["trained"] is False and "classifier.weight" in meta["head"]["params"]
    other_head = base("bert")
    with torch.no_grad():
        other_head.classifier.weight.mul_(-1)  # the head is outside the fingerprint
    ref_state = snapshot(other_head)
    loaded = bitfit.load(other_head, tmp_path / "a")
    assert torch.equal(logits_of(loaded, "bert"), logits_of(m, "bert"))
    assert not loaded.classifier.weight.requires_grad
    bitfit.unmerge(loaded)
    assert same_state(ref_state, snapshot(loaded))


def test_roundtrip_with_bfloat16_frozen_base(tmp_path):
    m = train(bitfit.apply(base("bert"), frozen_dtype="bfloat16"))
    assert m.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    ref = logits_of(m, "bert")
    bitfit.save(m, tmp_path / "a")
    loaded = bitfit.load(base("bert"), tmp_path / "a")  # a float32 base: same fingerprint, cast on apply
    assert loaded.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    assert torch.equal(logits_of(loaded, "bert"), ref)
