"""Bias bank throughput: mixed-task batches against the plain base, and mixed-task generation.

Classification (BERT shapes, random weights): for K = 1, 2, 8, 32 tasks and batches of R rows
(row i uses task i % K), the bank's call (``auto``: one pass with per-row biases whenever the
batch mixes tasks) against the plain base model on the same batch (no bank: the one-task
ceiling). Generation (causal LMs, random weights: a LLaMA-style model whose tasks add the
missing biases, norms included, and GPT-2): greedy decoding of R prompts, K tasks mixed in one
``bank.generate`` call against one task's own BitFit model on the same batch.

Times are **process CPU time** (``time.process_time``: what this process computed, not the
time it waited for a shared CPU), with one torch thread, the median of ``--repeats`` runs,
contenders interleaved so that load from other processes hits every one alike. Ratios are paired:
the median over rounds of the reference's time over the contender's in the same round.

    python benchmarks/bank_throughput.py                          # small shape + LLaMA-style generation
    python benchmarks/bank_throughput.py --shape base --skip-generate
    python benchmarks/bank_throughput.py --skip-classify --lm gpt2
    python benchmarks/bank_throughput.py --skip-classify --skip-generate --fanout   # 8 tasks on one input

Fan-out (``--fanout``): ``--fanout-tasks`` (8) classification tasks on the same input(s) in one bank call, the
input's rows repeated once per task as the HTTP fan-out (``/v1/predict`` with ``tasks: [...]``) lays them out,
against the same rows all under one task (the single-task batch of the same shape); the ratio is the fan-out's
throughput over the single-task batch's.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
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
from bitfit.serving.bank import BiasBank  # noqa: E402
from bitfit.fast.hardware import cpu_flags, cpu_model  # noqa: E402

SHAPES = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
BERT_BASE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "bert-base-uncased-noweights"


def bert_config(shape: str):
    if shape == "base" and (BERT_BASE_DIR / "config.json").exists():
        return T.BertConfig.from_pretrained(str(BERT_BASE_DIR))
    return T.BertConfig(vocab_size=30522, max_position_embeddings=512, **SHAPES[shape])


def perturb(model, gen, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def build_classify(shape: str, n_tasks: int, tmp: Path, labels=(2, 3)):
    cfg = bert_config(shape)
    torch.manual_seed(0)
    base = T.BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a pretrained pooler, as bert-base ships it (an all-zero bias would make it part of
        base.bert.pooler.dense.bias.normal_(0.0, 0.02)  # every task's head: pooler_head, for all-MiniLM)
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
        perturb(m, g)
        paths[f"t{k}"] = bitfit.save(m, tmp / f"t{k}")
    return base, paths


def cpu_times(fns: dict, repeats: int, ref: str = None) -> dict:
    """Median process CPU seconds per function over ``repeats`` interleaved runs (after one warm-up); the
    order rotates by one each round, so no contender always runs first or after the same one. With ``ref``
    (a key of ``fns``) the result also holds ``ratio[k]``: the median over rounds of ``ref``'s time over
    ``k``'s in the same round (paired: a round's contenders run back to back, so a shift in the machine's
    load between rounds cancels out of each ratio)."""
    for fn in fns.values():
        fn()
    runs = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.process_time()
            fns[k]()
            runs[k].append(time.process_time() - t0)
    out = {k: statistics.median(v) for k, v in runs.items()}
    if ref is not None:
        out["ratio"] = {k: statistics.median(a / b for a, b in zip(runs[ref], v)) for k, v in runs.items()}
    return out


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:,.1f} MB"


def header(args) -> None:
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        load = "n/a"
    print(f"# bank throughput, {datetime.date.today().isoformat()}: CPU {cpu_model()} "
          f"(flags: {', '.join(cpu_flags()) or 'none'}), {os.cpu_count()} logical CPUs, load average {load}")
    print(f"# torch {torch.__version__}, transformers {T.__version__}, Python {platform.python_version()}; "
          f"torch threads {torch.get_num_threads()}; process CPU time, median of {args.repeats} interleaved runs (order rotated each round); "
          "ratios: median of the rounds' paired ratios\n")


def classify(args) -> None:
    mixes = [int(x) for x in args.mixes.split(",") if x]
    rows_list = [int(x) for x in args.rows.split(",") if x]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        base, paths = build_classify(args.shape, max(mixes), Path(d))
        art_bytes = sum(f.stat().st_size for f in Path(paths["t0"]).iterdir())
        cfg = base.config
        print(f"## Classification: BERT {args.shape} shape (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
              f"FFN {cfg.intermediate_size}), {args.seq} tokens per row; {max(mixes)} task artifacts of "
              f"{art_bytes / 1024:.0f} KiB built in {time.time() - t0:.0f} s\n")
        bank = BiasBank(base, paths)
        mem = bank.memory()
        g = torch.Generator().manual_seed(2)
        print("| rows | plain rows/s | " + " | ".join(f"K={k} rows/s" for k in mixes) + " | "
              + " | ".join(f"K={k} / plain" for k in mixes) + " |")
        print("|---:|---:|" + "---:|" * (2 * len(mixes)))
        worst = float("inf")
        for R in rows_list:
            ids = torch.randint(1000, 30000, (R, args.seq), generator=g)
            mask = torch.ones_like(ids)
            fns = {"plain": lambda: base(input_ids=ids, attention_mask=mask)}
            for K in mixes:
                tasks = [f"t{i % K}" for i in range(R)]
                fns[K] = lambda tasks=tasks: bank(tasks=tasks, input_ids=ids, attention_mask=mask)
            t = cpu_times(fns, args.repeats, ref="plain")
            ratios = [t["ratio"][K] for K in mixes]
            worst = min(worst, *ratios)
            print(f"| {R} | {R / t['plain']:,.1f} | " + " | ".join(f"{R / t[K]:,.1f}" for K in mixes) + " | "
                  + " | ".join(f"{r:.2f}x" for r in ratios) + " |", flush=True)
        per_task = statistics.mean(mem["tasks"].values())
        print(f"\nworst mixed / plain: {worst:.2f}x. Memory: base {fmt_mb(mem['base'])}, one task "
              f"{per_task / 1024:,.0f} KiB; {max(mixes)} tasks: bank {fmt_mb(mem['total'])} against "
              f"{fmt_mb((mem['base'] + per_task) * max(mixes))} for {max(mixes)} separate models "
              f"({time.time() - t0:.0f} s)\n", flush=True)


# ------------------------------------------------------------------------------ fan-out
def fanout(args) -> None:
    """K classification tasks on the same input(s) in one bank call (what ``/v1/predict`` with ``tasks: [...]``
    runs: the input's rows repeated once per task, a task per row) against the same rows all under one task."""
    K = args.fanout_tasks
    inputs_list = [int(x) for x in args.fanout_inputs.split(",") if x]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        base, paths = build_classify(args.shape, K, Path(d))
        bank = BiasBank(base, paths)
        cfg = base.config
        print(f"## Fan-out: {K} classification tasks on the same input(s), BERT {args.shape} shape (hidden "
              f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers), {args.seq} tokens per input; built in "
              f"{time.time() - t0:.0f} s\n")
        print(f"| inputs | rows | {K} single-task rows: rows/s | fan-out of {K} tasks: rows/s | fan-out / single-task |")
        print("|---:|---:|---:|---:|---:|")
        g = torch.Generator().manual_seed(3)
        names = [f"t{k}" for k in range(K)]
        worst = float("inf")
        for n in inputs_list:
            one = torch.randint(1000, 30000, (n, args.seq), generator=g)
            ids = one.repeat(K, 1)  # task-major, as the HTTP fan-out lays out its rows
            mask = torch.ones_like(ids)
            rows = K * n
            fan_tasks = [t for t in names for _ in range(n)]
            fns = {"single": lambda: bank(tasks=[names[0]] * rows, input_ids=ids, attention_mask=mask),
                   "fanout": lambda fan_tasks=fan_tasks: bank(tasks=fan_tasks, input_ids=ids, attention_mask=mask)}
            t = cpu_times(fns, args.repeats, ref="single")
            r = t["ratio"]["fanout"]
            worst = min(worst, r)
            print(f"| {n} | {rows} | {rows / t['single']:,.1f} | {rows / t['fanout']:,.1f} | {r:.2f}x |", flush=True)
        print(f"\nworst fan-out / single-task: {worst:.2f}x ({time.time() - t0:.0f} s)\n", flush=True)


