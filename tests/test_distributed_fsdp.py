"""BitFit under FSDP2 (``fully_shard``) with 2 processes (gloo, CPU): the loss curve matches one process on the
same global batch, ``bitfit.save`` gathers only the trained tensors and rank 0 writes an artifact bit-identical
to the one-process run's (fingerprint included, sampled from the shards), ``merge`` works in place where it can
and refuses where it cannot; the frozen base is never gathered. Also: the GPU check skips cleanly without CUDA,
and selection reads ZeRO-3 sizes (``ds_shape``) instead of the 0 a partitioned parameter's shape reads."""

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from families import make

STEPS, ROWS, SEQ = 3, 4, 8
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(**apply_kw):
    import bitfit

    # float64: the two runs sum gradients in different orders, and in float64 that noise (~1e-16) lies far below
    # the float32 the artifact stores, so the stored values agree bit for bit
    model = make("llama", attention_bias=True).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # preset 'all' without add_missing: the bias-free slots are skipped
        bitfit.apply(model, **apply_kw)
    return model


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _data():  # one fixed global batch, every step
    return torch.randint(3, 50, (ROWS, SEQ), generator=torch.Generator().manual_seed(3)).expand(STEPS, ROWS, SEQ)


def _train(model, rank: int, world: int) -> list:
    import torch.distributed as dist

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    losses = []
    for batch in _data():  # rank r takes rows [r * ROWS / world, ...): together the one process's batch
        rows = batch.reshape(world, ROWS // world, SEQ)[rank]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.detach().clone()
        if world > 1:  # every rank has as many tokens: the mean of the ranks' means is the global mean
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


def _run(rank: int, world: int, out: str) -> None:
    """The whole scenario on one rank (world 1: no process group, no sharding)."""
    import bitfit
    from bitfit.errors import ArtifactError

    out = Path(out)
    model = _model(preset="all", add_missing=True)
    if world > 1:
        _shard(model)
        assert any(type(p).__name__ == "DTensor" for p in model.parameters())
    losses = _train(model, rank, world)
    bitfit.save(model, out / "artifact")
    try:  # added RMSNorm biases have no place in LLaMA: merge refuses on every rank, the model unchanged
        bitfit.merge(model)
        refused = None
    except ArtifactError as exc:
        refused = str(exc)
    assert bitfit.get_state(model) is not None

    plain = _model(preset="all")  # LLaMA with attention_bias: q/k/v/o biases exist, merge keeps them in place
    if world > 1:
        _shard(plain)
    _train(plain, rank, world)
    bitfit.merge(plain)
    assert bitfit.get_state(plain) is None and all(p.requires_grad for p in plain.parameters())
    if world > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        merged = get_model_state_dict(plain, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        merged = plain.state_dict()
    if rank == 0:
        torch.save({k: v.detach().clone() for k, v in merged.items()}, out / "merged.pt")
        (out / "result.json").write_text(json.dumps({"losses": losses, "refused": refused}))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _run(rank, world, out)
    finally:
        dist.destroy_process_group()


def _written(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config = json.loads((folder / "bitfit_config.json").read_text())
    return config, load_file(str(folder / "bitfit_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import torch.multiprocessing as mp

    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run(0, 1, str(one))
    finally:
        torch.set_num_threads(n)
    mp.spawn(_worker, args=(2, _free_port(), str(two)), nprocs=2, join=True)
    return one, two


@pytest.mark.slow  # two spawned processes import torch and transformers: ~30 s on a shared CPU
def test_fsdp2_loss_curve_matches_one_process(runs):
    one, two = (json.loads((r / "result.json").read_text()) for r in runs)
    assert len(one["losses"]) == STEPS
    assert one["losses"][-1] < one["losses"][0]  # it trains
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-6)  # float32 loss (logits upcast)


@pytest.mark.slow  # two spawned processes import torch and transformers: ~30 s on a shared CPU
def test_fsdp2_artifact_bit_identical_to_one_process(runs):
    (c1, t1), (c2, t2) = (_written(r / "artifact") for r in runs)
    assert c2 == c1  # fingerprint (sampled from the shards), slots, added biases, versions: all the same
    assert c1["base_model"]["fingerprint"].startswith("sha256:")
    assert sorted(t2) == sorted(t1) and len(t1) >= 10
    for k in t1:
        assert t2[k].dtype == t1[k].dtype and torch.equal(t2[k], t1[k]), k
    assert any(t1[k].abs().max() > 0 for k in t1 if k.startswith("bias:"))  # the biases really trained
    # only rank 0 wrote: no second artifact, no leftover temporary folders
    assert sorted(p.name for p in (runs[1] / "artifact").iterdir()) == \
        sorted(p.name for p in (runs[0] / "artifact").iterdir())
    assert not [p for p in runs[1].iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # two spawned processes import torch and transformers: ~30 s on a shared CPU
def test_fsdp2_merge(runs):
    one, two = (json.loads((r / "result.json").read_text()) for r in runs)
    assert two["refused"] and "no place" in two["refused"] and two["refused"] == one["refused"]
    m1, m2 = (torch.load(r / "merged.pt") for r in runs)
    assert sorted(m1) == sorted(m2)
    for k in m1:
        torch.testing.assert_close(m2[k], m1[k], rtol=1e-12, atol=1e-14)


def test_fingerprint_of_sharded_model_reads_no_whole_weight(tmp_path):
    """The fingerprint samples each shard where it lies: a ZeRO-3-style partitioned weight (empty ``data``,
    flat partitions in ``ds_tensor``) gives the fingerprint of the whole model, in one process too."""
    from bitfit.artifacts.base import fingerprint

    model = make("llama", attention_bias=True)
    want = fingerprint(model)
    p = model.model.layers[0].mlp.up_proj.weight
    whole = p.detach().clone()
    p.ds_id, p.ds_shape, p.ds_numel = 1, whole.shape, whole.numel()
    p.ds_tensor = whole.reshape(-1).clone()  # world size 1: rank 0's partition is all of it
    p.data = torch.empty(0)
    assert tuple(p.shape) == (0,)
    assert fingerprint(model) == want


def test_selection_reads_zero3_sizes():
    """A ZeRO-3 partitioned bias reads shape (0,): the slot size comes from ``ds_shape``."""
    from bitfit.core.roles import discover

    model = make("llama", attention_bias=True)
    want = {s.name: s.size for s in discover(model).slots}
    for m in model.modules():
        b = getattr(m, "bias", None)
        if isinstance(b, torch.nn.Parameter):
            b.ds_id, b.ds_shape, b.ds_numel = 1, b.shape, b.numel()
            b.data = torch.empty(0)
    got = {s.name: s.size for s in discover(model).slots}
    assert got == want and any(v > 0 for v in got.values())


def test_gpu_check_skips_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("skipped: no CUDA")
