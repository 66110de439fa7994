"""The HTTP service: a real uvicorn server on loopback, talked to with httpx."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import bitfit
from bitfit.serving.bank import BiasBank

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

MAX_LENGTH = 24
MAX_INPUTS = 4
WINDOW_MS = 400  # long enough that concurrent test requests surely share a batch

TASKS = {  # name -> (labels, problem type)
    "sst2": (["negative", "positive"], "single_label_classification"),
    "nli": (["entailment", "neutral", "contradiction"], "single_label_classification"),
    "stsb": (["score"], "regression"),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn on a free loopback port in a thread; yields the base URL."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    t0 = time.time()
    while not srv.started:
        if time.time() - t0 > 30 or not th.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(timeout=10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny BERT base folder (bert-base tokenizer) and three saved task artifacts."""
    from conftest import BERT_BASE_DIR
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    if not (BERT_BASE_DIR / "tokenizer.json").exists():
        pytest.skip(f"bert-base tokenizer not found at {BERT_BASE_DIR}")
    root = tmp_path_factory.mktemp("serve")
    base_dir = root / "base"
    tok = AutoTokenizer.from_pretrained(str(BERT_BASE_DIR))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    body = BertModel(cfg)
    with torch.no_grad():  # non-zero base biases, so that a bank ignoring them would be caught
        for name, p in body.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn(p.shape) * 0.2)
    body.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    models, paths = {}, {}
    for seed, (name, (labels, ptype)) in enumerate(TASKS.items(), start=1):
        m = BertForSequenceClassification.from_pretrained(
            base_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={v: i for i, v in enumerate(labels)}, problem_type=ptype,
        ).eval()
        bitfit.apply(m)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
        models[name] = m
        paths[name] = bitfit.save(m, root / name)
    return {"base_dir": base_dir, "tok": tok, "models": models, "paths": paths}


@pytest.fixture(scope="module")
def server(setup):
    from bitfit.core.models import load_model
    from bitfit.serving.app import create_app

    base = load_model(str(setup["base_dir"]), task="classification").eval()
    bank = BiasBank(base, {n: str(p) for n, p in setup["paths"].items()})
    app = create_app(bank, setup["tok"], max_batch=16, batch_window_ms=WINDOW_MS, max_inputs=MAX_INPUTS,
                     max_length=MAX_LENGTH)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


def reference(setup, task, x):
    tok, m = setup["tok"], setup["models"][task]
    enc = tok(*x, return_tensors="pt") if isinstance(x, list) else tok(x, return_tensors="pt")
    with torch.no_grad():
        return m(**enc).logits[0]


def check_prediction(pred, logits, task):
    labels, ptype = TASKS[task]
    if ptype == "regression":
        assert set(pred) == {"score"}
        assert pred["score"] == pytest.approx(float(logits[0]), abs=1e-4)
        return
    probs = torch.softmax(logits, -1)
    assert pred["label"] == labels[int(probs.argmax())]
    assert pred["score"] == pytest.approx(float(probs.max()), abs=1e-5)
    assert list(pred["scores"]) == labels
    for lab, p in zip(labels, probs.tolist()):
        assert pred["scores"][lab] == pytest.approx(p, abs=1e-5)


def test_health_and_tasks(server):
    h = server.get("/health").json()
    assert h["status"] == "ok" and h["tasks"] == 3
    assert h["limits"]["max_inputs"] == MAX_INPUTS
    got = {t["name"]: t for t in server.get("/v1/tasks").json()["tasks"]}
    assert set(got) == set(TASKS)
    for name, (labels, ptype) in TASKS.items():
        assert got[name]["labels"] == labels
        assert got[name]["problem_type"] == ptype
        assert got[name]["num_labels"] == len(labels)


def test_predict_texts_and_pairs(server, setup):
    inputs = ["a fine film", ["the cat sat", "a cat was sitting"], "terrible , just terrible ."]
    for task in TASKS:
        r = server.post("/v1/predict", json={"task": task, "inputs": inputs})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task and body["problem_type"] == TASKS[task][1]
        assert len(body["predictions"]) == len(inputs)
        for x, pred in zip(inputs, body["predictions"]):
            check_prediction(pred, reference(setup, task, x), task)


