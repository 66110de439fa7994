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

    model = make("llama", attention_bias=True)
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
    for batch in _data():
        # the global batch in 2 halves: rank r of 2 takes half r; one process takes both, one after the other,
        # its gradient the mean of the halves' (gradient accumulation). FSDP2 averages the 2 ranks' gradients:
        # the same sum of the same two tensors, halved, so both runs compute the same bits
        halves = batch.reshape(2, ROWS // 2, SEQ)
        value = torch.zeros(())
        for rows in (halves[rank:rank + 1] if world > 1 else halves):
            loss = model(input_ids=rows, labels=rows).loss
            (loss if world > 1 else loss / 2).backward()
            value += loss.detach()
        opt.step()
        opt.zero_grad()
        if world > 1:  # every half has as many tokens: the mean of the halves' means is the global mean
            dist.all_reduce(value)
        losses.append(float(value / 2))
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
    from bitfit.training.runfolder import save_run_artifact

    # `bitfit train`'s end-of-run save: every rank of a sharded model calls it (collective gathers), rank 0 writes
    saved = save_run_artifact(model, out / "run", {"task": "instruct"}, main=rank == 0)
    assert saved == ("bitfit" if rank == 0 else None)
    from types import SimpleNamespace

    from bitfit.training.trainer import _trainer_class

    # the Trainer's checkpoint save: only the trained tensors, gathered on every rank of a sharded model
    trainer_cls = _trainer_class()
    trainer = trainer_cls.__new__(trainer_cls)  # the save needs only the model and the arguments
    trainer.model, trainer.args = model, SimpleNamespace(should_save=rank == 0, output_dir=str(out / "checkpoint"))
    trainer.save_model() if world > 1 else trainer._save()
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
    assert two["losses"] == one["losses"]  # bit for bit: see _train


@pytest.mark.slow  # two spawned processes import torch and transformers: ~30 s on a shared CPU
def test_fsdp2_artifact_bit_identical_to_one_process(runs):
    (c1, t1), (c2, t2) = (_written(r / "artifact") for r in runs)
    assert sorted(t2) == sorted(t1) and len(t1) >= 10
    differ = {k: float((t2[k].double() - t1[k].double()).abs().max()) for k in t1
              if t2[k].dtype != t1[k].dtype or not torch.equal(t2[k], t1[k])}
    assert not differ
    assert c2 == c1  # fingerprint (sampled from the shards), slots, added biases, versions: all the same
    assert c1["base_model"]["fingerprint"].startswith("sha256:")
    assert any(t1[k].abs().max() > 0 for k in t1 if k.startswith("bias:"))  # the biases really trained
    # only rank 0 wrote: no second artifact, no leftover temporary folders
    assert sorted(p.name for p in (runs[1] / "artifact").iterdir()) == \
        sorted(p.name for p in (runs[0] / "artifact").iterdir())
    assert not [p for p in runs[1].iterdir() if p.name.startswith(".")]


@pytest.mark.slow  # two spawned processes import torch and transformers: ~30 s on a shared CPU
def test_fsdp2_run_folder_saved_from_every_rank(runs):
    one, two = runs
    assert json.loads((two / "run" / "task.json").read_text()) == {"task": "instruct"}
    assert sorted(p.name for p in (two / "run").iterdir()) == sorted(p.name for p in (one / "run").iterdir())
    for name in ("bitfit_model.safetensors", "bitfit_config.json"):
        assert (two / "run" / name).read_bytes() == (one / "run" / name).read_bytes()
        assert (two / "run" / name).read_bytes() == (two / "artifact" / name).read_bytes()


@pytest.mark.slow  # two spawned processes import torch and transformers: ~30 s on a shared CPU
def test_fsdp2_trainer_checkpoint_holds_the_trained_tensors_only(runs):
    from safetensors.torch import load_file

    one, two = runs
    a, b = (load_file(str(r / "checkpoint" / "model.safetensors")) for r in (one, two))
    trained = {n for n, p in _model(preset="all", add_missing=True).named_parameters() if p.requires_grad}
    assert set(a) == set(b) == trained
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_artifact_unsharded_written_by_the_main_process_only(tmp_path):
    from bitfit.training.runfolder import save_run_artifact

    model = _model(preset="all")
    assert save_run_artifact(model, tmp_path / "other", {"task": "x"}, main=False) is None
    assert not (tmp_path / "other").exists()
    assert save_run_artifact(model, tmp_path / "main", {"task": "x"}) == "bitfit"
    assert json.loads((tmp_path / "main" / "task.json").read_text()) == {"task": "x"}
    assert (tmp_path / "main" / "bitfit_model.safetensors").exists()


@pytest.mark.slow  # two spawned processes import torch and transformers: ~30 s on a shared CPU
def test_fsdp2_merge(runs):
    one, two = (json.loads((r / "result.json").read_text()) for r in runs)
    assert two["refused"] and "no place" in two["refused"] and two["refused"] == one["refused"]
    m1, m2 = (torch.load(r / "merged.pt") for r in runs)
    assert sorted(m1) == sorted(m2)
    for k in m1:
        assert torch.equal(m2[k], m1[k]), k


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


def _killed_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank 1 dies after the first save; rank 0's next save fails with an error and the artifact stays."""
    import datetime

    import torch.distributed as dist

    import bitfit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    model = _shard(_model(preset="all", add_missing=True))
    _train(model, rank, world)
    bitfit.save(model, Path(out) / "artifact")
    dist.barrier()
    if rank == 0:
        (Path(out) / "first.bin").write_bytes((Path(out) / "artifact" / "bitfit_model.safetensors").read_bytes())
    dist.barrier()
    if rank == 1:
        os._exit(3)  # killed: no goodbye to the process group
    error = None
    try:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)  # a different artifact, were it written
        bitfit.save(model, Path(out) / "artifact")
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        error = f"{type(exc).__name__}: {exc}"
    (Path(out) / "error.txt").write_text(str(error))
    os._exit(0)