# ------------------------------------------------------------------------------ generation
def build_lm(kind: str, n_tasks: int):
    """A random causal LM and ``n_tasks`` 'trained' BitFit tasks of it (in memory)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = T.GPT2Config(pad_token_id=0)  # GPT-2 small: 12 x 768, vocab 50257
        base = T.GPT2LMHeadModel(cfg).eval()
        apply_kw = {}
    else:  # LLaMA-style, bias-free: tasks add the missing biases (attention, MLP, RMSNorm)
        cfg = T.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            pad_token_id=0, tie_word_embeddings=True)
        base = T.LlamaForCausalLM(cfg).eval()
        apply_kw = {"add_missing": True}
    g = torch.Generator().manual_seed(1)
    tasks = {}
    for k in range(n_tasks):
        m = bitfit.apply(copy.deepcopy(base), **apply_kw)
        perturb(m, g, 0.2)
        tasks[f"t{k}"] = m.eval()
    return base, tasks


def generate(args) -> None:
    mixes = [int(x) for x in args.gen_mixes.split(",") if x]
    R, P, N = args.gen_rows, args.gen_prompt, args.gen_new
    for kind in [x for x in args.lm.split(",") if x]:
        t0 = time.time()
        base, tasks = build_lm(kind, max(mixes))
        own = tasks["t0"]
        bank = BiasBank(base, tasks)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(3, base.config.vocab_size, (R, P), generator=g)
        mask = torch.ones_like(ids)
        kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
        cfg = base.config
        print(f"## Generation: {kind} ({cfg.num_hidden_layers} layers x {cfg.hidden_size}, vocab {cfg.vocab_size}"
              f"{', tasks add the missing biases' if kind != 'gpt2' else ''}), {R} prompts x {P} tokens, "
              f"{N} new tokens each, greedy, KV cache\n")
        with torch.no_grad():
            fns = {"plain base": lambda: base.generate(input_ids=ids, attention_mask=mask, **kw),
                   "one task's own model": lambda: own.generate(input_ids=ids, attention_mask=mask, **kw)}
            for K in mixes:
                names = [f"t{i % K}" for i in range(R)]
                fns[f"bank, K={K}"] = lambda names=names: bank.generate(names, input_ids=ids, attention_mask=mask,
                                                                          **kw)
            t = cpu_times(fns, args.repeats, ref="one task's own model")
        ratio = t.pop("ratio")
        print("| contender | new tokens/s | vs one task's own model |")
        print("|---|---:|---:|")
        for k, v in t.items():
            print(f"| {k} | {R * N / v:,.1f} | {ratio[k]:.2f}x |")
        print(f"\n({time.time() - t0:.0f} s)\n", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small",
                   help="BERT shape: small (4 x 256) or base (12 x 768; the bert-base-uncased config)")
    p.add_argument("--rows", default="8,16,32,64", help="rows per batch (default 8,16,32,64)")
    p.add_argument("--seq", type=int, default=32, help="tokens per row (default 32)")
    p.add_argument("--mixes", default="1,2,8,32", help="task counts K (default 1,2,8,32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per contender; the median is kept")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--lm", default="llama", help="causal LMs for the generation table: llama, gpt2 (comma list)")
    p.add_argument("--gen-rows", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--gen-prompt", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--gen-new", type=int, default=32, help="new tokens per prompt (default 32)")
    p.add_argument("--gen-mixes", default="1,2,8", help="task counts K in a generate call (default 1,2,8)")
    p.add_argument("--skip-classify", action="store_true")
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--fanout", action="store_true", help="add the fan-out table: --fanout-tasks tasks on the same "
                   "input(s) in one call against the same rows under one task")
    p.add_argument("--fanout-tasks", type=int, default=8, help="tasks in a fan-out call (default 8)")
    p.add_argument("--fanout-inputs", default="1", help="inputs per fan-out call (default 1; comma list)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    header(args)
    if not args.skip_classify:
        classify(args)
    if args.fanout:
        fanout(args)
    if not args.skip_generate:
        generate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
