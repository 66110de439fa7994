"""Training, evaluation and prediction with transformers.Trainer: GLUE, the user's own files, and
causal-LM instruction tuning.

Programmatic entry points (also used by ``bitfit compare``)::

    from bitfit.training.train import ModelArguments, DataArguments, run_train, build_training_arguments
    m = ModelArguments(model="minilm")
    d = DataArguments(task="rte", data_dir="../shared/data/glue")
    metrics = run_train(m, d, {"output_dir": "runs/rte"})   # dict = overrides on BitFit defaults

``run_train(model_args, data_args, training_args, prepare=None)`` takes either a full
``TrainingArguments`` or a dict of overrides over :func:`build_training_arguments` (whose defaults
depend on the method, the task and the training-set size).
"""

import dataclasses
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import BitFitConfigError, BitFitError, DataError
from ..core.io import atomic_write_json as _atomic_write_json

# Defaults of each method (issue 5's `compare` uses them). BitFit: 2e-3 for the biases (the paper's 1e-3
# until the eighth session: 2e-3 was ahead on the 1,000-row grid, 3 seeds x 5 tasks, and level on the full
# training sets; docs/RESULTS.md); the randomly initialised head gets its own (higher) learning
# rate, see HEAD_LR_FACTOR: 5e-3 either way. Instruction tuning (a causal LM, no new head) keeps 1e-3.
BITFIT_LR = 2e-3
INSTRUCT_LR = 1e-3
METHOD_LR = {"bitfit": BITFIT_LR, "full": 2e-5, "lora": 5e-4, "rand": BITFIT_LR, "frozen": BITFIT_LR, "head": BITFIT_LR}
HEAD_LR_FACTOR = 2.5  # head lr = factor x bias lr for BitFit (not for full fine-tuning)
TARGET_UPDATES = 1500  # auto epochs: enough epochs for about this many optimizer steps ...
MIN_EPOCHS, MAX_EPOCHS = 3, 10  # ... within these bounds
BITFIT_METHODS = ("bitfit", "rand", "frozen", "head")  # run_train methods that train a BitFit model
BITFIT_DROPOUT = 0.0  # default dropout of BitFit runs: bias-only training underfits, dropout only slows it
INSTRUCT_TASKS = ("instruct", "causal-lm", "alpaca")


# ----------------------------------------------------------------------------- arguments
@dataclass
class ModelArguments:
    """Which model, and which of its biases train."""

    model: Optional[str] = field(
        default=None,
        metadata={"help": "Base model: a local folder, a Hub name, 'minilm' (the packaged MiniLM-L6), or a .gguf "
                  "file. Optional for eval/predict/generate when the adapter folder records it."},
    )
    adapter: Optional[str] = field(
        default=None, metadata={"help": "(eval/predict/generate) the folder a `bitfit train` run wrote."}
    )
    preset: str = field(default="all", metadata={"help": "Bias preset: all, paper-subset, attention, ffn, "
                                                 "layernorm, none (head only)."})
    roles: Optional[str] = field(default=None, metadata={"help": "Comma list of roles replacing the preset's."})
    include: Optional[str] = field(default=None, metadata={"help": "Comma list of roles/regexes to add."})
    exclude: Optional[str] = field(default=None, metadata={"help": "Comma list of roles/regexes to remove."})
    layers: Optional[str] = field(default=None, metadata={"help": "Restrict to layers, e.g. '-2:' or '0,5'."})
    add_missing: bool = field(
        default=False,
        metadata={"help": "Add zero biases where the model has none (LLaMA-style). Enabled automatically when "
                  "the selection finds no existing bias at all."},
    )
    added_bias_init: str = field(
        default="zero",
        metadata={"help": "Initial value of added biases: 'zero' (default: outputs unchanged before training), "
                  "'normal' or 'uniform' (std --added_bias_init_std, default 1e-3; drawn from --seed). Implies "
                  "--add-missing."},
    )
    added_bias_init_std: Optional[float] = field(
        default=None, metadata={"help": "Standard deviation of a 'normal' / 'uniform' --added_bias_init."}
    )
    train_head: bool = field(default=True, metadata={"help": "Train the task head (--no-train-head to freeze it)."})
    skip_zero_grad: bool = field(default=False, metadata={"help": "Leave out b_k (no gradient by construction)."})
    pooler_head: bool = field(
        default=True,
        metadata={"help": "Train a pooler the checkpoint never trained (all-zero bias, as sentence-transformers "
                  "models ship BERT's) with the head; --pooler_head false keeps it frozen (the paper's set)."},
    )
    frozen_dtype: Optional[str] = field(
        default="auto",
        metadata={"help": "Precision of the frozen weights: 'auto' (default: the fastest of float32 / bfloat16 / "
                  "int8 on this hardware, from a short probe cached per machine; the choice is printed and kept in "
                  "command.json), 'float32' (the exact stock path), 'bfloat16', 'float16', or 'int8' (bf16 plus "
                  "int8 training matmuls in the frozen Linear layers; evaluation runs bf16)."},
    )
    lean: bool = field(
        default=True,
        metadata={"help": "Memory-lean training (bool dropout masks, fused attention, padding-free encoder layers on a "
                  "CPU); --no_lean for the stock modules."},
    )
    length_sub_batches: bool = field(
        default=True,
        metadata={"help": "On a CPU, run each training batch as a few sub-batches of similar length with its padding "
                  "trimmed: the same gradient as the random batch, without paying for its padding "
                  "(classification and regression with models whose layers do not skip padding themselves; "
                  "BERT-like encoders run padding-free layers instead; docs/TRAINING.md). "
                  "--length_sub_batches false runs such batches whole."},
    )
    head_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": f"Learning rate of the task head (default: {HEAD_LR_FACTOR:g} x --learning_rate for "
                  "BitFit, since the head starts from random values)."},
    )
    pooler_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Learning rate of an untrained pooler that trains with the head (--pooler_head; default: "
                  "the head's). BitFit runs only."},
    )
    dropout: Optional[float] = field(
        default=None,
        metadata={"help": "Set every dropout probability of the model (hidden, attention, ...) to this value for "
                  "training. Default: 0 for BitFit (bias-only training underfits rather than overfits; "
                  "docs/RESULTS.md), the model's own for full fine-tuning and LoRA in `bitfit compare`."},
    )
    role_lr_multipliers: Optional[str] = field(
        default=None,
        metadata={"help": "Learning-rate multipliers per bias role, e.g. 'query=2,ffn_out=0.5' (roles as in "
                  "`bitfit info`; '+' also separates): those tensors train at --learning_rate x factor. BitFit "
                  "runs only; the head keeps --head_learning_rate (docs/TRAINING.md)."},
    )
    layer_lr_decay: Optional[float] = field(
        default=None,
        metadata={"help": "Layer-wise learning-rate decay, e.g. 0.9: the top layer trains at --learning_rate, each "
                  "layer below at 0.9 x the one above; embedding biases get the lowest rate, pooler/final norm the "
                  "top one. BitFit runs only."},
    )
    halve_every_epochs: Optional[float] = field(
        default=None,
        metadata={"help": "The 'halving' schedule (replaces --lr_scheduler_type): after the linear warm-up the "
                  "learning rate is halved at the end of every N epochs (optimizer steps per epoch counted with "
                  "--gradient_accumulation_steps)."},
    )
    train_norm_weights: bool = field(
        default=False,
        metadata={"help": "Also train the LayerNorm/RMSNorm gains (every 1-D vector of the stack, not only the "
                  "biases); saved in the artifact with the biases."},
    )
    norm_weight_l2: Optional[float] = field(
        default=None,
        metadata={"help": "With --train_norm_weights: pull the gains toward their pretrained values after every "
                  "optimizer step, g -= lr x L2 x (g - g_pretrained) (decoupled, like AdamW's weight decay)."},
    )
    budget: Optional[str] = field(
        default=None,
        metadata={"help": "Sparse BitFit: train only this many of the selected bias entries, those with the highest "
                  "importance on a few training batches: a fraction of them (0.5) or a count (1000). The head is "
                  "not counted. docs/TRAINING.md, Sparse BitFit."},
    )
    importance: str = field(
        default="grad",
        metadata={"help": "With --budget: 'grad' (sum of |dL/db| over the scoring batches) or 'fisher' (of (dL/db)^2)."},
    )
    importance_unit: str = field(
        default="entry",
        metadata={"help": "With --budget: choose single bias 'entry's or whole bias 'vector's (by mean importance)."},
    )
    importance_batches: int = field(
        default=8,
        metadata={"help": "With --budget: training batches (of --per_device_train_batch_size rows, drawn with "
                  "--seed) the importance is measured on."},
    )
    warm_start_head: bool = field(
        default=False,
        metadata={"help": "Fit the task head's output layer on the frozen model's features (a linear probe over "
                  "the training rows) before bias training starts. Off by default: it ends CoLA's stall at the "
                  "majority class but the probe overfits small or hard sets (RTE, STS-B) and BitFit then does "
                  "worse (docs/RESULTS.md). BitFit runs only."},
    )
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file name inside --model's folder."})


