"""One training step of BitFit against the alternatives, side by side in one process.

Methods (each on its own copy of the same randomly initialised model, task head included):

- ``full``: full fine-tuning (every parameter trains, AdamW);
- ``naive``: naive BitFit: ``requires_grad`` only on biases + head, nothing else changed;
- ``bitfit-fp32-stock`` / ``bitfit-fp32-lean``: ``bitfit.apply`` with ``lean=False`` / ``True``;
- ``bitfit-bf16-stock`` / ``bitfit-bf16-lean``: the same with ``frozen_dtype="bfloat16"``;
- ``bitfit-int8-lean``: ``frozen_dtype="int8"`` (bf16 base, int8 training matmuls);
- ``bitfit-int8fbgemm-lean``: ``frozen_dtype="int8-fbgemm"`` (float32 base, fbgemm int8 training matmuls);
- ``bitfit-auto-lean``: ``frozen_dtype="auto"`` (what ``bitfit train`` runs: the fastest mode the machine's probe picks);
- ``bitfit-default``: what ``bitfit train`` runs by default: ``bitfit-auto-lean`` with the model's dropout
  set to 0 (BitFit's default dropout; the other methods keep the config's 0.1);
- ``peft-auto-lean``: the same BitFit through peft (``get_peft_model`` with a
  ``bitfit.peft.BitFitPeftConfig(frozen_dtype="auto")``): the peft route's step against the native one;
- ``lora``: peft LoRA r=8, alpha=16 (peft's default targets: query/value), head trained;
- ``beft``: peft BEFT (``PeftType.BEFT``, peft >= 0.21), head trained.

A step is forward in train mode (dropout active) + cross-entropy + backward + AdamW step.
Measured:

- step time: median over ``--repeats`` rounds; each round runs every method once, in an order
  rotated by one each round (so no method always runs first or after the same neighbour).
  Both the process CPU time (``time.process_time``; with one thread it is the work done, and
  much less disturbed by other jobs on a shared machine) and the wall time are reported;
- saved activations: bytes of the distinct storages autograd saves during the forward,
  counted with ``torch.autograd.graph.saved_tensors_hooks`` (the model's parameters excluded);
- peak memory: each method in a fresh subprocess (``--no-peak`` skips): the process's peak
  resident set (``VmHWM``) during two training steps minus its resident set before the
  model was built, i.e. model + gradients + optimizer state + activations + workspace. The
  peak is reset after model set-up (``/proc/self/clear_refs``), so a float32 model cast to
  bf16 is measured at its bf16 size. glibc is told to return big blocks to the OS
  (``MALLOC_MMAP_THRESHOLD_``), so freed memory does not linger in the count.

Usage::

    python benchmarks/train_step.py --small                       # tiny BERT, seconds
    python benchmarks/train_step.py --config ../shared/models/bert-base-uncased-noweights \\
        --seq 128 --batch 16 --repeats 3 --threads 1 --markdown docs/bench.md
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = [
    "full",
    "naive",
    "bitfit-fp32-stock",
    "bitfit-fp32-lean",
    "bitfit-bf16-stock",
    "bitfit-bf16-lean",
    "bitfit-int8-lean",
    "bitfit-int8fbgemm-lean",
    "bitfit-auto-lean",
    "bitfit-default",
    "peft-auto-lean",
    "lora",
    "beft",
]
FROZEN = {"fp32": None, "bf16": "bfloat16", "int8": "int8", "int8fbgemm": "int8-fbgemm", "auto": "auto"}  # auto: bitfit.fast.hardware's choice
SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, vocab_size=30522)


def build_config(args):
    import transformers as T

    if args.small:
        config = T.BertConfig(**SMALL)
    else:
        config = T.AutoConfig.from_pretrained(args.config)
    config.num_labels = 2
    return config


def build(method: str, config, seed: int = 0):
    """(model, optimizer) for ``method`` on a fresh random model."""
    import transformers as T

    import bitfit

    torch.manual_seed(seed)
    if method == "bitfit-default":  # bitfit train's dropout default for BitFit runs (bitfit.training.defaults.BITFIT_DROPOUT)
        from bitfit.training.defaults import BITFIT_DROPOUT

        config = copy.deepcopy(config)
        for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if hasattr(config, attr):
                setattr(config, attr, BITFIT_DROPOUT)
    model = T.AutoModelForSequenceClassification.from_config(config)
    pooler = getattr(getattr(model, model.base_model_prefix, None), "pooler", None)
    if pooler is not None:  # as in the pretrained checkpoint (a fresh init's all-zero bias would make
        with torch.no_grad():  # bitfit's pooler_head train the pooler with the head, as for all-MiniLM)
            pooler.dense.bias.normal_(0.0, 0.02)
    if method == "full":
        pass
    elif method == "naive":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name.startswith("classifier."))
    elif method == "bitfit-default":
        bitfit.apply(model, frozen_dtype="auto")
    elif method.startswith("bitfit-"):
        _, dtype, mode = method.split("-")
        bitfit.apply(model, frozen_dtype=FROZEN[dtype], lean=(mode == "lean"))
    elif method.startswith("peft-"):
        import peft

        from bitfit.peft import BitFitPeftConfig

        _, dtype, mode = method.split("-")
        cfg = BitFitPeftConfig(frozen_dtype=FROZEN[dtype], lean=(mode == "lean"), task_type=peft.TaskType.SEQ_CLS)
        model = peft.get_peft_model(model, cfg)
    elif method in ("lora", "beft"):
        import peft

        if method == "lora":
            cfg = peft.LoraConfig(r=8, lora_alpha=16, task_type=peft.TaskType.SEQ_CLS)
        else:
            if not hasattr(peft, "BeftConfig"):
                raise SystemExit(f"peft {peft.__version__} has no BEFT")
            cfg = peft.BeftConfig(task_type=peft.TaskType.SEQ_CLS)
        model = peft.get_peft_model(model, cfg)
    else:
        raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    return model, opt


def make_batch(config, batch: int, seq: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(1000, config.vocab_size // 2), config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[: batch // 2, seq - seq // 4 :] = 0  # half the rows padded by a quarter
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def step(model, opt, batch):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def saved_bytes(model, opt, batch) -> int:
    """One full step (it doubles as the warm-up) whose forward's saved tensors are counted."""
    from bitfit.fast.lean import saved_activation_bytes

    n, loss = saved_activation_bytes(lambda: model(**batch).loss, params=[*model.parameters(), *model.buffers()])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return n


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_child(args) -> None:
    """Subprocess body: peak resident memory of two steps of one method, as JSON on stdout."""
    torch.set_num_threads(args.threads)
    config = build_config(args)
    batch = make_batch(config, args.batch, args.seq)
    # the same method on a tiny model first, so imports and one-off initialisation are in `base`
    import transformers as T

    tiny = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        vocab_size=64, num_labels=2)
    m0, o0 = build(args.peak_child, tiny)
    step(m0, o0, make_batch(tiny, 2, 8))
    del m0, o0
    gc.collect()
    base = _rss("VmRSS")
    model, opt = build(args.peak_child, config)
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        reset = True
    except OSError:
        reset = False
    for _ in range(2):
        step(model, opt, batch)
    print(json.dumps({"peak": _rss("VmHWM") - base, "reset": reset}))


