"""HTTP service over a :class:`bitfit.BiasBank`: many BitFit tasks, one frozen base.

This module owns the routes and their request models: ``create_app(bank, tokenizer)`` builds a
FastAPI app; :func:`serve` (``bitfit serve``) runs it with uvicorn. The batching queue the routes
submit to is :mod:`bitfit.serving.batching`; the guard, errors and body decoding are
:mod:`bitfit.serving.guard`.

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
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Optional, Union

import torch

from ..errors import BitFitError
from .batching import DEFAULT_MAX_QUEUE, Batcher, GenerateBatcher
from .guard import (DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_BYTES, ApiError, ClientGone, RequestGuard, check_content_type, json_error,
                    parse_json)

log = logging.getLogger(__name__)

# A text this many times longer (in characters) than max_length tokens is refused before
# tokenizing it (tokenizers need at least about one character per token).
CHARS_PER_TOKEN_LIMIT = 32
# The longest batch window accepted (ms): a request waits up to this long for others to share its batch.
MAX_BATCH_WINDOW_MS = 1000.0


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
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
):
    """A FastAPI app serving ``bank`` (a :class:`bitfit.BiasBank`) with ``tokenizer``.

    ``max_body_bytes``: largest request body (413 beyond, also for chunked bodies).
    ``max_queue``: most requests waiting for the worker (503 with Retry-After beyond).
    ``api_key``: when set, every endpoint except ``/health`` needs ``Authorization: Bearer KEY``
    or ``X-API-Key: KEY`` (401 otherwise).
    ``max_new_tokens``: the most tokens a ``/v1/generate`` request may ask for (a bank over a
    causal LM serves ``/v1/generate``; one over a classifier, ``/v1/predict``).
    ``body_timeout``: seconds from a request's headers to the end of its body (408 beyond).
    ``batch_window_ms``: 0 to ``MAX_BATCH_WINDOW_MS``.
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
    check_batch_window(batch_window_ms)
    from .connections import check_timeout

    body_timeout = check_timeout("body_timeout", body_timeout)

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
    from .decoding import DecodingBatcher, MixedBatcher

    # per-row sampling, stop strings and streaming (generation); a task per row (classification fan-out)
    kind = DecodingBatcher if generative else MixedBatcher
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
    app.state.limits["body_timeout_s"] = body_timeout
    app.add_middleware(RequestGuard, max_body_bytes=max_body_bytes, api_key=api_key, body_timeout=body_timeout)

    def error(status: int, type_: str, message: str, headers: Optional[dict] = None, **extra) -> JSONResponse:
        return json_error(status, type_, message, headers=headers, **extra)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.type, exc.message, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request, exc):  # nobody reads this answer
        return error(499, "client_disconnected", "the client disconnected before its result was ready")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # pragma: no cover - defensive
        log.exception("internal error")
        return error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    def check_input_kind(task: str, inputs: list) -> None:
        """422 for a single text sent to a task trained on text pairs (or a pair to a single-text task)."""
        kind = bank.task_info(task).get("inputs", "any") if task in bank else "any"
        for i, x in enumerate(inputs):
            if kind == "pairs" and not isinstance(x, list):
                raise ApiError(422, "wrong_input_kind",
                               f"task {task!r} was trained on text pairs (text, text_pair): send inputs[{i}] as "
                               '["text", "text_pair"], not one string')
            if kind == "texts" and isinstance(x, list):
                raise ApiError(422, "wrong_input_kind",
                               f"task {task!r} was trained on single texts: send inputs[{i}] as one string, not a "
                               "pair")

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
            if n == 0:  # nothing to continue from: generate cannot start on an empty row
                raise ApiError(422, "empty_input", f"inputs[{i}] gives no tokens as a prompt" + (
                    " (raw: true sends the text as it is, and it is empty)" if raw else "") + "; send some text")
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
        request.state.task = req.task  # for /metrics
        if req.task not in bank:
            raise ApiError(404, "unknown_task", f"unknown task {req.task!r}; available: {', '.join(bank.tasks)}")
        if len(req.inputs) > max_inputs:
            raise ApiError(413, "too_many_inputs",
                           f"{len(req.inputs)} inputs in one request; at most {max_inputs} are accepted")
        features = await run_in_threadpool(tokenize_prompts, req.inputs, req.raw)
        try:
            rows = await batcher.submit(req.task, features, lambda: wait_disconnect(request.receive),
                                        options={"max_new_tokens": req.max_new_tokens})
        except (ApiError, ClientGone):
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
        if "tasks" in payload and "task" not in payload:  # fan-out: several tasks on the same inputs, one batch
            from .fanout import fanout_predict

            return await fanout_predict(payload, bank=bank, batcher=batcher, tokenize=tokenize,
                                        check_input_kind=check_input_kind, postprocess=postprocess,
                                        max_inputs=max_inputs, wait_disconnect=lambda: wait_disconnect(request.receive))
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
        request.state.task = req.task  # for /metrics
        if req.task not in bank:
            raise ApiError(404, "unknown_task", f"unknown task {req.task!r}; available: {', '.join(bank.tasks)}")
        if len(req.inputs) > max_inputs:
            raise ApiError(413, "too_many_inputs",
                           f"{len(req.inputs)} inputs in one request; at most {max_inputs} are accepted")
        check_input_kind(req.task, req.inputs)
        features = await run_in_threadpool(tokenize, req.task, req.inputs)
        try:
            rows = await batcher.submit(req.task, features, lambda: wait_disconnect(request.receive))
        except (ApiError, ClientGone):
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

    from .metrics import add_metrics
    from .openai import add_openai_routes, base_name

    add_openai_routes(app, bank, tokenizer, batcher, generative=generative, max_length=max_length,
                      max_new_tokens=max_new_tokens, max_inputs=max_inputs)
    add_metrics(app, bank, batcher, lambda: base_name(app))
    return app


