"""Fan-out classification on `bitfit serve`: POST /v1/predict with several tasks for the same inputs runs as one
mixed bank call, each task's answer what its own model gives."""

import pytest

from bitfit.serving.bank import BiasBank

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_serve import TASKS, check_prediction, reference, running, setup  # noqa: E402,F401


def test_fanout_runs_as_one_mixed_batch(setup):
    from bitfit.core.models import load_model
    from bitfit.serving.app import create_app

    base = load_model(str(setup["base_dir"]), task="classification").eval()
    bank = BiasBank(base, {n: str(p) for n, p in setup["paths"].items()})
    app = create_app(bank, setup["tok"], batch_window_ms=0, max_inputs=8, max_length=64)
    names = list(TASKS)
    with running(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/predict", json={"tasks": names, "inputs": ["a fine film"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["task"] for x in body["results"]] == names
        for res in body["results"]:
            check_prediction(res["predictions"][0], reference(setup, res["task"], "a fine film"), res["task"])
        stats = c.get("/health").json()["stats"]
        assert stats["batches"] == 1 and stats["max_tasks_in_batch"] == len(names)  # window 0: still one batch
        assert c.post("/v1/predict", json={"tasks": [names[0], "nope"], "inputs": ["x"]}).status_code == 404
        assert c.post("/v1/predict", json={"tasks": names, "inputs": ["x"] * 3}).status_code == 413
        assert c.post("/v1/predict", json={"tasks": [], "inputs": ["x"]}).status_code == 422
