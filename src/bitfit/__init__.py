"""bitfit: fine-tune only the bias terms of any Hugging Face transformer (BitFit, arXiv 2106.10199)."""

from .config import PRESETS, ROLES, BitFitConfig
from .errors import AlreadyPreparedError, ArtifactError, BitFitConfigError, BitFitError, DataError
from .prepare import apply, get_state
from .report import Report, report
from .roles import discover

__version__ = "0.1.0"

__all__ = [
    "apply",
    "report",
    "Report",
    "BitFitConfig",
    "PRESETS",
    "ROLES",
    "discover",
    "get_state",
    "BitFitError",
    "BitFitConfigError",
    "AlreadyPreparedError",
    "ArtifactError",
    "DataError",
]
