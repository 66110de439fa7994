"""`bitfit compare`'s grid of runs: every method x learning rate x seed x training-set size, each run in
a fresh Python process (:mod:`bitfit.training.compare_worker`) so that its peak memory, CPU time and load
are its own and not what earlier runs left behind (or all in this process, for tests and debugging);
finished runs are reused, so rerunning a compare resumes it. Then the table, figures and analyses of
:mod:`bitfit.training.compare_report`, written to results.md / results.json. See docs/COMPARE.md.

Every run goes through :func:`bitfit.training.run.run_train` with ``prepare=`` set to the method's
function from :mod:`bitfit.training.baselines` (:func:`bitfit.training.compare_run.run_one`), so all
methods share data, tokenization, Trainer, evaluation and saving.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Optional

from ..errors import BitFitConfigError, BitFitError
from ..core.io import atomic_write_json, atomic_write_text
from .compare_report import make_plots, markdown_table, summarize, write_analyses
from .compare_run import command_line, run_dir_for, run_one

DEFAULT_METHODS = "bitfit,paper-subset,full,frozen,lora,rand"


def parse_lr_grid(text: Optional[str], specs: list[str]) -> dict:
    """``None`` -> each method's default lr; ``auto`` -> each method's default grid;
    ``1e-4,1e-3`` -> that grid for every method; ``bitfit=1e-4,1e-3;full=2e-5,5e-5`` -> per method
    (methods not named keep their default lr)."""
    from .baselines import method_info

    out = {s: [method_info(s).lr] for s in specs}
    if not text:
        return out
    text = text.strip()
    if text == "auto":
        return {s: list(method_info(s).lr_grid) for s in specs}

    def nums(part: str, where: str) -> list:
        try:
            vals = [float(x) for x in part.split(",") if x.strip()]
        except ValueError:
            raise BitFitConfigError(f"--lr-grid {where!r}: learning rates must be numbers, e.g. 1e-4,1e-3") from None
        if not vals or any(v <= 0 for v in vals):
            raise BitFitConfigError(f"--lr-grid {where!r}: give one or more positive learning rates")
        return vals

    if "=" not in text:
        vals = nums(text, text)
        return {s: vals for s in specs}
    for part in text.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise BitFitConfigError(f"--lr-grid part {part!r}: write METHOD=LR,LR;METHOD=LR (or 'auto')")
        name, vals = part.split("=", 1)
        name = name.strip()
        if name not in out:
            raise BitFitConfigError(f"--lr-grid names {name!r}, which is not in --methods ({', '.join(specs)})")
        out[name] = nums(vals, part)
    return out


def _jsonable(obj):
    """TrainingArguments override values as JSON (enums as their value)."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return getattr(obj, "value", str(obj))


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# the worker process's code, run with `python -c` so that tests can swap it for a stub
WORKER_CODE = "import sys; from bitfit.training.compare_worker import main; sys.exit(main(sys.argv[1:]))"


def run_one_isolated(spec: str, lr: float, seed: int, size: Optional[int], model_args, data_args, overrides: dict,
                     out_dir: Path, keep_checkpoints: bool = False, overwrite: bool = False, *,
                     train_argv: Optional[list] = None) -> dict:
    """:func:`run_one` in a fresh Python process (``python -m bitfit.training.compare_worker``): its peak
    memory, CPU time and load are its own. The worker's output is shown as it comes and kept in the run's
    train.log; a failure raises BitFitError with one line saying what went wrong."""
    run_dir = run_dir_for(out_dir, spec, lr, seed, size)
    rec_file = run_dir / "run.json"
    if rec_file.exists() and not overwrite:
        return json.loads(rec_file.read_text())
    what = f"{spec} lr={lr:g} seed={seed}" + (f" n={size}" if size else "")
    with tempfile.TemporaryDirectory(prefix="bitfit-compare-") as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        atomic_write_json(job, {
            "spec": spec, "lr": lr, "seed": seed, "size": size, "model_args": dataclasses.asdict(model_args),
            "data_args": dataclasses.asdict(data_args), "overrides": _jsonable(overrides),
            "out_dir": str(Path(out_dir).resolve()), "keep_checkpoints": keep_checkpoints, "overwrite": overwrite,
            "train_argv": train_argv, "result": str(result)})
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-c", WORKER_CODE, str(job)]
        log, tail = [], deque(maxlen=20)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace", env=env)
        try:
            for line in proc.stdout:
                sys.stderr.write(line)
                log.append(line)
                if line.strip():
                    tail.append(line.strip())
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        try:
            res = json.loads(result.read_text())
        except (OSError, ValueError):
            res = {}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "train.log", "".join(log))
    except OSError:
        pass
    if rc == 0 and not res.get("error") and rec_file.exists():
        return json.loads(rec_file.read_text())
    if res.get("error"):
        why = res["error"]
    elif rc < 0:
        why = f"the worker process was killed by signal {-rc}" + (" (out of memory?)" if -rc == 9 else "")
    else:
        why = f"the worker process exited with code {rc}" + (f": {tail[-1]}" if tail else "")
    raise BitFitError(f"run {what} failed: {_one_line(why)} (log: {run_dir / 'train.log'}; finished runs are kept, "
                      "the same command resumes)")


