"""``serve_load.py --mode admin``: a real `bitfit serve` over a generative base, tasks managed over HTTP.

Builds a tiny LLaMA-style base (word-level tokenizer with a chat template, random weights) and
``--tasks`` + ``--churn-tasks`` random BitFit tasks over it in a temporary folder, starts
``bitfit serve --task-dir TMP --admin-key KEY`` on 127.0.0.1 in a subprocess with the first
``--tasks`` tasks, and for ``--seconds``:

* ``--clients`` client threads send, in turn, ``/v1/generate`` (1-2 prompts, greedy, 8 new tokens)
  and streamed ``/v1/chat/completions`` (``stream: true``, greedy, 8 tokens) for random tasks, the
  churning ones included; every answer must equal the server's own answer for that (task, prompt)
  asked alone before the load (a 404 for a churning task that is out at that moment is expected);
* one admin thread, every ``--churn-every`` seconds, over HTTP, in turn: removes a churning task
  (``DELETE /v1/tasks/{name}``), loads it back (``POST /v1/tasks``) and reloads it under the same name
  from a copy of its folder (same biases: the answers must not change).

It prints sent / answered / lost / wrong per kind, p50 / p99 latency of the answered requests, the
admin requests and their outcome, and the server's RSS (``VmRSS`` of ``/proc/PID/status``) at start,
after the warm-up and at the end. Exit 1 when anything was lost or wrong, an admin request failed, or
RSS grew by 10% or more after the warm-up. Every loop is bounded by ``--seconds``; only 127.0.0.1.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HOST = "127.0.0.1"
ADMIN_KEY = "load-test-admin-key"
NEW = 8
PROMPTS = [
    "write a poem about the sea", "summarize the plot of the film", "translate hello into french",
    "list three colors", "what is the capital of france", "explain why the sky is blue",
    "give me a recipe for bread", "name a famous painter", "count to five", "describe a cat",
]
TEMPLATE = ("{{ bos_token }}Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.\n\n### Instruction:\n{{ messages[-1]['content'] }}\n\n"
            "### Response:\n")


def vm_rss(pid: int) -> int:
    """The process's resident set in bytes, from ``/proc/PID/status`` (``VmRSS: N kB``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def make_tokenizer():
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = set()
    for text in PROMPTS + [TEMPLATE, "Below is an instruction that describes a task , paired with an input that "
                           "provides further context . ### Input : the a of and to is it"]:
        words.update(re.findall(r"\w+|[^\w\s]+", text))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.pad_token = out.eos_token
    out.chat_template = TEMPLATE
    return out


def build(folder: Path, n_tasks: int, hidden: int) -> tuple[Path, dict]:
    """A tiny LLaMA base folder and ``n_tasks`` random task artifacts (with a copy each, for reloads)."""
    import torch
    import transformers as T

    import bitfit

    tok = make_tokenizer()
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                        initializer_range=0.5)  # large weights: the answer depends on the prompt
    torch.manual_seed(0)
    base = T.LlamaForCausalLM(cfg).eval()
    base_dir = folder / "base"
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    tasks_dir = folder / "tasks"
    paths = {}
    for k in range(n_tasks):
        m = bitfit.apply(copy.deepcopy(base), add_missing=True)
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        name = f"task{k}"
        paths[name] = Path(bitfit.save(m, tasks_dir / name))
        shutil.copytree(paths[name], tasks_dir / f"{name}-copy")
    return base_dir, paths


class StreamError(Exception):
    """An ``{"error": ...}`` event in a stream."""


def read_stream(r) -> str:
    """The text of a streamed chat completion (SSE chunks up to ``data: [DONE]``)."""
    text, done = [], False
    for line in r.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            done = True
            break
        obj = json.loads(data)
        if "error" in obj:  # the stream had started (200) when the request failed, e.g. its task was removed
            raise StreamError(obj)
        for ch in obj.get("choices", []):
            text.append((ch.get("delta") or {}).get("content") or "")
    if not done:
        raise RuntimeError("stream ended without data: [DONE]")
    return "".join(text)


def ask(c: httpx.Client, kind: str, task: str, prompts: list):
    """(status, answer): ``answer`` is a list of texts for generate, one text for chat."""
    if kind == "generate":
        r = c.post("/v1/generate", json={"task": task, "inputs": prompts, "max_new_tokens": NEW})
        if r.status_code != 200:
            return r.status_code, r.text[:200]
        return 200, [g["text"] for g in r.json()["generations"]]
    body = {"model": task, "messages": [{"role": "user", "content": prompts[0]}], "max_tokens": NEW,
            "temperature": 0, "stream": True}
    with c.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.text[:200]
        try:
            return 200, read_stream(r)
        except StreamError as exc:
            err = exc.args[0]["error"]
            return err.get("code") or 500, "stream error event: " + json.dumps(exc.args[0])


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: dict = {}
        self.latency: list = []
        self.errors: list = []

    def add(self, key, latency=None, error=None):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
            if latency is not None:
                self.latency.append(latency)
            if error is not None and len(self.errors) < 10:
                self.errors.append(error)


