"""Crash-safe artifact folders on disk: the write protocol, folder locks and recovery.

A save writes the new files to a hidden folder ``.NAME.tmp-<pid>-<hex>`` beside the artifact and
flushes them to disk; then the old folder is renamed to ``.NAME.bak-<pid>-<hex>``, its other
files (logs, tokenizer, checkpoints) are moved into the new folder, the new folder is renamed
into place and the backup removed. Where the folder cannot be renamed (a mount point, the
working directory) the two files are replaced one by one, the config (with the checksum) last.
A ``flock`` on the parent folder keeps saves (exclusive) and reads (shared) from interleaving.
Whatever a killed save left (a missing folder, side folders) is repaired by the next save or
read. Files and folders get the modes the umask gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Optional

import safetensors.torch

from ..core.io import file_mode, fsync_dir
from ..errors import ArtifactError
from .format import CONFIG_NAME, FORMAT, WEIGHTS_NAME


def sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_LOCK_TIMEOUT_S = 120.0
_OLD_STYLE_STALE_S = 600.0  # tempfile.mkdtemp leftovers of older bitfit versions (no pid in the name)
_SIDE = re.compile(r"^(?P<kind>tmp|bak)-(?:(?P<pid>\d+)-[0-9a-f]{8}|(?P<old>[a-z0-9_]{8}))$")


@contextlib.contextmanager
def _locked(folder: Path, exclusive: bool):
    """flock on the folder holding artifacts: saves (exclusive) and reads (shared) of artifacts in
    it never interleave, so a reader never sees a folder mid-swap. Yields whether a lock is held
    (False where the platform or file system has none: the rename protocol alone then applies)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        held, deadline = False, time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ArtifactError(
                        f"{folder} has been locked by another bitfit save or load for {_LOCK_TIMEOUT_S:.0f} s; "
                        "wait for that process to finish (or stop it) and try again"
                    ) from None
                time.sleep(0.005)
            except OSError:  # no flock on this file system
                break
        yield held
    finally:
        os.close(fd)  # releases the lock


def _make_side_folder(path: Path, kind: str) -> Path:
    """A new empty folder ``.NAME.<kind>-<pid>-<hex>`` beside ``path`` (mode 0o777 & ~umask)."""
    for _ in range(100):
        side = path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(side, 0o777)  # the kernel applies the umask (mkdtemp would make it 0700)
            return side
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary folder beside {path}")


