"""The command line of `bitfit train`: the model and data arguments plus every ``TrainingArguments`` flag,
with BitFit's defaults (which depend on the task and the training-set size) for the flags the user did
not give, and the argv helpers that tell which flags were given (`bitfit compare` uses them too)."""

from dataclasses import dataclass, field

from . import add_verbose
from ..errors import BitFitConfigError, BitFitError, DataError
from ..training.arguments import DataArguments, ModelArguments
from ..training.defaults import (CHECKPOINTING_FLAGS, has_accelerator, has_overwrite_field, instruct_checkpointing,
                                 length_grouping, training_defaults)
from ..training.run import check_training_args
from ..training.tasks import load_splits, task_info


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


def parse_train_args(argv: list):
    """Parse `bitfit train` arguments: our dataclasses plus every TrainingArguments flag, with BitFit's
    defaults for the flags the user did not give (they depend on the task and the training-set size)."""
    from transformers import HfArgumentParser, TrainingArguments

    argv = new_flag_names(argv)
    for i, a in enumerate(argv):  # `--lr_scheduler_type halving`: bitfit's schedule has a flag of its own
        key, _, val = a.partition("=")
        if key in ("--lr_scheduler_type", "--lr-scheduler-type") and \
                (val or (argv[i + 1] if i + 1 < len(argv) else "")).strip().lower() == "halving":
            raise BitFitConfigError("the halving schedule is --halve_every_epochs N (the learning rate halves every N "
                                    "epochs after the warm-up); drop --lr_scheduler_type")
    first = HfArgumentParser((ModelArguments, DataArguments), allow_abbrev=False, add_help=False)
    model_args, data_args, rest = first.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    own = () if has_overwrite_field() else (RunArguments,)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments) + own, prog="bitfit train",
                              allow_abbrev=False)
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
    if (flag_given(argv, "bf16") or flag_given(argv, "fp16")) and not has_accelerator():
        defaults["use_cpu"] = True  # autocast on the CPU instead of transformers' "needs a GPU" error
    parser.set_defaults(**defaults)
    check_unknown_flags(parser, argv, "bitfit train")
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


RENAMED_FLAGS = {"gradient_checkpointing": "activation_checkpointing",
                 "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}  # transformers 5's names


def new_flag_names(argv: list) -> list:
    """``argv`` with the TrainingArguments flags transformers renamed given their new names when the installed
    transformers has them (``--gradient_checkpointing false`` -> ``--activation_checkpointing false``): the same
    setting, without transformers' deprecation warning on every run."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    forms = {}
    for old, new in RENAMED_FLAGS.items():
        if new in fields:
            forms.update({f"--{old}": f"--{new}", f"--{old.replace('_', '-')}": f"--{new}"})
    out = []
    for a in argv:
        key, sep, val = a.partition("=")
        out.append(forms[key] + sep + val if key in forms else a)
    return out


def check_unknown_flags(parser, argv: list, prog: str) -> None:
    """Refuse an option ``parser`` does not know with the nearest one it does (``unknown option
    --num_train_epoch; did you mean --num_train_epochs?``) instead of HfArgumentParser's list of unused
    strings."""
    import difflib

    _, unknown = parser.parse_known_args(argv)
    if not unknown:
        return
    options = sorted({o for action in parser._actions for o in action.option_strings if o.startswith("--")})
    flag = next((a for a in unknown if a.startswith("-")), None)
    if flag is None:
        raise BitFitConfigError(f"unexpected argument {unknown[0]!r}: every value follows its option "
                                f"(`{prog} --help` lists them)")
    key = flag.split("=", 1)[0]
    near = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else f" (`{prog} --help` lists the options)"
    raise BitFitConfigError(f"unknown option {key}{hint}")


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
