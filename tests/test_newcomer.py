"""What a newcomer meets on a second walk through the docs: a GGUF file loaded the usual way trains through
peft / TRL, `bitfit info` and `bitfit train` show and train the same set (partial-bias families get their missing
biases by default, said in one plain line; the same totals), the biases and the head are counted apart, a
mistyped flag gets a suggestion, and messages a user cannot act on stay hidden unless --verbose."""

import json
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bitfit.cli import main
from bitfit.errors import BitFitError

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = [
    {"instruction": "Name a colour", "input": "", "output": "red"},
    {"instruction": "Repeat the word", "input": "blue", "output": "blue blue"},
    {"instruction": "Say hello", "output": "hello there"},
    {"instruction": "Count to three", "input": "", "output": "one two three"},
]


def write_tiny_qwen2_gguf(path, hidden=32, inter=64, layers=2, heads=2, kv_heads=1, seed=0, tied=False) -> str:
    """A Qwen2 in llama.cpp's tensor names, as Qwen's own GGUF files are: biases on q/k/v only (the family's partial
    set), an LM head of its own (``output.weight``: untied) unless ``tied``, float32 tensors, a byte-level BPE
    tokenizer."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = ["<|endoftext|>"] + [b2u[b] for b in range(256)]
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")]:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    vocab = len(tokens)
    head_dim = hidden // heads
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-qwen2")
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3] + [1] * (vocab - 1))
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    rng = np.random.default_rng(seed)

    def tensor(name, *shape, norm=False):
        a = np.ones(shape, np.float32) if norm else (rng.standard_normal(shape) * 0.1).astype(np.float32)
        w.add_tensor(name, a)

    tensor("token_embd.weight", vocab, hidden)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", hidden, norm=True)
        tensor(f"blk.{i}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{i}.attn_q.bias", hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_k.bias", kv_heads * head_dim)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.bias", kv_heads * head_dim)
        tensor(f"blk.{i}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden, norm=True)
        tensor(f"blk.{i}.ffn_gate.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_up.weight", inter, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, inter)
    tensor("output_norm.weight", hidden, norm=True)
    if not tied:
        tensor("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory):
    return write_tiny_qwen2_gguf(tmp_path_factory.mktemp("gguf") / "tiny-qwen2.F32.gguf")


def _alpaca(path: Path) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES * 2))
    return str(path)


def _split(path: str):
    p = Path(path)
    return str(p.parent), p.name


# ------------------------------------------------------------------ a GGUF loaded the usual way, through peft / TRL
def test_gguf_loaded_by_transformers_trains_through_get_peft_model(qwen2_gguf):
    import peft
    import transformers
    from transformers.trainer_utils import validate_quantization_for_training

    from bitfit.peft import BitFitPeftConfig

    folder, name = _split(qwen2_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    assert model.is_quantized  # transformers' mark on the dequantised model: what Trainer refused
    with pytest.raises(ValueError, match="GGUF"):
        validate_quantization_for_training(peft.get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name),
            peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])))  # another method keeps the mark
    pm = peft.get_peft_model(model, BitFitPeftConfig(task_type="CAUSAL_LM", add_missing=True))
    base = pm.get_base_model()
    assert not base.is_quantized and base.hf_quantizer is None
    assert getattr(base.config, "quantization_config", None) is None
    validate_quantization_for_training(pm)  # Trainer's check
    assert all(p.dtype == torch.float32 for p in pm.parameters())
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) > 0


def test_gguf_loaded_by_transformers_trains_with_trl_sft_trainer(qwen2_gguf, tmp_path):
    trl = pytest.importorskip("trl")
    import transformers
    from datasets import Dataset

    from bitfit.peft import BitFitPeftConfig

    folder, name = _split(qwen2_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                         learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, max_length=32,
                         dataloader_num_workers=0, disable_tqdm=True, bf16=False)
    texts = ["the cat sat", "in the hat", "there the other", "inner tether"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                 processing_class=tokenizer,
                                 peft_config=BitFitPeftConfig(task_type="CAUSAL_LM", add_missing=True))
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
    after = dict(trainer.model.named_parameters())
    assert start and any(not torch.equal(after[n].detach(), v) for n, v in start.items())


def test_load_model_names_its_tasks():
    from bitfit.core.models import load_model

    with pytest.raises(BitFitError, match=r"unknown task 'causal'; choose one of: base, classification, causal-lm"):
        load_model("minilm", task="causal")


# ------------------------------------------------------------------ info and train: the same set, the same totals
@pytest.mark.filterwarnings("ignore:.*have no bias in this")
def test_partial_bias_family_adds_the_missing_biases_by_default():
    """The measurement behind the default: a tiny Qwen2 (biases on q/k/v only) trains 64 bias values with its
    existing biases and 336 with the missing roles added (attn_out, ffn_in, ffn_out, the norms), so BitFit's every
    role; BERT (every bias present) is unchanged."""
    from families import make

    import bitfit
    from bitfit.core.config import BitFitConfig
    from bitfit.training.base import choose_add_missing

    existing = bitfit.report(bitfit.apply(make("qwen2")))
    added = bitfit.report(bitfit.apply(make("qwen2"), add_missing=True))
    assert (existing.biases, added.biases) == (64, 336)
    cfg, line = choose_add_missing(make("qwen2"), BitFitConfig(), None)
    assert cfg.add_missing and line.startswith("bitfit: qwen2 has biases only in query, key, value: adding")
    assert "\n" not in line and "--add-missing false" in line
    cfg, line = choose_add_missing(make("bert"), BitFitConfig(), None)
    assert not cfg.add_missing and line is None
    cfg, line = choose_add_missing(make("qwen2"), BitFitConfig(), False)
    assert not cfg.add_missing and line.startswith("bitfit: --add-missing false: 13 selected slots")


def test_info_and_train_agree_on_a_gguf_with_partial_biases(qwen2_gguf, tmp_path, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the choice is a plain line, not a Python warning
        assert main(["info", qwen2_gguf, "--json"]) == 0
    out, err = capfd.readouterr()
    info = json.loads(out)
    assert "has biases only in query, key, value: adding zero-initialised biases" in err
    assert "UserWarning" not in err
    run = tmp_path / "chat"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main(["train", "--model", qwen2_gguf, "--task", "instruct", "--train-file",
                     _alpaca(tmp_path / "a.jsonl"), "--output-dir", str(run), "--max_steps", "1",
                     "--per_device_train_batch_size", "4", "--max-seq-length", "384", "--frozen-dtype", "float32",
                     "--disable_tqdm", "true", "--report_to", "none"]) == 0
    _, err = capfd.readouterr()
    assert "has biases only in query, key, value: adding zero-initialised biases" in err
    metrics = json.loads((run / "metrics.json").read_text())
    # the same set and the same totals: the untied LM head counts in both (it does not train)
    assert (metrics["trainable_params"], metrics["total_params"]) == (info["trainable"], info["total"])
    assert info["biases"] == metrics["trainable_biases"] and info["head"] == metrics["trainable_head"] == 0
    assert info["added"]  # the missing roles were added in both

    assert main(["info", qwen2_gguf, "--json", "--add-missing", "false"]) == 0
    out, err = capfd.readouterr()
    only = json.loads(out)
    assert only["trainable"] < info["trainable"] and not only["added"]
    assert "--add-missing false: " in err and "UserWarning" not in err


# ------------------------------------------------------------------ biases and head apart
def test_summary_line_counts_biases_and_head_apart():
    from families import make

    import bitfit

    rep = bitfit.report(bitfit.apply(make("bert", pretrained_pooler=False)))
    assert rep.pooler_head and rep.biases + rep.head == rep.trainable
    pct = lambda n: f"{100 * n / rep.total:.3f}%"  # noqa: E731
    want = (f"biases {rep.biases:,} ({pct(rep.biases)}) + head {rep.head:,} = {rep.trainable:,} of {rep.total:,} "
            f"trainable ({pct(rep.trainable)})")
    assert rep.summary() == want
    assert want in rep.to_markdown()
    d = rep.to_dict()
    assert (d["biases"], d["head"], d["trainable"]) == (rep.biases, rep.head, rep.trainable)


def test_train_prints_biases_and_head_apart(tmp_path, capfd, minilm_dir):
    from families import save_tiny_bert

    save_tiny_bert(tmp_path / "bert", str(minilm_dir))
    rows = [("good great", "pos"), ("bad awful", "neg")] * 4
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tmp_path / "bert"), "--train-file", str(data), "--output-dir", str(run),
                 "--max_steps", "1", "--per_device_train_batch_size", "8", "--max-seq-length", "16",
                 "--frozen-dtype", "float32", "--disable_tqdm", "true", "--report_to", "none"]) == 0
    out, err = capfd.readouterr()
    m = json.loads((run / "metrics.json").read_text())
    b, h, t, n = m["trainable_biases"], m["trainable_head"], m["trainable_params"], m["total_params"]
    assert b + h == t and h > 0
    assert (f"bitfit: biases {b:,} ({100 * b / n:.3f}%) + head {h:,} = {t:,} of {n:,} trainable "
            f"({100 * t / n:.3f}%)") in err


# ------------------------------------------------------------------ a mistyped flag
@pytest.mark.parametrize("flag,want", [
    ("--num_train_epoch", "unknown option --num_train_epoch; did you mean --num_train_epochs?"),
    ("--learning-rat", "unknown option --learning-rat; did you mean --learning-rate?"),
    ("--zzzqqq", "unknown option --zzzqqq (`bitfit train --help` lists the options)"),
])
def test_mistyped_flag_gets_the_nearest_one(tmp_path, capsys, flag, want):
    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"w{i},{i % 2}\n" for i in range(8)))
    rc = main(["train", "--model", "minilm", "--train-file", str(data), "--output-dir", str(tmp_path / "run"),
               "--max_steps", "1", flag, "1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip() == f"bitfit train: error: {want}"
    assert "HfArgumentParser" not in err and not (tmp_path / "run").exists()


def test_old_checkpointing_flag_is_given_its_new_name():
    import dataclasses

    from transformers import TrainingArguments

    from bitfit.cli.trainargs import new_flag_names

    if "activation_checkpointing" not in {f.name for f in dataclasses.fields(TrainingArguments)}:
        pytest.skip("this transformers has only --gradient_checkpointing")
    assert new_flag_names(["--gradient_checkpointing", "false", "--gradient-checkpointing=true", "--seed", "1"]) == \
        ["--activation_checkpointing", "false", "--activation_checkpointing=true", "--seed", "1"]


# ------------------------------------------------------------------ noise a user cannot act on
def test_our_get_peft_model_calls_raise_no_checkpointing_future_warning():
    from families import make

    from bitfit.training.baselines import bitfit_peft

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        bitfit_peft(make("bert"))


def test_loading_weights_bar_hidden_unless_verbose(capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    from bitfit.cli import hide_loading_bars

    if not hasattr(hf_logging, "set_tqdm_hook"):
        pytest.skip("this transformers has no per-bar hook")
    try:
        hide_loading_bars()
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
        for _ in hf_logging.tqdm(range(3), desc="Downloading"):
            pass
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "Downloading" in err
    finally:
        hf_logging.set_tqdm_hook(None)


def test_export_hides_exporter_noise_unless_verbose(monkeypatch):
    from bitfit.serving.export import QUIET_LOGGERS, run_quietly

    monkeypatch.delenv("BITFIT_VERBOSE", raising=False)
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Catch()
    loggers = [logging.getLogger(n) for n in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)  # as an application that shows warnings has them
    try:
        def noisy():
            for lg in loggers:
                lg.warning("torchvision is not installed. Skipping torchvision::nms")
                lg.error("a real problem")
            return 7

        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            assert run_quietly(noisy) == 7
            run_quietly(warnings.warn, "`is_gradient_checkpointing` is deprecated and will be removed in v6",
                        FutureWarning)  # read by torch.jit.trace, which visits every property
        assert seen == ["a real problem"] * len(loggers)
        assert all(lg.level == logging.WARNING for lg in loggers)  # restored
        seen.clear()
        monkeypatch.setenv("BITFIT_VERBOSE", "1")
        run_quietly(noisy)
        assert len(seen) == 2 * len(loggers)
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_export_command_prints_only_its_result(tmp_path, capsys):
    from test_bank import make_base, task_model
    from transformers.utils import logging as hf_logging

    import bitfit

    base = make_base("bert")
    base.save_pretrained(tmp_path / "base")
    art = bitfit.save(task_model(base, 2, 1), tmp_path / "task")
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler, level = Catch(), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # a user's setting (the test session runs at error level)
    logging.getLogger("transformers").addHandler(handler)
    once = getattr(logging.Logger, "warning_once", None)
    if hasattr(once, "cache_clear"):
        once.cache_clear()  # transformers says it once per process
    try:
        assert main(["export", str(art), "--base", str(tmp_path / "base"), "--format", "torchscript",
                     "--output", str(tmp_path / "x.pt")]) == 0
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        hf_logging.set_verbosity(level)
    assert not [m for m in seen if "loss_type" in m]
    assert "torchscript model written to" in capsys.readouterr().out


@pytest.mark.parametrize("verbose", [False, True])
def test_info_with_a_new_head_prints_no_load_report_unless_verbose(minilm_dir, verbose):
    """`bitfit info MODEL --task-head N` loads a head the checkpoint lacks: transformers reports it as MISSING.
    A command module imports transformers before the CLI quiets it, so the quieting must act on the loaded
    library, not only on the environment variable it reads at import."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "BITFIT_VERBOSE")}
    argv = ["info", minilm_dir, "--task-head", "2"] + (["--verbose"] if verbose else [])
    out = subprocess.run([sys.executable, "-c", "import sys; from bitfit.cli import main; sys.exit(main())", *argv],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert ("LOAD REPORT" in out.stderr) == verbose, out.stderr[-2000:]