@dataclass
class DataArguments:
    """Which data, and how it is cut and tokenized."""

    task: Optional[str] = field(
        default=None,
        metadata={"help": "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), 'instruct' for causal-LM "
                  "instruction tuning, or omit with --train-file for your own classification data."},
    )
    data_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Folder in the GLUE layout (<dir>/RTE/train.tsv ...); default $BITFIT_GLUE_DIR, "
                  "else the Hub via datasets."},
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "Own training data: .csv .tsv .jsonl .parquet"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Own validation data (same format)."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Own test data (for predict)."})
    text_column: Optional[str] = field(default=None, metadata={"help": "Text column (default: text/sentence/...)."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text column, for pairs."})
    label_column: str = field(
        default="label",
        metadata={"help": "Label column. Numbers with fractions (or written as floats, more than 2 values) mean "
                  "regression, whole numbers or text are classes; nan/inf/empty labels are refused "
                  "(docs/TRAINING.md, Data)."},
    )
    max_seq_length: Optional[int] = field(
        default=None, metadata={"help": "Truncate inputs to this many tokens (default: 128, or the model's "
                                "maximum when that is smaller; more than the maximum is an error)."}
    )
    train_size: Optional[int] = field(
        default=None, metadata={"help": "Train on a fixed random subset of N rows (chosen with --seed)."}
    )
    eval_size: Optional[int] = field(
        default=None, metadata={"help": "Evaluate on the first N dev rows only (quick checks; not official)."}
    )
    positive_label: Optional[str] = field(
        default=None, metadata={"help": "Own two-class data: the label binary F1 is computed for (default: the "
                                "second of the sorted label names; the choice is printed and kept in task.json)."}
    )

    @property
    def is_instruct(self) -> bool:
        return (self.task or "").lower() in INSTRUCT_TASKS


# ----------------------------------------------------------------------------- task info
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


# ----------------------------------------------------------------------------- data
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


def encode(tokenizer, data, max_length: int) -> EncodedDataset:
    enc = tokenizer(data.texts, data.pairs, truncation=True, max_length=max_length)
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    return EncodedDataset(enc, data.labels, data.index)


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

    for flag, value in (("--train-size", data_args.train_size), ("--eval-size", data_args.eval_size)):
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
            train, names, regression = files.load_train_file(data_args.train_file, data_args.text_column,
                                                             data_args.text_pair_column, data_args.label_column)
            info = task_info(data_args, (names, regression))
            info.text_column = info.text_column or files.guess_text_column(files.read_table(data_args.train_file),
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
                                          info.label_names or None, info.regression, labeled=split != "test")]
    if "train" in out:
        out["train"] = [subset(out["train"][0], data_args.train_size, seed)]
    if data_args.eval_size is not None and "dev" in out:
        out["dev"] = [d.select(range(min(len(d), data_args.eval_size))) if hasattr(d, "select")
                      else d[: data_args.eval_size] for d in out["dev"]]
    return info, out


# ----------------------------------------------------------------------------- model
def load_base(model_args: ModelArguments, info: Optional[TaskInfo], dropout_required: bool = True):
    """(model, tokenizer) for the task: causal LM, or sequence classification with the task's labels.
    ``dropout_required=False``: a ``model_args.dropout`` that the model's config has no setting for is
    ignored (BitFit's default dropout) instead of an error (the user's ``--dropout``)."""
    from ..core import models

    name = model_args.model
    if not name:
        raise BitFitError("--model is required (a local folder, a Hub name, or 'minilm')")
    kwargs: dict = {}
    gguf = model_args.gguf_file
    if name.endswith(".gguf") and os.path.isfile(os.path.expanduser(name)):
        p = Path(os.path.expanduser(name))
        name, gguf = str(p.parent), p.name
    if gguf:
        kwargs["gguf_file"] = gguf
    tok_kwargs = dict(kwargs)
    if model_args.dropout is not None:
        try:
            kwargs.update(models.dropout_overrides(name, model_args.dropout, **tok_kwargs))
        except BitFitConfigError:
            if dropout_required:
                raise
    if gguf:
        import transformers

        cls = transformers.AutoModelForCausalLM if info is None or info.kind == "instruct" else \
            transformers.AutoModelForSequenceClassification
        if cls is not transformers.AutoModelForCausalLM:
            if info.regression:
                kwargs.update(problem_type="regression")
            else:
                kwargs.update(id2label=dict(enumerate(info.label_names)),
                              label2id={n: i for i, n in enumerate(info.label_names)})
        try:
            model = models.load_gguf_model(name, cls, **(kwargs if cls is transformers.AutoModelForCausalLM
                                                         else dict(kwargs, num_labels=info.num_labels)))
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, **tok_kwargs)
        except (OSError, ValueError) as exc:
            raise BitFitError(f"could not load GGUF model {gguf!r} from {name!r}: {exc}") from None
    else:
        if info is not None and info.kind == "instruct":
            models.check_causal_lm(name)
        tokenizer = models.load_tokenizer(name)
        if info is None or info.kind == "instruct":
            model = models.load_model(name, task="causal-lm", **kwargs)
        else:
            if info.regression:
                kwargs.update(problem_type="regression")
            else:
                kwargs.update(id2label=dict(enumerate(info.label_names)),
                              label2id={n: i for i, n in enumerate(info.label_names)})
            model = models.load_model(name, num_labels=info.num_labels, task="classification", **kwargs)
    if info is not None:
        if info.max_seq_length is None:  # the default: 128, or the model's maximum when that is smaller
            limit = max_positions(model)
            info.max_seq_length = min(DEFAULT_MAX_SEQ_LENGTH, limit) if limit else DEFAULT_MAX_SEQ_LENGTH
            if info.max_seq_length < DEFAULT_MAX_SEQ_LENGTH:
                print(f"bitfit: --max-seq-length {info.max_seq_length}: the most {name} can take", file=sys.stderr)
        check_max_length(model, info.max_seq_length, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


DEFAULT_MAX_SEQ_LENGTH = 128


def max_positions(model) -> Optional[int]:
    """How many token positions a model with a learned absolute position table can take (BERT's
    ``position_embeddings``, GPT-2's ``wpe``, BART's ``embed_positions`` ...); None when it has none
    (rotary / relative positions: no hard limit to check)."""
    limits = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding) and ("position" in name.rsplit(".", 1)[-1] or name.endswith("wpe")):
            n = m.num_embeddings - int(getattr(m, "offset", 0) or 0)
            if m.padding_idx is not None:  # RoBERTa / MPNet: positions start after the padding index
                n -= m.padding_idx + 1
            limits.append(n)
    return min(limits) if limits else None


def check_max_length(model, max_seq_length: Optional[int], name: str = "the model") -> None:
    limit = max_positions(model)
    if max_seq_length is not None and limit is not None and max_seq_length > limit:
        raise BitFitConfigError(f"--max-seq-length {max_seq_length} is more than {name} can take: its position "
                                f"embeddings hold {limit} positions; use --max-seq-length {limit} or less")


def _split(value: Optional[str]):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def bitfit_config(model_args: ModelArguments, add_missing: Optional[bool] = None):
    from ..core.config import BitFitConfig

    layers = model_args.layers
    if isinstance(layers, str) and ":" not in layers and "," not in layers:
        try:
            layers = int(layers)
        except ValueError:
            pass
    return BitFitConfig(
        preset=model_args.preset, roles=_split(model_args.roles), include=_split(model_args.include),
        exclude=_split(model_args.exclude), layers=layers,
        add_missing=(model_args.add_missing or model_args.added_bias_init != "zero") if add_missing is None
        else add_missing,
        added_bias_init=model_args.added_bias_init, added_bias_init_std=model_args.added_bias_init_std,
        train_head=model_args.train_head, skip_zero_grad=model_args.skip_zero_grad,
        frozen_dtype=model_args.frozen_dtype, lean=model_args.lean, pooler_head=model_args.pooler_head,
        train_norm_weights=model_args.train_norm_weights, budget=model_args.budget,
        importance=model_args.importance, importance_unit=model_args.importance_unit,
        importance_batches=model_args.importance_batches,
    )


def resolve_frozen_dtype(model_args: ModelArguments, device=None):
    """``model_args`` with ``frozen_dtype="auto"`` replaced by the choice for ``device`` (the device the
    run trains on), and that choice (a bitfit.fast.hardware.DtypeChoice, printed to stderr; None when the
    user named a dtype)."""
    if model_args.frozen_dtype != "auto":
        return model_args, None
    from ..fast.hardware import choose_frozen_dtype

    choice = choose_frozen_dtype(device)
    print(f"bitfit: {choice.describe()}; --frozen-dtype float32 keeps the exact float32 path", file=sys.stderr)
    return dataclasses.replace(model_args, frozen_dtype=choice.dtype), choice


def apply_bitfit(model, model_args: ModelArguments, batches=None):
    """bitfit.apply with the model arguments; add_missing is switched on automatically (with a
    message) when the selection finds no existing bias at all, e.g. on LLaMA-style models.
    ``batches``: the scoring batches of a --budget run (sparse BitFit)."""
    import bitfit

    from ..core.select import resolve

    cfg = bitfit_config(model_args)
    if not cfg.add_missing and cfg.preset != "none":
        sel = resolve(bitfit.discover(model, pooler_head=cfg.pooler_head), cfg)
        if not sel.chosen and sel.missing:
            print("bitfit: this model has no bias in the selection; adding zero-initialised biases "
                  "(--add-missing)", file=sys.stderr)
            cfg = bitfit_config(model_args, add_missing=True)
    return bitfit.apply(model, config=cfg, batches=batches if cfg.budget is not None else None)


