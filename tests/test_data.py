"""GLUE loading (real local files, fake layouts), leaderboard files, own CSV/TSV/JSONL/Parquet files."""

import json

import pandas as pd
import pytest

from bitfit.data import TASKS, TextData, get_task, load_file, load_glue, load_train_file, write_leaderboard
from bitfit.errors import DataError
from bitfit.training.arguments import DataArguments
from bitfit.training.tasks import load_splits, subset

# (task, split) -> official row count, first label id of the split
OFFICIAL = {
    ("cola", "train"): (8551, 1), ("cola", "dev"): (1043, 1), ("sst2", "train"): (67349, 0),
    ("sst2", "dev"): (872, 1), ("mrpc", "train"): (3668, 1), ("mrpc", "dev"): (408, 1),
    ("stsb", "train"): (5749, 5.0), ("stsb", "dev"): (1500, 5.0), ("qnli", "dev"): (5463, 0),
    ("rte", "train"): (2490, 1), ("rte", "dev"): (277, 1), ("wnli", "train"): (635, 1), ("wnli", "dev"): (71, 0),
}


@pytest.mark.parametrize("task,split", sorted(OFFICIAL))
def test_real_glue_files(glue_dir, task, split):
    (part,) = load_glue(task, split, str(glue_dir))
    n, first = OFFICIAL[(task, split)]
    assert len(part) == n and len(part.labels) == n and part.labels[0] == first
    assert (part.pairs is None) == (TASKS[task].pair is None)
    assert all(isinstance(t, str) and t for t in part.texts[:50])


def test_real_glue_layout_details(glue_dir):
    (mrpc,) = load_glue("mrpc", "train", str(glue_dir))  # header starts with a BOM; quotes are text
    assert mrpc.texts[0].startswith("Amrozi accused his brother") and '"the witness"' in mrpc.texts[0]
    (cola,) = load_glue("cola", "dev", str(glue_dir))  # no header: 4 positional columns
    assert cola.texts[0] == "The sailors rode the breeze clear of the rocks."
    (stsb,) = load_glue("stsb", "dev", str(glue_dir))  # 10 columns; float scores
    assert stsb.pairs[0] == "A man wearing a hard hat is dancing." and stsb.labels[1] == 4.75
    (rte,) = load_glue("rte", "dev", str(glue_dir))  # string labels -> ids in the HF order
    assert rte.labels.count(0) == 146 and rte.labels.count(1) == 131
    (test,) = load_glue("rte", "test", str(glue_dir))
    assert len(test) == 3000 and test.labels is None and test.index[:3] == [0, 1, 2]


def test_missing_glue_data_is_named(glue_dir):
    with pytest.raises(DataError, match=r"no folder MNLI/ in .*glue.*it holds \[.*'RTE'"):
        load_glue("mnli", "train", str(glue_dir))
    with pytest.raises(DataError, match=r"QNLI/train.tsv, which is missing"):
        load_glue("qnli", "train", str(glue_dir))
    with pytest.raises(DataError, match="does not exist"):
        load_glue("rte", "train", str(glue_dir / "nope"))
    with pytest.raises(DataError, match="unknown GLUE task 'squad'"):
        get_task("squad")


def test_env_var_and_hub_fallback(monkeypatch, tmp_path, glue_dir):
    monkeypatch.setenv("BITFIT_GLUE_DIR", str(glue_dir))
    assert len(load_glue("wnli", "dev")[0]) == 71
    monkeypatch.delenv("BITFIT_GLUE_DIR")
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"no local data folder given .*ConnectionError.*--data-dir"):
        load_glue("rte", "train")


def test_hub_path_maps_columns(monkeypatch):
    import datasets

    fake = {"train": datasets.Dataset.from_dict({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"],
                                                 "label": [2, 0], "idx": [0, 1]}),
            "validation_matched": datasets.Dataset.from_dict({"premise": ["a"], "hypothesis": ["b"], "label": [1],
                                                              "idx": [7]}),
            "validation_mismatched": datasets.Dataset.from_dict({"premise": ["c"], "hypothesis": ["d"],
                                                                 "label": [0], "idx": [8]})}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, task: fake)
    (train,) = load_glue("mnli", "train")
    assert train.texts == ["p1", "p2"] and train.pairs == ["h1", "h2"] and train.labels == [2, 0]
    m, mm = load_glue("mnli", "dev")
    assert (m.index, mm.index, m.labels, mm.labels) == ([7], [8], [1], [0])


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n", encoding="utf-8")


