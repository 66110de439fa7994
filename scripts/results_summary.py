"""Summarise `scripts/run_results.sh grid|sizes|fidelity|precisions` into the tables and figures of docs/RESULTS.md.

    python scripts/results_summary.py [RESULTS_DIR] [--figures docs/figures]

Reads every finished run (``run.json``) under RESULTS_DIR/grid and every ``metrics.json`` under
RESULTS_DIR/fidelity, so it also summarises a grid that is still running or was stopped early
(the seed count per cell says how far it got), and every ``metrics.json`` under RESULTS_DIR/precisions.
Prints Markdown; writes PNGs to --figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

TASKS = ["rte", "mrpc", "stsb", "cola", "sst2"]
METHODS = ["bitfit", "paper-subset", "full", "frozen", "lora"]
# per task: (column label, eval keys shown, key for the average) - the official metric(s) of each task
SHOW = {
    "rte": ("RTE acc", ["eval_accuracy"], "eval_accuracy"),
    "mrpc": ("MRPC acc / F1", ["eval_accuracy", "eval_f1"], "eval_f1"),
    "stsb": ("STS-B Pearson", ["eval_pearson"], "eval_pearson"),
    "cola": ("CoLA MCC", ["eval_matthews_correlation"], "eval_matthews_correlation"),
    "sst2": ("SST-2 acc", ["eval_accuracy"], "eval_accuracy"),
}
# the seeds' recipe and full fine-tuning the single-seed reference figures the project started from, not re-run here (full training sets; SST-2 5,000 rows)
RECIPE = {"rte": ("56.3", "59.2"), "mrpc": ("79.4 / 85.3", "79.9 / 86.5"), "stsb": ("85.0", "85.8"),
          "cola": ("12.0", "29.8"), "sst2": ("81.3", "85.0")}


def load_runs(root: Path) -> list:
    runs = []
    for f in sorted(root.glob("grid/*/runs/*/*/*/*/run.json")):
        r = json.loads(f.read_text())
        r["task"] = f.parts[-7]
        runs.append(r)
    return runs


def mean_std(xs: list) -> tuple:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def cell(xs: list) -> str:
    m, s = mean_std([100 * x for x in xs])
    return "–" if not xs else f"{m:.1f} ± {s:.1f}"


def grid_table(runs: list, size: int) -> tuple:
    lines = ["| method | " + " | ".join(SHOW[t][0] for t in TASKS) + " | average | seeds |",
             "|---|" + "---:|" * (len(TASKS) + 2)]
    averages = {}
    for m in METHODS:
        row, avg_parts, seeds = [], [], set()
        for t in TASKS:
            rs = [r for r in runs if r["task"] == t and r["spec"] == m and r["train_size"] == size]
            seeds.add(len(rs))
            label, keys, avg_key = SHOW[t]
            row.append(" / ".join(cell([r["eval"][k] for r in rs]) for k in keys))
            if rs:
                avg_parts.append(statistics.fmean(100 * r["eval"][avg_key] for r in rs))
        avg = statistics.fmean(avg_parts) if len(avg_parts) == len(TASKS) else float("nan")
        averages[m] = avg
        seeds_txt = "/".join(str(s) for s in sorted(seeds)) if len(seeds) > 1 else str(seeds.pop())
        lines.append(f"| {m} | " + " | ".join(row) + f" | {avg:.1f} | {seeds_txt} |")
    return "\n".join(lines), averages


def cost_table(runs: list, size: int) -> str:
    lines = ["| method | trainable | % of model | artifact | step time (median, RTE) | peak RSS (median) |",
             "|---|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        rs = [r for r in runs if r["spec"] == m and r["train_size"] == size]
        if not rs:
            continue
        rte = [r["step_time_s"] for r in rs if r["task"] == "rte"]
        step = f"{1000 * statistics.median(rte):.0f} ms" if rte else "–"
        art = statistics.median(r["artifact_bytes"] for r in rs)
        lines.append(f"| {m} | {rs[0]['trainable']:,} | {rs[0]['trainable_pct']:.3f}% | "
                     f"{art / 1024:.1f} KiB | {step} | {statistics.median(r['peak_memory_mb'] for r in rs):.0f} MB |")
    return "\n".join(lines)


def figures(runs: list, size: int, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from bitfit.analysis import plots

    out.mkdir(parents=True, exist_ok=True)
    made = []
    fig, ax = plt.subplots(figsize=(9, 4.4))
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        means, stds = [], []
        for t in TASKS:
            xs = [100 * r["eval"][SHOW[t][2]] for r in runs
                  if r["task"] == t and r["spec"] == m and r["train_size"] == size]
            mu, sd = mean_std(xs)
            means.append(mu)
            stds.append(sd)
        ax.bar(np.arange(len(TASKS)) + (i - (len(METHODS) - 1) / 2) * width, means, width, yerr=stds, capsize=2,
               label=m)
    ax.set_xticks(np.arange(len(TASKS)), [SHOW[t][0].replace(" acc / F1", " F1") for t in TASKS])
    ax.set_ylabel("dev score x100 (mean ± std over seeds)")
    ax.set_title(f"MiniLM-L6, {size:,} training rows per task, 5 epochs")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(METHODS), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    path = out / "grid_scores.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    for t in TASKS:
        curves = {}
        for m in METHODS:
            rs = [r for r in runs if r["task"] == t and r["spec"] == m and r["train_size"] == size]
            by_epoch = {}
            for r in rs:
                for e, v in r["history"]:
                    by_epoch.setdefault(e, []).append(100 * v)
            curves[m] = [(e, *mean_std(v)) for e, v in sorted(by_epoch.items())]
        if any(curves.values()):
            made.append(Path(plots.learning_curves(curves, str(out / f"grid_{t}_curves.png"),
                                                   ylabel="dev score x100", title=f"{t}: dev score per epoch")))
    sizes = sorted({r["train_size"] for r in runs if r["task"] == "sst2"})
    if len(sizes) > 1:
        curves = {}
        for m in METHODS:
            pts = []
            for n in sizes:
                xs = [100 * r["score"] for r in runs if r["task"] == "sst2" and r["spec"] == m and r["train_size"] == n]
                if xs:
                    pts.append((n, *mean_std(xs)))
            curves[m] = pts
        made.append(Path(plots.size_curve(curves, str(out / "sst2_sizes.png"), ylabel="SST-2 dev accuracy x100",
                                          title="SST-2: score against training-set size")))
    return made


def sizes_table(runs: list) -> str:
    sizes = sorted({r["train_size"] for r in runs if r["task"] == "sst2"})
    if len(sizes) < 2:
        return ""
    lines = ["| method | " + " | ".join(f"{n:,} rows" for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for m in METHODS:
        cells = []
        for n in sizes:
            xs = [r["score"] for r in runs if r["task"] == "sst2" and r["spec"] == m and r["train_size"] == n]
            cells.append(cell(xs) + (f" ({len(xs)})" if xs else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bias_change(runs: list, size: int, out: Path) -> str:
    """Mean bias change of the BitFit runs per task (paper's figure), and the role ranking."""
    from bitfit.analysis import change as analysis
    from bitfit.training.compare_report import average_rows
    from bitfit.core.models import load_model

    mm = analysis.discover(load_model("minilm", task="base"))
    lines = []
    for t in TASKS:
        rs = [r for r in runs if r["task"] == t and r["spec"] == "bitfit" and r["train_size"] == size and r["change"]]
        if not rs:
            continue
        change = average_rows([r["change"] for r in rs])
        grads = average_rows([r["grad"] for r in rs if r.get("grad")]) or None
        res = analysis.write_report(out / f"analysis_{t}", change, grads, mm, title=f" (BitFit, {t})")
        ch = ", ".join(f"{x['paper'] or x['role']} {x['value']:.1e}" for x in res["change"]["roles"][:4])
        gr = ", ".join(f"{x['paper'] or x['role']}" for x in res.get("grad", {}).get("roles", [])[:4])
        lines.append(f"- {t} ({len(rs)} runs): largest change: {ch}; largest gradient: {gr}")
    return "\n".join(lines)


def fidelity_table(root: Path) -> str:
    lines = ["| task | metric | `bitfit train` defaults (bf16 base) | seeds' recipe | full FT (reference) | epochs | wall |",
             "|---|---|---:|---:|---:|---:|---:|"]
    ours = []
    for t in TASKS:
        f = root / "fidelity" / t / "metrics.json"
        if not f.is_file():
            lines.append(f"| {t} | {SHOW[t][0]} | not run | {RECIPE[t][0]} | {RECIPE[t][1]} | | |")
            continue
        d = json.loads(f.read_text())
        keys = SHOW[t][1]
        best = max(d["eval_history"], key=lambda h: h.get("eval_" + d.get("primary", ""), h.get(
            "eval_combined_score", h.get(keys[-1], 0))))
        val = " / ".join(f"{100 * best[k]:.1f}" for k in keys)
        lines.append(f"| {t} | {SHOW[t][0]} | {val} | {RECIPE[t][0]} | {RECIPE[t][1]} | "
                     f"{len(d['eval_history'])} (best {best.get('epoch', '?')}) | {d['wall_time_s'] / 60:.0f} min |")
        ours.append(100 * best[SHOW[t][2]])
    if len(ours) == len(TASKS):  # the average (MRPC by F1, as in the grid), only when every task ran
        recipe, full = ([float(RECIPE[t][i].split(" / ")[-1]) for t in TASKS] for i in (0, 1))
        lines.append(f"| **average** | MRPC by F1 | **{statistics.fmean(ours):.1f}** | "
                     f"{statistics.fmean(recipe):.1f} | {statistics.fmean(full):.1f} | | |")
    return "\n".join(lines)


def precisions_table(root: Path) -> str:
    """`run_results.sh precisions`: the 1,000-row grid with `bitfit train`'s defaults, one row per
    ``--frozen-dtype`` (RESULTS_DIR/precisions/<dtype>/<task>-s<seed>/metrics.json), the same seeds in each."""
    found = {}
    for f in sorted((root / "precisions").glob("*/*-s*/metrics.json")):
        task, _, seed = f.parent.name.rpartition("-s")
        m = json.loads(f.read_text())
        command = json.loads((f.parent / "command.json").read_text()) if (f.parent / "command.json").is_file() else {}
        ran = (command.get("frozen_dtype_choice") or {}).get("dtype") or f.parent.parent.name
        found[f.parent.parent.name, task, int(seed)] = (100 * m[SHOW[task][2]], m.get("step_cpu_s"), ran)
    if not found:
        return ""
    modes = sorted({k[0] for k in found}, key=lambda d: (d != "float32", d))
    seeds = sorted({k[2] for k in found})
    lines = ["| `--frozen-dtype` (ran as) | " + " | ".join(SHOW[t][0].replace(" acc / F1", " F1") for t in TASKS)
             + " | average (per seed) | step CPU x float32 |", "|---|" + "---:|" * (len(TASKS) + 2)]
    base_steps = {(t, s): v[1] for (d, t, s), v in found.items() if d == "float32"}
    for d in modes:
        cells, per_seed, ratios = [], [], []
        for t in TASKS:
            xs = [found[d, t, s][0] for s in seeds if (d, t, s) in found]
            cells.append(f"{statistics.fmean(xs):.1f} ({', '.join(f'{x:.1f}' for x in xs)})" if xs else "–")
            ratios += [found[d, t, s][1] / base_steps[t, s] for s in seeds
                       if (d, t, s) in found and base_steps.get((t, s)) and found[d, t, s][1]]
        for s in seeds:
            if all((d, t, s) in found for t in TASKS):
                per_seed.append(statistics.fmean(found[d, t, s][0] for t in TASKS))
        avg = (f"{statistics.fmean(per_seed):.2f} ({', '.join(f'{x:.2f}' for x in per_seed)})" if per_seed else "–")
        ran = "/".join(sorted({v[2] for k, v in found.items() if k[0] == d}))
        ratio = f"{statistics.median(ratios):.2f}x" if ratios else "–"
        lines.append(f"| {d} ({ran}) | " + " | ".join(cells) + f" | {avg} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", nargs="?", default="results")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--size", type=int, default=1000)
    args = p.parse_args(argv)
    root = Path(args.root)
    runs = load_runs(root)
    precisions = precisions_table(root)
    if precisions:
        print("## Frozen-weight precisions (1,000-row grid, defaults)\n\n" + precisions + "\n")
    if not runs and not (root / "fidelity").is_dir():
        if precisions:
            return 0
        print(f"no runs under {root}/grid, {root}/fidelity or {root}/precisions: run scripts/run_results.sh first",
              file=sys.stderr)
        return 1
    table, _ = grid_table(runs, args.size)
    print("## Grid\n\n" + table + "\n\n" + cost_table(runs, args.size) + "\n")
    st = sizes_table(runs)
    if st:
        print("## Sizes (SST-2)\n\n" + st + "\n")
    print("## Fidelity\n\n" + fidelity_table(root) + "\n")
    out = Path(args.figures)
    for path in figures(runs, args.size, out):
        print(f"figure: {path}")
    print(bias_change(runs, args.size, root / "analysis"))
    for t in TASKS:
        src = root / "analysis" / f"analysis_{t}" / "bias_change.png"
        if src.is_file():
            (out / f"grid_{t}_bitfit_bias_change.png").write_bytes(src.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main())
