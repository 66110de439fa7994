"""GLUE tasks: registry, local TSV loading (the GLUE layout, CoLA's and MRPC's included) and
the Hub path through ``datasets``.

Every loader returns :class:`TextData` (texts, optional text pairs, labels as class ids or
floats, and the GLUE ``index`` used by leaderboard files).
"""

from __future__ import annotations

import csv
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import DataError
from .metrics import METRICS

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass
class TextData:
    """One split of a text classification / regression task."""

    texts: list
    pairs: Optional[list] = None
    labels: Optional[list] = None  # class ids (int) or floats (regression); None for unlabeled test
    index: Optional[list] = None
    source: str = ""  # where it came from, for messages

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows) -> "TextData":
        rows = list(rows)
        pick = lambda xs: None if xs is None else [xs[i] for i in rows]  # noqa: E731
        return TextData(pick(self.texts), pick(self.pairs), pick(self.labels), pick(self.index), self.source)


@dataclass(frozen=True)
class GlueTask:
    name: str
    folder: str  # folder name in the GLUE layout
    text: str  # header column of the first text
    pair: Optional[str]  # header column of the second text
    label: Optional[str]  # header column of the label (None: last column)
    label_names: tuple = ()  # class names in id order; () = regression
    string_labels: bool = False  # True: files store the names (RTE, QNLI, MNLI); else ints 0..n-1
    leaderboard: tuple = ()  # leaderboard file names, one per test split
    hub_text: str = ""
    hub_pair: Optional[str] = None
    dev_splits: tuple = ("dev",)  # file stems of the dev split(s)
    test_splits: tuple = ("test",)
    headerless: Optional[dict] = None  # positional columns when a file has no header (CoLA)
    alt_columns: dict = field(default_factory=dict)  # alternative header names

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1

    @property
    def metrics(self) -> tuple:
        return METRICS[self.name]


TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", "CoLA", "sentence", None, "label", ("unacceptable", "acceptable"),
                     leaderboard=("CoLA.tsv",), hub_text="sentence",
                     headerless={"text": 3, "label": 1}),
    "sst2": GlueTask("sst2", "SST-2", "sentence", None, "label", ("negative", "positive"),
                     leaderboard=("SST-2.tsv",), hub_text="sentence"),
    "mrpc": GlueTask("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent"),
                     leaderboard=("MRPC.tsv",), hub_text="sentence1", hub_pair="sentence2"),
    "qqp": GlueTask("qqp", "QQP", "question1", "question2", "is_duplicate", ("not_duplicate", "duplicate"),
                    leaderboard=("QQP.tsv",), hub_text="question1", hub_pair="question2"),
    "stsb": GlueTask("stsb", "STS-B", "sentence1", "sentence2", "score", (),
                     leaderboard=("STS-B.tsv",), hub_text="sentence1", hub_pair="sentence2"),
    "mnli": GlueTask("mnli", "MNLI", "sentence1", "sentence2", "gold_label",
                     ("entailment", "neutral", "contradiction"), string_labels=True,
                     leaderboard=("MNLI-m.tsv", "MNLI-mm.tsv"), hub_text="premise", hub_pair="hypothesis",
                     dev_splits=("dev_matched", "dev_mismatched"), test_splits=("test_matched", "test_mismatched")),
    "qnli": GlueTask("qnli", "QNLI", "question", "sentence", "label", ("entailment", "not_entailment"),
                     string_labels=True, leaderboard=("QNLI.tsv",), hub_text="question", hub_pair="sentence"),
    "rte": GlueTask("rte", "RTE", "sentence1", "sentence2", "label", ("entailment", "not_entailment"),
                    string_labels=True, leaderboard=("RTE.tsv",), hub_text="sentence1", hub_pair="sentence2"),
    "wnli": GlueTask("wnli", "WNLI", "sentence1", "sentence2", "label", ("not_entailment", "entailment"),
                     leaderboard=("WNLI.tsv",), hub_text="sentence1", hub_pair="sentence2"),
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli", "sst": "sst2"}


