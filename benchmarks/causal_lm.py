"""Causal-LM instruction tuning: BitFit's instruct path against naive BitFit, peft LoRA and full fine-tuning.

One training step (forward in train mode, loss on the response tokens, backward, AdamW step) of each
method on randomly initialised models of real shapes, side by side in one run:

- ``full``: full fine-tuning, float32, the model's own loss (full ``[batch, seq, vocab]`` logits);
- ``naive``: naive BitFit: the same biases ``bitfit train`` trains (``bitfit.training.base.apply_bitfit``:
  zero biases added on bias-free LLaMA-style models) with ``requires_grad``, float32 stock modules,
  the model's own loss (what a hand-written BitFit loop does);
- ``lora``: peft LoRA r=8, alpha 16 (peft's default targets: q_proj, v_proj), float32, the model's loss;
- ``bitfit-plain-loss``: ``bitfit train --task instruct`` before the chunked loss: ``frozen_dtype="auto"``
  and the lean modes, the model's own loss;
- ``bitfit-no-gc``: ``bitfit train --task instruct --gradient_checkpointing false``: ``frozen_dtype="auto"``,
  lean modes and the chunked LM-head loss of :mod:`bitfit.fast.lmloss` (no logits);
- ``bitfit``: ``bitfit train --task instruct`` now (its defaults): the same with gradient (activation)
  checkpointing.

Shapes (random weights from configs written here): SmolLM2-135M (LLaMA: hidden 576, 30 layers, 9 heads,
3 kv heads, intermediate 1536, vocab 49,152, tied) and Qwen2.5-0.5B (Qwen2: hidden 896, 24 layers, 14
heads, 2 kv heads, intermediate 4864, vocab 151,936, tied, q/k/v biases). Batch: ``--batch`` rows of
``--seq`` tokens, the first 3/8 of each row a prompt (label -100), the second row's last quarter padding.

Each method runs in a fresh subprocess (one torch thread): first the same method on a tiny model (so
imports and one-off initialisation are not counted), then the model is built, the peak resident set is
reset (``/proc/self/clear_refs``) and ``--steps`` steps run. Reported: the median **CPU time** of the
steps after the first (``time.process_time``: the work done, little disturbed by other jobs on a shared
machine), the wall time, and the **peak memory**: peak resident set (``VmHWM``) during the steps minus
the resident set before the model was built (weights, gradients, optimizer state, activations,
workspace; glibc returns big blocks to the OS: ``MALLOC_MMAP_THRESHOLD_``).

``--loss-curve``: the chunked loss against the plain one on instruction data through ``bitfit train
--task instruct`` itself (a few dozen alpaca-style rows written here, a word-level tokenizer, a small
LLaMA): the logged loss of every step, float32 and bf16 frozen weights.

Usage::

    nice -n 10 python benchmarks/causal_lm.py --batch 2 --steps 3 --markdown /tmp/causal_lm.md
    python benchmarks/causal_lm.py --shapes smollm2-135m --methods naive,bitfit   # a quicker subset
    python benchmarks/causal_lm.py --loss-curve
    python benchmarks/causal_lm.py --from-json a.jsonl,b.jsonl   # the tables of earlier --json runs

Run methods separately (``--methods``, ``--json`` the same file) where one run would take too long; the
last result of a shape and method in the files wins.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ["bitfit", "bitfit-no-gc", "bitfit-plain-loss", "lora", "naive", "full"]  # cheapest first
SHAPES = ["qwen2.5-0.5b", "smollm2-135m"]
IGNORE = -100


def make_config(shape: str):
    import transformers as T

    if shape == "smollm2-135m":
        return T.LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                             intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                             max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                             bos_token_id=1, eos_token_id=2)
    if shape == "qwen2.5-0.5b":
        return T.Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                             max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                             bos_token_id=151643, eos_token_id=151643)  # Qwen2 has q/k/v biases built in
    if shape == "tiny":
        return T.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=64, vocab_size=128, tie_word_embeddings=True)
    raise SystemExit(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def make_batch(vocab: int, batch: int, seq: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, seq - seq // 4:] = 0  # a shorter row, padded
    labels = ids.clone()
    labels[:, : (3 * seq) // 8] = IGNORE  # the prompt
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build(method: str, config):
    """(model, optimizer, loss_fn) of ``method`` on a fresh random model."""
    import transformers as T

    from bitfit.fast import lmloss
    from bitfit.training.arguments import ModelArguments
    from bitfit.training.base import apply_bitfit

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    chunked = False
    if method == "full":
        pass
    elif method == "naive":
        apply_bitfit(model, ModelArguments(frozen_dtype=None, lean=False))
    elif method == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           task_type=peft.TaskType.CAUSAL_LM))
    elif method in ("bitfit", "bitfit-no-gc", "bitfit-plain-loss"):
        apply_bitfit(model, ModelArguments(frozen_dtype="auto", lean=True))
        chunked = method != "bitfit-plain-loss"
        if method == "bitfit":
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if chunked:
        def loss_fn(b):
            return lmloss.model_loss(model, b)[0]
    else:
        def loss_fn(b):
            return model(**b).loss
    return model, opt, loss_fn


def step(opt, loss_fn, batch) -> float:
    loss = loss_fn(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def child(shape: str, method: str, args) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    tiny = make_config("tiny")
    m0, o0, f0 = build(method, tiny)
    step(o0, f0, make_batch(tiny.vocab_size, 2, 16))
    del m0, o0, f0
    gc.collect()
    base = _status("VmRSS")
    config = make_config(shape)
    t0 = time.process_time()
    model, opt, loss_fn = build(method, config)
    build_cpu = time.process_time() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = make_batch(config.vocab_size, args.batch, args.seq)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current resident set
        reset = True
    except OSError:
        reset = False
    cpu, wall, losses = [], [], []
    for _ in range(args.steps):
        c0, w0 = time.process_time(), time.perf_counter()
        losses.append(step(opt, loss_fn, batch))
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    from bitfit.fast.lean import get_lean

    lean = get_lean(model)
    return {"peak": _status("VmHWM") - base, "reset": reset, "cpu": cpu, "wall": wall, "losses": losses,
            "trainable": trainable, "total": sum(p.numel() for p in model.parameters()), "build_cpu": build_cpu,
            "frozen_dtype": _precision(lean),
            "labelled": int((batch["labels"][:, 1:] != IGNORE).sum())}


def _precision(lean) -> str:
    """The frozen weights' precision as the table shows it: their dtype, or the int8 mode their matmuls run in."""
    if lean is None:
        return "float32"
    if lean.int8_fbgemm:
        return "int8-fbgemm"
    if lean.int8:
        return "int8"
    return str(lean.frozen_dtype).replace("torch.", "") if lean.frozen_dtype else "float32"


