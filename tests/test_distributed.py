"""`bitfit train` under `torchrun --nproc_per_node 2` (CPU, gloo) matches one process with the same global
batch; only rank 0 writes."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from test_train_cli import make_tiny_model_dir, sentiment_rows, write_csv


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, minilm_dir):
    if shutil.which("torchrun") is None or shutil.which("bitfit") is None:
        pytest.skip("torchrun or the bitfit command is not installed")
    model = make_tiny_model_dir(tmp_path / "tiny", minilm_dir)
    train = write_csv(tmp_path / "train.csv", sentiment_rows(32))
    # sequential order: the 2 ranks' batches of 4 are together exactly the single process's batch of 8
    # plain SGD: Adam's first steps move every parameter by ~lr*sign(grad), so on gradients that are zero up to
    # float noise (b_k, ...) it turns reduction-order noise into lr-sized differences
    common = ["--model", model, "--train-file", train, "--max_steps", "4", "--learning_rate", "0.2", "--head_learning_rate", "1.0", "--optim", "sgd",
              "--train_sampling_strategy", "sequential", "--save_strategy", "no", "--logging_steps", "1",
              "--disable_tqdm", "true", "--seed", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    one = subprocess.run([shutil.which("bitfit"), "train", *common, "--per_device_train_batch_size", "8",
                          "--output-dir", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", "29613", "--no-python", "bitfit", "train",
                          *common, "--per_device_train_batch_size", "4", "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved to") + two.stderr.count("saved to") == 1  # only rank 0 reports and writes
    import transformers as T

    import bitfit

    def trained(run):
        m = bitfit.load(T.AutoModelForSequenceClassification.from_pretrained(model, num_labels=2), tmp_path / run)
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    base = {n: p for n, p in T.AutoModelForSequenceClassification.from_pretrained(model, num_labels=2)
            .named_parameters()}
    a, b = trained("one"), trained("two")
    assert a.keys() == b.keys() and len(a) == 20
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
        moved += int(not k.startswith("classifier") and not torch.equal(a[k], base[k]))
    assert moved >= 15  # the biases really trained
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["global_steps"] == m2["global_steps"] == 4
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
