"""Instruction tuning data for causal LMs: JSONL with ``instruction``, optional ``input``, ``output``.

Each example becomes ``prompt + output + eos`` where the prompt is the Alpaca template; the
labels are -100 on the prompt and on padding, so the loss covers only the response tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import DataError

PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
IGNORE = -100


def format_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The Alpaca prompt for an instruction (and optional input); the response follows it."""
    if input is not None and str(input).strip():
        return PROMPT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def load_instructions(path: str) -> list[dict]:
    """Rows of an instruction file (JSONL/JSON/CSV/Parquet) with instruction, optional input, output."""
    from .files import read_table

    df = read_table(path)
    for col in ("instruction", "output"):
        if col not in df.columns:
            raise DataError(f"{path} has no {col!r} column; instruction data needs 'instruction', optional "
                            f"'input', and 'output'; its columns are {list(df.columns)}")
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        ins, out = rec.get("instruction"), rec.get("output")
        if not isinstance(ins, str) or not ins.strip() or not isinstance(out, str):
            raise DataError(f"{path}, row {i + 1}: 'instruction' must be a non-empty string and 'output' a string")
        inp = rec.get("input")
        rows.append({"instruction": ins, "input": inp if isinstance(inp, str) else "", "output": out})
    return rows


def encode_example(tokenizer, example: dict, max_length: int) -> dict:
    """Token ids of prompt + response + eos, and labels masked (-100) on the prompt.

    Prompt and response are tokenized separately so the boundary is exact whatever the tokenizer
    merges. Truncation keeps the prompt's start and cuts the end of the sequence.
    """
    from .tokens import tokenize_capped

    prompt = format_prompt(example["instruction"], example.get("input"))
    p_ids = tokenize_capped(tokenizer, prompt, max_length, add_special_tokens=True)  # a long text: only a piece
    r_ids = tokenize_capped(tokenizer, example["output"], max_length, add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:max_length]
    labels = ([IGNORE] * len(p_ids) + r_ids)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


class InstructionCollator:
    """Pads input_ids (pad token), attention_mask (0) and labels (-100) on the right."""

    def __init__(self, tokenizer, pad_to_multiple_of: Optional[int] = None):
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = pad
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list) -> dict:
        n = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            n = -(-n // self.multiple) * self.multiple
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            k = n - len(f["input_ids"])
            out["input_ids"].append(list(f["input_ids"]) + [self.pad_id] * k)
            out["attention_mask"].append(list(f["attention_mask"]) + [0] * k)
            out["labels"].append(list(f["labels"]) + [IGNORE] * k)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}
