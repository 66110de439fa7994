"""The run folder (--output-dir) of `bitfit train`: what a finished run is (FINISHED_RUN_FILES), refusing,
clearing or resuming such a folder before a run, and what the run writes there: the trained model, strict
JSON (metrics.json, task.json, command.json), the Hugging Face model card; and reading its task.json back."""

import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core.io import atomic_write_json as _atomic_write_json
from ..errors import BitFitError
from .arguments import DataArguments, ModelArguments
from .tasks import TaskInfo, positive_label


def json_safe(obj):
    """``obj`` with every non-finite float (NaN, inf; Python, numpy or 0-d tensor) replaced by None, so
    that ``json.dumps`` writes strict JSON (no bare NaN/Infinity). Dicts, lists and tuples are copied."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1 and obj.is_floating_point():
        obj = obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def atomic_write_json(path, obj):
    """bitfit.core.io.atomic_write_json, strict: non-finite floats are written as null (see json_safe)."""
    return _atomic_write_json(path, json_safe(obj))


def library_versions() -> dict:
    import transformers

    import bitfit

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "bitfit": bitfit.__version__, "platform": platform.platform()}
    for mod in ("datasets", "accelerate", "peft"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def peak_memory_mb() -> float:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def save_trained(model, output_dir: str, info: Optional[TaskInfo] = None, base_name: Optional[str] = None) -> str:
    """Write the trained model to ``output_dir``: bitfit.save for BitFit models, else save_pretrained."""
    from ..core.prepare import get_state, unwrap

    model = unwrap(model)
    from ..methods import dynamic

    if dynamic.has_dynamic(model):  # input-dependent shifts: no BitFit artifact (bitfit.methods.dynamic)
        dynamic.save(model, output_dir)
        return "dynamic"
    if get_state(model) is not None:
        import bitfit

        bitfit.save(model, output_dir, label_names=(info.label_names or None) if info else None,
                    base_name=base_name)
        return "bitfit"
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(output_dir)
        return "save_pretrained"
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                os.path.join(output_dir, "model.safetensors"))
    return "state_dict"


def save_run_artifact(model, output_dir, task_record: dict, info: Optional[TaskInfo] = None,
                      base_name: Optional[str] = None, main: bool = True, save=None) -> Optional[str]:
    """Write a run's task.json, then its trained model, to ``output_dir``; returns how the model was saved
    (see save_trained), or None on a rank that writes nothing. ``main``: this is the process that writes the
    run folder (rank 0). A sharded model (FSDP2: DTensor parameters) is saved from every rank: bitfit.save
    gathers its trained tensors with collectives that all ranks must enter, and rank 0 alone writes; the
    other ranks wait for task.json (an error writing it is raised on every rank). Unsharded, only ``main``
    writes. task.json goes first: a run killed right after its artifact is written can still be evaluated.
    ``save``: the function that writes the model (default save_trained)."""
    from ..core.prepare import unwrap
    from ..core.sharded import has_sharded, on_rank0

    model = unwrap(model)
    sharded = has_sharded(model)
    if not (main or sharded):
        return None
    out = Path(output_dir)

    def first():
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "task.json", task_record)

    on_rank0(first, "writing task.json") if sharded else first()
    saved_as = (save or save_trained)(model, str(out), info, base_name)
    return saved_as if main else None


FINISHED_RUN_FILES = ("metrics.json", "bitfit_config.json")  # present = the folder holds a finished run
RUN_FILES = ("metrics.json", "log_history.json", "task.json", "command.json", "bitfit_config.json",
             "bitfit_model.safetensors")


def check_output_dir(output_dir: str, overwrite: bool = False, resume=None) -> None:
    """Refuse an --output-dir that holds a finished run (unless ``overwrite`` or ``resume``), that is a file,
    or that cannot be written; nothing is left behind by the check. In a multi-process run only the main
    process (RANK 0, which alone writes there) checks: the ranks would race to create the folder."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return
    p = Path(os.path.expanduser(str(output_dir)))
    if p.exists() and not p.is_dir():
        raise BitFitError(f"--output-dir {output_dir} is a file, not a folder; choose another --output-dir")
    finished = [f for f in FINISHED_RUN_FILES if (p / f).exists()]
    if finished and not overwrite and not resume:
        raise BitFitError(f"--output-dir {output_dir} holds a finished run ({', '.join(finished)}); pass "
                          "--overwrite_output_dir to replace it, --resume_from_checkpoint to continue it, or choose "
                          "another --output-dir")
    ckpts = _checkpoint_dirs(p)
    if ckpts and not overwrite and not resume:
        raise BitFitError(f"--output-dir {output_dir} holds the checkpoints of an unfinished run "
                          f"({', '.join(c.name for c in ckpts[:3])}{' ...' if len(ckpts) > 3 else ''}); pass "
                          "--resume_from_checkpoint last to continue it, --overwrite_output_dir to start over (they "
                          "are removed), or choose another --output-dir")
    missing, q = [], p
    while not q.exists() and q != q.parent:
        missing.append(q)
        q = q.parent
    created = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:  # another process made it meanwhile: not ours to remove
                if not d.is_dir():
                    raise
                continue
            created.append(d)
        fd, tmp = tempfile.mkstemp(dir=p, prefix=".bitfit-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise BitFitError(f"--output-dir {output_dir} cannot be written ({exc.strerror or exc}); choose a folder "
                          "you can write to") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def _checkpoint_dirs(p: Path) -> list:
    import re

    if not p.is_dir():
        return []
    found = [c for c in p.iterdir() if c.is_dir() and re.fullmatch(r"checkpoint-\d+", c.name)]
    return sorted(found, key=lambda c: int(c.name.split("-")[1]))


