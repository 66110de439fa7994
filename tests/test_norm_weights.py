"""All 1-D vectors: biases plus the LayerNorm/RMSNorm gains (train_norm_weights). Exact trainable
counts, save / load / merge / unmerge bit for bit, the artifact's norm_weights section, old artifacts, refusals."""

import json

import pytest
import torch
from families import logits_of, make, train_steps
from torch import nn

import bitfit
from bitfit.artifacts import fingerprint, read_artifact, task_tensors
from bitfit.errors import ArtifactError, BitFitConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _norms(model, cls_names=("LayerNorm",)):
    """Norm modules of the body (not the head) with a 1-D gain."""
    return [m for n, m in model.named_modules()
            if type(m).__name__.endswith(cls_names) and isinstance(getattr(m, "weight", None), nn.Parameter)
            and not n.startswith(("classifier", "score", "lm_head"))]


def _lm_steps(model, steps=3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        extra = {"decoder_input_ids": ids[:, :4], "labels": ids[:, 1:5].contiguous()} if model.config.is_encoder_decoder else \
            {"labels": ids}
        model(input_ids=ids, **extra).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def test_trainable_counts_are_exact():
    plain = make("bert")
    bitfit.apply(plain)
    model = make("bert")
    bitfit.apply(model, train_norm_weights=True)
    c = model.config
    norms = _norms(model)
    assert len(norms) == 1 + 2 * c.num_hidden_layers  # embeddings + 2 per layer
    assert _count(model) == _count(plain) + c.hidden_size * len(norms)
    biases = sum(m.bias.numel() for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)
                 and m is not model.classifier)
    head = c.hidden_size * c.num_labels + c.num_labels
    assert _count(model) == biases + c.hidden_size * len(norms) + head == 434
    assert bitfit.report(model).trainable == 434
    # LLaMA has no bias at all: the gains alone train (RMSNorm: 2 per layer + the final norm), plus nothing else
    llama = make("llama")
    with pytest.warns(UserWarning, match="have no bias"):
        bitfit.apply(llama, train_norm_weights=True, train_head=False)
    lc = llama.config
    assert _count(llama) == lc.hidden_size * (2 * lc.num_hidden_layers + 1)
    assert all(n.endswith("norm.weight") for n, p in llama.named_parameters() if p.requires_grad)
    # the selection narrows the gains with the biases: layers and roles
    m = make("bert")
    bitfit.apply(m, roles=["ln_ffn"], layers="-1:", train_norm_weights=True, train_head=False)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        "bert.encoder.layer.1.output.LayerNorm.weight", "bert.encoder.layer.1.output.LayerNorm.bias"]


def test_selection_without_a_norm_is_refused():
    with pytest.raises(BitFitConfigError, match="train_norm_weights=True but the selection covers no LayerNorm"):
        bitfit.apply(make("bert"), preset="paper-subset", train_norm_weights=True)


