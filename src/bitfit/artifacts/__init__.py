"""What a BitFit run keeps: the artifact format and its checks, the base fingerprint, crash-safe
writing, loading onto a base, and exact merge/unmerge.

Modules, by job: ``format`` (what an artifact is: names, versions, config schema, the
``Artifact``/``TaskTensors`` types), ``finite`` (no NaN/inf anywhere), ``base`` (the frozen base:
fingerprint, slot names, base values), ``store`` (crash-safe folders: write protocol, locks,
recovery), ``read`` (folder -> validated Artifact), ``saving`` (model -> what is stored; ``save``),
``tasks`` (one task's full tensors for a bias bank), ``loading`` (``load`` and the registry of
other on-disk forms) and ``merging`` (``merge``/``unmerge``).

Imports only ``bitfit.core``, ``bitfit.fast``, ``bitfit.methods`` and ``bitfit.errors``: the artifact
format knows nothing of training runs, serving or integrations (``bitfit.peft`` converts to and from
it, and ``import bitfit`` registers its adapter-folder reader with :func:`register_reader`).
"""

from .base import fingerprint, locate
from .finite import check_finite
from .format import CONFIG_NAME, DTYPES, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, Artifact, TaskTensors
from .loading import load, register_reader
from .merging import merge, unmerge
from .read import read_artifact
from .saving import save
from .tasks import task_tensors

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "FORMAT_VERSION", "DTYPES", "Artifact", "TaskTensors", "fingerprint",
           "read_artifact", "task_tensors", "save", "load", "merge", "unmerge", "locate", "check_finite",
           "register_reader"]
