"""Refusing a damaged GGUF file before transformers reads it.

An interrupted download or copy leaves a short ``.gguf`` file; transformers' GGUF reader then fails deep inside
with a message that names neither the file nor the cause ("cannot reshape array of size ...", a raw
``struct.error`` for a file cut inside its header), and a caller that falls back to the Hub reports a Hub
failure for a local file. :func:`check_gguf_file` walks the header, the metadata and the tensor table (a
linear scan of the small front of the file, not of the weights) and checks that every tensor's data lies inside
the file; it raises one line naming the file, its size and the fix.
"""

from __future__ import annotations

import mmap
import os
import struct
from functools import lru_cache

from ..errors import BitFitError

GGUF_MAGIC = b"GGUF"
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


class _Short(Exception):
    """The file ends (or holds nonsense) where the GGUF layout needs more."""


def _fail(path: str, size: int, why: str) -> BitFitError:
    return BitFitError(
        f"GGUF file {path} ({size:,} bytes) is damaged or truncated: {why}. An interrupted download or copy leaves "
        "such a file: download or copy it again (check its size or checksum against the source), or check the "
        "--model path"
    )


def _quant_sizes() -> dict:
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:  # without the gguf package, transformers reports it on load; extents are not checked
        return {}
    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def _scan(buf, size: int, tensors: int, kvs: int):
    """(tensor extents past the data start: [(name, end)], data start) of a GGUF v2/v3 file's front."""
    pos = _HEADER.size

    def take(fmt: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > size:
            raise _Short(pos)
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += n
        return value

    def string() -> bytes:
        nonlocal pos
        n = take("<Q")
        if pos + n > size:
            raise _Short(pos)
        pos += n
        return bytes(buf[pos - n:pos])

    def skip_value(kind: int):
        nonlocal pos
        if kind in _FIXED:
            pos += _FIXED[kind]
        elif kind == _STRING:
            string()
        elif kind == _ARRAY:
            item, count = take("<I"), take("<Q")
            if item in _FIXED:
                pos += _FIXED[item] * count
            else:
                for _ in range(count):
                    skip_value(item)
                    if pos > size:
                        raise _Short(pos)
        else:
            raise _Short(pos)
        if pos > size:
            raise _Short(pos)

    alignment = 32
    for _ in range(kvs):
        key, kind = string(), take("<I")
        if key == b"general.alignment" and kind == 4:
            alignment = take("<I") or 32
        else:
            skip_value(kind)
    sizes, extents = _quant_sizes(), []
    for _ in range(tensors):
        name = string().decode("utf-8", "replace")
        dims = [take("<Q") for _ in range(take("<I"))]
        kind, offset = take("<I"), take("<Q")
        if kind in sizes:
            block, nbytes = sizes[kind]
            count = 1
            for d in dims:
                count *= d
            extents.append((name, offset + count // block * nbytes))
    start = -(-pos // alignment) * alignment
    return extents, start


@lru_cache(maxsize=32)
def _check(path: str, size: int, mtime_ns: int) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                raise _fail(path, size, f"it ends inside the {_HEADER.size}-byte GGUF header")
            magic, version, tensors, kvs = _HEADER.unpack(head)
            if magic != GGUF_MAGIC:
                raise _fail(path, size, f"it does not start with the GGUF magic bytes (found {magic!r})")
            if version < 2:  # GGUF v1 (32-bit counts) predates llama.cpp's current files: left to transformers
                return
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    extents, start = _scan(buf, size, tensors, kvs)
                except _Short as exc:
                    raise _fail(path, size, f"it ends inside its metadata or tensor table (byte {exc.args[0]:,}; "
                                            f"{kvs} metadata entries, {tensors} tensors)") from None
    except OSError as exc:
        raise BitFitError(f"GGUF file {path} cannot be read ({exc.strerror or exc}); check the --model path and "
                          "its permissions") from None
    for name, end in extents:
        if start + end > size:
            raise _fail(path, size, f"tensor {name} ends at byte {start + end:,}, past the end of the file (the file "
                                    f"needs at least {max(start + e for _, e in extents):,} bytes)")


def check_gguf_file(path) -> None:
    """Raise a one-line :class:`BitFitError` when ``path`` is not a complete, readable GGUF file (the result is
    kept per file, size and modification time: loading a model and its tokenizer checks once)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BitFitError(f"GGUF file {path} cannot be read ({exc.strerror or exc}); check the --model path") from None
    _check(path, st.st_size, st.st_mtime_ns)
