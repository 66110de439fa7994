"""One `bitfit compare` run in a fresh process: ``python -m bitfit.training.compare_worker JOB.json``
(compare itself starts it with ``python -c`` calling :func:`main`, the same).

`bitfit compare` starts one of these per run (method x lr x seed x size), so that the run's peak memory,
CPU time and load readings belong to it alone. JOB.json holds :func:`bitfit.training.compare_run.run_one`'s
arguments; the run writes its run.json as usual. The worker writes ``{"ok": true}`` or
``{"error": "one line"}`` to the job's ``result`` file and exits 0 or 1.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print("usage: python -m bitfit.training.compare_worker JOB.json", file=sys.stderr)
        return 2
    job = json.loads(Path(argv[0]).read_text())
    result = Path(job["result"])
    from ..errors import BitFitError
    from ..core.io import atomic_write_json

    try:
        from .compare_run import run_one
        from .arguments import DataArguments, ModelArguments

        # the parent's environment already holds these; they matter when the worker is started by hand
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        run_one(job["spec"], job["lr"], job["seed"], job["size"], ModelArguments(**job["model_args"]),
                DataArguments(**job["data_args"]), job["overrides"], Path(job["out_dir"]),
                job["keep_checkpoints"], job["overwrite"], train_argv=job.get("train_argv"), isolated=True)
    except BaseException as exc:  # noqa: BLE001 - the parent gets every failure as one line
        if isinstance(exc, BitFitError):
            error = str(exc)
        else:
            traceback.print_exc()
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        atomic_write_json(result, {"error": " ".join(error.split()), "type": type(exc).__name__})
        return 1
    atomic_write_json(result, {"ok": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