def run_peak(method: str, args) -> int | None:
    cmd = [sys.executable, __file__, "--_peak", method, "--seq", str(args.seq), "--batch", str(args.batch),
           "--threads", str(args.threads)]
    cmd += ["--small"] if args.small else ["--config", str(args.config)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        print(f"  peak memory of {method} failed: {res.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak"]


def mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def accuracy(args) -> int:
    """Real-data check: BitFit on the packaged MiniLM, float32 vs bf16 (and lean vs stock), same seed."""
    import csv

    import transformers as T

    import bitfit
    from bitfit.core.models import resolve_model

    torch.set_num_threads(args.threads)
    task_dir = Path(args.glue) / args.accuracy
    cols = {"SST-2": ("sentence", None), "RTE": ("sentence1", "sentence2")}[args.accuracy]

    def read(split, n):
        with open(task_dir / f"{split}.tsv", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        rows = rows[:n]
        labels = [int(r["label"]) if r["label"].isdigit() else int(r["label"] == "not_entailment") for r in rows]
        return [r[cols[0]] for r in rows], [r[cols[1]] for r in rows] if cols[1] else None, labels

    path = resolve_model("minilm")
    tok = T.AutoTokenizer.from_pretrained(path)
    train, dev = read("train", args.train_rows), read("dev", args.dev_rows)

    def encode(data, idx):
        a, b, y = data
        enc = tok([a[i] for i in idx], [b[i] for i in idx] if b else None, truncation=True, max_length=args.seq,
                  padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([y[i] for i in idx])
        return enc

    results = []
    for mode in args.modes.split(","):
        dtype, lean = mode.split("-")
        torch.manual_seed(0)
        model = T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        bitfit.apply(model, frozen_dtype=FROZEN[dtype], lean=(lean == "lean"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            model.train()
            order = torch.randperm(len(train[2]), generator=g).tolist()
            for i in range(0, len(order), args.batch):
                model(**encode(train, order[i: i + args.batch])).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        train_s = time.perf_counter() - t0
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(dev[2]), 64):
                enc = encode(dev, range(i, min(i + 64, len(dev[2]))))
                correct += (model(**enc).logits.argmax(-1) == enc["labels"]).sum().item()
        acc = correct / len(dev[2])
        results.append((mode, acc, train_s))
        print(f"  {mode}: dev accuracy {acc:.4f} ({len(dev[2])} rows), training {train_s:.0f}s", flush=True)
    lines = [f"MiniLM-L6 BitFit on {args.accuracy}: {len(train[2])} train rows x {args.epochs} epochs, "
             f"batch {args.batch}, lr {args.lr}, max_length {args.seq}; dev {len(dev[2])} rows", "",
             "| mode | dev accuracy | training s |", "|---|---:|---:|"]
    lines += [f"| {m} | {a:.4f} | {t:.0f} |" for m, a, t in results]
    print("\n" + "\n".join(lines))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.environ.get(
        "BITFIT_BERT_BASE", str(Path(__file__).resolve().parents[2] / "shared/models/bert-base-uncased-noweights")),
        help="model folder or config (default: the BERT-base config in ../shared/models)")
    ap.add_argument("--small", action="store_true", help="a small BERT (4 layers, 256 wide) for a quick run")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1 = the reference setting)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--peak-only", action="store_true", help="only the peak-memory subprocesses (no timing)")
    ap.add_argument("--markdown", help="also write the table to this file")
    ap.add_argument("--_peak", dest="peak_child", help=argparse.SUPPRESS)
    acc = ap.add_argument_group("real-data accuracy check (instead of the timing table)")
    acc.add_argument("--accuracy", choices=["SST-2", "RTE"], help="train MiniLM with BitFit on this GLUE task")
    acc.add_argument("--glue", default=os.environ.get(
        "BITFIT_GLUE_DIR", str(Path(__file__).resolve().parents[2] / "shared/data/glue")))
    acc.add_argument("--modes", default="fp32-stock,fp32-lean,bf16-lean",
                     help="comma list of {fp32,bf16,int8,int8fbgemm}-{stock,lean}")
    acc.add_argument("--train-rows", type=int, default=1000)
    acc.add_argument("--dev-rows", type=int, default=872)
    acc.add_argument("--epochs", type=int, default=2)
    acc.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.accuracy:
        if args.seq == 128 and "--seq" not in (argv or sys.argv):
            args.seq = 64
        return accuracy(args)
    if args.peak_child:
        peak_child(args)
        return 0
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    config = build_config(args)
    batch = make_batch(config, args.batch, args.seq)
    shape = (f"{'small BERT' if args.small else Path(args.config).name}: {config.num_hidden_layers} layers, "
             f"hidden {config.hidden_size}, seq {args.seq}, batch {args.batch}, {args.threads} thread(s), "
             f"torch {torch.__version__}")
    from bitfit.fast.hardware import choose_frozen_dtype, cpu_summary

    print(f"CPU: {cpu_summary()}", flush=True)
    shape += f"; CPU {cpu_summary()}"
    if any(m.startswith("bitfit-auto") or m == "bitfit-default" for m in methods):
        shape += f"; {choose_frozen_dtype('cpu').describe()}"
    print(shape, flush=True)
    if args.peak_only:
        peaks = {m: run_peak(m, args) for m in methods}
        full = peaks.get("full")
        lines = [f"{shape}; peak resident memory of two steps, each method in a fresh process", "",
                 "| method | peak MiB | x full | x naive |", "|---|---:|---:|---:|"]
        for m in methods:
            r_full = f"{peaks[m] / full:.2f}" if full and peaks[m] else ""
            r_naive = f"{peaks[m] / peaks['naive']:.2f}" if peaks.get("naive") and peaks[m] else ""
            lines.append(f"| {m} | {mib(peaks[m])} | {r_full} | {r_naive} |")
        table = "\n".join(lines)
        print("\n" + table)
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        return 0

    models, saved, trainable = {}, {}, {}
    for m in methods:
        model, opt = build(m, config)
        trainable[m] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        saved[m] = saved_bytes(model, opt, batch)  # also the warm-up step
        models[m] = (model, opt)
        print(f"  built {m}: {trainable[m]:,} trainable, saved activations {mib(saved[m])} MiB", flush=True)

    times = {m: [] for m in methods}
    cpu = {m: [] for m in methods}
    for r in range(args.repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            model, opt = models[m]
            t0, c0 = time.perf_counter(), time.process_time()
            step(model, opt, batch)
            times[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
        print(f"  round {r + 1}/{args.repeats}: "
              + ", ".join(f"{m} {times[m][-1]:.2f}s (cpu {cpu[m][-1]:.2f}s)" for m in methods), flush=True)
    del models
    gc.collect()

    peaks = {m: None for m in methods}
    if not args.no_peak:
        for m in methods:
            peaks[m] = run_peak(m, args)
            print(f"  peak {m}: {mib(peaks[m])} MiB", flush=True)

    med = {m: statistics.median(times[m]) for m in methods}
    cmed = {m: statistics.median(cpu[m]) for m in methods}
    ref_naive = "naive" if "naive" in methods else None
    ref_full = "full" if "full" in methods else None

    def ratio(val, ref):
        return "" if ref is None or val is None or ref is None else f"{val / ref:.2f}"

    lines = [
        f"{shape}; median of {args.repeats} rotated rounds",
        "",
        "| method | trainable | step CPU s | x naive | x full | step wall s (min-max) | x naive | x full "
        "| saved act. MiB | x naive | peak MiB | x full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        lines.append(
            f"| {m} | {trainable[m]:,} | {cmed[m]:.2f} | {ratio(cmed[m], cmed.get(ref_naive))} "
            f"| {ratio(cmed[m], cmed.get(ref_full))} | {med[m]:.2f} ({min(times[m]):.2f}-{max(times[m]):.2f}) "
            f"| {ratio(med[m], med.get(ref_naive))} | {ratio(med[m], med.get(ref_full))} "
            f"| {mib(saved[m])} | {ratio(saved[m], saved.get(ref_naive))} "
            f"| {mib(peaks[m])} | {ratio(peaks[m], peaks.get(ref_full))} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
