"""Per-row decoding for the bank's service: sampling, stop strings and streaming inside one mixed generate call.

This module owns the batchers the HTTP service runs on:

* :class:`DecodingBatcher` (a :class:`~bitfit.serving.batching.GenerateBatcher`) decodes every row of a
  mixed-task batch with its own settings in one :meth:`bitfit.BiasBank.generate` call: its own
  ``max_new_tokens``, greedy or sampled (``temperature``, ``top_p``, ``seed``: each row draws from its own
  random generator, so a seeded row gives the same text whatever shares its batch), its own stop strings,
  and, for a streamed request, its text handed out as it is decoded. Rows for the base model itself (task
  ``None``) run in a second ``generate`` call of the plain base in the same worker step.
* :class:`MixedBatcher` (a :class:`~bitfit.serving.batching.Batcher`) lets one request name a task per
  row, so a fan-out (one input, many classification tasks) runs as one mixed bank call.

Both count rows and generated tokens per task (``task_rows``, ``task_tokens``) for ``/metrics``.
"""

from __future__ import annotations

import secrets
from collections import Counter
from typing import Callable, Optional

import torch

from .batching import Batcher, GenerateBatcher, _pad_left
from .guard import ApiError

# a row for the base model itself, not a task (OpenAI-style ``model`` = the base)
BASE = None


class RowState:
    """One generated row: its limits and stop strings, the tokens so far and the text handed out.

    ``update(token)`` is called once per decoding step with the row's new token (from the worker
    thread). Text is handed to ``emit(delta, finish)`` as soon as it can no longer change: a trailing
    incomplete character, or an end that could be the start of a stop string, is held back until the
    next token settles it. ``finish`` is None while the row runs, then ``"stop"`` (end-of-sequence
    token or a stop string; the stop string is not part of the text) or ``"length"``.
    """

    def __init__(self, tokenizer, limit: int, eos_ids: set, stop: tuple = (), temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, emit: Optional[Callable] = None):
        self.tokenizer, self.limit, self.eos_ids = tokenizer, int(limit), eos_ids
        self.stop = tuple(s for s in stop if s)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.seed = seed
        self.generator: Optional[torch.Generator] = None
        self.emit = emit
        self.tokens: list = []
        self.text = ""  # the final text so far (what was handed out)
        self.finish: Optional[str] = None
        self.cancelled = False  # the client went away: the row stops at the next step

    @property
    def done(self) -> bool:
        return self.finish is not None or self.cancelled

    @property
    def sampled(self) -> bool:
        return self.temperature > 0.0

    def _hand_out(self, upto: str, finish: Optional[str]) -> None:
        delta = upto[len(self.text):] if upto.startswith(self.text) else ""
        if upto.startswith(self.text):
            self.text = upto
        if finish is not None:
            self.finish = finish
        if self.emit is not None and (delta or finish is not None):
            self.emit(delta, finish)

    def update(self, token: int) -> None:
        if self.done:
            return
        if token in self.eos_ids:
            self._hand_out(self._decoded(), "stop")
            return
        self.tokens.append(int(token))
        full = self._decoded()
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._hand_out(full[:cut], "stop")
        elif len(self.tokens) >= self.limit:
            self._hand_out(full, "length")
        else:
            hold = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            safe = full[: len(full) - hold]
            while safe.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other tokens
                safe = safe[:-1]
            self._hand_out(safe, None)

    def finish_now(self) -> None:
        """End a row that the decoding loop ended (every row's limit reached)."""
        if self.finish is None and not self.cancelled:
            self._hand_out(self._decoded(), "length")

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def result(self) -> dict:
        return {"text": self.text, "tokens": len(self.tokens), "finish_reason": self.finish or "length"}


class _RowsDone:
    """A transformers stopping criterion: feeds each row its new token and says which rows are done."""

    def __init__(self, rows: list):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        last = input_ids[:, -1].tolist()
        for row, tok in zip(self.rows, last):
            row.update(tok)
        return torch.tensor([r.done for r in self.rows], dtype=torch.bool, device=input_ids.device)


class _RowSampler:
    """A transformers logits processor: rows with a temperature draw their token (temperature, nucleus
    ``top_p``, their own generator) and get scores that make greedy selection pick it; other rows are
    left as they are (greedy)."""

    def __init__(self, rows: list):
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores
        for i, row in enumerate(self.rows):
            if not row.sampled or row.done:
                continue
            if row.generator is None:
                row.generator = torch.Generator(device=scores.device)
                row.generator.manual_seed(row.seed if row.seed is not None else secrets.randbits(63))
            probs = torch.softmax(scores[i].float() / row.temperature, dim=-1)
            if row.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < row.top_p  # the smallest set reaching top_p
                keep[0] = True
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs, 1, generator=row.generator))
            if out is scores:
                out = scores.clone()
            out[i] = float("-inf")
            out[i, token] = 0.0
        return out


