"""What a BitFit run keeps: the artifact format and its checks, the base fingerprint, crash-safe
writing, loading onto a base, and exact merge/unmerge.

Imports only ``bitfit.core``, ``bitfit.fast``, ``bitfit.methods`` and ``bitfit.errors``: the artifact
format knows nothing of training runs, serving or integrations (``bitfit.peft`` converts to and from it).
"""

from .artifact import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    FORMAT,
    Artifact,
    TaskTensors,
    fingerprint,
    read_artifact,
    task_tensors,
    save,
    load,
    merge,
    unmerge,
    locate,
    check_finite,
)

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "Artifact", "TaskTensors", "fingerprint", "read_artifact", "task_tensors", "save", "load", "merge", "unmerge", "locate", "check_finite"]
