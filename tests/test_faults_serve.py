"""Serving under faults: tasks added while the bank is called, many tasks added, half-open connections
against a server with few file descriptors, and requests the service must refuse cleanly."""

import threading
import time

import pytest
import torch
from families import inputs_for
from test_bank import alone, make_base, task_model

import bitfit
from bitfit.artifacts import read_artifact
from bitfit.serving.bank import BiasBank


# ------------------------------------------------------------------------------ the bank
def test_add_task_while_other_threads_call_the_bank(tmp_path):
    """Adding tasks (folders and models in memory) while another thread calls the bank in a loop: no false
    refusal, and every added task answers as its own model does."""
    base = make_base("bert")
    a, b = task_model(base, 2, 1), task_model(base, 3, 2)
    bank = BiasBank(base, {"a": a, "b": b})
    enc = inputs_for("bert", batch=4)
    want_ab = bank(tasks=["a", "b", "a", "b"], **enc).logits
    new = {f"n{i}": task_model(base, 2 + i % 2, 10 + i) for i in range(8)}
    folders = {n: bitfit.save(m, tmp_path / n) for i, (n, m) in enumerate(new.items()) if i % 2}
    stop, errors, calls = threading.Event(), [], [0]

    def caller():
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                out = bank(tasks=["a", "b", "a", "b"], **enc)
                for got, want in zip(out.logits, want_ab):
                    assert torch.equal(got, want)
                calls[0] += 1
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    th = threading.Thread(target=caller, daemon=True)
    th.start()
    refused = []
    try:
        while calls[0] == 0 and th.is_alive():  # a call is running when the adds start
            time.sleep(0.001)
        for name, model in new.items():
            try:
                bank.add_task(name, folders.get(name, model))
            except Exception as exc:  # noqa: BLE001 - counted
                refused.append(f"{name}: {exc}")
    finally:
        stop.set()
        th.join(timeout=60)
    assert refused == []
    assert errors == []
    assert calls[0] > 0
    names = list(new)
    out = bank(tasks=names, **inputs_for("bert", batch=len(names)))
    for i, name in enumerate(names):
        ref = alone(new[name], inputs_for("bert", batch=len(names)))[i]
        torch.testing.assert_close(out.logits[i], ref, rtol=1e-6, atol=1e-6)


def test_adding_many_tasks_packs_the_tables_once(tmp_path):
    """Adding tasks copies no table per task: the tables are packed once, before the next call, and the base's
    fingerprint is computed once for the bank."""
    base = make_base("bert")
    models = [task_model(base, 2, 1), task_model(base, 3, 2)]
    arts = [read_artifact(bitfit.save(m, tmp_path / f"t{i}")) for i, m in enumerate(models)]
    bank = BiasBank(base)
    n = 300
    for i in range(n):
        bank.add_task(f"t{i}", arts[i % 2])
    assert bank.upkeep == {"repacks": 0, "fingerprints": 1}
    enc = inputs_for("bert", batch=4)
    out = bank(tasks=["t0", "t1", "t298", "t299"], **enc)
    assert bank.upkeep == {"repacks": 1, "fingerprints": 1}
    for i, k in enumerate((0, 1, 0, 1)):
        torch.testing.assert_close(out.logits[i], alone(models[k], enc)[i], rtol=1e-6, atol=1e-6)
    bank(tasks=["t5", "t6"], **inputs_for("bert", batch=2))
    assert bank.upkeep["repacks"] == 1  # nothing changed: no re-pack
    for i in range(0, n, 3):
        bank.remove_task(f"t{i}")
    bank.add_task("again", arts[1])
    out = bank(tasks=["again", "t1"], **inputs_for("bert", batch=2))
    assert bank.upkeep == {"repacks": 2, "fingerprints": 1}
    ref = alone(models[1], inputs_for("bert", batch=2))
    torch.testing.assert_close(out.padded(), ref, rtol=1e-6, atol=1e-6)
    assert all(len(t.owners) == t.values.shape[0] for t in bank._tables.values())


# ------------------------------------------------------------------------------ the service
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_serve import free_port, running, setup  # noqa: E402,F401  (module fixture: tiny BERT + 3 task artifacts)

LAUNCHER = "import sys; from bitfit.cli import main; sys.exit(main())"


def test_generate_with_an_empty_raw_prompt_is_refused_and_the_connection_lives():
    import copy

    import transformers as T
    from test_instruct import make_tokenizer

    from bitfit.serving.app import create_app

    from tokenizers import processors

    tok = make_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")  # no BOS, as GPT-2's
    tok.pad_token = tok.eos_token
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = T.LlamaForCausalLM(cfg).eval()
    bank = BiasBank(base, {"chat": bitfit.apply(copy.deepcopy(base), add_missing=True).eval()})
    app = create_app(bank, tok, batch_window_ms=1, max_length=32, max_new_tokens=4)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/generate", json={"task": "chat", "inputs": [""], "raw": True, "max_new_tokens": 2})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["type"] == "empty_input" and "inputs[0]" in r.json()["error"]["message"]
        # the same keep-alive connection still answers
        r = c.post("/v1/generate", json={"task": "chat", "inputs": ["hi"], "max_new_tokens": 2})
        assert r.status_code == 200, r.text


