"""Initialisation of the biases add_missing adds: zero keeps the outputs, 'normal' / 'uniform' draw
seeded values (own generator), exact counts, save / load / merge / unmerge exact with a random init, a falling
loss, one-line errors, and `bitfit train --added_bias_init`."""

import json

import pytest
import torch
from families import logits_of, make

import bitfit
from bitfit.core.config import BitFitConfig
from bitfit.errors import BitFitConfigError
from bitfit.core.prepare import init_added_bias

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*have no bias")]
# q k v o gate up down and 2 norms per layer, and the final norm
LLAMA_ADDED = 2 * (16 + 8 + 8 + 16 + 32 + 32 + 16 + 16 + 16) + 16


def _count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _added(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}


def _lm_batch(seed=2):
    ids = torch.randint(3, 50, (4, 9), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _lm_train(model, steps=5, lr=1e-2):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(**_lm_batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def test_zero_default_keeps_outputs_and_random_init_is_seeded():
    base = logits_of(make("llama"), "llama")
    zero = bitfit.apply(make("llama"), add_missing=True)
    assert torch.equal(logits_of(zero, "llama"), base)  # x + 0 == x: bit for bit
    assert all(not v.any() for v in _added(zero).values())

    a = bitfit.apply(make("llama"), add_missing=True, added_bias_init="normal", added_bias_init_std=1e-2,
                     added_bias_init_seed=3)
    b = bitfit.apply(make("llama"), add_missing=True, added_bias_init="normal", added_bias_init_std=1e-2,
                     added_bias_init_seed=3)
    c = bitfit.apply(make("llama"), add_missing=True, added_bias_init="normal", added_bias_init_std=1e-2,
                     added_bias_init_seed=4)
    va, vb, vc = _added(a), _added(b), _added(c)
    assert va.keys() == vb.keys() and all(torch.equal(va[n], vb[n]) for n in va)  # same seed: the same draw
    assert not any(torch.equal(va[n], vc[n]) for n in va)
    flat = torch.cat([v.reshape(-1) for v in va.values()])
    assert flat.numel() == LLAMA_ADDED and 0.8e-2 < flat.std().item() < 1.2e-2 and abs(flat.mean().item()) < 2e-3
    assert not torch.equal(logits_of(a, "llama"), base)  # a random init changes the outputs before training
    assert _count(a) == _count(zero) == LLAMA_ADDED  # the init does not change what trains
    assert bitfit.report(a).trainable == LLAMA_ADDED

    # seed None: torch.initial_seed() (what torch.manual_seed set), and the global random state is untouched
    torch.manual_seed(11)
    d = _added(bitfit.apply(make("llama"), add_missing=True, added_bias_init="uniform"))
    torch.manual_seed(11)
    e = _added(bitfit.apply(make("llama"), add_missing=True, added_bias_init="uniform"))
    assert all(torch.equal(d[n], e[n]) for n in d)
    state = torch.get_rng_state()
    init_added_bias(torch.zeros(5), BitFitConfig(add_missing=True, added_bias_init="normal"),
                    torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # own generator: the global state is not consumed
    flat = torch.cat([v.reshape(-1) for v in d.values()])
    bound = 1e-3 * 3 ** 0.5  # uniform with the default std 1e-3
    assert flat.abs().max().item() <= bound and 0.8e-3 < flat.std().item() < 1.2e-3


def test_only_the_trained_slice_of_a_fused_added_bias_is_drawn():
    cfg = BitFitConfig(add_missing=True, added_bias_init="normal", added_bias_init_std=0.5)
    whole, part = torch.zeros(6), torch.zeros(6)
    init_added_bias(whole, cfg, torch.Generator().manual_seed(1))
    init_added_bias(part, cfg, torch.Generator().manual_seed(1), idx=torch.tensor([0, 1]))
    assert torch.equal(part[:2], whole[:2]) and not part[2:].any() and whole[2:].all()


def test_save_load_merge_unmerge_exact_with_a_random_init(tmp_path):
    """The artifact holds the trained value (init + update) of each added bias; load, merge and unmerge are as
    exact as with zero init. preset 'attention': LLaMA's attention_bias switch gives q/k/v/o a place on merge."""
    model = make("llama")
    bitfit.apply(model, preset="attention", add_missing=True, added_bias_init="normal", added_bias_init_std=1e-2,
                 added_bias_init_seed=0)
    init = _added(model)
    _lm_train(model, steps=3)
    trained_values = _added(model)
    assert all(not torch.equal(init[n], trained_values[n]) for n in init)
    trained = logits_of(model, "llama")
    bitfit.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "bitfit_config.json").read_text())
    assert meta["format_version"] == 1 and meta["bitfit_config"]["add_missing"] is True
    assert not any(k.startswith("added_bias_init") for k in meta["bitfit_config"])  # older bitfits read it
    loaded = bitfit.load(make("llama"), tmp_path / "a")
    assert torch.equal(logits_of(loaded, "llama"), trained)
    got = _added(loaded)
    assert all(torch.equal(got[n], trained_values[n]) for n in trained_values)
    merged = bitfit.merge(bitfit.load(make("llama"), tmp_path / "a"))
    assert merged.config.attention_bias is True and bitfit.get_state(merged) is None
    assert torch.equal(logits_of(merged, "llama"), trained)
    params = dict(merged.named_parameters())
    assert all(torch.equal(params[n], trained_values[n]) for n in trained_values)  # the final bias = init + update
    bitfit.unmerge(loaded)
    assert torch.equal(logits_of(loaded, "llama"), logits_of(make("llama"), "llama"))
    assert not any(n.endswith("bias") for n, _ in loaded.named_parameters())


def test_loss_falls_with_a_random_init():
    model = bitfit.apply(make("llama"), add_missing=True, added_bias_init="normal", added_bias_init_seed=0)
    losses = _lm_train(model, steps=8, lr=3e-2)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("options, message", [
    (dict(add_missing=True, added_bias_init="gaussian"), "added_bias_init='gaussian' is not supported; use one of zero"),
    (dict(add_missing=True, added_bias_init_std=1e-3), "added_bias_init_std applies to a random added_bias_init"),
    (dict(add_missing=True, added_bias_init_seed=1), "added_bias_init_seed applies to a random added_bias_init"),
    (dict(added_bias_init="normal"), "initialises the biases add_missing adds; pass add_missing=True"),
    (dict(add_missing=True, added_bias_init="normal", added_bias_init_std=0.0), "must be a finite number > 0"),
    (dict(add_missing=True, added_bias_init="normal", added_bias_init_std=float("nan")), "finite number > 0"),
    (dict(add_missing=True, added_bias_init="normal", added_bias_init_std="1e-3"), "finite number > 0"),
    (dict(add_missing=True, added_bias_init="uniform", added_bias_init_seed=-1), "an int >= 0"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(BitFitConfigError, match=message.replace("(", r"\(")):
        BitFitConfig(**options)
    with pytest.raises(BitFitConfigError, match=message.replace("(", r"\(")):
        bitfit.apply(make("llama"), **options)


from test_instruct import llama_dir  # noqa: E402,F401  (the tiny LLaMA folder with a tokenizer)


def test_bitfit_train_flag_is_seeded_and_implies_add_missing(llama_dir, tmp_path, capsys):
    import safetensors.torch
    from test_instruct import EXAMPLES

    from bitfit.cli import main
    from bitfit.training.arguments import ModelArguments
    from bitfit.training.base import bitfit_config

    cfg = bitfit_config(ModelArguments(added_bias_init="normal", added_bias_init_std=1e-2))
    assert cfg.add_missing and cfg.added_bias_init == "normal" and cfg.added_bias_init_std == 1e-2
    with pytest.raises(BitFitConfigError, match="added_bias_init_std applies"):
        bitfit_config(ModelArguments(added_bias_init_std=1e-2))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES * 2))

    def run(name, seed):
        out = tmp_path / name
        assert main(["train", "--model", llama_dir, "--task", "instruct", "--train-file", str(data),
                     "--output-dir", str(out), "--max_steps", "2", "--learning_rate", "1e-8",
                     "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--seed", str(seed),
                     "--frozen-dtype", "float32", "--added_bias_init", "normal", "--added_bias_init_std", "1e-2"]) == 0
        t = safetensors.torch.load_file(str(out / "bitfit_model.safetensors"))
        return {k: v for k, v in t.items() if k.startswith("bias:")}

    saved = run("a", 3)
    assert "adding zero-initialised biases" not in capsys.readouterr().err  # --added_bias_init asked for them
    import transformers as T

    torch.manual_seed(3)  # what --seed 3 did before the biases were added: the same draw in Python
    drawn = bitfit.apply(T.AutoModelForCausalLM.from_pretrained(llama_dir), add_missing=True,
                         added_bias_init="normal", added_bias_init_std=1e-2)
    want = {f"bias:{n}": p.detach() for n, p in drawn.named_parameters() if p.requires_grad}
    assert saved.keys() == want.keys()
    for k in want:  # lr 1e-8 for 2 steps: the saved biases are the draw
        torch.testing.assert_close(saved[k], want[k], atol=1e-6, rtol=0)
    flat = torch.cat([v.reshape(-1) for v in saved.values()])
    assert 0.8e-2 < flat.std().item() < 1.2e-2
    cmd = json.loads((tmp_path / "a" / "command.json").read_text())
    assert cmd["model_args"]["added_bias_init"] == "normal" and cmd["model_args"]["added_bias_init_std"] == 1e-2