def scoring_batches(model, train_ds, collator, batch_size: int, seed: int, device):
    """The batches a sparse BitFit run (--budget) scores bias entries on: training rows drawn with ``seed``,
    as many batches as the consumer takes (``importance_batches``). On the first, the model goes to
    ``device`` (where the Trainer puts it)."""
    from ..methods.sparse import sample_batches

    if getattr(model, "hf_device_map", None) is None:
        model.to(device)
    yield from sample_batches(train_ds, collator, -(-len(train_ds) // batch_size), batch_size, seed)


def _takes_batches(prepare: Callable) -> bool:
    import inspect

    try:
        return "batches" in inspect.signature(prepare).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- training arguments
def auto_epochs(n_train: int, batch_size: int) -> int:
    """Epochs for about TARGET_UPDATES optimizer steps, within [MIN_EPOCHS, MAX_EPOCHS]: small tasks get
    more epochs (BitFit with a fresh head converges slowly; the paper trains 16+ epochs)."""
    steps = max(1, math.ceil(n_train / max(1, batch_size)))
    return int(min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_UPDATES / steps))))


def training_defaults(method: str = "bitfit", primary: Optional[str] = None, n_train: Optional[int] = None,
                      batch_size: int = 32, instruct: bool = False) -> dict:
    """The TrainingArguments defaults of a method (what `bitfit train` sets unless given explicitly);
    ``instruct``: instruction tuning of a causal LM (BitFit's learning rate there: INSTRUCT_LR)."""
    if method not in METHOD_LR:
        raise BitFitConfigError(f"unknown method {method!r}; choose one of {', '.join(METHOD_LR)}")
    greater = primary is None or not primary.endswith("loss")
    d = dict(
        learning_rate=INSTRUCT_LR if instruct and method in BITFIT_METHODS else METHOD_LR[method],
        weight_decay=0.0 if method != "full" else 0.01,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=64,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="steps",
        logging_steps=10,
        load_best_model_at_end=True,
        metric_for_best_model=primary or "loss",
        greater_is_better=greater,
        save_total_limit=1,
        report_to="none",
        seed=42,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    if n_train is not None:
        d["num_train_epochs"] = auto_epochs(n_train, batch_size) if method != "full" else 3
    return d


def build_training_arguments(output_dir: str, method: str = "bitfit", task: Optional[str] = None,
                             n_train: Optional[int] = None, **overrides):
    """TrainingArguments with ``method``'s defaults (bitfit: lr 2e-3, 1e-3 for instruction tuning, no weight
    decay, linear schedule with 10% warm-up, eval and save every epoch, best checkpoint by the task's metric, auto epochs from
    ``n_train``; full: lr 2e-5, 3 epochs; lora: lr 5e-4), overridden by ``overrides``."""
    from transformers import TrainingArguments

    primary = None
    if task:
        primary = "loss" if task.lower() in INSTRUCT_TASKS else _glue_primary(task)
    bs = overrides.get("per_device_train_batch_size", 32)
    kwargs = training_defaults(method, primary, n_train, bs, instruct=bool(task) and task.lower() in INSTRUCT_TASKS)
    kwargs.update(overrides)
    kwargs["output_dir"] = output_dir
    if (kwargs.get("bf16") or kwargs.get("fp16")) and "use_cpu" not in overrides and not _has_accelerator():
        kwargs["use_cpu"] = True  # transformers refuses --bf16 without a GPU unless told to use the CPU (autocast)
    return TrainingArguments(**kwargs)


def length_grouping() -> dict:
    """The TrainingArguments setting that batches examples of similar length together (instruction tuning's
    default: short instructions then do not pay for a long one's padding)."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "train_sampling_strategy" in names:  # transformers >= 5
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True} if "group_by_length" in names else {}


CHECKPOINTING_FLAGS = ("activation_checkpointing", "gradient_checkpointing")


def instruct_checkpointing(given=()) -> dict:
    """The TrainingArguments setting that turns gradient (activation) checkpointing on: BitFit's default for
    causal-LM instruction tuning, unless one of ``CHECKPOINTING_FLAGS`` is in ``given`` (the flags the user set).

    A bias-only step's memory is the frozen weights plus the saved activations (nothing else: no weight
    gradients, no optimizer state of size); checkpointing keeps only each decoder layer's input, which on
    Qwen2.5-0.5B (batch 2 x 256 tokens) takes the step from 0.38x to 0.28x of the naive float32 step's peak,
    for one more forward per step (docs/PERFORMANCE.md). ``--gradient_checkpointing false`` turns it off."""
    from transformers import TrainingArguments

    if any(g in CHECKPOINTING_FLAGS for g in given):
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    for name in CHECKPOINTING_FLAGS:  # transformers >= 5 calls it activation_checkpointing
        if name in names:
            return {name: True}
    return {}


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _glue_primary(task: str) -> Optional[str]:
    from ..data import glue
    from ..data import metrics

    try:
        t = glue.get_task(task)
    except DataError:
        return None
    return "matched_accuracy" if t.name == "mnli" else metrics.primary_metric(t.name)


# ----------------------------------------------------------------------------- metrics
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


# ----------------------------------------------------------------------------- trainer
def _trainer_class():
    from transformers import Trainer

    class BitFitTrainer(Trainer):
        """Trainer that (for BitFit models) gives the head its own learning rate, writes only the
        trained tensors to checkpoints, and loads them back without warning about frozen keys."""

        head_learning_rate: Optional[float] = None
        pooler_learning_rate: Optional[float] = None  # an untrained pooler in the head (pooler_head): its own rate
        role_lr_multipliers: Optional[dict] = None  # role -> factor on the learning rate (bitfit.methods.lrgroups)
        layer_lr_decay: Optional[float] = None
        halve_every_epochs: Optional[float] = None
        norm_weight_l2: Optional[float] = None
        _bitfit_steps_per_epoch: Optional[int] = None
        length_sub_batches: bool = False  # run_train: --length_sub_batches (bitfit.fast.subbatch)
        _sub_batch_share: Optional[float] = None

        def __init__(self, *args, **kwargs):
            from .guard import NonFiniteGuard

            super().__init__(*args, **kwargs)
            # every step's real loss and the trained tensors: a NaN/inf stops the run before it is saved
            self.guard = NonFiniteGuard(self.model)
            self.add_callback(self.guard)

        def training_step(self, model, inputs, num_items_in_batch=None):
            parts = self._length_sub_batches(inputs)
            if parts is None:
                loss = super().training_step(model, inputs, num_items_in_batch)
            else:  # the random batch as sub-batches of similar length: its gradient, less padding (bitfit.fast.subbatch)
                loss = 0
                try:
                    for sub, share in parts:
                        self._sub_batch_share = share
                        # no item count: each sub-batch's loss is its rows' mean, weighted by its share below
                        loss = loss + super().training_step(model, sub, None)
                finally:
                    self._sub_batch_share = None
            self.guard.observe_loss(loss)
            return loss

        def floating_point_ops(self, inputs):
            # Trainer's FLOP estimate walks every module each step (model.num_parameters): count the parameters once
            model = self.model
            main = getattr(model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(model, "num_parameters"):
                return super().floating_point_ops(inputs)
            cached = getattr(self, "_bitfit_flop_params", None)
            if cached is None or cached[0] is not model:
                cached = self._bitfit_flop_params = (model, model.num_parameters(exclude_embeddings=True))
            return 6 * inputs[main].numel() * cached[1]

        def _length_sub_batches(self, inputs):
            """The batch's sub-batches and their shares of its rows, or None to run it whole: a model whose layers
            skip the padding themselves (bitfit.fast.packing: one call is cheaper), off, not on a CPU (an accelerator's
            step is bound by calls, not padding), gradient accumulation (whose loss scaling transformers decides
            per model), several processes (each backward would all-reduce), or a loss that is not a plain mean
            over the batch's rows (a custom loss, label smoothing)."""
            from ..fast import subbatch
            from ..fast.lean import packs

            if packs(self.model):
                return None
            if not self.length_sub_batches or self.args.device.type != "cpu" or self.label_smoother is not None \
                    or self.compute_loss_func is not None or not isinstance(inputs, Mapping) \
                    or self.args.gradient_accumulation_steps != 1 or self.args.world_size > 1:
                return None
            return subbatch.split(inputs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = self._loss(model, inputs, return_outputs, num_items_in_batch)
            share = self._sub_batch_share if model.training else None
            if share is None:
                return out
            return (out[0] * share, out[1]) if return_outputs else out * share  # a sub-batch's mean, weighted

        def _loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # causal-LM BitFit: LM head + cross-entropy in chunks over the labelled tokens, never the full
            # [batch, seq, vocab] logits (bitfit.fast.lmloss); in evaluation only where the logits are not wanted
            from ..fast import lmloss

            if not (self._bitfit_target() is not None and "labels" in inputs and self.label_smoother is None
                    and self.compute_loss_func is None and lmloss.enabled() and lmloss.applies(model)
                    and (model.training or (self.compute_metrics is None and self.preprocess_logits_for_metrics is None))):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            n_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss, outputs = lmloss.model_loss(model, inputs, n_items)
            if self.args.average_tokens_across_devices and n_items is not None:  # as Trainer.compute_loss
                loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                               else self.args.n_gpu)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            # non-finite values (a constant-prediction Pearson, ...) become None: trainer_state.json and
            # log_history.json stay strict JSON
            return super().log(json_safe(logs), *args, **kwargs)

        def _bitfit(self):
            from ..core.prepare import get_state

            return get_state(self.model)

        def _bitfit_target(self):
            """The model holding the BitFit state, a peft model of the BitFit method included (its optimizer
            is then built as the native one's: head learning rate, role / layer groups)."""
            from ..core.prepare import bitfit_model

            return bitfit_model(self.model)

        def _custom_lrs(self) -> bool:
            return bool(self.role_lr_multipliers) or self.layer_lr_decay not in (None, 1.0)

        def create_optimizer(self, model=None):
            if self.optimizer is not None:
                return self.optimizer
            from ..core.prepare import get_state

            target = self._bitfit_target()
            state = get_state(target) if target is not None else None
            if state is None and (self._custom_lrs() or self.norm_weight_l2):
                raise BitFitConfigError("--role_lr_multipliers, --layer_lr_decay and --norm_weight_l2 apply to BitFit "
                                        "runs (biases grouped by role and layer); this model has no BitFit state "
                                        "(full fine-tuning or another method)")
            if state is None or (self.head_learning_rate is None and self.pooler_learning_rate is None
                                 and not self._custom_lrs() and not self.norm_weight_l2):
                return super().create_optimizer(model)
            from ..methods.lrgroups import add_norm_pull, lr_factors, trained_roles

            opt_model = self.model if model is None else model
            factors = lr_factors(target, self.role_lr_multipliers, self.layer_lr_decay) if self._custom_lrs() else {}
            unused = sorted(set(self.role_lr_multipliers or ()) - trained_roles(target))
            if unused:
                import warnings

                warnings.warn(f"--role_lr_multipliers: role(s) {', '.join(unused)} train no tensor in this run; "
                              "their multipliers have no effect", stacklevel=2)
            # by identity: inside a peft model the names carry peft's prefix (base_model.model.)
            target_params = dict(target.named_parameters())
            head = {id(target_params[n]) for n in state.selection.head_params}
            pooler_path = state.model_map.pooler_head if self.pooler_learning_rate is not None else None
            pooler = {id(target_params[n]) for n in state.selection.head_params
                      if pooler_path and n.startswith(f"{pooler_path}.")}
            if self.pooler_learning_rate is not None and not pooler:
                import warnings

                warnings.warn("--pooler_learning_rate: this model has no untrained pooler in its head (a pretrained "
                              "pooler trains only its bias, with the body); the option has no effect", stacklevel=2)
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict = {}
            for n, p in opt_model.named_parameters():
                if not p.requires_grad:
                    continue
                is_head = "pooler" if id(p) in pooler else id(p) in head
                key = (is_head, n in decay, None if is_head else factors.get(id(p), 1.0))
                groups.setdefault(key, []).append(p)
            param_groups = []
            base_lr = self.args.learning_rate
            for (is_head, is_decay, factor), params in groups.items():
                g = {"params": params, "weight_decay": self.args.weight_decay if is_decay else 0.0}
                if is_head == "pooler":
                    g["lr"] = self.pooler_learning_rate
                elif is_head:
                    if self.head_learning_rate is not None:
                        g["lr"] = self.head_learning_rate
                elif factor != 1.0:
                    g["lr"] = base_lr * factor
                param_groups.append(g)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = cls(param_groups, **kwargs)
            if self.norm_weight_l2:
                self._norm_pull = add_norm_pull(self.optimizer, target, self.norm_weight_l2)
            return self.optimizer

        def set_initial_training_values(self, *args, **kwargs):
            values = super().set_initial_training_values(*args, **kwargs)
            self._bitfit_steps_per_epoch = values[1]  # num_update_steps_per_epoch, the Trainer's own count
            return values

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.halve_every_epochs is None or self.lr_scheduler is not None:
                return super().create_scheduler(num_training_steps, optimizer)
            from ..methods.lrgroups import halving_period, halving_scheduler, steps_per_epoch

            spe = self._bitfit_steps_per_epoch or steps_per_epoch(len(self.get_train_dataloader()),
                                                                  self.args.gradient_accumulation_steps)
            self.lr_scheduler = halving_scheduler(optimizer if optimizer is not None else self.optimizer,
                                                  self.args.get_warmup_steps(num_training_steps),
                                                  halving_period(self.halve_every_epochs, spe))
            self._created_lr_scheduler = True
            return self.lr_scheduler

        def _save(self, output_dir=None, state_dict=None):
            if self._bitfit() is None:
                return super()._save(output_dir, state_dict)
            import safetensors.torch

            output_dir = output_dir or self.args.output_dir
            if not self.args.should_save:
                return
            os.makedirs(output_dir, exist_ok=True)
            trained = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
            tmp = os.path.join(output_dir, "model.safetensors.tmp")
            safetensors.torch.save_file(trained, tmp, metadata={"format": "pt", "bitfit": "trained-only"})
            os.replace(tmp, os.path.join(output_dir, "model.safetensors"))
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

        def _issue_warnings_after_load(self, load_result):
            if self._bitfit() is None:
                return super()._issue_warnings_after_load(load_result)
            trained = {n for n, p in self.model.named_parameters() if p.requires_grad}
            missing = [k for k in load_result.missing_keys if k in trained]
            if missing or load_result.unexpected_keys:
                raise BitFitError(f"checkpoint does not fit this model: missing trained tensors {missing[:5]}, "
                                  f"unexpected {list(load_result.unexpected_keys)[:5]}")

    return BitFitTrainer


