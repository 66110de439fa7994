"""HTTP service over a :class:`bitfit.BiasBank`: many BitFit tasks, one frozen base.

``create_app(bank, tokenizer)`` builds a FastAPI app; ``bitfit serve`` runs it with uvicorn.

Endpoints
    ``POST /v1/predict``  ``{"task": "sst2", "inputs": ["text", ["text a", "text b"], ...]}``
    ``GET /v1/tasks``     names, labels and problem type of every task
    ``GET /health``       liveness plus batching counters

Requests that arrive within ``batch_window_ms`` of each other are run as one bank call
(whatever their tasks), in a worker thread, and the results are sent back to each request.
Bad requests get a 4xx JSON error ``{"error": {"type": ..., "message": ...}}``.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Optional, Union

import torch

from .errors import BitFitError

log = logging.getLogger("bitfit.serve")

# A text this many times longer (in characters) than max_length tokens is refused before
# tokenizing it (tokenizers need at least about one character per token).
CHARS_PER_TOKEN_LIMIT = 32


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message


@dataclass
class _Item:
    task: str
    features: list  # one dict of token lists per input
    future: asyncio.Future
    n: int = field(init=False)

    def __post_init__(self):
        self.n = len(self.features)


class Batcher:
    """Collects requests for ``window_s`` seconds (up to ``max_batch`` rows) into one bank call."""

    def __init__(self, bank, tokenizer, max_batch: int = 64, window_s: float = 0.005):
        self.bank = bank
        self.tokenizer = tokenizer
        self.max_batch = max(1, int(max_batch))
        self.window_s = max(0.0, float(window_s))
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "mixed_batches": 0, "max_tasks_in_batch": 0,
                      "failed_batches": 0}
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

    async def submit(self, task: str, features: list) -> list:
        loop = asyncio.get_running_loop()
        item = _Item(task, features, loop.create_future())
        await self.queue.put(item)
        return await item.future

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
                items = [it for it in items if not it.future.done()]  # client went away
                if not items:
                    continue
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
        results: list = [None] * len(items)
        live = []
        for k, it in enumerate(items):
            if it.task in self.bank:
                live.append(k)
            else:
                results[k] = ApiError(404, "unknown_task", f"task {it.task!r} was removed")
        if not live:
            return results
        features = [f for k in live for f in items[k].features]
        tasks = [items[k].task for k in live for _ in items[k].features]
        batch = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        inputs = {k: v for k, v in batch.items() if k in self.input_names}
        out = self.bank(tasks=tasks, **inputs)
        with self._stats_lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(tasks)
            self.stats["requests"] += len(live)
            distinct = len(set(tasks))
            self.stats["mixed_batches"] += distinct > 1
            self.stats["max_tasks_in_batch"] = max(self.stats["max_tasks_in_batch"], distinct)
            self.stats["last_strategy"] = out.strategy
        pos = 0
        for k in live:
            n = items[k].n
            results[k] = [row.detach().float().cpu() for row in out.logits[pos: pos + n]]
            pos += n
        return results


def postprocess(logits: torch.Tensor, info: dict) -> dict:
    """One prediction from one row of logits, by the task's problem type."""
    labels = info["labels"]
    ptype = info["problem_type"]
    if ptype == "regression":
        vals = [float(x) for x in logits.reshape(-1)]
        return {"score": vals[0]} if len(vals) == 1 else {"scores": vals}
    if ptype == "multi_label_classification":
        probs = torch.sigmoid(logits.reshape(-1))
        return {
            "labels": [labels[i] for i, p in enumerate(probs.tolist()) if p >= 0.5],
            "scores": {labels[i]: float(p) for i, p in enumerate(probs.tolist())},
        }
    probs = torch.softmax(logits.reshape(-1).float(), dim=-1)
    best = int(torch.argmax(probs))
    return {
        "label": labels[best],
        "score": float(probs[best]),
        "scores": {labels[i]: float(p) for i, p in enumerate(probs.tolist())},
    }


