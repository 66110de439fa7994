"""Training with transformers.Trainer, and using what it trained: a run's arguments (``arguments``) and
defaults (``defaults``), its task and data (``tasks``), the base model with BitFit applied (``base``),
BitFit's Trainer subclass (``trainer``), one run start to finish (``run``), the run folder and its model
card (``runfolder``), loading a finished run back (``restore``), evaluation and prediction
(``evaluate``), generation (``generate``), the method baselines and the grid of `bitfit compare`
(``baselines``, ``compare*``), what moved in a run (``analyze``) and the non-finite guard (``guard``).
It imports only from the layers below it (errors, core, data, fast, methods, artifacts, peft, analysis),
never from serving or the command line (`bitfit train`'s argument parsing is bitfit.cli.trainargs, which
calls in here). The names below are the programmatic entry points; ``generate`` is not among them, since
a function of that name here would hide the module ``bitfit.training.generate``.
"""

from .arguments import DataArguments, ModelArguments
from .defaults import build_training_arguments, training_defaults
from .evaluate import evaluate_run, predict_run, predict_text
from .restore import load_trained
from .run import run_train
from .runfolder import save_trained
from .tasks import TaskInfo

__all__ = ["DataArguments", "ModelArguments", "TaskInfo", "build_training_arguments", "evaluate_run", "load_trained",
           "predict_run", "predict_text", "run_train", "save_trained", "training_defaults"]
