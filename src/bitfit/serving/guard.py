"""HTTP request hygiene for the bank's service: API errors, the ASGI guard, and body decoding.

This module owns what every request passes before a route handles it, and the errors a route
answers with:

* :class:`ApiError` (answered as ``{"error": {"type": ..., "message": ...}}`` with its status),
  :class:`BodyTooLarge` and :class:`ClientGone` (the client left; nothing is sent back);
* :class:`RequestGuard`, a pure-ASGI middleware in front of the app: it checks the optional API
  key, stops reading a body once it passes ``max_body_bytes`` (Content-Length or chunked), and
  answers 408 for a body that does not arrive within ``body_timeout`` seconds;
* :func:`check_content_type` (``application/json``, UTF-8 only) and :func:`parse_json` (400
  ``invalid_json`` for any body that does not decode, lone surrogates included).

Limits and failure modes are described in docs/SERVING.md.
"""

import asyncio
import hmac
import json
import time
from typing import Optional


DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 30.0  # seconds from a request's headers to the end of its body
# Paths that answer without the API key (liveness probes).
OPEN_PATHS = frozenset({"/health"})


class ApiError(Exception):
    """A request the service refuses: answered with ``status`` and a JSON error of ``type_`` and ``message``."""

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


class BodyTimeout(ApiError):
    def __init__(self, limit: float):
        super().__init__(408, "request_timeout",
                         f"the request body did not arrive within {limit:g} s of its headers (this server's "
                         "--body-timeout); send the whole body at once")


class ClientGone(Exception):
    """The client disconnected before its result was ready; nothing is sent back."""


def json_error(status: int, type_: str, message: str, headers: Optional[dict] = None, **extra):
    """The service's JSON error answer: ``{"error": {"type": ..., "message": ..., **extra}}`` with ``status``."""
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
    * The body must arrive within ``body_timeout`` seconds of the headers; a client that stops
      (or trickles) sending it is answered 408 and its connection closed.
    * A response that starts before the request body was read to its end (413, 401, 415, 503, 408)
      carries ``Connection: close``, so the server closes the connection instead of reading
      and discarding the rest of the body.
    """

    def __init__(self, app, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, api_key: Optional[str] = None,
                 open_paths=OPEN_PATHS, body_timeout: float = DEFAULT_BODY_TIMEOUT):
        self.app = app
        self.body_timeout = float(body_timeout)
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
        deadline = time.monotonic() + self.body_timeout

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                if not state["body_done"]:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        async def limited_receive():
            if state["body_done"]:
                return await receive()  # after the body: waiting for a disconnect has no deadline
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
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
                resp = json_error(401, "unauthorized", problem, headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, guarded_send)
        if declared is not None and declared > limit:
            return await json_error(413, *_body_error(limit, declared))(scope, receive, guarded_send)
        try:
            await self.app(scope, limited_receive, guarded_send)
        except (BodyTooLarge, BodyTimeout) as exc:  # raised outside a handler that would have answered it
            if state["started"]:
                raise
            await json_error(exc.status, exc.type, exc.message)(scope, receive, guarded_send)


def _body_error(limit: int, size: Optional[int]) -> tuple:
    exc = BodyTooLarge(limit, size)
    return exc.type, exc.message



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



__all__ = ["ApiError", "BodyTimeout", "BodyTooLarge", "ClientGone", "RequestGuard", "check_content_type", "json_error",
           "parse_json", "DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_BODY_BYTES", "OPEN_PATHS"]
