"""Loopback load test of `bitfit serve`: nothing lost, nothing silently wrong, memory flat.

Builds K task artifacts over one base (the packaged MiniLM-L6 by default; the tasks are
random, untrained, 2 or 3 labels), starts `bitfit serve` on 127.0.0.1 in a subprocess and
runs N client threads against it for ``--seconds`` (default 120):

* patient clients (timeout 60 s) post 1-4 inputs for a random task and check every answer
  against the server's own one-request-at-a-time answer for the same (task, text), measured
  before the load (same label, scores within 1e-4);
* impatient clients give up after 0.5-1.5x ``--impatient-timeout-ms`` (default 100 ms; the
  requests they give up on are "abandoned", and the server should drop their queued work);
* one hostile client, once a second, sends a 64 MiB chunked body, a 100k-deep JSON array or a
  text/plain body, and must get 413 / 400 / 415 (``--no-hostile`` to leave it out).

Modes (``--mode``):

* ``normal`` (default): the load above;
* ``churn``: the server runs in this process (there is no HTTP route to add tasks) and, every
  ``--churn-every`` seconds (default 2), one of ``--churn-tasks`` extra tasks (default 4) is removed
  from the bank or the removed one added back, in turn (``BiasBank.remove_task`` / ``add_task`` while the clients run); one
  more client asks the churning tasks and checks every answer against the task's reference (404 for a
  task removed at that moment is expected; anything else is wrong or lost);
* ``admin``: a real ``bitfit serve`` subprocess over a tiny generative (LLaMA-style) base with
  ``--task-dir`` and an admin key; the clients send ``/v1/generate`` and streamed
  ``/v1/chat/completions`` for fixed and churning tasks while an admin thread removes, loads and
  reloads the churning tasks over HTTP every ``--churn-every`` seconds (``benchmarks/serve_load_admin.py``);
* ``slow-clients``: besides the load, ``--slow`` sockets (default 50) are kept open that send half a
  request's headers and stop, or full headers and half a body; the server runs with
  ``--header-timeout 2 --body-timeout 2`` and must close the first and answer 408 to the second,
  while the other clients lose nothing.

It prints sent / succeeded / wrong / failed (an HTTP error answer) / abandoned / lost (a
patient request with no answer at all), p50 / p99 latency of the patient requests, the
server's RSS before any request, after the warm-up and at the end, and its counters. The
exit status is 1 when anything was lost or wrong, a hostile request was not refused as it
should be, or RSS grew by 10% or more after the warm-up.

    nice -n 10 python benchmarks/serve_load.py                    # 2 minutes, MiniLM, 8 clients
    python benchmarks/serve_load.py --mode churn --seconds 20      # tasks added and removed under load
    python benchmarks/serve_load.py --mode slow-clients --seconds 20
    python benchmarks/serve_load.py --mode admin --seconds 60     # generate + streamed chat, tasks over HTTP
    python benchmarks/serve_load.py --seconds 20 --clients 4      # a quick look
    python benchmarks/serve_load.py --model path/to/base --tasks 8
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import httpx  # noqa: E402
import psutil  # noqa: E402

HOST = "127.0.0.1"  # loopback only, always

TEXTS = [
    "a gripping , beautifully acted film", "awful . just awful", "the plot goes nowhere",
    "a quiet masterpiece of small gestures", "i laughed , i cried , i want my money back",
    "the cast is wasted on a thin script", "one of the best films of the year", "it is long",
    "a man is playing a guitar", "nobody is playing", "the cat sat on the mat", "a dog runs in the park",
    "the weather is nice today", "stocks fell sharply on monday", "he said he would come back",
    "visually stunning but emotionally hollow", "a sequel nobody asked for", "surprisingly tender",
    "the soundtrack carries the whole thing", "too many characters , too little time",
]
PAIRS = [["a man is playing a guitar", "someone plays music"], ["the cat sat on the mat", "a dog sleeps"],
         ["stocks fell sharply", "the market went up"], ["he said he would come", "he promised to return"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def build_tasks(model: str, n_tasks: int, folder: Path) -> dict:
    import torch

    import bitfit
    from bitfit.core.models import load_model

    paths = {}
    for k in range(n_tasks):
        n_labels = 2 + k % 2
        m = bitfit.apply(load_model(model, task="classification", num_labels=n_labels).eval())
        g = torch.Generator().manual_seed(k + 1)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        paths[f"task{k}"] = bitfit.save(m, folder / f"task{k}")
    return paths


def pct(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def same(pred, ref, tol=1e-4) -> bool:
    if pred.get("label") != ref.get("label") or set(pred.get("scores", {})) != set(ref.get("scores", {})):
        return False
    return all(abs(pred["scores"][k] - v) <= tol for k, v in ref["scores"].items())


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"sent": 0, "succeeded": 0, "wrong": 0, "failed": 0, "abandoned": 0, "lost": 0}
        self.status = {}
        self.latency = []
        self.errors = []

    def add(self, kind, latency=None, status=None, error=None):
        with self.lock:
            self.counts[kind] += 1
            if latency is not None:
                self.latency.append(latency)
            if status is not None:
                self.status[status] = self.status.get(status, 0) + 1
            if error is not None and len(self.errors) < 10:
                self.errors.append(error)


def client_loop(url, tasks, refs, deadline, tally, seed, timeout):
    rng = random.Random(seed)
    patient = timeout is None
    with httpx.Client(base_url=url, timeout=60) as c:
        while time.monotonic() < deadline:
            task = rng.choice(tasks)
            pool = TEXTS + [tuple(p) for p in PAIRS]
            inputs = [rng.choice(pool) for _ in range(rng.randint(1, 4))]
            body = {"task": task, "inputs": [list(x) if isinstance(x, tuple) else x for x in inputs]}
            with tally.lock:
                tally.counts["sent"] += 1
            t0 = time.perf_counter()
            try:
                r = c.post("/v1/predict", json=body, timeout=60 if patient else timeout * rng.uniform(0.5, 1.5))
            except httpx.TimeoutException as exc:
                tally.add("abandoned" if not patient else "lost", error=None if not patient else repr(exc))
                continue
            except httpx.HTTPError as exc:
                tally.add("lost", error=repr(exc))
                continue
            dt = time.perf_counter() - t0
            if r.status_code != 200:
                tally.add("failed", status=r.status_code, error=r.text[:200])
                if r.status_code == 503:
                    time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            preds = r.json()["predictions"]
            ok = len(preds) == len(inputs) and all(same(p, refs[(task, x)]) for p, x in zip(preds, inputs))
            tally.add("succeeded" if ok else "wrong", latency=dt if patient else None, status=200,
                      error=None if ok else f"{task} {inputs}: {preds}")


def hostile_loop(url, deadline, tally):
    """Once a second one bad request; each must be refused with its status code."""
    cases = [
        ("chunked 64 MiB", 413, lambda c: c.post("/v1/predict", headers={"content-type": "application/json"},
                                                 content=(b" " * 65536 for _ in range(1024)))),
        ("100k-deep JSON", 400, lambda c: c.post("/v1/predict", headers={"content-type": "application/json"},
                                                 content=b"[" * 100_000 + b"]" * 100_000)),
        ("text/plain", 415, lambda c: c.post("/v1/predict", headers={"content-type": "text/plain"},
                                             content=b'{"task": "task0", "inputs": ["x"]}')),
    ]
    k = 0
    while time.monotonic() < deadline:
        name, want, call = cases[k % len(cases)]
        k += 1
        with tally.lock:
            tally.counts["sent"] += 1
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                r = call(c)
            tally.add("succeeded" if r.status_code == want else "wrong", status=r.status_code,
                      error=None if r.status_code == want else f"{name}: {r.status_code} {r.text[:100]}")
        except httpx.HTTPError as exc:
            tally.add("lost", error=f"{name}: {exc!r}")
        time.sleep(1.0)


def churn_loop(bank, paths, deadline, every, log):
    """Every ``every`` seconds remove one churning task from the bank or add the removed one back (in turn)."""
    names = list(paths)
    k = 0
    while time.monotonic() < deadline:
        time.sleep(every)
        name = names[(k // 2) % len(names)]  # out for one period, then back: at most one task out at a time
        k += 1
        if name in bank:
            bank.remove_task(name)
            log.append(("removed", name))
        else:
            bank.add_task(name, str(paths[name]))
            log.append(("added", name))


def churn_client(url, names, refs, deadline, tally, seed):
    """Asks the churning tasks: a 200 must equal the task's reference, a 404 means it was out at that moment."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as c:
        while time.monotonic() < deadline:
            task, x = rng.choice(names), rng.choice(TEXTS)
            with tally.lock:
                tally.counts["sent"] += 1
            try:
                r = c.post("/v1/predict", json={"task": task, "inputs": [x]})
            except httpx.HTTPError as exc:
                tally.add("lost", error=repr(exc))
                continue
            if r.status_code == 404 and r.json()["error"]["type"] == "unknown_task":
                tally.add("absent", status=404)
            elif r.status_code == 200 and same(r.json()["predictions"][0], refs[(task, x)]):
                tally.add("succeeded", status=200)
            else:
                tally.add("wrong", status=r.status_code, error=f"{task} {x}: {r.status_code} {r.text[:200]}")


