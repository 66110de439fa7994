"""`bitfit compare` end to end on a tiny BERT and a small local CSV; `bitfit analyze`; option parsing."""

import json
import random
import struct

import pytest

from bitfit.cli import main
from bitfit.commands import compare as C
from bitfit.errors import BitFitConfigError
from bitfit.plots import is_png

H, L, I, LABELS = 32, 2, 64, 2  # the tiny model below
HEAD = H * LABELS + LABELS
ALL_BIASES = L * (4 * H + H + I + H + H) + H + H  # per layer q,k,v,o,LN1,ffn_in,ffn_out,LN2; + emb LN, pooler
POS = "good great fine nice superb lovely".split()
NEG = "bad awful poor nasty dreadful grim".split()
FILLER = "the a movie plot actor scene was is and very".split()


def _rows(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(5)] + [rng.choice(POS if y else NEG) for _ in range(2)]
        rng.shuffle(words)
        out.append((" ".join(words), y))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    """A tiny random BERT (bert-base tokenizer) and a small sentiment-like CSV task."""
    import torch
    import transformers as T

    from conftest import BERT_BASE_DIR

    if not (BERT_BASE_DIR / "config.json").exists():
        pytest.skip("bert-base tokenizer not available")
    root = tmp_path_factory.mktemp("tiny")
    cfg = T.BertConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=2, intermediate_size=I,
                       vocab_size=30522, max_position_embeddings=64)
    torch.manual_seed(0)
    T.BertModel(cfg).save_pretrained(root / "model")
    T.AutoTokenizer.from_pretrained(str(BERT_BASE_DIR)).save_pretrained(root / "model")
    for name, n, seed in (("train.csv", 48, 0), ("dev.csv", 32, 1)):
        with open(root / name, "w") as f:
            f.write("text,label\n")
            f.writelines(f"{t},{y}\n" for t, y in _rows(n, seed))
    return root


def _common(tiny, out):
    return ["--model", str(tiny / "model"), "--train-file", str(tiny / "train.csv"),
            "--validation-file", str(tiny / "dev.csv"), "--max-seq-length", "16", "--output-dir", str(out),
            "--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--disable_tqdm", "true",
            "--logging_steps", "50"]


