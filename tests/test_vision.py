"""BitFit beyond text: a vision transformer (ViT) and a CLIP dual encoder (both towers), on tiny random models.

Expected counts come from the config dimensions, never from the library.
"""

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers as T
from families import inputs_for, make

import bitfit
from bitfit.methods.clip import ZeroShotClassifier, class_prompts, set_label_names
from bitfit.errors import ArtifactError

BIAS_ROLES = ("query", "key", "value", "attn_out", "ln_attn", "ffn_in", "ffn_out", "ln_ffn")


# ------------------------------------------------------------------------------------------------ ViT
def vit_expected(cfg, preset):
    H, I, L, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_labels
    every = {r: L * H for r in BIAS_ROLES}
    every["ffn_in"] = L * I
    every["embed_proj"] = H  # the patch embedding conv
    every["final_ln"] = H  # vit.layernorm
    keep = {
        "all": every,
        "paper-subset": ("query", "ffn_in"),
        "attention": ("query", "key", "value", "attn_out"),
        "ffn": ("ffn_in", "ffn_out"),
        "layernorm": ("ln_attn", "ln_ffn", "final_ln"),
        "none": (),
    }[preset]
    return {r: c for r, c in every.items() if r in keep}, H * n + n  # biases by role, classifier


@pytest.mark.parametrize("preset", ["all", "paper-subset", "attention", "ffn", "layernorm", "none"])
def test_vit_presets_count_exactly(preset):
    model = make("vit")
    bitfit.apply(model, preset=preset)
    rep = bitfit.report(model)
    roles, head = vit_expected(model.config, preset)
    assert {r: c["trainable"] for r, c in rep.by_role.items() if r != "head" and c["trainable"]} == roles
    assert rep.head == head and rep.other == [] and not rep.generic
    assert rep.trainable == sum(roles.values()) + head == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_vit_every_bias_has_a_role():
    model = make("vit")
    mm = bitfit.discover(model)
    slots = {s.name: list(s.roles) for s in mm.slots}
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias") and not n.startswith("classifier.")]
    assert sorted(slots) == sorted(biases)
    assert "other" not in {r for rs in slots.values() for r in rs}
    assert slots["vit.embeddings.patch_embeddings.projection.bias"] == ["embed_proj"]
    by_end = {n.rsplit("layers.1.", 1)[-1].rsplit("layer.1.", 1)[-1]: r for n, r in slots.items() if ".1." in n}
    # module names differ across transformers versions (attention.attention.query / attention.q_proj)
    assert sorted(r for rs in by_end.values() for r in rs) == sorted(BIAS_ROLES)
    assert by_end["layernorm_before.bias"] == ["ln_attn"] and by_end["layernorm_after.bias"] == ["ln_ffn"]
    assert slots["vit.layernorm.bias"] == ["final_ln"]
    assert mm.head_params == ["classifier.weight", "classifier.bias"]


def test_vit_step_changes_only_biases_and_head():
    model = bitfit.apply(make("vit"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    model(**inputs_for("vit", batch=4), labels=torch.tensor([0, 1, 1, 0])).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed <= trainable
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in trainable)
    # every trained bias moved, except perhaps b_k: its gradient is zero under softmax attention (up to rounding)
    keys = {s.name for s in bitfit.get_state(model).model_map.slots if "key" in s.roles}
    assert len(keys) == model.config.num_hidden_layers and trainable - changed <= keys


def _trained(model, family, steps=3):
    from families import train_steps

    train_steps(model, family, steps=steps)
    return model


def test_vit_save_load_bit_exact(tmp_path):
    model = _trained(bitfit.apply(make("vit"), preset="paper-subset"), "vit")
    with torch.no_grad():
        ref = model(**inputs_for("vit")).logits
    bitfit.save(model, tmp_path / "a")
    loaded = bitfit.load(make("vit"), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(**inputs_for("vit")).logits, ref)
    with pytest.raises(ArtifactError, match="fingerprint"):
        bitfit.load(make("vit", seed=1), tmp_path / "a")


# ------------------------------------------------------------------------------------------------ CLIP
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
            max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
VISION = dict(hidden_size=12, intermediate_size=20, num_hidden_layers=3, num_attention_heads=2, image_size=8,
              patch_size=4)
PROJ = 8


def make_clip(seed=0):
    """A tiny random CLIPModel whose towers differ in width and depth (so their counts tell them apart)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.CLIPModel(T.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=PROJ)).eval()


def clip_batch(n=4, seq=6, seed=1):
    """n random image-text pairs: text i belongs to image i."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (n, seq), generator=g)
    ids[:, -1] = 2  # CLIP pools the eos token
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(n, 3, 8, 8, generator=g)}


