"""bitfit export: a task merged into its base as TorchScript / ONNX, equal to the PyTorch model."""

import warnings

import pytest
import torch
from test_bank import make_base, task_model

import bitfit
from bitfit.cli import main
from bitfit.errors import BitFitError
from bitfit.serving.export import export_model, merged_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.filterwarnings("ignore:.*have no bias in this")
@pytest.mark.parametrize("family,kw", [("bert", {}), ("gpt2", {}), ("llama", {"add_missing": True})])
def test_torchscript_round_trip(tmp_path, family, kw):
    base = make_base(family)
    task = task_model(base, base.config.num_labels if family == "llama" else 2, 1, **kw)
    with torch.no_grad():
        ids = torch.randint(3, 50, (3, 9), generator=torch.Generator().manual_seed(4))
        ref = task(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # llama: RMSNorm biases cannot merge, exported unmerged
        model = merged_task(task)
    report = export_model(model, tmp_path / "m.pt", "torchscript")
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] < 1e-5
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    names = report["inputs"]
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        got = loaded(*[feed[n] for n in names])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*have no bias in this")
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_onnx_round_trip(tmp_path, family):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    base = make_base(family)
    model = merged_task(task_model(base, 3, 1))
    report = export_model(model, tmp_path / "m.onnx", "onnx")
    assert report["max_abs_diff"] is not None and report["max_abs_diff"] < 1e-4
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(3, 50, (4, 6), generator=torch.Generator().manual_seed(8))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    got = sess.run(["logits"], {i.name: feed[i.name].numpy() for i in sess.get_inputs()})[0]
    with torch.no_grad():
        ref = model(**{n: feed[n] for n in report["inputs"]}).logits
    assert got.shape == (4, 3)
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)


def test_export_command(tmp_path, capsys):
    base = make_base("bert")
    base.save_pretrained(tmp_path / "base")
    task = task_model(base, 2, 1)
    art = bitfit.save(task, tmp_path / "task")
    out = tmp_path / "exp" / "task.pt"
    assert main(["export", str(art), "--base", str(tmp_path / "base"), "--format", "torchscript",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "torchscript model written to" in printed
    # the traced model takes its inputs positionally, in the order the command prints
    assert "inputs: input_ids, token_type_ids, attention_mask;" in printed
    loaded = torch.jit.load(str(out))
    ids = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = task(input_ids=ids, attention_mask=mask).logits
        got = loaded(ids, torch.zeros_like(ids), mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_export_refusals(tmp_path):
    base = make_base("bert")
    with pytest.raises(BitFitError, match="format"):
        export_model(base, tmp_path / "x", "tflite")
    with pytest.raises(BitFitError, match="BitFit model"):
        merged_task(base)
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path), "--format", "pdf", "--output", str(tmp_path / "x")])