# ----------------------------------------------------------------------------- run
def json_safe(obj):
    """``obj`` with every non-finite float (NaN, inf; Python, numpy or 0-d tensor) replaced by None, so
    that ``json.dumps`` writes strict JSON (no bare NaN/Infinity). Dicts, lists and tuples are copied."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1 and obj.is_floating_point():
        obj = obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def atomic_write_json(path, obj):
    """bitfit.core.io.atomic_write_json, strict: non-finite floats are written as null (see json_safe)."""
    return _atomic_write_json(path, json_safe(obj))


def library_versions() -> dict:
    import transformers

    import bitfit

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "bitfit": bitfit.__version__, "platform": platform.platform()}
    for mod in ("datasets", "accelerate", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def eval_history(log_history: list) -> list:
    """Per-epoch evaluation entries of a Trainer log (for learning curves)."""
    return [dict(e) for e in log_history if any(k.startswith("eval_") and not k.endswith(("runtime", "per_second"))
                                                  for k in e)]


def _best_entry(trainer, history: list) -> Optional[dict]:
    st, args = trainer.state, trainer.args
    if not (args.load_best_model_at_end and st.best_model_checkpoint and st.best_global_step):
        return None
    for e in history:
        if e.get("step") == st.best_global_step:
            return {k: v for k, v in e.items() if k not in ("step",)}
    return None


def save_trained(model, output_dir: str, info: Optional[TaskInfo] = None, base_name: Optional[str] = None) -> str:
    """Write the trained model to ``output_dir``: bitfit.save for BitFit models, else save_pretrained."""
    from ..core.prepare import get_state, unwrap

    model = unwrap(model)
    from ..methods import dynamic

    if dynamic.has_dynamic(model):  # input-dependent shifts: no BitFit artifact (bitfit.methods.dynamic)
        dynamic.save(model, output_dir)
        return "dynamic"
    if get_state(model) is not None:
        import bitfit

        bitfit.save(model, output_dir, label_names=(info.label_names or None) if info else None,
                    base_name=base_name)
        return "bitfit"
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(output_dir)
        return "save_pretrained"
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                os.path.join(output_dir, "model.safetensors"))
    return "state_dict"


# ----------------------------------------------------------------------------- checks before a run
FINISHED_RUN_FILES = ("metrics.json", "bitfit_config.json")  # present = the folder holds a finished run
RUN_FILES = ("metrics.json", "log_history.json", "task.json", "command.json", "bitfit_config.json",
             "bitfit_model.safetensors")


def check_training_args(training_args) -> None:
    """Refuse TrainingArguments that would crash deep inside the Trainer or 'succeed' without training."""
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(training_args, name, 1)
        if value is not None and value <= 0:
            raise BitFitConfigError(f"--{name} must be a positive integer, got {value}")
    max_steps = training_args.max_steps
    if max_steps == 0 or max_steps < -1:
        raise BitFitConfigError(f"--max_steps must be positive (or -1, the default, to train --num_train_epochs "
                                f"epochs), got {max_steps}: a run without a training step would save the "
                                "untrained model as if it had trained")
    if max_steps < 0 and not training_args.num_train_epochs > 0:
        raise BitFitConfigError(f"--num_train_epochs must be positive, got {training_args.num_train_epochs:g}: "
                                "a run without a training step would save the untrained model as if it had trained")
    lr = training_args.learning_rate
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise BitFitConfigError(f"--learning_rate must be a finite number >= 0, got {lr}")


def check_lr_options(model_args: ModelArguments, method: str = "bitfit", prepare=None) -> dict:
    """Check the learning-rate and norm-gain options of ``model_args`` before anything loads; returns the
    parsed role multipliers (bitfit.methods.lrgroups)."""
    from ..methods.lrgroups import check_factor, parse_role_multipliers

    role_mult = parse_role_multipliers(model_args.role_lr_multipliers.replace("+", ",")
                                       if isinstance(model_args.role_lr_multipliers, str)
                                       else model_args.role_lr_multipliers)
    for flag, value in (("--head_learning_rate", model_args.head_learning_rate),
                        ("--pooler_learning_rate", model_args.pooler_learning_rate)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise BitFitConfigError(f"{flag} must be a finite number >= 0, got {value}")
    for flag, value in (("--layer_lr_decay", model_args.layer_lr_decay),
                        ("--halve_every_epochs", model_args.halve_every_epochs),
                        ("--norm_weight_l2", model_args.norm_weight_l2)):
        if value is not None:
            check_factor(flag, value)
    bitfit_only = [f for f, v in (("--role_lr_multipliers", role_mult), ("--layer_lr_decay", model_args.layer_lr_decay),
                                  ("--norm_weight_l2", model_args.norm_weight_l2),
                                  ("--pooler_learning_rate", model_args.pooler_learning_rate is not None)) if v]
    if bitfit_only and method not in BITFIT_METHODS:
        raise BitFitConfigError(f"{', '.join(bitfit_only)}: only for BitFit runs (biases grouped by role and layer); "
                                f"not for {method} (full fine-tuning trains every weight)")
    if model_args.norm_weight_l2 and not model_args.train_norm_weights and prepare is None:
        raise BitFitConfigError("--norm_weight_l2 pulls the trained norm gains toward their pretrained values: it "
                                "needs --train_norm_weights")
    return role_mult


def check_output_dir(output_dir: str, overwrite: bool = False, resume=None) -> None:
    """Refuse an --output-dir that holds a finished run (unless ``overwrite`` or ``resume``), that is a file,
    or that cannot be written; nothing is left behind by the check. In a multi-process run only the main
    process (RANK 0, which alone writes there) checks: the ranks would race to create the folder."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    p = Path(os.path.expanduser(str(output_dir)))
    if p.exists() and not p.is_dir():
        raise BitFitError(f"--output-dir {output_dir} is a file, not a folder; choose another --output-dir")
    finished = [f for f in FINISHED_RUN_FILES if (p / f).exists()]
    if finished and not overwrite and not resume:
        raise BitFitError(f"--output-dir {output_dir} holds a finished run ({', '.join(finished)}); pass "
                          "--overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, or choose "
                          "another --output-dir")
    ckpts = _checkpoint_dirs(p)
    if ckpts and not overwrite and not resume:
        raise BitFitError(f"--output-dir {output_dir} holds the checkpoints of an unfinished run "
                          f"({', '.join(c.name for c in ckpts[:3])}{' ...' if len(ckpts) > 3 else ''}); pass "
                          "--resume_from_checkpoint last to continue it, --overwrite_output_dir to start over (they "
                          "are removed), or choose another --output-dir")
    missing, q = [], p
    while not q.exists() and q != q.parent:
        missing.append(q)
        q = q.parent
    created = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # another process made it meanwhile: not ours to remove
                if not d.is_dir():
                    raise
                continue
            created.append(d)
        fd, tmp = tempfile.mkstemp(dir=p, prefix=".bitfit-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise BitFitError(f"--output-dir {output_dir} cannot be written ({exc.strerror or exc}); choose a folder "
                          "you can write to") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def _checkpoint_dirs(p: Path) -> list:
    import re

    if not p.is_dir():
        return []
    found = [c for c in p.iterdir() if c.is_dir() and re.fullmatch(r"checkpoint-\d+", c.name)]
    return sorted(found, key=lambda c: int(c.name.split("-")[1]))


