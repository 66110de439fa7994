"""The two matmuls of a frozen Linear in a BitFit step, float32 against int8 on fbgemm: time and error.

Forward ``x @ W^T`` and input gradient ``g @ W`` on the BERT-base FFN shape (2048 tokens x 768 -> 3072),
one thread, process CPU time (median of ``--repeats``), for

- float32 (``torch.matmul``), and for context bf16 and ``torch._int_mm`` (the ``int8`` mode's kernel);
- fbgemm int8, per-tensor activation scale: ``torch.ops.quantized.linear_dynamic`` as it comes;
- fbgemm int8, row-wise scales: what ``frozen_dtype="int8-fbgemm"`` runs (bitfit.fast.int8_fbgemm).

Relative error against float32 (Frobenius, and the mean over rows of each row's relative error) on
random activations and on real ones: the inputs of MiniLM-L6's FFN layers on SST-2 sentences and the
gradients arriving at them (pretrained weights, one backward of the classification loss).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/int8_matmul.py
    # the AVX2 kernels of PyTorch, fbgemm, oneDNN and MKL on an AVX-512 machine (torch._int_mm's own
    # check of the CPU is not capped: its figure stays the AVX-512 one)
    ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        OMP_NUM_THREADS=1 python benchmarks/int8_matmul.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch


def cpu_ms(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        c = time.process_time()
        fn()
        out.append(time.process_time() - c)
    return 1000.0 * statistics.median(out)


def errors(y: torch.Tensor, ref: torch.Tensor) -> str:
    fro = ((y - ref).norm() / ref.norm()).item()
    rows = ((y - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).mean().item()
    return f"{100 * fro:.2f}% / {100 * rows:.2f}%"


def real_activations(glue: str, rows: int):
    """[(name, x, W)] and [(name, g, W)] from MiniLM-L6's FFN layers on SST-2 sentences."""
    import csv

    import transformers as T

    from bitfit.core.models import resolve_model

    path = resolve_model("minilm")
    tok = T.AutoTokenizer.from_pretrained(path)
    model = T.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with open(Path(glue) / "SST-2" / "dev.tsv", newline="") as f:
        data = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:rows]
    enc = tok([r["sentence"] for r in data], padding=True, truncation=True, max_length=64, return_tensors="pt")
    enc["labels"] = torch.tensor([int(r["label"]) for r in data])
    keep = enc["attention_mask"].reshape(-1).bool()
    fwd, bwd, hooks = [], [], []
    layer = model.bert.encoder.layer[len(model.bert.encoder.layer) // 2]
    for name, lin in (("intermediate.dense", layer.intermediate.dense), ("output.dense", layer.output.dense)):
        def pre(mod, args, name=name):
            fwd.append((name, args[0].detach().reshape(-1, args[0].shape[-1])[keep], mod.weight.detach()))

        def back(mod, gin, gout, name=name):
            bwd.append((name, gout[0].detach().reshape(-1, gout[0].shape[-1])[keep], mod.weight.detach()))
        hooks += [lin.register_forward_pre_hook(pre), lin.register_full_backward_hook(back)]
    model.train()
    for p in model.parameters():
        p.requires_grad_(p.dim() == 1 or p is model.classifier.weight)
    model(**enc).loss.backward()
    for h in hooks:
        h.remove()
    return fwd, bwd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-out", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--glue", default=os.environ.get(
        "BITFIT_GLUE_DIR", str(Path(__file__).resolve().parents[2] / "shared/data/glue")),
        help="GLUE folder for the real-activation errors (skipped where SST-2 is missing)")
    ap.add_argument("--real-rows", type=int, default=256, help="SST-2 dev sentences for the real activations")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from bitfit.fast import int8_fbgemm
    from bitfit.fast.hardware import cpu_summary
    from bitfit.fast.int8 import rowwise_int8

    print(f"CPU: {cpu_summary()}; one thread, CPU time, median of {args.repeats}")
    if not int8_fbgemm.available():
        print("PyTorch's fbgemm engine does not run here")
        return 1
    levels = int8_fbgemm.weight_levels()
    print(f"fbgemm weights: {'8-bit' if levels == 127 else '7-bit (vpmaddubsw would saturate)'}")
    linear_dynamic = torch.ops.quantized.linear_dynamic
    g = torch.Generator().manual_seed(0)
    T, din, dout = args.tokens, args.d_in, args.d_out
    w = torch.randn(dout, din, generator=g) * 0.02
    x = torch.randn(T, din, generator=g)
    grad = torch.randn(T, dout, generator=g) * 1e-3
    pf, pb = int8_fbgemm.pack_weight(w, levels), int8_fbgemm.pack_weight(w.t(), levels)
    xb, wb, gb = x.bfloat16(), w.bfloat16(), grad.bfloat16()
    wq, ws = rowwise_int8(w)
    xq, _ = rowwise_int8(x)
    gq, _ = rowwise_int8(grad, ws.reshape(-1))
    rows = [
        ("float32", lambda: x @ w.t(), lambda: grad @ w),
        ("bf16 (context)", lambda: xb @ wb.t(), lambda: gb @ wb),
        ("torch._int_mm int8 (the int8 mode's kernel, context)", lambda: torch._int_mm(xq, wq.t()),
         lambda: torch._int_mm(gq, wq)),
        ("fbgemm int8, per-tensor activation scale", lambda: linear_dynamic(x, pf, False),
         lambda: linear_dynamic(grad, pb, False)),
        ("**fbgemm int8, row-wise scales (int8-fbgemm)**", lambda: int8_fbgemm.rowwise_linear(x, pf),
         lambda: int8_fbgemm.rowwise_linear(grad, pb)),
    ]
    times = []
    for name, f, b in rows:
        times.append((name, cpu_ms(f, args.repeats), cpu_ms(b, args.repeats)))
        print(f"  {name}: forward {times[-1][1]:.1f} ms, input gradient {times[-1][2]:.1f} ms", flush=True)
    f32f, f32b = times[0][1], times[0][2]
    print(f"\n{T} x {din} -> {dout}\n\n| kernel | forward x @ W^T | input gradient g @ W |\n|---|---:|---:|")
    for name, tf, tb in times:
        print(f"| {name} | {tf:.1f} ms ({tf / f32f:.2f}x) | {tb:.1f} ms ({tb / f32b:.2f}x) |")

    cases = [("random, forward", x, w, pf), ("random, input gradient", grad, w.t(), pb)]
    if (Path(args.glue) / "SST-2" / "dev.tsv").exists():
        fwd, bwd = real_activations(args.glue, args.real_rows)
        for name, xr, wr in fwd:
            cases.append((f"MiniLM {name} forward ({xr.shape[0]} SST-2 tokens)", xr, wr,
                          int8_fbgemm.pack_weight(wr, levels)))
        for name, gr, wr in bwd:
            cases.append((f"MiniLM {name} input gradient", gr, wr.t(), int8_fbgemm.pack_weight(wr.t(), levels)))
    print("\nrelative error against float32 (Frobenius / mean of rows)\n")
    print("| data | fbgemm per-tensor | **fbgemm row-wise** | _int_mm, row-wise both operands |\n|---|---:|---:|---:|")
    for name, a, wt, packed in cases:
        ref = a @ wt.t()
        qa, sa = rowwise_int8(a)
        qw, sw = rowwise_int8(wt)
        intmm = torch._int_mm(qa, qw.t()).float() * sa * sw.reshape(1, -1)
        print(f"| {name} | {errors(linear_dynamic(a, packed, False), ref)} | "
              f"{errors(int8_fbgemm.rowwise_linear(a, packed), ref)} | {errors(intmm, ref)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