@pytest.fixture(scope="module")
def compared(tiny):
    out = tiny / "cmp"
    argv = ["compare", *_common(tiny, out), "--methods", "bitfit,full,frozen,lora,rand/seed=7",
            "--seeds", "2", "--lr-grid", "bitfit=1e-3,1e-2"]
    assert main(argv) == 0
    return out


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.slow
def test_compare_end_to_end_table_plots_heatmap(compared):
    res = json.loads((compared / "results.json").read_text())
    rows = {r["method"]: r for r in res["summary"]}
    assert list(rows) == ["bitfit", "full", "frozen", "lora", "rand/seed=7"]
    rows["rand"] = rows.pop("rand/seed=7")
    total = rows["full"]["trainable"]
    assert rows["bitfit"]["trainable"] == ALL_BIASES + HEAD
    assert rows["rand"]["trainable"] == rows["bitfit"]["trainable"]
    assert rows["frozen"]["trainable"] == HEAD
    assert rows["lora"]["trainable"] == L * 2 * (8 * H + H * 8) + HEAD
    assert all(r["base_params"] == total for r in rows.values())
    assert rows["bitfit"]["trainable_pct"] == pytest.approx(100 * (ALL_BIASES + HEAD) / total)
    # seeds, lr grid: the best lr is the one with the best mean over the two seeds
    assert len(res["runs"]) == 2 * 6
    for r in rows.values():
        assert r["seeds"] == [42, 43]
        assert 0.0 <= r["score"] <= 1.0 and r["score_std"] >= 0.0
        assert r["step_time_s"] > 0 and r["peak_memory_mb"] > 50 and r["artifact_bytes"] > 0
    grid = rows["bitfit"]["lr_grid"]
    assert set(grid) == {"0.001", "0.01"} and rows["bitfit"]["best_lr"] == float(max(grid, key=grid.get))
    assert rows["full"]["best_lr"] == 2e-5 and rows["lora"]["best_lr"] == 5e-4
    # artifact sizes: BitFit's is tiny, full fine-tuning's is the whole model
    assert rows["bitfit"]["artifact_bytes"] < 20_000 < 4 * total * 0.9 < rows["full"]["artifact_bytes"]
    md = (compared / "results.md").read_text()
    for r in res["summary"]:
        assert f"| {r['method']} |" in md
    assert f"{ALL_BIASES + HEAD:,}" in md and "±" in md
    for name in ("scores.png", "curves.png"):
        w, h = png_size(compared / name)
        assert 400 < w < 2000 and 250 < h < 1500, (name, w, h)
        assert (compared / name).stat().st_size > 10_000
    # learning curves: one point per epoch per run
    run = res["runs"][0]
    assert [e for e, _ in run["history"]] == [1.0, 2.0]
    # heatmaps: for methods whose biases move (bitfit, full), not for frozen/lora/rand
    an = compared / "analysis"
    assert sorted(p.name for p in an.iterdir()) == ["bitfit", "full"]
    w, h = png_size(an / "bitfit" / "bias_change.png")
    assert 200 < w < 1500 and 200 < h < 1500
    rank = json.loads((an / "bitfit" / "ranking.json").read_text())
    assert rank["grad"]["roles"][-1]["role"] == "key"  # b_k: no gradient under softmax attention
    assert "no gradient" in rank["note"]
    # full fine-tuning moved every bias role; b_k moved least under BitFit (weight decay is 0 there)
    moved = [line.split(",") for line in (an / "full" / "bias_change.csv").read_text().splitlines()[1:]]
    assert all(float(v) > 0 for *_, v in moved)
    assert rank["change"]["roles"][-1]["role"] == "key"


@pytest.mark.slow
def test_compare_reuses_finished_runs_and_train_sizes(tiny, compared, capsys):
    out = tiny / "cmp_sizes"
    argv = ["compare", *_common(tiny, out), "--methods", "bitfit,full", "--train-sizes", "16,48", "--no-analysis"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["n_train"]) for r in res["summary"]] == [
        ("bitfit", 16), ("bitfit", 48), ("full", 16), ("full", 48)]
    assert is_png(out / "sizes.png") and png_size(out / "sizes.png")[0] > 400
    # a second call reuses run.json files instead of training again
    before = {p: p.stat().st_mtime_ns for p in out.rglob("run.json")}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("run.json")} == before


@pytest.mark.slow
def test_analyze_cli_on_runs(compared, tiny, capsys):
    run = next((compared / "runs" / "bitfit").rglob("run.json")).parent
    assert main(["analyze", str(run)]) == 0
    out = capsys.readouterr().out
    assert "Roles by mean absolute change" in out and "b_k" in out
    assert is_png(run / "analysis" / "bias_change.png") and is_png(run / "analysis" / "bias_grad.png")
    rows = (run / "analysis" / "bias_change.csv").read_text().splitlines()
    assert rows[0] == "role,paper,layer,dim,value" and len(rows) == 1 + 8 * L + 2  # + embed LN, pooler
    # the change from the artifact equals the one compare computed in memory
    mem = {(r["role"], str(r["layer"])): r["value"] for r in json.loads((run / "run.json").read_text())["change"]}
    for line in rows[1:]:
        role, _, layer, _, value = line.split(",")
        assert float(value) == pytest.approx(mem[(role, layer)], rel=1e-5, abs=1e-12)
    # a full fine-tuning run is compared against its base model
    full = next((compared / "runs" / "full").rglob("run.json")).parent
    assert main(["analyze", str(full), "--base", str(tiny / "model")]) == 0
    assert is_png(full / "analysis" / "bias_change.png")
    # peft runs have no bias change: a clean error
    lora = next((compared / "runs" / "lora").rglob("run.json")).parent
    assert main(["analyze", str(lora)]) == 1
    assert "peft adapter" in capsys.readouterr().err


