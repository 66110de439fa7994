"""`bitfit compare` (BitFit against its baselines, one table) and `bitfit analyze` (which biases moved).

Every run goes through :func:`bitfit.training.train.run_train` with ``prepare=`` set to the method's
function from :mod:`bitfit.training.baselines`, so all methods share data, tokenization, Trainer, evaluation
and saving. Each run (method x lr x seed x size) trains in its own fresh Python process
(:mod:`bitfit.cli.commands.compare_worker`), so its peak memory is its own and not what earlier runs left
behind; ``--in-process`` runs them all in this process (tests, debugging). Step and CPU times are the
figures of :mod:`bitfit.fast.timing`, the same ones `bitfit train` writes to metrics.json. See docs/COMPARE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from .. import add_verbose, command
from ...errors import BitFitConfigError, BitFitError
from ...core.io import atomic_write_json, atomic_write_text

DEFAULT_METHODS = "bitfit,paper-subset,full,frozen,lora,rand"
# which of run_train's method defaults (weight decay, epochs, head learning rate) each method uses
TRAIN_METHOD = {
    "bitfit": "bitfit", "paper-subset": "bitfit", "frozen": "frozen", "full": "full", "lora": "lora",
    "beft": "lora", "ln_tuning": "lora", "ia3": "lora", "rand": "rand", "bitfit+last-N": "bitfit",
    "bitfit+lora": "lora", "bitfit-peft": "bitfit", "bitfit-1d": "bitfit", "bitfit-halving": "bitfit",
    "bitfit-rolelr": "bitfit", "bitfit-sparse": "bitfit", "bitfit-dynamic": "bitfit",
}
ARTIFACT_FILES = ("bitfit_model.safetensors", "bitfit_config.json", "adapter_model.safetensors",
                  "adapter_config.json", "model.safetensors", "config.json", "rand_delta.safetensors", "dynamic_bias.safetensors")


# ----------------------------------------------------------------------------- helpers
def _env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+=_-]+", "_", spec.replace("/", "__"))


def parse_lr_grid(text: Optional[str], specs: list[str]) -> dict:
    """``None`` -> each method's default lr; ``auto`` -> each method's default grid;
    ``1e-4,1e-3`` -> that grid for every method; ``bitfit=1e-4,1e-3;full=2e-5,5e-5`` -> per method
    (methods not named keep their default lr)."""
    from ...training.baselines import method_info

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


class RssSampler:
    """Peak resident memory of this process while a run trains (sampled from /proc every 50 ms)."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _primary(run_dir: Path, metrics: dict) -> str:
    try:
        return json.loads((run_dir / "task.json").read_text())["primary"]
    except (OSError, KeyError, ValueError):
        return "accuracy"


def _task_metrics(run_dir: Path) -> list:
    try:
        return list(json.loads((run_dir / "task.json").read_text()).get("metrics") or [])
    except (OSError, ValueError):
        return []


def _history(metrics: dict, primary: str) -> list:
    """[(epoch, score)] from the per-epoch eval entries (the final re-evaluation is dropped)."""
    seen, out = set(), []
    for e in metrics.get("eval_history") or []:
        ep = e.get("epoch")
        v = e.get(f"eval_{primary}")
        if ep is None or v is None or ep in seen:
            continue
        seen.add(ep)
        out.append((float(ep), float(v)))
    return out


def _artifact_bytes(run_dir: Path) -> int:
    return sum((run_dir / n).stat().st_size for n in ARTIFACT_FILES if (run_dir / n).is_file())


def _save_rand(model, run_dir: Path) -> None:
    """rand's sparse deltas and their indices (the part of a rand run bitfit.save cannot hold)."""
    import safetensors.torch
    import torch

    from ...training.baselines import RandDelta

    t = {}
    for name, m in model.named_modules():
        rd = getattr(m, "bitfit_rand", None)
        if isinstance(rd, RandDelta):
            t[f"{name}.delta"] = rd.delta.detach().cpu().contiguous()
            t[f"{name}.rows"] = rd.rows.to(torch.int32).cpu().contiguous()
            t[f"{name}.cols"] = rd.cols.to(torch.int32).cpu().contiguous()
    if t:
        tmp = run_dir / "rand_delta.safetensors.tmp"
        safetensors.torch.save_file(t, str(tmp))
        os.replace(tmp, run_dir / "rand_delta.safetensors")


