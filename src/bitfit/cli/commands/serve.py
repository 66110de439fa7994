"""`bitfit serve`: an HTTP JSON service for many BitFit tasks over one frozen base."""

from __future__ import annotations

import argparse
import os

from .. import add_verbose, command
from ...errors import BitFitError


def _task_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=ARTIFACT_FOLDER, got {value!r}")
    return name, path


def _run_record(path: str) -> dict:
    """The task.json record of a ``bitfit train`` run folder ({} without a readable one)."""
    import json
    from pathlib import Path

    record = Path(os.path.expanduser(path)) / "task.json"
    try:
        meta = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
    except (OSError, ValueError):
        meta = {}
    return meta if isinstance(meta, dict) else {}


def _recorded_base(tasks: list, gguf_file):
    """(model, gguf_file) that every task's run folder records in task.json (``bitfit train`` writes it)."""
    import json
    from pathlib import Path

    bases = {}
    for name, path in tasks:
        record = Path(os.path.expanduser(path)) / "task.json"
        try:
            meta = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}
        except (OSError, ValueError):
            meta = {}
        base = meta.get("base_model") if isinstance(meta, dict) else None
        if not base:
            raise BitFitError(f"--model is required: task {name!r} ({path}) does not record its base model (no "
                              "task.json of a `bitfit train` run)")
        bases[name] = (base, gguf_file or meta.get("gguf_file"))
    if len(set(bases.values())) > 1:
        listed = "; ".join(f"{n}: {b}" + (f" ({g})" if g else "") for n, (b, g) in bases.items())
        raise BitFitError(f"the tasks record different base models ({listed}); one server serves one base: pass "
                          "--model, or start one bitfit serve per base")
    return next(iter(bases.values()))


