"""The model and data arguments of a run (`bitfit train`, eval, predict, generate and compare parse them
from the command line; :func:`bitfit.training.run.run_train` takes them as dataclasses): which base model
and which of its biases train, which data and how it is cut and tokenized."""

from dataclasses import dataclass, field
from typing import Optional

from .defaults import HEAD_LR_FACTOR, INSTRUCT_TASKS


@dataclass
class ModelArguments:
    """Which model, and which of its biases train."""

    model: Optional[str] = field(
        default=None,
        metadata={"help": "Base model: a local folder, a Hub name, 'minilm' (the packaged MiniLM-L6), or a .gguf "
                  "file. Optional for eval/predict/generate when the adapter folder records it."},
    )
    adapter: Optional[str] = field(
        default=None, metadata={"help": "(eval/predict/generate) the folder a `bitfit train` run wrote."}
    )
    preset: str = field(default="all", metadata={"help": "Bias preset: all, paper-subset, attention, ffn, "
                                                 "layernorm, none (head only)."})
    roles: Optional[str] = field(default=None, metadata={"help": "Comma list of roles replacing the preset's."})
    include: Optional[str] = field(default=None, metadata={"help": "Comma list of roles/regexes to add."})
    exclude: Optional[str] = field(default=None, metadata={"help": "Comma list of roles/regexes to remove."})
    layers: Optional[str] = field(default=None, metadata={"help": "Restrict to layers, e.g. '-2:' or '0,5'."})
    add_missing: Optional[bool] = field(
        default=None,
        metadata={"help": "Add zero-initialised biases to the selected slots that have none, so every bias role "
                  "trains. Default: on when the model lacks some or all of them (LLaMA, Qwen2, T5 ...; one line "
                  "says so), no change for models with every bias (BERT, GPT-2 ...); --add-missing false trains "
                  "only the existing ones."},
    )
    added_bias_init: str = field(
        default="zero",
        metadata={"help": "Initial value of added biases: 'zero' (default: outputs unchanged before training), "
                  "'normal' or 'uniform' (std --added_bias_init_std, default 1e-3; drawn from --seed). Implies "
                  "--add-missing."},
    )
    added_bias_init_std: Optional[float] = field(
        default=None, metadata={"help": "Standard deviation of a 'normal' / 'uniform' --added_bias_init."}
    )
    train_head: bool = field(default=True, metadata={"help": "Train the task head (--no-train-head to freeze it)."})
    skip_zero_grad: bool = field(default=False, metadata={"help": "Leave out b_k (no gradient by construction)."})
    pooler_head: bool = field(
        default=True,
        metadata={"help": "Train a pooler the checkpoint never trained (all-zero bias, as sentence-transformers "
                  "models ship BERT's) with the head; --pooler_head false keeps it frozen (the paper's set)."},
    )
    frozen_dtype: Optional[str] = field(
        default="auto",
        metadata={"help": "Precision of the frozen weights: 'auto' (default: the fastest of float32 / float16 / "
                  "bfloat16 / int8-fbgemm / int8 on this hardware, from a short probe cached per machine; the choice "
                  "and the probe's table are printed and kept in command.json), 'float32' (the exact stock path), "
                  "'bfloat16', 'float16', 'int8' (bf16 plus int8 training matmuls in the frozen Linear layers; "
                  "evaluation runs bf16) or 'int8-fbgemm' (float32 weights, int8 training matmuls on PyTorch's fbgemm "
                  "engine, fast on AVX2-only CPUs; evaluation runs float32)."},
    )
    lean: bool = field(
        default=True,
        metadata={"help": "Memory-lean training (bool dropout masks, fused attention, padding-free encoder layers on a "
                  "CPU); --no_lean for the stock modules."},
    )
    length_sub_batches: bool = field(
        default=True,
        metadata={"help": "On a CPU, run each training batch as a few sub-batches of similar length with its padding "
                  "trimmed: the same gradient as the random batch, without paying for its padding "
                  "(classification and regression with models whose layers do not skip padding themselves; "
                  "BERT-like encoders run padding-free layers instead; docs/TRAINING.md). "
                  "--length_sub_batches false runs such batches whole."},
    )
    head_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": f"Learning rate of the task head (default: {HEAD_LR_FACTOR:g} x --learning_rate for "
                  "BitFit, since the head starts from random values)."},
    )
    pooler_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Learning rate of an untrained pooler that trains with the head (--pooler_head; default: "
                  "the head's). BitFit runs only."},
    )
    dropout: Optional[float] = field(
        default=None,
        metadata={"help": "Set every dropout probability of the model (hidden, attention, ...) to this value for "
                  "training. Default: 0 for BitFit (bias-only training underfits rather than overfits; "
                  "docs/RESULTS.md), the model's own for full fine-tuning and LoRA in `bitfit compare`."},
    )
    role_lr_multipliers: Optional[str] = field(
        default=None,
        metadata={"help": "Learning-rate multipliers per bias role, e.g. 'query=2,ffn_out=0.5' (roles as in "
                  "`bitfit info`; '+' also separates): those tensors train at --learning_rate x factor. BitFit "
                  "runs only; the head keeps --head_learning_rate (docs/TRAINING.md)."},
    )
    layer_lr_decay: Optional[float] = field(
        default=None,
        metadata={"help": "Layer-wise learning-rate decay, e.g. 0.9: the top layer trains at --learning_rate, each "
                  "layer below at 0.9 x the one above; embedding biases get the lowest rate, pooler/final norm the "
                  "top one. BitFit runs only."},
    )
    halve_every_epochs: Optional[float] = field(
        default=None,
        metadata={"help": "The 'halving' schedule (replaces --lr_scheduler_type): after the linear warm-up the "
                  "learning rate is halved at the end of every N epochs (optimizer steps per epoch counted with "
                  "--gradient_accumulation_steps)."},
    )
    train_norm_weights: bool = field(
        default=False,
        metadata={"help": "Also train the LayerNorm/RMSNorm gains (every 1-D vector of the stack, not only the "
                  "biases); saved in the artifact with the biases."},
    )
    norm_weight_l2: Optional[float] = field(
        default=None,
        metadata={"help": "With --train_norm_weights: pull the gains toward their pretrained values after every "
                  "optimizer step, g -= lr x L2 x (g - g_pretrained) (decoupled, like AdamW's weight decay)."},
    )
    budget: Optional[str] = field(
        default=None,
        metadata={"help": "Sparse BitFit: train only this many of the selected bias entries, those with the highest "
                  "importance on a few training batches: a fraction of them (0.5) or a count (1000). The head is "
                  "not counted. docs/TRAINING.md, Sparse BitFit."},
    )
    importance: str = field(
        default="grad",
        metadata={"help": "With --budget: 'grad' (sum of |dL/db| over the scoring batches) or 'fisher' (of (dL/db)^2)."},
    )
    importance_unit: str = field(
        default="entry",
        metadata={"help": "With --budget: choose single bias 'entry's or whole bias 'vector's (by mean importance)."},
    )
    importance_batches: int = field(
        default=8,
        metadata={"help": "With --budget: training batches (of --per_device_train_batch_size rows, drawn with "
                  "--seed) the importance is measured on."},
    )
    warm_start_head: bool = field(
        default=False,
        metadata={"help": "Fit the task head's output layer on the frozen model's features (a linear probe over "
                  "the training rows) before bias training starts. Off by default: it ends CoLA's stall at the "
                  "majority class but the probe overfits small or hard sets (RTE, STS-B) and BitFit then does "
                  "worse (docs/RESULTS.md). BitFit runs only."},
    )
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file name inside --model's folder."})


