"""Hardening of the HTTP service: body limit for chunked bodies, JSON content type,
undecodable JSON, API key, bounded queue, dropped work of gone clients, NaN tasks.

A real uvicorn server on loopback, talked to with httpx; tiny random models as in test_serve.py.
Every case checks the status code and the error message, then that the server still answers.
"""

import contextlib
import re
import threading
import time

import pytest
import torch

import bitfit
from bitfit.serving.bank import BiasBank
from bitfit.errors import BitFitError

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_serve import free_port, running, setup  # noqa: E402,F401  (module fixture: tiny BERT + 3 task artifacts)

BODY_LIMIT = 256 * 1024
API_KEY = "s3cret-key"
JS = {"content-type": "application/json"}
GOOD = {"task": "sst2", "inputs": ["a fine film"]}


def make_app(setup, **kw):  # noqa: F811
    from bitfit.core.models import load_model
    from bitfit.serving.app import create_app

    base = load_model(str(setup["base_dir"]), task="classification").eval()
    bank = BiasBank(base, {n: str(p) for n, p in setup["paths"].items()})
    kw.setdefault("batch_window_ms", 0)
    kw.setdefault("max_body_bytes", BODY_LIMIT)
    return create_app(bank, setup["tok"], max_inputs=4, max_length=24, **kw)


@pytest.fixture(scope="module")
def url(setup):  # noqa: F811
    with running(make_app(setup)) as u:
        yield u