# ----------------------------------------------------------------------------- one run
def run_dir_for(out_dir: Path, spec: str, lr: float, seed: int, size: Optional[int]) -> Path:
    """The folder of one run inside a compare's --output-dir."""
    return Path(out_dir) / "runs" / slug(spec) / f"lr{lr:g}" / (f"n{size}" if size else "full") / f"seed{seed}"


_TRAIN_PRESET = {"bitfit": "all", "paper-subset": "paper-subset", "frozen": "none", "bitfit-1d": "all",
                 "bitfit-halving": "all", "bitfit-rolelr": "all", "bitfit-sparse": "all"}
_TRAIN_EXTRA = {"bitfit-1d": {"train_norm_weights": "true"},  # `bitfit train` flags a method stands for
                "bitfit-sparse": {"budget": "0.5"}}
# method options of the BitFit family that `bitfit train` takes as flags of the same name
_TRAIN_FLAGS = {"preset", "roles", "include", "exclude", "layers", "add_missing", "train_head", "skip_zero_grad",
                "frozen_dtype", "lean", "train_norm_weights", "role_lr_multipliers", "layer_lr_decay",
                "halve_every_epochs", "norm_weight_l2", "budget", "importance", "importance_unit",
                "importance_batches"}


def _abs(path: Optional[str]) -> Optional[str]:
    """A path that exists here, made absolute (so the command works from any folder); names unchanged."""
    return os.path.abspath(path) if path and os.path.exists(path) else path


def _override_argv(overrides: dict) -> list:
    """TrainingArguments overrides back as command-line flags (when the original flags are not known)."""
    out = []
    for k, v in overrides.items():
        v = getattr(v, "value", v)
        if v is None:
            continue
        if isinstance(v, bool):
            out += [f"--{k}", "true" if v else "false"]
        elif isinstance(v, (list, tuple)):
            if v:
                out += [f"--{k}", *(str(getattr(x, "value", x)) for x in v)]
        elif isinstance(v, dict):
            out += [f"--{k}", json.dumps(v)]
        else:
            out += [f"--{k}", repr(v) if isinstance(v, float) else str(v)]
    return out


def _common_flags(model_args, data_args) -> list:
    """Model and data flags shared by `bitfit train` and `bitfit compare` (same names in both)."""
    a = ["--model", _abs(model_args.model)]
    if data_args.task:
        a += ["--task", data_args.task]
        data_dir = data_args.data_dir or os.environ.get("BITFIT_GLUE_DIR")
        if data_dir:
            a += ["--data-dir", _abs(data_dir)]
    for flag, value in (("--train-file", _abs(data_args.train_file)),
                        ("--validation-file", _abs(data_args.validation_file)),
                        ("--text-column", data_args.text_column), ("--text-pair-column", data_args.text_pair_column)):
        if value:
            a += [flag, value]
    if data_args.label_column and data_args.label_column != "label":
        a += ["--label-column", data_args.label_column]
    if data_args.max_seq_length is not None:
        a += ["--max-seq-length", str(data_args.max_seq_length)]
    if data_args.eval_size:
        a += ["--eval-size", str(data_args.eval_size)]
    if model_args.dropout is not None:
        a += ["--dropout", repr(float(model_args.dropout))]
    return a


def rerun_command(run_spec: str, lr: float, seed: int, size: Optional[int], model_args, data_args,
                  train_argv: list, output_dir: str) -> tuple:
    """(subcommand, argv) that reproduces exactly this run: ``bitfit train ...`` for the BitFit presets
    (bitfit, paper-subset, frozen; with the precision the run used), else ``bitfit compare`` of this one
    method, learning rate, seed and size. ``run_spec`` is the method spec the run trained with."""
    from ...training.baselines import parse_method

    from ...training.baselines import train_options

    name, opts = parse_method(run_spec)
    opts = {**_TRAIN_EXTRA.get(name, {}), **opts, **train_options(run_spec)}
    common = _common_flags(model_args, data_args)
    if name in _TRAIN_PRESET and set(opts) <= _TRAIN_FLAGS:
        argv = [*common, "--preset", str(opts.pop("preset", _TRAIN_PRESET[name]))]
        for k, v in opts.items():
            argv += [f"--{k}", str(v)]
        argv += ["--learning_rate", repr(float(lr)), "--seed", str(seed)]
        if size:
            argv += ["--train_size", str(size)]
        return "train", [*argv, "--output-dir", output_dir, *train_argv]
    argv = [*common, "--methods", run_spec, "--seeds", "1", "--seed", str(seed), "--lr-grid", repr(float(lr))]
    if size:
        argv += ["--train-sizes", str(size)]
    return "compare", [*argv, "--output-dir", output_dir, "--no-analysis", *train_argv]