def slow_loop(port, deadline, tally, n):
    """Keeps ``n`` slow sockets open: half headers (the server must close them) or headers and half a body (the
    server must answer 408); a replaced socket is counted by how the server ended it."""
    import select

    half_headers = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n"
    half_body = (b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"task\": ")
    socks: dict = {}
    k = 0
    while time.monotonic() < deadline:
        while len(socks) < n:
            kind = "headers" if k % 2 == 0 else "body"
            k += 1
            try:
                s = socket.create_connection((HOST, port), timeout=5)
                s.sendall(half_headers if kind == "headers" else half_body)
            except OSError as exc:
                tally.add("lost", error=f"slow client could not connect: {exc!r}")
                time.sleep(0.2)
                break
            socks[s] = (kind, time.monotonic())
            with tally.lock:
                tally.counts["sent"] += 1
        ready, _, _ = select.select(list(socks), [], [], 0.2)
        for s in ready:
            kind, t0 = socks.pop(s)
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            s.close()
            if kind == "headers" and data == b"":
                tally.add("closed", latency=time.monotonic() - t0)
            elif kind == "body" and data.startswith(b"HTTP/1.1 408"):
                tally.add("answered_408", latency=time.monotonic() - t0)
            else:
                tally.add("wrong", error=f"slow {kind}: {data[:80]!r}")
    for s in socks:
        s.close()


