"""What `bitfit compare` reports from its runs' records: the summary rows (the best learning rate per
method and training-set size by mean dev score over seeds, with mean ± std of every figure), the markdown
table, the bar chart and learning curves, and the bias-change analyses of the methods whose biases moved.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from .compare_run import slug


def _mean_std(xs: list) -> tuple:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _load_range(records: list) -> Optional[dict]:
    """The highest 1-minute load average read at the start or end of these runs, with CPUs and threads."""
    reads = [ld for r in records for ld in ((r.get("load") or {}).get("start"), (r.get("load") or {}).get("end"))
             if ld and ld.get("load1") is not None]
    if not reads:
        return None
    top = max(reads, key=lambda ld: ld["load1"])
    return {"max_load1": top["load1"], "cpus": top.get("cpus"), "threads": top.get("threads")}


def summarize(records: list, specs: list) -> list:
    """Per (method, train size): the lr with the best mean dev score over seeds (the paper's selection),
    and that lr's mean ± std of every metric, trainable counts, artifact size, step time, memory."""
    rows = []
    sizes = sorted({r["train_size"] for r in records}, key=lambda s: (s is None, s or 0))
    for spec in specs:
        for size in sizes:
            mine = [r for r in records if r["spec"] == spec and r["train_size"] == size]
            if not mine:
                continue
            by_lr: dict = {}
            for r in mine:
                by_lr.setdefault(r["lr"], []).append(r)
            lr_scores = {lr: _mean_std([r["score"] for r in rs])[0] for lr, rs in by_lr.items()}
            best = max(lr_scores, key=lambda k: (-math.inf if math.isnan(lr_scores[k]) else lr_scores[k]))
            rs = by_lr[best]
            metrics = {}
            for m in rs[0]["task_metrics"] or [rs[0]["primary"]]:
                mean, std = _mean_std([r["eval"].get(f"eval_{m}") for r in rs])
                metrics[m] = {"mean": mean, "std": std}
            score, score_std = _mean_std([r["score"] for r in rs])
            rows.append({
                "method": spec, "train_size": size, "n_train": rs[0].get("n_train"), "best_lr": best,
                "lr_grid": {f"{lr:g}": s for lr, s in sorted(lr_scores.items())},
                "seeds": [r["seed"] for r in rs], "primary": rs[0]["primary"],
                "score": score, "score_std": score_std, "metrics": metrics,
                "trainable": rs[0]["trainable"], "base_params": rs[0]["base_params"],
                "trainable_pct": rs[0]["trainable_pct"], "artifact_bytes": rs[0]["artifact_bytes"],
                **{k: _mean_std([r.get(k) for r in rs])[0] for k in (
                    "step_time_s", "step_cpu_s", "train_time_s", "train_cpu_s", "total_time_s", "total_cpu_s",
                    "train_runtime_s", "peak_memory_mb")},
                "memory_kind": rs[0].get("memory_kind"), "epochs": rs[0].get("epochs"),
                "busy": any(r.get("busy") for r in rs), "load": _load_range(rs),
            })
    return rows


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def _pct(x: float) -> str:
    return f"{x:.3f}%" if x < 1 else f"{x:.1f}%"


def _ms(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{1000 * x:.0f} ms" if x >= 0.0095 else f"{1000 * x:.1f} ms"


BUSY_MARK = "¹"


def markdown_table(rows: list, task: str) -> str:
    from ..fast.timing import BUSY_MARGIN

    if not rows:
        return "(no runs)\n"
    names = list(rows[0]["metrics"])
    head = " / ".join(names)
    lines = [
        f"| method | train rows | {task} {head} (dev, ×100, mean ± std) | seeds | best lr | trainable | % of model "
        "| artifact | step time (wall) | step time (CPU) | peak memory |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        score = " / ".join(
            f"{100 * r['metrics'][m]['mean']:.1f} ± {100 * r['metrics'][m]['std']:.1f}" for m in names
            if m in r["metrics"])
        mark = BUSY_MARK if r.get("busy") else ""
        lines.append(
            f"| {r['method']} | {r['n_train'] if r['n_train'] is not None else ''} | {score} | {len(r['seeds'])} "
            f"| {r['best_lr']:g} | {r['trainable']:,} | {_pct(r['trainable_pct'])} | {_fmt_bytes(r['artifact_bytes'])} "
            f"| {_ms(r.get('step_time_s'))}{mark} | {_ms(r.get('step_cpu_s'))}{mark} "
            f"| {r['peak_memory_mb']:.0f} MB |")
    kinds = sorted({r.get("memory_kind") or "" for r in rows} - {""})
    lines += ["", "Score: dev-set metric of the best epoch, at the learning rate with the best mean over seeds; "
                  "std over seeds. Step time: training time without evaluation and checkpointing, divided by "
                  "optimizer steps, in wall-clock time and in CPU time of the run's process (all threads); the "
                  "same figures as metrics.json's step_time_s / step_cpu_s. Peak memory: the "
                  + (" / ".join(kinds) or "peak memory") + "."]
    busy = [r for r in rows if r.get("busy")]
    if busy:
        top = max(busy, key=lambda r: (r.get("load") or {}).get("max_load1") or 0.0)
        ld = top.get("load") or {}
        lines += ["", f"{BUSY_MARK} Measured while the machine was busy: the 1-minute load average reached "
                      f"{ld.get('max_load1', float('nan')):.1f} on {ld.get('cpus')} CPUs, above the run's "
                      f"{ld.get('threads')} thread(s) + {BUSY_MARGIN:g}; other work shared the cores, so these wall "
                      "times are slower than on a quiet machine and not comparable across rows (CPU times are "
                      "less affected)."]
    return "\n".join(lines) + "\n"


def _main_size(rows: list):
    """The training-set size the table's headline, bar chart and heatmaps use: full data, else the largest."""
    sizes = {r["train_size"] for r in rows}
    return None if None in sizes or not sizes else max(sizes)


def make_plots(records: list, rows: list, specs: list, out: Path, task: str) -> dict:
    """scores.png (bar chart), curves.png (dev score per epoch) and sizes.png (score against training-set size,
    with several sizes); returns {kind: path} of those written."""
    from ..analysis import plots

    files = {}
    main = _main_size(rows)
    bar = [r for r in rows if r["train_size"] == main]
    if bar:
        primary = bar[0]["primary"]
        files["bar"] = plots.bar_chart(
            [r["method"] for r in bar], [100 * r["score"] for r in bar], [100 * r["score_std"] for r in bar],
            str(out / "scores.png"), ylabel=f"{primary} ×100 (dev)", title=f"{task}: best dev score per method",
            annotations=[_pct(r["trainable_pct"]) for r in bar])
        curves = {}
        for r in bar:
            runs = [x for x in records if x["spec"] == r["method"] and x["lr"] == r["best_lr"]
                    and x["train_size"] == r["train_size"]]
            by_ep: dict = {}
            for x in runs:
                for ep, v in x["history"]:
                    by_ep.setdefault(ep, []).append(100 * v)
            curves[f"{r['method']} (lr {r['best_lr']:g})"] = [(ep, *_mean_std(v)) for ep, v in sorted(by_ep.items())]
        if any(curves.values()):
            files["curves"] = plots.learning_curves(curves, str(out / "curves.png"), ylabel=f"{primary} ×100 (dev)",
                                                    title=f"{task}: dev score per epoch")
    sized = [r for r in rows if r["train_size"] is not None]
    if len({r["train_size"] for r in sized}) > 1:
        curves = {}
        for spec in specs:
            pts = [(r["n_train"] or r["train_size"], 100 * r["score"], 100 * r["score_std"])
                   for r in sized if r["method"] == spec]
            if pts:
                curves[spec] = pts
        files["sizes"] = plots.size_curve(curves, str(out / "sizes.png"), ylabel=f"{sized[0]['primary']} ×100 (dev)",
                                          title=f"{task}: score against training-set size")
    return files


def average_rows(tables: list) -> list:
    """Several runs' (role, layer, value) tables as one: the mean value per role and layer."""
    acc: dict = {}
    for t in tables:
        for r in t or []:
            k = (r["role"], str(r["layer"]))
            a = acc.setdefault(k, {**r, "layer": str(r["layer"]), "value": 0.0, "_n": 0})
            a["value"] += r["value"]
            a["_n"] += 1
    out = []
    for a in acc.values():
        a["value"] /= a.pop("_n")
        out.append(a)
    return out


def write_analyses(records: list, rows: list, out: Path, model_name: str) -> dict:
    """Bias-change heatmap/CSV/ranking per method whose biases moved (mean over seeds at the best lr)."""
    from ..analysis import change as analysis

    mm = None
    done = {}
    main = _main_size(rows)
    for r in rows:
        if r["train_size"] != main:
            continue
        runs = [x for x in records if x["spec"] == r["method"] and x["lr"] == r["best_lr"]
                and x["train_size"] == r["train_size"]]
        change = average_rows([x["change"] for x in runs])
        if not change or max(c["value"] for c in change) == 0.0:
            continue
        grads = average_rows([x["grad"] for x in runs if x.get("grad")]) or None
        if mm is None:
            from ..core.models import load_model

            mm = analysis.discover(load_model(model_name, task="base"))
        sub = out / "analysis" / slug(r["method"])
        res = analysis.write_report(sub, change, grads, mm, title=f" ({r['method']})")
        done[r["method"]] = res["files"]
    return done
