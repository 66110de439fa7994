"""What a random batch's padding costs a BitFit step, and what each way around it takes back.

Random training batches (32 rows) drawn from a real task's training file, tokenised with MiniLM-L6's tokenizer,
each run through forward and backward of the packaged MiniLM-L6 with `bitfit train`'s model settings
(frozen_dtype auto, lean, dropout 0), in one process, one thread, CPU time, the ways rotated round by round:

- ``padded``: the batch as collated, every row padded to the longest (lean mode without packing);
- ``sub-batches``: the batch cut into runs of similar length (bitfit.fast.subbatch, the fallback for families
  that do not pack);
- ``packed``: the default, padding-free encoder layers (bitfit.fast.packing);
- ``no padding (bound)``: the same number of rows, every one cut to the batch's mean length: what the
  step would cost if its rows were all alike (a bound, not a way to train).

Printed: the CPU model, the batches' real and padded tokens, ms per step of each way (median over rounds)
and its ratio to ``padded``.

    python benchmarks/padding.py --data-dir ../shared/data/glue                 # SST-2, ~2 min
    python benchmarks/padding.py --data-dir ../shared/data/glue --task rte      # sentence pairs
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

TASKS = ("sst2", "rte", "mrpc", "cola", "stsb")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("BITFIT_GLUE_DIR", "../shared/data/glue"))
    p.add_argument("--task", default="sst2", choices=TASKS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=12, help="batches a round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import transformers as T

    import bitfit
    from bitfit.fast import subbatch
    from bitfit.data import glue
    from bitfit.fast.hardware import cpu_summary
    from bitfit.fast.lean import set_lean
    from bitfit.core.models import resolve_model

    T.logging.set_verbosity_error()
    name = resolve_model("minilm")
    tok = T.AutoTokenizer.from_pretrained(name)
    data = glue.load_glue(args.task, "train", args.data_dir)[0]
    rng = random.Random(0)
    rows = rng.sample(range(len(data)), args.batch * args.batches)
    collate = T.DataCollatorWithPadding(tok)
    batches = []
    for i in range(args.batches):
        enc = []
        for j in rows[i * args.batch:(i + 1) * args.batch]:
            texts = [data.texts[j]] + ([data.pairs[j]] if data.pairs else [])
            label = data.labels[j]
            enc.append(dict(tok(*texts, truncation=True, max_length=128),
                            labels=int(label > 2.5) if isinstance(label, float) else int(label)))
        batches.append(collate(enc))
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)

    model = T.AutoModelForSequenceClassification.from_pretrained(name, num_labels=2, hidden_dropout_prob=0.0,
                                                                 attention_probs_dropout_prob=0.0)
    bitfit.apply(model, frozen_dtype="auto")
    precision = next((m for m in bitfit.report(model).modes if not m.startswith("lean")), "float32")
    model.train()

    def whole_step(b):
        model(**b).loss.backward()

    def sub_step(b):
        for sub, share in subbatch.split(dict(b)) or [(dict(b), 1.0)]:
            (model(**sub).loss * share).backward()

    def bound_step(b):
        n = max(1, round(float(b["attention_mask"].sum(1).float().mean())))
        model(**{k: (v[:, :n] if v.dim() == 2 else v) for k, v in b.items()} | {
            "attention_mask": torch.ones_like(b["attention_mask"][:, :n])}).loss.backward()

    # way -> (its step, whether the layers pack); the lean mode is switched once per way, outside the clock
    ways = {"padded": (whole_step, False), "sub-batches": (sub_step, False), "packed": (whole_step, True),
            "no padding (bound)": (bound_step, False)}
    times = {w: [] for w in ways}
    for fn, pack in ways.values():  # warm-up
        set_lean(model, True, pack=pack)
        fn(batches[0])
    for r in range(args.rounds):
        order = list(ways)[r % len(ways):] + list(ways)[:r % len(ways)]
        for w in order:
            fn, pack = ways[w]
            set_lean(model, True, pack=pack)
            t0 = time.process_time()
            for b in batches:
                fn(b)
            times[w].append((time.process_time() - t0) / len(batches) * 1000)
    print(f"CPU: {cpu_summary()}; {args.threads} thread(s)")
    print(f"frozen weights: {precision}")
    print(f"{glue.get_task(args.task).folder}: {args.batches} random batches of {args.batch} rows, "
          f"{real / args.batches:.0f} real tokens a batch, padded to {padded / args.batches:.0f} ({padded / real:.2f}x)")
    base = statistics.median(times["padded"])
    for w, ts in times.items():
        med = statistics.median(ts)
        print(f"  {w:<20} {med:7.1f} ms/step   {med / base:.2f}x padded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