@pytest.mark.filterwarnings("ignore:.*have no bias in this llama model")
@pytest.mark.parametrize("family", ["bert", "gpt2", "bart", "llama", "t5"])
def test_save_load_merge_unmerge_exact(family, tmp_path):
    model = make(family)
    bitfit.apply(model, train_norm_weights=True, add_missing=family == "t5")
    state = bitfit.get_state(model)
    fp = fingerprint(model)
    base_logits = logits_of(make(family), family)
    (_lm_steps if family in ("llama", "t5") else train_steps)(model, *(() if family in ("llama", "t5") else (family,)))
    params = dict(model.named_parameters())
    moved = [n for n in state.selection.norm_weights if not torch.equal(params[n], state.base[n])]
    assert moved == state.selection.norm_weights and moved
    assert fingerprint(model) == fp  # the trained gains count with their pretrained values
    trained = logits_of(model, family)
    bitfit.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "bitfit_config.json").read_text())
    assert meta["format_version"] == 2 and meta["bitfit_config"]["train_norm_weights"] is True
    assert sorted(meta["norm_weights"]) == sorted(state.selection.norm_weights)
    art = read_artifact(tmp_path / "a")
    for n in state.selection.norm_weights:  # the artifact holds the trained gains (as differences from the base)
        s = meta["norm_weights"][n]
        v = art.tensors[f"norm:{n}"] + (state.base[n].reshape(-1) if s["encoding"] == "delta" else 0)
        if s.get("fixes"):
            v[art.tensors[f"fix_idx:norm:{n}"]] = art.tensors[f"fix_val:norm:{n}"]
        assert torch.equal(v, params[n].detach().reshape(-1)), n
    loaded = bitfit.load(make(family), tmp_path / "a")
    assert torch.equal(logits_of(loaded, family), trained)  # bit for bit on the base
    assert bitfit.get_state(loaded).selection.norm_weights == state.selection.norm_weights
    if family != "t5":  # (t5: RMSNorm biases added by add_missing have no place in T5 for a merge)
        merged = bitfit.merge(bitfit.load(make(family), tmp_path / "a"))
        assert bitfit.get_state(merged) is None
        assert torch.equal(logits_of(merged, family), trained)
    bitfit.unmerge(loaded)
    assert torch.equal(logits_of(loaded, family), base_logits)
    fresh = dict(make(family).named_parameters())
    for n, p in loaded.named_parameters():
        assert torch.equal(p, fresh[n]), n


def test_low_precision_storage_and_bf16_frozen_base(tmp_path):
    model = make("bert")
    bitfit.apply(model, train_norm_weights=True, frozen_dtype="bfloat16")
    gains = [p for n, p in model.named_parameters() if n in bitfit.get_state(model).selection.norm_weights]
    assert all(p.dtype == torch.float32 and p.requires_grad for p in gains)
    train_steps(model)
    for dtype in ("float16", "int8"):
        bitfit.save(model, tmp_path / dtype, dtype=dtype)
        loaded = bitfit.load(make("bert"), tmp_path / dtype)
        got = dict(loaded.named_parameters())
        for n, p in model.named_parameters():
            if n in bitfit.get_state(model).selection.norm_weights:
                torch.testing.assert_close(got[n], p.detach(), atol=2e-2, rtol=1e-2)


def test_plain_artifact_keeps_the_old_format_and_old_artifacts_load(tmp_path):
    model = make("bert")
    bitfit.apply(model)
    train_steps(model)
    bitfit.save(model, tmp_path / "plain")
    meta = json.loads((tmp_path / "plain" / "bitfit_config.json").read_text())
    # written exactly as before norm gains could train: version 1, no norm_weights section, no new config field
    assert meta["format_version"] == 1 and "norm_weights" not in meta
    assert "train_norm_weights" not in meta["bitfit_config"]
    loaded = bitfit.load(make("bert"), tmp_path / "plain")
    assert torch.equal(logits_of(loaded, "bert"), logits_of(model, "bert"))
    assert not bitfit.get_state(loaded).config.train_norm_weights
    assert task_tensors(make("bert"), tmp_path / "plain").biases  # the bank still takes it


def _saved_with_gains(tmp_path):
    model = make("bert")
    bitfit.apply(model, train_norm_weights=True)
    train_steps(model)
    return bitfit.save(model, tmp_path / "g"), model


def _edit(path, fn):
    f = path / "bitfit_config.json"
    meta = json.loads(f.read_text())
    fn(meta)
    f.write_text(json.dumps(meta))


