"""A task merged into its GGUF base as a new GGUF file for llama.cpp / ollama: the base file's metadata and tensors
copied unchanged (quantized tensors stay quantized), the task's biases written as F32 tensors under llama.cpp's
names (``blk.N.attn_q.bias`` ...). Only biases llama.cpp loads for the architecture are written; any other trained
bias is refused, since llama.cpp would silently ignore it and the file would not behave as the task."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.io import file_mode
from ..errors import BitFitError

# bias tensors llama.cpp's loader reads for an architecture (optional ones included), by GGUF tensor kind
BIAS_SLOTS: dict[str, tuple[str, ...]] = {
    "llama": ("attn_q", "attn_k", "attn_v", "attn_output"),
    "qwen2": ("attn_q", "attn_k", "attn_v"),
}
# architectures whose q/k rows llama.cpp stores permuted for its rotary layout (convert_hf_to_gguf's permute)
PERMUTED_QK = {"llama"}


def _permute(values, n_head: int):
    """llama.cpp's q/k row order for ``values`` (HF order), as its converter writes LLaMA q/k tensors."""
    return values.reshape(n_head, 2, values.shape[0] // n_head // 2).swapaxes(1, 2).reshape(values.shape)


def merged_biases(merged, arch: str) -> dict:
    """{GGUF tensor name: float32 numpy array} of every bias of the merged causal LM ``merged``, in llama.cpp's
    names and row order; a bias with no slot in llama.cpp's ``arch`` raises BitFitError naming it."""
    import gguf
    import numpy as np

    cfg = merged.config
    n_blocks = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(archs[arch], n_blocks) if arch in BIAS_SLOTS and arch in archs else None
    slots = BIAS_SLOTS.get(arch, ())
    out, refused = {}, []
    for hf, value in merged.state_dict().items():
        if not hf.endswith(".bias"):
            continue
        name = names.get_name(hf, try_suffixes=(".bias",)) if names is not None else None  # "blk.N.attn_q.bias"
        name = name[:-len(".bias")] if name and name.endswith(".bias") else None
        kind = name.split(".")[-1] if name else None
        if name is None or kind not in slots:
            refused.append(hf)
            continue
        data = value.detach().float().cpu().numpy().astype(np.float32)
        if arch in PERMUTED_QK and kind in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if kind == "attn_q" else (cfg.num_key_value_heads or cfg.num_attention_heads)
            data = _permute(data, heads)
        out[name + ".bias"] = np.ascontiguousarray(data)
    if refused:
        where = f"llama.cpp's {arch!r} architecture has bias slots only for {', '.join(slots)}" if slots else (
            f"bitfit writes GGUF biases only for the architectures {', '.join(BIAS_SLOTS)}, not {arch!r}")
        raise BitFitError(
            f"cannot merge into a GGUF: {len(refused)} trained bias(es) (e.g. {refused[0]}) have no place in the "
            f"file: {where}; train with --preset attention (--roles query,key,value) or merge to a transformers "
            "folder (bitfit merge RUN --output DIR) instead")
    return out


def write_merged_gguf(base_gguf: str, merged, output: str) -> Path:
    """Write ``output``: the GGUF file ``base_gguf`` with the biases of ``merged`` (the task merged into the
    model loaded from that file, ``bitfit.merge``) added or replaced. Written beside ``output`` and renamed into
    place, so a failure leaves no half-written file."""
    try:
        import gguf
    except ImportError:
        raise BitFitError("--gguf needs the gguf package: pip install gguf") from None
    if not type(merged).__name__.endswith("ForCausalLM"):
        raise BitFitError(f"--gguf needs a causal-LM run (--task instruct); this run's model is "
                          f"{type(merged).__name__}, whose head has no place in a GGUF file: merge with --output DIR")
    out = Path(os.path.abspath(os.path.expanduser(output)))
    if out.exists():
        raise BitFitError(f"--gguf {output} exists; choose a new file name")
    reader = gguf.GGUFReader(base_gguf)
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    arch = str(field.contents()) if field is not None else ""
    biases = merged_biases(merged, arch)
    for name, data in biases.items():
        t = next((t for t in reader.tensors if t.name == name), None)
        if t is not None and tuple(int(n) for n in t.shape) != data.shape:
            raise BitFitError(f"--gguf: the base file's {name} has shape {tuple(t.shape)}, the task's bias "
                              f"{data.shape}: the run was not trained on {base_gguf}; pass --model with its base")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        w = gguf.GGUFWriter(str(tmp), arch)
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        for t in reader.tensors:
            if t.name in biases:
                continue
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        for name, data in biases.items():
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, file_mode())
        if out.exists():
            raise BitFitError(f"--gguf {output} was written by another process while this merge ran; choose a "
                              "new file name")
        os.replace(tmp, out)
    except OSError as exc:
        raise BitFitError(f"--gguf {output}: writing the merged GGUF failed ({exc.strerror or exc}); nothing was "
                          "written: free disk space or choose another place") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out

