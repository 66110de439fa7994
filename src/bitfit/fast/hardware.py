"""``frozen_dtype="auto"``: the fastest frozen-weight precision whose accuracy matches float32, chosen
for the hardware the run is on.

BitFit's frozen weights need no gradient and no more precision than inference. The candidates, from
the most exact down (docs/PERFORMANCE.md): ``float32``, ``float16`` (only on CPUs with native fp16
matmuls: AVX512-FP16 or AMX-FP16), ``bfloat16`` (bf16 weights, autocast), ``int8-fbgemm`` (float32
weights, int8 training matmuls on fbgemm: bitfit.fast.int8_fbgemm) and ``int8`` (bf16 plus int8
training matmuls on ``torch._int_mm``). Which one is fastest depends on the machine: bf16 needs
AVX512-BF16 or AMX to beat float32 on a CPU, ``int8`` beats bf16 on AVX512-VNNI CPUs without AMX but
loses to it on Intel Xeons with AMX, and on CPUs with AVX2 only (no AVX-512, VNNI or AMX) bf16 and
``int8`` run many times slower than float32 while ``int8-fbgemm`` runs at about half its time.

So on a CPU the choice is **measured**: a probe of about a second times the two matmuls a frozen
Linear runs in a training step (the forward and the input gradient, BERT-base FFN shape) in each
mode, and picks the fastest, preferring the more exact mode unless a lower precision is at least
``MARGIN`` faster. A mode more than ``SCREEN_SLOWER`` times slower than float32 on a 32-token screen is
not timed further (its table entry is the screen's time scaled to the probe's token count), so machines
where bf16 is emulated still probe in a few seconds. The result is cached per machine (CPU model and flags, torch version, thread
count) in ``$BITFIT_CACHE_DIR`` (default ``~/.cache/bitfit``), so later runs start at once.
On CUDA: bfloat16 where the GPU supports it, else float32. Elsewhere (MPS, XPU...): float32.
``BITFIT_FROZEN_DTYPE=bfloat16`` (or any mode of ``MODES``) overrides the choice without a probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

MARGIN = 1.15  # a lower-precision mode must be this much faster than the next more exact one
MODES = ("float32", "float16", "bfloat16", "int8-fbgemm", "int8")  # the most exact first
SCREEN_TOKENS, SCREEN_SLOWER = 32, 4.0  # a mode this much slower than float32 on the screen is not timed further
_FP16_FLAGS = ("avx512_fp16", "amx_fp16")  # native fp16 matmuls; elsewhere CPU fp16 is emulated
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile",
          "avx512_fp16", "amx_fp16")
_CACHE_VERSION = 2
# environment variables that cap the instruction sets of PyTorch's, fbgemm's, oneDNN's and MKL's kernels
_ISA_CAPS = ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
             "MKL_ENABLE_INSTRUCTIONS")


@dataclass
class DtypeChoice:
    """What ``frozen_dtype="auto"`` picked, and why."""

    dtype: str  # one of MODES
    reason: str
    device: str
    cpu: Optional[str] = None
    timings_ms: dict = field(default_factory=dict)  # mode -> probe time (CPU only)
    cached: bool = False
    measured: Optional[str] = None  # when the CPU probe ran (UTC, ISO 8601)
    cache_file: Optional[str] = None  # where the probe's result is kept

    @property
    def frozen_dtype(self) -> Optional[str]:
        """The value for ``BitFitConfig.frozen_dtype`` (None for float32)."""
        return None if self.dtype == "float32" else self.dtype

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        t = ", ".join(f"{k} {v:.1f} ms" for k, v in self.timings_ms.items())
        line = f"frozen_dtype=auto -> {self.dtype} on {self.cpu or self.device}: {self.reason}" + (f" ({t})" if t else "")
        if self.cached:
            return (line + f"; cached from {(self.measured or 'an earlier run').replace('T', ' ')}, delete "
                    f"{self.cache_file} to re-measure")
        if self.timings_ms:
            return line + "; measured now" + (f", cached in {self.cache_file}" if self.cache_file else "")
        return line


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list:
    """The matmul-relevant CPU features present (from /proc/cpuinfo; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _FLAGS if f in have]
    except OSError:
        pass
    return []