def clear_finished_run(output_dir: str) -> list:
    """--overwrite_output_dir: remove the previous run's files and checkpoints from ``output_dir`` (its
    checkpoint numbers would otherwise mix with the new run's in rotation and --resume_from_checkpoint
    last). Other files are left alone. Returns the removed names."""
    import shutil

    p = Path(os.path.expanduser(str(output_dir)))
    if not any((p / f).exists() for f in FINISHED_RUN_FILES) and not _checkpoint_dirs(p):
        return []
    removed, ckpts = [], _checkpoint_dirs(p)
    for child in sorted(p.iterdir()):
        if child.name in RUN_FILES and child.is_file():
            child.unlink()
            removed.append(child.name)
        elif child in ckpts:
            shutil.rmtree(child)
            removed.append(child.name)
    return removed


def resolve_resume(resume, output_dir: str) -> Optional[str]:
    """The checkpoint folder --resume_from_checkpoint means: 'last'/'true' = the last complete checkpoint-*
    in ``output_dir`` (one cut off while being written is skipped), else the folder given, which must be a
    complete checkpoint."""
    from .guard import is_complete_checkpoint, last_complete_checkpoint

    if resume is None or resume is False or (isinstance(resume, str) and resume.lower() in ("", "false", "none")):
        return None
    if resume is True or (isinstance(resume, str) and resume.lower() in ("true", "last")):
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise BitFitError(f"--resume_from_checkpoint {resume}: no complete checkpoint-* folder (with "
                              f"trainer_state.json and model weights) in {output_dir}")
        return found
    if not os.path.isdir(resume):
        raise BitFitError(f"--resume_from_checkpoint: {resume} is not a checkpoint folder")
    if not is_complete_checkpoint(resume):
        raise BitFitError(f"--resume_from_checkpoint: {resume} is not a complete checkpoint (it needs "
                          "trainer_state.json and model weights; it may have been cut off while being written); "
                          "use --resume_from_checkpoint last to pick the last complete one")
    return str(resume)


def abs_local(path: Optional[str]) -> Optional[str]:
    """``path`` made absolute when it names a local file or folder (aliases and Hub names stay as given)."""
    if not path:
        return path
    p = Path(os.path.expanduser(str(path)))
    return str(p.resolve()) if p.exists() else str(path)


def run_record(model_args: ModelArguments, data_args: DataArguments, info: TaskInfo) -> dict:
    """What task.json records beyond the TaskInfo so that eval/predict/generate and bitfit.load work from the
    run folder alone, in a new shell: the base model (an absolute path when local), the GGUF file, and the
    resolved absolute data location (the GLUE folder, also when it came from $BITFIT_GLUE_DIR; the user's own
    train/validation/test files)."""
    data_dir = data_args.data_dir or (os.environ.get("BITFIT_GLUE_DIR") if info.kind == "glue" else None)
    return {"base_model": abs_local(model_args.model), "gguf_file": model_args.gguf_file,
            "data_dir": os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None,
            "train_file": abs_local(data_args.train_file), "validation_file": abs_local(data_args.validation_file),
            "test_file": abs_local(data_args.test_file)}


