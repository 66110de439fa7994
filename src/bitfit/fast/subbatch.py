"""Random training batches without paying for their padding: each batch runs as a few sub-batches of
similar length, with the same gradient.

A padded batch costs its row count times its longest row. Grouping rows of similar length into batches
(``transformers``' ``group_by_length``) removes most of that padding but changes which rows meet in a
batch, and on sentence-pair tasks it cost accuracy (RTE: 54.9 against 57.8 with random batches, three seeds;
docs/RESULTS.md). Here the batch stays the random one the sampler drew: its rows are sorted by length, cut
into contiguous runs, and each run goes through forward and backward with its padding trimmed and its
loss weighted by its share of the rows. For a loss that is a mean over rows (classification and
regression heads) the summed gradient is the batch's own, up to floating-point rounding.

Where to cut is a small dynamic program over the sorted lengths: a run costs ``rows x longest`` tokens
plus :data:`OVERHEAD_TOKENS` for the extra forward/backward call, and the cheapest partition wins; a batch
of one length range stays whole.

Encoder families whose layers can run padding-free (``bitfit.fast.packing``: BERT, RoBERTa, DistilBERT, ...)
skip this: one call over the packed real tokens is cheaper than several calls (docs/PERFORMANCE.md). Sub-
batches serve the other families (GPT-2, LLaMA/Qwen heads, MPNet, ...).
"""
from __future__ import annotations

from typing import Optional

import torch

#: A sub-batch's fixed cost in padded-token equivalents. Measured on MiniLM-L6 (bf16 frozen weights, one
#: CPU thread, Intel Xeon): ~34 ms per forward+backward call against ~0.32 ms per token, i.e. ~100 tokens;
#: a larger model has a larger per-token cost and a relatively smaller per-call one, so this errs toward
#: cutting less. Checked on SST-2 (60 steps, quiet): 32 was slower (16.4 s against 12.5 s), 512 level (12.1 s).
OVERHEAD_TOKENS = 128


def right_padded(mask: torch.Tensor) -> bool:
    """Every row of the bool ``mask`` (rows x positions) is real tokens from position 0, then padding only."""
    return bool(mask[:, 0].all()) and not bool((mask[:, 1:] & ~mask[:, :-1]).any())


def partition(lengths: list, overhead: int = OVERHEAD_TOKENS) -> list:
    """Cut ``lengths`` (sorted longest first) into contiguous runs minimising sum(rows x first) + overhead per
    run; returns the runs' (start, stop) pairs."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[j]: cheapest cost of the first j rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # the last run is rows i..j-1, its longest row is lengths[i]
            c = best[i] + (j - i) * lengths[i] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    runs, j = [], n
    while j > 0:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def length_runs(mask: torch.Tensor, overhead: int = OVERHEAD_TOKENS) -> list:
    """The rows of the bool right-padded ``mask`` sorted by length (longest first) and cut by :func:`partition`:
    ``[(row indices, the run's longest length), ...]``."""
    lengths = mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    return [(order[a:b], int(sorted_lengths[a])) for a, b in partition(sorted_lengths, overhead)]


def split(inputs: dict, overhead: int = OVERHEAD_TOKENS) -> Optional[list]:
    """``inputs`` (a collated, padded batch) as [(sub_inputs, share of rows), ...] sorted and trimmed, or None
    where splitting does not apply or would not pay: no 2-D ``attention_mask``, labels that are not one
    per row, a tensor that is neither per row nor per token, padding that is not on the right, or one run."""
    mask = inputs.get("attention_mask")
    labels = inputs.get("labels")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not isinstance(labels, torch.Tensor):
        return None
    n, t = mask.shape
    if n < 2 or labels.dim() != 1 or labels.shape[0] != n:
        return None
    for v in inputs.values():
        per_row = isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == n
        per_token = isinstance(v, torch.Tensor) and v.dim() == 2 and tuple(v.shape) == (n, t)
        if not (per_row or per_token or v is None):
            return None
    m = mask.bool()
    # right padding only: a row's real tokens then sit at positions 0..len-1 whatever the padding, so trimming
    # changes nothing they see (left padding would shift the positions of models that count them from 0)
    if not right_padded(m):
        return None
    runs = length_runs(m, overhead)
    if len(runs) == 1:
        return None
    out = []
    for rows, longest in runs:
        keep = max(longest, 1)
        sub = {}
        for k, v in inputs.items():
            if v is None:
                sub[k] = v
            elif v.dim() == 2:
                sub[k] = v[rows, :keep]
            else:
                sub[k] = v[rows]
        out.append((sub, rows.numel() / n))
    return out
