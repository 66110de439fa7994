"""Artifacts under bad input and faults: nothing lost, nothing silently wrong.

Non-finite tensors refused (save, load, merge, bank), atomic replace of an existing artifact
folder (also under SIGKILL), files created with the umask's modes, required integrity fields,
dtype/shape checks, and an ArtifactError naming the path for every corrupt file. Every case
checks that the model and the folder are left as they were.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from families import logits_of, make

import bitfit
from bitfit.artifacts import saving as S
from bitfit.artifacts import store as A
from bitfit.artifacts import CONFIG_NAME, WEIGHTS_NAME, read_artifact, task_tensors
from bitfit.serving.bank import BiasBank
from bitfit.errors import ArtifactError
from bitfit.core.io import atomic_write_json, atomic_write_text

TESTS = Path(__file__).resolve().parent


# ---------------------------------------------------------------- helpers
def base(family="bert", seed=0):
    m = make(family, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for mod in m.modules():
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.nn.Parameter):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return m


def train(m, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def trained(family="bert", seed=3, **kw):
    return train(bitfit.apply(base(family), **kw), seed=seed)


def snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def same_state(a, b):
    """Bit for bit, NaN included."""
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point():
            if not torch.equal(torch.isnan(x), torch.isnan(y)) or not torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0)):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def folder_bytes(path):
    """Every file under ``path`` (relative name -> bytes): a folder left unchanged compares equal."""
    path = Path(path)
    if not path.exists():
        return None
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def siblings(path):
    """Hidden side folders of ``path`` (``.NAME.tmp-*`` / ``.NAME.bak-*``) in its parent."""
    path = Path(path)
    return sorted(n for n in os.listdir(path.parent) if n.startswith(f".{path.name}."))


def edit_json(path, fn):
    meta = json.loads((path / CONFIG_NAME).read_text())
    out = fn(meta)
    (path / CONFIG_NAME).write_text(json.dumps(meta if out is None else out))


def resave_tensors(path, fn):
    """Rewrite the tensor file and put its new checksum into the config (a consistent but wrong artifact)."""
    t = safetensors.torch.load_file(str(path / WEIGHTS_NAME))
    fn(t)
    safetensors.torch.save_file(t, str(path / WEIGHTS_NAME))
    digest = hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()
    edit_json(path, lambda m: m.update(weights_sha256=digest))


def assert_load_refused(path, match, strict=True):
    """bitfit.load refuses with ``match``; the target model and the artifact folder are left unchanged."""
    target = base()
    before, files = snapshot(target), folder_bytes(path)
    with pytest.raises(ArtifactError, match=match) as e:
        bitfit.load(target, path, strict=strict)
    assert same_state(before, snapshot(target)) and bitfit.get_state(target) is None
    assert folder_bytes(path) == files
    return str(e.value)


@pytest.fixture
def saved(tmp_path):
    m = trained()
    bitfit.save(m, tmp_path / "a")
    return tmp_path / "a", m


FIRST_BIAS = "bert.encoder.layer.0.attention.self.query.bias"


# ---------------------------------------------------------------- 1. non-finite values
@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_save_refuses_nonfinite_bias(dtype, bad, tmp_path):
    m = trained()
    with torch.no_grad():
        m.bert.encoder.layer[0].attention.self.query.bias[3] = bad
    before = snapshot(m)
    with pytest.raises(ArtifactError) as e:
        bitfit.save(m, tmp_path / "a", dtype=dtype)
    msg = str(e.value)
    n_nan, n_inf = (1, 0) if bad != bad else (0, 1)
    assert FIRST_BIAS in msg and f"{n_nan} NaN and {n_inf} inf of its 16 values" in msg, msg
    assert "cannot save" in msg and "learning rate" in msg
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path) == []
    assert same_state(before, snapshot(m))


def test_save_refuses_nonfinite_head_and_counts_tensors(tmp_path):
    m = trained()
    bitfit.save(m, tmp_path / "a")  # a good artifact is there first: it must stay
    files = folder_bytes(tmp_path / "a")
    with torch.no_grad():
        m.classifier.weight[0, :2] = float("inf")
        m.bert.pooler.dense.bias[0] = float("nan")
    with pytest.raises(ArtifactError, match=r"2 tensors are non-finite in all") as e:
        bitfit.save(m, tmp_path / "a", dtype="int8")
    assert "bert.pooler.dense.bias holds 1 NaN and 0 inf" in str(e.value)
    assert folder_bytes(tmp_path / "a") == files and siblings(tmp_path / "a") == []


def test_int8_nan_no_longer_loads_as_base(tmp_path):
    """A NaN in a trained bias saved as int8 must not come back as the base value (int8 storage used to map it there)."""
    m = trained()
    with torch.no_grad():
        m.bert.encoder.layer[0].attention.self.query.bias[0] = float("nan")
    with pytest.raises(ArtifactError, match="NaN"):
        bitfit.save(m, tmp_path / "a", dtype="int8")


def test_delta_that_overflows_is_stored_as_value(tmp_path):
    """value and base finite but far apart: the float32 difference would be inf, so the value is stored."""
    m = bitfit.apply(base())
    with torch.no_grad():
        bitfit.get_state(m).base[FIRST_BIAS][0] = -3e38
        m.bert.encoder.layer[0].attention.self.query.bias[0] = 3e38
    ref = bitfit.core.prepare.bias_tensor(m, FIRST_BIAS).detach().clone()
    bitfit.save(m, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    assert meta["slots"][FIRST_BIAS]["encoding"] == "value"
    assert torch.equal(read_artifact(tmp_path / "a").tensors[f"bias:{FIRST_BIAS}"], ref)


@pytest.mark.parametrize("dtype,key", [("float32", f"bias:{FIRST_BIAS}"), ("float16", "head:classifier.weight"),
                                       ("int8", f"scale:bias:{FIRST_BIAS}")])
def test_load_refuses_artifact_with_nonfinite_values(dtype, key, tmp_path):
    m = trained()
    path = bitfit.save(m, tmp_path / "a", dtype=dtype)

    def poison(t):
        v = t[key].clone()
        v.view(-1)[0] = float("nan") if v.dim() else float("inf")
        t[key] = v

    resave_tensors(path, poison)
    msg = assert_load_refused(path, "non-finite")
    assert str(path) in msg and key in msg
    for fn in (lambda: read_artifact(path), lambda: task_tensors(base(), path)):
        with pytest.raises(ArtifactError, match="non-finite"):
            fn()


def test_merge_refuses_nonfinite_model_and_changes_nothing():
    m = trained("gpt2", preset="paper-subset")  # fused c_attn: a parametrized slot
    with torch.no_grad():
        m.score.weight[1, 1] = float("nan")
    before, state = snapshot(m), bitfit.get_state(m)
    with pytest.raises(ArtifactError, match=r"cannot merge: trained tensor score.weight holds 1 NaN"):
        bitfit.merge(m)
    assert bitfit.get_state(m) is state and same_state(before, snapshot(m))
    assert torch.nn.utils.parametrize.is_parametrized(m.transformer.h[0].attn.c_attn, "bias")


def test_bank_refuses_nonfinite_task(tmp_path):
    good = trained(seed=1)
    bitfit.save(good, tmp_path / "good")
    bad = trained(seed=2)
    bitfit.save(bad, tmp_path / "bad")
    resave_tensors(tmp_path / "bad", lambda t: t[f"bias:{FIRST_BIAS}"].__setitem__(0, float("inf")))
    b = base()
    before = snapshot(b)
    bank = BiasBank(b, {"good": tmp_path / "good"})
    with pytest.raises(ArtifactError, match=r"non-finite.*" + FIRST_BIAS.replace(".", r"\.")):
        bank.add_task("bad", tmp_path / "bad")
    with torch.no_grad():
        bad.bert.encoder.layer[1].output.dense.bias[2] = float("nan")
    with pytest.raises(ArtifactError, match=r"the model in memory cannot be used: tensor bert.encoder.layer.1"):
        bank.add_task("bad", bad)  # straight from a model in memory
    assert bank.tasks == ["good"] and same_state(before, snapshot(b))


def test_artifact_object_with_nonfinite_values_refused(saved):
    path, _ = saved
    art = read_artifact(path)
    art.tensors["head:classifier.weight"][0, 0] = float("nan")
    target = base()
    before = snapshot(target)
    with pytest.raises(ArtifactError, match="head:classifier.weight holds 1 NaN"):
        bitfit.load(target, art)
    assert same_state(before, snapshot(target)) and bitfit.get_state(target) is None


# ---------------------------------------------------------------- 2. atomic replace
def test_replace_keeps_other_files_and_leaves_nothing_beside(tmp_path):
    a, b = trained(seed=1), trained(seed=2)
    path = bitfit.save(a, tmp_path / "run")
    (path / "metrics.json").write_text("{}")
    (path / "checkpoint-10").mkdir()
    (path / "checkpoint-10" / "state.pt").write_bytes(b"x" * 100)
    bitfit.save(b, path)
    assert sorted(os.listdir(path)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "metrics.json", "checkpoint-10"])
    assert (path / "checkpoint-10" / "state.pt").read_bytes() == b"x" * 100
    assert os.listdir(tmp_path) == ["run"]
    assert torch.equal(logits_of(bitfit.load(base(), path), "bert"), logits_of(b, "bert"))


def test_save_through_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    real = bitfit.save(trained(seed=1), tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    b = trained(seed=2)
    bitfit.save(b, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert torch.equal(logits_of(bitfit.load(base(), tmp_path / "link"), "bert"), logits_of(b, "bert"))
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]


def test_save_into_the_working_directory_replaces_files_in_place(tmp_path, monkeypatch):
    path = bitfit.save(trained(seed=1), tmp_path / "cwd")
    monkeypatch.chdir(path)
    b = trained(seed=2)
    bitfit.save(b, ".")  # the folder cannot be swapped (it is the cwd): file by file, config last
    assert os.getcwd() == str(path) and os.listdir(tmp_path) == ["cwd"]
    assert torch.equal(logits_of(bitfit.load(base(), path), "bert"), logits_of(b, "bert"))


class Killed(BaseException):
    """Stands for SIGKILL: raised at the k-th file-system step, and by every step after it."""


FS_STEPS = [(os, "rename"), (os, "replace"), (os, "mkdir"), (os, "fsync"), (shutil, "rmtree"),
            (safetensors.torch, "save_file")]


def kill_at(monkeypatch, k):
    """Patch the file-system steps of a save so that the k-th one (and everything after) dies."""
    calls = {"n": 0, "dead": False}

    def wrap(mod, name, real):
        def f(*args, **kwargs):
            calls["n"] += 1
            if calls["dead"] or calls["n"] == k:
                if not calls["dead"] and name == "save_file":  # die half-way through the tensor file
                    Path(args[1]).write_bytes(b"\x00" * 7)
                calls["dead"] = True
                raise Killed(f"{name} #{calls['n']}")
            return real(*args, **kwargs)
        return f

    for mod, name in FS_STEPS:
        monkeypatch.setattr(mod, name, wrap(mod, name, getattr(mod, name)))
    return calls


def test_kill_at_every_step_of_a_replace(tmp_path, monkeypatch):
    """A save over an existing artifact, dying at each of its file-system steps in turn: the
    folder always reads as exactly the old or the new artifact, the other files survive, and
    the next save removes what the dead one left beside the folder."""
    a, b = trained(seed=1), trained(seed=2)
    refs = {}
    for name, m in (("A", a), ("B", b)):
        refs[name] = read_artifact(bitfit.save(m, tmp_path / f"ref{name}")).tensors
    path = tmp_path / "run"
    outcomes, k = [], 1
    while True:
        shutil.rmtree(path, ignore_errors=True)
        bitfit.save(a, path)
        (path / "log.txt").write_text("keep me")
        with monkeypatch.context() as mp:
            calls = kill_at(mp, k)
            try:
                bitfit.save(b, path)
                finished = True
            except Killed:
                finished = False
        left = siblings(path)
        art = read_artifact(path)  # recovers a folder caught mid-swap
        got = [n for n, ref in refs.items() if ref.keys() == art.tensors.keys()
               and all(torch.equal(ref[t], art.tensors[t]) for t in ref)]
        assert len(got) == 1, f"kill at step {k}: the folder is neither A nor B"
        assert (path / "log.txt").read_text() == "keep me", f"kill at step {k}: other file lost"
        outcomes.append((k, got[0], len(left)))
        bitfit.save(a, path)  # the next save cleans up
        assert siblings(path) == [] and (path / "log.txt").read_text() == "keep me"
        if finished:
            break
        k += 1
    assert {o[1] for o in outcomes} == {"A", "B"}  # both sides of the swap were hit
    assert any(n for _, _, n in outcomes)  # some kills left side folders behind


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    m = trained()
    for k in range(1, 6):
        with monkeypatch.context() as mp:
            kill_at(mp, k)
            try:
                bitfit.save(m, tmp_path / "a")
            except Killed:
                pass
        try:  # complete (a finished new folder not yet renamed is put in place), or not there at all
            read_artifact(tmp_path / "a")
            shutil.rmtree(tmp_path / "a")
        except ArtifactError as e:
            assert "does not exist" in str(e)
    bitfit.save(m, tmp_path / "a")
    assert os.listdir(tmp_path) == ["a"]


def test_recovery_when_folder_missing(tmp_path):
    """Killed between `old -> backup` and `new -> final`: load puts the complete new folder in place."""
    a, b = trained(seed=1), trained(seed=2)
    path = bitfit.save(a, tmp_path / "run")
    (path / "log.txt").write_text("keep me")
    new = A._make_side_folder(path, "tmp")
    meta, tensors = S._collect(b)
    A._write_files(new, meta, tensors)
    bak = A._side_name(path, "bak")
    os.rename(path, bak)
    assert not path.exists()
    loaded = bitfit.load(base(), path)  # recovers: the new folder becomes the artifact
    assert torch.equal(logits_of(loaded, "bert"), logits_of(b, "bert"))
    assert (path / "log.txt").read_text() == "keep me"
    assert siblings(path) == []


def test_incomplete_new_folder_falls_back_to_backup(tmp_path):
    a = trained(seed=1)
    path = bitfit.save(a, tmp_path / "run")
    new = A._make_side_folder(path, "tmp")
    (new / WEIGHTS_NAME).write_bytes(b"\x00" * 10)  # killed while writing
    os.rename(path, A._side_name(path, "bak"))
    assert torch.equal(logits_of(bitfit.load(base(), path), "bert"), logits_of(a, "bert"))
    assert siblings(path) == []


def test_only_our_stale_side_folders_are_cleaned(tmp_path):
    path = bitfit.save(trained(seed=1), tmp_path / "a")
    ours_dead = tmp_path / ".a.tmp-999999999-0badcafe"  # no such process
    ours_dead.mkdir()
    (ours_dead / WEIGHTS_NAME).write_bytes(b"half")
    keep = [tmp_path / ".a.tmp-notours", tmp_path / ".b.tmp-999999999-0badcafe", tmp_path / "a.tmp-999999999-0badcafe",
            tmp_path / ".a.tmpfile"]
    for k in keep:
        k.mkdir()
    with_files = tmp_path / ".a.bak-999999999-00c0ffee"  # holds a file of the user's: moved into the folder
    with_files.mkdir()
    (with_files / "notes.txt").write_text("mine")
    bitfit.save(trained(seed=2), path)
    assert not ours_dead.exists() and not with_files.exists()
    assert (path / "notes.txt").read_text() == "mine"
    assert all(k.exists() for k in keep)


def test_live_writers_side_folder_is_not_touched_without_lock(tmp_path, monkeypatch):
    """Where no folder lock exists, a side folder of a running process (here: ourselves) is kept."""
    path = bitfit.save(trained(seed=1), tmp_path / "a")
    live = tmp_path / f".a.tmp-{os.getpid()}-0badcafe"
    live.mkdir()

    import contextlib

    @contextlib.contextmanager
    def no_lock(folder, exclusive):
        yield False

    monkeypatch.setattr(A, "_locked", no_lock)
    bitfit.save(trained(seed=2), path)
    assert live.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_files_honour_umask(umask, tmp_path):
    m = trained()
    old = os.umask(umask)
    try:
        path = bitfit.save(m, tmp_path / "sub" / "a")
        first = {n: (path / n).stat().st_mode & 0o777 for n in (CONFIG_NAME, WEIGHTS_NAME)}
        dir_first = path.stat().st_mode & 0o777
        bitfit.save(m, path)  # replacing
        atomic_write_text(tmp_path / "t.txt", "x")
        atomic_write_json(tmp_path / "t.json", {"a": 1})
    finally:
        os.umask(old)
    want_f, want_d = 0o666 & ~umask, 0o777 & ~umask
    assert first == {CONFIG_NAME: want_f, WEIGHTS_NAME: want_f} and dir_first == want_d
    assert path.stat().st_mode & 0o777 == want_d
    assert all((path / n).stat().st_mode & 0o777 == want_f for n in (CONFIG_NAME, WEIGHTS_NAME))
    assert (tmp_path / "sub").stat().st_mode & 0o777 == want_d
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == want_f
    assert (tmp_path / "t.json").stat().st_mode & 0o777 == want_f
    assert json.loads((tmp_path / "t.json").read_text()) == {"a": 1}


def test_atomic_write_text_leaves_nothing_on_failure(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "f.txt", "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(tmp_path / "f.txt", "new")
    assert os.listdir(tmp_path) == ["f.txt"] and (tmp_path / "f.txt").read_text() == "old"


# ---------------------------------------------------------------- 3. integrity fields, versions, types
@pytest.mark.parametrize("field", ["weights_sha256", "fingerprint", "both"])
def test_integrity_fields_are_required(field, saved):
    path, m = saved

    def drop(meta):
        if field in ("weights_sha256", "both"):
            del meta["weights_sha256"]
        if field in ("fingerprint", "both"):
            del meta["base_model"]["fingerprint"]

    edit_json(path, drop)
    msg = assert_load_refused(path, "cannot be verified")
    assert str(path) in msg and "strict=False" in msg
    for name in ("weights_sha256", "fingerprint"):
        assert (name in msg) == (field in (name, "both"))
    with pytest.raises(ArtifactError, match="cannot be verified"):
        task_tensors(base(), path)
    with pytest.warns(UserWarning, match="unverified because strict=False"):
        loaded = bitfit.load(base(), path, strict=False)
    assert torch.equal(logits_of(loaded, "bert"), logits_of(m, "bert"))


@pytest.mark.parametrize("field,value,match", [
    ("weights_sha256", "abc", "64 hex digits"),
    ("weights_sha256", 5, "64 hex digits"),
    ("weights_sha256", "A" * 64, "64 hex digits"),
    ("fingerprint", "md5:1234", "sha256:"),
    ("fingerprint", ["sha256:00"], "sha256:"),
])
def test_malformed_integrity_fields_refused_even_unstrict(field, value, match, saved):
    path, _ = saved
    edit_json(path, lambda m: (m if field == "weights_sha256" else m["base_model"]).update({field: value}))
    for strict in (True, False):
        assert_load_refused(path, match, strict=strict)


@pytest.mark.parametrize("version", [0, -5, True, False, "1", 1.0, None, [1], 99])
def test_format_version_must_be_a_known_positive_int(version, saved):
    path, _ = saved
    edit_json(path, lambda m: m.update(format_version=version))
    msg = "upgrade bitfit" if version == 99 else f"format_version must be a positive integer, got {json.dumps(version)}"
    assert str(path) in assert_load_refused(path, msg.replace("[", r"\[").replace("]", r"\]"))


def test_format_version_missing(saved):
    path, _ = saved
    edit_json(path, lambda m: m.__delitem__("format_version"))
    assert_load_refused(path, "format_version is missing")


def _retype(key, dtype):
    def f(t):
        t[key] = t[key].to(dtype)
    return f


DTYPE_SHAPE_BREAKS = {
    "bias-float64": ("float32", _retype(f"bias:{FIRST_BIAS}", torch.float64), "stored as float64, the config says float32"),
    "bias-float16-in-f32": ("float32", _retype(f"bias:{FIRST_BIAS}", torch.float16), "stored as float16"),
    "head-float32-in-f16": ("float16", _retype("head:classifier.weight", torch.float32), "stored as float32, the config says float16"),
    "int8-as-int16": ("int8", _retype(f"bias:{FIRST_BIAS}", torch.int16), "stored as int16"),
    "scale-float16": ("int8", _retype(f"scale:bias:{FIRST_BIAS}", torch.float16), "stored as float16"),
    "head-transposed": ("float32", lambda t: t.update({"head:classifier.weight": t["head:classifier.weight"].t().contiguous()}),
                        r"shape \[16, 2\], the config says \[2, 16\]"),
    "bias-2d": ("float32", lambda t: t.update({f"bias:{FIRST_BIAS}": t[f"bias:{FIRST_BIAS}"].reshape(4, 4)}),
                r"shape \[4, 4\], the config says \[16\]"),
    "scale-vector": ("int8", lambda t: t.update({f"scale:bias:{FIRST_BIAS}": t[f"scale:bias:{FIRST_BIAS}"].reshape(1)}),
                     r"shape \[1\], the config says \[\]"),
    "scale-zero": ("int8", lambda t: t.update({f"scale:bias:{FIRST_BIAS}": torch.tensor(0.0)}), "not a positive scale"),
    "fix-idx-float": ("float32", None, "fix_idx"),
}


@pytest.mark.parametrize("case", list(DTYPE_SHAPE_BREAKS))
def test_tensor_dtypes_and_shapes_checked(case, tmp_path):
    dtype, fn, match = DTYPE_SHAPE_BREAKS[case]
    m = trained()
    if case == "fix-idx-float":
        with torch.no_grad():
            m.bert.encoder.layer[0].attention.self.query.bias[0] = 2.0 ** -40  # needs an exact fix
        fn = _retype(f"fix_idx:{FIRST_BIAS}", torch.float32)
        match = "stored as float32, the config says int16/int32/int64"
    path = bitfit.save(m, tmp_path / "a", dtype=dtype)
    resave_tensors(path, fn)
    assert str(path) in assert_load_refused(path, match)


def _nest(depth):
    return "[" * depth + "]" * depth


CORRUPT = {
    "truncated-weights": (lambda p: (p / WEIGHTS_NAME).write_bytes((p / WEIGHTS_NAME).read_bytes()[:200]), "truncated"),
    "empty-weights": (lambda p: (p / WEIGHTS_NAME).write_bytes(b""), "truncated"),
    "huge-header-length": (lambda p: (p / WEIGHTS_NAME).write_bytes((2 ** 62).to_bytes(8, "little") + b"{}"), "truncated"),
    "weights-is-a-folder": (lambda p: (p / WEIGHTS_NAME).unlink() or (p / WEIGHTS_NAME).mkdir(), "is missing"),
    "garbage-json": (lambda p: (p / CONFIG_NAME).write_bytes(b"\xff\xfe{not json"), "not valid JSON"),
    "empty-json": (lambda p: (p / CONFIG_NAME).write_text(""), "not valid JSON"),
    "json-list": (lambda p: (p / CONFIG_NAME).write_text("[1, 2]"), "JSON list, not an object"),
    "json-string": (lambda p: (p / CONFIG_NAME).write_text('"bitfit"'), "JSON string, not an object"),
    "json-null": (lambda p: (p / CONFIG_NAME).write_text("null"), "JSON null, not an object"),
    "json-deep": (lambda p: (p / CONFIG_NAME).write_text(_nest(100_000)), "not valid JSON"),
    "json-nan-literal": (lambda p: edit_json(p, lambda m: m["head"].update(num_labels=float("nan"))), "num_labels"),
    "missing-config": (lambda p: (p / CONFIG_NAME).unlink(), "bitfit_config.json is missing"),
    "missing-weights": (lambda p: (p / WEIGHTS_NAME).unlink(), "bitfit_model.safetensors is missing"),
    "slot-size-bool": (lambda p: edit_json(p, lambda m: m["slots"][FIRST_BIAS].update(size=True)), "no roles/size"),
    "slot-not-object": (lambda p: edit_json(p, lambda m: m["slots"].update({FIRST_BIAS: [1]})), "no roles/size"),
    "slot-added-string": (lambda p: edit_json(p, lambda m: m["slots"][FIRST_BIAS].update(added="no")), "true or false"),
    "slot-indices-negative": (lambda p: edit_json(p, lambda m: m["slots"][FIRST_BIAS].update(indices=-1)), "indices"),
    "head-shape-strings": (lambda p: edit_json(p, lambda m: m["head"]["params"].update({"classifier.weight": ["2", "16"]})),
                           "not a list of sizes"),
    "id2label-keys": (lambda p: edit_json(p, lambda m: m["head"].update(id2label={"zero": "a"})), "label indices"),
    "added-unknown": (lambda p: edit_json(p, lambda m: m.update(added=["nope"])), "not among the slots"),
    "dtype-unknown": (lambda p: edit_json(p, lambda m: m.update(dtype="bfloat16")), "unknown storage dtype"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_files_raise_artifact_error_naming_the_path(case, saved):
    path, _ = saved
    CORRUPT[case][0](path)
    msg = assert_load_refused(path, CORRUPT[case][1])
    assert str(path) in msg
    with pytest.raises(ArtifactError):
        read_artifact(path)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        read_artifact(tmp_path / "nope" / "deeper")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ArtifactError, match="is a file, not a folder"):
        read_artifact(tmp_path / "f")


def _leaves(meta, skip=("config",)):
    """(path of keys, value) of every entry of the config except inside base_model.config."""
    out = []

    def walk(node, keys):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            if k in skip and keys == ["base_model"]:
                out.append((keys + [k], v))
                continue
            out.append((keys + [k], v))
            walk(v, keys + [k])

    walk(meta, [])
    return out


def test_any_retyped_config_field_gives_artifact_error_or_loads(saved):
    """Every field of the config (one slot's worth of slots) replaced by values of other types:
    bitfit.load either loads or raises ArtifactError, never a raw TypeError/KeyError/..."""
    path, _ = saved
    original = (path / CONFIG_NAME).read_text()
    meta = json.loads(original)
    keep = {FIRST_BIAS}
    entries = [(k, v) for k, v in _leaves(meta) if not (k[0] == "slots" and len(k) > 1 and k[1] not in keep)]
    rng = random.Random(0)
    replacements = [None, True, -1, "x", [], {}, 2.5]
    target = base()
    tried = 0
    for keys, _ in entries:
        for value in rng.sample(replacements, 3):
            m2 = json.loads(original)
            node = m2
            for k in keys[:-1]:
                node = node[k]
            node[keys[-1]] = value
            (path / CONFIG_NAME).write_text(json.dumps(m2))
            try:
                bitfit.load(target, path)
            except ArtifactError:
                pass
            except Exception as exc:  # pragma: no cover - the failure message says which field
                raise AssertionError(f"{'.'.join(map(str, keys))} = {value!r}: {type(exc).__name__}: {exc}") from exc
            tried += 1
    assert tried > 100


def test_strict_false_still_refuses_damage(saved):
    """strict=False only lets missing integrity fields (and another base) through, not a wrong checksum."""
    path, _ = saved
    edit_json(path, lambda m: m.update(weights_sha256="0" * 64))
    assert_load_refused(path, "checksum", strict=False)


# ---------------------------------------------------------------- 4. SIGKILL during save (real processes)
WRITER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    import bitfit
    from test_artifact_hardening import trained
    target, ref_a, ref_b = sys.argv[1:4]
    models = [trained(seed=1), trained(seed=2)]
    bitfit.save(models[0], ref_a)
    bitfit.save(models[1], ref_b)
    print("ready", flush=True)
    for line in sys.stdin:                  # one child per kill: forked, so no import per kill
        pid = os.fork()
        if pid == 0:
            i = 0
            while True:                     # save A, B, A, B ... over the same folder until killed
                bitfit.save(models[i % 2], target)
                i += 1
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("dead", flush=True)
""")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_save_always_leaves_a_or_b(tmp_path):
    kills = 30
    target, ref_a, ref_b = tmp_path / "run", tmp_path / "refA", tmp_path / "refB"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(tests=str(TESTS)), str(target), str(ref_a), str(ref_b)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        refs = {"A": read_artifact(ref_a).tensors, "B": read_artifact(ref_b).tensors}
        bitfit.save(trained(seed=1), target)
        (target / "log.txt").write_text("keep me")
        rng = random.Random(12)
        outcomes = {"A": 0, "B": 0}
        left_seen = missing_seen = 0
        t0 = time.monotonic()
        for i in range(kills):
            proc.stdin.write("go\n")
            proc.stdin.flush()
            pid = int(proc.stdout.readline())
            time.sleep(rng.uniform(0.02, 0.25))
            os.kill(pid, signal.SIGKILL)
            assert proc.stdout.readline().strip() == "dead"
            left = siblings(target)
            left_seen += bool(left)
            missing_seen += not target.exists()
            art = read_artifact(target)  # puts back a folder caught mid-swap
            got = [n for n, ref in refs.items() if ref.keys() == art.tensors.keys()
                   and all(torch.equal(ref[k], art.tensors[k]) for k in ref)]
            assert len(got) == 1, f"kill {i}: the folder is neither A nor B (side folders: {left})"
            outcomes[got[0]] += 1
            assert (target / "log.txt").read_text() == "keep me", f"kill {i}: other file lost"
            if i % 3 == 2 or left:
                bitfit.save(trained(seed=1 + i % 2), target)  # the next save cleans what the dead one left
                assert siblings(target) == [], f"kill {i}: side folders not cleaned"
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    print(f"\n{kills} kills in {elapsed:.1f}s: {outcomes}, side folders left by {left_seen} kills, "
          f"folder missing after {missing_seen}")
    assert outcomes["A"] + outcomes["B"] == kills
    assert outcomes["A"] and outcomes["B"]  # both states are reached