@command("serve", "serve BitFit tasks over one base model as an HTTP JSON API (batched across tasks)")
def main(argv: list) -> int:
    p = argparse.ArgumentParser(
        prog="bitfit serve",
        description="Serve BitFit task artifacts over one frozen base model: POST /v1/predict (classification / "
        "regression tasks) or POST /v1/generate (instruction-tuned causal-LM tasks), GET /v1/tasks, GET /health. "
        "Requests for different tasks arriving together run as one batch.",
    )
    p.add_argument("--model", default=None, help="the base model the tasks were trained on: local folder, Hub "
                   "name, 'minilm', or a .gguf file (loaded dequantized, as bitfit train loads it); its tokenizer is "
                   "loaded from the same place (default: the base the tasks' run folders record)")
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="a GGUF file inside the --model folder (the same as --model FOLDER/NAME)")
    p.add_argument("--task", action="append", type=_task_arg, required=True, metavar="NAME=PATH",
                   help="a task name and its artifact folder (saved with bitfit.save); repeat for more tasks")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=64, help="most rows in one bank call (default 64)")
    p.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long to collect requests into one batch, 0 to 1000 (default 5 ms)")
    p.add_argument("--max-inputs", type=int, default=64, help="most inputs in one request (default 64)")
    p.add_argument("--max-length", type=int, default=512,
                   help="longest input in tokens; longer ones are refused with 413 (default 512, capped by the model)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="most new tokens a /v1/generate request may ask for (default 256; causal-LM tasks)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="most requests waiting for the model; more are answered 503 with Retry-After (default 64)")
    p.add_argument("--api-key", default=None,
                   help="require this key on every endpoint but /health ('Authorization: Bearer KEY' or "
                   "'X-API-Key: KEY'); default: the BITFIT_API_KEY environment variable, else no key. Prefer the "
                   "environment variable: a command-line argument is visible to other users in ps")
    p.add_argument("--task-dir", action="append", default=None, metavar="DIR",
                   help="allow loading, reloading and removing tasks at run time (POST /v1/tasks, DELETE "
                   "/v1/tasks/NAME) from run or artifact folders inside DIR (repeat for more); needs an admin key")
    p.add_argument("--admin-key", default=None,
                   help="the key task management requests send as 'X-Admin-Key: KEY' (default: the "
                   "BITFIT_ADMIN_KEY environment variable)")
    p.add_argument("--header-timeout", type=float, default=None, metavar="S",
                   help="seconds a connection has to send its request headers, counted from when it opens (or from "
                   "its previous answer plus --keep-alive); slower ones are closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=None, metavar="S",
                   help="seconds from a request's headers to the end of its body; slower ones are answered 408 "
                   "(default 30)")
    p.add_argument("--keep-alive", type=float, default=None, metavar="S",
                   help="seconds an idle keep-alive connection stays open (default 5)")
    p.add_argument("--max-connections", type=int, default=None, metavar="N",
                   help="most open connections; a new one past it closes the oldest one without a request in "
                   "progress (default: what the open-file limit allows, keeping 64 descriptors free)")
    p.add_argument("--strategy", default="auto", choices=["auto", "group", "gather"],
                   help="how the bank mixes tasks in a batch (default: auto, chosen per batch)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_verbose(p)
    args = p.parse_args(argv)

    names = [n for n, _ in args.task]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BitFitError(f"task name(s) given twice: {', '.join(dup)}; give each --task a distinct NAME")
    from ...serving.batching import DEFAULT_MAX_QUEUE

    if args.max_queue is None:
        args.max_queue = DEFAULT_MAX_QUEUE
    for opt in ("max_batch", "max_inputs", "max_length", "max_queue", "max_new_tokens"):
        if getattr(args, opt) < 1:
            raise BitFitError(f"--{opt.replace('_', '-')} must be at least 1")
    api_key = args.api_key if args.api_key is not None else os.environ.get("BITFIT_API_KEY")
    if api_key is not None and not api_key.strip():
        source = "--api-key" if args.api_key is not None else "BITFIT_API_KEY"
        raise BitFitError(f"{source} is empty; give a non-empty key, or unset it to serve without a key")
    if not 0 < args.port < 65536:
        raise BitFitError(f"--port must be between 1 and 65535, got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise BitFitError(f"--threads must be at least 1, got {args.threads}")
    from ...serving.app import check_batch_window
    from ...serving.connections import check_max_connections, check_timeout
    from ...serving.guard import DEFAULT_BODY_TIMEOUT

    # absurd limits are refused before the model loads
    check_batch_window(args.batch_window_ms, "--batch-window-ms")
    for opt in ("header_timeout", "body_timeout", "keep_alive"):
        if getattr(args, opt) is not None:
            check_timeout(f"--{opt.replace('_', '-')}", getattr(args, opt))
    check_max_connections(args.max_connections)
    admin_key = args.admin_key if args.admin_key is not None else os.environ.get("BITFIT_ADMIN_KEY")
    if args.task_dir:
        from ...serving.admin import check_task_dirs

        check_task_dirs(args.task_dir)
        if not admin_key or not admin_key.strip():
            raise BitFitError("--task-dir needs an admin key for the task management requests: --admin-key KEY or "
                              "the BITFIT_ADMIN_KEY environment variable")

    import torch

    from ...artifacts import read_artifact
    from ...serving.bank import BiasBank
    from ...core.models import load_model, load_tokenizer
    from ...serving.app import create_app, serve

    if args.threads:
        torch.set_num_threads(args.threads)
    artifacts, kinds = {}, {}
    for name, path in args.task:
        art = read_artifact(path)  # clean error for a missing or damaged folder, before loading the model
        arch = art.meta.get("base_model", {}).get("architecture") or ""
        if arch.endswith("ForSequenceClassification"):
            kinds[name] = "classification"
        elif arch.endswith("ForCausalLM"):
            kinds[name] = "causal-lm"
        else:
            raise BitFitError(
                f"task {name!r} ({path}) was saved from a {arch or 'model without a task head'}; bitfit serve "
                "serves sequence-classification tasks (AutoModelForSequenceClassification) and instruction-tuned "
                "causal-LM tasks (AutoModelForCausalLM)"
            )
        artifacts[name] = art
    if len(set(kinds.values())) > 1:
        lm = sorted(n for n, k in kinds.items() if k == "causal-lm")
        raise BitFitError(
            f"tasks {', '.join(lm)} are causal-LM tasks and the others classification tasks; one server serves one "
            "kind over one base model: start one bitfit serve per kind"
        )
    kind = next(iter(kinds.values()))
    if args.model is None:
        args.model, args.gguf_file = _recorded_base(args.task, args.gguf_file)
    import transformers

    gguf = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    tokenizer = load_tokenizer(args.model, **gguf)
    if kind == "causal-lm" and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the base's own head is never used: no "newly initialized" noise
    try:
        base = load_model(args.model, task=kind, **gguf).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    from ...data.glue import takes_pairs

    bank = BiasBank(base, strategy=args.strategy)
    for name, path in args.task:  # a task's run folder (task.json) says whether it takes text pairs
        bank.add_task(name, artifacts[name], pairs=takes_pairs(_run_record(path)))
    limit = getattr(base.config, "max_position_embeddings", None)
    max_length = args.max_length
    if isinstance(limit, int) and limit > 0 and max_length > limit:
        print(f"bitfit serve: --max-length {max_length} is more than the model's {limit} positions; using {limit}")
        max_length = limit
    app = create_app(bank, tokenizer, max_batch=args.max_batch, batch_window_ms=args.batch_window_ms,
                     max_inputs=args.max_inputs, max_length=max_length, max_queue=args.max_queue, api_key=api_key,
                     max_new_tokens=args.max_new_tokens,
                     body_timeout=DEFAULT_BODY_TIMEOUT if args.body_timeout is None else args.body_timeout)
    app.state.base_name = args.model  # the OpenAI-style model id of the base itself
    if args.task_dir:
        from ...serving.admin import enable_task_admin

        enable_task_admin(app, task_dirs=args.task_dir, admin_key=admin_key)
    endpoint = "/v1/generate" if kind == "causal-lm" else "/v1/predict"
    print(f"bitfit serve: {len(bank)} task(s) ({', '.join(bank.tasks)}) over {args.model}, {endpoint} on "
          f"http://{args.host}:{args.port}" + (" (API key required)" if api_key else ""), flush=True)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"bitfit serve: warning: listening on {args.host} without an API key; anyone who can reach this "
              "port can use it (set BITFIT_API_KEY)", flush=True)
    serve(app, host=args.host, port=args.port, log_level=args.log_level, header_timeout=args.header_timeout,
          keep_alive=args.keep_alive, max_connections=args.max_connections)
    return 0