def _side_name(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _sort_metadata(weights: Path) -> None:
    """Put the safetensors header's ``__metadata__`` keys in sorted order. safetensors writes them in hash-map
    order, which changes from process to process: the same tensors would give other bytes (and another
    ``weights_sha256``) on every save. Same keys, same length: the header is rewritten in place."""
    with open(weights, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        md = header.get("__metadata__")
        if not isinstance(md, dict) or len(md) < 2:
            return
        start = raw.index(b'"__metadata__":') + len(b'"__metadata__":')
        end = raw.index(b"}", start) + 1  # metadata values are strings without braces (format, pt, FORMAT)
        fixed = json.dumps(dict(sorted(md.items())), separators=(",", ":")).encode()
        if len(fixed) != end - start or json.loads(raw[start:end]) != md:
            return  # not the layout expected: leave the file as safetensors wrote it
        f.seek(8 + start)
        f.write(fixed)


def _write_files(folder: Path, meta: dict, tensors: dict) -> None:
    """Tensor file, then the config with its checksum; both flushed to disk, then the folder."""
    weights = folder / WEIGHTS_NAME
    safetensors.torch.save_file(tensors, str(weights), metadata={"format": "pt", "bitfit": FORMAT})
    _sort_metadata(weights)
    os.chmod(weights, file_mode())  # safetensors creates it 0600 whatever the umask
    fd = os.open(weights, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    meta["weights_sha256"] = sha256(weights)
    with open(folder / CONFIG_NAME, "w", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def _extras(folder: Path) -> list:
    """Entries of an artifact folder that are not the artifact's own two files."""
    try:
        return sorted(n for n in os.listdir(folder) if n not in (WEIGHTS_NAME, CONFIG_NAME))
    except OSError:
        return []


def _move_extras(src: Path, dst: Path) -> bool:
    """Move every non-artifact entry of ``src`` into ``dst`` (never over an existing one); True if all moved."""
    ok = True
    for n in _extras(src):
        if os.path.lexists(dst / n):
            ok = False
            continue
        try:
            os.rename(src / n, dst / n)
        except OSError:
            ok = False
    return ok


def _swappable(path: Path) -> bool:
    try:
        return not os.path.ismount(path) and not os.path.samefile(path, os.getcwd())
    except OSError:
        return True


def _swap(path: Path, tmp: Path) -> bool:
    """Replace the folder ``path`` by the complete folder ``tmp``; False (nothing changed) if
    ``path`` cannot be renamed (a mount point, the working directory, no permission)."""
    if not _swappable(path):
        return False
    bak = _side_name(path, "bak")
    try:
        os.rename(path, bak)
    except OSError:
        return False
    try:
        if not _move_extras(bak, tmp):
            raise ArtifactError(f"could not move the other files of {path} into the new artifact folder")
        os.rename(tmp, path)
    except BaseException:  # put the old folder back as it was
        _move_extras(tmp, bak)
        if not os.path.lexists(path):
            os.rename(bak, path)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(bak, ignore_errors=True)
    return True


def _replace_in_place(path: Path, tmp: Path) -> None:
    """Fallback where the folder cannot be renamed: file by file, the config (with the checksum)
    last. A kill between the two renames leaves a folder that refuses to load (checksum), never
    one that loads wrong values."""
    os.replace(tmp / WEIGHTS_NAME, path / WEIGHTS_NAME)
    os.replace(tmp / CONFIG_NAME, path / CONFIG_NAME)
    fsync_dir(path)
    tmp.rmdir()


def _complete(folder: Path) -> bool:
    """Whether ``folder`` holds an artifact whose tensor file matches the checksum in its config."""
    try:
        meta = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        want = meta.get("weights_sha256") if isinstance(meta, dict) else None
        return isinstance(want, str) and sha256(folder / WEIGHTS_NAME) == want
    except (OSError, ValueError, RecursionError):
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def _side_pattern(kinds) -> "re.Pattern":
    alt = "|".join(re.escape(k) for k in kinds)
    return re.compile(rf"^(?P<kind>{alt})-(?:(?P<pid>\d+)-[0-9a-f]{{8}}|(?P<old>[a-z0-9_]{{8}}))$")


def _leftovers(path: Path, locked: bool, kinds=("tmp", "bak")) -> list:
    """Stale side folders of killed saves to ``path``: (kind, folder, mtime).

    Ours: a folder named ``.NAME.tmp-<pid>-<hex>`` / ``.NAME.bak-<pid>-<hex>`` (or an older
    bitfit's ``.NAME.tmp-<8 chars>``). Stale: while we hold the folder lock no live save can be
    using one (every save holds it throughout); without a lock, one whose process is gone. An
    older bitfit's folder (no pid) counts as stale after 10 minutes.
    """
    head = f".{path.name}."
    out = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return out
    for e in entries:
        if not e.name.startswith(head):
            continue
        m = (_SIDE if kinds == ("tmp", "bak") else _side_pattern(kinds)).match(e.name[len(head):])
        if m is None:
            continue
        try:
            if not e.is_dir(follow_symlinks=False):
                continue
            mtime = e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if m.group("old") is not None:
            stale = time.time() - mtime > _OLD_STYLE_STALE_S
        else:
            stale = locked or not _pid_alive(int(m.group("pid")))
        if stale:
            out.append((m.group("kind"), Path(e.path), mtime))
    return out


def _recover(path: Path, locked: bool) -> Optional[Path]:
    """Finish what killed saves to ``path`` left; returns the folder to read ``path`` from (None if none).

    If ``path`` is missing (a save was killed between renaming the old folder away and the new
    one into place), the complete new folder is renamed to ``path`` (else the old one is put
    back). Files other than the artifact's own two are moved into ``path``, then the side folders
    are removed. Call with the folder lock held (``_locked(path.parent, exclusive=True)``).
    """
    stale = _leftovers(path, locked)
    target: Optional[Path] = path if path.is_dir() else None
    if target is None and stale:
        def rank(x):  # a complete new folder, else a complete old one, else the old folder as it was
            done = _complete(x[1])
            return done, x[0] == ("tmp" if done else "bak"), x[2]

        winner = max(stale, key=rank)
        if winner[0] == "bak" or _complete(winner[1]):
            try:
                os.rename(winner[1], path)
                fsync_dir(path.parent)
                target = path
            except OSError:  # no write permission: read it where it is
                return winner[1]
            stale.remove(winner)
    for _, side, _ in stale:  # never delete a side folder still holding other files of the user's
        if (_move_extras(side, target) if target is not None else not _extras(side)):
            shutil.rmtree(side, ignore_errors=True)
    return target


def write_folder(path, meta: dict, tensors: dict) -> Path:
    """Write the artifact ``meta`` + ``tensors`` to the folder ``path`` atomically; returns the folder.

    A symlink to a folder keeps the link and replaces the folder it points to. The folder lock is
    held throughout; what killed saves left is repaired first.
    """
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if path.is_symlink():  # replace the folder the link points to, keep the link
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a folder; give a folder path for the artifact")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent, exclusive=True) as locked:
        _recover(path, locked)
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"{path} exists and is not a folder; give a folder path for the artifact")
        tmp = _make_side_folder(path, "tmp")
        try:
            _write_files(tmp, meta, tensors)
            if not path.exists():
                os.rename(tmp, path)
                fsync_dir(path.parent)
            elif not _swap(path, tmp):
                _replace_in_place(path, tmp)
        except BaseException:
            if tmp.exists() and not _extras(tmp):  # (with other files in it: left for _recover)
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


@contextlib.contextmanager
def reading(path: Path):
    """Yield the folder to read the artifact at ``path`` (absolute) from, under a shared lock so that
    no save swaps it while its two files are read. A folder caught mid-replace by a killed save is
    put back first; no folder at all is an :class:`ArtifactError`."""
    src = path
    if not path.is_dir():
        if os.path.lexists(path):
            raise ArtifactError(f"no artifact at {path}: it is a file, not a folder (bitfit.save writes a folder)")
        src = None
        if path.parent.is_dir():
            with _locked(path.parent, exclusive=True) as locked:  # a save killed mid-replace: put the folder back
                src = _recover(path, locked)
        if src is None:
            raise ArtifactError(f"no artifact at {path}: the folder does not exist (bitfit.save writes one)")
    with _locked(path.parent, exclusive=False):
        yield src


# ----------------------------------------------------------------------------- for other writers
def make_side_folder(path, kind: str) -> Path:
    """A new empty hidden folder ``.NAME.<kind>-<pid>-<hex>`` beside ``path`` (mode 0o777 & ~umask), on the
    same file system: what is written there is renamed into place when complete. What a killed
    process left is removed by :func:`remove_stale_side_folders` (the pid in the name says whose it is)."""
    return _make_side_folder(Path(os.path.abspath(os.path.expanduser(str(path)))), kind)


def stale_side_folders(path, kind: str) -> list:
    """The ``.NAME.<kind>-<pid>-<hex>`` folders beside ``path`` whose process is gone (and an older bitfit's
    ``.NAME.<kind>-<8 chars>`` after 10 minutes), oldest first."""
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    return [side for _, side, _ in sorted(_leftovers(path, False, (kind,)), key=lambda x: x[2])]


def remove_stale_side_folders(path, kind: str) -> list:
    """Remove the folders :func:`stale_side_folders` finds; returns them."""
    stale = stale_side_folders(path, kind)
    for side in stale:
        shutil.rmtree(side, ignore_errors=True)
    return stale


@contextlib.contextmanager
def folder_lock(folder, exclusive: bool = True):
    """The lock saves and reads take on a folder holding artifacts (``flock``; waits up to 2 minutes, then
    :class:`ArtifactError`). Yields whether a lock is held (False where the file system has none)."""
    with _locked(Path(os.path.abspath(os.path.expanduser(str(folder)))), exclusive) as held:
        yield held


LOCK_NAME = ".bitfit.lock"


class FolderBusyError(ArtifactError):
    """Another process holds the folder (see :func:`hold_folder`)."""


@contextlib.contextmanager
def hold_folder(folder, what: str = "bitfit"):
    """Hold ``folder`` exclusively for a long job (a training run writing its run folder) or fail at once.

    The lock is a ``flock`` on the file ``.bitfit.lock`` inside the folder (created if missing): a
    file, so that it follows the folder's contents when a save swaps the folder (the save moves the
    other files of the folder, this one included, by rename). It is taken under the parent's folder
    lock, so it is never taken while a save has the folder renamed away. A second holder gets a
    :class:`FolderBusyError` naming the process that holds it. The file is removed on release. Where
    the file system has no ``flock`` the job runs unlocked. Yields the lock file's path.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield None
        return
    folder = Path(os.path.abspath(os.path.expanduser(str(folder))))
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    while True:
        with _locked(folder.parent, exclusive=False):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            raise FolderBusyError(
                f"{folder} is in use by another {what} ({holder or 'another process'}); wait for it to finish, "
                "or choose another folder") from None
        except OSError:  # no flock on this file system
            os.close(fd)
            yield None
            return
        try:  # the file may have been removed (a holder releasing) between our open and flock: take it again
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    except OSError:
        pass
    try:
        yield lock
    finally:
        try:
            here = folder / LOCK_NAME
            if os.path.samestat(os.fstat(fd), os.stat(here)):
                here.unlink()
        except OSError:
            pass
        os.close(fd)