def _command_line(sub: str, argv: list) -> str:
    return " ".join(["bitfit", sub, *(shlex.quote(str(a)) for a in argv)])


def _write_run_command(run_dir: Path, sub: str, argv: list, out_dir: Path) -> None:
    """command.json of a compare run: run_train's record (arguments, versions) plus the command line
    that reproduces the run, and the compare it belongs to."""
    f = run_dir / "command.json"
    try:
        info = json.loads(f.read_text())
    except (OSError, ValueError):
        info = {}
    info.update(
        subcommand=sub, argv=argv, command=_command_line(sub, argv),
        reproduces="this run" if sub == "train" else "this run alone: one method, learning rate, seed and size",
        compare=str((Path(out_dir) / "command.json").resolve()),
    )
    atomic_write_json(f, info)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (the kernel's high-water mark)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_one(spec: str, lr: float, seed: int, size: Optional[int], model_args, data_args, overrides: dict,
            out_dir: Path, keep_checkpoints: bool = False, overwrite: bool = False, *,
            train_argv: Optional[list] = None, isolated: bool = False) -> dict:
    """Train one (method, lr, seed, train size) through run_train in this process; returns (and stores)
    its record. ``isolated``: this process runs nothing else (the compare worker), so its peak resident
    memory is the run's own; otherwise it is sampled and includes whatever earlier runs left behind.
    ``train_argv``: the compare's TrainingArguments flags (for the run's command.json)."""
    import torch

    from ...analysis import change as analysis
    from ...training import baselines
    from ...fast.timing import DEFINITIONS, busy, load_now
    from ...training.train import run_train

    name, _ = baselines.parse_method(spec)
    run_dir = run_dir_for(out_dir, spec, lr, seed, size)
    rec_file = run_dir / "run.json"
    if rec_file.exists() and not overwrite:
        return json.loads(rec_file.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    load_start = load_now()
    holder: dict = {}
    run_spec, dtype_choice = spec, None
    if baselines.METHODS[name].trains_bitfit and "frozen_dtype" not in baselines.parse_method(spec)[1]:
        # BitFit methods run in the fastest safe precision of this machine, as `bitfit train` does
        from ...fast.hardware import choose_frozen_dtype

        cuda = torch.cuda.is_available() and not overrides.get("use_cpu")
        dtype_choice = choose_frozen_dtype("cuda" if cuda else "cpu")
        run_spec = f"{spec}/frozen_dtype={dtype_choice.dtype}"

    def prepare(model, batches=None):
        mm = analysis.discover(model)
        holder["before"] = analysis.snapshot_biases(model, mm)
        prepared = baselines.prepare(model, run_spec, seed=seed, batches=batches)
        holder.update(inner=model, mm=mm, trainable=baselines.trainable_count(prepared),
                      base=baselines.base_count(prepared))
        rec = analysis.GradRecorder(model, mm)
        holder["rec"] = rec if rec.handles else None
        return prepared

    d_args = dataclasses.replace(data_args, train_size=size) if size else data_args
    m_args = dataclasses.replace(model_args, **baselines.train_options(spec))  # learning-rate / schedule options
    tr = {**overrides, "output_dir": str(run_dir), "learning_rate": lr, "seed": seed}
    sampler = contextlib.nullcontext() if isolated else RssSampler()
    with sampler:
        metrics = run_train(m_args, d_args, tr, prepare=prepare, method=TRAIN_METHOD[name])
    inner, mm = holder["inner"], holder["mm"]
    if name == "rand":
        _save_rand(inner, run_dir)
    primary = _primary(run_dir, metrics)
    hist = _history(metrics, primary)
    steps = max(1, int(metrics.get("global_steps") or 1))
    change = analysis.change_table(mm, holder["before"], analysis.snapshot_biases(inner, mm))
    rec = holder.get("rec")
    grads = None
    if rec is not None:
        rec.remove()
        from ...core.prepare import get_state

        state = get_state(inner)
        grads = rec.table(state.selection.chosen if state else None)
    sub, argv = rerun_command(run_spec, lr, seed, size, model_args, data_args,
                              _override_argv(overrides) if train_argv is None else list(train_argv),
                              str((run_dir / "rerun").resolve()))
    _write_run_command(run_dir, sub, argv, out_dir)
    cuda = torch.cuda.is_available() and not overrides.get("use_cpu")
    rss = _peak_rss_mb() if isolated else sampler.peak / 2**20
    if not keep_checkpoints:
        for ck in run_dir.glob("checkpoint-*"):
            shutil.rmtree(ck, ignore_errors=True)
    load_end = load_now()
    record = {
        "spec": spec, "method": name, "lr": lr, "seed": seed, "train_size": size, "n_train": metrics.get("n_train"),
        "frozen_dtype": (baselines.parse_method(run_spec)[1].get("frozen_dtype") or "float32")
        if baselines.METHODS[name].trains_bitfit else None,
        "frozen_dtype_choice": dtype_choice.to_dict() if dtype_choice is not None else None,
        "primary": primary, "task_metrics": _task_metrics(run_dir),
        "score": metrics.get(f"eval_{primary}"),
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))},
        "trainable": holder["trainable"], "base_params": holder["base"],
        "trainable_pct": 100.0 * holder["trainable"] / max(1, holder["base"]),
        "artifact_bytes": _artifact_bytes(run_dir),
        # time figures: bitfit.fast.timing's definitions, copied from the run's metrics.json
        **{k: metrics.get(k) for k in DEFINITIONS},
        "train_runtime_s": metrics.get("train_runtime"),  # the Trainer's own figure (evaluation included)
        "global_steps": steps, "epochs": overrides.get("num_train_epochs") or metrics.get("epoch"),
        "peak_memory_mb": float(metrics.get("peak_memory_mb", 0.0)) if cuda else rss, "peak_rss_mb": rss,
        "memory_kind": ("cuda max allocated" if cuda else "peak RSS") + (
            " of the run's own process" if isolated else " of the shared process (--in-process)"),
        "isolated": isolated, "pid": os.getpid(),
        "load": {"start": load_start, "end": load_end}, "busy": busy([load_start, load_end]),
        "command": _command_line(sub, argv),
        "train_loss": metrics.get("train_loss"), "history": hist, "change": change, "grad": grads,
    }
    atomic_write_json(rec_file, record)
    holder.clear()
    return record


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


