"""Errors raised by bitfit. Each message names the problem and the fix."""


class BitFitError(ValueError):
    """Base class of every error bitfit raises on bad input."""


class BitFitConfigError(BitFitError):
    """A BitFitConfig field, or a combination of fields, is invalid."""


class AlreadyPreparedError(BitFitError):
    """`bitfit.apply` was called on a model that is already a BitFit model."""


class ArtifactError(BitFitError):
    """An artifact is missing, damaged, or does not fit the model it is loaded onto."""


class DataError(BitFitError):
    """Input data is missing, malformed, or does not match what the task needs."""
