"""Resuming a run from a checkpoint: what a BitFit checkpoint records about the run that wrote it
(``bitfit_checkpoint.json``: the base's fingerprint, the preset, the labels, the trained tensors) and the
check that refuses to resume it on another base, another preset or another label set, before the
Trainer loads anything; and the lock that keeps two runs out of one run folder.

Optimizer and schedule options given to the resuming command (``--learning_rate``, ``--head_learning_rate``,
``--weight_decay``, the warmup and scheduler options, ...) apply from the resumed step on: the checkpoint
supplies the optimizer's moment estimates and the step count, the command the rates (see
``BitFitTrainer._load_optimizer_and_scheduler``)."""

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

from ..errors import BitFitError

CHECKPOINT_RECORD = "bitfit_checkpoint.json"


def checkpoint_record(model, model_args, info, base_name: Optional[str]) -> Optional[dict]:
    """What each checkpoint of this run records (None for a model without BitFit state: full fine-tuning)."""
    from ..artifacts import fingerprint
    from ..core.prepare import bitfit_model

    target = bitfit_model(model)
    if target is None:
        return None
    return {
        "base_model": base_name,
        "base_fingerprint": fingerprint(target),
        "preset": getattr(model_args, "preset", None),
        "label_names": list(info.label_names or []) if info is not None else [],
        "regression": bool(getattr(info, "regression", False)),
        "trained": {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
    }


def _trained_in(ckpt: Path) -> Optional[dict]:
    """{name: shape} of the tensors a checkpoint's model.safetensors holds (None if it has none)."""
    from safetensors import safe_open

    f = ckpt / "model.safetensors"
    if not f.is_file():
        return None
    try:
        with safe_open(str(f), framework="pt") as st:
            return {k: list(st.get_slice(k).get_shape()) for k in st.keys()}
    except Exception:  # noqa: BLE001 - a damaged file: the Trainer's own load says what is wrong
        return None


def check_resume(ckpt: str, record: Optional[dict], model_flag: Optional[str] = None) -> None:
    """Refuse to resume checkpoint ``ckpt`` into a run whose ``record`` (:func:`checkpoint_record`) differs:
    another base (fingerprint), another preset or other trained tensors, another label set. A clear
    :class:`BitFitError` names both sides and the fix. Checkpoints of older versions (no record) are
    checked by their trained tensors only."""
    if record is None:
        return
    path = Path(ckpt)
    saved: dict = {}
    try:
        saved = json.loads((path / CHECKPOINT_RECORD).read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            saved = {}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise BitFitError(f"--resume_from_checkpoint {ckpt}: {CHECKPOINT_RECORD} is damaged ({exc}); resume from "
                          "another checkpoint or start over") from None
    fix = "resume with the options the checkpoint was trained with, or start a new run (another --output-dir)"
    want, got = saved.get("base_fingerprint"), record.get("base_fingerprint")
    if want and got and want != got:
        raise BitFitError(
            f"--resume_from_checkpoint {ckpt}: the checkpoint was trained on base model {saved.get('base_model')!r} "
            f"(fingerprint {want}) but --model {model_flag or record.get('base_model')!r} has other weights "
            f"(fingerprint {got}); resume with --model {saved.get('base_model')!r}, or start a new run "
            "(another --output-dir)")
    if saved and (saved.get("label_names") or []) != record["label_names"]:
        raise BitFitError(
            f"--resume_from_checkpoint {ckpt}: the checkpoint was trained for the labels "
            f"{saved.get('label_names') or '(regression)'} but this run's data has the labels "
            f"{record['label_names'] or '(regression)'}; {fix}")
    trained = _trained_in(path)
    if trained is None:
        return
    mine = {n: list(s) for n, s in record["trained"].items()}
    if trained != mine:
        missing = sorted(set(mine) - set(trained))
        extra = sorted(set(trained) - set(mine))
        shaped = sorted(n for n in set(mine) & set(trained) if mine[n] != trained[n])
        parts = []
        if saved.get("preset") and saved.get("preset") != record.get("preset"):
            parts.append(f"it was trained with --preset {saved['preset']}, this run has --preset {record['preset']}")
        if missing or extra:
            parts.append(f"this run trains {len(mine)} tensors, the checkpoint holds {len(trained)}"
                         + (f" (not in the checkpoint: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})"
                            if missing else "")
                         + (f" (not trained here: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})"
                            if extra else ""))
        if shaped:
            n = shaped[0]
            parts.append(f"{n} has shape {tuple(trained[n])} in the checkpoint, {tuple(mine[n])} here "
                         "(another label set or another model)")
        raise BitFitError(f"--resume_from_checkpoint {ckpt} does not fit this run: {'; '.join(parts)}; {fix}")


def write_checkpoint_record(folder: str, record: Optional[dict]) -> None:
    if record is None:
        return
    from ..core.io import atomic_write_json

    atomic_write_json(Path(folder) / CHECKPOINT_RECORD, record)


@contextlib.contextmanager
def run_folder_lock(output_dir: Optional[str]):
    """Hold the run folder ``output_dir`` for the whole run (bitfit.artifacts.store.hold_folder): a second run
    into it fails at once, naming the process that holds it. Only the main process (RANK 0, which alone
    writes there) takes it. Folders it had to create are removed again if the run leaves them empty (when
    two runs race for a new folder, the one that created it may be the refused one: the folder then stays,
    empty)."""
    from ..artifacts.store import FolderBusyError, hold_folder

    if not output_dir or int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    p = Path(os.path.abspath(os.path.expanduser(str(output_dir))))
    if os.path.lexists(p) and not p.is_dir():
        yield  # a file: check_output_dir says so
        return
    created, q = [], p
    while not q.exists() and q != q.parent:
        created.append(q)
        q = q.parent
    try:
        ctx = hold_folder(p, "bitfit train run")
        ctx.__enter__()
    except FolderBusyError as exc:
        raise BitFitError(f"--output-dir {output_dir}: {exc} (two runs into one folder would overwrite each "
                          "other's results)") from None
    except OSError as exc:
        for d in created:
            with contextlib.suppress(OSError):
                d.rmdir()
        raise BitFitError(f"--output-dir {output_dir} cannot be written ({exc.strerror or exc}); choose a folder "
                          "you can write to") from None
    try:
        yield
    finally:
        ctx.__exit__(None, None, None)
        for d in created:  # innermost first; only empty ones go
            with contextlib.suppress(OSError):
                d.rmdir()