@dataclass
class DataArguments:
    """Which data, and how it is cut and tokenized."""

    task: Optional[str] = field(
        default=None,
        metadata={"help": "GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), 'instruct' for causal-LM "
                  "instruction tuning, or omit with --train-file for your own classification data."},
    )
    data_dir: Optional[str] = field(
        default=None,
        metadata={"help": "Folder in the GLUE layout (<dir>/RTE/train.tsv ...); default $BITFIT_GLUE_DIR, "
                  "else the Hub via datasets."},
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "Own training data: .csv .tsv .jsonl .parquet"})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Own validation data (same format)."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Own test data (for predict)."})
    text_column: Optional[str] = field(default=None, metadata={"help": "Text column (default: text/sentence/...)."})
    text_pair_column: Optional[str] = field(default=None, metadata={"help": "Second text column, for pairs."})
    label_column: str = field(
        default="label",
        metadata={"help": "Label column. Numbers with fractions (or written as floats, more than 2 values) mean "
                  "regression, whole numbers or text are classes; nan/inf/empty labels are refused "
                  "(docs/TRAINING.md, Data)."},
    )
    max_seq_length: Optional[int] = field(
        default=None, metadata={"help": "Truncate inputs to this many tokens (default: 128, or the model's "
                                "maximum when that is smaller; more than the maximum is an error)."}
    )
    train_size: Optional[int] = field(
        default=None, metadata={"help": "Train on a fixed random subset of N rows (chosen with --seed)."}
    )
    eval_size: Optional[int] = field(
        default=None, metadata={"help": "Evaluate on the first N dev rows only (quick checks; not official)."}
    )
    max_rows: int = field(
        default=2_000_000, metadata={"help": "Refuse a data file of more rows than this (after --train-size): "
                                     "memory grows by about 2.5 GB per million rows of 128 tokens "
                                     "(docs/TRAINING.md, Data)."}
    )
    positive_label: Optional[str] = field(
        default=None, metadata={"help": "Own two-class data: the label binary F1 is computed for (default: the "
                                "second of the sorted label names; the choice is printed and kept in task.json)."}
    )

    @property
    def is_instruct(self) -> bool:
        return (self.task or "").lower() in INSTRUCT_TASKS