def clip_expected():
    """(tower -> role -> count, per-layer count per tower) for preset 'all' (existing biases only)."""
    out, per_layer = {}, {}
    for tower, c in (("text", TEXT), ("vision", VISION)):
        H, I, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        roles = {r: L * H for r in BIAS_ROLES}
        roles["ffn_in"] = L * I
        roles["final_ln"] = H  # text final_layer_norm / vision post_layernorm
        if tower == "vision":
            roles["embed_ln"] = H  # pre_layrnorm
        out[tower] = roles
        per_layer[tower] = 7 * H + I
    return out, per_layer


def apply_quiet(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bitfit.apply(model, **kw)


def test_clip_counts_by_tower_and_role():
    model = make_clip()
    with pytest.warns(UserWarning, match=r"3 selected bias slots \(embed_proj, projection\) have no bias"):
        bitfit.apply(model)
    rep = bitfit.report(model)
    by_tower, per_layer = clip_expected()
    roles = {}
    for t in by_tower.values():
        for r, n in t.items():
            roles[r] = roles.get(r, 0) + n
    assert {r: c["trainable"] for r, c in rep.by_role.items() if r != "head"} == roles
    assert rep.head == 1 and bitfit.get_state(model).model_map.head_params == ["logit_scale"]
    assert rep.other == [] and not rep.generic
    assert rep.by_layer == {f"{t}.{i}": per_layer[t] for t, c in (("text", TEXT), ("vision", VISION))
                            for i in range(c["num_hidden_layers"])}
    for tower, want in by_tower.items():  # the trainable tensors of each tower, from requires_grad
        got = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith(f"{tower}_model."))
        assert got == sum(want.values())
    assert rep.trainable == sum(roles.values()) + 1 == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the projections and the patch embedding have no bias: nothing of them trains by default
    assert not any(p.requires_grad for n, p in model.named_parameters() if "projection" in n or "patch_embedding" in n)


def test_clip_layers_select_per_tower():
    model = apply_quiet(make_clip(), layers="-1:")
    _, per_layer = clip_expected()
    assert bitfit.report(model).by_layer == {"text.1": per_layer["text"], "vision.2": per_layer["vision"]}


def test_clip_add_missing_adds_zero_projection_and_patch_biases():
    model = make_clip()
    batch = clip_batch()
    with torch.no_grad():
        ref = model(**batch).logits_per_image
    bitfit.apply(model, add_missing=True, roles=["embed_proj", "projection"], train_head=False)
    rep = bitfit.report(model)
    assert rep.by_role["embed_proj"]["trainable"] == VISION["hidden_size"]
    assert rep.by_role["projection"]["trainable"] == 2 * PROJ and rep.trainable == VISION["hidden_size"] + 2 * PROJ
    assert sorted(rep.added) == ["text_projection.bias", "vision_model.embeddings.patch_embedding.bias",
                                 "visual_projection.bias"]
    with torch.no_grad():
        assert torch.equal(model(**batch).logits_per_image, ref)  # zero biases: outputs unchanged
    # CLIPConfig has no switch for those biases: merge refuses and leaves the model as it was
    with pytest.raises(ArtifactError, match="no switch of its config"):
        bitfit.merge(model)