def clear_finished_run(output_dir: str) -> list:
    """--overwrite_output_dir: remove the previous run's files and checkpoints from ``output_dir`` (its
    checkpoint numbers would otherwise mix with the new run's in rotation and --resume_from_checkpoint
    last). Other files are left alone. Returns the removed names."""
    import shutil

    p = Path(os.path.expanduser(str(output_dir)))
    if not any((p / f).exists() for f in FINISHED_RUN_FILES) and not _checkpoint_dirs(p):
        return []
    removed, ckpts = [], _checkpoint_dirs(p)
    for child in sorted(p.iterdir()):
        if child.name in RUN_FILES and child.is_file():
            child.unlink()
            removed.append(child.name)
        elif child in ckpts:
            shutil.rmtree(child)
            removed.append(child.name)
    return removed


def resolve_resume(resume, output_dir: str) -> Optional[str]:
    """The checkpoint folder --resume_from_checkpoint means: 'last'/'true' = the last complete checkpoint-*
    in ``output_dir`` (one cut off while being written is skipped), else the folder given, which must be a
    complete checkpoint."""
    from .guard import is_complete_checkpoint, last_complete_checkpoint

    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() in ("", "false", "none")):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last")):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise BitFitError(f"--resume_from_checkpoint {resume}: no complete checkpoint-* folder (with "
                              f"trainer_state.json and model weights) in {output_dir}")
        return found
    if not os.path.isdir(resume):
        raise BitFitError(f"--resume_from_checkpoint: {resume} is not a checkpoint folder")
    if not is_complete_checkpoint(resume):
        raise BitFitError(f"--resume_from_checkpoint: {resume} is not a complete checkpoint (it needs "
                          "trainer_state.json and model weights; it may have been cut off while being written); "
                          "use --resume_from_checkpoint last to pick the last complete one")
    return str(resume)


