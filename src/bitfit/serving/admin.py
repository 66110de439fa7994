"""Tasks loaded, reloaded and removed while the service runs: ``POST /v1/tasks`` and ``DELETE /v1/tasks/{name}``.

Off unless the server is given allow-listed task folders (``bitfit serve --task-dir DIR``) and an admin key
(``--admin-key`` or ``BITFIT_ADMIN_KEY``); every admin request carries ``X-Admin-Key: KEY`` (on a server
with an API key, the API key as well).

``POST /v1/tasks`` ``{"name": "sst2", "path": "runs/sst2"}`` loads a ``bitfit train`` run folder or an
artifact folder; ``path`` is absolute or relative to a task folder, and must resolve (links followed) inside
one of them. A name already served is reloaded from the new folder. The artifact is read and checked in a
worker thread; the bank's lock is taken only to install the task, so a batch that is running finishes on
the tasks it started with and the next batch sees the new version. A task trained on another base is
refused with the fingerprint message (422), one of the other kind (classification vs causal LM) too.
``DELETE /v1/tasks/{name}`` removes a task; its requests still waiting are answered 404.
"""

import hmac
import os
from typing import Optional

from ..errors import BitFitError
from .guard import ApiError, check_content_type, parse_json


def check_task_dirs(dirs) -> list:
    """The allow-listed task folders, resolved; a clear error for one that is not a folder."""
    out = []
    for d in dirs or []:
        real = os.path.realpath(os.path.expanduser(str(d)))
        if not os.path.isdir(real):
            raise BitFitError(f"--task-dir {d}: not a folder; give a folder that holds task run/artifact folders")
        out.append(real)
    return out


def resolve_task_path(path: str, task_dirs: list) -> str:
    """``path`` (absolute, or relative to one of ``task_dirs``) resolved inside one of ``task_dirs``."""
    candidates = [path] if os.path.isabs(path) else [os.path.join(d, path) for d in task_dirs]
    for cand in candidates:
        real = os.path.realpath(cand)
        inside = any(os.path.commonpath([real, d]) == d for d in task_dirs)
        if inside and os.path.isdir(real):
            return real
        if not inside and os.path.isabs(path):
            raise ApiError(403, "path_not_allowed", f"{path} is outside this server's task folders "
                           f"(--task-dir): {', '.join(task_dirs)}")
    raise ApiError(404, "task_folder_not_found", f"no task folder {path!r} inside this server's task folders "
                   f"(--task-dir): {', '.join(task_dirs)}")


def _kind(meta: dict) -> Optional[str]:
    arch = (meta.get("base_model") or {}).get("architecture") or ""
    if arch.endswith("ForCausalLM"):
        return "causal-lm"
    if arch.endswith("ForSequenceClassification"):
        return "classification"
    return None


def enable_task_admin(app, *, task_dirs, admin_key: Optional[str]) -> None:
    """Add ``POST /v1/tasks`` and ``DELETE /v1/tasks/{name}`` to ``app`` (made by
    :func:`bitfit.serving.app.create_app`), loading only from ``task_dirs``, behind ``admin_key``."""
    from fastapi import Request
    from starlette.concurrency import run_in_threadpool

    dirs = check_task_dirs(task_dirs)
    if not dirs:
        raise BitFitError("runtime task management needs at least one --task-dir folder to load tasks from")
    if not isinstance(admin_key, str) or not admin_key.strip():
        raise BitFitError("runtime task management (--task-dir) needs an admin key: --admin-key KEY or the "
                          "BITFIT_ADMIN_KEY environment variable")
    key = admin_key.encode("utf-8")
    bank = app.state.bank
    served = "causal-lm" if app.state.generative else "classification"
    app.state.limits["task_dirs"] = dirs

    def check_admin(request) -> None:
        given = request.headers.get("x-admin-key")
        if given is None:
            raise ApiError(401, "unauthorized", "task management needs the admin key: send the header "
                           "'X-Admin-Key: <key>'")
        if not hmac.compare_digest(given.encode("utf-8"), key):
            raise ApiError(403, "forbidden", "wrong admin key: send the key the server was started with "
                           "(--admin-key or BITFIT_ADMIN_KEY)")

    def load(name: str, path: str) -> dict:
        from ..artifacts import read_artifact
        from .bank import _takes_pairs

        art = read_artifact(path, strict=bank.strict)
        kind = _kind(art.meta)
        if kind != served:
            raise BitFitError(f"{path} holds a {kind or 'task without a known head'} task; this server serves "
                              f"{served} tasks")
        reload = name in bank
        bank.add_task(name, art, replace=True, pairs=_takes_pairs(path))
        return {"task": bank.task_info(name), "reloaded": reload}

    @app.post("/v1/tasks")
    async def add_task(request: Request):
        check_admin(request)
        check_content_type(request.headers.get("content-type"))
        payload = parse_json(await request.body())
        if not isinstance(payload, dict) or set(payload) != {"name", "path"} or not all(
                isinstance(payload[k], str) and payload[k] for k in ("name", "path")):
            raise ApiError(422, "validation_error", 'the body must be {"name": "<task name>", "path": "<run or '
                           'artifact folder inside a --task-dir>"}')
        name = payload["name"]
        request.state.task = name
        path = resolve_task_path(payload["path"], dirs)
        try:
            return await run_in_threadpool(load, name, path)
        except BitFitError as exc:
            raise ApiError(422, "task_refused", str(exc)) from None

    @app.delete("/v1/tasks/{name}")
    async def remove_task(name: str, request: Request):
        check_admin(request)
        if name not in bank:
            raise ApiError(404, "unknown_task", f"unknown task {name!r}; available: {', '.join(bank.tasks)}")
        try:
            await run_in_threadpool(bank.remove_task, name)
        except BitFitError as exc:  # removed meanwhile
            raise ApiError(404, "unknown_task", str(exc)) from None
        return {"removed": name, "tasks": bank.tasks}


__all__ = ["check_task_dirs", "enable_task_admin", "resolve_task_path"]
