"""`bitfit merge RUN --output DIR`: a run merged into its base as a plain transformers folder (weights with the
trained biases folded in, config, tokenizer, model card) that loads with ``transformers.pipeline`` alone;
`bitfit merge RUN --gguf FILE`: a run on a GGUF base merged into a new GGUF file (serving/gguf_merge.py)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .. import add_verbose, command
from ...errors import BitFitError
from ...core.io import file_mode


def merge_run(run: str, output: str, base=None, gguf_file=None) -> Path:
    """Merge the run folder ``run`` into its base and save a plain transformers folder at ``output`` (written
    beside it and renamed into place, so a failure leaves nothing half-written)."""
    import bitfit

    from ...artifacts.store import folder_lock, make_side_folder, remove_stale_side_folders
    from ...training.arguments import ModelArguments
    from ...training.restore import load_trained

    out = Path(os.path.abspath(os.path.expanduser(output)))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BitFitError(f"--output {output} exists and is not an empty folder; choose a new folder")
    model, tokenizer, info = load_trained(ModelArguments(adapter=run, model=base, gguf_file=gguf_file))
    plain = bitfit.merge(model)
    for p in plain.parameters():
        p.requires_grad_(True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_side_folders(out, "merge")  # what killed merges to this --output left
        # written beside the target, renamed into place when complete: a failure leaves no half-written model
        tmp = make_side_folder(out, "merge")
    except OSError as exc:
        raise BitFitError(f"--output {output}: cannot write in {out.parent} ({exc.strerror or exc}); choose a "
                          "folder you can write to") from None
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        card = Path(os.path.expanduser(run)) / "README.md"
        text = card.read_text(encoding="utf-8") if card.exists() else "---\nlibrary_name: bitfit\n---\n"
        text = text.replace("library_name: bitfit", "library_name: transformers", 1)
        pipeline_tag = "text-generation" if info is not None and info.kind == "instruct" else "text-classification"
        text = text.replace("---\n", f"---\npipeline_tag: {pipeline_tag}\n", 1)
        text += (f"\nThis folder is the BitFit run `{Path(run).name}` merged into its base: a plain transformers "
                 f"model (`transformers.pipeline(\"{pipeline_tag}\", model=...)`), no bitfit needed.\n")
        (tmp / "README.md").write_text(text, encoding="utf-8")
        for f in tmp.rglob("*"):  # save_pretrained's safetensors files are 0600 whatever the umask
            if f.is_file():
                os.chmod(f, file_mode())
        with folder_lock(out.parent):  # two merges to one --output: the second sees the first's folder
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise BitFitError(f"--output {output} was written by another process while this merge ran; "
                                  "nothing was changed: choose a new folder")
            if out.exists():
                out.rmdir()  # empty (checked above)
            os.rename(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BitFitError(f"--output {output}: writing the merged model failed ({exc.strerror or exc}); nothing "
                          "was written: free disk space or choose another folder") from None
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if type(exc).__name__ == "SafetensorError":  # safetensors' own error for a failed write (full disk, ...)
            raise BitFitError(f"--output {output}: writing the merged model failed ({exc}); nothing was written: "
                              "free disk space or choose another folder") from None
        raise
    return out


def merge_run_gguf(run: str, output: str, base=None, gguf_file=None) -> Path:
    """Merge the run folder ``run`` (trained on a GGUF file) into that file and write the GGUF ``output`` for
    llama.cpp / ollama (:func:`bitfit.serving.gguf_merge.write_merged_gguf`)."""
    import bitfit

    from ...core.models import split_gguf
    from ...serving.gguf_merge import write_merged_gguf
    from ...training.arguments import ModelArguments
    from ...training.restore import load_trained
    from ...training.runfolder import load_run

    meta, _ = load_run(run)
    model_name = base or meta.get("base_model")
    folder, name = split_gguf(model_name) if model_name else (None, None)
    name = gguf_file or name or (None if base else meta.get("gguf_file"))
    if not name and model_name and os.path.isdir(os.path.expanduser(str(model_name))):
        recorded = str(meta.get("base_model") or "")
        name = meta.get("gguf_file") or (os.path.basename(recorded) if recorded.endswith(".gguf") else None)
    path = os.path.join(os.path.expanduser(str(folder)), name) if name else None
    if not path or not os.path.isfile(path):
        raise BitFitError(f"--gguf needs a run trained on a GGUF file; {run} records the base {model_name!r}"
                          f"{'' if not path else f' and {path} is not a file'}: pass --model path/to/base.gguf, "
                          "or merge with --output DIR")
    model, _, _ = load_trained(ModelArguments(adapter=run, model=base, gguf_file=gguf_file))
    try:
        merged = bitfit.merge(model)
    except BitFitError as exc:  # e.g. added RMSNorm biases: no place in the model, so none in llama.cpp either
        raise BitFitError(f"{exc}; for a GGUF file, train with --preset attention (q/k/v/output biases, which "
                          "llama.cpp loads)") from None
    return write_merged_gguf(path, merged, output)


@command("merge", "merge a trained run into its base: a plain transformers folder (weights, tokenizer, model card)")
def main(argv: list) -> int:
    from .train import _env

    _env()
    p = argparse.ArgumentParser(
        prog="bitfit merge",
        description="Fold a `bitfit train` run's trained biases and head into its base model and save a plain "
        "transformers folder (config, weights, tokenizer, model card README.md) that loads without bitfit, e.g. "
        "transformers.pipeline('text-classification', model=DIR); or, with --gguf FILE, a run trained on a GGUF "
        "file merged into a new GGUF file for llama.cpp / ollama.")
    p.add_argument("run", metavar="RUN", help="the output folder of `bitfit train`")
    p.add_argument("--output", default=None, metavar="DIR", help="new folder to write")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="instead of a folder, write a new GGUF file for llama.cpp / ollama: the run's GGUF base "
                   "with the trained biases added (attention q/k/v/output biases only)")
    p.add_argument("--model", default=None, metavar="MODEL",
                   help="the base model (default: the one the run records)")
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="GGUF file inside --model's folder (default: the one the run records)")
    add_verbose(p)
    args = p.parse_args(argv)
    if (args.output is None) == (args.gguf is None):
        p.error("pass one of --output DIR (a transformers folder) or --gguf FILE (a GGUF file for llama.cpp)")
    if args.gguf is not None:
        out = merge_run_gguf(args.run, args.gguf, args.model, args.gguf_file)
        print(f"bitfit merge: merged GGUF written to {out}", file=sys.stderr)
        print(out)
        return 0
    out = merge_run(args.run, args.output, args.model, args.gguf_file)
    print(f"bitfit merge: plain transformers model written to {out}", file=sys.stderr)
    print(out)
    return 0
