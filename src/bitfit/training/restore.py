"""Loading a finished run back (eval, predict, generate, merge): its base model (from --model or the run's
record) with its artifact, after checking that the run fits what it is asked to do: the flags given
agree with the run's record, and the head was trained for the task's labels."""

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from ..errors import BitFitError, DataError
from .arguments import DataArguments, ModelArguments
from .base import load_base
from .defaults import INSTRUCT_TASKS
from .runfolder import load_run
from .tasks import TaskInfo, task_info


def load_trained(model_args: ModelArguments, data_args: Optional[DataArguments] = None):
    """(model, tokenizer, TaskInfo) of a finished run: the base model (from --model or the run's record)
    with the run's artifact loaded by bitfit.load."""
    import bitfit

    meta, info = load_run(model_args.adapter)
    if info is not None and data_args is not None:
        check_eval_args(model_args, data_args, info)
    if not model_args.model:
        model_args = dataclasses.replace(model_args, model=meta.get("base_model"), gguf_file=meta.get("gguf_file"))
        if not model_args.model:
            raise BitFitError(f"--model is required: {model_args.adapter} does not record its base model")
    elif not model_args.gguf_file and os.path.isdir(os.path.expanduser(str(model_args.model))):
        # --model names the folder that holds the run's GGUF file: load that file, as the run did
        recorded = meta.get("gguf_file") or (os.path.basename(str(meta.get("base_model") or ""))
                                             if str(meta.get("base_model") or "").endswith(".gguf") else None)
        if recorded and os.path.isfile(os.path.join(os.path.expanduser(str(model_args.model)), recorded)):
            model_args = dataclasses.replace(model_args, gguf_file=recorded)
    if info is None:
        if data_args is None or not (data_args.task or data_args.train_file):
            raise BitFitError(f"{model_args.adapter} has no task.json; pass --task")
        if data_args.task and data_args.task.lower() not in INSTRUCT_TASKS and not data_args.train_file:
            info = task_info(data_args)
        elif data_args.is_instruct:
            info = task_info(data_args)
        else:
            labels = _artifact_labels(model_args.adapter)
            names, regression = labels if labels is not None else ([], True)
            info = task_info(data_args, (names, regression))
    _check_artifact_labels(model_args.adapter, info)
    if data_args is not None:
        if not data_args.data_dir and meta.get("data_dir") and not os.environ.get("BITFIT_GLUE_DIR") \
                and info.kind == "glue":
            data_args.data_dir = meta["data_dir"]  # the GLUE folder the run was trained from
        if info.kind in ("files", "instruct"):  # the run's own files, unless the user names others
            for name in ("train_file", "validation_file", "test_file"):
                if not getattr(data_args, name) and meta.get(name) and os.path.exists(meta[name]):
                    setattr(data_args, name, meta[name])

    from ..core.models import quiet_loading

    with quiet_loading():  # the artifact restores the head: no "classifier MISSING ... newly initialized" report
        model, tokenizer = load_base(model_args, info)
    if (Path(os.path.expanduser(model_args.adapter)) / "tokenizer_config.json").exists():
        import transformers

        try:  # the tokenizer saved with the run
            own = transformers.AutoTokenizer.from_pretrained(os.path.expanduser(model_args.adapter))
            if own.pad_token is None:
                own.pad_token = tokenizer.pad_token
            tokenizer = own
        except (OSError, ValueError):
            pass
    model = bitfit.load(model, model_args.adapter)
    model.eval()
    return model, tokenizer, info


def _artifact_labels(adapter: str) -> Optional[tuple]:
    """(label_names, regression) of the head an artifact holds, from its bitfit_config.json; None when it
    has no head (or no readable config: bitfit.load then says what is wrong)."""
    cfg = Path(os.path.expanduser(adapter)) / "bitfit_config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    head = data.get("head") if isinstance(data, dict) else None
    if not isinstance(head, dict) or not head.get("params"):
        return None
    if head.get("problem_type") == "regression":
        return [], True
    id2label = head.get("id2label") or {}
    try:
        return [str(id2label[k]) for k in sorted(id2label, key=int)], False
    except (TypeError, ValueError):
        return None


def _check_artifact_labels(adapter: str, info: TaskInfo) -> None:
    """Refuse an artifact whose head was trained for other labels than the task being scored."""
    import re

    labels = _artifact_labels(adapter)
    if labels is None or info.kind == "instruct":
        return
    names, regression = labels
    generic = not regression and all(re.fullmatch(r"LABEL_\d+", n) for n in names)  # saved without names
    task = info.task or "this data"
    if regression != info.regression:
        raise BitFitError(f"{adapter} holds a {'regression' if regression else f'{len(names)}-class'} head, but "
                          f"{task} is {'regression' if info.regression else 'classification'}: it was trained "
                          "for another task")
    if not regression and (names != list(info.label_names) and not (generic and len(names) == info.num_labels)):
        raise BitFitError(f"{adapter} was trained with labels {names}, but {task} has labels "
                          f"{list(info.label_names)}: it was trained for another task, it cannot be scored on this one")


def check_eval_args(model_args: ModelArguments, data_args: DataArguments, info: TaskInfo) -> None:
    """eval/predict/generate read the task, columns and model choices from the run folder: refuse a flag
    that would be silently ignored because it contradicts the run's record (a flag that agrees passes)."""
    from ..data import glue

    def refuse(flag: str, why: str):
        raise BitFitError(f"{flag}: {why}; the run folder records what eval/predict need, so omit {flag}")

    task = data_args.task
    if task:
        if info.kind == "glue":
            try:
                same = glue.get_task(task).name == info.task
            except DataError:
                same = False
        elif info.kind == "instruct":
            same = task.lower() in INSTRUCT_TASKS
        else:
            same = task == info.task
        if not same:
            refuse(f"--task {task}", f"this run was trained on {info.task or 'your own files'}"
                   + (" (--train-file)" if info.kind == "files" else ""))
    if info.kind == "glue":
        for flag, value in (("--train-file", data_args.train_file), ("--validation-file", data_args.validation_file),
                            ("--test-file", data_args.test_file)):
            if value:
                refuse(flag, f"this is a GLUE {info.task} run, scored on the GLUE files (--data-dir)")
    elif data_args.data_dir:
        refuse("--data-dir", f"this run was trained on {'your own files' if info.kind == 'files' else info.kind}, "
               "not GLUE; pass --validation-file / --test-file")
    defaults = DataArguments()
    for name, flag in (("text_column", "--text-column"), ("text_pair_column", "--text-pair-column"),
                       ("label_column", "--label-column"), ("max_seq_length", "--max-seq-length"),
                       ("positive_label", "--positive-label")):
        value, recorded = getattr(data_args, name), getattr(info, name)
        if value != getattr(defaults, name) and value != recorded:
            refuse(f"{flag} {value}", f"the run was trained with {recorded!r}")
    if data_args.train_size is not None:
        refuse("--train-size", "it only applies to training")
    m_defaults = ModelArguments()
    for f in dataclasses.fields(ModelArguments):
        if f.name in ("model", "adapter", "gguf_file"):
            continue
        if getattr(model_args, f.name) != getattr(m_defaults, f.name):
            flag = "--" + f.name.replace("_", "-")
            refuse(flag, "the artifact records which tensors were trained and how; eval/predict use that")