def run_child(shape: str, method: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--_child", f"{shape}:{method}", "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"  {shape} {method} failed: {res.stderr.strip().splitlines()[-3:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(shape: str, results: dict, args) -> str:
    def med(r, k):
        xs = r[k][1:] or r[k]  # the first step is the warm-up
        return statistics.median(xs)

    ref = {m: results.get(m) for m in ("naive", "lora", "full", "bitfit-plain-loss")}
    lines = [f"**{shape}** (batch {args.batch} x seq {args.seq}; "
             f"{next(iter(r['labelled'] for r in results.values() if r), 0)} labelled tokens)", "",
             "| method | frozen weights | trainable | step CPU s | x naive | x LoRA | x full | step wall s "
             "| peak MiB | x naive | x LoRA | x full | x bitfit-plain-loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m, r in results.items():
        if r is None:
            lines.append(f"| {m} | failed | | | | | | | | | | | |")
            continue
        c, w, p = med(r, "cpu"), med(r, "wall"), r["peak"]

        def x(val, key, other):
            o = ref.get(other)
            if o is None:
                return ""
            ov = med(o, key) if key != "peak" else o["peak"]
            return f"{val / ov:.2f}" if ov else ""

        dtype = "float32" if m in ("full", "naive", "lora") else r["frozen_dtype"]
        lines.append(f"| {m} | {dtype} | {r['trainable']:,} | {c:.2f} | {x(c, 'cpu', 'naive')} | {x(c, 'cpu', 'lora')} "
                     f"| {x(c, 'cpu', 'full')} | {w:.2f} | {p / 2**20:,.0f} | {x(p, 'peak', 'naive')} "
                     f"| {x(p, 'peak', 'lora')} | {x(p, 'peak', 'full')} | {x(p, 'peak', 'bitfit-plain-loss')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ loss curve on instruction data

ROWS = [
    ("Name a primary colour.", "", "Red is a primary colour."),
    ("Translate to French.", "good morning", "Bonjour."),
    ("Give the opposite of the word.", "hot", "The opposite of hot is cold."),
    ("Add the two numbers.", "two and three", "Two and three make five."),
    ("Summarise the sentence.", "The cat sat on the warm mat all afternoon.", "A cat rested on a mat."),
    ("Write a greeting for a friend.", "", "Hello my friend, it is good to see you again."),
    ("Name the capital city.", "France", "The capital of France is Paris."),
    ("Is the number even or odd?", "seven", "Seven is odd."),
    ("List three fruits.", "", "Apple, banana and cherry."),
    ("Correct the spelling.", "recieve", "The correct spelling is receive."),
    ("What is the plural?", "mouse", "The plural of mouse is mice."),
    ("Describe the weather in one word.", "rain and wind", "Stormy."),
]


def instruction_rows(n: int = 48) -> list:
    out = []
    for i in range(n):
        ins, inp, outp = ROWS[i % len(ROWS)]
        out.append({"instruction": ins if i < len(ROWS) else f"{ins} (example {i})", "input": inp, "output": outp})
    return out


def word_tokenizer(rows: list):
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from bitfit.data.instruct import format_prompt

    words = set()
    for r in rows:
        words.update(re.findall(r"\w+|[^\w\s]+", format_prompt(r["instruction"], r["input"]) + " " + r["output"]))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def write_instruct_model(folder: Path, rows: list, hidden: int = 64, layers: int = 2) -> str:
    import transformers as T

    tok = word_tokenizer(rows)
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def loss_curves(workdir: Path, frozen_dtype: str = "float32", steps: int = 8, batch: int = 4) -> dict:
    """{"chunked": [...], "plain": [...]}: per-step training losses of `bitfit train --task instruct`."""
    from bitfit.cli import main

    rows = instruction_rows()
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = workdir / "model"
    if not (model_dir / "config.json").exists():
        write_instruct_model(model_dir, rows)
    data = workdir / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = {}
    old = os.environ.get("BITFIT_LM_LOSS")
    try:
        for kind in ("plain", "chunked"):
            os.environ["BITFIT_LM_LOSS"] = kind
            out = workdir / f"run-{frozen_dtype}-{kind}"
            rc = main(["train", "--model", str(model_dir), "--task", "instruct", "--train-file", str(data),
                       "--output-dir", str(out), "--overwrite_output_dir", "true", "--max_steps", str(steps),
                       "--per_device_train_batch_size", str(batch), "--learning_rate", "3e-2",
                       "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
                       "--frozen-dtype", frozen_dtype, "--seed", "0"])
            if rc != 0:
                raise SystemExit(f"bitfit train failed ({kind}, {frozen_dtype})")
            hist = json.loads((out / "log_history.json").read_text())
            curves[kind] = [e["loss"] for e in hist if "loss" in e]
    finally:
        if old is None:
            os.environ.pop("BITFIT_LM_LOSS", None)
        else:
            os.environ["BITFIT_LM_LOSS"] = old
    return curves


def loss_curve_report(args) -> int:
    import tempfile

    torch.set_num_threads(1)
    lines = [f"`bitfit train --task instruct` on {len(instruction_rows())} alpaca-style rows (small LLaMA, "
             f"word-level tokenizer), batch 4, lr 3e-2, seed 0: training loss per step, plain loss vs chunked", "",
             "| frozen weights | step | plain | chunked | abs diff |", "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "bfloat16"):
            c = loss_curves(Path(tmp), dtype, steps=args.steps_curve)
            for i, (a, b) in enumerate(zip(c["plain"], c["chunked"])):
                lines.append(f"| {dtype} | {i + 1} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
            worst = max(abs(a - b) / max(1e-12, abs(a)) for a, b in zip(c["plain"], c["chunked"]))
            print(f"  {dtype}: {len(c['plain'])} steps, largest relative difference {worst:.2e}", flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def from_json(args) -> int:
    """The tables of earlier ``--json`` runs (several files; a later result of the same shape and method wins)."""
    heads, found = [], {}
    for name in [n.strip() for n in args.from_json.split(",") if n.strip()]:
        for line in Path(name).read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("head") and rec["head"] not in heads:
                heads.append(rec["head"])
            key = (rec["shape"], rec.get("batch", args.batch), rec.get("seq", args.seq))
            found.setdefault(key, {})[rec["method"]] = rec["result"]
    out = list(heads)
    for (shape, batch, seq), res in found.items():
        ordered = {m: res[m] for m in METHODS if m in res}
        out.append(table(shape, ordered, argparse.Namespace(batch=batch, seq=seq)))
    text = "\n\n".join(out)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="steps per method (the first is the warm-up)")
    ap.add_argument("--markdown", help="also write the tables to this file")
    ap.add_argument("--json", help="append each method's raw result to this JSONL file as it finishes")
    ap.add_argument("--loss-curve", action="store_true", help="the chunked vs plain loss curve on instruction data")
    ap.add_argument("--steps-curve", type=int, default=8)
    ap.add_argument("--from-json", help="comma list of --json files: print (and --markdown) their tables, run nothing")
    ap.add_argument("--_child", dest="child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        shape, method = args.child.split(":")
        print(json.dumps(child(shape, method, args)))
        return 0
    if args.loss_curve:
        return loss_curve_report(args)
    if args.from_json:
        return from_json(args)
    from bitfit.fast.hardware import choose_frozen_dtype, cpu_summary

    head = (f"CPU {cpu_summary()}; frozen_dtype=auto -> "
            f"{choose_frozen_dtype('cpu').dtype}; torch {torch.__version__}, 1 thread; {time.strftime('%Y-%m-%d')}")
    print(head, flush=True)
    out = [head]
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        results = {}
        for m in [m.strip() for m in args.methods.split(",") if m.strip()]:
            t0 = time.perf_counter()
            r = run_child(shape, m, args)
            results[m] = r
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({"shape": shape, "method": m, "result": r, "head": head, "batch": args.batch,
                                        "seq": args.seq, "steps": args.steps}) + "\n")
            if r is not None:
                print(f"  {shape} {m}: cpu/step {[round(x, 2) for x in r['cpu']]}, peak {r['peak'] / 2**20:,.0f} MiB, "
                      f"loss {r['losses'][0]:.4f}, {r['trainable']:,} trainable ({time.perf_counter() - t0:.0f} s wall)",
                      flush=True)
        out.append(table(shape, results, args))
        print("\n" + out[-1] + "\n", flush=True)
    if args.markdown:
        Path(args.markdown).write_text("\n\n".join(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
