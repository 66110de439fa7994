"""frozen_dtype="auto": the choice rule, the per-machine cache, the override, and what apply records."""

import json

import pytest
import torch

import bitfit
from bitfit.fast import hardware
from bitfit.errors import BitFitConfigError
from families import inputs_for, make


@pytest.mark.parametrize("timings, want", [
    ({"float32": 100.0, "bfloat16": 40.0, "int8": 20.0}, "int8"),
    ({"float32": 100.0, "bfloat16": 40.0, "int8": 38.0}, "bfloat16"),  # int8 not MARGIN faster than bf16
    ({"float32": 100.0, "bfloat16": 95.0, "int8": 90.0}, "float32"),  # nothing MARGIN faster than float32
    ({"float32": 100.0, "bfloat16": 95.0, "int8": 50.0}, "int8"),  # bf16 emulated, int8 kernels fast
    ({"float32": 100.0, "bfloat16": 30.0}, "bfloat16"),  # no int8 kernel on this build
    ({}, "float32"),
])
def test_pick_walks_down_in_precision_only_for_a_real_gain(timings, want):
    assert hardware.pick(timings)[0] == want


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BITFIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BITFIT_FROZEN_DTYPE", raising=False)
    calls = []

    def fake_probe():
        calls.append(1)
        return {"float32": 100.0, "bfloat16": 30.0, "int8": 45.0}

    monkeypatch.setattr(hardware, "probe_cpu", fake_probe)
    return tmp_path, calls


def test_choice_is_probed_once_per_machine_then_cached(cache_dir):
    path, calls = cache_dir
    first = hardware.choose_frozen_dtype("cpu")
    second = hardware.choose_frozen_dtype("cpu")
    assert first.dtype == second.dtype == "bfloat16" and len(calls) == 1
    assert not first.cached and second.cached and second.timings_ms == first.timings_ms
    stored = json.loads((path / "frozen_dtype.json").read_text())
    (entry,) = stored.values()
    assert entry["dtype"] == "bfloat16" and entry["torch"] == torch.__version__ and entry["cpu"]
    assert "bfloat16" in first.describe() and "3.3x faster" in first.reason


def test_the_choice_line_says_whether_it_measured_or_read_the_cache(cache_dir):
    path, calls = cache_dir
    first = hardware.choose_frozen_dtype("cpu").describe()
    second = hardware.choose_frozen_dtype("cpu").describe()
    cache_file = str(path / "frozen_dtype.json")
    assert "measured now" in first and "cached from" not in first
    measured = json.loads((path / "frozen_dtype.json").read_text()).popitem()[1]["measured"]
    assert "measured now" not in second
    assert f"cached from {measured.replace('T', ' ')}, delete {cache_file} to re-measure" in second
    (path / "frozen_dtype.json").unlink()  # what the line tells the user to do: the next run measures again
    assert "measured now" in hardware.choose_frozen_dtype("cpu").describe() and len(calls) == 2


def test_a_corrupt_cache_is_probed_again(cache_dir):
    path, calls = cache_dir
    (path / "frozen_dtype.json").write_text("{not json")
    assert hardware.choose_frozen_dtype("cpu").dtype == "bfloat16" and len(calls) == 1
    assert json.loads((path / "frozen_dtype.json").read_text())  # rewritten whole


def test_cached_timings_are_read_under_the_current_rules(cache_dir):
    """The cache keeps the probe's timings; a choice stored by an older rule set is re-picked from them, so
    a change to the rules applies on the next run without a new probe."""
    path, calls = cache_dir
    hardware.choose_frozen_dtype("cpu")
    stored = json.loads((path / "frozen_dtype.json").read_text())
    (key,) = stored
    stored[key].update(dtype="int8", reason="an older rule")
    (path / "frozen_dtype.json").write_text(json.dumps(stored))
    again = hardware.choose_frozen_dtype("cpu")
    assert again.cached and len(calls) == 1
    assert (again.dtype, again.reason) == hardware.pick(stored[key]["timings_ms"]) == ("bfloat16", again.reason)
    assert "3.3x faster" in again.reason


def test_env_override_and_its_error(cache_dir, monkeypatch):
    _, calls = cache_dir
    monkeypatch.setenv("BITFIT_FROZEN_DTYPE", "fp32")
    c = hardware.choose_frozen_dtype("cpu")
    assert c.dtype == "float32" and c.frozen_dtype is None and not calls
    monkeypatch.setenv("BITFIT_FROZEN_DTYPE", "fastest")
    with pytest.raises(BitFitConfigError, match="BITFIT_FROZEN_DTYPE='fastest' is not one of float32"):
        hardware.choose_frozen_dtype("cpu")


def test_other_devices_without_a_measured_mode_stay_float32(cache_dir):
    _, calls = cache_dir
    assert hardware.choose_frozen_dtype("meta").dtype == "float32" and not calls


def test_config_accepts_auto_and_names_it_in_errors():
    assert bitfit.BitFitConfig(frozen_dtype="auto").frozen_dtype == "auto"
    with pytest.raises(BitFitConfigError, match="int8, auto"):
        bitfit.BitFitConfig(frozen_dtype="fastest")


def test_apply_auto_records_the_resolved_dtype_and_reloads_in_it(cache_dir, tmp_path):
    model = make("bert")
    cfg = bitfit.BitFitConfig(frozen_dtype="auto")
    bitfit.apply(model, config=cfg)
    assert cfg.frozen_dtype == "auto"  # the user's config object is not changed
    state = bitfit.core.prepare.get_state(model)
    assert state.config.frozen_dtype == "bfloat16"
    assert model.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
    rep = bitfit.report(model)
    assert any("frozen_dtype=auto -> bfloat16" in m for m in rep.modes)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.eval()
    x = inputs_for("bert")
    want = model(**x).logits
    bitfit.save(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "bitfit_config.json").read_text())["bitfit_config"]["frozen_dtype"] == "bfloat16"
    again = bitfit.load(make("bert"), tmp_path / "a")
    again.eval()
    assert torch.equal(again(**x).logits, want)


def test_probe_runs_every_mode_on_this_cpu():
    t = hardware.probe_cpu(tokens=64, d_in=64, d_out=128, repeats=1)
    assert set(t) >= {"float32", "bfloat16"} and all(v > 0 for v in t.values())
