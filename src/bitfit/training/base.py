"""The base model of a run and BitFit on it: loading the model and tokenizer for the task (causal LM or
sequence classification, GGUF files included), the position limit --max-seq-length is checked against,
the BitFitConfig the model arguments mean, the frozen-weight precision, and the scoring batches of a
sparse (--budget) run."""

import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from ..errors import BitFitConfigError, BitFitError
from .arguments import ModelArguments
from .defaults import DEFAULT_MAX_SEQ_LENGTH
from .tasks import TaskInfo


def load_base(model_args: ModelArguments, info: Optional[TaskInfo], dropout_required: bool = True):
    """(model, tokenizer) for the task: causal LM, or sequence classification with the task's labels.
    ``dropout_required=False``: a ``model_args.dropout`` that the model's config has no setting for is
    ignored (BitFit's default dropout) instead of an error (the user's ``--dropout``)."""
    from ..core import models

    name = model_args.model
    if not name:
        raise BitFitError("--model is required (a local folder, a Hub name, or 'minilm')")
    kwargs: dict = {}
    gguf = model_args.gguf_file
    if name.endswith(".gguf") and os.path.isfile(os.path.expanduser(name)):
        p = Path(os.path.expanduser(name))
        name, gguf = str(p.parent), p.name
    if gguf:
        kwargs["gguf_file"] = gguf
        # a damaged local file is named as such (not "loading it from the Hub failed") before anything reads it
        models.check_gguf_file(os.path.join(os.path.expanduser(name), gguf))
    tok_kwargs = dict(kwargs)
    if model_args.dropout is not None:
        try:
            kwargs.update(models.dropout_overrides(name, model_args.dropout, **tok_kwargs))
        except BitFitConfigError:
            if dropout_required:
                raise
    if gguf:
        import transformers

        cls = transformers.AutoModelForCausalLM if info is None or info.kind == "instruct" else \
            transformers.AutoModelForSequenceClassification
        if cls is not transformers.AutoModelForCausalLM:
            if info.regression:
                kwargs.update(problem_type="regression")
            else:
                kwargs.update(id2label=dict(enumerate(info.label_names)),
                              label2id={n: i for i, n in enumerate(info.label_names)})
        try:
            model = models.load_gguf_model(name, cls, **(kwargs if cls is transformers.AutoModelForCausalLM
                                                         else dict(kwargs, num_labels=info.num_labels)))
            tokenizer = transformers.AutoTokenizer.from_pretrained(name, **tok_kwargs)
        except (OSError, ValueError) as exc:
            raise BitFitError(f"could not load GGUF model {gguf!r} from {name!r}: {exc}") from None
    else:
        if info is not None and info.kind == "instruct":
            models.check_causal_lm(name)
        tokenizer = models.load_tokenizer(name)
        if info is None or info.kind == "instruct":
            model = models.load_model(name, task="causal-lm", **kwargs)
        else:
            if info.regression:
                kwargs.update(problem_type="regression")
            else:
                kwargs.update(id2label=dict(enumerate(info.label_names)),
                              label2id={n: i for i, n in enumerate(info.label_names)})
            model = models.load_model(name, num_labels=info.num_labels, task="classification", **kwargs)
    if info is not None:
        if info.max_seq_length is None:  # the default: 128, or the model's maximum when that is smaller
            limit = max_positions(model)
            info.max_seq_length = min(DEFAULT_MAX_SEQ_LENGTH, limit) if limit else DEFAULT_MAX_SEQ_LENGTH
            if info.max_seq_length < DEFAULT_MAX_SEQ_LENGTH:
                print(f"bitfit: --max-seq-length {info.max_seq_length}: the most {name} can take", file=sys.stderr)
        check_max_length(model, info.max_seq_length, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def max_positions(model) -> Optional[int]:
    """How many token positions a model with a learned absolute position table can take (BERT's
    ``position_embeddings``, GPT-2's ``wpe``, BART's ``embed_positions`` ...); None when it has none
    (rotary / relative positions: no hard limit to check)."""
    limits = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding) and ("position" in name.rsplit(".", 1)[-1] or name.endswith("wpe")):
            n = m.num_embeddings - int(getattr(m, "offset", 0) or 0)
            if m.padding_idx is not None:  # RoBERTa / MPNet: positions start after the padding index
                n -= m.padding_idx + 1
            limits.append(n)
    return min(limits) if limits else None


def check_max_length(model, max_seq_length: Optional[int], name: str = "the model") -> None:
    limit = max_positions(model)
    if max_seq_length is not None and limit is not None and max_seq_length > limit:
        raise BitFitConfigError(f"--max-seq-length {max_seq_length} is more than {name} can take: its position "
                                f"embeddings hold {limit} positions; use --max-seq-length {limit} or less")


