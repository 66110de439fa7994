"""The command line. Thin: it parses, calls the library, prints."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from ..errors import BitFitError

# subcommand name -> (help, function(argv) -> int). Other modules register theirs here.
COMMANDS: dict[str, tuple[str, Callable[[list], int]]] = {}


VERBOSE_HELP = "show transformers' load reports and warnings (hidden by default)"


class _Verbose(argparse.Action):
    """``--verbose``: ``bitfit`` takes it off the command line before the subcommand parses (it sets
    ``BITFIT_VERBOSE=1``); every subcommand's parser lists it, so that ``--help`` shows it. It stores nothing
    on the parsed namespace (HfArgumentParser turns unknown namespace entries into an extra result)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS,
                         help=kwargs.get("help", VERBOSE_HELP))

    def __call__(self, parser, namespace, values, option_string=None):
        import os

        os.environ["BITFIT_VERBOSE"] = "1"


def add_verbose(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--verbose`` (see :class:`_Verbose`) to a subcommand's parser; returns the parser."""
    parser.add_argument("--verbose", action=_Verbose)
    return parser


def quiet_env() -> None:
    """Hide transformers' load reports and known deprecation noise unless ``--verbose`` (``BITFIT_VERBOSE``)."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("BITFIT_VERBOSE"):  # bitfit --verbose COMMAND / COMMAND --verbose: everything
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
        return
    # quiet by default: transformers' load reports (a head that is trained or restored from the run shows as
    # "MISSING ... newly initialized") and known deprecation noise
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        if "transformers" in sys.modules:  # already imported (by a command module): the variable is read too late
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
    hide_loading_bars()
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|torch|accelerate|datasets)\b")


_QUIET_BARS = ("Loading weights",)  # transformers' per-tensor bar on every from_pretrained: no download, no wait


def hide_loading_bars() -> None:
    """Hide transformers' "Loading weights" progress bar (it fills in well under a second on the models bitfit
    loads, on every `bitfit info`, `predict` ...); download bars and the Trainer's stay."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    if not hasattr(hf_logging, "set_tqdm_hook"):  # older transformers: no per-bar hook
        return

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in _QUIET_BARS:
            kwargs = dict(kwargs, disable=True)
        return factory(*args, **kwargs)

    hf_logging.set_tqdm_hook(hook)


def command(name: str, help: str):
    def deco(fn):
        COMMANDS[name] = (help, fn)
        return fn

    return deco


@command("info", "show which biases BitFit would train in a model, by role and layer")
def info_main(argv: list) -> int:
    from transformers.hf_argparser import string_to_bool

    from .. import report
    from ..core.config import BitFitConfig
    from ..core.models import load_model, saved_task
    from ..training.base import apply_quietly, choose_add_missing

    p = argparse.ArgumentParser(prog="bitfit info", description="Show what BitFit trains in a model.")
    p.add_argument("model", help="local model folder, Hub name, or 'minilm' (the packaged MiniLM-L6)")
    p.add_argument("--preset", default="all", help="bias preset (all, paper-subset, attention, ffn, layernorm, none)")
    p.add_argument("--task-head", type=int, default=None, metavar="N",
                   help="load with a sequence-classification head of N labels")
    p.add_argument("--add-missing", nargs="?", const=True, default=None, type=string_to_bool, metavar="BOOL",
                   help="add zero-initialised biases to the selected slots that have none (default: on when the "
                        "model lacks some, as in `bitfit train`; --add-missing false shows only the existing ones)")
    p.add_argument("--layers", default=None, help="restrict to layers, e.g. '-2:'")
    p.add_argument("--train-norm-weights", action="store_true",
                   help="also train the LayerNorm/RMSNorm gains (counted in 'trainable')")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_verbose(p)
    args = p.parse_args(argv)
    # the class `bitfit train` loads: a classifier with --task-head, a causal LM for a GGUF file or a checkpoint
    # saved as one (its LM head counts in the total, as in training), else the bare model
    task = "classification" if args.task_head else saved_task(args.model)
    model = load_model(args.model, num_labels=args.task_head, task=task)
    cfg = BitFitConfig(preset=args.preset, layers=args.layers, train_norm_weights=args.train_norm_weights,
                       add_missing=bool(args.add_missing))
    cfg, line = choose_add_missing(model, cfg, args.add_missing)
    if line:
        print(line, file=sys.stderr)
    apply_quietly(model, cfg, args.add_missing)
    rep = report(model)
    print(rep.to_json() if args.json else rep.to_markdown())
    return 0


def _load_plugins() -> None:
    # Modules that add subcommands; missing optional ones are skipped.
    import importlib

    for mod in ("bitfit.cli.commands",):
        try:
            importlib.import_module(mod)
        except ImportError as exc:  # pragma: no cover
            if exc.name != mod:
                raise


def main(argv: Optional[list] = None) -> int:
    _load_plugins()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: bitfit COMMAND [options]\n\ncommands:")
        for name, (help_, _) in COMMANDS.items():
            print(f"  {name:10s} {help_}")
        print("\nRun 'bitfit COMMAND --help' for a command's options; add --verbose to any command for "
              "transformers' load reports and warnings (hidden by default).")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"bitfit {__version__}")
        return 0
    if argv[0] == "--verbose":  # bitfit --verbose COMMAND ...
        argv = argv[1:] + ["--verbose"]
    name, rest = argv[0], argv[1:]
    if "--verbose" in rest:  # transformers' load reports and warnings back (quiet by default)
        import os

        rest = [a for a in rest if a != "--verbose"]
        os.environ["BITFIT_VERBOSE"] = "1"
    if name not in COMMANDS:
        print(f"bitfit: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    quiet_env()
    try:
        return COMMANDS[name][1](rest) or 0
    except BitFitError as exc:
        print(f"bitfit {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bitfit {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