def cpu_summary() -> str:
    """One line naming this CPU for benchmark logs: model (family/model numbers), every AVX-512, AMX and
    VNNI flag, torch's kernel level, and the variables that cap the instruction sets the kernels use."""
    info, flags = {}, []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model") and key not in info:
                info[key] = val.strip()
            elif key == "flags" and not flags:
                flags = sorted(f for f in val.split() if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni"))
    except OSError:
        pass
    where = f" (family {info['cpu family']} model {info['model']})" if len(info) == 2 else ""
    caps = [f"{k}={os.environ[k]}" for k in _ISA_CAPS if os.environ.get(k)]
    return (f"{cpu_model()}{where}; flags: {' '.join(flags) or 'unknown'}; torch {torch.__version__} kernels "
            f"{torch.backends.cpu.get_cpu_capability()}" + (f"; capped by {' '.join(caps)}" if caps else ""))


def _cache_path() -> Path:
    root = os.environ.get("BITFIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bitfit")
    return Path(root) / "frozen_dtype.json"


def _key() -> str:
    parts = [str(_CACHE_VERSION), cpu_model(), ",".join(cpu_flags()), torch.__version__, str(torch.get_num_threads()),
             torch.backends.cpu.get_cpu_capability()]
    parts += [os.environ.get(k, "") for k in _ISA_CAPS]  # kernels capped below the CPU's instruction sets
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _step(mode: str, tokens: int, d_in: int, d_out: int):
    """A function running forward + input gradient of a frozen Linear in ``mode`` once."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(d_out, d_in, generator=g) * 0.02
    x = torch.randn(tokens, d_in, generator=g)
    grad = torch.randn(tokens, d_out, generator=g)
    if mode == "int8":
        from .int8 import Int8Matmuls, rowwise_int8

        wq, ws = rowwise_int8(w)
        ws = ws.reshape(-1)
        xb = x.to(torch.bfloat16).requires_grad_(True)
        gb = grad.to(torch.bfloat16)

        def step():
            with torch.enable_grad():
                Int8Matmuls.apply(xb, None, wq, ws, torch.bfloat16).backward(gb)
        return step
    if mode == "int8-fbgemm":
        from .int8_fbgemm import FbgemmMatmuls, pack_weight, weight_levels

        levels = weight_levels()
        fwd, bwd = pack_weight(w, levels), pack_weight(w.t(), levels)
        xf = x.clone().requires_grad_(True)

        def step():
            with torch.enable_grad():
                FbgemmMatmuls.apply(xf, None, fwd, bwd, torch.float32).backward(grad)
        return step
    dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[mode]
    wd, gd, xd = w.to(dt), grad.to(dt), x.to(dt)

    def step():
        with torch.no_grad():
            y = xd @ wd.t()
            (y + gd) @ wd  # the input gradient's matmul (the add keeps it from being a no-op)
    return step


def _time_mode(mode: str, tokens: int, d_in: int, d_out: int, repeats: int) -> float:
    """Seconds (process CPU time per thread, best of ``repeats``) of forward + input gradient of a frozen
    Linear in ``mode``."""
    step = _step(mode, tokens, d_in, d_out)
    step()  # warm-up (kernel selection, AMX tile configuration)
    best = float("inf")
    threads = max(1, torch.get_num_threads())
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall, cpu = time.perf_counter() - t0, (time.process_time() - c0) / threads
        best = min(best, max(wall, cpu) if threads == 1 else wall)
    return best


def probe_modes() -> list:
    """The modes worth timing on this CPU: float16 only with native fp16 matmuls, int8-fbgemm only where
    PyTorch's fbgemm engine runs."""
    from .int8_fbgemm import available

    flags = set(cpu_flags())
    return [m for m in MODES if (m != "float16" or flags & set(_FP16_FLAGS)) and (m != "int8-fbgemm" or available())]


def probe_cpu(tokens: int = 512, d_in: int = 768, d_out: int = 3072, repeats: int = 3,
              screen: int = SCREEN_TOKENS) -> dict:
    """Milliseconds per mode of a frozen Linear's training matmuls on this CPU (best of ``repeats``).
    A mode over ``SCREEN_SLOWER`` times float32's time on a ``screen``-token run is timed no further: its
    entry is that run's time scaled to ``tokens``."""
    out: dict = {}
    base = None
    for mode in probe_modes():
        try:
            if mode != "float32" and 0 < screen < tokens:
                if base is None:
                    base = _time_mode("float32", screen, d_in, d_out, 1)
                quick = _time_mode(mode, screen, d_in, d_out, 1)
                if quick > SCREEN_SLOWER * base:
                    out[mode] = 1000.0 * quick * tokens / screen
                    continue
            out[mode] = 1000.0 * _time_mode(mode, tokens, d_in, d_out, repeats)
        except (RuntimeError, NotImplementedError):  # e.g. no int8 matmul kernel on this build
            continue
    return out


def pick(timings: dict) -> tuple[str, str]:
    """(mode, reason) from probe timings: walk MODES from float32 down in precision, moving to a mode only
    when it is at least MARGIN faster than the current pick (modes without a timing are passed over).

    The probe times only the frozen Linears' matmuls, and the two int8 modes differ in what else they
    run: ``int8`` runs everything outside the frozen Linears (attention, activations, the head) and its
    evaluation in bf16, ``int8-fbgemm`` in float32. So ``int8`` is passed over where bf16 is more than
    SCREEN_SLOWER times slower than float32 (bf16 emulated: CPUs without AVX512-BF16/AMX, where
    ``torch._int_mm`` may still be fast), and where bf16 runs at least as fast as float32 it is tried
    before ``int8-fbgemm``, which must then beat it by MARGIN: with bf16 outside the matmuls its whole
    run is faster than the matmuls alone show (docs/PERFORMANCE.md, AMD EPYC with AVX-512)."""
    if "float32" not in timings:
        return "float32", "no probe timing for float32"
    bf16 = timings.get("bfloat16", float("inf"))
    bf16_slow = bf16 > SCREEN_SLOWER * timings["float32"]
    order = list(MODES[1:])
    if bf16 <= timings["float32"]:
        order.remove("int8")
        order.insert(order.index("int8-fbgemm"), "int8")
    choice = "float32"
    for mode in order:
        if mode == "int8" and bf16_slow:
            continue
        if mode in timings and timings[mode] * MARGIN <= timings[choice]:
            choice = mode
    if choice == "float32":
        return choice, f"no lower precision was {MARGIN:.2f}x faster than float32 here"
    speed = timings["float32"] / timings[choice]
    return choice, f"{speed:.1f}x faster than float32 in the probe"


def choose_frozen_dtype(device=None, *, use_cache: bool = True) -> DtypeChoice:
    """The frozen dtype ``frozen_dtype="auto"`` uses on ``device`` (a torch device or string; default CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    forced = os.environ.get("BITFIT_FROZEN_DTYPE")
    if forced:
        name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "int8_fbgemm": "int8-fbgemm"}.get(forced.strip().lower(), forced.strip().lower())
        if name not in MODES:
            from ..errors import BitFitConfigError

            raise BitFitConfigError(f"BITFIT_FROZEN_DTYPE={forced!r} is not one of {', '.join(MODES)}; unset it "
                                    "or pick one of those")
        return DtypeChoice(name, "set by BITFIT_FROZEN_DTYPE", dev.type, cpu_model() if dev.type == "cpu" else None)
    if dev.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return DtypeChoice("bfloat16" if ok else "float32",
                           "the GPU supports bfloat16" if ok else "the GPU has no bfloat16 support", "cuda",
                           torch.cuda.get_device_name(dev) if torch.cuda.is_available() else None)
    if dev.type != "cpu":
        return DtypeChoice("float32", f"no measured low-precision mode for {dev.type}", dev.type)
    path, key = _cache_path(), _key()
    cache: dict = {}
    if use_cache:
        try:
            cache = json.loads(path.read_text())
            if not isinstance(cache, dict):
                cache = {}
        except (OSError, ValueError):
            cache = {}
        hit = cache.get(key)
        if isinstance(hit, dict) and hit.get("dtype") in MODES and isinstance(hit.get("timings_ms"), dict):
            mode, reason = pick(hit["timings_ms"])  # the cached timings under the current rules
            return DtypeChoice(mode, reason, "cpu", cpu_model(), hit["timings_ms"], cached=True,
                               measured=hit.get("measured"), cache_file=str(path))
    timings = probe_cpu()
    mode, reason = pick(timings)
    choice = DtypeChoice(mode, reason, "cpu", cpu_model(), {k: round(v, 2) for k, v in timings.items()},
                         measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if use_cache:
        cache[key] = {"dtype": mode, "reason": reason, "timings_ms": choice.timings_ms, "cpu": cpu_model(),
                      "flags": cpu_flags(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "measured": choice.measured}
        try:
            from ..core.io import atomic_write_json

            atomic_write_json(path, cache)
            choice.cache_file = str(path)
        except OSError:
            pass  # a read-only home: probe again next time
    return choice
