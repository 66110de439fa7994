"""The user's own files: CSV, TSV, JSONL (or JSON) and Parquet, read with pandas."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from ..errors import DataError
from .glue import TextData

FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
           ".pq": "parquet"}
TEXT_GUESSES = ("text", "sentence", "sentence1", "question", "premise", "content", "review")


def read_table(path: str):
    """A pandas DataFrame of ``path``; the format comes from the extension."""
    import pandas as pd

    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise DataError(f"data file {path} not found")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"data file {path}: unknown format {p.suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")
    if p.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    try:
        if fmt == "csv":
            df = pd.read_csv(p, keep_default_na=False, na_values=[""])
        elif fmt == "tsv":
            df = pd.read_csv(p, sep="\t", quoting=3, keep_default_na=False, na_values=[""], encoding="utf-8-sig")
        elif fmt == "jsonl":
            df = pd.read_json(p, lines=True, dtype=False)
        elif fmt == "json":
            try:
                df = pd.read_json(p, dtype=False)
            except ValueError:
                df = pd.read_json(p, lines=True, dtype=False)
        else:
            df = pd.read_parquet(p)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"could not read {path} as {fmt}: {type(exc).__name__}: {exc}") from None
    if len(df) == 0:
        raise DataError(f"data file {path} has no rows")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _column(df, name: str, path: str, what: str):
    if name not in df.columns:
        raise DataError(f"{path} has no {what} column {name!r}; its columns are {list(df.columns)} "
                        f"(choose one with --{what.replace(' ', '-')}-column)")
    col = df[name]
    if col.isna().any():
        row = int(col.isna().to_numpy().nonzero()[0][0])
        raise DataError(f"{path}: column {name!r} is empty in row {row + 1}")
    return col


def guess_text_column(df, path: str) -> str:
    for name in TEXT_GUESSES:
        if name in df.columns:
            return name
    raise DataError(f"{path}: cannot guess the text column (none of {list(TEXT_GUESSES)}); its columns are "
                    f"{list(df.columns)}; pass --text-column")


def infer_labels(values: Sequence, path: str, column: str):
    """(label_names, is_regression) from a training label column: floats that are not all whole
    numbers mean regression; anything else is classes, named by their string form, sorted (numbers
    numerically)."""
    import numpy as np

    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        if np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)) and len(np.unique(arr)) <= 2:
            pass  # 0.0/1.0 floats: classes
        else:
            return [], True
    if arr.dtype.kind == "b":
        return ["False", "True"], False
    uniq = list(dict.fromkeys(values))
    try:
        uniq = sorted(uniq, key=lambda v: float(v))
    except (TypeError, ValueError):
        uniq = sorted(uniq, key=str)
    names = [_label_str(v) for v in uniq]
    if len(names) < 2:
        raise DataError(f"{path}: label column {column!r} has a single value {names}; classification needs 2 or more")
    return names, False


def _label_str(v) -> str:
    if isinstance(v, float) and v == int(v):
        v = int(v)
    return str(v)


def load_file(path: str, text_column: Optional[str] = None, pair_column: Optional[str] = None,
              label_column: Optional[str] = "label", label_names: Optional[list] = None,
              regression: Optional[bool] = None, labeled: bool = True) -> TextData:
    """Read a file into TextData. With ``label_names`` given (from training), labels are mapped to
    those ids and an unseen label is an error naming the file, column and value."""
    df = read_table(path)
    text_column = text_column or guess_text_column(df, path)
    texts = [str(x) for x in _column(df, text_column, path, "text")]
    pairs = [str(x) for x in _column(df, pair_column, path, "text pair")] if pair_column else None
    index = [int(x) for x in df["idx"]] if "idx" in df.columns else (
        [int(x) for x in df["index"]] if "index" in df.columns and df["index"].dtype.kind in "iu"
        else list(range(len(df))))
    labels = None
    if labeled and label_column:
        raw = list(_column(df, label_column, path, "label"))
        if regression:
            try:
                labels = [float(x) for x in raw]
            except (TypeError, ValueError):
                raise DataError(f"{path}: label column {label_column!r} must hold numbers for regression") from None
        else:
            if label_names is None:
                label_names, _ = infer_labels(raw, path, label_column)
            ids = {n: i for i, n in enumerate(label_names)}
            labels = []
            for row, v in enumerate(raw):
                key = _label_str(v)
                if key not in ids:
                    raise DataError(f"{path}: label {key!r} in column {label_column!r} (row {row + 1}) was not seen "
                                    f"in training; known labels: {list(label_names)}")
                labels.append(ids[key])
    return TextData(texts, pairs, labels, index, str(path))


def load_train_file(path: str, text_column=None, pair_column=None, label_column="label"):
    """Read a training file and infer the label set: returns (TextData, label_names, is_regression)."""
    df = read_table(path)
    raw = list(_column(df, label_column, path, "label"))
    names, regression = infer_labels(raw, path, label_column)
    data = load_file(path, text_column, pair_column, label_column, names or None, regression)
    return data, names, regression
