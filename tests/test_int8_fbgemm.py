"""frozen_dtype="int8-fbgemm": fbgemm int8 training matmuls with row-wise scales on float32 frozen weights.

Numerics are pinned against float32 on tiny models (forward and input gradient within a few per cent, the
bias gradient exact, evaluation bit-identical); ``auto``'s choice among all modes is tested on faked probe
tables, without timing anything. Tests that run the kernels skip where PyTorch has no fbgemm engine.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import bitfit
from bitfit.errors import BitFitConfigError
from bitfit.fast import hardware, int8_fbgemm
from bitfit.fast.lean import get_lean, remove
from families import inputs_for, make

fbgemm = pytest.mark.skipif(not int8_fbgemm.available(), reason="PyTorch's fbgemm quantized engine is not available")

# Stated tolerances: one int8 matmul with row-wise 8-bit (VNNI) or 7-bit-weight (AVX2) quantisation is within
# MATMUL_TOL of float32 in relative Frobenius error; a tiny model's gradient, after several such matmuls,
# within GRAD_TOL (bf16 autocast is about as far off on these models).
MATMUL_TOL, GRAD_TOL = 0.03, 0.1


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------ the kernel


@fbgemm
def test_matmuls_match_float32_and_the_bias_gradient_is_exact():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.05
    levels = int8_fbgemm.weight_levels()
    fwd, bwd = int8_fbgemm.pack_weight(w, levels), int8_fbgemm.pack_weight(w.t(), levels)
    x = torch.randn(3, 5, 64, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    y = int8_fbgemm.FbgemmMatmuls.apply(x, b, fwd, bwd, torch.float32)
    ref = x @ w.t() + b
    assert y.shape == (3, 5, 48) and y.dtype == torch.float32
    assert _rel(y, ref) < MATMUL_TOL
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    assert torch.equal(gb, g.reshape(-1, 48).sum(0))  # the bias gradient: the float32 sum, exactly
    assert gx.shape == x.shape and _rel(gx, g @ w) < MATMUL_TOL


@fbgemm
def test_rows_of_very_different_size_each_keep_their_precision():
    """linear_dynamic scales a whole tensor at once; the row-wise scaling keeps small rows (tokens, or
    gradient rows) as precise as large ones."""
    torch.manual_seed(1)
    w = torch.randn(96, 128) * 0.05
    packed = int8_fbgemm.pack_weight(w, int8_fbgemm.weight_levels())
    x = torch.randn(6, 128) * torch.tensor([1e-4, 1e-2, 1.0, 30.0, 1e3, 1.0])[:, None]
    ref = x @ w.t()
    rowwise = int8_fbgemm.rowwise_linear(x, packed)
    per_tensor = torch.ops.quantized.linear_dynamic(x, packed, False)
    for r in range(6):
        assert _rel(rowwise[r], ref[r]) < MATMUL_TOL, r
    assert _rel(per_tensor[0], ref[0]) > 0.5  # one scale for all rows: the small rows are lost


_SATURATION_CHECK = """
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("int8_fbgemm", sys.argv[1])  # torch only: a fast start
int8_fbgemm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(int8_fbgemm)
levels = int8_fbgemm.weight_levels()
w = torch.full((32, 512), 0.5)
x = torch.ones(8, 512)
x[:, 1] = -1.0
y = int8_fbgemm.rowwise_linear(x, int8_fbgemm.pack_weight(w, levels))
ref = x @ w.t()
print(int8_fbgemm.available(), levels, float((y - ref).norm() / ref.norm()))
"""


@fbgemm
@pytest.mark.parametrize("isa", [None, "AVX2"])
def test_the_weight_range_never_saturates_fbgemm(isa):
    """Full-range operands overflow vpmaddubsw's int16 pair sums on CPUs without VNNI; the weights' range
    is chosen so the worst case stays exact on the kernel fbgemm runs (AVX2 forced with fbgemm's
    FBGEMM_ENABLE_INSTRUCTIONS, in a fresh process: fbgemm reads it once), and the mode stays available."""
    env = dict(os.environ)
    if isa:
        env["FBGEMM_ENABLE_INSTRUCTIONS"] = isa
    out = subprocess.run([sys.executable, "-c", _SATURATION_CHECK, int8_fbgemm.__file__], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ok, levels, err = out.stdout.split()
    assert ok == "True" and int(levels) in (63, 127) and float(err) < 0.02, out.stdout


# ------------------------------------------------------------------ the mode on a model


def _pair(family="bert"):
    ref = make(family)
    m8, m32 = copy.deepcopy(ref), copy.deepcopy(ref)
    bitfit.apply(m8, frozen_dtype="int8-fbgemm")
    bitfit.apply(m32, frozen_dtype="float32")
    return m8, m32


def _grads(model, batch, labels):
    model.train()
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0  # the int8 path draws dropout masks differently: compare without dropout
    model.zero_grad()
    model(**batch, labels=labels).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@fbgemm
def test_frozen_linears_train_on_fbgemm_and_everything_else_stays_float32():
    m8, _ = _pair()
    state = get_lean(m8)
    linears = [n for n, mod in m8.named_modules() if isinstance(mod, nn.Linear) and not mod.weight.requires_grad]
    assert sorted(state.int8_fbgemm) == sorted(linears) and len(linears) == 2 * 6 + 1  # 2 layers x 6, pooler
    assert state.frozen_dtype is None and not state.int8  # no autocast, no bf16 weights
    assert all(p.dtype == torch.float32 for p in m8.parameters())
    assert not [k for k in m8.state_dict() if "int8" in k or "fbgemm" in k]
    assert any("int8 training matmuls on fbgemm in 13 frozen Linear layers" in m for m in bitfit.report(m8).modes)


@fbgemm
def test_bf16_loaded_base_is_cast_to_float32():
    model = make("bert").to(torch.bfloat16)
    bitfit.apply(model, frozen_dtype="int8-fbgemm")
    assert all(p.dtype == torch.float32 for p in model.parameters())


@fbgemm
def test_eval_is_the_float32_path_and_training_gradients_are_close():
    m8, m32 = _pair()
    batch = inputs_for("bert", batch=4)
    labels = torch.tensor([0, 1, 1, 0])
    for m in (m8, m32):
        m.eval()
    with torch.no_grad():
        assert torch.equal(m8(**batch).logits, m32(**batch).logits)
    g8, g32 = _grads(m8, batch, labels), _grads(m32, batch, labels)
    assert g8.keys() == g32.keys() and all(g.dtype == torch.float32 for g in g8.values())
    flat8, flat32 = torch.cat([g.flatten() for g in g8.values()]), torch.cat([g.flatten() for g in g32.values()])
    assert _rel(flat8, flat32) < GRAD_TOL
    top = max(g.norm() for g in g32.values())
    for name, g in g32.items():
        if g.norm() > 0.05 * top:  # the gradients that matter, each in the float32 direction
            assert _rel(g8[name], g) < GRAD_TOL, name
    assert not torch.equal(flat8, flat32)  # the int8 kernels did run


@fbgemm
def test_the_packed_weight_follows_a_changed_weight_and_copies_pack_their_own():
    m8, m32 = _pair()
    batch, labels = inputs_for("bert", batch=4), torch.tensor([0, 1, 1, 0])
    for m in (m8, m32):
        with torch.no_grad():
            m.bert.encoder.layer[0].intermediate.dense.weight.mul_(3.0)  # in place: a stale pack would not see it
    g8, g32 = _grads(m8, batch, labels), _grads(m32, batch, labels)
    assert _rel(g8["bert.encoder.layer.0.intermediate.dense.bias"], g32["bert.encoder.layer.0.intermediate.dense.bias"]) < GRAD_TOL
    clone = copy.deepcopy(m8)
    assert len(get_lean(clone).int8_fbgemm) == 13
    gc = _grads(clone, batch, labels)
    assert all(torch.equal(gc[n], g8[n]) for n in g8)  # same packing, same numbers


@fbgemm
def test_save_load_and_merge_are_the_float32_paths(tmp_path):
    m8, m32 = _pair()
    m8.train()
    opt = torch.optim.AdamW([p for p in m8.parameters() if p.requires_grad], lr=1e-2)
    batch, labels = inputs_for("bert", batch=4), torch.tensor([0, 1, 1, 0])
    for _ in range(3):
        opt.zero_grad()
        m8(**batch, labels=labels).loss.backward()
        opt.step()
    with torch.no_grad():  # the float32 model with the same trained values
        trained = dict(m8.named_parameters())
        for n, p in m32.named_parameters():
            if p.requires_grad:
                p.copy_(trained[n])
    bitfit.save(m8, tmp_path / "int8")
    bitfit.save(m32, tmp_path / "fp32")
    from safetensors import safe_open

    tensors = []
    for run in ("int8", "fp32"):
        with safe_open(str(tmp_path / run / "bitfit_model.safetensors"), "pt") as f:
            tensors.append((f.metadata(), {k: f.get_tensor(k) for k in f.keys()}))
    (meta8, t8), (meta32, t32) = tensors
    assert meta8 == meta32 and t8.keys() == t32.keys()  # the same artifact
    assert all(t8[k].dtype == t32[k].dtype and torch.equal(t8[k], t32[k]) for k in t8)
    assert (tmp_path / "int8" / "bitfit_model.safetensors").read_bytes() == \
        (tmp_path / "fp32" / "bitfit_model.safetensors").read_bytes()  # with its keys sorted: byte for byte
    config = json.loads((tmp_path / "int8" / "bitfit_config.json").read_text())["bitfit_config"]
    assert config["frozen_dtype"] == "int8-fbgemm"
    m8.eval()
    batch_eval = inputs_for("bert", batch=3, seed=5)
    with torch.no_grad():
        want = m8(**batch_eval).logits
        again = bitfit.load(make("bert"), tmp_path / "int8")
        again.eval()
        assert torch.equal(again(**batch_eval).logits, want)
        merged = bitfit.merge(m8)
        assert all("forward" not in mod.__dict__ for mod in merged.modules())
        assert torch.equal(merged(**batch_eval).logits, want)


@fbgemm
def test_training_lowers_the_eval_loss_and_remove_switches_the_mode_off():
    model = make("bert")
    bitfit.apply(model, frozen_dtype="int8-fbgemm")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch, labels = inputs_for("bert", batch=4), torch.tensor([0, 1, 1, 0])

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return model(**batch, labels=labels).loss.item()

    first = eval_loss()
    torch.manual_seed(0)
    for _ in range(15):  # dropout active: the mode's fast dropout draw runs too
        model.train()
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    assert eval_loss() < first - 0.05
    remove(model)
    assert all("forward" not in mod.__dict__ for mod in model.modules())


@fbgemm
def test_compare_method_option_selects_the_mode():
    from bitfit.training import baselines

    model = baselines.prepare(make("bert"), "bitfit/frozen_dtype=int8-fbgemm")
    assert len(get_lean(model).int8_fbgemm) == 13


def test_without_the_engine_the_mode_is_float32_and_says_so(monkeypatch):
    monkeypatch.setattr(int8_fbgemm, "available", lambda: False)
    model = make("bert")
    with pytest.warns(UserWarning, match="fbgemm engine does not run here"):
        bitfit.apply(model, frozen_dtype="int8-fbgemm")
    assert get_lean(model).int8_fbgemm == [] and all("forward" not in m.__dict__ for m in model.modules()
                                                     if isinstance(m, nn.Linear))


def test_config_names_the_mode():
    assert bitfit.BitFitConfig(frozen_dtype="int8_fbgemm").frozen_dtype == "int8-fbgemm"
    with pytest.raises(BitFitConfigError, match="int8-fbgemm, int8, auto"):
        bitfit.BitFitConfig(frozen_dtype="int4")


# ------------------------------------------------------------------ auto among every mode (faked probes)


@pytest.mark.parametrize("timings, want", [
    # AMD EPYC with AVX2 only: bf16 and _int_mm emulated, fbgemm int8 at half of float32
    ({"float32": 130.6, "bfloat16": 6236.7, "int8-fbgemm": 70.0, "int8": 6583.4}, "int8-fbgemm"),
    # Intel Xeon with AMX: bf16 fastest, neither int8 MARGIN faster than it
    ({"float32": 100.0, "bfloat16": 25.0, "int8-fbgemm": 45.0, "int8": 28.0}, "bfloat16"),
    # AVX512-VNNI without AMX: _int_mm int8 MARGIN faster than the fbgemm mode it passes
    ({"float32": 100.0, "bfloat16": 50.0, "int8-fbgemm": 40.0, "int8": 25.0}, "int8"),
    # AVX512-VNNI (AMD EPYC, 2026-12-07): the two int8 modes' matmuls within MARGIN of each other; with bf16
    # native, int8 (bf16 outside the matmuls and in evaluation) is tried first and fbgemm must beat it by MARGIN
    ({"float32": 59.4, "bfloat16": 23.4, "int8-fbgemm": 16.0, "int8": 15.0}, "int8"),
    ({"float32": 59.4, "bfloat16": 23.4, "int8-fbgemm": 15.0, "int8": 16.0}, "int8"),
    ({"float32": 100.0, "bfloat16": 50.0, "int8-fbgemm": 30.0, "int8": 40.0}, "int8-fbgemm"),
    # bf16 native but slower than float32: the more exact int8-fbgemm comes first again
    ({"float32": 100.0, "bfloat16": 120.0, "int8-fbgemm": 55.0, "int8": 50.0}, "int8-fbgemm"),
    # fbgemm a little faster than bf16 but not by MARGIN: the more exact bf16 stays
    ({"float32": 100.0, "bfloat16": 50.0, "int8-fbgemm": 46.0}, "bfloat16"),
    # native fp16 (AVX512-FP16): preferred to bf16 unless bf16 is MARGIN faster
    ({"float32": 100.0, "float16": 40.0, "bfloat16": 38.0, "int8-fbgemm": 60.0}, "float16"),
    ({"float32": 100.0, "int8-fbgemm": 90.0}, "float32"),
    # _int_mm fast but bf16 emulated (AVX512-VNNI without BF16): int8 would run the rest of the model in
    # emulated bf16, so it is passed over
    ({"float32": 130.0, "bfloat16": 4400.0, "int8-fbgemm": 100.0, "int8": 60.0}, "int8-fbgemm"),
    ({"float32": 130.0, "int8": 60.0}, "float32"),  # no bf16 timing: int8's bf16 remainder unknown
])
def test_auto_picks_among_every_mode(timings, want):
    assert hardware.pick(timings)[0] == want


def test_probe_candidates_follow_the_cpu(monkeypatch):
    monkeypatch.setattr(int8_fbgemm, "available", lambda: True)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ["avx2"])
    assert hardware.probe_modes() == ["float32", "bfloat16", "int8-fbgemm", "int8"]
    monkeypatch.setattr(hardware, "cpu_flags", lambda: ["avx2", "avx512f", "avx512_fp16", "amx_bf16"])
    assert hardware.probe_modes() == ["float32", "float16", "bfloat16", "int8-fbgemm", "int8"]
    monkeypatch.setattr(int8_fbgemm, "available", lambda: False)
    assert "int8-fbgemm" not in hardware.probe_modes()


def test_probe_screens_out_modes_far_slower_than_float32(monkeypatch):
    """A mode that loses by far on a small screen is not timed at the full shape (bf16 emulated on an AVX2
    CPU would cost seconds); its entry is the screen's time scaled up."""
    per_token_ms = {"float32": 0.25, "bfloat16": 12.0, "int8-fbgemm": 0.14, "int8": 12.8}
    calls = []

    def fake_time(mode, tokens, d_in, d_out, repeats):
        calls.append((mode, tokens))
        return per_token_ms[mode] * tokens / 1000.0

    monkeypatch.setattr(hardware, "_time_mode", fake_time)
    monkeypatch.setattr(hardware, "probe_modes", lambda: list(per_token_ms))
    t = hardware.probe_cpu(tokens=512)
    assert ("bfloat16", 512) not in calls and ("int8", 512) not in calls
    assert ("float32", 512) in calls and ("int8-fbgemm", 512) in calls
    assert t["bfloat16"] == pytest.approx(12.0 * 512) and t["int8-fbgemm"] == pytest.approx(0.14 * 512)
    assert hardware.pick(t)[0] == "int8-fbgemm"


