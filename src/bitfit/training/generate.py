"""Generation with a finished instruction-tuning run (`bitfit generate`): the response of the trained
causal LM to an instruction, in the Alpaca template unless raw."""

from typing import Optional

import torch

from ..errors import BitFitError
from .arguments import DataArguments, ModelArguments
from .restore import load_trained
from .runfolder import load_run


def generate(model_args: ModelArguments, prompt: str, input: Optional[str] = None, max_new_tokens: int = 128,
             raw: bool = False, do_sample: bool = False, temperature: float = 1.0) -> str:
    """The response of an instruction-tuned run to ``prompt`` (Alpaca template unless ``raw``)."""
    from ..data.instruct import format_prompt

    _, info = load_run(model_args.adapter) if model_args.adapter else ({}, None)
    if info is not None and info.kind != "instruct":
        raise BitFitError(f"generate needs an instruction-tuned run (--task instruct); {model_args.adapter} is a "
                          f"{info.task or 'own-files'} {'regression' if info.regression else 'classification'} run: "
                          "use `bitfit eval` / `bitfit predict`")
    model, tokenizer, _ = load_trained(model_args, DataArguments(task="instruct"))
    text = prompt if raw else format_prompt(prompt, input)
    enc = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kwargs["temperature"] = temperature
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
