"""The OpenAI-compatible API of `bitfit serve` (/v1/models, /v1/completions, /v1/chat/completions with SSE
streaming), the classification fan-out, and /metrics, against a live server on 127.0.0.1, with the official
`openai` client where it applies."""

import copy
import json
import threading

import pytest
import torch

from bitfit.serving.bank import BiasBank

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_serve import running  # noqa: E402
from test_serve_generate import greedy_answer, tiny_llama_tasks  # noqa: E402

WINDOW_MS = 300
NEW = 6
ALPACA_TEMPLATE = ("{{ bos_token }}Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\n{{ messages[-1]['content'] }}\n\n"
                   "### Response:\n")


@pytest.fixture(scope="module")
def setup():
    return tiny_llama_tasks()


@pytest.fixture(scope="module")
def server(setup):
    from bitfit.serving.app import create_app

    bank = BiasBank(setup["base"], setup["models"])
    app = create_app(bank, setup["tok"], max_batch=16, batch_window_ms=WINDOW_MS, max_inputs=4, max_length=64,
                     max_new_tokens=16)
    app.state.base_name = "tiny-llama"
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield {"url": url, "http": c, "client": openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)}


def raw_answer(model, tok, prompt, new=NEW):
    """(text, tokens) of ``model``'s greedy continuation of ``prompt`` as it is (no template), cut at EOS."""
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return tok.decode(ids, skip_special_tokens=True), len(ids)


def test_models_list(server):
    models = {m.id: m for m in server["client"].models.list().data}
    assert set(models) == {"tiny-llama", "chat", "echo"}
    raw = {m["id"]: m for m in server["http"].get("/v1/models").json()["data"]}
    assert raw["chat"]["parent"] == raw["echo"]["parent"] == "tiny-llama" and raw["tiny-llama"]["parent"] is None


def test_completion_and_streamed_chat_for_two_tasks_at_once(setup, server):
    client, tok = server["client"], setup["tok"]
    prompt, instruction = "Below is an instruction", "Say hello"
    got = {}

    def complete():
        got["completion"] = client.completions.create(model="chat", prompt=prompt, max_tokens=NEW, temperature=0)

    def chat():
        stream = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": instruction}],
                                                max_tokens=NEW, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        got["chunks"] = list(stream)

    before = server["http"].get("/health").json()["stats"]
    threads = [threading.Thread(target=complete), threading.Thread(target=chat)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    text, n = raw_answer(setup["models"]["chat"], tok, prompt)
    c = got["completion"]
    assert c.model == "chat" and c.choices[0].text == text and c.usage.completion_tokens == n
    assert c.usage.prompt_tokens == len(tok(prompt)["input_ids"])
    chunks = got["chunks"]
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    text, n = greedy_answer(setup["models"]["echo"], tok, instruction, NEW)
    assert streamed == text and len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 2
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length" if n == NEW else "stop"]
    assert chunks[-1].usage.completion_tokens == n and not chunks[-1].choices
    # the same as POST /v1/generate gives, and both requests shared one mixed generate call
    r = server["http"].post("/v1/generate", json={"task": "echo", "inputs": [instruction], "max_new_tokens": NEW})
    assert r.json()["generations"][0]["text"] == streamed
    stats = server["http"].get("/health").json()["stats"]
    assert stats["mixed_batches"] > before["mixed_batches"]


def test_raw_sse_format(server):
    body = {"model": "chat", "prompt": "Below is", "max_tokens": 3, "temperature": 0, "stream": True}
    with server["http"].stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_template_base_model_stop_and_seed(setup, server):
    client, tok = server["client"], setup["tok"]
    # the base itself: no task's biases
    r = client.completions.create(model="tiny-llama", prompt="Below is", max_tokens=NEW, temperature=0)
    assert r.choices[0].text == raw_answer(setup["base"], tok, "Below is")[0]
    # a stop string cuts the text before it; finish_reason "stop"
    full = client.completions.create(model="chat", prompt="Below is", max_tokens=NEW, temperature=0).choices[0].text
    words = full.split()
    if len(words) >= 3:
        cut = client.completions.create(model="chat", prompt="Below is", max_tokens=NEW, temperature=0,
                                        stop=[" " + words[2]])
        assert cut.choices[0].text == full[: full.find(" " + words[2])]
        assert cut.choices[0].finish_reason == "stop"
    # sampling: a seed gives the same text again
    a, b = (client.completions.create(model="echo", prompt="Below is", max_tokens=NEW, temperature=1.0, top_p=0.9,
                                      seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_chat_template_is_used(setup):
    from bitfit.serving.app import create_app

    tok = copy.deepcopy(setup["tok"])
    tok.chat_template = ALPACA_TEMPLATE  # renders the Alpaca prompt, so the answer is the trained one
    bank = BiasBank(setup["base"], {"chat": setup["models"]["chat"]})
    app = create_app(bank, tok, batch_window_ms=0, max_length=64, max_new_tokens=16)
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Name colour"}],
                                           max_tokens=NEW, temperature=0)
    assert r.choices[0].message.content == greedy_answer(setup["models"]["chat"], setup["tok"], "Name colour", NEW)[0]


def test_openai_errors(server):
    client = server["client"]
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.completions.create(model="chat", prompt="x", max_tokens=17)
    with pytest.raises(openai.UnprocessableEntityError, match="n is not supported"):
        client.completions.create(model="chat", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.UnprocessableEntityError, match="one user message"):
        client.chat.completions.create(model="chat", max_tokens=2, messages=[
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])


def test_metrics_count_requests(server):
    from prometheus_client.parser import text_string_to_metric_families

    def counts():
        fams = {f.name: f for f in text_string_to_metric_families(server["http"].get("/metrics").text)}
        req = {}
        for s in fams["bitfit_requests"].samples:
            if s.name == "bitfit_requests_total":
                key = (s.labels["route"], s.labels["task"], s.labels["status"])
                req[key] = req.get(key, 0) + s.value
        tokens = {s.labels["task"]: s.value for s in fams["bitfit_generated_tokens"].samples
                  if s.name.endswith("_total")}
        return req, tokens, fams

    req0, tok0, _ = counts()
    for _ in range(3):
        server["http"].post("/v1/completions", json={"model": "chat", "prompt": "Below", "max_tokens": 2,
                                                    "temperature": 0})
    r = server["http"].post("/v1/generate", json={"task": "echo", "inputs": ["Say hello"], "max_new_tokens": 2})
    server["http"].post("/v1/generate", json={"task": "nope", "inputs": ["x"]})
    req1, tok1, fams = counts()
    diff = {k: v - req0.get(k, 0) for k, v in req1.items() if v != req0.get(k, 0)}
    assert diff[("/v1/completions", "chat", "200")] == 3
    assert diff[("/v1/generate", "echo", "200")] == 1
    assert diff[("/v1/generate", "", "404")] == 1  # an unknown name is not a label
    assert tok1["echo"] - tok0.get("echo", 0) == r.json()["generations"][0]["tokens"]
    assert {s.labels["task"] for s in fams["bitfit_task_resident"].samples} == {"chat", "echo"}
    assert [s.value for s in fams["bitfit_tasks_resident"].samples] == [2]
    assert [s.value for s in fams["bitfit_queue_depth"].samples] == [0]
    hist = [s for s in fams["bitfit_request_seconds"].samples
            if s.name.endswith("_count") and s.labels == {"route": "/v1/completions", "task": "chat"}]
    assert hist and hist[0].value >= 3
