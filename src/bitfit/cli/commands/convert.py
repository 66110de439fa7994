"""`bitfit convert`: a bitfit artifact folder <-> a peft-format BitFit adapter folder."""

from __future__ import annotations

import argparse

from .. import add_verbose, command


@command("convert", "convert a bitfit artifact to a peft BitFit adapter folder, or back")
def convert_main(argv: list) -> int:
    from ...peft.convert import convert

    p = argparse.ArgumentParser(
        prog="bitfit convert",
        description="Convert between a bitfit artifact folder (bitfit_config.json + bitfit_model.safetensors) and a "
        "peft-format BitFit adapter folder (adapter_config.json + adapter_model.safetensors), in the direction the "
        "source's files say. The tensors are copied bit for bit; no model is loaded and peft is not needed.",
    )
    p.add_argument("src", help="the folder to convert")
    p.add_argument("--output", "-o", required=True, help="the folder to write (created; the two files are replaced)")
    p.add_argument("--task-type", default=None,
                   help="peft task type of the written adapter (SEQ_CLS, CAUSAL_LM, ...; default: from the saved "
                   "architecture); bitfit -> peft only")
    add_verbose(p)
    args = p.parse_args(argv)
    kind, out = convert(args.src, args.output, task_type=args.task_type)
    what = "bitfit artifact" if kind == "bitfit" else "peft BitFit adapter"
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {what} {out} ({size:,} bytes)")
    return 0
