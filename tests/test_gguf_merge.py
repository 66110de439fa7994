"""`bitfit merge RUN --gguf out.gguf`: a run trained on a GGUF base (the tiny Q8_0 LLaMA of tests/test_gguf.py) with
attention biases, merged into a new GGUF file: the base's metadata and quantized tensors copied unchanged, the
trained biases written as F32 ``blk.N.attn_*.bias`` tensors (q/k rows in llama.cpp's permuted order); the file loads
back in bitfit with the task's biases and generates as the task's own model does. Biases llama.cpp has no slot for
(RMSNorm, LLaMA MLP) are refused with nothing written."""

import copy

import pytest
import torch

import bitfit
from bitfit.cli import main
from bitfit.core.models import load_model, load_tokenizer
from bitfit.errors import BitFitError

gguf = pytest.importorskip("gguf")
from test_gguf import _alpaca, write_tiny_llama_gguf  # noqa: E402
from test_serve_generate import greedy_answer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["--task", "instruct", "--max_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "0.05",
         "--max-seq-length", "384", "--disable_tqdm", "true", "--report_to", "none"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_merge")
    path = write_tiny_llama_gguf(root / "tiny-llama.Q8_0.gguf")
    run = root / "att"
    assert main(["train", "--model", path, "--train-file", _alpaca(root / "a.jsonl"), "--output-dir", str(run),
                 "--preset", "attention", *TRAIN]) == 0
    return {"root": root, "path": path, "run": str(run)}


def _unpermute(values, n_head):
    """HF row order of a LLaMA q/k tensor stored in llama.cpp's order (transformers' reverse permute)."""
    return values.reshape(n_head, values.shape[0] // n_head // 2, 2).swapaxes(2, 1).reshape(values.shape)


def test_merge_gguf_round_trip(setup, capsys):
    out = setup["root"] / "merged.gguf"
    assert main(["merge", setup["run"], "--gguf", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]

    base_r, new_r = gguf.GGUFReader(setup["path"]), gguf.GGUFReader(str(out))
    base_t = {t.name: t for t in base_r.tensors}
    new_t = {t.name: t for t in new_r.tensors}
    for name, t in base_t.items():  # every base tensor copied unchanged, quantized ones still quantized
        assert new_t[name].tensor_type == t.tensor_type and bytes(new_t[name].data) == bytes(t.data)
    assert {k: base_r.fields[k].contents() for k in base_r.fields if not k.startswith("GGUF.")} == \
        {k: new_r.fields[k].contents() for k in new_r.fields if not k.startswith("GGUF.")}
    added = sorted(set(new_t) - set(base_t))
    assert added == sorted(f"blk.{i}.{p}.bias" for i in range(2) for p in ("attn_q", "attn_k", "attn_v",
                                                                            "attn_output"))

    base = load_model(setup["path"], task="causal-lm").eval()
    own = bitfit.load(copy.deepcopy(base), setup["run"]).eval()  # the task's own model
    merged = bitfit.merge(copy.deepcopy(own)).state_dict()
    heads = base.config.num_attention_heads
    for i in range(2):
        for part, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            t = new_t[f"blk.{i}.{part}.bias"]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            values = torch.from_numpy(t.data.copy())
            if part in ("attn_q", "attn_k"):
                values = _unpermute(values, heads)
            assert torch.equal(values, merged[f"model.layers.{i}.self_attn.{hf}.bias"].float())
    assert merged["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0  # trained: not all zero

    back = load_model(str(out), task="causal-lm").eval()  # bitfit reads the merged file with its biases
    sd, ref = back.state_dict(), base.state_dict()
    for k, v in merged.items():
        if k.endswith(".bias"):
            assert torch.equal(sd[k], v.float()), k
        else:
            assert torch.equal(sd[k], ref[k]), k  # frozen weights: the base file's, dequantized
    tok = load_tokenizer(setup["path"])
    tok.pad_token = tok.eos_token
    for prompt in ("Name a colour", "Say hello"):
        assert greedy_answer(back, tok, prompt, 6) == greedy_answer(own, tok, prompt, 6)
    ids = tok("the weather", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        moved = (back(ids).logits - base(ids).logits).abs().max()
        diff = (back(ids).logits - own(ids).logits).abs().max()
    assert diff < moved / 10  # the task's logits (own runs bf16 frozen weights), not the base's


def test_merge_gguf_with_the_folder_as_model(setup, capsys):
    """--model FOLDER: the GGUF file the run records is read from that folder; the same file as without it."""
    a, b = setup["root"] / "a.gguf", setup["root"] / "b.gguf"
    assert main(["merge", setup["run"], "--gguf", str(a)]) == 0
    assert main(["merge", setup["run"], "--model", str(setup["root"]), "--gguf", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()


def test_merge_gguf_refuses_existing_file_and_bad_flags(setup, capsys):
    out = setup["root"] / "exists.gguf"
    out.write_bytes(b"keep")
    assert main(["merge", setup["run"], "--gguf", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"
    with pytest.raises(SystemExit):
        main(["merge", setup["run"], "--gguf", str(out), "--output", str(setup["root"] / "dir")])
    with pytest.raises(SystemExit):
        main(["merge", setup["run"]])


def test_merge_gguf_refuses_norm_biases(setup, capsys):
    run = setup["root"] / "all"  # the default preset on a LLaMA adds RMSNorm biases too
    assert main(["train", "--model", setup["path"], "--train-file", _alpaca(setup["root"] / "b.jsonl"),
                 "--output-dir", str(run), *TRAIN]) == 0
    capsys.readouterr()
    out = setup["root"] / "norms.gguf"
    assert main(["merge", str(run), "--gguf", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the GGUF loader's progress bar
    assert err.startswith("bitfit merge: error:") and "norm bias" in err and "--preset attention" in err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_merged_biases_refuses_llama_mlp_biases():
    from transformers import LlamaConfig, LlamaForCausalLM

    from bitfit.serving.gguf_merge import merged_biases

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      attention_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg)
    with pytest.raises(BitFitError, match=r"mlp\.gate_proj\.bias.*attn_q, attn_k, attn_v, attn_output.*--preset "
                                          r"attention"):
        merged_biases(model, "llama")
    cfg.mlp_bias = False
    names = merged_biases(LlamaForCausalLM(cfg), "llama")
    assert sorted(names) == ["blk.0.attn_k.bias", "blk.0.attn_output.bias", "blk.0.attn_q.bias", "blk.0.attn_v.bias"]
    with pytest.raises(BitFitError, match="gpt2"):  # an architecture bitfit writes no GGUF biases for
        merged_biases(model, "gpt2")


def test_merged_biases_qwen2_in_hf_order():
    """Qwen2: q/k/v biases (llama.cpp's qwen2 slots), not permuted (its rotary layout is HF's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from bitfit.serving.gguf_merge import merged_biases

    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    out = merged_biases(model, "qwen2")
    assert sorted(out) == ["blk.0.attn_k.bias", "blk.0.attn_q.bias", "blk.0.attn_v.bias"]
    attn = model.model.layers[0].self_attn
    assert (out["blk.0.attn_q.bias"] == attn.q_proj.bias.detach().numpy()).all()
    assert (out["blk.0.attn_k.bias"] == attn.k_proj.bias.detach().numpy()).all()
