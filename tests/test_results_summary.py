"""scripts/results_summary.py: the precisions table reads `run_results.sh precisions` run folders."""

import json

from conftest import repo_module


def _summary():
    return repo_module("scripts", "results_summary")


def _run(root, dtype, task, seed, score, step, ran=None):
    folder = root / "precisions" / dtype / f"{task}-s{seed}"
    folder.mkdir(parents=True)
    key = {"rte": "eval_accuracy", "mrpc": "eval_f1", "stsb": "eval_pearson", "cola": "eval_matthews_correlation",
           "sst2": "eval_accuracy"}[task]
    (folder / "metrics.json").write_text(json.dumps({key: score, "step_cpu_s": step}))
    (folder / "command.json").write_text(json.dumps({"frozen_dtype_choice": {"dtype": ran} if ran else None}))


def test_precisions_table_averages_each_seed_over_the_five_tasks(tmp_path, capsys):
    summary = _summary()
    tasks = ["rte", "mrpc", "stsb", "cola", "sst2"]
    for seed, offset in ((42, 0.0), (43, 0.1)):
        for i, task in enumerate(tasks):
            _run(tmp_path, "float32", task, seed, 0.5 + offset + i / 100, 0.20)
            _run(tmp_path, "auto", task, seed, 0.6 + offset + i / 100, 0.15, ran="int8-fbgemm")
    _run(tmp_path, "auto", "rte", 44, 0.9, 0.15, ran="int8-fbgemm")  # an unfinished seed: in its task, not the average
    table = summary.precisions_table(tmp_path)
    rows = {line.split(" |")[0]: line for line in table.splitlines()}
    assert "| MRPC F1 |" in table
    # float32 first; per seed the mean over the five tasks (52.0 and 62.0), their mean 57.00
    f32, auto = rows["| float32 (float32)"], rows["| auto (int8-fbgemm)"]
    assert f32.endswith("| 57.00 (52.00, 62.00) | 1.00x |"), f32
    assert auto.endswith("| 67.00 (62.00, 72.00) | 0.75x |"), auto
    assert "| 73.3 (60.0, 70.0, 90.0) |" in auto  # RTE with the third seed
    assert summary.main([str(tmp_path)]) == 0 and "## Frozen-weight precisions" in capsys.readouterr().out


def test_nothing_to_summarise_is_an_error(tmp_path, capsys):
    assert _summary().main([str(tmp_path)]) == 1
    assert "run scripts/run_results.sh first" in capsys.readouterr().err