@pytest.mark.parametrize("train_head", [True, False], ids=["logit_scale-trains", "logit_scale-frozen"])
def test_clip_contrastive_loss_falls_and_only_biases_move(train_head):
    model = apply_quiet(make_clip(), train_head=train_head)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = clip_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch, return_loss=True).loss  # CLIP's symmetric image-text contrastive loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.1, losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert all(n.endswith(".bias") for n in changed - {"logit_scale"})
    assert ("logit_scale" in changed) is train_head
    weights = [n for n in before if not n.endswith(".bias") and n != "logit_scale"]
    assert weights and not changed & set(weights)  # every weight bit-identical


def train_zero_shot(model, steps=10):
    """BitFit as a zero-shot classifier: 3 classes, one text prompt each, 6 random images."""
    batch = clip_batch(n=3, seed=2)
    clf = ZeroShotClassifier(model, {k: batch[k] for k in ("input_ids", "attention_mask")},
                             label_names=["cat", "dog", "bird"])
    g = torch.Generator().manual_seed(3)
    images, labels = torch.randn(6, 3, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
    clf.train()
    losses = []
    for _ in range(steps):
        out = clf(images, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    clf.eval()
    return clf, images, losses


def test_clip_zero_shot_head_trains_saves_loads_merges(tmp_path):
    model = apply_quiet(make_clip())
    clf, images, losses = train_zero_shot(model)
    assert losses[-1] < 0.92 * losses[0], losses
    with torch.no_grad():
        ref = clf(images).logits
    assert ref.shape == (6, 3)
    batch = clip_batch()
    with torch.no_grad():
        ref_pairs = model(**batch).logits_per_image
    bitfit.save(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "bitfit_config.json").read_text())
    assert meta["head"]["params"] == {"logit_scale": []}
    assert meta["head"]["id2label"] == {"0": "cat", "1": "dog", "2": "bird"}

    loaded = bitfit.load(make_clip(), tmp_path / "a")
    assert loaded.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
    again = ZeroShotClassifier(loaded, clf.class_inputs)
    with torch.no_grad():
        assert torch.equal(again(images).logits, ref)
        assert torch.equal(loaded(**batch).logits_per_image, ref_pairs)

    bitfit.merge(loaded)
    assert bitfit.get_state(loaded) is None and all(p.requires_grad for p in loaded.parameters())
    loaded.save_pretrained(tmp_path / "merged")
    plain = T.CLIPModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits_per_image, ref_pairs)


def test_clip_fingerprint_refuses_another_base(tmp_path):
    model = apply_quiet(make_clip())
    train_zero_shot(model, steps=1)
    bitfit.save(model, tmp_path / "a")
    other = make_clip(seed=1)
    with pytest.raises(ArtifactError, match=r"fingerprint .* differ"):
        bitfit.load(other, tmp_path / "a")
    assert bitfit.get_state(other) is None  # refused before touching it
    # the fingerprint is the same over the towers whether or not BitFit is applied, and ignores logit_scale
    fresh = make_clip()
    with torch.no_grad():
        fresh.logit_scale.fill_(1.0)
    from bitfit.artifacts import fingerprint

    assert fingerprint(fresh) == fingerprint(model)


CLIP_PARTS = {
    "CLIPVisionModel": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**VISION)),
    "CLIPTextModel": lambda: T.CLIPTextModel(T.CLIPTextConfig(**TEXT)),
    "CLIPVisionModelWithProjection": lambda: T.CLIPVisionModelWithProjection(
        T.CLIPVisionConfig(**VISION, projection_dim=PROJ)),
    "CLIPTextModelWithProjection": lambda: T.CLIPTextModelWithProjection(T.CLIPTextConfig(**TEXT, projection_dim=PROJ)),
    "CLIPForImageClassification": lambda: T.CLIPForImageClassification(
        T.CLIPConfig(text_config=TEXT, vision_config=VISION, num_labels=3)),
}