# the worker process: `python -c` rather than `-m` (the package imports every command module first, which
# makes runpy warn); tests swap it for a stub
WORKER_CODE = "import sys; from bitfit.cli.commands.compare_worker import main; sys.exit(main(sys.argv[1:]))"


def run_one_isolated(spec: str, lr: float, seed: int, size: Optional[int], model_args, data_args, overrides: dict,
                     out_dir: Path, keep_checkpoints: bool = False, overwrite: bool = False, *,
                     train_argv: Optional[list] = None) -> dict:
    """:func:`run_one` in a fresh Python process (``python -m bitfit.cli.commands.compare_worker``): its peak
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


# ----------------------------------------------------------------------------- summary
def _mean_std(xs: list) -> tuple:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _load_range(records: list) -> Optional[dict]:
    """The highest 1-minute load average read at the start or end of these runs, with CPUs and threads."""
    reads = [ld for r in records for ld in ((r.get("load") or {}).get("start"), (r.get("load") or {}).get("end"))
             if ld and ld.get("load1") is not None]
    if not reads:
        return None
    top = max(reads, key=lambda ld: ld["load1"])
    return {"max_load1": top["load1"], "cpus": top.get("cpus"), "threads": top.get("threads")}


def summarize(records: list, specs: list) -> list:
    """Per (method, train size): the lr with the best mean dev score over seeds (the paper's selection),
    and that lr's mean ± std of every metric, trainable counts, artifact size, step time, memory."""
    rows = []
    sizes = sorted({r["train_size"] for r in records}, key=lambda s: (s is None, s or 0))
    for spec in specs:
        for size in sizes:
            mine = [r for r in records if r["spec"] == spec and r["train_size"] == size]
            if not mine:
                continue
            by_lr: dict = {}
            for r in mine:
                by_lr.setdefault(r["lr"], []).append(r)
            lr_scores = {lr: _mean_std([r["score"] for r in rs])[0] for lr, rs in by_lr.items()}
            best = max(lr_scores, key=lambda k: (-math.inf if math.isnan(lr_scores[k]) else lr_scores[k]))
            rs = by_lr[best]
            metrics = {}
            for m in rs[0]["task_metrics"] or [rs[0]["primary"]]:
                mean, std = _mean_std([r["eval"].get(f"eval_{m}") for r in rs])
                metrics[m] = {"mean": mean, "std": std}
            score, score_std = _mean_std([r["score"] for r in rs])
            rows.append({
                "method": spec, "train_size": size, "n_train": rs[0].get("n_train"), "best_lr": best,
                "lr_grid": {f"{lr:g}": s for lr, s in sorted(lr_scores.items())},
                "seeds": [r["seed"] for r in rs], "primary": rs[0]["primary"],
                "score": score, "score_std": score_std, "metrics": metrics,
                "trainable": rs[0]["trainable"], "base_params": rs[0]["base_params"],
                "trainable_pct": rs[0]["trainable_pct"], "artifact_bytes": rs[0]["artifact_bytes"],
                **{k: _mean_std([r.get(k) for r in rs])[0] for k in (
                    "step_time_s", "step_cpu_s", "train_time_s", "train_cpu_s", "total_time_s", "total_cpu_s",
                    "train_runtime_s", "peak_memory_mb")},
                "memory_kind": rs[0].get("memory_kind"), "epochs": rs[0].get("epochs"),
                "busy": any(r.get("busy") for r in rs), "load": _load_range(rs),
            })
    return rows


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def _pct(x: float) -> str:
    return f"{x:.3f}%" if x < 1 else f"{x:.1f}%"


def _ms(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{1000 * x:.0f} ms" if x >= 0.0095 else f"{1000 * x:.1f} ms"


BUSY_MARK = "¹"


def markdown_table(rows: list, task: str) -> str:
    from ...fast.timing import BUSY_MARGIN

    if not rows:
        return "(no runs)\n"
    names = list(rows[0]["metrics"])
    head = " / ".join(names)
    lines = [
        f"| method | train rows | {task} {head} (dev, ×100, mean ± std) | seeds | best lr | trainable | % of model "
        "| artifact | step time (wall) | step time (CPU) | peak memory |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        score = " / ".join(
            f"{100 * r['metrics'][m]['mean']:.1f} ± {100 * r['metrics'][m]['std']:.1f}" for m in names
            if m in r["metrics"])
        mark = BUSY_MARK if r.get("busy") else ""
        lines.append(
            f"| {r['method']} | {r['n_train'] if r['n_train'] is not None else ''} | {score} | {len(r['seeds'])} "
            f"| {r['best_lr']:g} | {r['trainable']:,} | {_pct(r['trainable_pct'])} | {_fmt_bytes(r['artifact_bytes'])} "
            f"| {_ms(r.get('step_time_s'))}{mark} | {_ms(r.get('step_cpu_s'))}{mark} "
            f"| {r['peak_memory_mb']:.0f} MB |")
    kinds = sorted({r.get("memory_kind") or "" for r in rows} - {""})
    lines += ["", "Score: dev-set metric of the best epoch, at the learning rate with the best mean over seeds; "
                  "std over seeds. Step time: training time without evaluation and checkpointing, divided by "
                  "optimizer steps, in wall-clock time and in CPU time of the run's process (all threads); the "
                  "same figures as metrics.json's step_time_s / step_cpu_s. Peak memory: the "
                  + (" / ".join(kinds) or "peak memory") + "."]
    busy = [r for r in rows if r.get("busy")]
    if busy:
        top = max(busy, key=lambda r: (r.get("load") or {}).get("max_load1") or 0.0)
        ld = top.get("load") or {}
        lines += ["", f"{BUSY_MARK} Measured while the machine was busy: the 1-minute load average reached "
                      f"{ld.get('max_load1', float('nan')):.1f} on {ld.get('cpus')} CPUs, above the run's "
                      f"{ld.get('threads')} thread(s) + {BUSY_MARGIN:g}; other work shared the cores, so these wall "
                      "times are slower than on a quiet machine and not comparable across rows (CPU times are "
                      "less affected)."]
    return "\n".join(lines) + "\n"


def _main_size(rows: list):
    """The training-set size the table's headline, bar chart and heatmaps use: full data, else the largest."""
    sizes = {r["train_size"] for r in rows}
    return None if None in sizes or not sizes else max(sizes)


def make_plots(records: list, rows: list, specs: list, out: Path, task: str) -> dict:
    from ...analysis import plots

    files = {}
    main = _main_size(rows)
    bar = [r for r in rows if r["train_size"] == main]
    if bar:
        primary = bar[0]["primary"]
        files["bar"] = plots.bar_chart(
            [r["method"] for r in bar], [100 * r["score"] for r in bar], [100 * r["score_std"] for r in bar],
            str(out / "scores.png"), ylabel=f"{primary} ×100 (dev)", title=f"{task}: best dev score per method",
            annotations=[_pct(r["trainable_pct"]) for r in bar])
        curves = {}
        for r in bar:
            runs = [x for x in records if x["spec"] == r["method"] and x["lr"] == r["best_lr"]
                    and x["train_size"] == r["train_size"]]
            by_ep: dict = {}
            for x in runs:
                for ep, v in x["history"]:
                    by_ep.setdefault(ep, []).append(100 * v)
            curves[f"{r['method']} (lr {r['best_lr']:g})"] = [(ep, *_mean_std(v)) for ep, v in sorted(by_ep.items())]
        if any(curves.values()):
            files["curves"] = plots.learning_curves(curves, str(out / "curves.png"), ylabel=f"{primary} ×100 (dev)",
                                                    title=f"{task}: dev score per epoch")
    sized = [r for r in rows if r["train_size"] is not None]
    if len({r["train_size"] for r in sized}) > 1:
        curves = {}
        for spec in specs:
            pts = [(r["n_train"] or r["train_size"], 100 * r["score"], 100 * r["score_std"])
                   for r in sized if r["method"] == spec]
            if pts:
                curves[spec] = pts
        files["sizes"] = plots.size_curve(curves, str(out / "sizes.png"), ylabel=f"{sized[0]['primary']} ×100 (dev)",
                                          title=f"{task}: score against training-set size")
    return files


def _average_rows(tables: list) -> list:
    acc: dict = {}
    for t in tables:
        for r in t or []:
            k = (r["role"], str(r["layer"]))
            a = acc.setdefault(k, {**r, "layer": str(r["layer"]), "value": 0.0, "_n": 0})
            a["value"] += r["value"]
            a["_n"] += 1
    out = []
    for a in acc.values():
        a["value"] /= a.pop("_n")
        out.append(a)
    return out


def write_analyses(records: list, rows: list, out: Path, model_name: str) -> dict:
    """Bias-change heatmap/CSV/ranking per method whose biases moved (mean over seeds at the best lr)."""
    from ...analysis import change as analysis

    mm = None
    done = {}
    main = _main_size(rows)
    for r in rows:
        if r["train_size"] != main:
            continue
        runs = [x for x in records if x["spec"] == r["method"] and x["lr"] == r["best_lr"]
                and x["train_size"] == r["train_size"]]
        change = _average_rows([x["change"] for x in runs])
        if not change or max(c["value"] for c in change) == 0.0:
            continue
        grads = _average_rows([x["grad"] for x in runs if x.get("grad")]) or None
        if mm is None:
            from ...core.models import load_model

            mm = analysis.discover(load_model(model_name, task="base"))
        sub = out / "analysis" / slug(r["method"])
        res = analysis.write_report(sub, change, grads, mm, title=f" ({r['method']})")
        done[r["method"]] = res["files"]
    return done


# ----------------------------------------------------------------------------- compare
def _data_label(path: Optional[str]) -> str:
    p = Path(path or "data")
    return p.parent.name if p.stem.lower() in ("train", "data") and p.parent.name else p.stem


def write_compare_command(out: Path, argv: list, isolated: bool) -> None:
    """The compare folder's command.json: the compare's own command line (rerunning it resumes)."""
    from ...training.train import library_versions

    atomic_write_json(Path(out) / "command.json", {
        "argv": list(argv), "command": _command_line("compare", list(argv)), "cwd": os.getcwd(),
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


def _split_training_flags(rest: list) -> dict:
    """TrainingArguments flags the user gave explicitly, as a dict of overrides."""
    from transformers import HfArgumentParser, TrainingArguments

    from ...training.train import flag_given

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
    _env()
    from ...training.baselines import METHODS, parse_method, train_options
    from ...training.train import DataArguments, ModelArguments

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


# ----------------------------------------------------------------------------- analyze
def _glue_batches(model_name: str, task: str, data_dir: Optional[str], n_batches: int, batch_size: int,
                  max_len: int = 128):
    from transformers import DataCollatorWithPadding

    from ...core.models import load_tokenizer
    from ...training.train import DataArguments, encode, load_splits

    tok = load_tokenizer(model_name)
    info, splits = load_splits(DataArguments(task=task, data_dir=data_dir), ("train",))
    data = splits["train"][0].select(range(min(len(splits["train"][0]), n_batches * batch_size)))
    ds = encode(tok, data, max_len)
    coll = DataCollatorWithPadding(tok)
    return [coll([ds[i] for i in range(s, min(len(ds), s + batch_size))]) for s in range(0, len(ds), batch_size)]


def analyze_artifact(path: Path, out: Path, base: Optional[str], task: Optional[str], data_dir: Optional[str],
                     n_batches: int, batch_size: int) -> dict:
    from ...analysis import change as analysis

    rows, mm, meta = analysis.artifact_change_table(path)
    grads = None
    rec_file = path / "run.json"
    if rec_file.exists():
        grads = json.loads(rec_file.read_text()).get("grad")
    if grads is None and task:
        import bitfit

        from ...training.train import DataArguments, ModelArguments, load_base, task_info

        base_name = base or meta["base_model"].get("name")
        if not base_name:
            raise BitFitError(f"{path}: the artifact does not record its base model; pass --base")
        info = task_info(DataArguments(task=task, data_dir=data_dir))
        model, _ = load_base(ModelArguments(model=base_name), info)
        model = bitfit.load(model, path)
        means = analysis.measure_gradients(model, _glue_batches(base_name, task, data_dir, n_batches, batch_size))
        grads = analysis.grad_table(bitfit.get_state(model).model_map, means)
    return analysis.write_report(out, rows, grads, mm)


def analyze_checkpoint(path: Path, out: Path, base: str, task: Optional[str], data_dir: Optional[str],
                       n_batches: int, batch_size: int) -> dict:
    """A plainly saved model (e.g. full fine-tuning) against its base: change of every bias."""
    from ...analysis import change as analysis
    from ...core.models import load_model

    trained = load_model(str(path), task="classification")
    base_model = load_model(base, task="classification", num_labels=trained.config.num_labels)
    mm = analysis.discover(trained)
    rows = analysis.change_table(mm, analysis.snapshot_biases(base_model, mm), analysis.snapshot_biases(trained, mm))
    grads = None
    if task:
        means = analysis.measure_gradients(trained, _glue_batches(str(path), task, data_dir, n_batches, batch_size))
        grads = analysis.grad_table(mm, means)
    return analysis.write_report(out, rows, grads, mm)


@command("analyze", "which biases moved in a run: change per role and layer (heatmap, CSV) and gradient ranking")
def analyze_main(argv: list) -> int:
    _env()
    from ...analysis import change as analysis

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
    if not root.is_dir():
        raise BitFitError(f"{root} is not a folder; give the output folder of `bitfit train` or `bitfit compare`")
    out_root = Path(args.output_dir) if args.output_dir else root / "analysis"
    arts = [a for a in analysis.find_artifacts(root) if out_root not in a.parents]
    results = {}
    if arts:
        for a in arts:
            out = out_root if len(arts) == 1 else out_root / a.relative_to(root)
            results[str(a)] = analyze_artifact(a, out, args.base, args.task, args.data_dir, args.batches,
                                               args.batch_size)
    elif (root / "config.json").exists() and any((root / n).exists() for n in ("model.safetensors",
                                                                                "pytorch_model.bin")):
        if not args.base:
            raise BitFitError(f"{root} holds a full model; pass --base MODEL (the model it was fine-tuned from)")
        results[str(root)] = analyze_checkpoint(root, out_root, args.base, args.task, args.data_dir, args.batches,
                                                args.batch_size)
    elif (root / "adapter_config.json").exists():
        raise BitFitError(f"{root} is a peft adapter run: its biases did not train, there is no bias change to show")
    else:
        raise BitFitError(f"no BitFit artifact (bitfit_config.json) under {root}, and no saved model; "
                          "give the output folder of `bitfit train` or `bitfit compare`")
    for where, res in results.items():
        print(f"## {where}\n")
        print(analysis.ranking_markdown(res))
        print("files: " + ", ".join(res["files"].values()) + "\n")
    return 0
