"""`bitfit analyze`: which biases moved in a trained run (change per role and layer, gradient ranking).

This module parses the command line and prints; the reports are :mod:`bitfit.training.analyze`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import add_verbose, command, quiet_env


@command("analyze", "which biases moved in a run: change per role and layer (heatmap, CSV) and gradient ranking")
def analyze_main(argv: list) -> int:
    quiet_env()
    from ...analysis.change import ranking_markdown
    from ...training.analyze import analyze_folder

    p = argparse.ArgumentParser(
        prog="bitfit analyze",
        description="The paper's bias-change figure for a trained run: mean |b0 - bf| per role and layer "
        "(heatmap PNG + CSV), and roles/layers ranked by change and by gradient magnitude.")
    p.add_argument("run_dir", help="a `bitfit train` output folder, a folder of them (e.g. a compare output), "
                   "or a plainly saved fine-tuned model (with --base)")
    p.add_argument("--base", default=None, help="base model (needed for a plain fine-tuned model; else optional)")
    p.add_argument("--task", default=None, help="GLUE task: measure gradient magnitudes on a few training batches "
                   "(when the run did not record them)")
    p.add_argument("--data-dir", default=None, help="GLUE folder for --task (default $BITFIT_GLUE_DIR)")
    p.add_argument("--batches", type=int, default=8, help="batches for the gradient measurement (default 8)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-dir", default=None, help="where to write (default RUN_DIR/analysis)")
    add_verbose(p)
    args = p.parse_args(argv)
    root = Path(args.run_dir)
    out_root = Path(args.output_dir) if args.output_dir else root / "analysis"
    results = analyze_folder(root, out_root, args.base, args.task, args.data_dir, args.batches, args.batch_size)
    for where, res in results.items():
        print(f"## {where}\n")
        print(ranking_markdown(res))
        print("files: " + ", ".join(res["files"].values()) + "\n")
    return 0