def run_train(model_args: ModelArguments, data_args: DataArguments, training_args=None,
              prepare: Optional[Callable] = None, *, method: str = "bitfit", argv: Optional[list] = None,
              callbacks: Optional[list] = None) -> dict:
    """Load, prepare, train, evaluate and save; return the metrics.

    training_args: a ``TrainingArguments``, or a dict of overrides on :func:`build_training_arguments`'s
    defaults for ``method`` (epochs then follow the training-set size). ``prepare(model) -> model``
    replaces ``bitfit.apply`` (e.g. full fine-tuning or a peft wrapper; it does its own freezing).
    ``callbacks``: extra ``transformers.TrainerCallback`` objects for the Trainer.
    """
    import transformers
    from transformers import DataCollatorWithPadding, TrainingArguments

    from ..data.instruct import InstructionCollator
    from ..core.prepare import bitfit_model, unwrap

    seed = training_args.seed if isinstance(training_args, TrainingArguments) else \
        (training_args or {}).get("seed", 42)
    info, splits = load_splits(data_args, ("train", "dev"), seed=seed)
    n_train = len(splits["train"][0])
    has_dev = "dev" in splits
    if not isinstance(training_args, TrainingArguments):
        over = dict(training_args or {})
        if "output_dir" not in over:
            raise BitFitError("training arguments need an output_dir (--output-dir)")
        if not has_dev:
            over.setdefault("eval_strategy", "no")
            over.setdefault("load_best_model_at_end", False)
        bs = over.get("per_device_train_batch_size", 32)
        defaults = training_defaults(method, info.primary, n_train, bs, instruct=info.kind == "instruct")
        if info.kind == "instruct":  # batches of similar length: short instructions skip a long one's padding
            defaults.update(length_grouping())
        if info.kind == "instruct" and prepare is None and method in BITFIT_METHODS:
            defaults.update(instruct_checkpointing(over))
        defaults.update(over)
        overwrite = defaults.pop("overwrite_output_dir", False) if not _has_overwrite_field() else \
            defaults.get("overwrite_output_dir", False)
        training_args = TrainingArguments(**defaults)
    else:
        overwrite = getattr(training_args, "overwrite_output_dir", False)
    check_training_args(training_args)
    role_mult = check_lr_options(model_args, method, prepare)
    if training_args.process_index == 0:
        check_output_dir(training_args.output_dir, overwrite, training_args.resume_from_checkpoint)
    transformers.set_seed(training_args.seed)

    default_dropout = model_args.dropout is None and method in BITFIT_METHODS
    if default_dropout:
        model_args = dataclasses.replace(model_args, dropout=BITFIT_DROPOUT)
    model, tokenizer = load_base(model_args, info, dropout_required=not default_dropout)
    if info.kind == "instruct":
        train_ds = encode_instructions(tokenizer, splits["train"][0], info.max_seq_length)
        dev_parts = [encode_instructions(tokenizer, d, info.max_seq_length) for d in splits.get("dev", [])]
        collator = InstructionCollator(tokenizer)
        compute_metrics = None
    else:
        train_ds = encode(tokenizer, splits["train"][0], info.max_seq_length)
        dev_parts = [encode(tokenizer, d, info.max_seq_length) for d in splits.get("dev", [])]
        collator = DataCollatorWithPadding(tokenizer)
        compute_metrics = make_compute_metrics(info)
    eval_ds = None
    if dev_parts:
        eval_ds = dev_parts[0] if len(dev_parts) == 1 else dict(zip(("matched", "mismatched"), dev_parts))
    dtype_choice = None

    def batches():  # sparse BitFit's scoring batches (--budget; compare's bitfit-sparse), drawn when asked for
        return scoring_batches(model, train_ds, collator, training_args.per_device_train_batch_size,
                               training_args.seed, training_args.device)

    if prepare is not None:
        model = prepare(model, batches=batches()) if _takes_batches(prepare) else prepare(model)
    else:
        model_args, dtype_choice = resolve_frozen_dtype(model_args, training_args.device)
        apply_bitfit(model, model_args, batches() if model_args.budget is not None else None)
    warm = None
    target = bitfit_model(model)  # the BitFit model, inside a peft wrapper too (compare's bitfit-peft)
    if target is not None and model_args.warm_start_head and info.kind != "instruct" \
            and not training_args.resume_from_checkpoint:
        from ..methods.warmstart import warm_start_head

        warm = warm_start_head(target, train_ds, collator, regression=info.regression,
                               batch_size=training_args.per_device_eval_batch_size, seed=training_args.seed,
                               progress=not training_args.disable_tqdm)
        if warm is not None:
            print(f"bitfit: head warm start: fitted {warm.layer} on {warm.rows} training rows' frozen features "
                  f"(train {'Pearson' if info.regression else 'accuracy'} {warm.train_score:.3f}, "
                  f"{warm.seconds:.1f} s)", file=sys.stderr)

    Trainer = _trainer_class()
    trainer = Trainer(model=model, args=training_args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=collator, compute_metrics=compute_metrics, callbacks=callbacks)
    is_bitfit = target is not None
    if not is_bitfit and (role_mult or model_args.layer_lr_decay is not None or model_args.norm_weight_l2):
        raise BitFitConfigError(f"--role_lr_multipliers, --layer_lr_decay and --norm_weight_l2 apply to BitFit runs; "
                                f"this {method} run trains no BitFit model")
    trainer.role_lr_multipliers = role_mult
    trainer.length_sub_batches = model_args.length_sub_batches and info.kind != "instruct"
    trainer.layer_lr_decay = model_args.layer_lr_decay
    trainer.halve_every_epochs = model_args.halve_every_epochs
    trainer.norm_weight_l2 = model_args.norm_weight_l2
    if is_bitfit and method in BITFIT_METHODS:
        trainer.head_learning_rate = model_args.head_learning_rate or training_args.learning_rate * HEAD_LR_FACTOR
        trainer.pooler_learning_rate = model_args.pooler_learning_rate
    elif model_args.head_learning_rate:
        trainer.head_learning_rate = model_args.head_learning_rate
    from .baselines import trainable_count

    trainable = trainable_count(model)  # a masked bias counts its trained entries
    total = sum(p.numel() for p in model.parameters())

    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if overwrite and not resume and trainer.is_world_process_zero():
        removed = clear_finished_run(training_args.output_dir)
        if removed:
            print(f"bitfit: --overwrite_output_dir: removed the previous run's {', '.join(removed)} from "
                  f"{training_args.output_dir}", file=sys.stderr)
    from ..fast.timing import RunClock

    clock = RunClock()  # step time / CPU time without evaluation and checkpointing (bitfit.fast.timing)
    trainer.add_callback(clock)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=resume or None)
    wall = time.time() - t0
    metrics: dict[str, Any] = dict(result.metrics)
    metrics["train_loss"] = result.training_loss
    history = eval_history(trainer.state.log_history)
    if eval_ds is not None:
        best = _best_entry(trainer, history)
        # the best checkpoint's dev scores are already logged (same weights, deterministic eval): reuse them
        metrics.update(best if best is not None else trainer.evaluate())
        if info.kind == "instruct" and "eval_loss" in metrics:
            metrics["eval_perplexity"] = float(math.exp(min(50.0, metrics["eval_loss"])))
    metrics.update(clock.figures())  # step_time_s, step_cpu_s, train/total wall and CPU time: bitfit.fast.timing
    metrics.update(
        trainable_params=trainable, total_params=total, trainable_fraction=trainable / max(1, total),
        global_steps=trainer.state.global_step,
        peak_memory_mb=peak_memory_mb(), wall_time_s=wall, n_train=n_train, task=info.task, method=method,
        best_checkpoint=trainer.state.best_model_checkpoint, best_metric=trainer.state.best_metric,
        eval_history=history, frozen_dtype=model_args.frozen_dtype if prepare is None else None,
        head_warm_start=warm.to_dict() if warm is not None else None,
        f1_positive_label=positive_label(info) if info.kind == "files" else None,
    )
    if trainer.is_world_process_zero():
        out = Path(training_args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        metrics["saved_as"] = save_trained(unwrap(trainer.model), str(out), info, _abs_local(model_args.model))
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "log_history.json", trainer.state.log_history)
        atomic_write_json(out / "task.json", {**info.to_dict(), **run_record(model_args, data_args, info)})
        try:
            tokenizer.save_pretrained(str(out))  # the run folder carries its tokenizer
        except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot be saved: the base's is used on load
            print(f"bitfit: the tokenizer was not saved with the run ({type(exc).__name__}: {exc})", file=sys.stderr)
        write_model_card(out, info, model_args, data_args, metrics, method)
        atomic_write_json(out / "command.json", {
            "argv": list(argv) if argv is not None else None,
            "command": ("bitfit train " + " ".join(_quote(a) for a in argv)) if argv is not None else None,
            "model_args": dataclasses.asdict(model_args), "data_args": dataclasses.asdict(data_args),
            "training_args": training_args.to_dict(), "method": method, "versions": library_versions(),
            "frozen_dtype_choice": dtype_choice.to_dict() if dtype_choice is not None else None,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - wall)),
        })
    return metrics


def _abs_local(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute when it names a local file or folder (aliases and Hub names stay as given)."""
    if not path:
        return path
    p = Path(os.path.expanduser(str(path)))
    return str(p.resolve()) if p.exists() else str(path)


def run_record(model_args: ModelArguments, data_args: DataArguments, info: TaskInfo) -> dict:
    """What task.json records beyond the TaskInfo so that eval/predict/generate and bitfit.load work from the
    run folder alone, in a new shell: the base model (an absolute path when local), the GGUF file, and the
    resolved absolute data location (the GLUE folder, also when it came from $BITFIT_GLUE_DIR; the user's own
    train/validation/test files)."""
    data_dir = data_args.data_dir or (os.environ.get("BITFIT_GLUE_DIR") if info.kind == "glue" else None)
    return {"base_model": _abs_local(model_args.model), "gguf_file": model_args.gguf_file,
            "data_dir": os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None,
            "train_file": _abs_local(data_args.train_file), "validation_file": _abs_local(data_args.validation_file),
            "test_file": _abs_local(data_args.test_file)}


def write_model_card(out: Path, info: TaskInfo, model_args: ModelArguments, data_args: DataArguments, metrics: dict,
                     method: str = "bitfit") -> Path:
    """A Hugging Face model card (README.md with Hub metadata in YAML front matter) with the run's scores."""
    base = model_args.model or "unknown"
    base_meta = base if not Path(os.path.expanduser(base)).exists() else Path(base).name
    if info.kind == "glue":
        dataset, name = "nyu-mll/glue", f"GLUE {info.task.upper()}"
    elif info.kind == "instruct":
        dataset, name = None, "instruction data"
    else:
        dataset, name = None, "own data"
    scores = {k[5:]: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))
              and not isinstance(v, bool) and not k.endswith(("_runtime", "_samples_per_second", "_steps_per_second"))
              and k != "eval_epoch"}
    metric_names = [m for m in (info.metrics or [info.primary]) if m != "loss"] or [info.primary]
    lines = ["---", "library_name: bitfit", f"base_model: {json.dumps(base_meta)}", "tags:", "- bitfit", "- peft"]
    if info.kind == "instruct":
        lines += ["- text-generation"]
    else:
        lines += ["- text-classification"]
    if dataset:
        lines += ["datasets:", f"- {dataset}"]
    lines += ["metrics:"] + [f"- {m}" for m in metric_names] + ["---", ""]
    lines += [f"# BitFit: {base_meta} on {name}", "",
              f"Bias-only fine-tuning (BitFit, Ben Zaken et al. 2022) of `{base_meta}` on {name}, trained with "
              f"`bitfit train` ({method}). Only the bias terms{' and the task head' if info.kind != 'instruct' else ''} "
              f"trained: {metrics.get('trainable_params', '?')} of {metrics.get('total_params', '?')} parameters.", "",
              "## Scores (dev)", ""]
    if scores:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in sorted(scores.items())]
    else:
        lines += ["No validation data was given; no scores."]
    if info.kind == "files" and not info.regression and len(info.label_names) == 2:
        lines += ["", f"Binary F1 is for the positive label `{positive_label(info)}`."]
    lines += ["", "## Use", "", "```bash", f"bitfit eval --adapter {out.name}" if info.kind != "instruct" else
              f"bitfit generate --adapter {out.name} --prompt \"...\"", f"bitfit merge {out.name} --output merged",
              "```", "", "```python", "import bitfit", f"model = bitfit.load({base!r}, {out.name!r})", "```", ""]
    path = out / "README.md"
    tmp = out / "README.md.tmp"
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(str(a))


