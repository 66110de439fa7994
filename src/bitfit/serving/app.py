"""HTTP service over a :class:`bitfit.BiasBank`: many BitFit tasks, one frozen base.

``create_app(bank, tokenizer)`` builds a FastAPI app; ``bitfit serve`` runs it with uvicorn.

Endpoints
    ``POST /v1/predict``  ``{"task": "sst2", "inputs": ["text", ["text a", "text b"], ...]}``
    ``POST /v1/generate`` ``{"task": "chat", "inputs": ["instruction", ["instruction", "input"]],
                          "max_new_tokens": 64}`` (a bank over a causal LM: greedy decoding,
                          rows of different tasks in one ``generate`` call)
    ``GET /v1/tasks``     names, labels and problem type of every task
    ``GET /health``       liveness plus batching counters

Requests that arrive within ``batch_window_ms`` of each other are run as one bank call
(whatever their tasks), in a worker thread, and the results are sent back to each request.
Bad requests get a 4xx JSON error ``{"error": {"type": ..., "message": ...}}``.

Hardening (docs/SERVING.md, "Limits and failure modes"): a pure-ASGI guard in front of the
app checks the optional API key and stops reading a body once it passes ``max_body_bytes``
(Content-Length or chunked); ``/v1/predict`` needs ``application/json`` (UTF-8) and answers
400 for any body that does not decode; at most ``max_queue`` requests wait for the worker
(503 with Retry-After beyond); work of clients that disconnected while waiting is dropped.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import asyncio
import hmac
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Optional, Union

import torch

from ..errors import BitFitError

log = logging.getLogger("bitfit.serving.app")

# A text this many times longer (in characters) than max_length tokens is refused before
# tokenizing it (tokenizers need at least about one character per token).
CHARS_PER_TOKEN_LIMIT = 32

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUE = 64
RETRY_AFTER_S = 1
# Paths that answer without the API key (liveness probes).
OPEN_PATHS = frozenset({"/health"})


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message
        self.headers = headers


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, size: Optional[int] = None):
        what = f"request body of {size} bytes" if size is not None else "request body"
        super().__init__(413, "body_too_large",
                         f"{what} exceeds this server's limit of {limit} bytes; send a smaller body "
                         "(fewer or shorter inputs per request)")


class _ClientGone(Exception):
    """The client disconnected before its result was ready; nothing is sent back."""


def _json_error(status: int, type_: str, message: str, headers: Optional[dict] = None, **extra):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"type": type_, "message": message, **extra}}, status_code=status,
                        headers=headers)


class RequestGuard:
    """Pure-ASGI middleware: API key, request body limit, and ``Connection: close`` for early answers.

    * With ``api_key`` set, every path except ``open_paths`` needs ``Authorization: Bearer KEY``
      or ``X-API-Key: KEY`` (compared with :func:`hmac.compare_digest`); else 401.
    * A declared ``Content-Length`` over ``max_body_bytes`` is answered 413 before anything is
      read. A body without one (chunked) is counted as it is received, and ``receive`` raises
      :class:`BodyTooLarge` (answered 413) as soon as the count passes the limit, so at most
      ``max_body_bytes`` plus one network chunk is ever held.
    * A response that starts before the request body was read to its end (413, 401, 415, 503)
      carries ``Connection: close``, so the server closes the connection instead of reading
      and discarding the rest of the body.
    """

    def __init__(self, app, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_key: Optional[str] = None,
                 open_paths=OPEN_PATHS):
        self.app = app
        self.max_body_bytes = int(max_body_bytes)
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.open_paths = frozenset(open_paths)

    def _auth_problem(self, headers: dict) -> Optional[str]:
        given = headers.get(b"x-api-key")
        if given is None:
            auth = headers.get(b"authorization")
            if auth is not None:
                scheme, _, token = auth.strip().partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        if given is None:
            return ("this server requires an API key: send the header 'Authorization: Bearer <key>' "
                    "(or 'X-API-Key: <key>')")
        if not hmac.compare_digest(given, self.api_key):
            return "wrong API key: send the key the server was started with (--api-key or BITFIT_API_KEY)"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.lower(), v)
        length = headers.get(b"content-length")
        try:
            declared = int(length) if length is not None else None
        except ValueError:
            declared = None
        has_body = b"transfer-encoding" in headers or bool(declared)
        state = {"body_done": not has_body, "started": False, "received": 0}
        limit = self.max_body_bytes

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                if not state["body_done"]:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request" and not state["body_done"]:
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit:
                    raise BodyTooLarge(limit)
                if not message.get("more_body", False):
                    state["body_done"] = True
            return message

        if self.api_key is not None and scope.get("path") not in self.open_paths:
            problem = self._auth_problem(headers)
            if problem is not None:
                resp = _json_error(401, "unauthorized", problem, headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, guarded_send)
        if declared is not None and declared > limit:
            return await _json_error(413, *_body_error(limit, declared))(scope, receive, guarded_send)
        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge as exc:  # raised outside a handler that would have answered it
            if state["started"]:
                raise
            await _json_error(exc.status, exc.type, exc.message)(scope, receive, guarded_send)


def _body_error(limit: int, size: Optional[int]) -> tuple:
    exc = BodyTooLarge(limit, size)
    return exc.type, exc.message


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
        :class:`_ClientGone` is raised.
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
            raise _ClientGone()
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


def is_generative(bank) -> bool:
    """Whether the bank's base is a causal LM (served with /v1/generate)."""
    can = getattr(bank.base, "can_generate", None)
    try:
        return bool(callable(can) and can()) and not getattr(bank, "_head_names", None)
    except Exception:  # noqa: BLE001
        return False


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
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_queue: int = DEFAULT_MAX_QUEUE,
    api_key: Optional[str] = None,
    max_new_tokens: int = 256,
):
    """A FastAPI app serving ``bank`` (a :class:`bitfit.BiasBank`) with ``tokenizer``.

    ``max_body_bytes``: largest request body (413 beyond, also for chunked bodies).
    ``max_queue``: most requests waiting for the worker (503 with Retry-After beyond).
    ``api_key``: when set, every endpoint except ``/health`` needs ``Authorization: Bearer KEY``
    or ``X-API-Key: KEY`` (401 otherwise).
    ``max_new_tokens``: the most tokens a ``/v1/generate`` request may ask for (a bank over a
    causal LM serves ``/v1/generate``; one over a classifier, ``/v1/predict``).
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse
        from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException as StarletteHTTPException
    except ImportError as exc:  # pragma: no cover
        raise BitFitError(f"the HTTP service needs fastapi and uvicorn: pip install 'bitfit[serve]' ({exc})") from None

    for name, v in (("max_batch", max_batch), ("max_inputs", max_inputs), ("max_length", max_length),
                    ("max_queue", max_queue), ("max_body_bytes", max_body_bytes), ("max_new_tokens", max_new_tokens)):
        if not isinstance(v, int) or v < 1:
            raise BitFitError(f"{name} must be a positive integer, got {v!r}")
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise BitFitError("api_key must be a non-empty string (or None for no key)")
    if batch_window_ms < 0:
        raise BitFitError(f"batch_window_ms must be >= 0, got {batch_window_ms!r}")

    Pair = Annotated[list[StrictStr], Field(min_length=2, max_length=2)]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        task: StrictStr
        inputs: Annotated[list[Union[StrictStr, Pair]], Field(min_length=1)]

    token_limit = max_new_tokens  # a class body that assigns a name cannot read the function's variable of that name

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        task: StrictStr
        inputs: Annotated[list[Union[StrictStr, Pair]], Field(min_length=1)]
        max_new_tokens: Annotated[StrictInt, Field(ge=1, le=token_limit)] = min(64, token_limit)
        raw: StrictBool = False

    generative = is_generative(bank)
    kind = GenerateBatcher if generative else Batcher
    batcher = kind(bank, tokenizer, max_batch=max_batch, window_s=batch_window_ms / 1000.0, max_queue=max_queue)

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
                        "max_length": max_length, "max_body_bytes": max_body_bytes, "max_queue": max_queue,
                        "api_key_required": api_key is not None,
                        **({"max_new_tokens": max_new_tokens} if generative else {})}
    app.state.generative = generative
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, api_key=api_key)

    def error(status: int, type_: str, message: str, headers: Optional[dict] = None, **extra) -> JSONResponse:
        return _json_error(status, type_, message, headers=headers, **extra)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.type, exc.message, headers=exc.headers)

    @app.exception_handler(_ClientGone)
    async def _client_gone(request, exc):  # nobody reads this answer
        return error(499, "client_disconnected", "the client disconnected before its result was ready")

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

    async def wait_disconnect(receive) -> None:
        """Returns once the client has gone (the request body was read already)."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    def wrong_endpoint(path: str) -> ApiError:
        if generative:
            return ApiError(400, "wrong_endpoint", f"this server serves causal-LM (generation) tasks: POST "
                            f"/v1/generate, not {path}")
        return ApiError(400, "wrong_endpoint", f"this server serves classification/regression tasks: POST "
                        f"/v1/predict, not {path}")

    def validation_error(exc, expected: str) -> JSONResponse:
        details = [
            {"loc": [str(p) for p in e["loc"]], "msg": e["msg"]}
            for e in exc.errors(include_url=False, include_context=False, include_input=False)
        ]
        msg = "; ".join(f"{'.'.join(d['loc']) or 'body'}: {d['msg']}" for d in details[:5])
        return error(422, "validation_error", f"{msg}. Expected {expected}", details=details)

    def tokenize_prompts(inputs: list, raw: bool) -> list:
        from ..data.instruct import format_prompt

        char_limit = max_length * CHARS_PER_TOKEN_LIMIT
        features = []
        for i, x in enumerate(inputs):
            if sum(len(t) for t in (x if isinstance(x, list) else [x])) > char_limit:
                raise ApiError(413, "input_too_long", f"inputs[{i}] is longer than this server accepts "
                               f"({char_limit} characters); shorten it")
            if raw:
                text = " ".join(x) if isinstance(x, list) else x
            else:
                text = format_prompt(x[0], x[1]) if isinstance(x, list) else format_prompt(x)
            enc = tokenizer(text, truncation=False)
            n = len(enc["input_ids"])
            if n > max_length:
                raise ApiError(413, "input_too_long",
                               f"inputs[{i}] is {n} tokens long as a prompt, more than max_length={max_length}; "
                               "shorten it")
            features.append({"input_ids": list(enc["input_ids"])})
        return features

    @app.post("/v1/generate")
    async def generate(request: Request):
        check_content_type(request.headers.get("content-type"))
        if not generative:
            raise wrong_endpoint("/v1/generate")
        if batcher.full():
            raise batcher.busy_error()
        body = await request.body()
        payload = parse_json(body)
        if not isinstance(payload, dict):
            raise ApiError(400, "invalid_request", 'the body must be a JSON object: {"task": "<name>", '
                           '"inputs": ["instruction", ...], "max_new_tokens": 64}')
        try:
            req = GenerateRequest.model_validate(payload)
        except ValidationError as exc:
            return validation_error(exc, '{"task": str, "inputs": [instruction or [instruction, input], ...], '
                                    f'"max_new_tokens": 1..{max_new_tokens}, "raw": bool}}')
        if req.task not in bank:
            raise ApiError(404, "unknown_task", f"unknown task {req.task!r}; available: {', '.join(bank.tasks)}")
        if len(req.inputs) > max_inputs:
            raise ApiError(413, "too_many_inputs",
                           f"{len(req.inputs)} inputs in one request; at most {max_inputs} are accepted")
        features = await run_in_threadpool(tokenize_prompts, req.inputs, req.raw)
        try:
            rows = await batcher.submit(req.task, features, lambda: wait_disconnect(request.receive),
                                        options={"max_new_tokens": req.max_new_tokens})
        except (ApiError, _ClientGone):
            raise
        except BitFitError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        return {"task": req.task, "generations": rows}

    @app.post("/v1/predict")
    async def predict(request: Request):
        check_content_type(request.headers.get("content-type"))
        if generative:
            raise wrong_endpoint("/v1/predict")
        if batcher.full():  # refuse before reading and tokenizing
            raise batcher.busy_error()
        body = await request.body()  # RequestGuard raises BodyTooLarge past max_body_bytes
        payload = parse_json(body)
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
            rows = await batcher.submit(req.task, features, lambda: wait_disconnect(request.receive))
        except (ApiError, _ClientGone):
            raise
        except BitFitError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None
        info = bank.task_info(req.task) if req.task in bank else None
        if info is None:
            raise ApiError(404, "unknown_task", f"task {req.task!r} was removed")
        for i, r in enumerate(rows):
            if not bool(torch.isfinite(r).all()):
                log.error("task %r produced non-finite logits", req.task)
                raise ApiError(500, "non_finite_output",
                               f"task {req.task!r} produced NaN/inf logits for inputs[{i}]; its artifact or the base "
                               "model is broken: retrain or replace the task")
        return {"task": req.task, "problem_type": info["problem_type"],
                "predictions": [postprocess(r, info) for r in rows]}

    @app.get("/v1/tasks")
    async def tasks():
        return {"tasks": [bank.task_info(n) for n in bank.tasks]}

    @app.get("/health")
    async def health():
        with batcher._stats_lock:
            stats = dict(batcher.stats)
        stats["waiting"] = batcher.waiting
        return {"status": "ok", "tasks": len(bank), "stats": stats, "limits": app.state.limits}

    return app


