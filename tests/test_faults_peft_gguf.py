"""Damaged BitFit peft adapter folders and damaged GGUF files end in one clear line naming the folder or file and
the fix; a failed load leaves the caller's base model as it was; the peft model's edge calls (unload after
merge_and_unload, set_adapter with a list, deleting the only adapter, saving inside disable_adapter) are clear."""

import json
import re
import shutil

import pytest
import torch

import bitfit
from bitfit.errors import ArtifactError, BitFitConfigError, BitFitError
from families import inputs_for, logits_of, make, train_steps

peft = pytest.importorskip("peft", minversion="0.21")

from bitfit.peft import BitFitPeftConfig  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

CFG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A trained BitFit peft adapter folder and the logits it gives."""
    pm = get_peft_model(make("bert"), BitFitPeftConfig(task_type="SEQ_CLS"))
    torch.manual_seed(0)
    train_steps(pm, "bert")
    pm.eval()
    d = tmp_path_factory.mktemp("peft") / "good"
    pm.save_pretrained(d)
    return d, logits_of(pm, "bert")


def damaged(good_dir, tmp_path, config=None, weights=None):
    d = tmp_path / "adapter"
    shutil.copytree(good_dir, d)
    if config is not None:
        (d / CFG).write_text(config(json.loads((good_dir / CFG).read_text())))
    if weights == "missing":
        (d / WEIGHTS).unlink()
    elif weights == "truncated":
        data = (d / WEIGHTS).read_bytes()
        (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    elif weights == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(d / WEIGHTS))
        key = next(k for k in tensors if k.endswith("classifier.weight"))
        tensors[key][0, 0] = float("nan")
        save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})
    return d


def _bad_slot(cfg):
    slot = next(iter(cfg["bitfit_meta"]["slots"]))
    cfg["bitfit_meta"]["slots"][slot] = 5
    return json.dumps(cfg)


CASES = {
    "not json": (dict(config=lambda c: "{not json"), CFG, "not valid JSON"),
    "a list": (dict(config=lambda c: "[]"), CFG, "holds a list"),
    "null": (dict(config=lambda c: "null"), CFG, "holds null"),
    "deeply nested": (dict(config=lambda c: "[" * 100_000 + "]" * 100_000), CFG, "nested too deeply"),
    "unknown peft_type": (dict(config=lambda c: json.dumps(dict(c, peft_type="BOGUS"))), CFG, "'BOGUS'"),
    "slot not an object": (dict(config=_bad_slot), CFG, r"bitfit_meta\.slots\[.*\] is not a JSON object"),
    "weights missing": (dict(weights="missing"), WEIGHTS, "is missing"),
    "weights truncated": (dict(weights="truncated"), WEIGHTS, r"\(\d+ bytes\) cannot be read .* truncated"),
    "weights hold NaN": (dict(weights="nan"), "", "non-finite"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_adapter_is_refused_and_the_base_is_left_as_it_was(good, tmp_path, case):
    how, file, match = CASES[case]
    d = damaged(good[0], tmp_path, **how)
    base = make("bert")
    with pytest.raises(ArtifactError, match=match) as err:
        PeftModel.from_pretrained(base, d)
    msg = str(err.value)
    assert str(d) in msg and file in msg and "\n" not in msg
    assert "bitfit-peft-" not in msg and "bitfit_model" not in msg and "bitfit_config.json" not in msg
    assert bitfit.get_state(base) is None and not hasattr(base, "peft_config")  # not prepared
    # the same base then loads a good adapter (no AlreadyPreparedError)
    assert torch.equal(logits_of(PeftModel.from_pretrained(base, good[0]), "bert"), good[1])


@pytest.mark.parametrize("case", ["a list", "deeply nested", "slot not an object", "weights truncated",
                                  "weights hold NaN"])
def test_damaged_adapter_through_bitfit_load(good, tmp_path, case):
    how, file, match = CASES[case]
    if case == "a list":
        match = "holds a list"
    d = damaged(good[0], tmp_path, **how)
    with pytest.raises(ArtifactError, match=match) as err:
        bitfit.load(make("bert"), d)
    assert str(d) in str(err.value) and "bitfit-peft-" not in str(err.value)


def test_unload_after_merge_and_unload_is_refused():
    pm = get_peft_model(make("bert"), BitFitPeftConfig(task_type="SEQ_CLS"))
    merged = pm.merge_and_unload()
    with pytest.raises(ArtifactError, match=r"already merged .* merge_and_unload\(\) returned"):
        pm.unload()
    with pytest.raises(ArtifactError, match="already merged"):
        pm.merge_and_unload()
    assert merged is not None


def test_set_adapter_with_a_list_is_a_clear_error():
    pm = get_peft_model(make("bert"), BitFitPeftConfig(task_type="SEQ_CLS"))
    for names in (["default"], ["default", "other"]):
        with pytest.raises(BitFitConfigError, match=r"one adapter at a time.*set_adapter\('default'\)"):
            pm.set_adapter(names)
    pm.set_adapter("default")


def test_deleting_the_only_adapter_is_refused_and_the_model_still_runs():
    pm = get_peft_model(make("bert"), BitFitPeftConfig(task_type="SEQ_CLS"))
    pm.eval()
    before = logits_of(pm, "bert")
    with pytest.raises(ArtifactError, match=r"only BitFit adapter.*unload\(\)"):
        pm.delete_adapter("default")
    assert list(pm.peft_config) == ["default"]
    assert torch.equal(logits_of(pm, "bert"), before)
    # with two adapters, deleting one still works
    pm.add_adapter("second", BitFitPeftConfig(task_type="SEQ_CLS"))
    pm.delete_adapter("default")
    assert list(pm.peft_config) == ["second"]
    pm(**inputs_for("bert"))


def test_save_inside_disable_adapter_saves_the_adapter(tmp_path):
    pm = get_peft_model(make("bert"), BitFitPeftConfig(task_type="SEQ_CLS"))
    torch.manual_seed(0)
    train_steps(pm, "bert")
    pm.eval()
    trained = logits_of(pm, "bert")
    with pm.disable_adapter():
        base = logits_of(pm, "bert")
        pm.save_pretrained(tmp_path / "saved")
        assert torch.equal(logits_of(pm, "bert"), base)  # still disabled
    assert not torch.equal(base, trained)
    assert torch.equal(logits_of(pm, "bert"), trained)
    assert {CFG, WEIGHTS} <= {p.name for p in (tmp_path / "saved").iterdir()}
    assert torch.equal(logits_of(PeftModel.from_pretrained(make("bert"), tmp_path / "saved"), "bert"), trained)


# ------------------------------------------------------------------ GGUF
@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    pytest.importorskip("gguf")
    from test_gguf import write_tiny_llama_gguf

    d = tmp_path_factory.mktemp("gguf")
    good = d / "tiny.gguf"
    write_tiny_llama_gguf(good)
    data = good.read_bytes()
    (d / "truncated.gguf").write_bytes(data[: len(data) * 2 // 3])
    (d / "header-only.gguf").write_bytes(data[:20])
    (d / "cut-in-metadata.gguf").write_bytes(data[:500])
    return d


@pytest.mark.parametrize("name, why", [("truncated.gguf", r"tensor \S+ ends at byte [\d,]+, past the end of the file"),
                                       ("header-only.gguf", "ends inside the 24-byte GGUF header"),
                                       ("cut-in-metadata.gguf", "ends inside its metadata or tensor table")])
def test_damaged_gguf_is_named_with_its_size_and_the_fix(gguf_files, name, why):
    from bitfit.core.models import load_model, load_tokenizer

    path = gguf_files / name
    for load in (lambda: load_model(str(path), task="causal-lm"), lambda: load_tokenizer(str(path))):
        with pytest.raises(BitFitError, match="damaged or truncated") as err:
            load()
        msg = str(err.value)
        assert msg.startswith(f"GGUF file {path} ({path.stat().st_size:,} bytes)"), msg
        assert re.search(why, msg) and "download or copy it again" in msg and "\n" not in msg


def test_train_on_a_truncated_gguf_says_so(gguf_files, tmp_path, capsys):
    from bitfit.cli import main

    train = tmp_path / "a.jsonl"
    train.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    path = gguf_files / "truncated.gguf"
    assert main(["train", "--model", str(path), "--task", "instruct", "--train-file", str(train),
                 "--output-dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none"]) != 0
    err = capsys.readouterr().err
    assert f"GGUF file {path}" in err and "damaged or truncated" in err and "Hugging Face Hub" not in err
    assert not (tmp_path / "out").exists()
