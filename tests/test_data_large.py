"""Large data files with bounded memory: a row of millions of words is cut before tokenising (to the same
tokens), files over --max-rows are refused, and --train-size keeps only the sampled rows' texts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bitfit.data import TextData
from bitfit.data.files import load_file, load_train_file
from bitfit.errors import DataError
from bitfit.training.arguments import DataArguments
from bitfit.training.tasks import encode, load_splits, subset

SRC = Path(__file__).resolve().parents[1] / "src"
HUGE_WORDS = 2_000_000
GROWTH_BOUND_MB = 250  # reading + tokenising the file below; unbounded tokenising of the long row takes > 1 GB

MEASURE = r"""
import json, resource, sys
import pandas, pyarrow, tqdm  # imported before the baseline: their import is not the data's memory
from transformers import AutoTokenizer
from bitfit.training.arguments import DataArguments
from bitfit.training.tasks import encode, load_splits
tok = AutoTokenizer.from_pretrained(sys.argv[2])
tok(["warm up"] * 64, truncation=True, max_length=32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
info, splits = load_splits(DataArguments(train_file=sys.argv[1], max_seq_length=32), ("train",))
ds = encode(tok, splits["train"][0], 32, progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_mb": (after - before) / 1024, "labels": info.label_names,
                  "lengths": [len(ds[i]["input_ids"]) for i in range(len(ds))]}))
"""


def _huge_csv(path: Path, words: int) -> Path:
    vocab = ["good", "film", "bad", "plot", "the", "acting", "was", "fine"]
    with open(path, "w") as f:
        f.write("text,label\n")
        for i in range(20):
            if i == 10:
                f.write(" ".join(vocab[j % 8] for j in range(words)) + ",pos\n")
            else:
                f.write(f"{vocab[i % 8]} {vocab[(i + 3) % 8]},{'pos' if i % 2 else 'neg'}\n")
    return path


def test_enormous_row_trains_with_bounded_memory(tmp_path, minilm_dir):
    """A CSV whose row 11 has 2 million words is read and tokenised with its memory growth (ru_maxrss in a
    fresh process) below GROWTH_BOUND_MB, and that row is truncated to --max-seq-length."""
    path = _huge_csv(tmp_path / "huge.csv", HUGE_WORDS)
    assert path.stat().st_size > 9_000_000
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path), minilm_dir], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["labels"] == ["neg", "pos"]
    assert out["lengths"][10] == 32 and max(out["lengths"]) == 32 and len(out["lengths"]) == 20
    assert out["grew_mb"] < GROWTH_BOUND_MB, out["grew_mb"]


@pytest.fixture
def tok(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.mark.parametrize("text", [
    "word " * 20_000,  # ordinary words: the first piece fills the row
    " " * 40_000 + "tail words at the end",  # a long run of spaces (no tokens): the piece grows to the whole text
    "x" * 150 + " " + "y" * 300 + " " + "a b c " * 2000,  # words longer than WordPiece reads ([UNK] each)
], ids=["words", "spaces", "long-words"])
def test_cut_text_gives_the_whole_texts_tokens(tok, text):
    data = TextData([text, "short row"], [text[:300], "pair"], [0, 1], [0, 1])
    got = encode(tok, data, 40, progress=False)
    want = tok([text, "short row"], [text[:300], "pair"], truncation=True, max_length=40)
    for i in range(2):
        assert got[i]["input_ids"] == want["input_ids"][i]
        assert got[i]["token_type_ids"] == want["token_type_ids"][i]
        assert got[i]["attention_mask"] == want["attention_mask"][i] and got[i]["labels"] == i
    single = encode(tok, TextData([text], None, [1], [0]), 40, progress=False)
    assert single[0]["input_ids"] == tok(text, truncation=True, max_length=40)["input_ids"]


def test_instruction_example_cut_gives_the_whole_texts_tokens(tok):
    from bitfit.data.instruct import encode_example

    class Plain:  # encode_example's tokenizer: the real one without the cut helper knowing
        eos_token_id = tok.sep_token_id

        def __call__(self, text, **kw):
            calls.append(len(text))
            return tok(text, **kw)

    calls = []
    ex = {"instruction": "Summarise. " + "long input words " * 50_000, "input": "", "output": "ok " * 10}
    got = encode_example(Plain(), ex, 48)
    assert max(calls) < 20_000  # the 850,000-character prompt was cut before tokenising
    p = tok(f"Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{ex['instruction']}\n\n### Response:\n")["input_ids"]
    assert got["input_ids"] == p[:48] and got["labels"] == [-100] * 48


def _rows_csv(path: Path, n: int) -> str:
    path.write_text("text,label\n" + "".join(f"row {i} words,{'pos' if i % 3 else 'neg'}\n" for i in range(n)))
    return str(path)


def test_too_many_rows_is_refused_and_train_size_reads_only_its_rows(tmp_path):
    path = _rows_csv(tmp_path / "train.csv", 50)
    with pytest.raises(DataError, match=r"train.csv has more than 20 rows, the limit of --max-rows; train on a "
                                        r"random subset with --train-size N, or raise --max-rows"):
        load_splits(DataArguments(train_file=path, max_rows=20), ("train",))
    with pytest.raises(DataError, match="more than 20 rows"):
        load_file(path, "text", None, "label", ["neg", "pos"], max_rows=20)
    # --train-size within the limit: the same rows subset() chooses from the whole file, labels from all rows
    info, splits = load_splits(DataArguments(train_file=path, max_rows=20, train_size=12), ("train",), seed=5)
    whole, names, _ = load_train_file(path)
    want = subset(whole, 12, 5)
    got = splits["train"][0]
    assert info.label_names == names == ["neg", "pos"]
    assert (got.texts, got.labels, got.index) == (want.texts, want.labels, want.index) and len(got) == 12
    with pytest.raises(DataError, match="--max-rows must be a positive number"):
        load_splits(DataArguments(train_file=path, max_rows=0), ("train",))


def test_progress_bars_on_large_reads(tmp_path, monkeypatch, capsys):
    import bitfit.data.reading as reading
    import bitfit.data.tokens as tokens

    monkeypatch.setattr(reading, "PROGRESS_BYTES", 100)
    monkeypatch.setattr(reading, "CHUNK_ROWS", 7)
    monkeypatch.setattr(tokens, "PROGRESS_ROWS", 10)
    path = _rows_csv(tmp_path / "train.csv", 50)
    data, _, _ = load_train_file(path)
    assert data.texts[49] == "row 49 words" and data.index == list(range(50))  # chunks joined in order
    assert "reading train.csv" in capsys.readouterr().err


def test_jsonl_and_parquet_chunks_keep_order(tmp_path, monkeypatch):
    import pandas as pd

    import bitfit.data.reading as reading

    monkeypatch.setattr(reading, "CHUNK_ROWS", 4)
    rows = [{"text": f"t{i}", "label": i % 2, "extra": "x"} for i in range(11)]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(p)
    for path in (j, p):
        data, names, reg = load_train_file(str(path))
        assert data.texts == [f"t{i}" for i in range(11)] and data.labels == [i % 2 for i in range(11)]
        assert names == ["0", "1"] and not reg
