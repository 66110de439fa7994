"""The task of a run and its data: :class:`TaskInfo` (what task.json records: GLUE task, the user's own
files or instruction data; labels, metric), loading the train/dev/test splits, tokenizing them into an
:class:`EncodedDataset`, and the metric function the Trainer evaluates with."""

import dataclasses
import random
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import DataError
from .arguments import DataArguments


@dataclass
class TaskInfo:
    """What a run needs to know about its task; stored in the run folder (task.json)."""

    kind: str  # "glue", "files", "instruct"
    task: Optional[str]
    label_names: list
    regression: bool
    metrics: list  # metric names (GLUE), or [] for defaults
    primary: str  # metric the best checkpoint is chosen by
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    max_seq_length: int = 128
    positive_label: Optional[str] = None  # own binary data: the label F1 is for (None: label id 1)

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.label_names)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TaskInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def task_info(data_args: DataArguments, train=None) -> TaskInfo:
    from ..data import glue
    from ..data import metrics

    if data_args.is_instruct:
        return TaskInfo("instruct", "instruct", [], False, ["loss"], "loss", max_seq_length=data_args.max_seq_length)
    if data_args.task and not data_args.train_file:
        t = glue.get_task(data_args.task)
        return TaskInfo("glue", t.name, list(t.label_names), t.is_regression, list(t.metrics),
                        metrics.primary_metric(t.name) if t.name != "mnli" else "matched_accuracy",
                        max_seq_length=data_args.max_seq_length)
    if not data_args.train_file:
        raise DataError("no data: give --task (a GLUE task or 'instruct') or --train-file (your own data)")
    label_names, regression = train
    primary = "pearson" if regression else "accuracy"
    info = TaskInfo("files", data_args.task, label_names, regression, [], primary, data_args.text_column,
                    data_args.text_pair_column, data_args.label_column, data_args.max_seq_length)
    if data_args.positive_label is not None:
        if regression or len(label_names) != 2:
            raise DataError(f"--positive-label {data_args.positive_label}: binary F1 needs two classes, and the "
                            f"training file has {'a regression label' if regression else f'{len(label_names)} classes'}")
        if str(data_args.positive_label) not in label_names:
            raise DataError(f"--positive-label {data_args.positive_label}: not a label of the training file "
                            f"(its labels: {', '.join(map(str, label_names))})")
        info.positive_label = str(data_args.positive_label)
    elif not regression and len(label_names) == 2:
        info.positive_label = str(label_names[1])
    return info


