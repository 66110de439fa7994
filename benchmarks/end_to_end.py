"""End-to-end cost: `bitfit train`'s defaults against the tutorial recipe, trained to the best dev score.

Both sides train the packaged MiniLM-L6 on the same SST-2 training subset (5,000 rows, seed 42) and
evaluate on the full dev set after every epoch; each runs in its own fresh subprocess with one
thread, one after the other, and its clock runs from before the data and model are loaded to after
the trained model is saved, so tokenisation, evaluation and checkpointing all count.

- ``recipe``: the BitFit tutorial recipe of docs/RESULTS.md: ``transformers.Trainer`` on the float32
  model with ``requires_grad`` set on every parameter whose name ends in ``.bias`` and on the
  classifier, lr 1e-3, batch 16, 5 epochs, linear schedule, best epoch kept (``save_pretrained``).
- ``bitfit``: exactly ``bitfit train --model minilm --task sst2 --train-size 5000`` (all defaults:
  frozen_dtype auto, dropout 0, random batches on padding-free layers, auto epochs, ...), run in-process through the same functions
  the command calls.

Printed side by side: best dev accuracy, wall and CPU time of the whole run, and the wall time at
which each side first reached the recipe's best accuracy (the time-to-accuracy ratio docs/PERFORMANCE.md reports), with the
CPU model and its matmul features.

    python benchmarks/end_to_end.py --data-dir ../shared/data/glue            # ~15-40 min on 2 cores
    python benchmarks/end_to_end.py --data-dir ../shared/data/glue --train-size 500 --quick   # a smoke run
    python benchmarks/end_to_end.py --data-dir ../shared/data/glue --out DIR --only bitfit    # rerun one side
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _callback(t0: float, record: list):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kw):
            acc = (metrics or {}).get("eval_accuracy")
            if acc is not None:
                record.append({"epoch": state.epoch, "accuracy": float(acc), "elapsed_s": time.time() - t0,
                               "cpu_s": time.process_time()})

    return Clock()


def run_recipe(args, out: Path) -> dict:
    t0, c0 = time.time(), time.process_time()
    import numpy as np
    import transformers as T

    from bitfit.data import glue
    from bitfit.core.models import resolve_model
    from bitfit.training.tasks import encode, subset

    name = resolve_model("minilm")
    tok = T.AutoTokenizer.from_pretrained(name)
    train = subset(glue.load_glue("sst2", "train", args.data_dir)[0], args.train_size, 42)
    dev = glue.load_glue("sst2", "dev", args.data_dir)[0]
    if args.eval_size:
        dev = dev.select(range(args.eval_size))
    train_ds, dev_ds = encode(tok, train, 128), encode(tok, dev, 128)
    model = T.AutoModelForSequenceClassification.from_pretrained(name, num_labels=2)
    for n, p in model.named_parameters():
        p.requires_grad = n.endswith(".bias") or n.startswith("classifier.")
    record: list = []
    targs = T.TrainingArguments(
        output_dir=str(out), learning_rate=1e-3, num_train_epochs=args.recipe_epochs, per_device_train_batch_size=16,
        per_device_eval_batch_size=64, eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
        metric_for_best_model="accuracy", save_total_limit=1, report_to="none", seed=42, disable_tqdm=True,
        logging_steps=50, use_cpu=True)

    def metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer = T.Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=dev_ds,
                        data_collator=T.DataCollatorWithPadding(tok), compute_metrics=metrics,
                        callbacks=[_callback(t0, record)])
    trainer.train()
    trainer.save_model(str(out / "final"))
    return {"best": max(r["accuracy"] for r in record), "wall_s": time.time() - t0,
            "cpu_s": time.process_time() - c0, "evals": record, "steps": trainer.state.global_step}


def run_bitfit(args, out: Path) -> dict:
    t0, c0 = time.time(), time.process_time()
    from bitfit.cli.trainargs import parse_train_args
    from bitfit.training.run import run_train

    argv = ["--model", "minilm", "--task", "sst2", "--data-dir", args.data_dir, "--train-size", str(args.train_size),
            "--output-dir", str(out), "--overwrite_output_dir", "true", "--disable_tqdm", "true", *args.bitfit_args]
    if args.eval_size:
        argv += ["--eval-size", str(args.eval_size)]
    record: list = []
    model_args, data_args, training_args = parse_train_args(argv)
    m = run_train(model_args, data_args, training_args, argv=argv, callbacks=[_callback(t0, record)])
    return {"best": float(m["eval_accuracy"]), "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
            "evals": record, "steps": m.get("global_steps"), "frozen_dtype": m.get("frozen_dtype"),
            "argv": argv}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    res = (run_recipe if args.side == "recipe" else run_bitfit)(args, out / args.side)
    (out / f"{args.side}.json").write_text(json.dumps(res, indent=2))


def first_reaching(evals: list, target: float):
    for e in evals:
        if e["accuracy"] >= target - 1e-9:
            return e
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("BITFIT_GLUE_DIR", "../shared/data/glue"))
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--eval-size", type=int, default=None, help="first N dev rows only (smoke runs)")
    p.add_argument("--recipe-epochs", type=float, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 recipe epoch, 2 bitfit epochs")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only", choices=["recipe", "bitfit"], default=None,
                   help="run only this side and take the other's result from --out (an earlier run's <side>.json)")
    p.add_argument("--side", choices=["recipe", "bitfit"], help=argparse.SUPPRESS)
    p.add_argument("bitfit_args", nargs="*", help="extra `bitfit train` flags (after --)")
    args = p.parse_args()
    if args.quick:
        args.recipe_epochs = 1
        args.bitfit_args = ["--num_train_epochs", "2", *args.bitfit_args]
    if args.side:
        return child(args)
    from bitfit.fast.hardware import cpu_flags, cpu_model, cpu_summary

    print(f"CPU: {cpu_summary()}", flush=True)
    out = Path(args.out or tempfile.mkdtemp(prefix="bitfit-e2e-"))
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    results = {}
    for side in ("recipe", "bitfit"):
        if args.only and side != args.only:
            if not (out / f"{side}.json").exists():
                sys.exit(f"--only {args.only}: no earlier {side} result in {out} ({side}.json); run both sides first")
            results[side] = json.loads((out / f"{side}.json").read_text())
            continue
        cmd = [sys.executable, __file__, "--side", side, "--out", str(out), "--data-dir", args.data_dir,
               "--train-size", str(args.train_size), "--recipe-epochs", str(args.recipe_epochs),
               "--threads", str(args.threads)]
        if args.eval_size:
            cmd += ["--eval-size", str(args.eval_size)]
        cmd += ["--", *args.bitfit_args] if args.bitfit_args else []
        print(f"running {side} ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, env=env, check=True)
        results[side] = json.loads((out / f"{side}.json").read_text())
    r, b = results["recipe"], results["bitfit"]
    hit_b = first_reaching(b["evals"], r["best"])
    hit_r = first_reaching(r["evals"], r["best"])
    load = os.getloadavg()[0]
    print(f"\nCPU: {cpu_summary()}, {args.threads} thread(s), load average now {load:.1f}")
    print(f"SST-2, {args.train_size} training rows, MiniLM-L6\n")
    print("| | best dev acc | total wall | total CPU | steps | wall to recipe's best |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| recipe (Trainer, .bias+classifier, fp32, lr 1e-3, {args.recipe_epochs:g} epochs) | {100 * r['best']:.1f} | "
          f"{r['wall_s']:.0f} s | {r['cpu_s']:.0f} s | {r['steps']} | {hit_r['elapsed_s']:.0f} s |")
    reach = f"{hit_b['elapsed_s']:.0f} s (epoch {hit_b['epoch']:.0f})" if hit_b else "not reached"
    print(f"| `bitfit train` defaults ({b.get('frozen_dtype') or 'float32'}) | {100 * b['best']:.1f} | "
          f"{b['wall_s']:.0f} s | {b['cpu_s']:.0f} s | {b['steps']} | {reach} |")
    ratio = {"total_wall": b["wall_s"] / r["wall_s"], "total_cpu": b["cpu_s"] / r["cpu_s"],
             "to_recipe_best_wall": (hit_b["elapsed_s"] / r["wall_s"]) if hit_b else None,
             "to_recipe_best_cpu": (hit_b["cpu_s"] / r["cpu_s"]) if hit_b and "cpu_s" in hit_b else None}
    print(f"\nratios bitfit / recipe: total wall {ratio['total_wall']:.2f}x, total CPU {ratio['total_cpu']:.2f}x, "
          + (f"wall until the recipe's best accuracy {ratio['to_recipe_best_wall']:.2f}x"
             + (f" (CPU {ratio['to_recipe_best_cpu']:.2f}x)" if ratio["to_recipe_best_cpu"] else "") if hit_b else
             "the recipe's best accuracy was not reached"))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratios": ratio, "cpu": cpu_model(),
                                               "cpu_summary": cpu_summary(), "flags": cpu_flags(), "load": load},
                                              indent=2))


if __name__ == "__main__":
    main()