def test_pair_task_given_one_text_is_refused(setup, tmp_path):  # noqa: F811
    """A task whose run folder records a pair task (GLUE RTE) refuses a single text with 422, and a text-only
    task (SST-2) refuses a pair; a task without a record takes both."""
    import json
    import shutil

    from bitfit.core.models import load_model
    from bitfit.serving.app import create_app

    folders = {}
    for name, glue in (("nli", "rte"), ("sst2", "sst2")):
        folders[name] = tmp_path / name
        shutil.copytree(setup["paths"][name], folders[name])
        (folders[name] / "task.json").write_text(json.dumps({"kind": "glue", "task": glue}))
    folders["stsb"] = setup["paths"]["stsb"]
    base = load_model(str(setup["base_dir"]), task="classification").eval()
    bank = BiasBank(base, {n: str(p) for n, p in folders.items()})
    assert [bank.task_info(n)["inputs"] for n in ("nli", "sst2", "stsb")] == ["pairs", "texts", "any"]
    app = create_app(bank, setup["tok"], batch_window_ms=1, max_length=24)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/predict", json={"task": "nli", "inputs": [["a b", "c d"], "hello"]})
        assert r.status_code == 422 and r.json()["error"]["type"] == "wrong_input_kind"
        assert "inputs[1]" in r.json()["error"]["message"] and "text_pair" in r.json()["error"]["message"]
        r = c.post("/v1/predict", json={"task": "sst2", "inputs": [["a b", "c d"]]})
        assert r.status_code == 422 and "single texts" in r.json()["error"]["message"]
        assert c.post("/v1/predict", json={"task": "nli", "inputs": [["a b", "c d"]]}).status_code == 200
        assert c.post("/v1/predict", json={"task": "stsb", "inputs": ["x", ["a", "b"]]}).status_code == 200


def test_predict_command_refuses_one_text_for_a_pair_run(setup, tmp_path, capsys):  # noqa: F811
    import json
    import shutil

    from bitfit.cli import main

    run = tmp_path / "pair_run"  # a run on the user's own pair data (columns a, b)
    shutil.copytree(setup["paths"]["sst2"], run)
    (run / "task.json").write_text(json.dumps({
        "kind": "files", "task": None, "label_names": ["negative", "positive"], "regression": False,
        "metrics": [], "primary": "accuracy", "text_column": "a", "text_pair_column": "b", "max_seq_length": 24,
        "base_model": str(setup["base_dir"])}))
    assert main(["predict", "--adapter", str(run), "--text", "one sentence"]) == 1
    err = capsys.readouterr().err
    assert "sentence pairs" in err and "--text-pair" in err
    assert main(["predict", "--adapter", str(run), "--text", "one", "--text-pair", "two"]) == 0


def test_absurd_serve_limits_are_refused_at_startup(setup, capsys):  # noqa: F811
    from bitfit.cli import main

    task = f"a={setup['paths']['sst2']}"
    for flag, value, pattern in (("--batch-window-ms", "1e9", "between 0 and 1000 ms"),
                                 ("--batch-window-ms", "nan", "between 0 and 1000 ms"),
                                 ("--header-timeout", "0", "between 0.1 and 3600 seconds"),
                                 ("--body-timeout", "inf", "between 0.1 and 3600 seconds"),
                                 ("--max-connections", "0", "positive integer"),
                                 ("--max-connections", str(10 ** 9), "open-file limit")):
        assert main(["serve", "--model", str(setup["base_dir"]), "--task", task, flag, value]) == 1, flag
        err = capsys.readouterr().err
        assert flag in err and pattern in err, err


def _wait_health(url, proc, limit=90):
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"bitfit serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() - t0 > limit:
            raise AssertionError(f"bitfit serve did not come up in {limit} s")
        time.sleep(0.2)


def _low_fd_limit():
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


@pytest.mark.slow
def test_half_header_flood_does_not_lock_the_server_out(setup):  # noqa: F811
    """With 256 descriptors, 400 connections that send half their headers and stop: /health and a predict still
    answer within seconds, and half-header connections are closed after --header-timeout."""
    import os
    import socket
    import subprocess
    import sys

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", LAUNCHER, "serve", "--model", str(setup["base_dir"]), "--port", str(port),
           "--task", f"sst2={setup['paths']['sst2']}", "--batch-window-ms", "1", "--header-timeout", "3",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, preexec_fn=_low_fd_limit)
    socks = []
    try:
        _wait_health(url, proc)
        limits = httpx.get(f"{url}/health").json()["limits"]
        assert limits["header_timeout_s"] == 3 and limits["max_connections"] < 256
        for _ in range(400):  # more than the server has descriptors
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        t0 = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        r = httpx.post(f"{url}/v1/predict", json={"task": "sst2", "inputs": ["still answering"]}, timeout=5)
        assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 5
        # the newest half-header connection (not evicted) is closed by the header deadline
        last = socks[-1]
        last.settimeout(10)
        t1 = time.monotonic()
        assert last.recv(1024) == b""  # closed by the server, with nothing sent
        assert time.monotonic() - t1 < 8
        assert proc.poll() is None
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "Too many open files" not in out


def test_slow_body_is_answered_408(setup):  # noqa: F811
    import socket

    from bitfit.core.models import load_model
    from bitfit.serving.app import create_app

    base = load_model(str(setup["base_dir"]), task="classification").eval()
    bank = BiasBank(base, {"sst2": str(setup["paths"]["sst2"])})
    app = create_app(bank, setup["tok"], batch_window_ms=1, max_length=24, body_timeout=1)
    with running(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"task\": ")
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b"request_timeout" in data and b"connection: close" in data.lower()
        assert httpx.post(f"{url}/v1/predict", json={"task": "sst2", "inputs": ["ok"]}).status_code == 200