def test_fake_mnli_qqp_layouts(tmp_path):
    head = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "label1", "gold_label"]
    _write(tmp_path / "MNLI/train.tsv", [head, ["0", "1", "1a", "g", "A man.", "A person.", "entailment", "entailment"],
                                         ["1", "2", "2a", "g", "A cat.", "A dog.", "contradiction", "contradiction"]])
    _write(tmp_path / "MNLI/dev_matched.tsv", [head, ["0", "1", "1a", "g", "x", "y", "neutral", "neutral"]])
    _write(tmp_path / "MNLI/dev_mismatched.tsv", [head, ["0", "1", "1a", "g", "x", "y", "entailment", "entailment"]])
    (train,) = load_glue("mnli", "train", str(tmp_path))
    assert train.labels == [0, 2] and train.pairs == ["A person.", "A dog."]
    m, mm = load_glue("mnli", "dev", str(tmp_path))
    assert m.labels == [1] and mm.labels == [0]
    _write(tmp_path / "QQP/train.tsv", [["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                                        ["5", "1", "2", "How?", "Why?", "1"]])
    (qqp,) = load_glue("qqp", "train", str(tmp_path))
    assert (qqp.texts, qqp.pairs, qqp.labels, qqp.index) == (["How?"], ["Why?"], [1], [5])
    _write(tmp_path / "RTE/train.tsv", [["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "maybe"]])
    with pytest.raises(DataError, match=r"RTE/train.tsv, line 2: label 'maybe' is not one of"):
        load_glue("rte", "train", str(tmp_path))
    _write(tmp_path / "RTE/dev.tsv", [["index", "premise", "label"], ["0", "a", "entailment"]])
    with pytest.raises(DataError, match=r"no 'sentence1' column in its header"):
        load_glue("rte", "dev", str(tmp_path))


def test_leaderboard_files(tmp_path):
    p = write_leaderboard("rte", [0, 1, 1], str(tmp_path / "RTE.tsv"), [0, 1, 2])
    assert open(p).read() == "index\tprediction\n0\tentailment\n1\tnot_entailment\n2\tnot_entailment\n"
    p = write_leaderboard("cola", [1, 0], str(tmp_path / "CoLA.tsv"))
    assert open(p).read() == "index\tprediction\n0\t1\n1\t0\n"
    p = write_leaderboard("stsb", [1.23456, 5.7, -0.2], str(tmp_path / "STS-B.tsv"))
    assert open(p).read() == "index\tprediction\n0\t1.235\n1\t5.000\n2\t0.000\n"
    p = write_leaderboard("mnli", [2], str(tmp_path / "MNLI-m.tsv"))
    assert open(p).read().splitlines()[1] == "0\tcontradiction"


ROWS = [("great film", "pos"), ("awful film", "neg"), ("so good", "pos"), ("bad bad", "neg"), ("meh", "neutral")]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_own_file_formats(tmp_path, fmt):
    df = pd.DataFrame({"text": [r[0] for r in ROWS], "label": [r[1] for r in ROWS]})
    path = tmp_path / f"train.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    data, names, regression = load_train_file(str(path))
    assert names == ["neg", "neutral", "pos"] and not regression
    assert data.texts == [r[0] for r in ROWS] and data.labels == [2, 0, 2, 0, 1] and data.pairs is None


def test_own_labels_pairs_and_regression(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "y": y}) for i, y in enumerate([10, 2, 2, 10])))
    data, names, reg = load_train_file(str(p), "q", "a", "y")
    assert names == ["2", "10"] and data.labels == [1, 0, 0, 1] and data.pairs == ["a0", "a1", "a2", "a3"]
    r = tmp_path / "reg.csv"
    r.write_text("sentence,score\nx,0.5\ny,3.25\nz,1.0\n")
    data, names, reg = load_train_file(str(r), label_column="score")
    assert reg and names == [] and data.labels == [0.5, 3.25, 1.0] and data.texts == ["x", "y", "z"]


def test_own_file_errors(tmp_path):
    good = tmp_path / "train.csv"
    good.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match=r"train.csv has no label column 'stars'; its columns are \['text', 'label'\]"):
        load_train_file(str(good), label_column="stars")
    with pytest.raises(DataError, match=r"train.csv has no text column 'body'"):
        load_train_file(str(good), text_column="body")
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nc,x\nd,z\n")
    with pytest.raises(DataError, match=r"dev.csv: label 'z' in column 'label' \(row 2\) was not seen in training; "
                                        r"known labels: \['x', 'y'\]"):
        load_file(str(dev), "text", None, "label", ["x", "y"], False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.jsonl is empty"):
        load_train_file(str(empty))
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match="h.csv has no rows"):
        load_train_file(str(header_only))
    with pytest.raises(DataError, match="not found"):
        load_train_file(str(tmp_path / "missing.csv"))
    one = tmp_path / "one.csv"
    one.write_text("text,label\na,x\nb,x\n")
    with pytest.raises(DataError, match="single value"):
        load_train_file(str(one))
    hole = tmp_path / "hole.csv"
    hole.write_text("text,label\na,x\n,y\n")
    with pytest.raises(DataError, match=r"column 'text' is empty in row 2"):
        load_train_file(str(hole))
    with pytest.raises(DataError, match="unknown format"):
        (tmp_path / "x.xml").write_text("<a/>")
        load_train_file(str(tmp_path / "x.xml"))


def test_train_size_subset_is_fixed_by_seed():
    data = TextData([str(i) for i in range(100)], None, list(range(100)), list(range(100)))
    a, b, c = subset(data, 10, 1), subset(data, 10, 1), subset(data, 10, 2)
    assert len(a) == 10 and a.texts == b.texts and a.texts != c.texts
    assert a.labels == [int(t) for t in a.texts] and a.index == a.labels  # rows stay aligned
    assert subset(data, 1000, 1) is data


def test_load_splits_glue_train_size(glue_dir):
    info, splits = load_splits(DataArguments(task="rte", data_dir=str(glue_dir), train_size=100, eval_size=20),
                               ("train", "dev"), seed=3)
    assert info.primary == "accuracy" and info.label_names == ["entailment", "not_entailment"]
    assert len(splits["train"][0]) == 100 and len(splits["dev"][0]) == 20


def test_labels_differing_by_spaces_are_one_class_and_by_case_refused(tmp_path, capsys):
    p = tmp_path / "train.csv"
    p.write_text('text,label\na,pos\nb,"pos "\nc," pos"\nd,neg\n')
    data, names, _ = load_train_file(str(p))
    assert names == ["neg", "pos"] and data.labels == [1, 1, 1, 0]
    assert "labels are read without surrounding spaces ('pos ' in row 2 is the class 'pos')" in capsys.readouterr().err
    p.write_text('text,label\na,pos\nb,neg\nc," pos"\nd,NEG\n')
    with pytest.raises(DataError, match=r"train.csv: label column 'label' has labels that differ only in case: "
                                        r"'neg' \(row 2\) and 'NEG' \(row 4\); write each class the same way"):
        load_train_file(str(p))


def test_duplicate_column_names_are_refused(tmp_path):
    for name, sep in (("train.csv", ","), ("train.tsv", "\t")):
        p = tmp_path / name
        p.write_text(sep.join(["text", "text", "label"]) + "\n" + sep.join(["a", "b", "x"]) + "\n"
                     + sep.join(["c", "d", "y"]) + "\n")
        with pytest.raises(DataError, match=rf"{name}: the header names column 'text' twice \(columns 1 and 2\); "
                                            "rename one"):
            load_train_file(str(p))


def test_list_label_in_jsonl_names_the_row(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": ["x", "y"]}\n')
    with pytest.raises(DataError, match=r"train.jsonl: label column 'label', row 2: \['x', 'y'\] is a list, not one "
                                        "label"):
        load_train_file(str(p))
    p.write_text('{"text": "a", "label": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"train.jsonl, line 2: a JSON list, not an object"):
        load_train_file(str(p))


def test_txt_is_tab_separated_and_the_accepted_formats_are_named(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match=r"train.txt: a .txt file is read as tab-separated \(TSV\), and its first line "
                                        r"has no tab; rename a comma-separated file to .csv \(accepted: .csv, .tsv"):
        load_train_file(str(p))
    p.write_text("text\tlabel\na\tx\nb\ty\n")
    assert load_train_file(str(p))[1] == ["x", "y"]
    with pytest.raises(DataError, match=r"unknown format '.xlsx'; the format comes from the extension: .csv, .tsv"):
        (tmp_path / "x.xlsx").write_text("x")
        load_train_file(str(tmp_path / "x.xlsx"))