def get_task(name: str) -> GlueTask:
    key = name.lower().strip()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise DataError(f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)} "
                        "(or give your own data with --train-file/--validation-file)")
    return TASKS[key]


def takes_pairs(record) -> Optional[bool]:
    """Whether a run's task takes text pairs (True) or single texts (False), from its task.json record (``kind``,
    ``task``, ``text_pair_column``); None where the record does not say (instruction data, no record)."""
    if not isinstance(record, dict):
        return None
    if record.get("kind") == "glue" and isinstance(record.get("task"), str) and record["task"].lower() in TASKS:
        return TASKS[record["task"].lower()].hub_pair is not None
    if record.get("kind") == "files":
        return bool(record.get("text_pair_column"))
    return None


def glue_dir_from_env(data_dir: Optional[str]) -> Optional[str]:
    return data_dir or os.environ.get("BITFIT_GLUE_DIR") or None


def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:  # utf-8-sig drops MRPC's BOM
        return [row for row in csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def _parse_label(task: GlueTask, raw: str, path: Path, line: int):
    raw = raw.strip()
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{path}, line {line}: score {raw!r} is not a number") from None
        if not math.isfinite(value):
            raise DataError(f"{path}, line {line}: score {raw!r} is not a finite number; fix or remove that line")
        return value
    if task.string_labels:
        if raw not in task.label_names:
            raise DataError(f"{path}, line {line}: label {raw!r} is not one of {list(task.label_names)}")
        return task.label_names.index(raw)
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < task.num_labels:
        raise DataError(f"{path}, line {line}: label {raw!r} is not one of 0..{task.num_labels - 1}")
    return value


def read_glue_file(task: GlueTask, path: Path, labeled: bool) -> TextData:
    """Read one GLUE-layout TSV file (header by column name; CoLA train/dev without header)."""
    if not path.exists():
        raise DataError(f"GLUE {task.name}: file {path} not found")
    rows = _read_tsv(path)
    if not rows:
        raise DataError(f"GLUE {task.name}: file {path} is empty")
    header = [h.strip() for h in rows[0]]
    texts, pairs, labels, index = [], [] if task.pair else None, [] if labeled else None, []
    if task.text in header:
        col = {name: i for i, name in enumerate(header)}
        need = [task.text] + ([task.pair] if task.pair else []) + ([task.label] if labeled and task.label else [])
        missing = [c for c in need if c not in col]
        if missing:
            raise DataError(f"GLUE {task.name}: {path} lacks column(s) {missing}; its header is {header}")
        t_i, p_i = col[task.text], col.get(task.pair) if task.pair else None
        l_i = (col[task.label] if task.label else len(header) - 1) if labeled else None
        x_i = col.get("index", col.get("id"))
        body, first_line = rows[1:], 2
    elif task.headerless and labeled:
        t_i, p_i, l_i, x_i = task.headerless["text"], None, task.headerless["label"], None
        body, first_line = rows, 1
    else:
        raise DataError(f"GLUE {task.name}: {path} has no {task.text!r} column in its header {header}")
    for n, row in enumerate(body):
        line = first_line + n
        need = max(i for i in (t_i, p_i, l_i, x_i) if i is not None)
        if len(row) <= need:
            raise DataError(f"GLUE {task.name}: {path}, line {line} has {len(row)} columns, expected > {need}")
        texts.append(row[t_i])
        if pairs is not None:
            pairs.append(row[p_i])
        if labels is not None:
            labels.append(_parse_label(task, row[l_i], path, line))
        index.append(int(row[x_i]) if x_i is not None and row[x_i].strip().isdigit() else n)
    if not texts:
        raise DataError(f"GLUE {task.name}: file {path} has a header but no rows")
    return TextData(texts, pairs, labels, index, str(path))


def split_files(task: GlueTask, split: str) -> list[str]:
    """File stems of ``split`` ("train", "dev"/"validation", "test")."""
    if split == "train":
        return ["train"]
    if split in ("dev", "validation", "eval"):
        return list(task.dev_splits)
    if split == "test":
        return list(task.test_splits)
    raise DataError(f"unknown split {split!r}; use train, dev or test")


def load_glue_local(task: GlueTask, data_dir: str, split: str) -> list[TextData]:
    """Read ``split`` of ``task`` from ``<data_dir>/<TASK>/<split>.tsv`` (MNLI: two dev/test files)."""
    root = Path(os.path.expanduser(data_dir))
    if not root.is_dir():
        raise DataError(f"GLUE data folder {root} does not exist (from --data-dir or BITFIT_GLUE_DIR)")
    folder = next((root / n for n in (task.folder, task.folder.lower(), task.name, task.name.upper())
                   if (root / n).is_dir()), None)
    if folder is None:
        raise DataError(f"GLUE {task.name}: no folder {task.folder}/ in {root}; it holds "
                        f"{sorted(p.name for p in root.iterdir() if p.is_dir())}. Download the task "
                        f"into {root / task.folder}/ or use the Hub (omit --data-dir, online)")
    out = []
    for stem in split_files(task, split):
        path = folder / f"{stem}.tsv"
        if not path.exists():
            have = sorted(p.name for p in folder.iterdir())
            raise DataError(f"GLUE {task.name}: the {split} split needs {path}, which is missing "
                            f"(the folder holds {have})")
        out.append(read_glue_file(task, path, labeled=split != "test"))
    return out


def load_glue_hub(task: GlueTask, split: str) -> list[TextData]:
    """Load ``split`` of ``task`` with ``datasets.load_dataset("glue", task)``."""
    try:
        import datasets

        ds = datasets.load_dataset("glue", task.name)
    except Exception as exc:  # offline, no cache, ...
        raise DataError(
            f"GLUE {task.name}: no local data folder given (--data-dir or BITFIT_GLUE_DIR) and loading it from "
            f"the Hugging Face Hub failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Point --data-dir at a folder in the GLUE layout (<dir>/RTE/train.tsv ...)"
        ) from None
    names = {"train": ["train"], "test": ["test"]}.get(split)
    if names is None:
        names = ["validation"] if len(task.dev_splits) == 1 else ["validation_matched", "validation_mismatched"]
    if split == "test" and len(task.test_splits) > 1:
        names = ["test_matched", "test_mismatched"]
    out = []
    for name in names:
        d = ds[name]
        labels = None if split == "test" else [float(x) if task.is_regression else int(x) for x in d["label"]]
        if labels is not None and task.is_regression and not all(math.isfinite(x) for x in labels):
            row = next(i for i, x in enumerate(labels) if not math.isfinite(x))
            raise DataError(f"hub:glue/{task.name}/{name}: row {row + 1} has the non-finite score {labels[row]}")
        out.append(TextData(list(d[task.hub_text]), list(d[task.hub_pair]) if task.hub_pair else None,
                            labels, list(d["idx"]), f"hub:glue/{task.name}/{name}"))
    return out


def load_glue(task_name: str, split: str, data_dir: Optional[str] = None) -> list[TextData]:
    """``split`` ("train", "dev", "test") of a GLUE task: from ``data_dir`` (or ``$BITFIT_GLUE_DIR``)
    when given, else from the Hub. MNLI's dev and test give two parts (matched, mismatched)."""
    task = get_task(task_name)
    data_dir = glue_dir_from_env(data_dir)
    if data_dir:
        return load_glue_local(task, data_dir, split)
    return load_glue_hub(task, split)


def write_leaderboard(task_name: str, predictions: list, path: str, index: Optional[list] = None) -> str:
    """Write GLUE leaderboard predictions: ``index<TAB>prediction`` with label names for RTE, QNLI and
    MNLI, class ids elsewhere, and scores (3 decimals, clipped to [0, 5]) for STS-B."""
    task = get_task(task_name)
    index = list(range(len(predictions))) if index is None else index
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write("index\tprediction\n")
        for i, p in zip(index, predictions):
            if task.is_regression:
                value = f"{min(5.0, max(0.0, float(p))):.3f}"
            elif task.string_labels:
                value = task.label_names[int(p)]
            else:
                value = str(int(p))
            fh.write(f"{i}\t{value}\n")
    os.replace(tmp, path)
    return path