@pytest.mark.slow  # two spawned processes
def test_fsdp2_killed_rank_leaves_last_artifact(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_killed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    for p in ctx.processes:
        p.join(timeout=240)
    assert [p.exitcode for p in ctx.processes] == [0, 3]
    error = (tmp_path / "error.txt").read_text()
    assert error != "None" and error  # the save on the surviving rank ended with an error, not a hang
    _, tensors = _written(tmp_path / "artifact")  # the last artifact intact and readable: the first save's
    assert tensors and (tmp_path / "artifact" / "bitfit_model.safetensors").read_bytes() == \
        (tmp_path / "first.bin").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_artifact_bytes_do_not_depend_on_the_process(tmp_path):
    """safetensors writes its header metadata in hash-map order, which changes from process to process; the
    artifact's keys are put in sorted order, so the same model gives the same bytes (and weights_sha256) in any
    process, the two ranks' run and the one process's included."""
    import bitfit

    model = make("bert")
    bitfit.apply(model)
    bitfit.save(model, tmp_path / "a")
    raw = (tmp_path / "a" / "bitfit_model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert raw[8:8 + n].startswith(b'{"__metadata__":{"bitfit":'), raw[8:60]


@pytest.mark.slow  # torchrun with 2 processes: ~25 s on a shared CPU
def test_train_with_fsdp_flags_on_cpu_says_it_runs_ddp(tmp_path):
    import shutil

    import transformers as T
    from test_instruct import EXAMPLES, make_tokenizer

    if shutil.which("torchrun") is None or shutil.which("bitfit") is None:
        pytest.skip("torchrun or the bitfit command is not installed")
    tok = make_tokenizer()
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                        bos_token_id=1, eos_token_id=2, attention_bias=True)
    torch.manual_seed(0)
    T.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in EXAMPLES))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), "--no-python",
                        "bitfit", "train", "--model", str(tmp_path / "llama"), "--task", "instruct",
                        "--train-file", str(data), "--output-dir", str(tmp_path / "run"), "--max_steps", "2",
                        "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "true",
                        "--use_cpu", "true", "--ddp_backend", "gloo", "--fsdp", "full_shard auto_wrap",
                        "--fsdp_config", json.dumps({"fsdp_version": 2,
                                                     "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # Accelerate builds no FSDP plugin for CPU processes: the run is DDP, and says so once
    assert r.stderr.count("--fsdp is not in effect") == 1
    assert (tmp_path / "run" / "bitfit_model.safetensors").exists()
