"""Scoring and predicting with a finished classification or regression run: the official metric(s) on a
split (`bitfit eval`), the predictions of a split or GLUE leaderboard files (`bitfit predict`), and the
label of one input (`bitfit predict --text`)."""

import dataclasses
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import BitFitError, DataError
from .arguments import DataArguments, ModelArguments
from .defaults import DEFAULT_MAX_SEQ_LENGTH
from .restore import load_trained
from .tasks import TaskInfo, encode, load_splits, make_compute_metrics, positive_label


@torch.no_grad()
def predict_logits(model, tokenizer, data, info: TaskInfo, batch_size: int = 64) -> np.ndarray:
    from tqdm.auto import tqdm
    from transformers import DataCollatorWithPadding

    ds = encode(tokenizer, data, info.max_seq_length)
    ds.labels = None
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    device = next(model.parameters()).device
    out = []
    for batch in tqdm(loader, desc="predict", leave=False, disable=len(loader) < 5):
        batch = {k: v.to(device) for k, v in batch.items()}
        out.append(model(**batch).logits.float().cpu().numpy())
    logits = np.concatenate(out, axis=0)
    bad = ~np.isfinite(logits).reshape(len(logits), -1).all(axis=1)
    if bad.any():
        raise BitFitError(f"the trained model's outputs are not finite (NaN/inf) for {int(bad.sum())} of {len(bad)} "
                          "rows: its artifact holds non-finite values (e.g. saved from a diverged run); no score is "
                          "reported. Retrain with a lower --learning_rate")
    return logits


def to_predictions(logits: np.ndarray, info: TaskInfo) -> np.ndarray:
    return np.squeeze(logits, -1) if info.regression else np.argmax(logits, axis=-1)


def evaluate_run(model_args: ModelArguments, data_args: DataArguments, split: str = "dev",
                 batch_size: int = 64) -> dict:
    """The official metric(s) of a trained run on ``split`` (default: the dev split)."""
    if split == "test":
        raise DataError("--split test: test splits have no labels, so they cannot be scored; use `bitfit predict "
                        "--split test` to write the predictions (GLUE leaderboard files)")
    model, tokenizer, info = load_trained(model_args, data_args)
    if info.kind == "instruct":
        raise BitFitError("eval of instruction-tuned models: use `bitfit generate`, or train with "
                          "--validation-file to get eval_loss")
    if info.kind == "files":
        from ..data import files

        if split not in ("dev", "validation", "train"):
            raise DataError(f"unknown split {split!r}; use dev (--validation-file) or train (--train-file)")
        path = data_args.train_file if split == "train" else data_args.validation_file
        if not path:
            raise DataError(f"pass --{'train' if split == 'train' else 'validation'}-file to evaluate on your "
                            "own data")
        part = files.load_file(path, info.text_column, info.text_pair_column, info.label_column,
                               info.label_names or None, info.regression, max_rows=data_args.max_rows)
        if data_args.eval_size is not None:
            if data_args.eval_size <= 0:
                raise DataError(f"--eval-size must be a positive number of rows, got {data_args.eval_size}")
            part = part.select(range(min(len(part), data_args.eval_size)))
        parts = [part]
    else:
        _, splits = load_splits(data_args if data_args.task else dataclasses.replace(data_args, task=info.task),
                                (split,), info=info)
        parts = splits[split]
    names = ["matched", "mismatched"] if len(parts) == 2 else [None]
    metrics: dict = {}
    compute = make_compute_metrics(info)
    for name, part in zip(names, parts):
        logits = predict_logits(model, tokenizer, part, info, batch_size)

        class P:  # EvalPrediction-like
            predictions, label_ids = logits, np.asarray(part.labels)

        prefix = f"eval_{name}_" if name else "eval_"
        metrics.update({prefix + k: v for k, v in compute(P).items()})
        if info.kind == "files" and positive_label(info) is not None:
            metrics[prefix + "f1_positive_label"] = positive_label(info)
        metrics[prefix + "samples"] = len(part)
    return metrics


def predict_run(model_args: ModelArguments, data_args: DataArguments, split: str, output: str,
                batch_size: int = 64) -> list:
    """Predict ``split``; for a GLUE test split write the leaderboard file(s) (``RTE.tsv`` ...), else a TSV
    of index, prediction (label names for classification)."""
    from ..data import glue

    model, tokenizer, info = load_trained(model_args, data_args)
    if info.kind == "files":
        from ..data import files

        path = data_args.test_file if split == "test" else data_args.validation_file
        if not path:
            raise DataError(f"pass --{'test' if split == 'test' else 'validation'}-file with your data to predict")
        parts = [files.load_file(path, info.text_column, info.text_pair_column, info.label_column,
                                 info.label_names or None, info.regression, labeled=False,
                                 max_rows=data_args.max_rows)]
    else:
        _, splits = load_splits(data_args if data_args.task else dataclasses.replace(data_args, task=info.task),
                                (split,), info=info)
        parts = splits[split]
    written = []
    out = Path(output)
    for i, part in enumerate(parts):
        preds = to_predictions(predict_logits(model, tokenizer, part, info, batch_size), info)
        if info.kind == "glue":
            task = glue.get_task(info.task)
            if len(parts) > 1 or out.is_dir() or output.endswith(os.sep):
                out.mkdir(parents=True, exist_ok=True)
                path = out / task.leaderboard[i]
            else:
                path = out
            written.append(glue.write_leaderboard(info.task, list(preds), str(path), part.index))
        else:
            tmp = f"{out}.tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write("index\tprediction\n")
                for idx, p in zip(part.index, preds):
                    fh.write(f"{idx}\t{p:.6g}\n" if info.regression else f"{idx}\t{info.label_names[int(p)]}\n")
            os.replace(tmp, out)
            written.append(str(out))
    return written


@torch.no_grad()
def predict_text(model_args: ModelArguments, text: str, text_pair: Optional[str] = None) -> tuple:
    """(label, score) of one input with a trained classification run: the label name and its softmax
    probability; for regression ("value", the prediction)."""
    model, tokenizer, info = load_trained(model_args, DataArguments())
    if info.kind == "instruct":
        raise BitFitError(f"{model_args.adapter} is an instruction-tuned run: use `bitfit generate --prompt`")
    from ..data.glue import takes_pairs

    pairs = takes_pairs(info.to_dict())
    what = f"GLUE {info.task.upper()}" if info.kind == "glue" else "its own data"
    if pairs and text_pair is None:
        raise BitFitError(f"{model_args.adapter} was trained on sentence pairs ({what}): give the second text with "
                          "--text-pair as well as --text")
    if pairs is False and text_pair is not None:
        raise BitFitError(f"{model_args.adapter} was trained on single texts ({what}): drop --text-pair")
    enc = tokenizer(text, text_pair, truncation=True, max_length=info.max_seq_length or DEFAULT_MAX_SEQ_LENGTH,
                    return_tensors="pt")
    enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()
           if k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = model(**enc).logits.float()[0]
    if info.regression:
        return "value", float(logits.squeeze())
    probs = torch.softmax(logits, -1)
    i = int(probs.argmax())
    names = info.label_names or [f"LABEL_{j}" for j in range(len(probs))]
    return names[i], float(probs[i])