def client(url, tasks, churning, refs, deadline, tally, seed):
    rng = random.Random(seed)
    k = 0
    with httpx.Client(base_url=url, timeout=60) as c:
        while time.monotonic() < deadline:
            kind = "generate" if k % 2 == 0 else "chat"
            k += 1
            task = rng.choice(tasks + churning)
            prompts = [rng.choice(PROMPTS) for _ in range(rng.randint(1, 2) if kind == "generate" else 1)]
            tally.add(f"{kind} sent")
            t0 = time.perf_counter()
            try:
                status, ans = ask(c, kind, task, prompts)
            except (httpx.HTTPError, RuntimeError) as exc:
                tally.add(f"{kind} lost", error=f"{kind} {task}: {exc!r}")
                continue
            dt = time.perf_counter() - t0
            if status == 404 and task in churning and ("unknown_task" in ans or "model_not_found" in ans):
                tally.add(f"{kind} 404 while out")
                if ans.startswith("stream error event"):
                    tally.add(f"{kind} 404 as a stream error event")
                continue
            want = [refs[("generate", task, p)] for p in prompts] if kind == "generate" else refs[("chat", task,
                                                                                                   prompts[0])]
            if status == 200 and ans == want:
                tally.add(f"{kind} answered", latency=dt)
            else:
                tally.add(f"{kind} wrong", error=f"{kind} {task} {prompts}: {status} {ans!r} (want {want!r})")