def check_content_type(value: Optional[str]) -> None:
    """415 unless ``value`` is ``application/json`` (optionally with ``charset=utf-8``)."""
    fix = "send the JSON body with the header 'Content-Type: application/json'"
    if not value:
        raise ApiError(415, "unsupported_media_type", f"the request has no Content-Type; {fix}")
    mime, *params = [part.strip() for part in value.split(";")]
    if mime.lower() != "application/json":
        raise ApiError(415, "unsupported_media_type", f"Content-Type {mime!r} is not accepted; {fix}")
    for param in params:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise ApiError(415, "unsupported_media_type",
                           f"charset {val.strip()!r} is not accepted; encode the body as UTF-8 "
                           "('Content-Type: application/json; charset=utf-8')")


def parse_json(body: bytes):
    """The decoded JSON body; 400 ``invalid_json`` with a one-line reason for anything that does not decode."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_json",
                       f"the request body is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start}); "
                       "send UTF-8 encoded JSON") from None
    try:
        payload = json.loads(text)
    except RecursionError:
        raise ApiError(400, "invalid_json",
                       "the request body is nested too deeply to decode; this API needs at most 3 levels "
                       '({"task": ..., "inputs": [[text_a, text_b], ...]})') from None
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from None
    where = _lone_surrogate(payload)
    if where is not None:
        raise ApiError(400, "invalid_json",
                       f"the request body holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape without its pair) "
                       f"in {where}; send valid Unicode text")
    return payload


def _lone_surrogate(payload) -> Optional[str]:
    """Where a string (or object key) of ``payload`` cannot be encoded as UTF-8, or None."""
    stack = [(payload, "body")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(value, dict):
            for k, v in value.items():
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    return f"a key of {where}"
                stack.append((v, f"{where}.{k}" if where != "body" else k))
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
    return None


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run ``app`` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["create_app", "serve", "postprocess", "Batcher", "GenerateBatcher", "RequestGuard", "check_content_type",
           "parse_json", "is_generative"]