def _data_label(path: Optional[str]) -> str:
    p = Path(path or "data")
    return p.parent.name if p.stem.lower() in ("train", "data") and p.parent.name else p.stem


def write_compare_command(out: Path, argv: list, isolated: bool) -> None:
    """The compare folder's command.json: the compare's own command line (rerunning it resumes)."""
    from .runfolder import library_versions

    atomic_write_json(Path(out) / "command.json", {
        "argv": list(argv), "command": command_line("compare", list(argv)), "cwd": os.getcwd(),
        "isolated": isolated, "versions": library_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def run_compare(model_args, data_args, overrides: dict, specs: list, seeds: list, lr_grid: dict,
                train_sizes: list, out: Path, keep_checkpoints: bool = False, overwrite: bool = False,
                analyze: bool = True, *, isolate: bool = True, train_argv: Optional[list] = None,
                argv: Optional[list] = None) -> dict:
    """Every (method, lr, seed, size) run, then the table, figures and analyses. ``isolate``: each run in a
    fresh process (:func:`run_one_isolated`; the default), else all in this one (:func:`run_one`).
    ``train_argv``: the TrainingArguments flags as given (for the runs' command.json); ``argv``: the
    compare's own arguments (written to ``out/command.json``)."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if argv is not None:
        write_compare_command(out, argv, isolate)
    plan = [(spec, lr, seed, size) for size in (train_sizes or [None]) for spec in specs
            for lr in lr_grid[spec] for seed in seeds]
    records = []
    one = run_one_isolated if isolate else run_one
    bar = tqdm(plan, desc="compare", unit="run", file=sys.stderr)
    for spec, lr, seed, size in bar:
        bar.set_postfix_str(f"{spec} lr={lr:g} seed={seed}" + (f" n={size}" if size else ""))
        rec = one(spec, lr, seed, size, model_args, data_args, overrides, out, keep_checkpoints, overwrite,
                  train_argv=train_argv)
        records.append(rec)
        took = rec.get("total_time_s") or rec.get("train_runtime_s") or float("nan")
        tqdm.write(f"{spec:>14s} lr={lr:<7g} seed={seed}{' n=' + str(size) if size else ''}: "
                   f"{rec['primary']}={100 * (rec['score'] or float('nan')):.2f} "
                   f"({took:.0f} s)", file=sys.stderr)
    rows = summarize(records, specs)
    task = data_args.task or _data_label(data_args.train_file)
    table = markdown_table(rows, task)
    files = make_plots(records, rows, specs, out, task)
    if analyze:
        files["analysis"] = write_analyses(records, rows, out, model_args.model)
    result = {"task": task, "model": model_args.model, "methods": specs, "seeds": seeds, "train_sizes": train_sizes,
              "training_overrides": overrides, "summary": rows, "runs": [
                  {k: v for k, v in r.items() if k not in ("change", "grad")} for r in records], "files": files}
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "results.md", f"# {task}: {model_args.model}\n\n" + table)
    return result
