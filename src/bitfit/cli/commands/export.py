"""`bitfit export`: one task merged into its base, as TorchScript or ONNX (runs without bitfit)."""

from __future__ import annotations

import argparse
import json

from .. import add_verbose, command
from ...errors import BitFitError


@command("export", "export one task merged into its base as TorchScript or ONNX (no bitfit needed to run it)")
def main(argv: list) -> int:
    p = argparse.ArgumentParser(
        prog="bitfit export",
        description="Merge a task artifact (or a `bitfit train` run folder) into its base model and export it: "
        "TorchScript (torch.jit.trace) or ONNX (torch.onnx.export). The exported model takes the tokenizer's "
        "tensors (input_ids, attention_mask[, token_type_ids]; any batch size and length) and returns the logits. "
        "The export is checked against the PyTorch model on two other input shapes.",
    )
    p.add_argument("source", metavar="RUN_OR_ARTIFACT", help="a task artifact folder or a `bitfit train` run folder")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="the base model (local folder, Hub name or alias); default: the one the artifact names")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], dest="fmt")
    p.add_argument("--output", required=True, metavar="PATH", help="file to write (e.g. model.onnx, model.pt)")
    p.add_argument("--no-check", action="store_true", help="skip comparing the export with the PyTorch model")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted |exported - PyTorch| logit difference (default 1e-4); a larger one writes "
                   "nothing (an earlier export at --output is kept)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_verbose(p)
    args = p.parse_args(argv)

    import os

    from ...artifacts import read_artifact
    from ...serving.export import check_tolerance, export_model, merged_task
    from ...core.models import load_tokenizer

    tolerance = None if args.no_check else check_tolerance(args.tolerance)
    if os.path.isdir(os.path.expanduser(args.output)):
        raise BitFitError(f"--output {args.output} is a folder; give the file to write (e.g. "
                          f"{os.path.join(args.output, 'model.onnx' if args.fmt == 'onnx' else 'model.pt')})")
    art = read_artifact(args.source)  # a clean error for a missing or damaged folder first
    base = args.base or art.meta["base_model"].get("name")
    if not base:
        raise BitFitError(f"{args.source} does not record its base model's name; pass --base MODEL")
    try:
        tokenizer = load_tokenizer(base)
    except Exception:  # noqa: BLE001 - a base without a tokenizer: export model inputs from the signature
        tokenizer = None
    model = merged_task(args.source, base)
    report = export_model(model, args.output, args.fmt, tokenizer=tokenizer, check=not args.no_check,
                          tolerance=tolerance)
    diff = report["max_abs_diff"]
    if args.json:
        print(json.dumps(report))
    else:
        checked = ("not checked" if diff is None and args.no_check else
                   "not checked (pip install onnxruntime to check)" if diff is None else
                   f"largest logit difference from PyTorch {diff:.2e}")
        print(f"bitfit export: {args.fmt} model written to {report['path']} (inputs: {', '.join(report['inputs'])}; "
              f"output: logits); {checked}")
    return 0
