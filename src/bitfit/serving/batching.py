"""Micro-batching for the bank's service: requests that arrive close together run as one bank call.

This module owns the queue between the HTTP handlers and the bank: :class:`Batcher` collects
requests for ``window_s`` seconds (up to ``max_batch`` rows, whatever their tasks) into one
:class:`bitfit.BiasBank` call run in a worker thread, and hands each request its own rows back;
:class:`GenerateBatcher` does the same for generation (one :meth:`bitfit.BiasBank.generate` call,
prompts padded on the left). At most ``max_queue`` requests wait (a 503 with Retry-After beyond),
and the work of a client that disconnected while waiting is dropped before it is computed.
"""

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import BitFitError
from .guard import ApiError, ClientGone

log = logging.getLogger(__name__)


DEFAULT_MAX_QUEUE = 64
RETRY_AFTER_S = 1


@dataclass
class _Item:
    task: str
    features: list  # one dict of token lists per input
    future: asyncio.Future
    n: int = field(init=False)
    queued: bool = True  # counted in Batcher.waiting
    started: bool = False  # taken into a bank call
    options: dict = field(default_factory=dict)  # per-request options (generation: max_new_tokens)

    def __post_init__(self):
        self.n = len(self.features)


class Batcher:
    """Collects requests for ``window_s`` seconds (up to ``max_batch`` rows) into one bank call."""

    def __init__(self, bank, tokenizer, max_batch: int = 64, window_s: float = 0.005,
                 max_queue: int = DEFAULT_MAX_QUEUE):
        self.bank = bank
        self.tokenizer = tokenizer
        self.max_batch = max(1, int(max_batch))
        self.window_s = max(0.0, float(window_s))
        self.max_queue = max(1, int(max_queue))
        self.waiting = 0  # requests submitted and not yet in a bank call (event-loop thread only)
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "mixed_batches": 0, "max_tasks_in_batch": 0,
                      "failed_batches": 0, "rejected_busy": 0, "dropped_disconnected": 0,
                      "abandoned_disconnected": 0}
        self._stats_lock = threading.Lock()
        self.queue: Optional[asyncio.Queue] = None
        self._worker: Optional[asyncio.Task] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        names = getattr(tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"]
        self.input_names = list(names)

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitfit-bank")
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def full(self) -> bool:
        return self.waiting >= self.max_queue

    def busy_error(self) -> ApiError:
        with self._stats_lock:
            self.stats["rejected_busy"] += 1
        return ApiError(503, "busy",
                        f"server busy: {self.waiting} requests are already waiting (--max-queue {self.max_queue}); "
                        f"retry after {RETRY_AFTER_S} s", headers={"Retry-After": str(RETRY_AFTER_S)})

    def _unqueue(self, item: _Item) -> None:
        if item.queued:
            item.queued = False
            self.waiting -= 1

    async def submit(self, task: str, features: list, wait_disconnect=None, options: Optional[dict] = None) -> list:
        """Queue one request and wait for its rows of logits.

        Raises a 503 :class:`ApiError` when ``max_queue`` requests already wait. With
        ``wait_disconnect`` (a coroutine function returning when the client has gone), a client
        that leaves while its request waits has the request dropped before it is computed, and
        :class:`ClientGone` is raised.
        """
        if self.full():
            raise self.busy_error()
        loop = asyncio.get_running_loop()
        item = _Item(task, features, loop.create_future(), options=dict(options or {}))
        self.waiting += 1
        item.future.add_done_callback(lambda _f, it=item: self._unqueue(it))
        self.queue.put_nowait(item)
        if wait_disconnect is None:
            return await item.future
        watcher = asyncio.ensure_future(wait_disconnect())
        try:
            await asyncio.wait({item.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not item.future.done():  # the client left (or this handler was cancelled)
                with self._stats_lock:
                    self.stats["abandoned_disconnected" if item.started else "dropped_disconnected"] += 1
                item.future.cancel()
        if item.future.cancelled():
            raise ClientGone()
        return item.future.result()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending: Optional[_Item] = None
        while True:
            try:
                first = pending if pending is not None else await self.queue.get()
                pending = None
                items, rows = [first], first.n
                deadline = loop.time() + self.window_s
                while rows < self.max_batch:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                    if rows + nxt.n > self.max_batch:
                        pending = nxt
                        break
                    items.append(nxt)
                    rows += nxt.n
                for it in items:
                    self._unqueue(it)
                items = [it for it in items if not it.future.done()]  # client went away: dropped
                if not items:
                    continue
                for it in items:
                    it.started = True
                try:
                    results = await loop.run_in_executor(self._executor, self._run, items)
                except Exception as exc:  # noqa: BLE001 - reported to each waiting request
                    with self._stats_lock:
                        self.stats["failed_batches"] += 1
                    log.exception("bank call failed")
                    for it in items:
                        if not it.future.done():
                            it.future.set_exception(exc)
                    continue
                for it, res in zip(items, results):
                    if it.future.done():
                        continue
                    if isinstance(res, Exception):
                        it.future.set_exception(res)
                    else:
                        it.future.set_result(res)
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - the worker must never die
                log.exception("batching loop error")

    def _run(self, items: list) -> list:
        """Worker thread: one bank call for the rows of every item whose task still exists."""
        results, live, features, tasks = self._live(items)
        if not live:
            return results
        batch = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        inputs = {k: v for k, v in batch.items() if k in self.input_names}
        out = self.bank(tasks=tasks, **inputs)
        self._count(tasks, len(live), last_strategy=out.strategy)
        return self._split(results, items, live, [row.detach().float().cpu() for row in out.logits])

    def _live(self, items: list):
        """(results with a 404 for items whose task was removed, indices of the rest, their rows' features,
        each row's task)."""
        results: list = [None] * len(items)
        live = []
        for k, it in enumerate(items):
            if it.task in self.bank:
                live.append(k)
            else:
                results[k] = ApiError(404, "unknown_task", f"task {it.task!r} was removed")
        features = [f for k in live for f in items[k].features]
        tasks = [items[k].task for k in live for _ in items[k].features]
        return results, live, features, tasks

    def _count(self, tasks: list, requests: int, tokens: int = 0, **last) -> None:
        with self._stats_lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(tasks)
            self.stats["requests"] += requests
            if tokens:
                self.stats["tokens"] += tokens
            distinct = len(set(tasks))
            self.stats["mixed_batches"] += distinct > 1
            self.stats["max_tasks_in_batch"] = max(self.stats["max_tasks_in_batch"], distinct)
            self.stats.update(last)

    @staticmethod
    def _split(results: list, items: list, live: list, rows: list) -> list:
        """Hand each live item its own slice of the batch's rows."""
        pos = 0
        for k in live:
            n = items[k].n
            results[k] = rows[pos: pos + n]
            pos += n
        return results


class GenerateBatcher(Batcher):
    """Collects generation requests (any tasks) into one :meth:`BiasBank.generate` call: prompts
    padded on the left, greedy decoding up to the largest ``max_new_tokens`` of the batch, each
    row cut at its own limit and at the end-of-sequence token."""

    def __init__(self, bank, tokenizer, **kwargs):
        super().__init__(bank, tokenizer, **kwargs)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise BitFitError("the tokenizer has neither a pad nor an end-of-sequence token; generation needs one")
        eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        self.stats["tokens"] = 0

    def _run(self, items: list) -> list:
        results, live, features, tasks = self._live(items)
        if not live:
            return results
        limits = [items[k].options.get("max_new_tokens", 64) for k in live for _ in items[k].features]
        batch = _pad_left(self.tokenizer, features, self.pad_id)
        prompt_len = batch["input_ids"].shape[1]
        out = self.bank.generate(tasks, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max(limits), do_sample=False, num_beams=1,
                                 pad_token_id=self.pad_id)
        rows = []
        n_tokens = 0
        for i, limit in enumerate(limits):
            new = out[i, prompt_len: prompt_len + limit].tolist()
            finish = "length"
            for j, tok in enumerate(new):
                if tok in self.eos_ids:
                    new, finish = new[:j], "stop"
                    break
            n_tokens += len(new)
            rows.append({"text": self.tokenizer.decode(new, skip_special_tokens=True), "tokens": len(new),
                         "finish_reason": finish})
        self._count(tasks, len(live), tokens=n_tokens)
        return self._split(results, items, live, rows)


def _pad_left(tokenizer, features: list, pad_id: int) -> dict:
    """input_ids / attention_mask ``[rows, longest]`` with the prompts right-aligned (decoder-only models)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, width - n:] = torch.tensor(f["input_ids"], dtype=torch.long)
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}



__all__ = ["Batcher", "GenerateBatcher", "DEFAULT_MAX_QUEUE", "RETRY_AFTER_S"]
