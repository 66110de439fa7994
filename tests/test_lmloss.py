"""bitfit.fast.lmloss: the chunked LM-head loss equals the plain (full-logits) loss and its gradients, in float32,
bf16 and int8 frozen modes, tied and untied heads, at chunk boundaries, with ignored and absent labels; and the
lean modes with gradient checkpointing on decoder families (LLaMA, Qwen2, Mistral, GPT-2, BLOOM, OPT)."""

import json

import pytest
import torch

import bitfit
from bitfit.fast import lmloss
from bitfit.fast.lmloss import IGNORE_INDEX, chunked_lm_loss, plain_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(seed=0, B=2, T=9, H=16, V=37, bias=False, weight_grad=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(weight_grad)
    b = (torch.randn(V, generator=g) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, :2] = IGNORE_INDEX
    labels[1, -2:] = IGNORE_INDEX  # padding
    return hidden, weight, b, labels


def _grads(loss, tensors):
    tensors = [t for t in tensors if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, tensors)


def _close(a, b, rel=1e-5):
    scale = max(b.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= rel * scale, ((a - b).abs().max().item(), scale)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1000])
@pytest.mark.parametrize("bias,weight_grad", [(False, False), (True, False), (True, True)])
def test_exact_against_plain_float32(chunk, bias, weight_grad):
    hidden, weight, b, labels = _tensors(bias=bias, weight_grad=weight_grad)
    ref = plain_lm_loss(hidden, weight, labels, b)
    out = chunked_lm_loss(hidden, weight, labels, b, chunk_size=chunk)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    for g_out, g_ref in zip(_grads(out, (hidden, weight, b)), _grads(ref, (hidden, weight, b))):
        _close(g_out, g_ref)


def test_sum_over_num_items_in_batch_and_upstream_gradient():
    hidden, weight, b, labels = _tensors(bias=True)
    ref = plain_lm_loss(hidden, weight, labels, b, num_items_in_batch=torch.tensor(23))
    out = chunked_lm_loss(hidden, weight, labels, b, num_items_in_batch=torch.tensor(23), chunk_size=4)
    assert torch.allclose(out, ref, rtol=1e-6)
    for g_out, g_ref in zip(_grads(out * 3.5, (hidden, b)), _grads(ref * 3.5, (hidden, b))):
        _close(g_out, g_ref)


def test_only_labelled_positions_get_gradient():
    hidden, weight, _, labels = _tensors()
    out = chunked_lm_loss(hidden, weight, labels, chunk_size=2)
    (gh,) = _grads(out, (hidden,))
    # position t predicts label t+1: rows whose next label is ignored (and the last position) get nothing
    target = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    assert (gh[target == IGNORE_INDEX] == 0).all()
    assert (gh[target != IGNORE_INDEX].abs().sum(-1) > 0).all()


def test_no_labelled_token_gives_zero_loss_and_zero_gradients():
    hidden, weight, b, labels = _tensors(bias=True)
    labels[:] = IGNORE_INDEX
    out = chunked_lm_loss(hidden, weight, labels, b)
    assert out.item() == 0.0
    gh, gb = _grads(out, (hidden, b))
    assert (gh == 0).all() and (gb == 0).all()
    assert torch.isnan(plain_lm_loss(hidden, weight, labels, b))  # the plain mean: 0/0
    # with num_items_in_batch (gradient accumulation) both give 0
    assert plain_lm_loss(hidden, weight, labels, b, num_items_in_batch=5).item() == 0.0
    assert chunked_lm_loss(hidden, weight, labels, b, num_items_in_batch=5).item() == 0.0


def test_custom_ignore_index_and_no_grad():
    hidden, weight, _, labels = _tensors()
    labels[labels == IGNORE_INDEX] = -1
    ref = plain_lm_loss(hidden, weight, labels, ignore_index=-1)
    with torch.no_grad():
        out = chunked_lm_loss(hidden, weight, labels, ignore_index=-1, chunk_size=3)
    assert not out.requires_grad and torch.allclose(out, ref, rtol=1e-6)


def test_bf16_autocast_matches_plain():
    hidden, weight, b, labels = _tensors(H=64, V=301, T=17, bias=True)
    w16 = weight.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.functional.linear(hidden, w16, b)  # what a bf16-frozen head computes
    from transformers.loss.loss_utils import ForCausalLMLoss

    ref = ForCausalLMLoss(logits.float(), labels, 301)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_lm_loss(hidden, w16, labels, b, chunk_size=4)
    assert torch.allclose(out, ref, rtol=1e-5)
    for g_out, g_ref in zip(_grads(out, (hidden, b)), _grads(ref, (hidden, b))):
        _close(g_out, g_ref, rel=2e-2)  # bf16 rounding of the logit gradient; the same ops


def test_default_chunk_size():
    assert lmloss.default_chunk_size(151936) == 48 and lmloss.default_chunk_size(49152) == 160
    assert lmloss.default_chunk_size(50) == lmloss.MAX_CHUNK


# ------------------------------------------------------------------ on models


