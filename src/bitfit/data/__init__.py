"""Data for `bitfit train`: GLUE tasks and their official metrics, the user's own files
(CSV/TSV/JSONL/Parquet), and instruction-tuning data for causal LMs."""

from .files import infer_labels, load_file, load_train_file, read_table
from .glue import TASKS, GlueTask, TextData, get_task, load_glue, load_glue_local, write_leaderboard
from .instruct import InstructionCollator, encode_example, format_prompt, load_instructions
from .metrics import METRICS, classification_metrics, compute, glue_metrics, primary_metric, regression_metrics

__all__ = [
    "TASKS", "GlueTask", "TextData", "get_task", "load_glue", "load_glue_local", "write_leaderboard",
    "load_file", "load_train_file", "read_table", "infer_labels",
    "format_prompt", "encode_example", "load_instructions", "InstructionCollator",
    "METRICS", "compute", "glue_metrics", "primary_metric", "classification_metrics", "regression_metrics",
]
