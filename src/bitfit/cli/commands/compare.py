"""`bitfit compare`: train BitFit and its baselines side by side through the same pipeline, one table.

This module parses the command line and prints; the grid of runs, the worker processes, resuming, the
table and figures are :mod:`bitfit.training.compare`'s. See docs/COMPARE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Optional

from .. import add_verbose, command, quiet_env
from ...errors import BitFitConfigError
from ...training.compare import DEFAULT_METHODS, parse_lr_grid, run_compare


def _split_training_flags(rest: list) -> dict:
    """TrainingArguments flags the user gave explicitly, as a dict of overrides."""
    from transformers import HfArgumentParser, TrainingArguments

    from ..trainargs import flag_given

    if not rest:
        return {}
    parser = HfArgumentParser(TrainingArguments, allow_abbrev=False)
    try:
        ta, unknown = parser.parse_args_into_dataclasses(
            rest + ["--output_dir", tempfile.gettempdir()], return_remaining_strings=True)
    except ValueError as exc:
        raise BitFitConfigError(f"invalid training arguments: {exc}") from None
    if unknown:
        raise BitFitConfigError(f"unknown option(s) {unknown}; see `bitfit compare --help` (any TrainingArguments "
                                "flag such as --num_train_epochs or --per_device_train_batch_size is accepted)")
    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.name in ("output_dir",):
            continue
        if flag_given(rest, f.name):
            out[f.name] = getattr(ta, f.name)
    return out


def _int_list(text: Optional[str], flag: str) -> list:
    if not text:
        return []
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BitFitConfigError(f"{flag} takes comma-separated integers, e.g. 100,300,1000") from None
    if any(v <= 0 for v in vals):
        raise BitFitConfigError(f"{flag}: sizes must be positive")
    return vals


@command("compare", "train BitFit and its baselines side by side: table, bar chart, learning curves")
def compare_main(argv: list) -> int:
    quiet_env()
    from ...training.baselines import METHODS, parse_method, train_options
    from ...training.arguments import DataArguments, ModelArguments

    methods_help = "; ".join(f"{k}: {m.help} (lr {m.lr:g})" for k, m in METHODS.items())
    p = argparse.ArgumentParser(
        prog="bitfit compare",
        description="Train several fine-tuning methods through the same pipeline and compare them. Any "
        "transformers TrainingArguments flag (e.g. --num_train_epochs 5 --per_device_train_batch_size 16) is "
        "passed to every run.", epilog="methods: " + methods_help)
    p.add_argument("--model", required=True, help="base model: local folder, Hub name, or 'minilm'")
    p.add_argument("--task", default=None, help="GLUE task (rte, mrpc, stsb, cola, sst2, ...)")
    p.add_argument("--data-dir", default=None, help="GLUE folder (default $BITFIT_GLUE_DIR, else the Hub)")
    p.add_argument("--train-file", default=None, help="own training data (.csv .tsv .jsonl .parquet)")
    p.add_argument("--validation-file", default=None, help="own dev data")
    p.add_argument("--text-column", default=None)
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--dropout", type=float, default=None,
                   help="set every dropout probability of the model to this value for every method (default: the "
                   "model's own)")
    p.add_argument("--eval-size", type=int, default=None, help="evaluate on the first N dev rows only (quick checks)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma list (default {DEFAULT_METHODS}); options as lora/r=16/alpha=32, bitfit/preset=ffn, "
                   "bitfit+last-2")
    p.add_argument("--seeds", type=int, default=1, help="seeds per method and learning rate (default 1)")
    p.add_argument("--seed", type=int, default=42, help="first seed (then seed+1, ...)")
    p.add_argument("--lr-grid", default=None,
                   help="'auto' (each method's grid), '1e-4,1e-3' (all methods), or 'bitfit=1e-4,1e-3;full=2e-5,5e-5'")
    p.add_argument("--train-sizes", default=None, help="run every method at each training-set size, e.g. 100,300,1000")
    p.add_argument("--output-dir", required=True, help="folder for runs, results.md/json and figures")
    p.add_argument("--overwrite", action="store_true", help="rerun runs that already have a run.json (default: reuse)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the Trainer's checkpoint-* folders")
    p.add_argument("--no-analysis", action="store_true", help="skip the bias-change heatmaps")
    p.add_argument("--in-process", action="store_true",
                   help="run every training in this process instead of a fresh process per run (tests, debugging; "
                   "peak memory then includes what earlier runs left behind)")
    add_verbose(p)
    args, rest = p.parse_known_args(argv)
    if args.task is None and args.train_file is None:
        raise BitFitConfigError("give --task (a GLUE task) or --train-file (your own data)")
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    if not specs:
        raise BitFitConfigError("--methods is empty")
    for s in specs:
        parse_method(s)
        train_options(s)  # bad training options fail before any run
    if len(set(specs)) != len(specs):
        raise BitFitConfigError(f"--methods lists a method twice: {args.methods}")
    if args.seeds < 1:
        raise BitFitConfigError("--seeds must be at least 1")
    lr_grid = parse_lr_grid(args.lr_grid, specs)
    overrides = _split_training_flags(rest)
    for k in ("learning_rate", "seed"):
        if k in overrides:
            raise BitFitConfigError(f"--{k} is set per run by compare: use --lr-grid / --seed instead")
    sizes = _int_list(args.train_sizes, "--train-sizes")
    model_args = ModelArguments(model=args.model, dropout=args.dropout)
    data_args = DataArguments(task=args.task, data_dir=args.data_dir, train_file=args.train_file,
                              validation_file=args.validation_file, text_column=args.text_column,
                              text_pair_column=args.text_pair_column, label_column=args.label_column,
                              max_seq_length=args.max_seq_length, eval_size=args.eval_size)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = run_compare(model_args, data_args, overrides, specs, [args.seed + i for i in range(args.seeds)],
                         lr_grid, sizes, out, args.keep_checkpoints, args.overwrite, not args.no_analysis,
                         isolate=not args.in_process, train_argv=list(rest), argv=list(argv))
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.md'}, {out / 'results.json'}; figures: "
          + ", ".join(str(v) for k, v in result["files"].items() if isinstance(v, str)), file=sys.stderr)
    return 0