def check_batch_window(value, name: str = "batch_window_ms") -> float:
    """``batch_window_ms`` within 0..``MAX_BATCH_WINDOW_MS`` (a longer window would hold every request that long)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 <= v <= MAX_BATCH_WINDOW_MS:  # also NaN
        raise BitFitError(f"{name} must be between 0 and {MAX_BATCH_WINDOW_MS:g} ms, got {value!r}; a "
                          "request waits up to this long for others to share its batch (default 5)")
    return v


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", *,
          header_timeout: Optional[float] = None, keep_alive: Optional[float] = None,
          max_connections: Optional[int] = None) -> None:
    """Run ``app`` with uvicorn until interrupted, with a header deadline and a connection cap
    (:mod:`bitfit.serving.connections`; None: the defaults, the cap from the open-file limit)."""
    import uvicorn

    from .connections import (DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEP_ALIVE, accept_backlog, check_max_connections,
                              check_timeout, guarded_protocol)

    header_timeout = check_timeout("header_timeout", DEFAULT_HEADER_TIMEOUT if header_timeout is None
                                   else header_timeout)
    keep_alive = check_timeout("keep_alive", DEFAULT_KEEP_ALIVE if keep_alive is None else keep_alive)
    max_connections = check_max_connections(max_connections)
    protocol = guarded_protocol(header_timeout=header_timeout, max_connections=max_connections)
    limits = getattr(getattr(app, "state", None), "limits", None)
    if isinstance(limits, dict):
        limits.update({"header_timeout_s": header_timeout, "keep_alive_s": keep_alive,
                       "max_connections": max_connections})
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=protocol, timeout_keep_alive=keep_alive,
                backlog=accept_backlog())



__all__ = ["MAX_BATCH_WINDOW_MS", "check_batch_window", "create_app", "serve", "postprocess", "is_generative", "CHARS_PER_TOKEN_LIMIT"]
