"""bitfit.merge: a plain transformers model that loads without bitfit; refusals; unmerge."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from families import inputs_for, logits_of
from test_artifact import base, snapshot, train

import bitfit
from bitfit.errors import ArtifactError

# family, apply options, Auto class that must load the saved folder, config switches expected
MERGEABLE = [
    ("bert", dict(), "AutoModelForSequenceClassification", {}),
    ("gpt2", dict(preset="paper-subset"), "AutoModelForSequenceClassification", {}),  # fused slice
    ("bart", dict(roles=["query", "ln_ffn", "cross_value"]), "AutoModelForSequenceClassification", {}),
    # only q added: attention_bias also gives k, v, o biases, which are zero
    ("llama", dict(roles=["query"], add_missing=True), "AutoModelForCausalLM", {"attention_bias": True}),
    ("llama", dict(roles=["value", "ffn_out"], add_missing=True), "AutoModelForCausalLM",
     {"attention_bias": True, "mlp_bias": True}),
    ("qwen2", dict(roles=["query", "key"]), "AutoModelForSequenceClassification", {}),
]


def _plain(m):
    assert bitfit.get_state(m) is None
    assert not hasattr(m, "_bitfit_lean")
    assert "forward" not in m.__dict__
    for mod in m.modules():
        assert not hasattr(mod, "parametrizations")
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert all(p.requires_grad for p in m.parameters())


@pytest.mark.slow
def test_merge_and_load_without_bitfit(tmp_path):
    folders = []
    for i, (family, kw, auto, switches) in enumerate(MERGEABLE):
        m = train(bitfit.apply(base(family), **kw))
        ref = logits_of(m, family)
        merged = bitfit.merge(m)
        assert merged is m
        _plain(merged)
        assert torch.allclose(logits_of(merged, family), ref, atol=1e-6)
        for k, v in switches.items():
            assert getattr(merged.config, k) is v
        if family == "llama" and "query" in kw["roles"]:
            attn = merged.model.layers[1].self_attn
            assert torch.count_nonzero(attn.q_proj.bias) > 0
            assert torch.count_nonzero(attn.k_proj.bias) == 0 and torch.count_nonzero(attn.o_proj.bias) == 0
        folder = tmp_path / f"m{i}"
        merged.save_pretrained(folder)
        from safetensors.torch import save_file

        save_file({**{k: v.contiguous() for k, v in inputs_for(family).items()}, "ref": ref.contiguous()},
                  str(folder / "check.safetensors"))
        folders.append((str(folder), auto))
    # a fresh interpreter that never imports bitfit loads each folder and reproduces the outputs
    script = textwrap.dedent(
        """
        import json, sys, torch, transformers
        from safetensors.torch import load_file
        out = {}
        for folder, auto in json.loads(sys.argv[1]):
            model = getattr(transformers, auto).from_pretrained(folder).eval()
            data = load_file(folder + "/check.safetensors")
            ref = data.pop("ref")
            with torch.no_grad():
                logits = model(**data).logits
            out[folder] = float((logits - ref).abs().max())
        assert not any(m == "bitfit" or m.startswith("bitfit.") for m in sys.modules)
        print(json.dumps(out))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "2", "PYTHONNOUSERSITE": "1"}
    res = subprocess.run([sys.executable, "-I", "-c", script, json.dumps(folders)], capture_output=True,
                         text=True, env=env, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    errors = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(errors) == len(MERGEABLE)
    for folder, err in errors.items():
        assert err < 1e-5, (folder, err)


def test_merge_after_load(tmp_path):
    m = train(bitfit.apply(base("gpt2"), preset="paper-subset"))
    bitfit.save(m, tmp_path / "a")
    loaded = bitfit.load(base("gpt2"), tmp_path / "a")
    merged = bitfit.merge(loaded)
    _plain(merged)
    assert torch.equal(logits_of(merged, "gpt2"), logits_of(m, "gpt2"))


REFUSED = [
    ("llama", dict(roles=["query", "ln_attn"], add_missing=True), r"LlamaRMSNorm has no bias"),
    ("t5", dict(roles=["query"], add_missing=True), r"no switch of its config"),
    ("qwen2", dict(roles=["attn_out"], add_missing=True), r"o_proj"),
]


@pytest.mark.parametrize("family,kw,msg", REFUSED, ids=[r[0] for r in REFUSED])
def test_merge_refuses_what_the_architecture_cannot_hold(family, kw, msg):
    m = train(bitfit.apply(base(family), **kw))
    before, state = snapshot(m), bitfit.get_state(m)
    ref = logits_of(m, family)
    cfg = m.config.to_dict()
    with pytest.raises(ArtifactError, match=msg) as e:
        bitfit.merge(m)
    assert "keep the artifact form" in str(e.value)
    assert bitfit.get_state(m) is state
    after = snapshot(m)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)
    assert torch.equal(logits_of(m, family), ref)
    assert m.config.to_dict() == cfg


def test_merge_needs_bitfit_model():
    with pytest.raises(ArtifactError, match="no BitFit state"):
        bitfit.merge(base("bert"))


def test_unmerge_after_training_and_reapply(tmp_path):
    ref = snapshot(base("qwen2"))
    m = train(bitfit.apply(base("qwen2"), add_missing=True, roles=["query", "attn_out", "ln_ffn"]))
    bitfit.unmerge(m)
    assert m.model.layers[0].self_attn.o_proj.bias is None
    assert not hasattr(m.model.layers[0].post_attention_layernorm, "bias")
    after = snapshot(m)
    assert after.keys() == ref.keys() and all(torch.equal(after[k], ref[k]) for k in ref)
