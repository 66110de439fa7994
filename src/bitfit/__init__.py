"""bitfit: fine-tune only the bias terms of any Hugging Face transformer (BitFit, arXiv 2106.10199)."""

import importlib
import sys

from .core import models
from .core.config import PRESETS, ROLES, BitFitConfig
from .errors import AlreadyPreparedError, ArtifactError, BitFitConfigError, BitFitError, DataError
from .core.prepare import apply, get_state
from .core.report import Report, report
from .core.roles import discover
# Packages that plug into core's apply/report: the frozen dtype and lean training mode, sparse budgets.
from .fast import lean as _lean  # noqa: F401
from .methods import sparse as _sparse  # noqa: F401

__version__ = "0.1.0"

# `bitfit.models` (resolve_model, load_model, load_tokenizer) is public: `import bitfit.models` and
# `from bitfit.models import load_model` reach the module that lives in bitfit.core.
sys.modules[f"{__name__}.models"] = models

# Heavier parts load on first use: name -> module that defines it.
_LAZY = {
    "save": "artifacts",
    "load": "artifacts",
    "merge": "artifacts",
    "unmerge": "artifacts",
    "BiasBank": "serving.bank",
    "apply_dynamic": "methods.dynamic",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'bitfit' has no attribute {name!r}")


def _read_peft_adapter(folder):
    """A peft-format BitFit adapter folder (docs/PEFT.md) as an Artifact. bitfit.peft is imported on
    this first call only, so ``import bitfit`` never imports peft."""
    from .peft.convert import read_peft_adapter

    return read_peft_adapter(folder)


# bitfit.load reads a folder holding peft's adapter_config.json (and no bitfit_config.json) with bitfit.peft;
# the artifacts layer sits below peft, so the reader is registered from here.
from .artifacts.loading import register_reader as _register_reader  # noqa: E402

_register_reader("adapter_config.json", _read_peft_adapter)


__all__ = [
    "apply",
    "report",
    "Report",
    "BitFitConfig",
    "PRESETS",
    "ROLES",
    "discover",
    "get_state",
    "models",
    "BitFitError",
    "BitFitConfigError",
    "AlreadyPreparedError",
    "ArtifactError",
    "DataError",
    *_LAZY,
]
