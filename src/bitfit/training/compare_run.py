"""One run of `bitfit compare`: a method at one learning rate, seed and training-set size, trained through
:func:`bitfit.training.run.run_train` and stored as the run's folder (run.json, command.json).

Owns where a run's folder lies (:func:`run_dir_for`), training one run and recording its figures
(:func:`run_one`: score, per-epoch history, trainable counts, artifact size, the step and CPU times of
:mod:`bitfit.fast.timing`, peak memory, bias change and gradients), and the command line that reproduces
a run on its own (:func:`rerun_command`). The grid of runs and the worker processes are
:mod:`bitfit.training.compare`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import threading
from pathlib import Path
from typing import Optional

from ..core.io import atomic_write_json

# which of run_train's method defaults (weight decay, epochs, head learning rate) each method uses
TRAIN_METHOD = {
    "bitfit": "bitfit", "paper-subset": "bitfit", "frozen": "frozen", "full": "full", "lora": "lora",
    "beft": "lora", "ln_tuning": "lora", "ia3": "lora", "rand": "rand", "bitfit+last-N": "bitfit",
    "bitfit+lora": "lora", "bitfit-peft": "bitfit", "bitfit-1d": "bitfit", "bitfit-halving": "bitfit",
    "bitfit-rolelr": "bitfit", "bitfit-sparse": "bitfit", "bitfit-dynamic": "bitfit",
}
ARTIFACT_FILES = ("bitfit_model.safetensors", "bitfit_config.json", "adapter_model.safetensors",
                  "adapter_config.json", "model.safetensors", "config.json", "rand_delta.safetensors", "dynamic_bias.safetensors")


def slug(spec: str) -> str:
    """A method spec as a folder name (``lora/r=4`` -> ``lora__r=4``)."""
    return re.sub(r"[^A-Za-z0-9.+=_-]+", "_", spec.replace("/", "__"))


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

    from .baselines import RandDelta

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
    from .baselines import parse_method, train_options

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


def command_line(sub: str, argv: list) -> str:
    """``bitfit SUB ARGV...`` as one shell-quoted line."""
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
        subcommand=sub, argv=argv, command=command_line(sub, argv),
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

    from ..analysis import change as analysis
    from . import baselines
    from ..fast.timing import DEFINITIONS, busy, load_now
    from .run import run_train

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
        from ..fast.hardware import choose_frozen_dtype

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
        from ..core.prepare import get_state

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
        "command": command_line(sub, argv),
        "train_loss": metrics.get("train_loss"), "history": hist, "change": change, "grad": grads,
    }
    atomic_write_json(rec_file, record)
    holder.clear()
    return record

