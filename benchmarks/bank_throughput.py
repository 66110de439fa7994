"""Bias bank throughput: task mixes K = 1, 2, 8, 32 over one frozen base.

For each mix of K tasks in a batch of R rows (row i uses task i % K) it measures rows/s of

* ``plain``    the base model alone on the whole batch (one task, no bank): the ceiling;
* ``group``    the bank, rows grouped by task, biases swapped per group;
* ``gather``   the bank, one pass with per-row gathered biases;
* ``auto``     the bank's automatic choice (bitfit.bank.choose_strategy);
* ``separate`` K separate task models, each running its own rows (timed with one loaded
  model per group; its memory is K full models, computed, not allocated);

and prints ratios side by side, plus the memory of the bank vs K separate models.
A second table sweeps rows per task at a fixed batch to locate the group/gather crossover.

    python benchmarks/bank_throughput.py                  # small BERT shape, 1 thread, ~1 min
    python benchmarks/bank_throughput.py --shape base     # BERT-base shape (random weights)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers as T  # noqa: E402

import bitfit  # noqa: E402
from bitfit.bank import BiasBank, choose_strategy  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def build(shape: str, n_tasks: int, tmp: Path, labels=(2, 3)):
    cfg = T.BertConfig(vocab_size=30522, max_position_embeddings=512, **SHAPES[shape])
    torch.manual_seed(0)
    base = T.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    work = {}  # one working BitFit copy per label count, re-"trained" before each save
    for nl in labels:
        m = copy.deepcopy(base)
        if nl != cfg.num_labels:
            m.classifier = torch.nn.Linear(cfg.hidden_size, nl)
            m.config.num_labels = m.num_labels = nl
        work[nl] = bitfit.apply(m)
    paths = {}
    for k in range(n_tasks):
        m = work[labels[k % len(labels)]]
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        paths[f"t{k}"] = bitfit.save(m, tmp / f"t{k}")
    return base, paths


def timeit(fns: dict, repeats: int) -> dict:
    """Best-of-``repeats`` seconds per function, interleaved so that load from other processes
    hits every contender alike."""
    for fn in fns.values():  # warm-up
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:,.1f} MB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--rows", type=int, default=32, help="rows per batch (default 32)")
    p.add_argument("--seq", type=int, default=32, help="tokens per row (default 32)")
    p.add_argument("--mixes", default="1,2,8,32", help="task counts K to measure (default 1,2,8,32)")
    p.add_argument("--sweep-rows", default="8,32", help="batch sizes for the crossover sweep ('' to skip)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per contender; the best is kept")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier timings on a shared machine; 0 = torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mixes = [int(x) for x in args.mixes.split(",") if x]
    sweep = [int(x) for x in args.sweep_rows.split(",") if x]
    n_tasks = max(mixes + [args.rows])

    t0 = time.time()
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        base, paths = build(args.shape, n_tasks, Path(d))
        art_bytes = sum(f.stat().st_size for f in Path(paths["t0"]).iterdir())
        print(f"# bank throughput: BERT {args.shape} shape {SHAPES[args.shape]}, {args.rows} rows x {args.seq} "
              f"tokens, torch threads {torch.get_num_threads()}, best of {args.repeats}, interleaved")
        print(f"# {n_tasks} task artifacts built in {time.time() - t0:.0f} s; "
              f"one artifact = {art_bytes / 1024:.1f} KiB on disk\n")
        bank = BiasBank(base, {})
        for name in list(paths)[: max(mixes)]:
            bank.add_task(name, paths[name])
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(1000, 30000, (args.rows, args.seq), generator=g)
        mask = torch.ones_like(ids)
        single = bitfit.load(copy.deepcopy(base), paths["t0"]).eval()  # one task model, for plain/separate

        def run_separate(tasks):
            for t in dict.fromkeys(tasks):
                idx = torch.tensor([i for i, x in enumerate(tasks) if x == t])
                single(input_ids=ids[idx], attention_mask=mask[idx])

        mem = bank.memory()
        per_task = statistics.mean(mem["tasks"].values())
        full_model = mem["base"] + per_task
        rows = []
        print("| K tasks | rows/task | plain rows/s | group rows/s | gather rows/s | gather/group | auto picks "
              "| auto / plain | separate models rows/s | bank memory | K models memory |")
        print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
        for K in mixes:
            tasks = [f"t{i % K}" for i in range(args.rows)]
            t = timeit({
                "plain": lambda: single(input_ids=ids, attention_mask=mask),
                "group": lambda: bank(tasks=tasks, strategy="group", input_ids=ids, attention_mask=mask),
                "gather": lambda: bank(tasks=tasks, strategy="gather", input_ids=ids, attention_mask=mask),
                "separate": lambda: run_separate(tasks),
            }, args.repeats)
            t_plain, tg, th, ts = t["plain"], t["group"], t["gather"], t["separate"]
            pick = choose_strategy(args.rows, K)
            ta = tg if pick == "group" else th  # auto = the strategy it picks
            bank_mem = mem["base"] + per_task * K
            r = args.rows
            rows.append((K, tg, th))
            print(f"| {K} | {r / K:g} | {r / t_plain:,.0f} | {r / tg:,.0f} | {r / th:,.0f} | {tg / th:.2f}x | {pick} "
                  f"| {t_plain / ta:.2f}x | {r / ts:,.0f} | {fmt_mb(bank_mem)} | {fmt_mb(full_model * K)} "
                  f"({full_model * K / bank_mem:.1f}x) |", flush=True)

        if sweep:
            print("\n# crossover sweep: gather/group throughput ratio (>1: per-row gathering is faster)\n")
            ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n_tasks]
            print("| rows \\ rows per task | " + " | ".join(f"K={k}" for k in ks) + " |")
            print("|---|" + "---:|" * len(ks))
            for R in sweep:
                ids_r = ids[:R] if R <= args.rows else ids.repeat(R // args.rows + 1, 1)[:R]
                mask_r = torch.ones_like(ids_r)
                cells = []
                for K in ks:
                    if K > R:
                        cells.append("")
                        continue
                    tasks = [f"t{i % K}" for i in range(R)]
                    for name in {t for t in tasks} - set(bank.tasks):
                        bank.add_task(name, paths[name])
                    t = timeit({
                        "group": lambda: bank(tasks=tasks, strategy="group", input_ids=ids_r, attention_mask=mask_r),
                        "gather": lambda: bank(tasks=tasks, strategy="gather", input_ids=ids_r, attention_mask=mask_r),
                    }, args.repeats)
                    tg, th = t["group"], t["gather"]
                    cells.append(f"{tg / th:.2f}x ({R / K:g})")
                print(f"| {R} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n# total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