class EncodedDataset(torch.utils.data.Dataset):
    """Pre-tokenized rows (dict of lists) with optional labels."""

    def __init__(self, encodings: dict, labels=None, index=None):
        self.enc = encodings
        self.labels = labels
        self.index = index
        self.n = len(next(iter(encodings.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.enc.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def encode(tokenizer, data, max_length: int, progress: bool = True):
    """The rows of ``data`` tokenised and truncated to ``max_length`` tokens, held compactly; a long text is
    cut before the tokenizer sees it, to the same tokens (bitfit.data.tokens)."""
    from ..data.tokens import encode_texts

    return encode_texts(tokenizer, data.texts, data.pairs, max_length, data.labels, data.index, progress=progress)


def encode_instructions(tokenizer, rows: list, max_length: int) -> EncodedDataset:
    from ..data.instruct import encode_example

    ex = [encode_example(tokenizer, r, max_length) for r in rows]
    keep = [e for e in ex if any(x != -100 for x in e["labels"])]
    if not keep:
        raise DataError(f"every instruction example is longer than --max-seq-length {max_length} tokens before its "
                        "response starts; raise --max-seq-length")
    if len(keep) < len(ex):
        print(f"bitfit: {len(ex) - len(keep)} instruction examples dropped: their prompt fills --max-seq-length",
              file=sys.stderr)
    ex = keep
    return EncodedDataset({"input_ids": [e["input_ids"] for e in ex],
                           "attention_mask": [e["attention_mask"] for e in ex]},
                          [e["labels"] for e in ex])


def subset(data, n: Optional[int], seed: int):
    """A fixed random subset of ``n`` rows (the same for the same seed), in the original order."""
    if n is None or n >= len(data):
        return data
    if n <= 0:
        raise DataError(f"--train-size must be positive, got {n}")
    rows = sorted(random.Random(seed).sample(range(len(data)), n))
    return data.select(rows) if hasattr(data, "select") else [data[i] for i in rows]


def load_splits(data_args: DataArguments, splits=("train", "dev"), seed: int = 42, info: Optional[TaskInfo] = None):
    """(TaskInfo, {split: [parts]}) with raw data (TextData, or instruction rows)."""
    from ..data import files
    from ..data import glue
    from ..data.instruct import load_instructions

    for flag, value in (("--train-size", data_args.train_size), ("--eval-size", data_args.eval_size),
                        ("--max-rows", data_args.max_rows)):
        if value is not None and value <= 0:
            raise DataError(f"{flag} must be a positive number of rows, got {value}")
    if data_args.max_seq_length is not None and data_args.max_seq_length <= 0:
        raise DataError(f"--max-seq-length must be a positive number of tokens, got {data_args.max_seq_length}")
    out: dict = {}
    if data_args.is_instruct:
        for split in splits:
            path = {"train": data_args.train_file, "dev": data_args.validation_file, "test": data_args.test_file}[split]
            if path is None:
                if split == "train":
                    raise DataError("--task instruct needs --train-file (JSONL with instruction, input, output)")
                continue
            out[split] = [load_instructions(path)]
        info = info or task_info(data_args)
    elif data_args.task and not data_args.train_file and (info is None or info.kind == "glue"):
        info = info or task_info(data_args)
        for split in splits:
            out[split] = glue.load_glue(info.task, split, data_args.data_dir)
    else:
        files_by_split = {"train": data_args.train_file, "dev": data_args.validation_file, "test": data_args.test_file}
        if info is None:
            if not data_args.train_file:
                raise DataError("no data: give --task (a GLUE task or 'instruct') or --train-file (your own data)")
            sample = (data_args.train_size, seed) if data_args.train_size and "train" in splits else None
            train, names, regression = files.load_train_file(data_args.train_file, data_args.text_column,
                                                             data_args.text_pair_column, data_args.label_column,
                                                             max_rows=data_args.max_rows, sample=sample)
            info = task_info(data_args, (names, regression))
            info.text_column = info.text_column or files.guess_text_column(files.columns(data_args.train_file),
                                                                           data_args.train_file)
            if "train" in splits:
                out["train"] = [train]
        for split in splits:
            if split in out:
                continue
            path = files_by_split[split]
            if path is None:
                if split == "train":
                    raise DataError("--train-file is required for your own data")
                continue
            out[split] = [files.load_file(path, info.text_column, info.text_pair_column, info.label_column,
                                          info.label_names or None, info.regression, labeled=split != "test",
                                          max_rows=data_args.max_rows)]
    if "train" in out:
        out["train"] = [subset(out["train"][0], data_args.train_size, seed)]
    if data_args.eval_size is not None and "dev" in out:
        out["dev"] = [d.select(range(min(len(d), data_args.eval_size))) if hasattr(d, "select")
                      else d[: data_args.eval_size] for d in out["dev"]]
    return info, out


def positive_label(info: TaskInfo) -> Optional[str]:
    """The label binary F1 is computed for on the user's own two-class data: label id 1 (the second of the
    sorted label names)."""
    if info.regression or len(info.label_names) != 2:
        return None
    return info.positive_label if info.positive_label in info.label_names else info.label_names[1]


def make_compute_metrics(info: TaskInfo):
    from ..data import metrics as M

    def compute(eval_pred):
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        labels = eval_pred.label_ids
        preds = np.squeeze(logits, -1) if info.regression else np.argmax(logits, axis=-1)
        if info.kind == "glue":
            return M.compute(info.metrics, preds, labels)
        if info.regression:
            return M.regression_metrics(preds, labels)
        pos = positive_label(info)
        return M.classification_metrics(preds, labels, len(info.label_names),
                                        pos_label=info.label_names.index(pos) if pos is not None else 1)

    return compute
