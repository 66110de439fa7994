"""Export one BitFit task as a self-contained model: TorchScript or ONNX, no bitfit needed to run it.

The task is merged into its base first (:func:`bitfit.merge`: a plain transformers model whose
biases are the task's), then traced with ``torch.jit.trace`` or exported with
``torch.onnx.export``. The exported graph takes the tokenizer's tensors (``input_ids``,
``attention_mask``, and ``token_type_ids`` where the model has them; any batch size and
length) and returns the logits: ``[batch, labels]`` for a classifier, ``[batch, length,
vocab]`` for a causal LM (one forward pass without KV cache; decode with your own loop).
Biases that cannot be merged into the architecture (added RMSNorm biases) stay as the
BitFit model's own ``+ bias`` ops and are traced with it.

:func:`export_model` checks the exported file against the PyTorch model (TorchScript by
loading it back, ONNX with onnxruntime when installed) and returns the largest difference.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ..core.io import fsync_dir
from ..errors import BitFitError

FORMATS = ("torchscript", "onnx")


class LogitsOnly(nn.Module):
    """``model(**dict(zip(names, tensors))).logits`` with positional tensor inputs (traceable)."""

    def __init__(self, model: nn.Module, input_names: Sequence[str], extra: Optional[dict] = None):
        super().__init__()
        self.model = model
        self.input_names = list(input_names)
        self.extra = dict(extra or {})

    def forward(self, *tensors):
        out = self.model(**dict(zip(self.input_names, tensors)), **self.extra)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out[0]


def input_names_for(model: nn.Module, tokenizer=None) -> list:
    """The tensors the exported graph takes: the tokenizer's, limited to what ``forward`` accepts."""
    params = inspect.signature(model.forward).parameters
    wanted = list(getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask", "token_type_ids"])
    names = [n for n in wanted if n in params]
    cfg = getattr(model, "config", None)
    if "token_type_ids" in names and tokenizer is None and not getattr(cfg, "type_vocab_size", 0):
        names.remove("token_type_ids")
    if "input_ids" not in names:
        raise BitFitError(f"{type(model).__name__} takes no input_ids: only text models are exported")
    return names


def example_inputs(model: nn.Module, names: Sequence[str], batch: int = 2, length: int = 8, seed: int = 0) -> tuple:
    cfg = getattr(model, "config", None)
    vocab = int(getattr(cfg, "vocab_size", 100) or 100)
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in names:
        if n == "input_ids":
            out.append(torch.randint(3, max(4, vocab), (batch, length), generator=g))
        elif n == "attention_mask":
            mask = torch.ones(batch, length, dtype=torch.long)
            if batch > 1 and length > 2:
                mask[-1, -2:] = 0  # right padding on the last row
            out.append(mask)
        else:  # token_type_ids
            tt = torch.zeros(batch, length, dtype=torch.long)
            tt[:, length // 2:] = 1 if int(getattr(cfg, "type_vocab_size", 1) or 1) > 1 else 0
            out.append(tt)
    return tuple(out)


def merged_task(source, base=None) -> nn.Module:
    """The task of ``source`` (artifact/run folder or BitFit model) merged into its base, in eval mode.

    ``base``: model name/folder or module (default: the base named in the artifact)."""
    from ..artifacts import load, merge, read_artifact
    from ..core.prepare import get_state

    if isinstance(source, nn.Module):
        model = source
        if get_state(model) is None:
            raise BitFitError("export needs a BitFit model (bitfit.apply / bitfit.load) or an artifact folder")
    else:
        art = read_artifact(source)
        if base is None:
            base = art.meta["base_model"].get("name")
            if not base:
                raise BitFitError(f"the artifact {source} does not record its base model's name; pass --base MODEL")
        model = load(base, source)
    try:
        model = merge(model)
    except BitFitError as exc:  # e.g. RMSNorm biases: no switch in the architecture for them
        warnings.warn(f"exporting the BitFit model unmerged ({exc}); its added-bias ops are traced with it")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _extra(model: nn.Module) -> dict:
    params = inspect.signature(model.forward).parameters
    extra = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if "return_dict" in params:
        extra["return_dict"] = True
    return extra


def check_tolerance(tolerance) -> Optional[float]:
    """``tolerance`` as a float, or a :class:`BitFitError` for NaN or a negative value (a check against
    NaN never fails; a negative one always does)."""
    if tolerance is None:
        return None
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        raise BitFitError(f"--tolerance must be a number >= 0, got {tolerance!r}") from None
    if math.isnan(value) or value < 0:
        raise BitFitError(f"--tolerance must be a number >= 0 (the largest accepted logit difference), got "
                          f"{tolerance!r}")
    return value


def export_model(model: nn.Module, path, fmt: str, *, tokenizer=None, input_names=None, opset: Optional[int] = None,
                 check: bool = True, tolerance: Optional[float] = None) -> dict:
    """Export ``model`` (a plain or merged model) to ``path`` as ``fmt`` ("torchscript" or "onnx").

    The files are written to a hidden folder beside ``path`` (``.NAME.export-<pid>-<hex>``), checked
    there, and only then renamed into place; an ONNX model's weights file ``NAME.data`` is replaced
    together with it. A failure (a full disk, a file-size limit, a check over ``tolerance``) raises
    :class:`BitFitError` and leaves an existing export at ``path`` as it was.

    Returns ``{"path", "format", "inputs", "max_abs_diff"}``; ``max_abs_diff`` is measured on two
    input shapes other than the traced one (None when ``check`` is False or, for ONNX,
    onnxruntime is not installed)."""
    from ..artifacts.store import make_side_folder

    if fmt not in FORMATS:
        raise BitFitError(f"format must be one of {FORMATS}, got {fmt!r}")
    tolerance = check_tolerance(tolerance)
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if path.is_dir():
        example_file = path / ("model.onnx" if fmt == "onnx" else "model.pt")
        raise BitFitError(f"{path} is a folder; give the file to write (e.g. {example_file})")
    model.eval()
    names = list(input_names or input_names_for(model, tokenizer))
    wrapper = LogitsOnly(model, names, _extra(model)).eval()
    example = example_inputs(model, names, batch=2, length=8)
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _recover_export(path)
        tmp = make_side_folder(path, "export")
    try:
        staged = tmp / path.name
        with torch.no_grad(), _write_errors(path):
            if fmt == "torchscript":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    traced = run_quietly(torch.jit.trace, wrapper, example, check_trace=False, strict=False)
                # through a Python file: a failed write raises OSError here (torch's own file writer aborts
                # the process when a write fails)
                with open(staged, "wb") as f:
                    torch.jit.save(traced, f)
                    f.flush()
                    os.fsync(f.fileno())
            else:
                _export_onnx(wrapper, example, names, staged, opset)
        report = {"path": str(path), "format": fmt, "inputs": names, "max_abs_diff": None}
        if check:
            report["max_abs_diff"] = diff = check_export(model, staged, fmt, names)
            if diff is not None and tolerance is not None and not diff <= tolerance:
                raise BitFitError(f"the exported model differs from the PyTorch model by {diff:.2e} (more than "
                                  f"--tolerance {tolerance:g}); nothing was written to {path}")
        with _write_errors(path):
            _place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


class _write_errors:
    """OSError while writing an export -> one-line BitFitError (the existing export is kept)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        err = exc
        while err is not None and not isinstance(err, OSError):  # an exporter's wrapper around the OSError
            err = err.__cause__ or err.__context__
        if isinstance(err, OSError):
            what = err.strerror or str(err)
            raise BitFitError(f"could not write the export to {self.path} ({what}); any earlier export there is "
                              "unchanged: free disk space, raise the file-size limit or choose a writable --output") \
                from None
        return False


def _companions(path: Path) -> list:
    """The files of an export at ``path``: the entry file last (ONNX keeps its weights in ``NAME.data``)."""
    return [path.name + ".data", path.name]


def _place(tmp: Path, path: Path) -> None:
    """Move the export in ``tmp`` to ``path``, replacing the earlier export's files all together or not at all.

    One file: one atomic rename. With a weights file: the old files go to a hidden side folder (the
    entry file first), the new ones come in (the entry file last), the side folder is removed; on
    an error every rename is undone. A kill in between leaves the old files in the side folder,
    which the next export to ``path`` puts back before writing (:func:`_recover_export`)."""
    from ..artifacts.store import make_side_folder

    new = [n for n in _companions(path) if (tmp / n).exists()]
    parent = path.parent
    old_names = [n for n in _companions(path) if os.path.lexists(parent / n)]
    if new == [path.name] and old_names in ([], [path.name]):
        os.replace(tmp / path.name, path)
        fsync_dir(parent)
        return
    old = make_side_folder(path, "replaced") if old_names else None
    moved, placed = [], []
    try:
        for n in reversed(old_names):  # the entry file first: a reader sees no model, never a mixed pair
            os.rename(parent / n, old / n)
            moved.append(n)
        for n in new:  # the weights first, the entry file last
            os.rename(tmp / n, parent / n)
            placed.append(n)
    except BaseException:
        for n in reversed(placed):
            os.rename(parent / n, tmp / n)
        for n in reversed(moved):
            os.rename(old / n, parent / n)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover_export(path: Path) -> None:
    """Put back an earlier export that a killed export had moved aside (its entry file is missing at
    ``path``), then remove what killed exports left beside ``path``."""
    from ..artifacts.store import remove_stale_side_folders, stale_side_folders

    for side in reversed(stale_side_folders(path, "replaced")):  # newest first
        if not os.path.lexists(path) and (side / path.name).exists():
            for n in _companions(path):
                if (side / n).exists() and not os.path.lexists(path.parent / n):
                    os.rename(side / n, path.parent / n)
    remove_stale_side_folders(path, "replaced")
    remove_stale_side_folders(path, "export")


def _export_onnx(wrapper, example, names, path: Path, opset: Optional[int]) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise BitFitError("ONNX export needs the onnx package: pip install 'bitfit[export]'") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    length = torch.export.Dim("length", min=2, max=100000)
    dynamic_shapes = tuple({0: batch, 1: length} for _ in names)
    errors = []
    for dynamo in (True, False):
        try:
            kwargs = dict(input_names=names, output_names=["logits"])
            if not os.environ.get("BITFIT_VERBOSE"):
                kwargs["verbose"] = False  # the dynamo exporter's step-by-step progress lines
            if opset is not None:
                kwargs["opset_version"] = opset
            if dynamo:
                kwargs.update(dynamo=True, dynamic_shapes=(dynamic_shapes,), optimize=True)
            else:
                axes = {n: {0: "batch", 1: "length"} for n in names}
                axes["logits"] = {0: "batch"}
                kwargs.update(dynamo=False, dynamic_axes=axes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run_quietly(torch.onnx.export, wrapper, example, str(path), **kwargs)
            return
        except Exception as exc:  # noqa: BLE001 - try the other exporter, then report both
            cause = exc
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:  # the disk, not the exporter: the other exporter would fail the same way
                raise cause
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {exc}"[:600])
    raise BitFitError("ONNX export failed: " + " | ".join(errors))


# Loggers whose messages during an export say nothing a user can act on: torch's ONNX exporter lists every
# torchvision operator it skips because torchvision is not installed (only vision detection models use them), and
# torch.jit.trace reads every attribute of the model, among them transformers' ``loss_function``, which then
# complains that ``loss_type`` is unset (a classifier has no loss_type; the traced graph computes no loss).
QUIET_LOGGERS = ("torch.onnx._internal.exporter._registration", "transformers.modeling_utils")


def run_quietly(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with :data:`QUIET_LOGGERS` at ERROR level (their errors still show);
    ``--verbose`` (BITFIT_VERBOSE=1) leaves them as they are."""
    import logging

    if os.environ.get("BITFIT_VERBOSE"):
        return fn(*args, **kwargs)
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # the tracer reads every property, transformers' deprecated aliases too
            warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            return fn(*args, **kwargs)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_export(model: nn.Module, path, fmt: str, names: Sequence[str]) -> Optional[float]:
    """Largest |exported - PyTorch| over the logits of two input shapes other than the traced one."""
    worst = 0.0
    run = None
    if fmt == "torchscript":
        loaded = torch.jit.load(str(path))

        def run(inputs):
            with torch.no_grad():
                return loaded(*inputs)
    else:
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed_names = [i.name for i in sess.get_inputs()]

        def run(inputs):
            feed = {n: t.numpy() for n, t in zip(names, inputs) if n in feed_names}
            return torch.from_numpy(sess.run(["logits"], feed)[0])
    wrapper = LogitsOnly(model, names, _extra(model)).eval()
    for batch, length in ((3, 11), (1, 5)):
        inputs = example_inputs(model, names, batch=batch, length=length, seed=batch)
        with torch.no_grad():
            ref = wrapper(*inputs)
        got = run(inputs)
        if tuple(got.shape) != tuple(ref.shape):
            raise BitFitError(f"the exported {fmt} model gives logits of shape {tuple(got.shape)} for inputs "
                              f"{batch}x{length}; PyTorch gives {tuple(ref.shape)}")
        worst = max(worst, float((got.float() - ref.float()).abs().max()))
    return worst


def export_task(source, output, fmt: str, base=None, tokenizer=None, check: bool = True,
                tolerance: Optional[float] = None) -> dict:
    """Merge the task at ``source`` into ``base`` and export it (see :func:`export_model`)."""
    model = merged_task(source, base)
    return export_model(model, output, fmt, tokenizer=tokenizer, check=check, tolerance=tolerance)


__all__ = ["export_model", "export_task", "merged_task", "check_export", "LogitsOnly", "FORMATS"]