def serve_in_process(model, paths, port, threads, max_queue):
    """The bank and its app in this process (uvicorn in a thread), for the churn mode."""
    import torch
    import uvicorn

    from bitfit.core.models import load_model, load_tokenizer
    from bitfit.serving.app import create_app
    from bitfit.serving.bank import BiasBank
    from bitfit.serving.connections import guarded_protocol

    torch.set_num_threads(threads)
    base = load_model(model, task="classification").eval()
    bank = BiasBank(base, {n: str(p) for n, p in paths.items()})
    app = create_app(bank, load_tokenizer(model), max_queue=max_queue)
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning",
                                           http=guarded_protocol(max_connections=256)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return bank, server, thread


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="length of the load (default 120)")
    ap.add_argument("--warmup", type=float, default=None, help="seconds counted as warm-up (default: a sixth)")
    ap.add_argument("--model", default="minilm", help="base model folder / Hub name / 'minilm' (default)")
    ap.add_argument("--tasks", type=int, default=4, help="task artifacts in the bank (default 4)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    ap.add_argument("--impatient", type=int, default=2, help="how many of them give up early (default 2)")
    ap.add_argument("--impatient-timeout-ms", type=float, default=100.0)
    ap.add_argument("--no-hostile", action="store_true", help="leave out the client sending bad requests")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (default 1)")
    ap.add_argument("--max-queue", type=int, default=64)
    ap.add_argument("--mode", choices=["normal", "churn", "slow-clients", "admin"], default="normal")
    ap.add_argument("--churn-tasks", type=int, default=4, help="churn mode: tasks removed and added back")
    ap.add_argument("--churn-every", type=float, default=2.0, help="churn mode: seconds between changes")
    ap.add_argument("--slow", type=int, default=50, help="slow-clients mode: slow sockets kept open")
    ap.add_argument("--hidden", type=int, default=64, help="admin mode: hidden size of the tiny LLaMA base")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.clients < 1 or not 0 <= args.impatient <= args.clients:
        ap.error("--seconds must be > 0, --clients >= 1 and 0 <= --impatient <= --clients")
    warmup = args.warmup if args.warmup is not None else args.seconds / 6
    if args.mode == "admin":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from serve_load_admin import run

        return run(args, warmup)

    with tempfile.TemporaryDirectory(prefix="bitfit-serve-load-") as tmp:
        t_build = time.perf_counter()
        paths = build_tasks(args.model, args.tasks + (args.churn_tasks if args.mode == "churn" else 0), Path(tmp))
        churning = {n: paths.pop(n) for n in list(paths)[args.tasks:]}
        print(f"built {len(paths)} task artifacts over {args.model} in {time.perf_counter() - t_build:.1f} s",
              flush=True)
        port = free_port()
        url = f"http://{HOST}:{port}"
        cmd = [sys.executable, "-c", "import sys; from bitfit.cli import main; sys.exit(main())", "serve",
               "--model", args.model, "--host", HOST, "--port", str(port), "--threads", str(args.threads),
               "--max-queue", str(args.max_queue), "--log-level", "warning"]
        if args.mode == "slow-clients":
            cmd += ["--header-timeout", "2", "--body-timeout", "2"]
        for name, p in paths.items():
            cmd += ["--task", f"{name}={p}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        env.pop("BITFIT_API_KEY", None)
        log = open(Path(tmp) / "server.log", "w+")
        bank = None
        if args.mode == "churn":
            bank, inproc, inproc_thread = serve_in_process(args.model, {**paths, **churning}, port, args.threads,
                                                           args.max_queue)
            proc = None
        else:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            t0 = time.time()
            while True:
                if proc is not None and proc.poll() is not None:
                    log.seek(0)
                    raise SystemExit(f"bitfit serve exited:\n{log.read()}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() - t0 > 120:
                    raise SystemExit("bitfit serve did not come up in 120 s")
                time.sleep(0.2)
            server = psutil.Process(proc.pid if proc is not None else os.getpid())
            rss_start = server.memory_info().rss

            # reference answers: one request at a time, nothing else running
            tasks = list(paths)
            refs = {}
            with httpx.Client(base_url=url, timeout=60) as c:
                for task in tasks + list(churning):
                    for x in TEXTS + [tuple(p) for p in PAIRS]:
                        r = c.post("/v1/predict", json={"task": task, "inputs": [list(x) if isinstance(x, tuple)
                                                                                  else x]})
                        r.raise_for_status()
                        refs[(task, x)] = r.json()["predictions"][0]

            tally, hostile, churn, slow = Tally(), Tally(), Tally(), Tally()
            for t in (churn, slow):
                t.counts.update({"absent": 0, "closed": 0, "answered_408": 0})
            churn_log: list = []
            start = time.monotonic()
            deadline = start + args.seconds
            rss_samples = []
            marks = {}

            def monitor():
                while time.monotonic() < deadline:
                    rss = server.memory_info().rss
                    rss_samples.append(rss)
                    if "warm" not in marks and time.monotonic() - start >= warmup:
                        marks["warm"] = rss
                    time.sleep(0.5)

            threads = [threading.Thread(target=monitor)]
            for i in range(args.clients):
                timeout = args.impatient_timeout_ms / 1000 if i < args.impatient else None
                threads.append(threading.Thread(target=client_loop,
                                                args=(url, tasks, refs, deadline, tally, i, timeout)))
            if not args.no_hostile:
                threads.append(threading.Thread(target=hostile_loop, args=(url, deadline, hostile)))
            if args.mode == "churn":
                threads.append(threading.Thread(target=churn_loop, args=(bank, churning, deadline, args.churn_every,
                                                                         churn_log)))
                threads.append(threading.Thread(target=churn_client, args=(url, list(churning), refs, deadline,
                                                                           churn, 99)))
            if args.mode == "slow-clients":
                threads.append(threading.Thread(target=slow_loop, args=(port, deadline, slow, args.slow)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(1.0)  # let the server finish what the last impatient clients left behind
            rss_end = server.memory_info().rss
            health = httpx.get(f"{url}/health", timeout=10).json()
            rss_warm = marks.get("warm", rss_samples[0] if rss_samples else rss_start)
        finally:
            if proc is None:
                inproc.should_exit = True
                inproc_thread.join(timeout=20)
            else:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            log.close()

    mib = 1024 * 1024
    c, h = tally.counts, hostile.counts
    growth = (rss_end - rss_warm) / rss_warm
    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name")), platform.processor())
    stats = health["stats"]
    print()
    print(f"date {datetime.date.today().isoformat()}, CPU {cpu} ({os.cpu_count()} cores visible), "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"mode {args.mode}: {args.seconds:.0f} s, {args.clients} clients ({args.impatient} giving up after "
          f"{0.5 * args.impatient_timeout_ms:.0f}-{1.5 * args.impatient_timeout_ms:.0f} ms), {len(tasks)} tasks "
          f"over {args.model}, server --threads {args.threads}, warm-up {warmup:.0f} s")
    print()
    print("| | sent | succeeded | wrong | failed | abandoned | lost |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| predict clients | {c['sent']:,} | {c['succeeded']:,} | {c['wrong']} | {c['failed']} | "
          f"{c['abandoned']:,} | {c['lost']} |")
    if not args.no_hostile:
        print(f"| hostile client (must be refused) | {h['sent']} | {h['succeeded']} refused as expected | "
              f"{h['wrong']} | | | {h['lost']} |")
    if args.mode == "churn":
        cc = churn.counts
        print(f"| churn client ({len(churning)} tasks, {len(churn_log)} adds/removes) | {cc['sent']:,} | "
              f"{cc['succeeded']:,} (+{cc['absent']:,} 404 while out) | {cc['wrong']} | | | {cc['lost']} |")
    if args.mode == "slow-clients":
        sc = slow.counts
        print(f"| slow sockets (kept {args.slow} open) | {sc['sent']:,} | {sc['closed']:,} closed at the header "
              f"deadline, {sc['answered_408']:,} answered 408 | {sc['wrong']} | | | {sc['lost']} |")
    print()
    lat = tally.latency
    print(f"patient latency: p50 {1000 * pct(lat, 50):.0f} ms, p99 {1000 * pct(lat, 99):.0f} ms "
          f"(mean {1000 * statistics.fmean(lat) if lat else float('nan'):.0f} ms); "
          f"throughput {c['succeeded'] / args.seconds:.1f} requests/s, {stats['rows'] / args.seconds:.1f} rows/s")
    print(f"server RSS: start {rss_start / mib:.0f} MiB, after warm-up {rss_warm / mib:.0f} MiB, end "
          f"{rss_end / mib:.0f} MiB (max {max(rss_samples or [rss_end]) / mib:.0f} MiB); growth after warm-up "
          f"{100 * growth:+.1f}%")
    print("server counters: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    if c["failed"]:
        print(f"failed by status: {tally.status}")
    problems = []
    lost = c["lost"] + h["lost"] + churn.counts["lost"] + slow.counts["lost"]
    wrong = c["wrong"] + h["wrong"] + churn.counts["wrong"] + slow.counts["wrong"]
    if lost:
        problems.append(f"{lost} request(s) lost")
    if wrong:
        problems.append(f"{wrong} wrong answer(s)")
    if growth >= 0.10:
        problems.append(f"RSS grew {100 * growth:.1f}% after warm-up")
    for e in tally.errors + hostile.errors + churn.errors + slow.errors:
        print("  e.g.", e)
    print("RESULT:", "FAIL: " + "; ".join(problems) if problems else "ok (nothing lost, nothing wrong, RSS flat)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