@pytest.fixture
def client(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def err(r, status, type_, pattern):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    e = r.json()["error"]
    assert e["type"] == type_, e
    assert re.search(pattern, e["message"]), e["message"]
    return r


def assert_alive(base_url, headers=None):
    """A fresh connection still gets a normal prediction."""
    r = httpx.post(f"{base_url}/v1/predict", json=GOOD, headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["label"] in ("negative", "positive")


# ------------------------------------------------------------------------------- body limit
def test_chunked_oversize_body_stops_reading(url):
    consumed = {"bytes": 0, "done": False}
    chunk = b" " * 65536

    def body():  # 2 GiB, without Content-Length (chunked)
        for _ in range(2**31 // len(chunk)):
            consumed["bytes"] += len(chunk)
            yield chunk
        consumed["done"] = True

    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/predict", content=body(), headers=JS)
    err(r, 413, "body_too_large", rf"exceeds this server's limit of {BODY_LIMIT} bytes; send a smaller body")
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.headers["connection"] == "close"  # the server hangs up instead of draining the rest
    assert not consumed["done"]
    assert consumed["bytes"] < 64 * 2**20, consumed  # socket buffers at most, not 2 GiB
    assert_alive(url)


def test_declared_oversize_body_refused_before_reading(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/predict", content=b"x" * (BODY_LIMIT + 1), headers=JS)
    err(r, 413, "body_too_large", rf"request body of {BODY_LIMIT + 1} bytes exceeds this server's limit")
    assert_alive(url)


def test_body_just_under_limit_is_read(client, url):
    body = b'{"task": "sst2", "inputs": ["a fine film"]}'
    r = client.post("/v1/predict", content=body + b" " * (BODY_LIMIT - len(body)), headers=JS)
    assert r.status_code == 200, r.text
    assert_alive(url)


# ----------------------------------------------------------------------------- content type
@pytest.mark.parametrize("ctype, pattern", [
    ("text/plain", r"Content-Type 'text/plain' is not accepted; send the JSON body with the header "
                   r"'Content-Type: application/json'"),
    ("application/x-www-form-urlencoded", r"'application/x-www-form-urlencoded' is not accepted"),
    (None, r"the request has no Content-Type; send the JSON body with the header"),
    ("application/json; charset=latin-1", r"charset 'latin-1' is not accepted; encode the body as UTF-8"),
])
def test_wrong_content_type_is_415(client, url, ctype, pattern):
    import json

    r = client.post("/v1/predict", content=json.dumps(GOOD).encode(), headers={"content-type": ctype} if ctype else {})
    err(r, 415, "unsupported_media_type", pattern)
    assert_alive(url)


def test_json_content_type_with_charset_is_accepted(client):
    import json

    r = client.post("/v1/predict", content=json.dumps(GOOD).encode(),
                    headers={"content-type": "Application/JSON; charset=UTF-8"})
    assert r.status_code == 200, r.text


# -------------------------------------------------------------------------- undecodable JSON
@pytest.mark.parametrize("body, pattern", [
    (b"[" * 100_000 + b"]" * 100_000, r"nested too deeply to decode; this API needs at most 3 levels"),
    (b'{"task": "sst2", "inputs": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", r"nested too deeply"),
    (b'{"task": "sst2", "inputs": ["\\ud800"]}', r"lone UTF-16 surrogate .* in inputs\[0\]; send valid Unicode"),
    (b'{"task": "sst2", "inputs": [["ok", "x\\udfff"]]}', r"lone UTF-16 surrogate .* in inputs\[0\]\[1\]"),
    (b'{"task": "sst2", "inputs": ["ok"], "\\ud800": 1}', r"lone UTF-16 surrogate .* in a key of body"),
    (b'{"task": "sst2", "inputs": ["caf\xe9"]}', r"not valid UTF-8 \(byte 0xe9 at offset 32\); send UTF-8"),
    (b"\xff\xfe{}", r"not valid UTF-8 \(byte 0xff at offset 0\)"),
    (b'{"task": "sst2", "inputs": [' + b"1" * 5000 + b"]}", r"not valid JSON"),  # int over Python's digit limit
], ids=["deep-list", "deep-inputs", "surrogate", "surrogate-pair-item", "surrogate-key", "latin1", "bom16",
        "huge-int"])
def test_undecodable_json_is_400(client, url, body, pattern):
    err(client.post("/v1/predict", content=body, headers=JS), 400, "invalid_json", pattern)
    assert_alive(url)


def test_valid_surrogate_pair_is_fine(client):
    r = client.post("/v1/predict", content=b'{"task": "sst2", "inputs": ["nice \\ud83d\\ude00"]}', headers=JS)
    assert r.status_code == 200, r.text


# ----------------------------------------------------------------------------------- API key
@pytest.fixture(scope="module")
def auth_url(setup):  # noqa: F811
    with running(make_app(setup, api_key=API_KEY)) as u:
        yield u


def test_api_key(auth_url):
    ok = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=auth_url, timeout=30) as c:
        r = err(c.post("/v1/predict", json=GOOD), 401, "unauthorized",
                r"requires an API key: send the header 'Authorization: Bearer <key>' \(or 'X-API-Key: <key>'\)")
        assert r.headers["www-authenticate"] == "Bearer"
        for bad in ({"Authorization": "Bearer wrong"}, {"X-API-Key": API_KEY + "x"}, {"Authorization": API_KEY}):
            pattern = r"requires an API key" if bad == {"Authorization": API_KEY} else r"wrong API key: send the key"
            err(c.post("/v1/predict", json=GOOD, headers=bad), 401, "unauthorized", pattern)
        err(c.get("/v1/tasks"), 401, "unauthorized", r"requires an API key")
        err(c.get("/docs"), 401, "unauthorized", r"requires an API key")
        err(c.get("/v1/nothing"), 401, "unauthorized", r"requires an API key")  # no path probing
        # the key is checked before the body is read: a big body without it is not read
        err(c.post("/v1/predict", content=b"x" * (10 * BODY_LIMIT), headers=JS), 401, "unauthorized", r"API key")
        h = c.get("/health")  # the health check stays open
        assert h.status_code == 200 and h.json()["limits"]["api_key_required"] is True
        assert c.get("/v1/tasks", headers={"X-API-Key": API_KEY}).status_code == 200
        assert c.get("/v1/tasks", headers={"authorization": f"bearer {API_KEY}"}).status_code == 200
    assert_alive(auth_url, headers=ok)
    assert_alive(auth_url, headers={"X-API-Key": API_KEY})


def test_api_key_argument_checks(setup, monkeypatch, capsys):  # noqa: F811
    from bitfit.cli import main
    from bitfit.serving.app import create_app

    with pytest.raises(BitFitError, match="api_key must be a non-empty string"):
        create_app(object(), setup["tok"], api_key="  ")
    monkeypatch.setenv("BITFIT_API_KEY", "")
    assert main(["serve", "--model", str(setup["base_dir"]), "--task", f"sst2={setup['paths']['sst2']}"]) == 1
    assert "BITFIT_API_KEY is empty; give a non-empty key, or unset it" in capsys.readouterr().err
    assert main(["serve", "--model", "m", "--task", "a=b", "--max-queue", "0"]) == 1
    assert "--max-queue must be at least 1" in capsys.readouterr().err


# ------------------------------------------------------------------ queue bound, gone clients
@contextlib.contextmanager
def blocked_worker(app):
    """Make the bank worker wait inside its bank call until released."""
    batcher = app.state.batcher
    entered, release = threading.Event(), threading.Event()
    real = batcher._run

    def run(items):
        entered.set()
        assert release.wait(30), "test never released the worker"
        return real(items)

    batcher._run = run
    try:
        yield entered, release
    finally:
        release.set()
        batcher._run = real


def post_in_thread(base_url, results, key, timeout=30):
    def go():
        try:
            results[key] = httpx.post(f"{base_url}/v1/predict", json=GOOD, timeout=timeout)
        except httpx.HTTPError as exc:
            results[key] = exc

    th = threading.Thread(target=go)
    th.start()
    return th


def wait_for(cond, what, limit=10):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < limit, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_queue_full_is_503_with_retry_after(setup):  # noqa: F811
    app = make_app(setup, max_queue=1)
    batcher = app.state.batcher
    with running(app) as u, blocked_worker(app) as (entered, release):
        results = {}
        a = post_in_thread(u, results, "a")
        assert entered.wait(10)  # a is in the bank call
        b = post_in_thread(u, results, "b")
        wait_for(lambda: batcher.waiting == 1, "b to be queued")
        r = httpx.post(f"{u}/v1/predict", json=GOOD, timeout=30)
        err(r, 503, "busy", r"server busy: 1 requests are already waiting \(--max-queue 1\); retry after 1 s")
        assert r.headers["retry-after"] == "1"
        stats = httpx.get(f"{u}/health").json()["stats"]
        assert stats["rejected_busy"] == 1 and stats["waiting"] == 1
        release.set()
        a.join(30)
        b.join(30)
        assert results["a"].status_code == 200 and results["b"].status_code == 200
        assert batcher.waiting == 0
        assert_alive(u)


def test_work_of_gone_client_is_dropped(setup):  # noqa: F811
    app = make_app(setup, max_queue=4)
    batcher = app.state.batcher
    with running(app) as u, blocked_worker(app) as (entered, release):
        results = {}
        a = post_in_thread(u, results, "a")
        assert entered.wait(10)
        b = post_in_thread(u, results, "b", timeout=0.5)  # gives up while queued, closing its connection
        b.join(10)
        assert isinstance(results["b"], httpx.TimeoutException), results["b"]
        wait_for(lambda: batcher.stats["dropped_disconnected"] == 1, "the server to notice b left")
        # its queue slot is free again (the count drops in the request's own task, which a loaded machine may
        # run a moment after the batcher counted the drop)
        wait_for(lambda: batcher.waiting == 0, "b's queue slot to be freed")
        release.set()
        a.join(30)
        assert results["a"].status_code == 200
        wait_for(lambda: batcher.queue.empty(), "the worker to skip b")
        stats = httpx.get(f"{u}/health").json()["stats"]
        assert stats["requests"] == 1 and stats["rows"] == 1  # b was never computed
        assert_alive(u)
        assert httpx.get(f"{u}/health").json()["stats"]["requests"] == 2


# ---------------------------------------------------------------------------------- NaN tasks
def nan_model(setup):  # noqa: F811
    from transformers import BertForSequenceClassification

    m = BertForSequenceClassification.from_pretrained(setup["base_dir"], num_labels=2).eval()
    bitfit.apply(m)
    with torch.no_grad():
        m.bert.encoder.layer[0].output.dense.bias[3] = float("nan")
    return m


def test_nan_task_is_refused(setup, url, client):  # noqa: F811
    bank = BiasBank(str(setup["base_dir"]), {"sst2": str(setup["paths"]["sst2"])})
    # refused by the artifact reader or by the bank, whichever sees it first; the message names NaN and the fix
    with pytest.raises(BitFitError, match=r"(?s)layer\.0\.output\.dense\.bias.*NaN.*retrain"):
        bank.add_task("bad", nan_model(setup))
    m = bitfit.apply(__import__("transformers").BertForSequenceClassification.from_pretrained(
        setup["base_dir"], num_labels=2).eval())
    with torch.no_grad():
        m.classifier.weight[0, 0] = float("inf")
    with pytest.raises(BitFitError, match=r"(?s)classifier\.weight.*inf.*retrain"):
        bank.add_task("inf", m)
    assert bank.tasks == ["sst2"]
    # the bank's own check, for tensors that reach it by any path
    from bitfit.artifacts import task_tensors

    for where in ("bias", "head"):
        tt = task_tensors(bank.base, str(setup["paths"]["nli"]))
        tensors = tt.biases if where == "bias" else tt.head
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan") if where == "bias" else float("-inf")
        with pytest.raises(BitFitError, match=rf"task 'x' holds NaN/inf values in \S*{re.escape(name.split('.')[-1])}"
                                              r".*: its training diverged or the artifact is damaged; retrain it"):
            bank._build_task("x", tt)
    assert bank.tasks == ["sst2"]
    # the serving bank keeps serving its tasks
    served = client.get("/v1/tasks").json()["tasks"]
    assert [t["name"] for t in served] == ["sst2", "nli", "stsb"]
    assert_alive(url)


def test_serve_command_refuses_nan_artifact(setup, tmp_path, capsys):  # noqa: F811
    """A NaN artifact (refused by bitfit.save or, written anyway, by the bank) never gets served."""
    from safetensors.torch import load_file, save_file

    from bitfit.cli import main

    folder = bitfit.save(bitfit.apply(__import__("transformers").BertForSequenceClassification.from_pretrained(
        setup["base_dir"], num_labels=2).eval()), tmp_path / "bad")
    f = next(folder.glob("*.safetensors"))
    tensors = load_file(f)
    name = next(k for k in tensors if "head" not in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, f, metadata={"format": "pt"})
    rc = main(["serve", "--model", str(setup["base_dir"]), "--task", f"bad={folder}", "--port", str(free_port())])
    assert rc == 1
    assert re.search(r"(?i)nan", capsys.readouterr().err)