def test_concurrent_requests_share_one_batch(server, setup):
    before = server.get("/health").json()["stats"]
    jobs = [("sst2", ["good", "bad movie"]), ("nli", [["a b", "c d"]]), ("stsb", ["x y z", "hello there"])]
    results, barrier = {}, threading.Barrier(len(jobs))

    def call(task, inputs):
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            barrier.wait()
            results[task] = c.post("/v1/predict", json={"task": task, "inputs": inputs})

    threads = [threading.Thread(target=call, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = server.get("/health").json()["stats"]
    assert after["batches"] - before["batches"] == 1
    assert after["mixed_batches"] - before["mixed_batches"] == 1
    assert after["requests"] - before["requests"] == 3
    assert after["rows"] - before["rows"] == 5
    assert after["max_tasks_in_batch"] == 3
    for task, inputs in jobs:
        r = results[task]
        assert r.status_code == 200, r.text
        for x, pred in zip(inputs, r.json()["predictions"]):
            check_prediction(pred, reference(setup, task, x), task)


def err(r, status, type_):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    e = r.json()["error"]
    assert e["type"] == type_ and e["message"]
    return e["message"]


def test_error_cases_and_server_survives(server):
    before = server.get("/health").json()["stats"]["batches"]
    post = lambda body: server.post("/v1/predict", json=body)  # noqa: E731
    assert "sst2" in err(post({"task": "nope", "inputs": ["x"]}), 404, "unknown_task")
    assert "task" in err(post({"inputs": ["x"]}), 422, "validation_error")
    assert "inputs" in err(post({"task": "sst2"}), 422, "validation_error")
    err(post({"task": "sst2", "inputs": "just a string"}), 422, "validation_error")
    err(post({"task": "sst2", "inputs": [1, 2]}), 422, "validation_error")
    err(post({"task": "sst2", "inputs": [["a", "b", "c"]]}), 422, "validation_error")
    err(post({"task": "sst2", "inputs": []}), 422, "validation_error")
    err(post({"task": 3, "inputs": ["x"]}), 422, "validation_error")
    err(post({"task": "sst2", "inputs": ["x"], "extra": 1}), 422, "validation_error")
    assert str(MAX_INPUTS) in err(post({"task": "sst2", "inputs": ["x"] * (MAX_INPUTS + 1)}), 413, "too_many_inputs")
    assert f"max_length={MAX_LENGTH}" in err(post({"task": "sst2", "inputs": ["ok", "word " * 40]}), 413,
                                             "input_too_long")
    err(post({"task": "nli", "inputs": [["word " * 20, "word " * 20]]}), 413, "input_too_long")
    err(post({"task": "sst2", "inputs": ["x" * 100_000]}), 413, "input_too_long")
    js = {"content-type": "application/json"}
    err(server.post("/v1/predict", content=b'{"task": "sst2", "inputs": [', headers=js), 400, "invalid_json")
    err(server.post("/v1/predict", content=b"\xff\xfe", headers=js), 400, "invalid_json")
    err(server.post("/v1/predict", json=["sst2", "x"]), 400, "invalid_request")
    err(server.get("/v1/nothing"), 404, "http_error")
    err(server.get("/v1/predict"), 405, "http_error")
    # nothing above reached the bank, and the server still answers
    assert server.get("/health").json()["stats"]["batches"] == before
    r = post({"task": "sst2", "inputs": ["still alive"]})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in TASKS["sst2"][0]


@pytest.mark.slow
def test_bitfit_serve_command(setup):
    port = free_port()
    launcher = "import sys; from bitfit.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", launcher, "serve", "--model", str(setup["base_dir"]), "--port", str(port),
           "--max-inputs", "8", "--batch-window-ms", "2", "--log-level", "warning"]
    for name, path in setup["paths"].items():
        cmd += ["--task", f"{name}={path}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"bitfit serve exited: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() - t0 > 90:
                raise AssertionError("bitfit serve did not come up in 90 s")
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/predict", json={"task": "nli", "inputs": [["a b", "c d"], "e f"]}, timeout=30)
        assert r.status_code == 200, r.text
        for x, pred in zip([["a b", "c d"], "e f"], r.json()["predictions"]):
            check_prediction(pred, reference(setup, "nli", x), "nli")
        assert httpx.post(f"{url}/v1/predict", json={"task": "nli", "inputs": ["x"] * 9}).status_code == 413
        assert json.loads(httpx.get(f"{url}/v1/tasks").text)["tasks"][0]["name"] == "sst2"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_command_bad_arguments(setup, capsys):
    from bitfit.cli import main

    assert main(["serve", "--model", str(setup["base_dir"]), "--task", "a=x", "--task", "a=y"]) == 1
    assert "given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(setup["base_dir"]), "--task", "no-equals-sign"])
    assert main(["serve", "--model", str(setup["base_dir"]), "--task", f"a={setup['base_dir']}/missing"]) == 1
    assert "missing" in capsys.readouterr().err
