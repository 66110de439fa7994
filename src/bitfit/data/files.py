"""The user's own files: CSV, TSV, JSONL (or JSON) and Parquet, read with pandas."""

from __future__ import annotations

import math
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


def _label_column(df, name: str, path: str):
    """The label column as is: its empty cells and non-numbers are judged (with row and value) by
    infer_labels / check_regression_labels, not reported as 'empty' here."""
    if name not in df.columns:
        _column(df, name, path, "label")  # raises: no such column
    return df[name]


def guess_text_column(df, path: str) -> str:
    for name in TEXT_GUESSES:
        if name in df.columns:
            return name
    raise DataError(f"{path}: cannot guess the text column (none of {list(TEXT_GUESSES)}); its columns are "
                    f"{list(df.columns)}; pass --text-column")


# How a label column is read (training file; the dev/test files then follow the training file's choice):
#  * a column where more than half of the values are numbers (1, 0.5, "3.25", also nan/inf) is numeric:
#    every value must then be a finite number; an empty cell, nan, inf or a word ("abc") is an error naming
#    the file, the row and the value;
#  * a numeric column is regression when some value is not a whole number (0.5), or when the values are
#    written as floats (1.0, 2.0 ...) and there are more than 2 distinct ones; otherwise its whole numbers
#    are classes (0/1, 1..5 stars), sorted numerically;
#  * any other column is classes named by their text, sorted; an empty cell or a missing-value marker
#    (nan, NaN, null, None, inf) is an error there too: it is never meant as a class;
#  * true/false columns are the classes False, True.
MISSING_MARKERS = {"nan", "-nan", "+nan", "na", "n/a", "null", "none", "inf", "+inf", "-inf", "infinity",
                   "+infinity", "-infinity"}


def _number(v):
    """(float value, written_as_float) of a number or a numeric string, else None. Booleans are not numbers."""
    import numpy as np

    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        return float(v), False
    if isinstance(v, (float, np.floating)):
        return float(v), True
    if isinstance(v, str):
        t = v.strip()
        try:
            x = float(t)
        except ValueError:
            return None
        try:
            int(t)
            return x, False
        except ValueError:
            return x, True
    return None


def _is_missing(v) -> bool:
    if v is None:
        return True
    try:
        import pandas as pd

        if pd.isna(v):
            return True
    except (TypeError, ValueError):
        pass
    return isinstance(v, str) and not v.strip()


def _bad_label(path: str, column: str, row: int, value, why: str) -> DataError:
    shown = "an empty cell" if _is_missing(value) else f"{value!r}"
    return DataError(f"{path}: label column {column!r}, row {row + 1}: {shown} {why}; fix or remove that row "
                     "(rows count from 1, not counting a header line)")


def check_regression_labels(values: Sequence, path: str, column: str,
                            rule: str = "regression labels must be finite numbers") -> list:
    """The labels as floats; a non-number, an empty cell, nan or inf is an error naming the row and value."""
    out = []
    for row, v in enumerate(values):
        num = None if _is_missing(v) else _number(v)
        if num is None:
            raise _bad_label(path, column, row, v, f"is not a number ({rule})")
        if not math.isfinite(num[0]):
            raise _bad_label(path, column, row, v, f"is not a finite number ({rule})")
        out.append(num[0])
    return out


def infer_labels(values: Sequence, path: str, column: str):
    """(label_names, is_regression) from a training label column, by the rule above (MISSING_MARKERS)."""
    import numpy as np

    values = list(values)
    if values and all(isinstance(v, (bool, np.bool_)) for v in values):
        return ["False", "True"], False
    present = [v for v in values if not _is_missing(v)]
    nums = [_number(v) for v in present]
    numeric = sum(n is not None for n in nums) * 2 > len(present) if present else False
    if numeric:
        floats = check_regression_labels(values, path, column, "the column holds numbers, so every label must be "
                                         "a finite number")
        distinct = set(floats)
        as_float = any(_number(v)[1] for v in values)
        if any(x != math.floor(x) for x in distinct) or (as_float and len(distinct) > 2):
            return [], True
        names = [_label_str(x) for x in sorted(distinct)]
    else:
        for row, v in enumerate(values):
            if _is_missing(v) or (isinstance(v, str) and v.strip().lower() in MISSING_MARKERS):
                raise _bad_label(path, column, row, v, "looks like a missing value, not a class")
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
    """A label's class name: whole numbers without '.0' (1.0 -> "1"), text stripped."""
    if isinstance(v, str):
        return v.strip() or v
    num = _number(v)
    if num is not None and math.isfinite(num[0]) and num[0] == int(num[0]):
        return str(int(num[0]))
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
        raw = list(_label_column(df, label_column, path))
        if regression:
            labels = check_regression_labels(raw, path, label_column)
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
    raw = list(_label_column(df, label_column, path))
    names, regression = infer_labels(raw, path, label_column)
    data = load_file(path, text_column, pair_column, label_column, names or None, regression)
    return data, names, regression