def admin(url, churning, deadline, every, tally, log):
    """Every ``every`` s: remove a churning task, load it back, reload it from its copy; one task out at a time."""
    headers = {"X-Admin-Key": ADMIN_KEY}
    k = 0
    with httpx.Client(base_url=url, timeout=60, headers=headers) as c:
        while time.monotonic() + every < deadline:
            time.sleep(every)
            name = churning[(k // 3) % len(churning)]
            step = k % 3
            k += 1
            try:
                if step == 0:
                    r = c.delete(f"/v1/tasks/{name}")
                    what = "remove"
                else:
                    r = c.post("/v1/tasks", json={"name": name, "path": name if step == 1 else f"{name}-copy"})
                    what = "load" if step == 1 else "reload"
            except httpx.HTTPError as exc:
                tally.add("admin lost", error=f"admin {name}: {exc!r}")
                continue
            ok = r.status_code == 200 and (what == "remove" or r.json().get("reloaded") == (what == "reload"))
            tally.add(f"admin {what} ok" if ok else "admin failed",
                      error=None if ok else f"{what} {name}: {r.status_code} {r.text[:200]}")
            log.append((round(time.monotonic(), 1), what, name, r.status_code))


def run(args, warmup: float) -> int:
    import tempfile

    from serve_load import pct, free_port

    n_all = args.tasks + args.churn_tasks
    with tempfile.TemporaryDirectory(prefix="bitfit-serve-admin-") as tmp:
        t_build = time.perf_counter()
        base_dir, paths = build(Path(tmp), n_all, args.hidden)
        names = list(paths)
        tasks, churning = names[:args.tasks], names[args.tasks:]
        print(f"built a tiny LLaMA base (hidden {args.hidden}) and {n_all} tasks in "
              f"{time.perf_counter() - t_build:.1f} s", flush=True)
        port = free_port()
        url = f"http://{HOST}:{port}"
        cmd = [sys.executable, "-c", "import sys; from bitfit.cli import main; sys.exit(main())", "serve",
               "--model", str(base_dir), "--host", HOST, "--port", str(port), "--threads", str(args.threads),
               "--max-queue", str(args.max_queue), "--log-level", "warning", "--max-new-tokens", "32",
               "--task-dir", str(Path(tmp) / "tasks"), "--admin-key", ADMIN_KEY]
        for name in names:  # all at start, for the reference answers; the churning ones then go out and in
            cmd += ["--task", f"{name}={paths[name]}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        env.pop("BITFIT_API_KEY", None)
        env.pop("BITFIT_ADMIN_KEY", None)
        log = open(Path(tmp) / "server.log", "w+")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.monotonic()
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"bitfit serve exited:\n{log.read()}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() - t0 > 120:
                    raise SystemExit("bitfit serve did not come up in 120 s")
                time.sleep(0.2)
            rss_start = vm_rss(proc.pid)
            refs = {}
            with httpx.Client(base_url=url, timeout=60) as c:
                for task in names:
                    for p in PROMPTS:
                        for kind in ("generate", "chat"):
                            status, ans = ask(c, kind, task, [p])
                            if status != 200:
                                raise SystemExit(f"reference {kind} {task} {p!r}: {status} {ans}")
                            refs[(kind, task, p)] = ans[0] if kind == "generate" else ans
            distinct = len({json.dumps(v) for v in refs.values()})
            print(f"{len(refs)} reference answers, {distinct} distinct", flush=True)
            tally, admin_tally, admin_log = Tally(), Tally(), []
            start = time.monotonic()
            deadline = start + args.seconds
            rss_samples, marks = [], {}

            def monitor():
                while time.monotonic() < deadline:
                    rss = vm_rss(proc.pid)
                    rss_samples.append(rss)
                    if "warm" not in marks and time.monotonic() - start >= warmup:
                        marks["warm"] = rss
                    time.sleep(0.5)

            threads = [threading.Thread(target=monitor),
                       threading.Thread(target=admin, args=(url, churning, deadline, args.churn_every, admin_tally,
                                                            admin_log))]
            threads += [threading.Thread(target=client, args=(url, tasks, churning, refs, deadline, tally, i))
                        for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=args.seconds + 120)
            rss_end = vm_rss(proc.pid)
            health = httpx.get(f"{url}/health", timeout=10).json()
            rss_warm = marks.get("warm", rss_samples[0] if rss_samples else rss_start)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()

    mib = 1024 * 1024
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name")), "?")
    growth = (rss_end - rss_warm) / rss_warm
    c = tally.counts
    print()
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, CPU {cpu} ({os.cpu_count()} "
          f"cores visible), load average at the end {os.getloadavg()[0]:.1f}")
    print(f"mode admin: {args.seconds:.0f} s, {args.clients} clients, {len(tasks)} fixed + {len(churning)} churning "
          f"tasks over a tiny LLaMA (hidden {args.hidden}), server --threads {args.threads}, warm-up {warmup:.0f} s, "
          f"an admin change every {args.churn_every:g} s")
    print()
    print("| | sent | answered (equal to the reference) | 404 while out | wrong | lost |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, label in (("generate", "/v1/generate"), ("chat", "streamed /v1/chat/completions")):
        n_event = c.get(f"{kind} 404 as a stream error event", 0)
        out = f"{c.get(f'{kind} 404 while out', 0):,}" + (f" ({n_event} as a stream error event)" if n_event else "")
        print(f"| {label} | {c.get(f'{kind} sent', 0):,} | {c.get(f'{kind} answered', 0):,} | {out} | "
              f"{c.get(f'{kind} wrong', 0)} | {c.get(f'{kind} lost', 0)} |")
    a = admin_tally.counts
    print(f"| admin (remove / load / same-name reload) | {len(admin_log)} | {a.get('admin remove ok', 0)} / "
          f"{a.get('admin load ok', 0)} / {a.get('admin reload ok', 0)} | | {a.get('admin failed', 0)} | "
          f"{a.get('admin lost', 0)} |")
    lat = tally.latency
    print()
    print(f"latency of the answered requests: p50 {1000 * pct(lat, 50):.0f} ms, p99 {1000 * pct(lat, 99):.0f} ms; "
          f"{len(lat) / args.seconds:.1f} requests/s")
    print(f"server RSS (VmRSS): start {rss_start / mib:.0f} MiB, after warm-up {rss_warm / mib:.0f} MiB, end "
          f"{rss_end / mib:.0f} MiB (max {max(rss_samples or [rss_end]) / mib:.0f} MiB); growth after warm-up "
          f"{100 * growth:+.1f}%")
    print("server counters: " + ", ".join(f"{k} {v}" for k, v in health.get("stats", {}).items()))
    for e in tally.errors + admin_tally.errors:
        print("  e.g.", e)
    lost = c.get("generate lost", 0) + c.get("chat lost", 0) + a.get("admin lost", 0)
    wrong = c.get("generate wrong", 0) + c.get("chat wrong", 0) + a.get("admin failed", 0)
    problems = ([f"{lost} lost"] if lost else []) + ([f"{wrong} wrong or failed"] if wrong else []) + (
        [f"RSS grew {100 * growth:.1f}% after warm-up"] if growth >= 0.10 else [])
    print("RESULT:", "FAIL: " + "; ".join(problems) if problems else "ok (nothing lost, nothing wrong, RSS flat)")
    return 1 if problems else 0
