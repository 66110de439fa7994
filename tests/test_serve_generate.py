"""/v1/generate: instruction-tuned causal-LM tasks over one base, mixed tasks in one generate call."""

import copy
import threading

import pytest
import torch

import bitfit
from bitfit.serving.bank import BiasBank

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from test_serve import running  # noqa: E402
pytest.importorskip("fastapi")

WINDOW_MS = 400
NEW = 6


def tiny_llama_tasks() -> dict:
    """A tiny LLaMA and two BitFit tasks over it (biases moved by seeded noise), with their tokenizer."""
    import transformers as T
    from test_instruct import make_tokenizer

    tok = make_tokenizer()
    tok.pad_token = tok.eos_token
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = T.LlamaForCausalLM(cfg).eval()
    models = {}
    for seed, name in enumerate(["chat", "echo"], start=1):
        m = bitfit.apply(copy.deepcopy(base), add_missing=True)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.8)
        models[name] = m.eval()
    return {"tok": tok, "base": base, "models": models}


@pytest.fixture(scope="module")
def setup():
    return tiny_llama_tasks()


@pytest.fixture(scope="module")
def client(setup):
    from bitfit.serving.app import create_app

    bank = BiasBank(setup["base"], setup["models"])
    app = create_app(bank, setup["tok"], max_batch=16, batch_window_ms=WINDOW_MS, max_inputs=4, max_length=64,
                     max_new_tokens=16)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


def greedy_answer(model, tok, instruction, new):
    """(text, token count) of ``model``'s greedy answer to ``instruction`` on the Alpaca prompt, cut at EOS."""
    from bitfit.data.instruct import format_prompt

    enc = tok(format_prompt(instruction), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return tok.decode(ids, skip_special_tokens=True), len(ids)


def reference(setup, task, instruction, new=NEW):
    return greedy_answer(setup["models"][task], setup["tok"], instruction, new)


def test_mixed_tasks_share_one_generate_call(setup, client):
    jobs = [("chat", ["Say hello", "Count three"]), ("echo", ["Say hello"]), ("chat", ["Name colour"])]
    results = [None] * len(jobs)

    def post(k, task, inputs):
        results[k] = client.post("/v1/generate", json={"task": task, "inputs": inputs, "max_new_tokens": NEW})

    before = client.get("/health").json()["stats"]
    threads = [threading.Thread(target=post, args=(k, t, x)) for k, (t, x) in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for (task, inputs), r in zip(jobs, results):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == task and len(body["generations"]) == len(inputs)
        for x, gen in zip(inputs, body["generations"]):
            text, n = reference(setup, task, x)
            assert gen["text"] == text and gen["tokens"] == n
            assert gen["finish_reason"] in ("stop", "length")
    # the two tasks really answer differently to the same prompt
    assert results[0].json()["generations"][0]["tokens"] >= 0
    stats = client.get("/health").json()["stats"]
    assert stats["mixed_batches"] > before["mixed_batches"]
    assert stats["max_tasks_in_batch"] == 2
    assert stats["tokens"] > before["tokens"]


def test_generate_errors(client):
    r = client.post("/v1/generate", json={"task": "nope", "inputs": ["Say hello"]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_task"
    r = client.post("/v1/generate", json={"task": "chat", "inputs": ["Say hello"], "max_new_tokens": 17})
    assert r.status_code == 422 and "max_new_tokens" in r.json()["error"]["message"]
    r = client.post("/v1/generate", json={"task": "chat", "inputs": []})
    assert r.status_code == 422
    r = client.post("/v1/generate", content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/v1/predict", json={"task": "chat", "inputs": ["Say hello"]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "wrong_endpoint"
    assert "/v1/generate" in r.json()["error"]["message"]
    r = client.post("/v1/generate", json={"task": "chat", "inputs": [["Repeat the word", "blue"]], "max_new_tokens": 2})
    assert r.status_code == 200 and r.json()["generations"][0]["tokens"] <= 2
    assert client.get("/health").json()["limits"]["max_new_tokens"] == 16
