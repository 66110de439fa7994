"""Artifact size and load time of a BitFit task against a full fine-tuned checkpoint.

For each model (``minilm``: the packaged pretrained MiniLM-L6; ``bert-base``: BERT-base built
from its config with random weights) a BitFit "all" model with a 2-label head is prepared
and trained with real AdamW steps (MiniLM: on SST-2 when the GLUE files are found; the random
BERT-base, whose biases are drawn from N(0, 0.05) like pretrained ones: on random token ids),
then:

- size: ``bitfit.save`` (float32 / float16 / int8) against ``save_pretrained`` of the whole
  fine-tuned model (what one would ship per task without BitFit);
- load time (median of ``--repeats``, measured interleaved): ``from_pretrained`` of the full
  fine-tuned folder, ``bitfit.load(base_folder, artifact)`` (base from disk + task), and
  ``bitfit.load(model, artifact)`` onto a model in memory carrying another task (a task switch);
- logit error of float16 / int8 storage against float32 (max and mean |delta logit|, argmax
  agreement) on SST-2 dev sentences (MiniLM) or random token ids (BERT-base).

Usage::

    python benchmarks/artifact_size.py                      # both models, ~2-4 minutes on 2 cores
    python benchmarks/artifact_size.py --models minilm --steps 0 --repeats 3
    python benchmarks/artifact_size.py --markdown docs/artifact_table.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers as T  # noqa: E402

import bitfit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BITFIT_SHARED", REPO.parent / "shared"))
GLUE = Path(os.environ.get("BITFIT_GLUE_DIR", SHARED / "data" / "glue"))
BERT_BASE = Path(os.environ.get("BITFIT_BERT_BASE_DIR", SHARED / "models" / "bert-base-uncased-noweights"))


def folder_size(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())


def sst2(split: str, n: int):
    f = GLUE / "SST-2" / f"{split}.tsv"
    if not f.exists():
        return None
    rows = [line.rstrip("\n").split("\t") for line in f.read_text().splitlines()[1:]]
    rows = [(s, int(y)) for s, y in rows[:n]]
    return [s for s, _ in rows], torch.tensor([y for _, y in rows])


def build(name: str, tmp: Path):
    """(base folder, fresh-base factory, tokenizer or None)."""
    if name == "minilm":
        folder = Path(bitfit.core.models.resolve_model("minilm"))
        tok = bitfit.core.models.load_tokenizer("minilm")

        def fresh():
            return T.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()

        return folder, fresh, tok
    if name == "bert-base":
        if not (BERT_BASE / "config.json").exists():
            raise SystemExit(f"BERT-base config not found at {BERT_BASE} (set BITFIT_BERT_BASE_DIR)")
        cfg = T.BertConfig.from_pretrained(BERT_BASE, num_labels=2)
        torch.manual_seed(0)
        folder = tmp / "bert-base-random"
        m = T.BertForSequenceClassification(cfg)
        with torch.no_grad():  # pretrained biases are not zero (BERT's init is): make the differences realistic
            for n, p in m.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(0.0, 0.05)
        m.save_pretrained(folder)

        def fresh():
            return T.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()

        return folder, fresh, None
    raise SystemExit(f"unknown model {name!r}: use minilm or bert-base")


def train(model, tok, steps: int, seed: int, lr: float = 5e-3):
    """Real AdamW BitFit steps: on SST-2 with a tokenizer (MiniLM), else on random token ids
    (the random BERT-base: the artifact's size depends on how training moved the biases)."""
    data = sst2("train", 20000) if tok is not None else None
    g = torch.Generator().manual_seed(seed)
    if steps <= 0:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        return "noise (0.02 randn on every trained tensor)"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        if data is not None:
            texts, labels = data
            idx = torch.randint(0, len(texts), (16,), generator=g)
            batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
            y = labels[idx]
        else:
            batch = {"input_ids": torch.randint(1000, model.config.vocab_size, (8, 32), generator=g)}
            y = torch.randint(0, 2, (8,), generator=g)
        loss = model(**batch, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    where = "SST-2 (batch 16)" if data is not None else "random ids (batch 8 x 32)"
    return f"{steps} AdamW steps on {where}, lr {lr:g}"


def eval_inputs(tok, vocab: int):
    data = sst2("dev", 256) if tok is not None else None
    if data is not None:
        texts, labels = data
        return tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt"), labels, "SST-2 dev (256)"
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1000, vocab, (64, 32), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None, "random ids (64x32)"


@torch.no_grad()
def logits(model, batch):
    out = []
    keys = list(batch)
    n = batch[keys[0]].shape[0]
    for i in range(0, n, 64):
        out.append(model(**{k: batch[k][i : i + 64] for k in keys}).logits)
    return torch.cat(out)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run(name: str, args, tmp: Path, lines: list):
    folder, fresh, tok = build(name, tmp)
    torch.manual_seed(0)  # the new head's initialisation
    model = bitfit.apply(fresh(), preset="all")
    how = train(model, tok, args.steps, seed=1, lr=args.lr)
    other = bitfit.apply(fresh(), preset="all")
    train(other, None, 0, seed=2)  # a second task (noise) for the switch timing

    full = tmp / f"{name}-full"
    import copy

    merged = bitfit.merge(copy.deepcopy(model))
    merged.save_pretrained(full)
    sizes = {}
    for dt in ("float32", "float16", "int8"):
        p = bitfit.save(model, tmp / f"{name}-{dt}", dtype=dt)
        sizes[dt] = folder_size(p)
    bitfit.save(other, tmp / f"{name}-other")
    art = tmp / f"{name}-float32"
    head_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if n in bitfit.get_state(model).selection.head_params)
    rep = bitfit.report(model)
    full_size = folder_size(full)

    batch, labels, src = eval_inputs(tok, model.config.vocab_size)
    ref = logits(model, batch)
    errs = {}
    for dt in ("float16", "int8"):
        out = logits(bitfit.load(fresh(), tmp / f"{name}-{dt}"), batch)
        d = (out - ref).abs()
        errs[dt] = (d.max().item(), d.mean().item(), (out.argmax(-1) == ref.argmax(-1)).float().mean().item())
    exact = torch.equal(logits(bitfit.load(fresh(), art), batch), ref)
    acc = (ref.argmax(-1) == labels).float().mean().item() if labels is not None else None

    from bitfit.artifacts import read_artifact

    meta = read_artifact(art).meta
    n_fix = sum(s.get("fixes", 0) for s in meta["slots"].values())
    n_val = sum(1 for s in meta["slots"].values() if s["encoding"] == "value")

    # load times, interleaved rounds; "+fwd": until the first prediction (one batch of 8 x 64
    # tokens), since from_pretrained maps the safetensors file lazily and pays on first use
    first = {"input_ids": torch.randint(1000, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))}

    def then_forward(load_fn):
        def go():
            m = load_fn()
            with torch.no_grad():
                m(**first)
        return go

    t_full, t_str, t_switch, f_full, f_str = [], [], [], [], []
    switch_model = bitfit.load(fresh(), tmp / f"{name}-other")
    for r in range(args.repeats):
        t_full.append(timed(lambda: T.AutoModelForSequenceClassification.from_pretrained(full))[0])
        t_str.append(timed(lambda: bitfit.load(str(folder), art))[0])
        which = art if r % 2 == 0 else tmp / f"{name}-other"
        t_switch.append(timed(lambda: bitfit.load(switch_model, which))[0])
        f_full.append(timed(then_forward(lambda: T.AutoModelForSequenceClassification.from_pretrained(full)))[0])
        f_str.append(timed(then_forward(lambda: bitfit.load(str(folder), art)))[0])
    mf, ms, mw, ff, fs = (statistics.median(x) for x in (t_full, t_str, t_switch, f_full, f_str))

    kb = lambda b: f"{b / 1024:,.1f} KiB" if b < 1 << 20 else f"{b / (1 << 20):,.1f} MiB"  # noqa: E731
    print(f"\n=== {name}: {type(model).__name__}, {rep.total:,} parameters, {rep.trainable:,} trainable "
          f"({rep.fraction:.3%}); trained with {how}")
    print(f"full checkpoint (save_pretrained): {kb(full_size)}")
    for dt in ("float32", "float16", "int8"):
        print(f"artifact {dt:8s}: {kb(sizes[dt]):>10s}  full/artifact = {full_size / sizes[dt]:,.0f}x")
    print(f"  head tensors: {kb(head_bytes)} of the float32 artifact; without them {kb(sizes['float32'] - head_bytes)}")
    print(f"float32 artifact: {len(meta['slots'])} slots, {n_fix} elements stored whole because base + delta could "
          f"not reach them exactly, {n_val} slots stored as values")
    print(f"float32 reload bit-exact: {exact}" + (f"; dev accuracy {acc:.3f}" if acc is not None else ""))
    for dt, (mx, mean, agree) in errs.items():
        print(f"{dt:8s} logit error on {src}: max {mx:.2e}, mean {mean:.2e}, argmax agreement {agree:.1%}")
    print(f"load time (median of {args.repeats}): from_pretrained(full) {mf * 1e3:,.0f} ms | "
          f"bitfit.load(base folder, artifact) {ms * 1e3:,.0f} ms ({mf / ms:.2f}x) | "
          f"task switch in memory {mw * 1e3:,.1f} ms ({mf / mw:,.1f}x faster than a full load)")
    print(f"load + first forward: full {ff * 1e3:,.0f} ms | bitfit.load(base folder, artifact) {fs * 1e3:,.0f} ms "
          f"({ff / fs:.2f}x)")
    lines.append(
        f"| {name} | {rep.trainable:,} | {kb(full_size)} | {kb(sizes['float32'])} ({full_size / sizes['float32']:,.0f}x) "
        f"| {kb(sizes['float16'])} | {kb(sizes['int8'])} | {mf * 1e3:,.0f} ms | {ms * 1e3:,.0f} ms "
        f"| {ff * 1e3:,.0f} ms | {fs * 1e3:,.0f} ms | {mw * 1e3:,.1f} ms |"
    )
    for dt, (mx, mean, agree) in errs.items():
        lines.append(f"ERR| {name} | {dt} | {src} | {mx:.2e} | {mean:.2e} | {agree:.1%} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--steps", type=int, default=60, help="AdamW training steps (0: a noise stand-in)")
    ap.add_argument("--lr", type=float, default=5e-3, help="learning rate of those steps")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines: list = []
    tmp = Path(tempfile.mkdtemp(prefix="bitfit-artifact-bench-"))
    try:
        for name in args.models.split(","):
            run(name.strip(), args, tmp, lines)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = [
        "| model | trained params | full checkpoint | artifact float32 (ratio) | float16 | int8 | "
        "load full | bitfit.load(folder) | full + 1st forward | bitfit.load + 1st forward | task switch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[x for x in lines if not x.startswith("ERR")],
        "",
        "| model | storage | inputs | max abs logit error | mean abs logit error | argmax agreement |",
        "|---|---|---|---:|---:|---:|",
        *[x[3:] for x in lines if x.startswith("ERR")],
    ]
    print("\n" + "\n".join(table))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
