"""The user's own files: CSV, TSV, JSONL (or JSON) and Parquet, read with pandas."""

from __future__ import annotations

import math
import random
import sys
from typing import Optional, Sequence

from ..errors import DataError
from .glue import TextData
from .reading import FORMATS, MAX_ROWS, Source, read_table  # noqa: F401  (FORMATS, read_table: public names)

TEXT_GUESSES = ("text", "sentence", "sentence1", "question", "premise", "content", "review")


def guess_text_column(columns, path: str) -> str:
    """The first of TEXT_GUESSES among ``columns`` (a list of names, or a DataFrame)."""
    names = [str(c) for c in getattr(columns, "columns", columns)]
    for name in TEXT_GUESSES:
        if name in names:
            return name
    raise DataError(f"{path}: cannot guess the text column (none of {list(TEXT_GUESSES)}); its columns are "
                    f"{names}; pass --text-column")


def columns(path: str) -> list:
    """The column names of a data file (its header; the first rows' keys for JSON/JSONL)."""
    return Source(path).columns()


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
    check_scalar_labels(values, path, column)
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
        uniq = _distinct_classes(values, path, column)
        try:
            uniq = sorted(uniq, key=lambda v: float(v))
        except (TypeError, ValueError):
            uniq = sorted(uniq, key=str)
        names = [_label_str(v) for v in uniq]
    if len(names) < 2:
        raise DataError(f"{path}: label column {column!r} has a single value {names}; classification needs 2 or more")
    return names, False


def _distinct_classes(values: list, path: str, column: str) -> list:
    """The distinct class values, text stripped of surrounding spaces (`pos` and `pos ` are one class; a note
    says so); two labels that differ only in case (`neg`, `NEG`) are an error naming both rows."""
    first: dict = {}  # class value -> first row
    spaced = None
    for row, v in enumerate(values):
        key = v.strip() if isinstance(v, str) else v
        if key is not v and key != v and spaced is None:
            spaced = (row, v)
        if key not in first:
            first[key] = row
    folded: dict = {}
    for key, row in first.items():
        if isinstance(key, str):
            other = folded.setdefault(key.casefold(), (key, row))
            if other[0] != key:
                (a, ra), (b, rb) = sorted([other, (key, row)], key=lambda x: x[1])
                raise DataError(f"{path}: label column {column!r} has labels that differ only in case: {a!r} "
                                f"(row {ra + 1}) and {b!r} (row {rb + 1}); write each class the same way in every "
                                "row (rows count from 1, not counting a header line)")
    if spaced is not None:
        print(f"bitfit: {path}: labels are read without surrounding spaces ({spaced[1]!r} in row {spaced[0] + 1} "
              f"is the class {spaced[1].strip()!r})", file=sys.stderr)
    return list(first)


def check_scalar_labels(values: Sequence, path: str, column: str, first_row: int = 0) -> None:
    """A label that is a list or an object (JSON ``[1, 2]``, ``{...}``) is an error naming its row."""
    for row, v in enumerate(values, first_row):
        if isinstance(v, (list, tuple, dict, set)) or getattr(v, "ndim", 0) > 0:
            kind = "an object" if isinstance(v, dict) else "a list"
            raise _bad_label(path, column, row, v, f"is {kind}, not one label (each row needs one class name or "
                             "number)")


def _label_str(v) -> str:
    """A label's class name: whole numbers without '.0' (1.0 -> "1"), text stripped."""
    if isinstance(v, str):
        return v.strip() or v
    num = _number(v)
    if num is not None and math.isfinite(num[0]) and num[0] == int(num[0]):
        return str(int(num[0]))
    return str(v)


