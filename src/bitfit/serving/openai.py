"""OpenAI-compatible routes for the bank's service: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Existing OpenAI clients (the ``openai`` Python package, curl scripts, LangChain) talk to ``bitfit serve``
unchanged: ``model`` names a task (or the base model itself, served without any task's biases). Requests of
different tasks still share one mixed ``generate`` call (:class:`bitfit.serving.decoding.DecodingBatcher`),
each row with its own ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and ``stop``. ``stream: true``
answers with server-sent events in OpenAI's chunk format (``data: {...}`` per chunk, then ``data: [DONE]``).

``/v1/completions`` sends ``prompt`` as it is (no template); ``/v1/chat/completions`` renders ``messages``
with the tokenizer's chat template, or, for a tokenizer without one, with the Alpaca template the
instruction tasks were trained on (one user turn, a system message put before it).

Defaults follow OpenAI's: ``temperature`` 1 (sampling; send 0 for greedy decoding), ``top_p`` 1,
``max_tokens`` 16 for completions and the server's ``--max-new-tokens`` for chat. Not supported (422):
``n`` above 1, ``logprobs``, ``echo``, ``best_of`` above 1, token-id prompts.
"""

# No `from __future__ import annotations`: pydantic reads the models' annotations at runtime.
import asyncio
import json
import time
import uuid
from typing import Annotated, Any, Optional, Union

from ..errors import BitFitError
from .decoding import BASE
from .guard import ApiError, ClientGone, check_content_type, parse_json

CHARS_PER_TOKEN_LIMIT = 32  # as /v1/generate: a text this many characters per allowed token is refused unread
MAX_STOP = 4


def base_name(app) -> str:
    """The id the base model answers to as an OpenAI ``model`` (``app.state.base_name``; by default the base's
    ``name_or_path``, else ``"base"``)."""
    name = getattr(app.state, "base_name", None)
    if name:
        return str(name)
    cfg = getattr(app.state.bank.base, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or getattr(cfg, "name_or_path", "") or "base")


