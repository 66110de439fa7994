"""Refusing a damaged GGUF file before transformers reads it.

An interrupted download or copy leaves a short ``.gguf`` file; transformers' GGUF reader then fails deep inside
with a message that names neither the file nor the cause ("cannot reshape array of size ...", a raw
``struct.error`` for a file cut inside its header), and a caller that falls back to the Hub reports a Hub
failure for a local file. :func:`check_gguf_file` reads the header, the metadata and every tensor's extent
(with the ``gguf`` package, which transformers' GGUF support needs too) and raises one line naming the file,
its size and the fix.
"""

from __future__ import annotations

import os
import struct

from ..errors import BitFitError

GGUF_MAGIC = b"GGUF"
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count


def _fail(path: str, size: int, why: str) -> BitFitError:
    return BitFitError(
        f"GGUF file {path} ({size:,} bytes) is damaged or truncated: {why}. An interrupted download or copy leaves "
        "such a file: download or copy it again (check its size or checksum against the source), or check the "
        "--model path"
    )


def check_gguf_file(path) -> None:
    """Raise a one-line :class:`BitFitError` when ``path`` is not a complete, readable GGUF file."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER.size)
    except OSError as exc:
        raise BitFitError(f"GGUF file {path} cannot be read ({exc.strerror or exc}); check the --model path and "
                          "its permissions") from None
    if len(head) < _HEADER.size:
        raise _fail(path, size, f"it ends inside the {_HEADER.size}-byte GGUF header")
    magic, version, tensors, _ = _HEADER.unpack(head)
    if magic != GGUF_MAGIC:
        raise _fail(path, size, f"it does not start with the GGUF magic bytes (found {magic!r})")
    try:
        import gguf
    except ImportError:  # transformers reports the missing package on load
        return
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader's own errors: struct.error, ValueError (reshape), IndexError ...
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(path, size, f"reading its metadata and {tensors} tensors failed ({type(exc).__name__}: "
                                f"{msg})") from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise _fail(path, size, f"tensor {t.name} ends at byte {end:,}, past the end of the file")
