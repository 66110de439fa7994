"""Fan-out classification: one request, several tasks, the same inputs, one mixed bank call.

``POST /v1/predict`` with ``{"tasks": ["sst2", "cola", ...], "inputs": ["text", ...]}`` runs every input
under every named task. All its rows go to the batcher as one request with a task per row
(:class:`bitfit.serving.decoding.MixedBatcher`), so they run as one mixed batch whatever the batch window,
for about the price of as many single-task rows of the same shape. The answer holds one entry per task, in
the order asked: ``{"results": [{"task": ..., "problem_type": ..., "predictions": [...]}, ...]}``.
"""

import torch

from ..errors import BitFitError
from .guard import ApiError, ClientGone


async def fanout_predict(payload: dict, *, bank, batcher, tokenize, check_input_kind, postprocess, max_inputs: int,
                         wait_disconnect=None) -> dict:
    """Answer a fan-out ``/v1/predict`` body (``tasks`` instead of ``task``).

    ``tokenize(task, inputs)`` and ``check_input_kind(task, inputs)`` are the route's own; ``postprocess(logits,
    info)`` turns one row of logits into a prediction. At most ``max_inputs`` rows (tasks x inputs) per request.
    """
    from starlette.concurrency import run_in_threadpool

    extra = sorted(set(payload) - {"tasks", "inputs"})
    if extra:
        raise ApiError(422, "validation_error", f"unknown field(s) {', '.join(extra)}. Expected "
                       '{"tasks": [str, ...], "inputs": [str or [str, str], ...]}')
    tasks, inputs = payload.get("tasks"), payload.get("inputs")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ApiError(422, "validation_error", 'tasks must be a non-empty list of task names: {"tasks": '
                       '["sst2", "cola"], "inputs": ["text"]}')
    if len(set(tasks)) != len(tasks):
        raise ApiError(422, "validation_error", "tasks names a task twice; name each task once")
    if not isinstance(inputs, list) or not inputs or not all(
            isinstance(x, str) or (isinstance(x, list) and len(x) == 2 and all(isinstance(t, str) for t in x))
            for x in inputs):
        raise ApiError(422, "validation_error", 'inputs must be a non-empty list of texts or [text, text_pair] '
                       'pairs: {"tasks": [...], "inputs": ["text", ["text a", "text b"]]}')
    unknown = [t for t in tasks if t not in bank]
    if unknown:
        raise ApiError(404, "unknown_task", f"unknown task {unknown[0]!r}; available: {', '.join(bank.tasks)}")
    if len(tasks) * len(inputs) > max_inputs:
        raise ApiError(413, "too_many_inputs", f"{len(tasks)} tasks x {len(inputs)} inputs = "
                       f"{len(tasks) * len(inputs)} rows in one request; at most {max_inputs} are accepted")
    for t in tasks:
        check_input_kind(t, inputs)
    features = await run_in_threadpool(tokenize, tasks[0], inputs)
    row_tasks = tuple(t for t in tasks for _ in inputs)
    try:
        rows = await batcher.submit(row_tasks, features * len(tasks), wait_disconnect)
    except (ApiError, ClientGone):
        raise
    except BitFitError as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    results = []
    for k, t in enumerate(tasks):
        if t not in bank:
            raise ApiError(404, "unknown_task", f"task {t!r} was removed")
        info = bank.task_info(t)
        own = rows[k * len(inputs): (k + 1) * len(inputs)]
        for i, r in enumerate(own):
            if not bool(torch.isfinite(r).all()):
                raise ApiError(500, "non_finite_output", f"task {t!r} produced NaN/inf logits for inputs[{i}]; "
                               "its artifact or the base model is broken: retrain or replace the task")
        results.append({"task": t, "problem_type": info["problem_type"],
                        "predictions": [postprocess(r, info) for r in own]})
    return {"tasks": list(tasks), "results": results}


__all__ = ["fanout_predict"]