def test_damaged_or_mismatched_norm_sections_are_refused(tmp_path):
    import safetensors.torch

    path, _ = _saved_with_gains(tmp_path)
    name = "bert.encoder.layer.0.output.LayerNorm.weight"
    w = path / "bitfit_model.safetensors"
    raw = safetensors.torch.load_file(str(w))
    del raw[f"norm:{name}"]
    safetensors.torch.save_file(raw, str(w))
    with pytest.raises(ArtifactError, match="checksum differs"):
        bitfit.load(make("bert"), path)
    path, _ = _saved_with_gains(tmp_path / "2")
    _edit(path, lambda m: m["norm_weights"].pop(name))
    with pytest.raises(ArtifactError, match="unexpected tensor"):
        bitfit.load(make("bert"), path, strict=False)
    path, _ = _saved_with_gains(tmp_path / "3")
    _edit(path, lambda m: m["norm_weights"][name].update(encoding="zip"))
    with pytest.raises(ArtifactError, match="norm gain .* unknown encoding"):
        bitfit.load(make("bert"), path, strict=False)
    path, _ = _saved_with_gains(tmp_path / "4")  # config says no gains, the tensors hold them
    _edit(path, lambda m: m["bitfit_config"].update(train_norm_weights=False))
    with pytest.raises(ArtifactError, match="trained the norm gains of 5 modules, but its config selects 0"):
        bitfit.load(make("bert"), path, strict=False)


def test_bank_and_peft_form_refuse_trained_gains(tmp_path):
    path, model = _saved_with_gains(tmp_path)
    with pytest.raises(ArtifactError, match="trained norm gains .* bias bank"):
        task_tensors(make("bert"), path)
    with pytest.raises(ArtifactError, match="trained norm gains .* bias bank"):
        task_tensors(make("bert"), model)
    from bitfit.peft.convert import pack, to_peft_tensors

    with pytest.raises(ArtifactError, match="peft adapter form holds biases and the head only"):
        to_peft_tensors(pack(model))


def test_format_v1_artifact_without_norm_gains_loads_and_reproduces_its_logits():
    """tests/data/artifact_v1_bert was saved by bitfit at commit cb03bc9 (format version 1, before norm gains
    could train) from families.make("bert") trained by families.train_steps; it loads onto the same base and
    reproduces that model's logits.

    The stored logits were computed on one CPU. The loaded parameters are the saved ones bit for bit, but a
    float32 forward on another CPU's kernels (AVX2, AVX-512, AMX differ in SIMD width and so in the order of
    each dot product's sums) rounds differently: with dot products of <= 37 terms (hidden 32, intermediate
    37) through two layers, float32 rounding moves a logit by a few 1e-7 relative; 1e-5 relative (plus 1e-6
    absolute for logits near zero) is far below any change a wrong or missing bias would make (>= 1e-3 here)."""
    from pathlib import Path

    from families import inputs_for

    data = Path(__file__).parent / "data"
    meta = json.loads((data / "artifact_v1_bert" / "bitfit_config.json").read_text())
    assert meta["format_version"] == 1 and "norm_weights" not in meta
    assert "train_norm_weights" not in meta["bitfit_config"]
    want = json.loads((data / "artifact_v1_bert.logits.json").read_text())["logits"]
    base = make("bert", pretrained_pooler=False)  # families.make as it was then: the pooler bias all zeros
    assert "pooler_head" not in meta["bitfit_config"]  # saved before the option: the pooler stays in the body
    if fingerprint(base) != meta["base_model"]["fingerprint"]:
        pytest.skip("this torch builds another random tiny BERT from the seed than the one the artifact was saved on")
    model = bitfit.load(base, data / "artifact_v1_bert")
    assert not bitfit.get_state(model).selection.norm_weights
    with torch.no_grad():
        got = model(**inputs_for("bert")).logits
    torch.testing.assert_close(got, torch.tensor([[float.fromhex(x) for x in row] for row in want]), rtol=1e-5, atol=1e-6)
    # and the tolerance is meaningful: the base without the artifact is far from those logits
    with torch.no_grad():
        plain = make("bert", pretrained_pooler=False)(**inputs_for("bert")).logits
    assert (plain - got).abs().max() > 1e-3
