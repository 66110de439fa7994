"""Tasks loaded, reloaded and removed while `bitfit serve` runs (POST /v1/tasks, DELETE /v1/tasks/{name}):
only from the allow-listed task folders, behind the admin key, a task of another base refused with the
fingerprint message, and requests for other tasks never lost meanwhile."""

import threading
import time

import pytest
import torch

import bitfit
from bitfit.serving.bank import BiasBank

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_serve import check_prediction, reference, running, setup  # noqa: E402,F401

KEY = {"X-Admin-Key": "adm"}


@pytest.fixture(scope="module")
def admin(setup):
    from bitfit.core.models import load_model
    from bitfit.serving.admin import enable_task_admin
    from bitfit.serving.app import create_app

    base = load_model(str(setup["base_dir"]), task="classification").eval()
    bank = BiasBank(base, {"sst2": str(setup["paths"]["sst2"])})
    app = create_app(bank, setup["tok"], batch_window_ms=0, max_inputs=4, max_length=24)
    root = setup["paths"]["sst2"].parent
    enable_task_admin(app, task_dirs=[root], admin_key="adm")
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        yield {"c": c, "root": root, "bank": bank}


def predict(c, task, text="a fine film"):
    return c.post("/v1/predict", json={"task": task, "inputs": [text]})


def test_key_and_allow_list(admin):
    c = admin["c"]
    assert c.post("/v1/tasks", json={"name": "x", "path": "nli"}).status_code == 401
    assert c.post("/v1/tasks", json={"name": "x", "path": "nli"}, headers={"X-Admin-Key": "no"}).status_code == 403
    assert c.delete("/v1/tasks/sst2").status_code == 401
    r = c.post("/v1/tasks", json={"name": "x", "path": "/etc"}, headers=KEY)
    assert r.status_code == 403 and "--task-dir" in r.json()["error"]["message"]
    assert c.post("/v1/tasks", json={"name": "x", "path": "../.."}, headers=KEY).status_code == 404
    assert c.post("/v1/tasks", json={"name": "x"}, headers=KEY).status_code == 422
    assert "x" not in admin["bank"]


def test_load_reload_remove(setup, admin):
    c = admin["c"]
    assert predict(c, "new").status_code == 404
    r = c.post("/v1/tasks", json={"name": "new", "path": "nli"}, headers=KEY)
    assert r.status_code == 200 and r.json()["reloaded"] is False
    check_prediction(predict(c, "new").json()["predictions"][0], reference(setup, "nli", "a fine film"), "nli")
    r = c.post("/v1/tasks", json={"name": "new", "path": str(setup["paths"]["stsb"])}, headers=KEY)  # same name
    assert r.status_code == 200 and r.json()["reloaded"] is True
    check_prediction(predict(c, "new").json()["predictions"][0], reference(setup, "stsb", "a fine film"), "stsb")
    assert c.delete("/v1/tasks/new", headers=KEY).status_code == 200
    assert predict(c, "new").status_code == 404
    assert c.delete("/v1/tasks/new", headers=KEY).status_code == 404


def test_task_of_another_base_is_refused(setup, admin):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    other = bitfit.apply(BertForSequenceClassification(cfg).eval())
    bitfit.save(other, admin["root"] / "alien")
    r = admin["c"].post("/v1/tasks", json={"name": "alien", "path": "alien"}, headers=KEY)
    assert r.status_code == 422 and "fingerprint" in r.json()["error"]["message"]
    assert "alien" not in admin["bank"]


def test_churn_loses_no_request(setup, admin):
    c = admin["c"]
    stop, codes, errors = threading.Event(), [], []

    def client():
        try:
            with httpx.Client(base_url=str(c.base_url), timeout=30) as own:
                while not stop.is_set():
                    codes.append(predict(own, "sst2").status_code)
        except Exception as exc:  # noqa: BLE001 - a lost request fails the test below
            errors.append(exc)

    def answered(n: int, limit: float = 60.0) -> None:
        t0 = time.time()
        while len(codes) < n and not errors:
            assert time.time() - t0 < limit, f"only {len(codes)} answers in {limit} s"
            time.sleep(0.01)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        answered(2)  # both clients are sending before the churn starts (a loaded machine starts threads late)
        for i in range(6):
            assert c.post("/v1/tasks", json={"name": "churn", "path": ["nli", "stsb"][i % 2]},
                          headers=KEY).status_code == 200
            if i % 3 == 2:
                assert c.delete("/v1/tasks/churn", headers=KEY).status_code == 200
        answered(len(codes) + 2)  # and still answered after it
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors
    assert codes and set(codes) == {200}


def test_bitfit_serve_task_dir(setup, monkeypatch, capsys, tmp_path):
    import bitfit.serving.app
    from bitfit.cli import main

    monkeypatch.delenv("BITFIT_ADMIN_KEY", raising=False)
    sst2 = f"sst2={setup['paths']['sst2']}"
    model = ["--model", str(setup["base_dir"])]
    assert main(["serve", *model, "--task", sst2, "--task-dir", str(tmp_path)]) == 1  # no admin key
    assert "--task-dir needs an admin key" in capsys.readouterr().err
    assert main(["serve", *model, "--task", sst2, "--task-dir", str(tmp_path / "none"), "--admin-key", "k"]) == 1
    assert "not a folder" in capsys.readouterr().err
    apps = []
    monkeypatch.setattr(bitfit.serving.app, "serve", lambda app, **kw: apps.append(app))
    monkeypatch.setenv("BITFIT_ADMIN_KEY", "k")
    assert main(["serve", *model, "--task", sst2, "--task-dir", str(tmp_path)]) == 0
    (app,) = apps
    routes = {(r.path, m) for r in app.routes for m in getattr(r, "methods", ())}
    assert ("/v1/tasks", "POST") in routes and ("/v1/tasks/{name}", "DELETE") in routes
    assert app.state.base_name == str(setup["base_dir"])