@fbgemm
def test_apply_auto_can_choose_the_mode_and_logs_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("BITFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BITFIT_FROZEN_DTYPE", raising=False)
    monkeypatch.setattr(hardware, "probe_cpu",
                        lambda: {"float32": 130.6, "bfloat16": 6236.7, "int8-fbgemm": 70.0, "int8": 6583.4})
    model = make("bert")
    bitfit.apply(model, frozen_dtype="auto")
    state = get_lean(model)
    assert state.auto.dtype == "int8-fbgemm" and len(state.int8_fbgemm) == 13
    line = state.auto.describe()
    assert "frozen_dtype=auto -> int8-fbgemm" in line and "int8-fbgemm 70.0 ms" in line and "bfloat16 6236.7 ms" in line
    assert state.auto.to_dict()["timings_ms"]["int8-fbgemm"] == 70.0  # what command.json keeps


def test_env_override_accepts_the_mode(monkeypatch):
    monkeypatch.setenv("BITFIT_FROZEN_DTYPE", "int8_fbgemm")
    assert hardware.choose_frozen_dtype("cpu").dtype == "int8-fbgemm"


def test_a_capped_instruction_set_is_probed_apart(tmp_path, monkeypatch):
    """Kernels capped to AVX2 (ATEN_CPU_CAPABILITY, FBGEMM_ENABLE_INSTRUCTIONS...) are another machine for the
    probe: the uncapped run's cached choice is not reused."""
    monkeypatch.setenv("BITFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BITFIT_FROZEN_DTYPE", raising=False)
    for k in ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(k, raising=False)
    tables = iter([{"float32": 100.0, "int8": 25.0, "bfloat16": 50.0},
                   {"float32": 130.0, "bfloat16": 5000.0, "int8-fbgemm": 70.0, "int8": 60.0}])
    monkeypatch.setattr(hardware, "probe_cpu", lambda: next(tables))
    assert hardware.choose_frozen_dtype("cpu").dtype == "int8"
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", "AVX2")
    capped = hardware.choose_frozen_dtype("cpu")
    assert capped.dtype == "int8-fbgemm" and not capped.cached
    assert "FBGEMM_ENABLE_INSTRUCTIONS=AVX2" in hardware.cpu_summary()
