"""BitFit's training defaults: the learning rate of each method, how many epochs a training set gets, and the
``transformers.TrainingArguments`` that `bitfit train`, :func:`bitfit.training.run.run_train` and
`bitfit compare` start from unless told otherwise (instruction tuning's length-grouped batches and
activation checkpointing included).

Nothing here loads a model or data: the numbers are shared by the argument parser (for --help and the
flags' defaults), the run and the method baselines.
"""

import dataclasses
import math
from typing import Optional

import torch

from ..errors import BitFitConfigError, DataError

# Defaults of each method (`bitfit compare` uses them too). BitFit: 2e-3 for the biases, not the paper's 1e-3:
# 2e-3 was ahead on the 1,000-row grid (3 seeds x 5 tasks) and level on the full training sets
# (docs/RESULTS.md); the randomly initialised head gets its own (higher) learning rate, see HEAD_LR_FACTOR:
# 5e-3 either way. Instruction tuning (a causal LM, no new head) keeps 1e-3.
BITFIT_LR = 2e-3
INSTRUCT_LR = 1e-3
METHOD_LR = {"bitfit": BITFIT_LR, "full": 2e-5, "lora": 5e-4, "rand": BITFIT_LR, "frozen": BITFIT_LR, "head": BITFIT_LR}
HEAD_LR_FACTOR = 2.5  # head lr = factor x bias lr for BitFit (not for full fine-tuning)
TARGET_UPDATES = 1500  # auto epochs: enough epochs for about this many optimizer steps ...
MIN_EPOCHS, MAX_EPOCHS = 3, 10  # ... within these bounds
BITFIT_METHODS = ("bitfit", "rand", "frozen", "head")  # run_train methods that train a BitFit model
BITFIT_DROPOUT = 0.0  # default dropout of BitFit runs: bias-only training underfits, dropout only slows it
INSTRUCT_TASKS = ("instruct", "causal-lm", "alpaca")
DEFAULT_MAX_SEQ_LENGTH = 128  # --max-seq-length unless the model takes fewer positions


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
    if (kwargs.get("bf16") or kwargs.get("fp16")) and "use_cpu" not in overrides and not has_accelerator():
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
    for one more forward per step (docs/PERFORMANCE.md). ``--activation_checkpointing false`` (transformers < 5:
    ``--gradient_checkpointing false``) turns it off."""
    from transformers import TrainingArguments

    if any(g in CHECKPOINTING_FLAGS for g in given):
        return {}
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    for name in CHECKPOINTING_FLAGS:  # transformers >= 5 calls it activation_checkpointing
        if name in names:
            return {name: True}
    return {}


def has_accelerator() -> bool:
    """Whether torch sees an accelerator (--bf16 / --fp16 without one run as autocast on the CPU)."""
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


def has_overwrite_field() -> bool:
    """Whether TrainingArguments still has --overwrite_output_dir (transformers < 5); else `bitfit train`
    adds the flag itself."""
    from transformers import TrainingArguments

    return any(f.name == "overwrite_output_dir" for f in dataclasses.fields(TrainingArguments))
