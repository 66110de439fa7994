"""`bitfit train`, `bitfit eval`, `bitfit predict`, `bitfit generate`."""

from __future__ import annotations

import json
import sys

from .. import add_verbose, command
from ...errors import BitFitError


def _env():
    from .. import quiet_env

    quiet_env()


@command("train", "train a model's biases on a GLUE task, your own files, or instruction data")
def train_main(argv: list) -> int:
    _env()
    from ...training.run import run_train
    from ...training.runfolder import json_safe
    from ..trainargs import parse_train_args

    if not argv:
        argv = ["--help"]
    model_args, data_args, training_args = parse_train_args(argv)
    metrics = run_train(model_args, data_args, training_args, argv=argv)
    import os

    if int(os.environ.get("RANK", "0")) == 0:  # torchrun / accelerate launch: rank 0 reports
        shown = {k: v for k, v in metrics.items() if (k.startswith("eval_") and k != "eval_history") or k in (
            "train_loss", "train_runtime", "trainable_params", "trainable_biases", "trainable_head", "total_params",
            "peak_memory_mb", "num_train_epochs",
            "global_steps")}
        print(json.dumps(json_safe(shown), indent=2, default=str))
        if "eval_f1" in metrics and metrics.get("f1_positive_label") is not None:
            print(f"bitfit: eval_f1 is binary F1 for the label {metrics['f1_positive_label']!r} "
                  "(--positive-label to choose)", file=sys.stderr)
        print(f"saved to {training_args.output_dir}", file=sys.stderr)
    return 0


def _parse(argv: list, prog: str, extra):
    from transformers import HfArgumentParser

    from ...training.arguments import DataArguments, ModelArguments

    parser = HfArgumentParser((ModelArguments, DataArguments), prog=prog, allow_abbrev=False)
    extra(parser)
    add_verbose(parser)
    model_args, data_args, ns = _split(parser, argv)
    if not model_args.adapter:
        raise BitFitError("--adapter is required (the output folder of `bitfit train`)")
    return model_args, data_args, ns


def _split(parser, argv):
    import dataclasses

    from ...training.arguments import DataArguments, ModelArguments

    ns = parser.parse_args(argv or ["--help"])
    d = vars(ns)
    m = ModelArguments(**{f.name: d.pop(f.name) for f in dataclasses.fields(ModelArguments)})
    a = DataArguments(**{f.name: d.pop(f.name) for f in dataclasses.fields(DataArguments)})
    return m, a, ns


@command("eval", "evaluate a trained run on the dev split with the task's official metric(s)")
def eval_main(argv: list) -> int:
    _env()
    from ...training.evaluate import evaluate_run
    from ...training.runfolder import json_safe

    def extra(p):
        p.add_argument("--split", default="dev", help="split to score (dev; train for a sanity check)")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--json-out", default=None, help="also write the metrics to this JSON file")

    model_args, data_args, ns = _parse(argv, "bitfit eval", extra)
    metrics = evaluate_run(model_args, data_args, ns.split, ns.batch_size)
    text = json.dumps(json_safe(metrics), indent=2)
    print(text)
    if ns.json_out:
        with open(ns.json_out, "w") as fh:
            fh.write(text + "\n")
    return 0


@command("predict", "predict a split with a trained run (test: GLUE leaderboard files)")
def predict_main(argv: list) -> int:
    _env()
    from ...training.evaluate import predict_run

    def extra(p):
        p.add_argument("--split", default="test", help="test (default) or dev")
        p.add_argument("--output", default=None,
                       help="file to write (e.g. RTE.tsv), or a folder for the leaderboard file(s)")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--text", default=None, help="predict this one sentence: prints the label and its score")
        p.add_argument("--text-pair", default=None, help="(with --text) the second sentence of a pair task")

    model_args, data_args, ns = _parse(argv, "bitfit predict", extra)
    if ns.text is not None:
        from ...training.evaluate import predict_text

        label, score = predict_text(model_args, ns.text, ns.text_pair)
        print(f"{label}\t{score:.4f}")
        return 0
    if not ns.output:
        raise BitFitError("--output is required (a file, or a folder for GLUE leaderboard files); or pass "
                          "--text \"...\" to predict one sentence")
    for path in predict_run(model_args, data_args, ns.split, ns.output, ns.batch_size):
        print(path)
    return 0


@command("generate", "generate a response with an instruction-tuned run")
def generate_main(argv: list) -> int:
    _env()
    from ...training.generate import generate

    def extra(p):
        p.add_argument("--prompt", required=True, help="the instruction")
        p.add_argument("--input", default=None, help="optional input/context for the instruction")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--raw", action="store_true", help="send the prompt as is, without the Alpaca template")
        p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--temperature", type=float, default=0.7)

    model_args, _, ns = _parse(argv, "bitfit generate", extra)
    print(generate(model_args, ns.prompt, ns.input, ns.max_new_tokens, ns.raw, ns.sample, ns.temperature))
    return 0