def _split(value: Optional[str]):
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def bitfit_config(model_args: ModelArguments, add_missing: Optional[bool] = None):
    from ..core.config import BitFitConfig

    layers = model_args.layers
    if isinstance(layers, str) and ":" not in layers and "," not in layers:
        try:
            layers = int(layers)
        except ValueError:
            pass
    return BitFitConfig(
        preset=model_args.preset, roles=_split(model_args.roles), include=_split(model_args.include),
        exclude=_split(model_args.exclude), layers=layers,
        add_missing=bool(model_args.add_missing or model_args.added_bias_init != "zero") if add_missing is None
        else add_missing,
        added_bias_init=model_args.added_bias_init, added_bias_init_std=model_args.added_bias_init_std,
        train_head=model_args.train_head, skip_zero_grad=model_args.skip_zero_grad,
        frozen_dtype=model_args.frozen_dtype, lean=model_args.lean, pooler_head=model_args.pooler_head,
        train_norm_weights=model_args.train_norm_weights, budget=model_args.budget,
        importance=model_args.importance, importance_unit=model_args.importance_unit,
        importance_batches=model_args.importance_batches,
    )


def resolve_frozen_dtype(model_args: ModelArguments, device=None):
    """``model_args`` with ``frozen_dtype="auto"`` replaced by the choice for ``device`` (the device the
    run trains on), and that choice (a bitfit.fast.hardware.DtypeChoice, printed to stderr; None when the
    user named a dtype)."""
    if model_args.frozen_dtype != "auto":
        return model_args, None
    from ..fast.hardware import choose_frozen_dtype

    choice = choose_frozen_dtype(device)
    print(f"bitfit: {choice.describe()}; --frozen-dtype float32 keeps the exact float32 path", file=sys.stderr)
    return dataclasses.replace(model_args, frozen_dtype=choice.dtype), choice


def choose_add_missing(model, cfg, asked: Optional[bool]):
    """(cfg, line): the BitFitConfig with ``add_missing`` decided and the one line that says what was decided
    (None when there is nothing to say). ``asked``: the user's --add-missing (True / False), or None for the
    default, which adds zero-initialised biases wherever the selection has a slot without one: BitFit trains
    every bias role, and a family with some biases (Qwen2: q/k/v only) or none (LLaMA, T5) would otherwise
    train a fraction of them or nothing. Models with every bias (BERT, GPT-2, ...) are unchanged.
    `bitfit train` and `bitfit info` both decide here, so they show and train the same set."""
    import bitfit

    from ..core.select import resolve

    if cfg.add_missing or asked:
        return cfg, None
    sel = resolve(bitfit.discover(model, pooler_head=cfg.pooler_head), cfg)
    if not sel.missing:
        return cfg, None
    from ..core.config import ROLES

    family = bitfit.discover(model, pooler_head=cfg.pooler_head).family
    order = {r: i for i, r in enumerate(ROLES)}
    roles = sorted({r for rs in sel.missing.values() for r in rs}, key=lambda r: (order.get(r, len(order)), r))
    have = sorted({r for rs in sel.chosen.values() for r in rs}, key=lambda r: (order.get(r, len(order)), r))
    without = f"{len(sel.missing)} selected slots without a bias ({', '.join(roles)})"
    if asked is False:
        if not sel.chosen:
            return cfg, None  # bitfit.apply refuses: nothing would train
        return cfg, (f"bitfit: --add-missing false: {without} stay out; only the existing biases "
                      f"({', '.join(have)}) train")
    cfg = dataclasses.replace(cfg, add_missing=True)
    has = f"has biases only in {', '.join(have)}" if have else "has no bias in the selection"
    return cfg, (f"bitfit: {family} {has}: adding zero-initialised biases to the {without} so every bias role "
                 "trains (outputs unchanged until training); --add-missing false trains only the existing ones")


def apply_quietly(model, cfg, asked: Optional[bool], batches=None):
    """bitfit.apply; when the user turned --add-missing off, the line of :func:`choose_add_missing` already
    said which slots stay out, so apply's warning about them is not repeated."""
    import warnings

    import bitfit

    with warnings.catch_warnings():
        if asked is False:
            warnings.filterwarnings("ignore", message=r".*selected bias slots .* have no bias", category=UserWarning)
        return bitfit.apply(model, config=cfg, batches=batches)


def apply_bitfit(model, model_args: ModelArguments, batches=None):
    """bitfit.apply with the model arguments; the default --add-missing is decided (and printed) by
    :func:`choose_add_missing`. ``batches``: the scoring batches of a --budget run (sparse BitFit)."""
    cfg = bitfit_config(model_args)
    asked = True if model_args.added_bias_init != "zero" else model_args.add_missing
    if cfg.preset != "none" or cfg.roles or cfg.include:
        cfg, line = choose_add_missing(model, cfg, asked)
        if line:
            print(line, file=sys.stderr)
    return apply_quietly(model, cfg, asked, batches if cfg.budget is not None else None)


def scoring_batches(model, train_ds, collator, batch_size: int, seed: int, device):
    """The batches a sparse BitFit run (--budget) scores bias entries on: training rows drawn with ``seed``,
    as many batches as the consumer takes (``importance_batches``). On the first, the model goes to
    ``device`` (where the Trainer puts it)."""
    from ..methods.sparse import sample_batches

    if getattr(model, "hf_device_map", None) is None:
        model.to(device)
    yield from sample_batches(train_ds, collator, -(-len(train_ds) // batch_size), batch_size, seed)