@pytest.mark.parametrize("name", list(CLIP_PARTS))
def test_clip_single_towers_and_classifier(name):
    """One tower alone: every bias placed; a pretrained projection is body, never a head; a classifier is the head."""
    torch.manual_seed(0)
    model = apply_quiet(CLIP_PARTS[name]())
    rep = bitfit.report(model)
    by_tower, _ = clip_expected()
    tower = "text" if "Text" in name else "vision"
    assert rep.other == [] and not rep.generic
    assert {r: c["trainable"] for r, c in rep.by_role.items() if r != "head"} == by_tower[tower]
    H, n = VISION["hidden_size"], 3
    assert rep.head == (H * n + n if name == "CLIPForImageClassification" else 0)
    assert not any(p.requires_grad for k, p in model.named_parameters() if "projection" in k)


def test_zero_shot_helpers():
    seen = {}

    def tokenizer(texts, padding, return_tensors):  # what a CLIPTokenizer is called with
        seen["texts"] = texts
        ids = torch.arange(len(texts) * 3).view(len(texts), 3)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": ids * 0}

    enc = class_prompts(tokenizer, ["cat", "dog"], template="a photo of a {}, a pet.")
    assert seen["texts"] == ["a photo of a cat, a pet.", "a photo of a dog, a pet."]
    assert sorted(enc) == ["attention_mask", "input_ids"]
    model = make_clip()
    set_label_names(model, ["cat", "dog"])
    assert model.config.num_labels == 2 and model.config.label2id == {"cat": 0, "dog": 1}
    with pytest.raises(bitfit.BitFitError, match="3 label names for 2 class prompts"):
        ZeroShotClassifier(model, enc, label_names=["a", "b", "c"])


# ------------------------------------------------------------------------------------------------ merge
def test_vit_merge_gives_identical_logits(tmp_path):
    model = _trained(bitfit.apply(make("vit")), "vit")
    x = inputs_for("vit")
    with torch.no_grad():
        ref = model(**x).logits
    bitfit.merge(model)
    assert bitfit.get_state(model) is None
    model.save_pretrained(tmp_path / "vit")
    plain = T.ViTForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        assert torch.equal(plain(**x).logits, ref)


@pytest.mark.slow
def test_merged_vit_and_clip_load_without_bitfit(tmp_path):
    """A fresh interpreter that never imports bitfit loads the merged folders and reproduces the outputs."""
    from safetensors.torch import save_file

    jobs = []
    vit = _trained(bitfit.apply(make("vit")), "vit")
    clip = apply_quiet(make_clip())
    train_zero_shot(clip, steps=2)
    for name, model, auto, inputs, out in (
        ("vit", vit, "ViTForImageClassification", inputs_for("vit"), "logits"),
        ("clip", clip, "CLIPModel", clip_batch(), "logits_per_image"),
    ):
        with torch.no_grad():
            ref = getattr(model(**inputs), out)
        folder = tmp_path / name
        bitfit.merge(model).save_pretrained(folder)
        save_file({**inputs, "ref": ref.contiguous()}, str(folder / "check.safetensors"))
        jobs.append((str(folder), auto, out))
    script = textwrap.dedent(
        """
        import json, sys, torch, transformers
        from safetensors.torch import load_file
        torch.set_num_threads(1)
        out = {}
        for folder, auto, key in json.loads(sys.argv[1]):
            model = getattr(transformers, auto).from_pretrained(folder).eval()
            data = load_file(folder + "/check.safetensors")
            ref = data.pop("ref")
            with torch.no_grad():
                out[folder] = float((getattr(model(**data), key) - ref).abs().max())
        assert not any(m == "bitfit" or m.startswith("bitfit.") for m in sys.modules)
        print(json.dumps(out))
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "PYTHONNOUSERSITE": "1"}
    res = subprocess.run([sys.executable, "-I", "-c", script, json.dumps(jobs)], capture_output=True, text=True,
                         env=env, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    errors = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(errors) == 2 and all(err < 1e-6 for err in errors.values()), errors