class DecodingBatcher(GenerateBatcher):
    """Generation requests of any tasks (and of the base itself, task ``BASE``) in one worker step, each row
    with its own limit, sampling, stop strings and optional streaming callback.

    A request's ``options``: ``max_new_tokens`` (default 64), ``temperature`` (0: greedy), ``top_p``,
    ``seed``, ``stop`` (strings), ``emit`` (a callable ``emit(row_index, delta, finish)`` called from the
    worker thread as text is decoded) and ``rows`` (a list the request's :class:`RowState` objects are put
    in as they are made, so the caller can cancel them).
    """

    def __init__(self, bank, tokenizer, **kwargs):
        super().__init__(bank, tokenizer, **kwargs)
        self.task_rows: Counter = Counter()
        self.task_tokens: Counter = Counter()

    def _live(self, items: list):
        results: list = [None] * len(items)
        live = []
        for k, it in enumerate(items):
            if it.task is BASE or it.task in self.bank:
                live.append(k)
            else:
                results[k] = ApiError(404, "unknown_task", f"task {it.task!r} was removed")
        features = [f for k in live for f in items[k].features]
        tasks = [items[k].task for k in live for _ in items[k].features]
        return results, live, features, tasks

    def _states(self, item) -> list:
        opt = item.options
        emit = opt.get("emit")
        rows = []
        for j, _ in enumerate(item.features):
            cb = (lambda delta, finish, j=j: emit(j, delta, finish)) if emit is not None else None
            rows.append(RowState(self.tokenizer, opt.get("max_new_tokens", 64), self.eos_ids,
                                 stop=tuple(opt.get("stop") or ()), temperature=opt.get("temperature") or 0.0,
                                 top_p=opt.get("top_p", 1.0), seed=None if opt.get("seed") is None
                                 else int(opt["seed"]) + j, emit=cb))
        if isinstance(opt.get("rows"), list):
            opt["rows"][:] = rows  # a retried batch makes them again
        return rows

    def _decode(self, tasks: list, features: list, rows: list) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        batch = _pad_left(self.tokenizer, features, self.pad_id)
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      max_new_tokens=max(r.limit for r in rows), do_sample=False, num_beams=1,
                      pad_token_id=self.pad_id, stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]))
        if any(r.sampled for r in rows):
            kwargs["logits_processor"] = LogitsProcessorList([_RowSampler(rows)])
        if tasks[0] is BASE:
            with self.bank._lock, torch.no_grad():  # not while a bank call has the base's modules switched
                self.bank.base.generate(**kwargs)
        else:
            self.bank.generate(tasks, **kwargs)
        for r in rows:
            r.finish_now()

    def _run(self, items: list) -> list:
        return _retry_removed(self, self._run_once, items)

    def _run_once(self, items: list) -> list:
        results, live, features, tasks = self._live(items)
        if not live:
            return results
        rows = [r for k in live for r in self._states(items[k])]
        on_base = [i for i, t in enumerate(tasks) if t is BASE]
        on_tasks = [i for i, t in enumerate(tasks) if t is not BASE]
        for part in (on_tasks, on_base):
            if part and not all(rows[i].done for i in part):
                self._decode([tasks[i] for i in part], [features[i] for i in part], [rows[i] for i in part])
        out = [r.result() for r in rows]
        with self._stats_lock:
            for t, r in zip(tasks, out):
                self.task_rows[t] += 1
                self.task_tokens[t] += r["tokens"]
        self._count([t if t is not BASE else "" for t in tasks], len(live), tokens=sum(r["tokens"] for r in out))
        return self._split(results, items, live, out)


class MixedBatcher(Batcher):
    """A :class:`~bitfit.serving.batching.Batcher` whose request may name one task per row (``task`` a tuple
    with one name per input): a fan-out runs as one mixed bank call whatever the batch window."""

    def __init__(self, bank, tokenizer, **kwargs):
        super().__init__(bank, tokenizer, **kwargs)
        self.task_rows: Counter = Counter()
        self.task_tokens: Counter = Counter()

    def _live(self, items: list):
        results: list = [None] * len(items)
        live = []
        for k, it in enumerate(items):
            names = it.task if isinstance(it.task, tuple) else (it.task,)
            gone = [t for t in names if t not in self.bank]
            if gone:
                results[k] = ApiError(404, "unknown_task", f"task {gone[0]!r} was removed")
            else:
                live.append(k)
        features = [f for k in live for f in items[k].features]
        tasks = [t for k in live for t in (items[k].task if isinstance(items[k].task, tuple)
                                           else [items[k].task] * items[k].n)]
        with self._stats_lock:
            self.task_rows.update(tasks)
        return results, live, features, tasks

    def _run(self, items: list) -> list:
        return _retry_removed(self, super()._run, items)


def _retry_removed(batcher, run, items: list, tries: int = 3) -> list:
    """``run(items)``, again if a task of the batch was removed between the check of its items and the bank
    call (the bank then refuses the whole call): the items of removed tasks get their 404 and the others run."""
    from ..errors import BitFitError

    for attempt in range(tries):
        try:
            return run(items)
        except BitFitError:
            names = {t for it in items for t in (it.task if isinstance(it.task, tuple) else (it.task,))}
            if attempt == tries - 1 or all(t is BASE or t in batcher.bank for t in names):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


__all__ = ["BASE", "DecodingBatcher", "MixedBatcher", "RowState"]
