"""A GGUF file as the base of a bias bank and of `bitfit serve`: instruction-tuned tasks trained on the tiny GGUF
(written by tests/test_gguf.py's writer) answer `bank.generate` and POST /v1/generate exactly as each task's own
model does; the artifact's base fingerprint (taken on the dequantized GGUF) passes, and another GGUF is refused."""

import copy

import pytest
import torch

import bitfit
from bitfit.errors import BitFitError
from bitfit.serving.bank import BiasBank
from bitfit.cli import main
from bitfit.core.models import load_model, load_tokenizer

pytest.importorskip("gguf")
from test_gguf import _alpaca, write_tiny_llama_gguf  # noqa: E402
from test_serve_generate import greedy_answer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 6
PROMPTS = ["Name a colour", "Say hello"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny GGUF, a `bitfit train --task instruct` run on it ("chat") and a second task saved with
    bitfit.save from a BitFit model of the same GGUF with its biases moved ("echo")."""
    root = tmp_path_factory.mktemp("gguf_serve")
    path = write_tiny_llama_gguf(root / "tiny-llama.Q8_0.gguf")
    chat = root / "chat"
    assert main(["train", "--model", path, "--task", "instruct", "--train-file", _alpaca(root / "a.jsonl"),
                 "--output-dir", str(chat), "--max_steps", "2", "--per_device_train_batch_size", "4",
                 "--learning_rate", "0.05", "--max-seq-length", "384", "--disable_tqdm", "true",
                 "--report_to", "none"]) == 0
    base = load_model(path, task="causal-lm").eval()
    echo = bitfit.apply(copy.deepcopy(base), add_missing=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in echo.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.8)
    bitfit.save(echo, root / "echo", base_name=path)
    tok = load_tokenizer(path)
    tok.pad_token = tok.eos_token
    own = {"chat": bitfit.load(copy.deepcopy(base), chat).eval(), "echo": echo.eval()}
    return {"path": path, "root": root, "tasks": {"chat": str(chat), "echo": str(root / "echo")}, "tok": tok,
            "own": own}


def reference(setup, task, instruction, new=NEW):
    """(text, token count) of the task's own model, greedy, on the Alpaca prompt."""
    return greedy_answer(setup["own"][task], setup["tok"], instruction, new)


def test_bank_over_a_gguf_file_generates_as_each_task(setup):
    from bitfit.data.instruct import format_prompt

    bank = BiasBank(setup["path"], setup["tasks"])  # a path: loaded dequantized, as a causal LM (its tasks' class)
    assert type(bank.base).__name__ == "LlamaForCausalLM" and bank.tasks == ["chat", "echo"]
    tok = setup["tok"]
    tok.padding_side = "left"
    enc = tok([format_prompt(x) for x in PROMPTS], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    for task in ("chat", "echo"):  # one task: bit for bit its own model's greedy generate
        with torch.no_grad():
            own = setup["own"][task].generate(**enc, **kw)
        assert torch.equal(bank.generate([task] * len(PROMPTS), **enc, **kw), own)
    mixed = bank.generate(["chat", "echo"], **enc, **kw)  # mixed tasks in one generate call
    for i, task in enumerate(["chat", "echo"]):
        with torch.no_grad():
            own = setup["own"][task].generate(**enc, **kw)
        assert torch.equal(mixed[i], own[i])
    with torch.no_grad():
        plain = bank.base.generate(**enc, **kw)
    assert not torch.equal(mixed, plain)  # the tasks' biases are in use


def test_bank_gguf_file_in_a_folder_and_without_tasks(setup):
    folder, name = setup["root"], "tiny-llama.Q8_0.gguf"
    bank = BiasBank(str(folder), {"chat": setup["tasks"]["chat"]}, gguf_file=name)
    assert type(bank.base).__name__ == "LlamaForCausalLM"
    empty = BiasBank(setup["path"])  # no tasks yet: a GGUF base is a causal LM
    assert type(empty.base).__name__ == "LlamaForCausalLM"
    empty.add_task("chat", setup["tasks"]["chat"])
    assert empty.tasks == ["chat"]
    with pytest.raises(bitfit.BitFitError, match="gguf_file"):
        BiasBank(empty.base, gguf_file=name)


def test_bank_over_a_local_causal_lm_folder(setup, tmp_path):
    """A local causal-LM folder (here the dequantized GGUF saved with save_pretrained) as the bank's base path:
    loaded with AutoModelForCausalLM for instruction-tuned tasks (not a sequence-classification head)."""
    from bitfit.data.instruct import format_prompt

    folder = tmp_path / "llama"
    load_model(setup["path"], task="causal-lm").save_pretrained(folder)
    setup["tok"].save_pretrained(folder)
    bank = BiasBank(str(folder), {"echo": setup["tasks"]["echo"]})
    assert type(bank.base).__name__ == "LlamaForCausalLM"
    tok = load_tokenizer(str(folder))
    tok.pad_token = tok.eos_token
    enc = tok([format_prompt(PROMPTS[0])], return_tensors="pt")
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        own = setup["own"]["echo"].generate(**enc, **kw)
    assert torch.equal(bank.generate(["echo"], **enc, **kw), own)


def test_bank_classification_task_on_the_gguf_and_mixed_kinds(setup, tmp_path):
    cls = bitfit.apply(load_model(setup["path"], task="classification", num_labels=2), add_missing=True)
    bitfit.save(cls, tmp_path / "cls", base_name=setup["path"])
    bank = BiasBank(setup["path"], {"cls": str(tmp_path / "cls")})  # its task's class: sequence classification
    assert type(bank.base).__name__ == "LlamaForSequenceClassification"
    ids = setup["tok"]("a fine film", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        own = cls.eval()(input_ids=ids).logits[0]
    assert torch.equal(bank(tasks=["cls"], input_ids=ids).logits[0], own)
    with pytest.raises(bitfit.BitFitError, match="one kind"):
        BiasBank(setup["path"], {"chat": setup["tasks"]["chat"], "cls": str(tmp_path / "cls")})


def test_bank_refuses_a_task_of_another_gguf(setup, tmp_path):
    other = write_tiny_llama_gguf(tmp_path / "other.gguf", seed=1)
    with pytest.raises(bitfit.BitFitError, match="fingerprint"):
        BiasBank(other, {"chat": setup["tasks"]["chat"]})


def test_bitfit_serve_gguf_generate(setup, monkeypatch, capsys):
    """`bitfit serve --model x.gguf` (its tokenizer from the GGUF file): /v1/generate answers each task's text."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    import bitfit.serving.app
    from test_serve import running

    apps = []
    monkeypatch.setattr(bitfit.serving.app, "serve", lambda app, **kw: apps.append((app, kw)))
    argv = ["serve", "--model", setup["path"], "--batch-window-ms", "200", "--max-new-tokens", "16", "--threads", "1"]
    for name, path in setup["tasks"].items():
        argv += ["--task", f"{name}={path}"]
    assert main(argv) == 0
    assert "/v1/generate" in capsys.readouterr().out
    (app, kw), = apps
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        tasks = {t["name"] for t in c.get("/v1/tasks").json()["tasks"]}
        assert tasks == {"chat", "echo"}
        for task in ("chat", "echo"):
            r = c.post("/v1/generate", json={"task": task, "inputs": PROMPTS, "max_new_tokens": NEW})
            assert r.status_code == 200, r.text
            for x, gen in zip(PROMPTS, r.json()["generations"]):
                text, n = reference(setup, task, x)
                assert gen["text"] == text and gen["tokens"] == n
        r = c.post("/v1/predict", json={"task": "chat", "inputs": ["x"]})
        assert r.status_code == 400 and r.json()["error"]["type"] == "wrong_endpoint"


def test_bitfit_serve_gguf_file_option(setup, monkeypatch):
    import bitfit.serving.app

    apps = []
    monkeypatch.setattr(bitfit.serving.app, "serve", lambda app, **kw: apps.append(app))
    assert main(["serve", "--model", str(setup["root"]), "--gguf-file", "tiny-llama.Q8_0.gguf", "--threads", "1",
                 "--task", f"chat={setup['tasks']['chat']}"]) == 0
    (app,) = apps
    assert app.state.generative and app.state.bank.tasks == ["chat"]
    assert type(app.state.bank.base).__name__ == "LlamaForCausalLM"


def test_bitfit_serve_without_model_uses_the_recorded_base(setup, monkeypatch, capsys):
    """Like eval/generate, `bitfit serve` takes the base (the GGUF file) from the run folders' task.json."""
    import bitfit.serving.app

    apps = []
    monkeypatch.setattr(bitfit.serving.app, "serve", lambda app, **kw: apps.append(app))
    assert main(["serve", "--threads", "1", "--task", f"chat={setup['tasks']['chat']}"]) == 0
    (app,) = apps
    assert type(app.state.bank.base).__name__ == "LlamaForCausalLM"
    assert f"over {setup['path']}" in capsys.readouterr().out
    # a bitfit.save folder records no run: --model is needed
    assert main(["serve", "--task", f"echo={setup['tasks']['echo']}"]) == 1
    assert "--model is required" in capsys.readouterr().err


def test_bitfit_merge_gguf_run_with_its_folder_as_model(setup, tmp_path, monkeypatch, capsys):
    """`bitfit merge RUN --model FOLDER` loads the GGUF file the run records inside FOLDER (it used to load the
    folder without it and fail: no config.json); a merge that fails while writing leaves nothing behind."""
    import transformers

    import bitfit.cli.commands.merge as merge_cmd

    out = tmp_path / "merged"
    capsys.readouterr()
    # the run trained norm biases a LLaMA cannot hold: refused by the merge itself, after the GGUF base loaded
    assert main(["merge", setup["tasks"]["chat"], "--model", str(setup["root"]), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "LlamaRMSNorm has no bias parameter" in err and "not a model folder" not in err
    assert not out.exists()
    # a failure while saving: no half-written folder at --output, no temporary folder left beside it
    monkeypatch.setattr(bitfit, "merge", lambda model: copy.deepcopy(setup["own"]["echo"]))

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(BitFitError, match="writing the merged model failed \\(disk full\\); nothing was written"):
        merge_cmd.merge_run(setup["tasks"]["chat"], str(out))
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "x").write_text("")
    assert main(["merge", setup["tasks"]["chat"], "--output", str(out)]) == 1  # not empty: refused
    assert "not an empty folder" in capsys.readouterr().err
