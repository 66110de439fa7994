"""A GPU check of BitFit's sharded path against LoRA, ready to run on a machine with one CUDA GPU.

On one GPU (one rank; the same code path as N ranks), on a randomly initialised LLaMA-shaped model with
q/k/v biases (``--size``: ``small`` ~0.3B, ``1b`` ~1.1B; nothing is downloaded), it runs a few training
steps of each variant and prints the median step time and the peak GPU memory (``max_memory_allocated``):

- ``bitfit-fsdp2-bf16``: ``bitfit.apply(preset="all", add_missing=True, frozen_dtype="bfloat16")`` (frozen base
  in bf16, trained biases float32), then ``fully_shard`` on each decoder layer and the root with
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)``, activation checkpointing, AdamW; then
  ``bitfit.save`` from the sharded model (checked to load back);
- ``bitfit-bf16``: the same without FSDP2;
- ``bitfit-4bit``: the base quantised to 4 bits through bitsandbytes (nf4, bf16 compute), if installed;
- ``lora-r8-bf16``: peft LoRA r=8 (q_proj, v_proj) on the same bf16 base, if peft is installed.

Without CUDA it prints ``skipped: no CUDA`` and exits 0. It finishes in well under 5 minutes on one
H100 (``--size 1b``, batch 4 x 512 tokens, 3 warm-up + 8 timed steps per variant).

Usage::

    python benchmarks/gpu_check.py                  # --size 1b --batch 4 --seq 512 --steps 8
    python benchmarks/gpu_check.py --size small --markdown /tmp/gpu_check.md
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

SIZES = {
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
}


def _config(size: str):
    import transformers as T

    return T.LlamaConfig(**SIZES[size], attention_bias=True, max_position_embeddings=2048, tie_word_embeddings=False)


def _model(size: str, dtype=torch.float32):
    import transformers as T

    torch.manual_seed(0)
    with torch.device("cuda"):
        return T.LlamaForCausalLM(_config(size)).to(dtype)


def _init_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29631")
        dist.init_process_group("nccl", rank=0, world_size=1)


def _bitfit(model, fsdp: bool, frozen_dtype):
    import bitfit

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bitfit.apply(model, preset="all", add_missing=True, frozen_dtype=frozen_dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        _init_group()
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def _lora(model):
    from peft import LoraConfig, get_peft_model

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def _four_bit(size: str):
    import transformers as T

    with tempfile.TemporaryDirectory() as d:  # from_pretrained quantises while it loads: write the model first
        torch.manual_seed(0)
        T.LlamaForCausalLM(_config(size)).to(torch.bfloat16).save_pretrained(d)
        q = T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        return T.LlamaForCausalLM.from_pretrained(d, quantization_config=q, device_map={"": 0})


def _steps(model, batch: int, seq: int, steps: int, warmup: int = 3) -> tuple[float, float, int]:
    """(median step seconds, peak GiB, trainable count) of forward + backward + AdamW steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    model.train()
    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss.detach()).all():
        raise RuntimeError("non-finite loss")
    n = sum(getattr(p, "ds_numel", None) or p.numel() for p in params)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30, n


def _save_check(model, size: str) -> str:
    import bitfit

    with tempfile.TemporaryDirectory() as d:
        bitfit.save(model, os.path.join(d, "artifact"))
        fresh = _model(size, torch.bfloat16)
        bitfit.load(fresh, os.path.join(d, "artifact"))
        del fresh
    return "saved from the sharded model and loaded back"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--markdown", help="also write the table to this file")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA (this check needs one CUDA GPU)")
        return 0
    import importlib.util

    name = torch.cuda.get_device_name(0)
    print(f"gpu_check on {name}, torch {torch.__version__}, LLaMA {a.size}, batch {a.batch} x {a.seq} tokens",
          flush=True)
    variants = [("bitfit-fsdp2-bf16", lambda: _bitfit(_model(a.size), True, "bfloat16")),
                ("bitfit-bf16", lambda: _bitfit(_model(a.size), False, "bfloat16"))]
    if importlib.util.find_spec("bitsandbytes"):
        variants.append(("bitfit-4bit", lambda: _bitfit(_four_bit(a.size), False, None)))
    else:
        print("bitfit-4bit: skipped (bitsandbytes is not installed)")
    if importlib.util.find_spec("peft"):
        variants.append(("lora-r8-bf16", lambda: _lora(_model(a.size, torch.bfloat16))))
    else:
        print("lora-r8-bf16: skipped (peft is not installed)")
    rows = []
    t_start = time.time()
    for label, build in variants:
        try:
            model = build()
            sec, gib, n = _steps(model, a.batch, a.seq, a.steps)
            note = _save_check(model, a.size) if label == "bitfit-fsdp2-bf16" else ""
            rows.append((label, sec, gib, n, note))
            print(f"{label}: {sec * 1000:.1f} ms/step, peak {gib:.2f} GiB, {n:,} trainable {note}", flush=True)
        except Exception as exc:  # noqa: BLE001 - one variant failing is a result: report it, go on
            rows.append((label, None, None, None, f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
            print(f"{label}: failed: {type(exc).__name__}: {exc}", flush=True)
        model = None
        gc.collect()
        torch.cuda.empty_cache()
    lines = [f"GPU: {name}; LLaMA {a.size} (random weights, q/k/v biases), batch {a.batch} x {a.seq} tokens, "
             f"median of {a.steps} steps", "", "| variant | ms/step | peak GiB | trainable | note |", "|---|---:|---:|---:|---|"]
    for label, sec, gib, n, note in rows:
        lines.append(f"| {label} | {'' if sec is None else f'{sec * 1000:.1f}'} | "
                     f"{'' if gib is None else f'{gib:.2f}'} | {'' if n is None else f'{n:,}'} | {note} |")
    print("\n".join(lines))
    print(f"total {time.time() - t_start:.0f} s")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 1 if any(r[1] is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
