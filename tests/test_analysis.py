"""Bias change (from memory and from an artifact), gradient magnitudes, rankings, heatmaps."""

import json

import pytest
import torch
from families import inputs_for, make, train_steps

import bitfit
from bitfit.analysis import change as A
from bitfit.analysis.plots import is_png


@pytest.mark.parametrize("family,preset", [("bert", "all"), ("gpt2", "paper-subset")])
def test_change_from_artifact_equals_change_in_memory(tmp_path, family, preset):
    model = make(family)
    bitfit.apply(model, preset=preset)
    before = A.snapshot_biases(model)
    train_steps(model, family, steps=4, weight_decay=0.0)
    after = A.snapshot_biases(model)
    mm = bitfit.get_state(model).model_map
    mem = {(r["role"], r["layer"]): r for r in A.change_table(mm, before, after)}
    bitfit.save(model, tmp_path / "art")
    # slots whose change bitfit.save cannot write exactly are stored as values: those are read against the base
    rows, mm2, meta = A.artifact_change_table(tmp_path / "art", base=make(family))
    art = {(r["role"], r["layer"]): r for r in rows}
    trained = {k for k, r in mem.items() if r["value"] > 0}
    assert set(art) == trained  # the artifact holds exactly the trained roles
    for k in art:
        assert art[k]["dim"] == mem[k]["dim"]
        assert art[k]["value"] == pytest.approx(mem[k]["value"], rel=1e-6)
    # value is the paper's (1/dim) * ||b0 - bf||_1, checked by hand for one bias
    q = "bert.encoder.layer.1.attention.self.query.bias" if family == "bert" else None
    if q:
        want = float((after[q] - before[q]).abs().mean())
        assert art[("query", "1")]["value"] == pytest.approx(want, rel=1e-6)
        assert art[("query", "1")]["dim"] == 16
    else:  # gpt2: only the query third of the fused c_attn bias trained
        assert art[("query", "0")]["dim"] == 16 and ("key", "0") not in art


def _base_with_a_large_query_bias():
    model = make("bert")
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.bias.copy_(1.0 + 1e-3 * torch.arange(16))
    return model


def test_value_encoded_slots_are_read_as_changes_from_the_base(tmp_path):
    """A trained value far below its base value (here 1e-9 against ~1) cannot be written as base + delta in
    float32, so bitfit.save stores that slot as its value; analysis must subtract the base, not read the value
    as a change."""
    model = _base_with_a_large_query_bias()
    bitfit.apply(model, preset="all")
    before = A.snapshot_biases(model)
    train_steps(model, "bert", steps=2, weight_decay=0.0)
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.query.bias.copy_(1e-9 * torch.randn(16))
    after = A.snapshot_biases(model)
    mm = bitfit.get_state(model).model_map
    mem = {(r["role"], r["layer"]): r for r in A.change_table(mm, before, after)}
    bitfit.save(model, tmp_path / "art")
    meta = json.loads((tmp_path / "art" / "bitfit_config.json").read_text())
    encodings = {name: s.get("encoding") for name, s in meta["slots"].items()}
    assert encodings["bert.encoder.layer.1.attention.self.query.bias"] == "value"
    rows, _, _ = A.artifact_change_table(tmp_path / "art", base=_base_with_a_large_query_bias())
    art = {(r["role"], r["layer"]): r for r in rows}
    assert art[("query", "1")]["value"] == pytest.approx(mem[("query", "1")]["value"], rel=1e-6)
    assert art[("query", "1")]["value"] == pytest.approx(float((1.0 + 1e-3 * torch.arange(16)).mean()), rel=1e-6)
    for k in art:
        assert art[k]["value"] == pytest.approx(mem[k]["value"], rel=1e-6), k
    # without a base it cannot know the change, and says how to give one
    with pytest.raises(bitfit.ArtifactError, match="--base"):
        A.artifact_change_table(tmp_path / "art")
    # a base with other frozen weights is refused, not silently subtracted
    other = make("bert")
    with torch.no_grad():
        other.bert.encoder.layer[0].attention.self.query.weight.mul_(2)
    with pytest.raises(bitfit.ArtifactError, match="not the one this artifact was trained on"):
        A.artifact_change_table(tmp_path / "art", base=other)


