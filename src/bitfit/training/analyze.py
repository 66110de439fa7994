"""Which biases moved in a finished run, the library side of `bitfit analyze`: the change of every bias per
role and layer (heatmap PNG, CSV) and roles/layers ranked by change and by gradient magnitude, for a
BitFit artifact or a plainly saved fine-tuned model against its base. Gradient magnitudes come from the
run's run.json when it recorded them, else are measured on a few training batches of a GLUE task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import BitFitError


def _glue_batches(model_name: str, task: str, data_dir: Optional[str], n_batches: int, batch_size: int,
                  max_len: int = 128):
    """The first ``n_batches`` padded batches of a GLUE task's training split, tokenized for ``model_name``."""
    from transformers import DataCollatorWithPadding

    from ..core.models import load_tokenizer
    from .arguments import DataArguments
    from .tasks import encode, load_splits

    tok = load_tokenizer(model_name)
    info, splits = load_splits(DataArguments(task=task, data_dir=data_dir), ("train",))
    data = splits["train"][0].select(range(min(len(splits["train"][0]), n_batches * batch_size)))
    ds = encode(tok, data, max_len)
    coll = DataCollatorWithPadding(tok)
    return [coll([ds[i] for i in range(s, min(len(ds), s + batch_size))]) for s in range(0, len(ds), batch_size)]


def analyze_artifact(path: Path, out: Path, base: Optional[str], task: Optional[str], data_dir: Optional[str],
                     n_batches: int, batch_size: int) -> dict:
    """A BitFit artifact folder: its biases' change from the base (stored in the artifact) and gradients."""
    from ..analysis import change as analysis

    rows, mm, meta = analysis.artifact_change_table(path, base=base)
    grads = None
    rec_file = path / "run.json"
    if rec_file.exists():
        grads = json.loads(rec_file.read_text()).get("grad")
    if grads is None and task:
        from ..artifacts import load
        from ..core.prepare import get_state
        from .arguments import DataArguments, ModelArguments
        from .base import load_base
        from .tasks import task_info

        base_name = base or meta["base_model"].get("name")
        if not base_name:
            raise BitFitError(f"{path}: the artifact does not record its base model; pass --base")
        info = task_info(DataArguments(task=task, data_dir=data_dir))
        model, _ = load_base(ModelArguments(model=base_name), info)
        model = load(model, path)
        means = analysis.measure_gradients(model, _glue_batches(base_name, task, data_dir, n_batches, batch_size))
        grads = analysis.grad_table(get_state(model).model_map, means)
    return analysis.write_report(out, rows, grads, mm)


def analyze_checkpoint(path: Path, out: Path, base: str, task: Optional[str], data_dir: Optional[str],
                       n_batches: int, batch_size: int) -> dict:
    """A plainly saved model (e.g. full fine-tuning) against its base: change of every bias."""
    from ..analysis import change as analysis
    from ..core.models import load_model

    trained = load_model(str(path), task="classification")
    base_model = load_model(base, task="classification", num_labels=trained.config.num_labels)
    mm = analysis.discover(trained)
    rows = analysis.change_table(mm, analysis.snapshot_biases(base_model, mm), analysis.snapshot_biases(trained, mm))
    grads = None
    if task:
        means = analysis.measure_gradients(trained, _glue_batches(str(path), task, data_dir, n_batches, batch_size))
        grads = analysis.grad_table(mm, means)
    return analysis.write_report(out, rows, grads, mm)



def analyze_folder(root: Path, out_root: Path, base: Optional[str], task: Optional[str], data_dir: Optional[str],
                   n_batches: int, batch_size: int) -> dict:
    """Every BitFit artifact under ``root`` (a `bitfit train` or `bitfit compare` output folder), or the plainly
    saved model ``root`` against ``base``: {analyzed folder: report}. With several artifacts each report goes
    to its own folder under ``out_root``; a folder to analyze that lies inside ``out_root`` is skipped."""
    from ..analysis import change as analysis

    root, out_root = Path(root), Path(out_root)
    if not root.is_dir():
        raise BitFitError(f"{root} is not a folder; give the output folder of `bitfit train` or `bitfit compare`")
    arts = [a for a in analysis.find_artifacts(root) if out_root not in a.parents]
    results = {}
    if arts:
        for a in arts:
            out = out_root if len(arts) == 1 else out_root / a.relative_to(root)
            results[str(a)] = analyze_artifact(a, out, base, task, data_dir, n_batches, batch_size)
    elif (root / "config.json").exists() and any((root / n).exists() for n in ("model.safetensors",
                                                                                "pytorch_model.bin")):
        if not base:
            raise BitFitError(f"{root} holds a full model; pass --base MODEL (the model it was fine-tuned from)")
        results[str(root)] = analyze_checkpoint(root, out_root, base, task, data_dir, n_batches, batch_size)
    elif (root / "adapter_config.json").exists():
        raise BitFitError(f"{root} is a peft adapter run: its biases did not train, there is no bias change to show")
    else:
        raise BitFitError(f"no BitFit artifact (bitfit_config.json) under {root}, and no saved model; "
                          "give the output folder of `bitfit train` or `bitfit compare`")
    return results
