"""Atomic file and folder writes: build under a temporary sibling name, rename into place when complete.

Every output of the project (checkpoints, exports, similarity matrices, metrics, logs rewritten on resume,
PNG grids, encoded videos, extracted frame folders, synthetic data sets) goes through this module, so that
a crash or an exception never leaves a half-written file under the final name, and never leaves the
temporary one behind either (it is removed on any exception, ``KeyboardInterrupt`` included).

Temporary names live in the target's own folder (``os.replace`` is atomic only within one file system),
start with :data:`TMP_PREFIX` and end with the process id (folders) or the process id, a counter and the
target's suffix (files: writers such as OpenCV, Pillow and NumPy pick the format from the extension).
A process killed outright (SIGKILL, power loss) can still leave one; :func:`pid_of_temp` lets a tool that
shares an output folder between runs tell whose it is.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"
_MAX_TAG_BYTES = 200  # keeps temp names under the usual 255-byte file-name limit
_counter = itertools.count()


def _tag(name: str) -> str:
    raw = name.encode("utf-8", "surrogateescape")
    return name if len(raw) <= _MAX_TAG_BYTES else hashlib.sha1(raw).hexdigest()[:16]


def temp_dir_name(name: str, pid: int | None = None) -> str:
    """Temporary sibling name of a folder called ``name``: ``.tmp-<name>-<pid>`` (long names hashed)."""
    return f"{TMP_PREFIX}{_tag(name)}-{os.getpid() if pid is None else pid}"


def temp_file_path(path: str | os.PathLike) -> Path:
    """A fresh temporary sibling of ``path`` keeping its suffix: ``.tmp-<stem>-<pid>.<n><suffix>``."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{_tag(path.stem)}-{os.getpid()}.{next(_counter)}{path.suffix}")


def pid_of_temp(name: str) -> int | None:
    """The process id in a temporary folder name made by :func:`temp_dir_name`, or None."""
    if not name.startswith(TMP_PREFIX):
        return None
    text = name.rsplit("-", 1)[-1]
    return int(text) if text.isdigit() else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (weights and vector shards are hundreds of MB). The one
    file hash of the project: weight downloads, result records and index checksums must agree on it."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix) to write; rename it to ``path`` on success.

    The body writes the file by any means (``torch.save``, ``np.save``, ``Image.save``, a video writer).
    On an exception the temporary file is removed and ``path`` is left as it was. The parent folder is
    created if needed. A body that writes nothing raises ``FileNotFoundError`` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_path(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{path}: nothing was written")
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``.

    ``durable`` also flushes the bytes to the disk before the rename, for files whose renaming publishes
    other files (an index's pointer to its current generation): then even a power loss cannot leave the new
    name pointing at data the disk never received.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8 by default); returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh, empty temporary folder next to ``path``; swap it into place as ``path`` on success.

    ``replace=False``: ``path`` must not exist or be an empty folder (removed first); otherwise
    ``FileExistsError`` — also when another process created it meanwhile. ``replace=True``: an existing
    ``path`` (folder or file) is moved aside, the new folder renamed in, the old one removed.
    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / temp_dir_name(path.name)
    if tmp.exists():  # our own pid: a leftover of an earlier failed call in this process
        _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if replace and (path.exists() or path.is_symlink()):
            old = path.parent / temp_dir_name("old-" + path.name)
            _remove(old)
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)  # put the previous one back
                raise
            _remove(old)
            return
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()  # an empty folder is not a finished result
        elif path.exists():
            raise FileExistsError(f"{path}: already exists")
        try:
            os.rename(tmp, path)
        except OSError as e:
            if path.exists():
                raise FileExistsError(f"{path}: already exists (written by another run?)") from None
            raise OSError(f"{path}: cannot move the finished folder into place ({e.strerror or e})") from None
    except BaseException:
        _remove(tmp)
        raise


__all__ = [
    "TMP_PREFIX",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "pid_of_temp",
    "temp_dir_name",
    "temp_file_path",
]