# ----------------------------------------------------------------------------- CLI parsing
@dataclass
class RunArguments:
    """`bitfit train` flags of our own that TrainingArguments (transformers 5) no longer has."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into an --output-dir that holds a run (a finished one: metrics.json or "
                  "bitfit_config.json; or an unfinished one's checkpoint-* folders): that run's files and "
                  "checkpoints are removed when training starts. Without it such a folder is refused "
                  "(--resume_from_checkpoint into it is always allowed)."},
    )


def _has_overwrite_field() -> bool:
    from transformers import TrainingArguments

    return any(f.name == "overwrite_output_dir" for f in dataclasses.fields(TrainingArguments))


def parse_train_args(argv: list):
    """Parse `bitfit train` arguments: our dataclasses plus every TrainingArguments flag, with BitFit's
    defaults for the flags the user did not give (they depend on the task and the training-set size)."""
    from transformers import HfArgumentParser, TrainingArguments

    for i, a in enumerate(argv):  # `--lr_scheduler_type halving`: bitfit's schedule has a flag of its own
        key, _, val = a.partition("=")
        if key in ("--lr_scheduler_type", "--lr-scheduler-type") and \
                (val or (argv[i + 1] if i + 1 < len(argv) else "")).strip().lower() == "halving":
            raise BitFitConfigError("the halving schedule is --halve_every_epochs N (the learning rate halves every N "
                                    "epochs after the warm-up); drop --lr_scheduler_type")
    first = HfArgumentParser((ModelArguments, DataArguments), allow_abbrev=False, add_help=False)
    model_args, data_args, rest = first.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    own = () if _has_overwrite_field() else (RunArguments,)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments) + own, prog="bitfit train",
                              allow_abbrev=False)
    from ..cli import add_verbose

    add_verbose(parser)  # taken off by `bitfit` before parsing; listed in --help
    # task-dependent defaults need the task (and the number of training rows for the epochs)
    info, n_train = None, None
    try:
        info = task_info(data_args) if (data_args.task and not data_args.train_file) or data_args.is_instruct else None
    except DataError:
        info = None
    primary = info.primary if info else None
    if "--help" in argv or "-h" in argv:
        parser.set_defaults(**training_defaults("bitfit", primary, instruct=data_args.is_instruct))
        parser.parse_args_into_dataclasses(argv)  # prints help and exits
    bs = _peek_int(argv, "per_device_train_batch_size", 32)
    explicit_epochs = flag_given(argv, "num_train_epochs") or flag_given(argv, "max_steps")
    if not explicit_epochs:
        n_train = count_train_rows(data_args, _peek_int(argv, "seed", 42))
        if info is None:  # own files: primary metric depends on the label type
            info, _ = load_splits(data_args, ("train",), seed=_peek_int(argv, "seed", 42))
            primary = info.primary
    elif info is None and data_args.train_file:
        info, _ = load_splits(data_args, ("train",), seed=_peek_int(argv, "seed", 42))
        primary = info.primary
    defaults = training_defaults("bitfit", primary, n_train, bs, instruct=data_args.is_instruct)
    if not data_args.validation_file and data_args.train_file and not data_args.is_instruct:
        defaults.update(eval_strategy="no", load_best_model_at_end=False)
    if data_args.is_instruct and not data_args.validation_file:
        defaults.update(eval_strategy="no", load_best_model_at_end=False)
    if data_args.is_instruct:
        # batches of similar length (as run_train's dict path does): short instructions stop paying for the
        # padding of a long one. Classification and regression keep random batches and skip their padding
        # inside the model instead (padding-free encoder layers, bitfit.fast.packing; else sub-batches,
        # --length_sub_batches; length-grouped batches cost RTE 3 points)
        defaults.update(length_grouping())
        # the bias-only step's memory is mostly saved activations: checkpoint them unless told otherwise
        defaults.update(instruct_checkpointing([f for f in CHECKPOINTING_FLAGS if flag_given(argv, f)]))
    if (flag_given(argv, "bf16") or flag_given(argv, "fp16")) and not _has_accelerator():
        defaults["use_cpu"] = True  # autocast on the CPU instead of transformers' "needs a GPU" error
    parser.set_defaults(**defaults)
    if not flag_given(argv, "output_dir"):
        raise BitFitError("--output-dir is required (the folder the trained artifact and logs go to)")
    try:
        model_args, data_args, training_args, *run = parser.parse_args_into_dataclasses(argv)
    except ValueError as exc:  # TrainingArguments' own checks
        raise BitFitConfigError(f"invalid training arguments: {exc}") from None
    if model_args.halve_every_epochs is not None and flag_given(argv, "lr_scheduler_type"):
        raise BitFitConfigError("--halve_every_epochs is a learning-rate schedule of its own: drop --lr_scheduler_type "
                                "(or --halve_every_epochs)")
    if run:  # our own flag rides on the TrainingArguments object (run_train reads it with getattr)
        training_args.overwrite_output_dir = run[0].overwrite_output_dir
    check_training_args(training_args)
    return model_args, data_args, training_args


def flag_given(argv: list, name: str) -> bool:
    forms = {f"--{name}", f"--{name.replace('_', '-')}"}
    return any(a.split("=", 1)[0] in forms for a in argv)


def _peek_int(argv: list, name: str, default: int) -> int:
    forms = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, a in enumerate(argv):
        key, _, val = a.partition("=")
        if key in forms:
            try:
                return int(val if val else argv[i + 1])
            except (ValueError, IndexError):
                return default
    return default


def count_train_rows(data_args: DataArguments, seed: int = 42) -> int:
    _, splits = load_splits(data_args, ("train",), seed=seed)
    return len(splits["train"][0])


# ----------------------------------------------------------------------------- eval / predict
def load_run(adapter: str) -> tuple[dict, Optional[TaskInfo]]:
    p = Path(os.path.expanduser(adapter))
    if not p.is_dir():
        raise BitFitError(f"--adapter {adapter}: no such folder (give the output folder of `bitfit train`)")
    meta: dict = {}
    path = p / "task.json"
    if path.exists():
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"it holds a {type(meta).__name__}, not an object")
            info = TaskInfo.from_dict(meta)
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise BitFitError(f"{path} is damaged ({type(exc).__name__}: {exc}); it records the run's task: "
                              "restore it, or re-run `bitfit train`") from None
        return meta, info
    return meta, None


def load_trained(model_args: ModelArguments, data_args: Optional[DataArguments] = None):
    """(model, tokenizer, TaskInfo) of a finished run: the base model (from --model or the run's record)
    with the run's artifact loaded by bitfit.load."""
    import bitfit

    meta, info = load_run(model_args.adapter)
    if info is not None and data_args is not None:
        check_eval_args(model_args, data_args, info)
    if not model_args.model:
        model_args = dataclasses.replace(model_args, model=meta.get("base_model"), gguf_file=meta.get("gguf_file"))
        if not model_args.model:
            raise BitFitError(f"--model is required: {model_args.adapter} does not record its base model")
    elif not model_args.gguf_file and os.path.isdir(os.path.expanduser(str(model_args.model))):
        # --model names the folder that holds the run's GGUF file: load that file, as the run did
        recorded = meta.get("gguf_file") or (os.path.basename(str(meta.get("base_model") or ""))
                                             if str(meta.get("base_model") or "").endswith(".gguf") else None)
        if recorded and os.path.isfile(os.path.join(os.path.expanduser(str(model_args.model)), recorded)):
            model_args = dataclasses.replace(model_args, gguf_file=recorded)
    if info is None:
        if data_args is None or not (data_args.task or data_args.train_file):
            raise BitFitError(f"{model_args.adapter} has no task.json; pass --task")
        if data_args.task and data_args.task.lower() not in INSTRUCT_TASKS and not data_args.train_file:
            info = task_info(data_args)
        elif data_args.is_instruct:
            info = task_info(data_args)
        else:
            labels = _artifact_labels(model_args.adapter)
            names, regression = labels if labels is not None else ([], True)
            info = task_info(data_args, (names, regression))
    _check_artifact_labels(model_args.adapter, info)
    if data_args is not None:
        if not data_args.data_dir and meta.get("data_dir") and not os.environ.get("BITFIT_GLUE_DIR") \
                and info.kind == "glue":
            data_args.data_dir = meta["data_dir"]  # the GLUE folder the run was trained from
        if info.kind in ("files", "instruct"):  # the run's own files, unless the user names others
            for name in ("train_file", "validation_file", "test_file"):
                if not getattr(data_args, name) and meta.get(name) and os.path.exists(meta[name]):
                    setattr(data_args, name, meta[name])

    from ..core.models import quiet_loading

    with quiet_loading():  # the artifact restores the head: no "classifier MISSING ... newly initialized" report
        model, tokenizer = load_base(model_args, info)
    if (Path(os.path.expanduser(model_args.adapter)) / "tokenizer_config.json").exists():
        import transformers

        try:  # the tokenizer saved with the run
            own = transformers.AutoTokenizer.from_pretrained(os.path.expanduser(model_args.adapter))
            if own.pad_token is None:
                own.pad_token = tokenizer.pad_token
            tokenizer = own
        except (OSError, ValueError):
            pass
    model = bitfit.load(model, model_args.adapter)
    model.eval()
    return model, tokenizer, info


def _artifact_labels(adapter: str) -> Optional[tuple]:
    """(label_names, regression) of the head an artifact holds, from its bitfit_config.json; None when it
    has no head (or no readable config: bitfit.load then says what is wrong)."""
    cfg = Path(os.path.expanduser(adapter)) / "bitfit_config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    head = data.get("head") if isinstance(data, dict) else None
    if not isinstance(head, dict) or not head.get("params"):
        return None
    if head.get("problem_type") == "regression":
        return [], True
    id2label = head.get("id2label") or {}
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)], False
    except (TypeError, ValueError):
        return None


def _artifact_label_names(adapter: str):
    labels = _artifact_labels(adapter)
    return labels[0] if labels is not None else None


def _check_artifact_labels(adapter: str, info: TaskInfo) -> None:
    """Refuse an artifact whose head was trained for other labels than the task being scored."""
    import re

    labels = _artifact_labels(adapter)
    if labels is None or info.kind == "instruct":
        return
    names, regression = labels
    generic = not regression and all(re.fullmatch(r"LABEL_\d+", n) for n in names)  # saved without names
    task = info.task or "this data"
    if regression != info.regression:
        raise BitFitError(f"{adapter} holds a {'regression' if regression else f'{len(names)}-class'} head, but "
                          f"{task} is {'regression' if info.regression else 'classification'}: it was trained "
                          "for another task")
    if not regression and (names != list(info.label_names) and not (generic and len(names) == info.num_labels)):
        raise BitFitError(f"{adapter} was trained with labels {names}, but {task} has labels "
                          f"{list(info.label_names)}: it was trained for another task, it cannot be scored on this one")