def tiny_causal(family="llama", tied=True, seed=0, vocab=97, **over):
    import transformers as T

    common = dict(vocab_size=vocab, tie_word_embeddings=tied)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        cfg = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **common)  # grouped-query attention
    elif family == "gpt2":
        cfg = T.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    elif family == "bloom":
        cfg = T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
    elif family == "opt":
        cfg = T.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=64, word_embed_proj_dim=32, **common)
    else:
        raise ValueError(family)
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg)


def batch(vocab=97, B=3, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    mask[-1, -5:] = 0
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # the prompt
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trained_grads(model, loss):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [dict(model.named_parameters())[n] for n in names], allow_unused=True)
    return {n: (torch.zeros_like(dict(model.named_parameters())[n]) if g is None else g) for n, g in zip(names, grads)}


def _compare(model, b, rel, chunk=5):
    model.train()
    torch.manual_seed(0)
    ref = model(**b).loss
    g_ref = _trained_grads(model, ref)
    torch.manual_seed(0)
    out, _ = lmloss.model_loss(model, b, chunk_size=chunk)
    g_out = _trained_grads(model, out)
    assert torch.isfinite(out)
    assert abs(out.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())) * (100 if rel > 1e-3 else 1)
    top = max(g.abs().max().item() for g in g_ref.values())
    for n in g_ref:
        diff = (g_out[n] - g_ref[n]).abs().max().item()
        assert diff <= rel * top, (n, diff, top)
    return out, g_out


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("frozen_dtype,rel", [(None, 1e-5), ("bfloat16", 2e-2), ("int8", 2e-2)])
def test_model_loss_equals_model_loss_plain(tied, frozen_dtype, rel):
    model = tiny_causal("llama", tied=tied)
    bitfit.apply(model, add_missing=True, frozen_dtype=frozen_dtype)
    assert lmloss.applies(model)
    head = model.get_output_embeddings().weight
    assert not head.requires_grad  # a tied or untied lm_head is frozen under BitFit
    _compare(model, batch(), rel)


def test_trained_untied_head_gets_its_weight_gradient():
    model = tiny_causal("qwen2", tied=False)
    bitfit.apply(model, add_missing=True)
    model.lm_head.weight.requires_grad_(True)  # e.g. a user training the head too
    _, g = _compare(model, batch(), 1e-5)
    assert g["lm_head.weight"].abs().sum() > 0


def test_applies_only_to_plain_causal_heads(tiny_bert):
    assert not lmloss.applies(tiny_bert)
    assert lmloss.applies(tiny_causal("gpt2"))
    m = tiny_causal("llama")
    m.config.final_logit_softcapping = 30.0
    assert not lmloss.applies(m)


def test_bf16_step_keeps_no_logits():
    from bitfit.fast.lean import saved_activation_bytes

    model = tiny_causal("llama", vocab=4000)
    bitfit.apply(model, add_missing=True, frozen_dtype="bfloat16")
    model.train()
    b = batch(vocab=4000, B=2, T=32)
    params = [*model.parameters(), *model.buffers()]
    plain, _ = saved_activation_bytes(lambda: model(**b).loss, params)
    ours, _ = saved_activation_bytes(lambda: lmloss.model_loss(model, b)[0], params)
    logits = 2 * 32 * 4000 * 4
    assert plain > logits  # the plain path keeps at least one float32 [batch, seq, vocab] tensor ...
    assert ours < plain / 5  # ... the chunked loss keeps only the labelled rows' hidden-state gradient


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "bloom", "opt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_auto_and_gradient_checkpointing(family, monkeypatch):
    """frozen_dtype=auto (bf16 here via the override) + lean + gradient checkpointing + the chunked loss: one
    AdamW step, finite loss, trained tensors move; checkpointing on/off give the same gradients."""
    monkeypatch.setenv("BITFIT_FROZEN_DTYPE", "bfloat16")
    # checkpointing runs the model's own attention (bitfit.fast.lean._checkpointing); without it, short rows would
    # take the fused one, another bf16 rounding (its gradients against stock: tests/test_lean.py). One
    # attention on both sides, so that what is compared here is checkpointing and the chunked loss alone.
    monkeypatch.setattr("bitfit.fast.attention.FUSED_MAX_KEYS_WITHOUT_DROPOUT", 0)
    grads = {}
    for gc in (False, True):
        model = tiny_causal(family)
        bitfit.apply(model, add_missing=True, frozen_dtype="auto")
        if gc:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()
        b = batch()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        loss, _ = lmloss.model_loss(model, b)
        assert torch.isfinite(loss)
        loss.backward()
        grads[gc] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        opt.step()
        moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
        with_grad = {n for n, g in grads[gc].items() if g.abs().sum() > 0}
        assert with_grad <= moved and len(moved) >= 0.5 * len(before), (family, gc, len(moved), len(before))
    top = max(g.abs().max().item() for g in grads[False].values())
    for n, g in grads[False].items():
        assert (grads[True][n] - g).abs().max().item() <= 1e-6 * top + 1e-12, n