def create_app(
    bank,
    tokenizer,
    *,
    max_batch: int = 64,
    batch_window_ms: float = 5.0,
    max_inputs: int = 64,
    max_length: int = 512,
    max_body_bytes: int = 8 * 1024 * 1024,
):
    """A FastAPI app serving ``bank`` (a :class:`bitfit.BiasBank`) with ``tokenizer``."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as exc:  # pragma: no cover
        raise BitFitError(f"the HTTP service needs fastapi and uvicorn: pip install 'bitfit[serve]' ({exc})") from None

    for name, v in (("max_batch", max_batch), ("max_inputs", max_inputs), ("max_length", max_length)):
        if not isinstance(v, int) or v < 1:
            raise BitFitError(f"{name} must be a positive integer, got {v!r}")
    if batch_window_ms < 0:
        raise BitFitError(f"batch_window_ms must be >= 0, got {batch_window_ms!r}")

    Pair = Annotated[list[StrictStr], Field(min_length=2, max_length=2)]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        task: StrictStr
        inputs: Annotated[list[Union[StrictStr, Pair]], Field(min_length=1)]

    batcher = Batcher(bank, tokenizer, max_batch=max_batch, window_s=batch_window_ms / 1000.0)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="bitfit", description="BitFit tasks over one frozen base", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.bank = bank
    app.state.limits = {"max_batch": max_batch, "batch_window_ms": batch_window_ms, "max_inputs": max_inputs,
                        "max_length": max_length, "max_body_bytes": max_body_bytes}

    def error(status: int, type_: str, message: str, **extra) -> JSONResponse:
        return JSONResponse({"error": {"type": type_, "message": message, **extra}}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.type, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # pragma: no cover - defensive
        log.exception("internal error")
        return error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    def tokenize(task: str, inputs: list) -> list:
        char_limit = max_length * CHARS_PER_TOKEN_LIMIT
        for i, x in enumerate(inputs):
            texts = x if isinstance(x, list) else [x]
            if sum(len(t) for t in texts) > char_limit:
                raise ApiError(413, "input_too_long",
                               f"inputs[{i}] has {sum(len(t) for t in texts)} characters, more than this "
                               f"server accepts ({char_limit}); shorten it")
        features = []
        for i, x in enumerate(inputs):
            enc = tokenizer(*x, truncation=False) if isinstance(x, list) else tokenizer(x, truncation=False)
            n = len(enc["input_ids"])
            if n > max_length:
                raise ApiError(413, "input_too_long",
                               f"inputs[{i}] is {n} tokens long, more than max_length={max_length}; shorten it")
            features.append({k: enc[k] for k in batcher.input_names if k in enc})
        return features

    @app.post("/v1/predict")
    async def predict(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise ApiError(413, "body_too_large", f"request body of {size} bytes exceeds {max_body_bytes} bytes")
        body = await request.body()
        if len(body) > max_body_bytes:
            raise ApiError(413, "body_too_large", f"request body exceeds {max_body_bytes} bytes")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "invalid_request",
                           'the body must be a JSON object: {"task": "<name>", "inputs": ["text", ...]}')
        try:
            req = PredictRequest.model_validate(payload)
        except ValidationError as exc:
            details = [
                {"loc": [str(p) for p in e["loc"]], "msg": e["msg"]}
                for e in exc.errors(include_url=False, include_context=False, include_input=False)
            ]
            msg = "; ".join(f"{'.'.join(d['loc']) or 'body'}: {d['msg']}" for d in details[:5])
            return error(422, "validation_error",
                         f"{msg}. Expected {{\"task\": str, \"inputs\": [str or [str, str], ...]}}", details=details)
        if req.task not in bank:
            raise ApiError(404, "unknown_task", f"unknown task {req.task!r}; available: {', '.join(bank.tasks)}")
        if len(req.inputs) > max_inputs:
            raise ApiError(413, "too_many_inputs",
                           f"{len(req.inputs)} inputs in one request; at most {max_inputs} are accepted")
        features = await run_in_threadpool(tokenize, req.task, req.inputs)
        try:
            rows = await batcher.submit(req.task, features)
        except ApiError:
            raise
        except BitFitError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        info = bank.task_info(req.task) if req.task in bank else None
        if info is None:
            raise ApiError(404, "unknown_task", f"task {req.task!r} was removed")
        return {"task": req.task, "problem_type": info["problem_type"],
                "predictions": [postprocess(r, info) for r in rows]}

    @app.get("/v1/tasks")
    async def tasks():
        return {"tasks": [bank.task_info(n) for n in bank.tasks]}

    @app.get("/health")
    async def health():
        with batcher._stats_lock:
            stats = dict(batcher.stats)
        return {"status": "ok", "tasks": len(bank), "stats": stats, "limits": app.state.limits}

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["create_app", "serve", "postprocess", "Batcher"]