def _read(path: str, text_column, pair_column, label_column, max_rows, rows=None):
    """(TextData without labels, raw labels or None, text column) of a file, read in chunks."""
    src = Source(path)
    names = src.columns()
    text_column = text_column or guess_text_column(names, path)
    for name, what in ((text_column, "text"), (pair_column, "text pair"), (label_column, "label")):
        if name and name not in names:
            raise DataError(f"{path} has no {what} column {name!r}; its columns are {names} "
                            f"(choose one with --{what.replace(' ', '-')}-column)")
    idx_col = "idx" if "idx" in names else ("index" if "index" in names else None)
    wanted = [c for c in dict.fromkeys((text_column, pair_column, label_column, idx_col)) if c]
    texts, pairs, labels, index = [], [] if pair_column else None, [] if label_column else None, []
    same: dict = {}  # one object per distinct label value: a million rows of "pos" hold one string
    for start, df in src.chunks(wanted, [c for c in (text_column, pair_column) if c], max_rows, rows):
        first = start if rows is None else None
        for col, out in ((text_column, texts), (pair_column, pairs)):
            if col:
                values = df[col]
                if values.isna().any():
                    at = int(values.isna().to_numpy().nonzero()[0][0])
                    row = first + at if first is not None else rows[len(out) + at]
                    raise DataError(f"{path}: column {col!r} is empty in row {row + 1}")
                out.extend(str(x) for x in values)
        if label_column:
            values = list(df[label_column])
            check_scalar_labels(values, path, label_column, first if first is not None else 0)
            labels.extend(same.setdefault(v, v) if isinstance(v, (str, int, bool)) else v for v in values)
        if idx_col:
            index.extend(df[idx_col])
    if not texts:
        raise DataError(f"data file {path} has no rows")
    if idx_col and idx_col == "index":
        try:
            index = [int(x) for x in index]
        except (TypeError, ValueError):
            index = list(range(len(texts)))
    elif idx_col:
        index = [int(x) for x in index]
    else:
        index = list(rows) if rows is not None else list(range(len(texts)))
    return TextData(texts, pairs, None, index, str(path)), labels, text_column


def _label_ids(raw: list, path: str, column: str, label_names: list) -> list:
    ids = {n: i for i, n in enumerate(label_names)}
    out = []
    for row, v in enumerate(raw):
        key = _label_str(v)
        if key not in ids:
            raise DataError(f"{path}: label {key!r} in column {column!r} (row {row + 1}) was not seen "
                            f"in training; known labels: {list(label_names)}")
        out.append(ids[key])
    return out


def load_file(path: str, text_column: Optional[str] = None, pair_column: Optional[str] = None,
              label_column: Optional[str] = "label", label_names: Optional[list] = None,
              regression: Optional[bool] = None, labeled: bool = True, max_rows: Optional[int] = MAX_ROWS) -> TextData:
    """Read a file into TextData. With ``label_names`` given (from training), labels are mapped to
    those ids and an unseen label is an error naming the file, column and value. More than ``max_rows``
    rows is an error (--max-rows)."""
    data, raw, _ = _read(path, text_column, pair_column, label_column if labeled else None, max_rows)
    if labeled and label_column:
        if regression:
            data.labels = check_regression_labels(raw, path, label_column)
        else:
            if label_names is None:
                label_names, regression = infer_labels(raw, path, label_column)
            data.labels = check_regression_labels(raw, path, label_column) if regression else \
                _label_ids(raw, path, label_column, label_names)
    return data


_LAST: dict = {}  # the last training file read: `bitfit train` asks for it while parsing and again to train


def load_train_file(path: str, text_column=None, pair_column=None, label_column="label",
                    max_rows: Optional[int] = MAX_ROWS, sample: Optional[tuple] = None):
    """Read a training file and infer the label set: returns (TextData, label_names, is_regression).

    ``sample=(n, seed)`` keeps the random subset of ``n`` rows that ``training.tasks.subset`` would choose
    (the labels are inferred from all rows): the file is read twice, its labels first, and only the kept
    rows' texts are held, so ``max_rows`` bounds the subset, not the file."""
    src = Source(path)
    st = src.path.stat()
    key = (str(src.path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, text_column, pair_column,
           label_column, max_rows, sample)
    if _LAST.get("key") == key:
        return _LAST["value"]
    _LAST.clear()
    rows = None
    if sample is not None:
        if label_column not in src.columns():
            _read(path, text_column, pair_column, label_column, max_rows)  # raises: no such column
        raw, same = [], {}
        for _, df in src.chunks([label_column], (), None):
            raw.extend(same.setdefault(v, v) if isinstance(v, (str, int, bool)) else v for v in df[label_column])
        n, seed = sample
        if n < len(raw):
            rows = sorted(random.Random(seed).sample(range(len(raw)), n))
    data, raw_all, _ = _read(path, text_column, pair_column, label_column, max_rows, rows)
    raw = raw if rows is not None else raw_all
    names, regression = infer_labels(raw, path, label_column)
    if regression:
        data.labels = check_regression_labels(raw_all, path, label_column)
    else:
        data.labels = _label_ids(raw_all, path, label_column, names)
    _LAST.update(key=key, value=(data, names, regression))
    return data, names, regression