def write_model_card(out: Path, info: TaskInfo, model_args: ModelArguments, data_args: DataArguments, metrics: dict,
                     method: str = "bitfit") -> Path:
    """A Hugging Face model card (README.md with Hub metadata in YAML front matter) with the run's scores."""
    base = model_args.model or "unknown"
    base_meta = base if not Path(os.path.expanduser(base)).exists() else Path(base).name
    if info.kind == "glue":
        dataset, name = "nyu-mll/glue", f"GLUE {info.task.upper()}"
    elif info.kind == "instruct":
        dataset, name = None, "instruction data"
    else:
        dataset, name = None, "own data"
    scores = {k[5:]: v for k, v in metrics.items() if k.startswith("eval_") and isinstance(v, (int, float))
              and not isinstance(v, bool) and not k.endswith(("_runtime", "_samples_per_second", "_steps_per_second"))
              and k != "eval_epoch"}
    metric_names = [m for m in (info.metrics or [info.primary]) if m != "loss"] or [info.primary]
    lines = ["---", "library_name: bitfit", f"base_model: {json.dumps(base_meta)}", "tags:", "- bitfit", "- peft"]
    if info.kind == "instruct":
        lines += ["- text-generation"]
    else:
        lines += ["- text-classification"]
    if dataset:
        lines += ["datasets:", f"- {dataset}"]
    lines += ["metrics:"] + [f"- {m}" for m in metric_names] + ["---", ""]
    lines += [f"# BitFit: {base_meta} on {name}", "",
              f"Bias-only fine-tuning (BitFit, Ben Zaken et al. 2022) of `{base_meta}` on {name}, trained with "
              f"`bitfit train` ({method}). Only the bias terms{' and the task head' if info.kind != 'instruct' else ''} "
              f"trained: {metrics.get('trainable_params', '?')} of {metrics.get('total_params', '?')} parameters.", "",
              "## Scores (dev)", ""]
    if scores:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in sorted(scores.items())]
    else:
        lines += ["No validation data was given; no scores."]
    if info.kind == "files" and not info.regression and len(info.label_names) == 2:
        lines += ["", f"Binary F1 is for the positive label `{positive_label(info)}`."]
    import shlex

    where = shlex.quote(str(out))  # the run folder as given (--output-dir): where the commands find it
    lines += ["", "## Use", "", "```bash", f"bitfit eval --adapter {where}" if info.kind != "instruct" else
              f"bitfit generate --adapter {where} --prompt \"...\"", f"bitfit merge {where} --output merged",
              "```", "", "```python", "import bitfit", f"model = bitfit.load({base!r}, {str(out)!r})", "```", ""]
    path = out / "README.md"
    tmp = out / "README.md.tmp"
    tmp.write_text("\n".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return path


def command_record(argv: Optional[list], model_args: ModelArguments, data_args: DataArguments, training_args,
                   method: str, dtype_choice=None, wall: float = 0.0) -> dict:
    """What command.json records: the command line (when the run came from one), every argument, the library
    versions, the frozen-dtype choice and when the run started (``wall`` seconds before now)."""
    import shlex

    return {
        "argv": list(argv) if argv is not None else None,
        "command": ("bitfit train " + " ".join(shlex.quote(str(a)) for a in argv)) if argv is not None else None,
        "model_args": dataclasses.asdict(model_args), "data_args": dataclasses.asdict(data_args),
        "training_args": training_args.to_dict(), "method": method, "versions": library_versions(),
        "frozen_dtype_choice": dtype_choice.to_dict() if dtype_choice is not None else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - wall)),
    }


def load_run(adapter: str) -> tuple[dict, Optional[TaskInfo]]:
    """(the record in a run folder's task.json, its TaskInfo); ({}, None) for a folder without task.json."""
    p = Path(os.path.expanduser(adapter))
    if not p.is_dir():
        raise BitFitError(f"--adapter {adapter}: no such folder (give the output folder of `bitfit train`)")
    meta: dict = {}
    path = p / "task.json"
    if path.exists():
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError(f"it holds a {type(meta).__name__}, not an object")
            info = TaskInfo.from_dict(meta)
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise BitFitError(f"{path} is damaged ({type(exc).__name__}: {exc}); it records the run's task: "
                              "restore it, or re-run `bitfit train`") from None
        return meta, info
    return meta, None