# ------------------------------------------------------------------ bitfit train --task instruct


def _causal_lm_bench():
    from conftest import repo_module

    return repo_module("benchmarks", "causal_lm")


@pytest.mark.parametrize("frozen_dtype,rel", [("float32", 1e-4), pytest.param("bfloat16", 2e-3, marks=pytest.mark.slow)])
def test_bitfit_train_instruct_loss_curve_equals_plain(tmp_path, frozen_dtype, rel, monkeypatch):
    """`bitfit train --task instruct` on alpaca-style rows: the Trainer computes the loss through bitfit.fast.lmloss, and
    every logged step's loss equals the plain (full-logits) run's."""
    bench = _causal_lm_bench()
    calls = []
    orig = lmloss.model_loss
    monkeypatch.setattr(lmloss, "model_loss", lambda *a, **k: calls.append(1) or orig(*a, **k))
    curves = bench.loss_curves(tmp_path, frozen_dtype, steps=4, batch=4)
    assert len(calls) == 4  # only the chunked run goes through it (BITFIT_LM_LOSS=plain for the other)
    assert len(curves["plain"]) == len(curves["chunked"]) == 4
    for a, b in zip(curves["plain"], curves["chunked"]):
        assert abs(a - b) <= rel * abs(a), curves
    args = json.loads((tmp_path / f"run-{frozen_dtype}-chunked" / "command.json").read_text())["training_args"]
    assert args.get("train_sampling_strategy", "group_by_length") == "group_by_length" or args.get("group_by_length")
    # bias-only instruction tuning checkpoints activations by default (its step's memory is mostly activations)
    assert args.get("activation_checkpointing", args.get("gradient_checkpointing")) is True


def test_causal_lm_benchmark_names_the_int8_modes():
    from bitfit.fast.lean import LeanState

    precision = _causal_lm_bench()._precision
    assert precision(None) == "float32"
    assert precision(LeanState(frozen_dtype=torch.bfloat16)) == "bfloat16"
    assert precision(LeanState(int8_fbgemm=["q"])) == "int8-fbgemm"  # weights float32, matmuls on fbgemm
    assert precision(LeanState(frozen_dtype=torch.bfloat16, int8=["q"])) == "int8"


def test_instruct_checkpointing_default_and_opt_out(tmp_path):
    from bitfit.cli.trainargs import parse_train_args
    from bitfit.training.defaults import instruct_checkpointing

    on = instruct_checkpointing()
    assert list(on.values()) == [True]
    assert instruct_checkpointing(["gradient_checkpointing"]) == {}
    assert instruct_checkpointing(["activation_checkpointing"]) == {}
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "Hi."}) + "\n")
    base = ["--model", "x", "--task", "instruct", "--train-file", str(data), "--output-dir", str(tmp_path / "o")]

    def checkpointing(extra):
        args = parse_train_args(base + extra)[2]
        return bool(getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing)

    assert checkpointing([]) is True
    assert checkpointing(["--gradient_checkpointing", "false"]) is False  # the (deprecated) alias still turns it off
    # instruction tuning keeps BitFit's old learning rate (a causal LM has no fresh head; 2e-3 is for tasks with one)
    from bitfit.training.defaults import BITFIT_LR, INSTRUCT_LR, build_training_arguments

    assert parse_train_args(base)[2].learning_rate == INSTRUCT_LR == 1e-3 != BITFIT_LR
    assert parse_train_args(base + ["--learning_rate", "3e-4"])[2].learning_rate == 3e-4
    assert build_training_arguments(str(tmp_path / "b"), task="instruct").learning_rate == INSTRUCT_LR
    assert build_training_arguments(str(tmp_path / "b"), task="sst2").learning_rate == BITFIT_LR
    assert checkpointing(["--gradient_checkpointing=false"]) is False


def test_run_train_instruct_checkpoints_by_default(tmp_path):
    """The library entry point (run_train with a dict of overrides) has the CLI's default, and the same opt-out."""
    from transformers import TrainerCallback

    from bitfit.training.arguments import DataArguments, ModelArguments
    from bitfit.training.run import run_train

    bench = _causal_lm_bench()
    rows = bench.instruction_rows(8)
    model_dir = bench.write_instruct_model(tmp_path / "model", rows, hidden=32, layers=1)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = []

    class Spy(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            base = getattr(model, "base_model", model)
            name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") \
                else "is_gradient_checkpointing"  # transformers < 5
            seen.append(bool(getattr(base, name)))

    for over, expect in (({}, True), ({"gradient_checkpointing": False}, False)):
        seen.clear()
        run_train(ModelArguments(model=model_dir, frozen_dtype="float32"),
                  DataArguments(task="instruct", train_file=str(data)),
                  {"output_dir": str(tmp_path / f"run-{expect}"), "max_steps": 1, "save_strategy": "no",
                   "per_device_train_batch_size": 4, "disable_tqdm": True, **over}, callbacks=[Spy()])
        assert seen == [expect], (over, seen)