def add_openai_routes(app, bank, tokenizer, batcher, *, generative: bool, max_length: int, max_new_tokens: int,
                      max_inputs: int):
    """Register the OpenAI-compatible routes on ``app`` (a FastAPI app over ``bank``)."""
    from fastapi import Request
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

    Stop = Optional[Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP)]]]
    Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
    TopP = Annotated[float, Field(gt=0.0, le=1.0)]
    Tokens = Optional[Annotated[StrictInt, Field(ge=1)]]

    class Common(BaseModel):
        model_config = ConfigDict(extra="allow")  # OpenAI clients send more fields (user, stream_options, ...)
        model: StrictStr
        max_tokens: Tokens = None
        temperature: Optional[Temperature] = None
        top_p: Optional[TopP] = None
        stop: Stop = None
        seed: Optional[StrictInt] = None
        stream: Optional[StrictBool] = False
        stream_options: Optional[dict] = None
        n: Optional[StrictInt] = None
        logprobs: Optional[Any] = None

    class CompletionRequest(Common):
        prompt: Union[StrictStr, Annotated[list[StrictStr], Field(min_length=1)]]
        echo: Optional[StrictBool] = None
        best_of: Optional[StrictInt] = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: StrictStr
        content: Union[StrictStr, list[dict], None] = None

    class ChatRequest(Common):
        messages: Annotated[list[Message], Field(min_length=1)]
        max_completion_tokens: Tokens = None

    def model_task(model: str):
        if model in bank:
            return model
        if model == base_name(app):
            return BASE
        known = ", ".join([base_name(app), *bank.tasks])
        raise ApiError(404, "model_not_found", f"the model {model!r} does not exist; this server serves: {known}")

    def unsupported(req) -> None:
        for what, bad in (("n", req.n not in (None, 1)), ("logprobs", req.logprobs not in (None, False, 0)),
                          ("echo", bool(getattr(req, "echo", None))),
                          ("best_of", getattr(req, "best_of", None) not in (None, 1))):
            if bad:
                raise ApiError(422, "unsupported_parameter", f"{what} is not supported by this server; leave it out")

    def options(req, limit: Optional[int], default_limit: int) -> dict:
        limit = default_limit if limit is None else limit
        if limit > max_new_tokens:
            raise ApiError(422, "validation_error", f"max_tokens is {limit}, more than this server's limit of "
                           f"{max_new_tokens} (--max-new-tokens); ask for fewer")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return {"max_new_tokens": limit, "temperature": 1.0 if req.temperature is None else req.temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p, "seed": req.seed, "stop": stop}

    def encode(text: str, where: str) -> list:
        if len(text) > max_length * CHARS_PER_TOKEN_LIMIT:
            raise ApiError(413, "input_too_long", f"{where} is longer than this server accepts "
                           f"({max_length * CHARS_PER_TOKEN_LIMIT} characters); shorten it")
        ids = list(tokenizer(text, truncation=False)["input_ids"])
        return check_ids(ids, where)

    def check_ids(ids: list, where: str) -> list:
        if not ids:
            raise ApiError(422, "empty_input", f"{where} gives no tokens as a prompt; send some text")
        if len(ids) > max_length:
            raise ApiError(413, "input_too_long", f"{where} is {len(ids)} tokens long, more than max_length="
                           f"{max_length}; shorten it")
        return ids

    def chat_ids(messages: list) -> list:
        turns = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
                if any(not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
                       for p in content):
                    raise ApiError(422, "unsupported_content", f"messages[{i}].content: only text parts "
                                   '({"type": "text", "text": ...}) are supported')
                content = "".join(p["text"] for p in content)
            turns.append({"role": m.role, "content": content or ""})
        if sum(len(t["content"]) for t in turns) > max_length * CHARS_PER_TOKEN_LIMIT:
            raise ApiError(413, "input_too_long", "messages are longer than this server accepts "
                           f"({max_length * CHARS_PER_TOKEN_LIMIT} characters); shorten them")
        if getattr(tokenizer, "chat_template", None):
            try:
                out = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
            except Exception as exc:  # noqa: BLE001 - a template that refuses these messages
                raise ApiError(422, "invalid_messages", f"the model's chat template refused these messages: "
                               f"{exc}") from None
            ids = out["input_ids"] if hasattr(out, "keys") else out
            if ids and isinstance(ids[0], list):
                ids = ids[0]
            return check_ids([int(x) for x in ids], "messages")
        from ..data.instruct import format_prompt

        system = [t["content"] for t in turns if t["role"] in ("system", "developer")]
        users = [t for t in turns if t["role"] not in ("system", "developer")]
        if len(users) != 1 or users[0]["role"] != "user":
            raise ApiError(422, "invalid_messages", "this model has no chat template: send one user message "
                           "(optionally after a system message); its tasks answer one Alpaca-style instruction")
        instruction = "\n\n".join([*system, users[0]["content"]])
        return encode(format_prompt(instruction), "messages")

    async def wait_disconnect(receive) -> None:
        while True:
            if (await receive())["type"] == "http.disconnect":
                return

    def validation_error(exc) -> ApiError:
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                        for e in exc.errors(include_url=False, include_context=False, include_input=False)[:5])
        return ApiError(422, "validation_error", msg)

    async def read(request: Request, kind):
        check_content_type(request.headers.get("content-type"))
        if not generative:
            raise ApiError(400, "wrong_endpoint", "this server serves classification/regression tasks: POST "
                           f"/v1/predict, not {request.url.path}")
        if batcher.full():
            raise batcher.busy_error()
        payload = parse_json(await request.body())
        if not isinstance(payload, dict):
            raise ApiError(400, "invalid_request", "the body must be a JSON object")
        try:
            req = kind.model_validate(payload)
        except ValidationError as exc:
            raise validation_error(exc) from None
        request.state.task = req.model  # for /metrics
        unsupported(req)
        return req, model_task(req.model)

    async def run(request, task, features: list, opts: dict) -> list:
        try:
            return await batcher.submit(task, features, lambda: wait_disconnect(request.receive), options=opts)
        except (ApiError, ClientGone):
            raise
        except BitFitError as exc:
            raise ApiError(400, "bad_request", str(exc)) from None

    def usage(prompt_tokens: int, rows: list) -> dict:
        done = sum(r["tokens"] for r in rows)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        base = base_name(app)
        return {"object": "list", "data": [
            {"id": base, "object": "model", "created": now, "owned_by": "bitfit", "root": base, "parent": None},
            *({"id": t, "object": "model", "created": now, "owned_by": "bitfit", "root": base, "parent": base}
              for t in bank.tasks)]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req, task = await read(request, CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) > max_inputs:
            raise ApiError(413, "too_many_inputs", f"{len(prompts)} prompts in one request; at most {max_inputs} "
                           "are accepted")
        opts = options(req, req.max_tokens, 16)
        features = [{"input_ids": encode(p, f"prompt[{i}]" if len(prompts) > 1 else "prompt")}
                    for i, p in enumerate(prompts)]
        n_prompt = sum(len(f["input_ids"]) for f in features)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model}
        if req.stream:
            def chunk(j, delta, finish):
                return {**head, "choices": [{"index": j, "text": delta, "logprobs": None, "finish_reason": finish}]}
            return stream(task, features, opts, None, chunk, req, n_prompt, head)
        rows = await run(request, task, features, opts)
        return {**head, "choices": [{"index": j, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                                    for j, r in enumerate(rows)], "usage": usage(n_prompt, rows)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req, task = await read(request, ChatRequest)
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        opts = options(req, limit, max_new_tokens)
        ids = chat_ids(req.messages)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": req.model}
        if req.stream:
            chead = {**head, "object": "chat.completion.chunk"}

            def chunk(j, delta, finish):
                d = {} if finish is not None and not delta else {"content": delta}
                return {**chead, "choices": [{"index": j, "delta": d, "logprobs": None, "finish_reason": finish}]}

            first = {**chead, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                           "logprobs": None, "finish_reason": None}]}
            return stream(task, [{"input_ids": ids}], opts, first, chunk, req, len(ids), chead)
        rows = await run(request, task, [{"input_ids": ids}], opts)
        r = rows[0]
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": r["text"]},
                                     "logprobs": None, "finish_reason": r["finish_reason"]}],
                "usage": usage(len(ids), rows)}

    def stream(task, features: list, opts: dict, first: Optional[dict], chunk, req, n_prompt: int, head: dict):
        """A server-sent-event answer: ``first`` (if any), then one chunk per piece of decoded text of any row
        (finish chunks carry ``finish_reason``), a usage chunk when ``stream_options.include_usage``, and
        ``data: [DONE]``. A client that leaves stops its rows at the next decoding step."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        states: list = []
        opts = {**opts, "rows": states,
                "emit": lambda j, delta, finish: loop.call_soon_threadsafe(queue.put_nowait, (j, delta, finish))}
        job = asyncio.ensure_future(batcher.submit(task, features, None, options=opts))
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            left = len(features)
            try:
                if first is not None:
                    yield sse(first)
                while left:
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        if queue.empty():  # the job ended: every row was handed out, or it failed
                            break
                        continue
                    j, delta, finish = getter.result()
                    yield sse(chunk(j, delta, finish))
                    left -= finish is not None
                if left:
                    exc = job.exception() if job.done() and not job.cancelled() else None
                    err = exc if isinstance(exc, ApiError) else ApiError(500, "internal_error", str(exc or "stopped"))
                    yield sse({"error": {"type": err.type, "message": err.message, "code": err.status}})
                    return
                if include_usage:
                    rows = [s.result() for s in states]
                    yield sse({**head, "choices": [], "usage": usage(n_prompt, rows)})
                yield "data: [DONE]\n\n"
            finally:
                for s in states:
                    s.cancelled = True  # the client left before the end: its rows stop decoding
                if not job.done():
                    job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


__all__ = ["add_openai_routes", "base_name"]
