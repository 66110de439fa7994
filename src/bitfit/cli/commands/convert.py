"""`bitfit convert`: a bitfit artifact folder <-> a peft-format BitFit adapter folder."""

from __future__ import annotations

import argparse

from .. import add_verbose, command


@command("convert", "convert a bitfit artifact to a peft BitFit adapter folder, or back")
def convert_main(argv: list) -> int:
    import os

    from ...errors import BitFitError
    from ...peft.convert import TASK_TYPES, convert

    p = argparse.ArgumentParser(
        prog="bitfit convert",
        description="Convert between a bitfit artifact folder (bitfit_config.json + bitfit_model.safetensors) and a "
        "peft-format BitFit adapter folder (adapter_config.json + adapter_model.safetensors), in the direction the "
        "source's files say. The tensors are copied bit for bit; no model is loaded and peft is not needed.",
    )
    p.add_argument("src", help="the folder to convert")
    p.add_argument("--output", "-o", required=True, help="the folder to write (created; the two files are replaced)")
    p.add_argument("--task-type", default=None, choices=TASK_TYPES, metavar="TYPE",
                   help="peft task type of the written adapter (one of " + ", ".join(TASK_TYPES) + "; default: from "
                   "the saved architecture); bitfit -> peft only")
    p.add_argument("--overwrite", action="store_true",
                   help="write into --output even if it holds a `bitfit train` run (its artifact is replaced; "
                   "its metrics.json and task.json then describe another model)")
    add_verbose(p)
    args = p.parse_args(argv)
    run_files = [n for n in ("task.json", "metrics.json", "command.json")
                 if os.path.isfile(os.path.join(os.path.expanduser(args.output), n))]
    if run_files and not args.overwrite:
        raise BitFitError(f"--output {args.output} holds a `bitfit train` run ({', '.join(run_files)}): converting "
                          "into it would replace its artifact while its records describe the old one; choose a new "
                          "folder, or pass --overwrite")
    kind, out = convert(args.src, args.output, task_type=args.task_type)
    what = "bitfit artifact" if kind == "bitfit" else "peft BitFit adapter"
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {what} {out} ({size:,} bytes)")
    return 0