def check_eval_args(model_args: ModelArguments, data_args: DataArguments, info: TaskInfo) -> None:
    """eval/predict/generate read the task, columns and model choices from the run folder: refuse a flag
    that would be silently ignored because it contradicts the run's record (a flag that agrees passes)."""
    from ..data import glue

    def refuse(flag: str, why: str):
        raise BitFitError(f"{flag}: {why}; the run folder records what eval/predict need, so omit {flag}")

    task = data_args.task
    if task:
        if info.kind == "glue":
            try:
                same = glue.get_task(task).name == info.task
            except DataError:
                same = False
        elif info.kind == "instruct":
            same = task.lower() in INSTRUCT_TASKS
        else:
            same = task == info.task
        if not same:
            refuse(f"--task {task}", f"this run was trained on {info.task or 'your own files'}"
                   + (" (--train-file)" if info.kind == "files" else ""))
    if info.kind == "glue":
        for flag, value in (("--train-file", data_args.train_file), ("--validation-file", data_args.validation_file),
                            ("--test-file", data_args.test_file)):
            if value:
                refuse(flag, f"this is a GLUE {info.task} run, scored on the GLUE files (--data-dir)")
    elif data_args.data_dir:
        refuse("--data-dir", f"this run was trained on {'your own files' if info.kind == 'files' else info.kind}, "
               "not GLUE; pass --validation-file / --test-file")
    defaults = DataArguments()
    for name, flag in (("text_column", "--text-column"), ("text_pair_column", "--text-pair-column"),
                       ("label_column", "--label-column"), ("max_seq_length", "--max-seq-length"),
                       ("positive_label", "--positive-label")):
        value, recorded = getattr(data_args, name), getattr(info, name)
        if value != getattr(defaults, name) and value != recorded:
            refuse(f"{flag} {value}", f"the run was trained with {recorded!r}")
    if data_args.train_size is not None:
        refuse("--train-size", "it only applies to training")
    m_defaults = ModelArguments()
    for f in dataclasses.fields(ModelArguments):
        if f.name in ("model", "adapter", "gguf_file"):
            continue
        if getattr(model_args, f.name) != getattr(m_defaults, f.name):
            flag = "--" + f.name.replace("_", "-")
            refuse(flag, "the artifact records which tensors were trained and how; eval/predict use that")


@torch.no_grad()
def predict_logits(model, tokenizer, data, info: TaskInfo, batch_size: int = 64) -> np.ndarray:
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    ds = encode(tokenizer, data, info.max_seq_length)
    ds.labels = None
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    device = next(model.parameters()).device
    out = []
    for batch in tqdm(loader, desc="predict", leave=False, disable=len(loader) < 5):
        batch = {k: v.to(device) for k, v in batch.items()}
        out.append(model(**batch).logits.float().cpu().numpy())
    logits = np.concatenate(out, axis=0)
    bad = ~np.isfinite(logits).reshape(len(logits), -1).all(axis=1)
    if bad.any():
        raise BitFitError(f"the trained model's outputs are not finite (NaN/inf) for {int(bad.sum())} of {len(bad)} "
                          "rows: its artifact holds non-finite values (e.g. saved from a diverged run); no score is "
                          "reported. Retrain with a lower --learning_rate")
    return logits


def to_predictions(logits: np.ndarray, info: TaskInfo) -> np.ndarray:
    return np.squeeze(logits, -1) if info.regression else np.argmax(logits, axis=-1)


def evaluate_run(model_args: ModelArguments, data_args: DataArguments, split: str = "dev",
                 batch_size: int = 64) -> dict:
    """The official metric(s) of a trained run on ``split`` (default: the dev split)."""
    if split == "test":
        raise DataError("--split test: test splits have no labels, so they cannot be scored; use `bitfit predict "
                        "--split test` to write the predictions (GLUE leaderboard files)")
    model, tokenizer, info = load_trained(model_args, data_args)
    if info.kind == "instruct":
        raise BitFitError("eval of instruction-tuned models: use `bitfit generate`, or train with "
                          "--validation-file to get eval_loss")
    if info.kind == "files":
        from ..data import files

        if split not in ("dev", "validation", "train"):
            raise DataError(f"unknown split {split!r}; use dev (--validation-file) or train (--train-file)")
        path = data_args.train_file if split == "train" else data_args.validation_file
        if not path:
            raise DataError(f"pass --{'train' if split == 'train' else 'validation'}-file to evaluate on your "
                            "own data")
        part = files.load_file(path, info.text_column, info.text_pair_column, info.label_column,
                               info.label_names or None, info.regression)
        if data_args.eval_size is not None:
            if data_args.eval_size <= 0:
                raise DataError(f"--eval-size must be a positive number of rows, got {data_args.eval_size}")
            part = part.select(range(min(len(part), data_args.eval_size)))
        parts = [part]
    else:
        _, splits = load_splits(data_args if data_args.task else dataclasses.replace(data_args, task=info.task),
                                (split,), info=info)
        parts = splits[split]
    names = ["matched", "mismatched"] if len(parts) == 2 else [None]
    metrics: dict = {}
    compute = make_compute_metrics(info)
    for name, part in zip(names, parts):
        logits = predict_logits(model, tokenizer, part, info, batch_size)

        class P:  # EvalPrediction-like
            predictions, label_ids = logits, np.asarray(part.labels)

        prefix = f"eval_{name}_" if name else "eval_"
        metrics.update({prefix + k: v for k, v in compute(P).items()})
        if info.kind == "files" and positive_label(info) is not None:
            metrics[prefix + "f1_positive_label"] = positive_label(info)
        metrics[prefix + "samples"] = len(part)
    return metrics


def predict_run(model_args: ModelArguments, data_args: DataArguments, split: str, output: str,
                batch_size: int = 64) -> list:
    """Predict ``split``; for a GLUE test split write the leaderboard file(s) (``RTE.tsv`` ...), else a TSV
    of index, prediction (label names for classification)."""
    from ..data import glue

    model, tokenizer, info = load_trained(model_args, data_args)
    if info.kind == "files":
        from ..data import files

        path = data_args.test_file if split == "test" else data_args.validation_file
        if not path:
            raise DataError(f"pass --{'test' if split == 'test' else 'validation'}-file with your data to predict")
        parts = [files.load_file(path, info.text_column, info.text_pair_column, info.label_column,
                                 info.label_names or None, info.regression, labeled=False)]
    else:
        _, splits = load_splits(data_args if data_args.task else dataclasses.replace(data_args, task=info.task),
                                (split,), info=info)
        parts = splits[split]
    written = []
    out = Path(output)
    for i, part in enumerate(parts):
        preds = to_predictions(predict_logits(model, tokenizer, part, info, batch_size), info)
        if info.kind == "glue":
            task = glue.get_task(info.task)
            if len(parts) > 1 or out.is_dir() or output.endswith(os.sep):
                out.mkdir(parents=True, exist_ok=True)
                path = out / task.leaderboard[i]
            else:
                path = out
            written.append(glue.write_leaderboard(info.task, list(preds), str(path), part.index))
        else:
            tmp = f"{out}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("index\tprediction\n")
                for idx, p in zip(part.index, preds):
                    fh.write(f"{idx}\t{p:.6g}\n" if info.regression else f"{idx}\t{info.label_names[int(p)]}\n")
            os.replace(tmp, out)
            written.append(str(out))
    return written


@torch.no_grad()
def predict_text(model_args: ModelArguments, text: str, text_pair: Optional[str] = None) -> tuple:
    """(label, score) of one input with a trained classification run: the label name and its softmax
    probability; for regression ("value", the prediction)."""
    model, tokenizer, info = load_trained(model_args, DataArguments())
    if info.kind == "instruct":
        raise BitFitError(f"{model_args.adapter} is an instruction-tuned run: use `bitfit generate --prompt`")
    enc = tokenizer(text, text_pair, truncation=True, max_length=info.max_seq_length or DEFAULT_MAX_SEQ_LENGTH,
                    return_tensors="pt")
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()
           if k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = model(**enc).logits.float()[0]
    if info.regression:
        return "value", float(logits.squeeze())
    probs = torch.softmax(logits, -1)
    i = int(probs.argmax())
    names = info.label_names or [f"LABEL_{j}" for j in range(len(probs))]
    return names[i], float(probs[i])


def generate(model_args: ModelArguments, prompt: str, input: Optional[str] = None, max_new_tokens: int = 128,
             raw: bool = False, do_sample: bool = False, temperature: float = 1.0) -> str:
    """The response of an instruction-tuned run to ``prompt`` (Alpaca template unless ``raw``)."""
    from ..data.instruct import format_prompt

    _, info = load_run(model_args.adapter) if model_args.adapter else ({}, None)
    if info is not None and info.kind != "instruct":
        raise BitFitError(f"generate needs an instruction-tuned run (--task instruct); {model_args.adapter} is a "
                          f"{info.task or 'own-files'} {'regression' if info.regression else 'classification'} run: "
                          "use `bitfit eval` / `bitfit predict`")
    model, tokenizer, _ = load_trained(model_args, DataArguments(task="instruct"))
    text = prompt if raw else format_prompt(prompt, input)
    enc = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kwargs["temperature"] = temperature
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
