"""One training run, start to finish: :func:`run_train` loads the data and the base model, applies BitFit
(or the ``prepare`` of another method), trains with BitFit's Trainer, evaluates, and writes the run folder;
with the checks that refuse training arguments and learning-rate options before anything loads.

Programmatic use (also what ``bitfit compare`` runs)::

    from bitfit.training import ModelArguments, DataArguments, run_train
    m = ModelArguments(model="minilm")
    d = DataArguments(task="rte", data_dir="../shared/data/glue")
    metrics = run_train(m, d, {"output_dir": "runs/rte"})   # dict = overrides on BitFit defaults

``run_train(model_args, data_args, training_args, prepare=None)`` takes either a full
``TrainingArguments`` or a dict of overrides over
:func:`bitfit.training.defaults.build_training_arguments` (whose defaults depend on the method, the task
and the training-set size).
"""

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import BitFitConfigError, BitFitError
from .arguments import DataArguments, ModelArguments
from .base import apply_bitfit, load_base, resolve_frozen_dtype, scoring_batches
from .baselines import trainable_count
from .defaults import (BITFIT_DROPOUT, BITFIT_METHODS, HEAD_LR_FACTOR, has_overwrite_field, instruct_checkpointing,
                       length_grouping, training_defaults)
from .runfolder import (abs_local, atomic_write_json, check_output_dir, clear_finished_run, command_record,
                        peak_memory_mb, resolve_resume, run_record, save_run_artifact, save_trained,
                        write_model_card)
from .resume import check_resume, checkpoint_record, run_folder_lock
from .tasks import encode, encode_instructions, load_splits, make_compute_metrics, positive_label
from .trainer import _trainer_class


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


def _takes_batches(prepare: Callable) -> bool:
    import inspect

    try:
        return "batches" in inspect.signature(prepare).parameters
    except (TypeError, ValueError):
        return False


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


def run_train(model_args: ModelArguments, data_args: DataArguments, training_args=None,
              prepare: Optional[Callable] = None, *, method: str = "bitfit", argv: Optional[list] = None,
              callbacks: Optional[list] = None) -> dict:
    """Load, prepare, train, evaluate and save; return the metrics.

    training_args: a ``TrainingArguments``, or a dict of overrides on :func:`build_training_arguments`'s
    defaults for ``method`` (epochs then follow the training-set size). ``prepare(model) -> model``
    replaces ``bitfit.apply`` (e.g. full fine-tuning or a peft wrapper; it does its own freezing).
    ``callbacks``: extra ``transformers.TrainerCallback`` objects for the Trainer.

    The run holds its output folder for its whole life (bitfit.training.resume.run_folder_lock): a second
    run into the same folder fails at once.
    """
    out = getattr(training_args, "output_dir", None) if not isinstance(training_args, (dict, type(None))) else \
        (training_args or {}).get("output_dir")
    with run_folder_lock(out):
        return _run_train(model_args, data_args, training_args, prepare, method=method, argv=argv,
                          callbacks=callbacks)


def _run_train(model_args: ModelArguments, data_args: DataArguments, training_args=None,
               prepare: Optional[Callable] = None, *, method: str = "bitfit", argv: Optional[list] = None,
               callbacks: Optional[list] = None) -> dict:
    import transformers
    from transformers import DataCollatorWithPadding, TrainingArguments

    from ..data.instruct import InstructionCollator
    from ..core.prepare import bitfit_model

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
        overwrite = defaults.pop("overwrite_output_dir", False) if not has_overwrite_field() else \
            defaults.get("overwrite_output_dir", False)
        training_args = TrainingArguments(**defaults)
    else:
        overwrite = getattr(training_args, "overwrite_output_dir", False)
    check_training_args(training_args)
    role_mult = check_lr_options(model_args, method, prepare)
    if training_args.learning_rate == 0 and not (model_args.head_learning_rate or model_args.pooler_learning_rate):
        raise BitFitConfigError("--learning_rate 0 trains nothing: the run would save the untrained model as if it "
                                "had trained; give a positive --learning_rate (or --head_learning_rate to train "
                                "the head alone)")
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
    if getattr(training_args, "fsdp", None) and not getattr(trainer, "is_fsdp_enabled", True) \
            and training_args.process_index == 0:  # Accelerate shards only on accelerators, not with use_cpu
        print("bitfit: --fsdp is not in effect: Accelerate runs FSDP only on an accelerator (GPU), not on the CPU; "
              "every rank trains a whole copy of the model (DDP)", file=sys.stderr)
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
    trainable = trainable_count(model)  # a masked bias counts its trained entries
    total = sum(p.numel() for p in model.parameters())
    parts = {}
    if target is not None:  # the biases and the head apart: BitFit's small fraction is the biases'
        from ..core.report import report as bitfit_report

        rep = bitfit_report(target)
        parts = dict(trainable_biases=rep.biases, trainable_head=rep.head)
        if training_args.process_index == 0:
            print(f"bitfit: {rep.summary()}", file=sys.stderr)

    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    record = checkpoint_record(model, model_args, info, abs_local(model_args.model)) if is_bitfit else None
    trainer.checkpoint_record = record
    if resume:  # another base, preset or label set: refused before the Trainer loads anything
        check_resume(resume, record, model_args.model)
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
        trainable_params=trainable, total_params=total, trainable_fraction=trainable / max(1, total), **parts,
        global_steps=trainer.state.global_step,
        peak_memory_mb=peak_memory_mb(), wall_time_s=wall, n_train=n_train, task=info.task, method=method,
        best_checkpoint=trainer.state.best_model_checkpoint, best_metric=trainer.state.best_metric,
        eval_history=history, frozen_dtype=model_args.frozen_dtype if prepare is None else None,
        head_warm_start=warm.to_dict() if warm is not None else None,
        f1_positive_label=positive_label(info) if info.kind == "files" else None,
    )
    # every rank when the model is sharded (FSDP2: the trained tensors are gathered collectively), else rank 0
    saved_as = save_run_artifact(trainer.model, training_args.output_dir,
                                 {**info.to_dict(), **run_record(model_args, data_args, info),
                                  "base_fingerprint": record["base_fingerprint"] if record else None},
                                 info, abs_local(model_args.model), main=trainer.is_world_process_zero(),
                                 save=save_trained)
    if trainer.is_world_process_zero():
        out = Path(training_args.output_dir)
        metrics["saved_as"] = saved_as
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "log_history.json", trainer.state.log_history)
        try:
            tokenizer.save_pretrained(str(out))  # the run folder carries its tokenizer
        except Exception as exc:  # noqa: BLE001 - a tokenizer that cannot be saved: the base's is used on load
            print(f"bitfit: the tokenizer was not saved with the run ({type(exc).__name__}: {exc})", file=sys.stderr)
        write_model_card(out, info, model_args, data_args, metrics, method)
        atomic_write_json(out / "command.json", command_record(argv, model_args, data_args, training_args, method,
                                                                 dtype_choice, wall))
    return metrics