def test_lr_grid_parsing():
    specs = ["bitfit", "full", "lora/r=4"]
    assert C.parse_lr_grid(None, specs) == {"bitfit": [1e-3], "full": [2e-5], "lora/r=4": [5e-4]}
    assert C.parse_lr_grid("1e-4,1e-3", specs)["full"] == [1e-4, 1e-3]
    g = C.parse_lr_grid("bitfit=1e-4,4e-4; full=3e-5", specs)
    assert g == {"bitfit": [1e-4, 4e-4], "full": [3e-5], "lora/r=4": [5e-4]}
    assert C.parse_lr_grid("auto", specs)["bitfit"] == [1e-4, 4e-4, 1e-3, 4e-3]
    for bad, match in (("rand=1e-3", "not in --methods"), ("bitfit=x", "numbers"), ("bitfit=-1", "positive")):
        with pytest.raises(BitFitConfigError, match=match):
            C.parse_lr_grid(bad, specs)


def test_summarize_picks_best_mean_lr():
    def rec(lr, seed, score):
        return {"spec": "bitfit", "method": "bitfit", "lr": lr, "seed": seed, "train_size": None, "n_train": 10,
                "primary": "accuracy", "task_metrics": ["accuracy"], "score": score,
                "eval": {"eval_accuracy": score}, "trainable": 5, "base_params": 100, "trainable_pct": 5.0,
                "artifact_bytes": 10, "step_time_s": 0.1, "train_runtime_s": 1.0, "peak_memory_mb": 1.0}

    # lr 1e-3 has the single best run (0.9) but the lower mean; 1e-4 wins on the mean
    recs = [rec(1e-3, 1, 0.9), rec(1e-3, 2, 0.5), rec(1e-4, 1, 0.75), rec(1e-4, 2, 0.75)]
    (row,) = C.summarize(recs, ["bitfit"])
    assert row["best_lr"] == 1e-4 and row["score"] == 0.75 and row["score_std"] == 0.0
    assert row["lr_grid"] == {"0.0001": 0.75, "0.001": pytest.approx(0.7)}
    md = C.markdown_table([row], "rte")
    assert "| bitfit | 10 | 75.0 ± 0.0 | 2 | 0.0001 | 5 | 5.0% |" in md


def test_training_flags_and_errors(capsys):
    assert C._split_training_flags(["--num_train_epochs", "3", "--per-device-train-batch-size", "8"]) == {
        "num_train_epochs": 3.0, "per_device_train_batch_size": 8}
    with pytest.raises(BitFitConfigError, match="unknown option"):
        C._split_training_flags(["--no_such_flag", "1"])
    assert main(["compare", "--model", "x", "--task", "rte", "--output-dir", "/tmp/x", "--methods", "adapterz"]) == 1
    assert "unknown method" in capsys.readouterr().err
    assert main(["compare", "--model", "x", "--task", "rte", "--output-dir", "/tmp/x", "--learning_rate", "1"]) == 1
    assert "--lr-grid" in capsys.readouterr().err


def test_dropout_flag_reaches_every_run(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_run_compare(model_args, data_args, overrides, specs, *rest, **kw):
        seen["dropout"] = model_args.dropout
        (tmp_path / "results.md").write_text("table")
        return {"files": {}}

    monkeypatch.setattr(C, "run_compare", fake_run_compare)
    assert main(["compare", "--model", "x", "--task", "rte", "--output-dir", str(tmp_path), "--dropout", "0"]) == 0
    assert seen["dropout"] == 0.0
    assert main(["compare", "--model", "x", "--task", "rte", "--output-dir", str(tmp_path)]) == 0
    assert seen["dropout"] is None