def test_grad_recorder_key_gets_no_gradient_under_softmax():
    model = make("bert")
    bitfit.apply(model, preset="all")
    rec = A.GradRecorder(model)
    train_steps(model, "bert", steps=3, weight_decay=0.0)
    rec.remove()
    rows = rec.table()
    by = {}
    for r in rows:
        by.setdefault(r["role"], []).append(r["value"])
    key = max(by["key"])
    others = min(min(v) for role, v in by.items() if role not in ("key",))
    assert others > 0
    assert key < 1e-6 * others  # zero up to rounding
    ranking = A.rank(rows)
    assert ranking["roles"][-1]["role"] == "key"
    assert "no gradient" in A.zero_grad_note(bitfit.get_state(model).model_map)
    # a removed recorder records nothing more
    calls = dict(rec.calls)
    train_steps(model, "bert", steps=1, weight_decay=0.0)
    assert rec.calls == calls


def test_measure_gradients_matches_recorder_and_restores_flags():
    model = make("bert")
    bitfit.apply(model, preset="none")  # head only: biases are frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    batch = {**inputs_for("bert", batch=4), "labels": torch.tensor([0, 1, 1, 0])}
    means = A.measure_gradients(model, [batch, batch])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    q = "bert.encoder.layer.0.attention.self.query.bias"
    # same value as one backward by hand (two identical batches average to one)
    ref = make("bert")
    ref.eval()
    ref(**batch).loss.backward()
    torch.testing.assert_close(means[q], ref.get_submodule(q[:-5]).bias.grad.abs())
    v = means["bert.encoder.layer.0.attention.self.value.bias"].mean()
    assert means["bert.encoder.layer.0.attention.self.key.bias"].max() < 1e-4 * v


def test_rotary_model_key_does_get_gradient():
    model = make("qwen2")  # Qwen2 has q/k/v biases and rotary embeddings
    mm = bitfit.discover(model)
    assert mm.zero_grad_roles == ()
    batch = {**inputs_for("qwen2", batch=4), "labels": torch.tensor([0, 1, 1, 0])}
    means = A.measure_gradients(model, [batch])
    rows = A.grad_table(mm, means)
    key = [r["value"] for r in rows if r["role"] == "key"]
    assert key and min(key) > 1e-6
    assert "rotary" in A.zero_grad_note(mm)


def test_write_report_files(tmp_path):
    model = make("bert")
    bitfit.apply(model)
    before = A.snapshot_biases(model)
    rec = A.GradRecorder(model)
    train_steps(model, "bert", steps=4, weight_decay=0.0)
    mm = bitfit.get_state(model).model_map
    change = A.change_table(mm, before, A.snapshot_biases(model))
    res = A.write_report(tmp_path, change, rec.table(), mm)
    for name in ("bias_change.csv", "bias_change.png", "bias_grad.csv", "bias_grad.png", "ranking.md", "ranking.json"):
        assert (tmp_path / name).stat().st_size > 100, name
    assert is_png(tmp_path / "bias_change.png")
    back = A.read_csv(tmp_path / "bias_change.csv")
    assert [(r["role"], r["layer"], r["dim"]) for r in back] == [(r["role"], str(r["layer"]), r["dim"]) for r in change]
    m, roles, layers = A.grid(change)
    assert roles == ["b_q", "b_k", "b_v", "b_m1", "b_LN1", "b_m2", "b_m3", "b_LN2"] and layers == ["0", "1"]
    assert not torch.isnan(torch.tensor(m)).any()
    md = (tmp_path / "ranking.md").read_text()
    assert "b_k" in md and "no gradient" in md
    assert res["change"]["roles"][0]["value"] >= res["change"]["roles"][-1]["value"]
