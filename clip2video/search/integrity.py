"""Checking that an index is the one its build wrote: sizes and SHA-256 of every file, SQLite's own check.

A build records, in the manifest, the size and SHA-256 of every file the generation reads (its FAISS index and
SQLite database, the vector shards and their item lists), the manifest's own SHA-256 beside it
(``manifest.sha256``) and, in the SQLite ``files`` table, each thumbnail's size, modification time and SHA-256
(``store.py``). :func:`verify_generation` compares the disk with that record:

- **cheap** (every open by ``query`` and ``serve``): ``CURRENT`` and the manifest's checksum (``store.read_manifest``),
  every recorded file present, a regular file and of its recorded size, the small ones (at most
  :data:`SMALL_FILE` bytes) hashed, and SQLite's ``PRAGMA quick_check``. This catches a truncated or missing
  file, an edited manifest, a damaged item list or (small) database, a garbled database page.
- **full** (``search.py verify``, the first open of each generation after its build, and every start of
  ``serve``): every file hashed, and every thumbnail. This also catches bytes garbled in place inside a large
  file (a FAISS index or a vector shard of the same size).

After a full check succeeds, a stamp in the generation folder (``verified``: the manifest's SHA-256) makes the
next opens cheap; where the folder is read-only there is no stamp and every open checks fully. Any mismatch is
one :class:`~clip2video.search.store.IndexFormatError` line naming the file. Content hashes with a signed-off
manifest are how restic and git detect damage; the first-open-then-stamp rule is ours.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from clip2video import fileio
from clip2video.fileio import sha256_file
from clip2video.search.store import (
    META_DB,
    SHARDS,
    THUMBS,
    IndexFormatError,
    open_db_readonly,
    read_manifest,
    read_manifest_sum,
)

SMALL_FILE = 1 << 20  # files up to this size are hashed at every open
STAMP = "verified"


@dataclass
class Report:
    """What a verification looked at."""

    generation: str
    files: int  # recorded files checked
    bytes: int  # their total size
    hashed_bytes: int  # bytes read and hashed
    thumbnails: int  # thumbnails checked (full checks only)
    full: bool
    sources_changed: int | None = None  # indexed videos whose files changed since the build (verify_index only)


def _check_file(path: Path, size: int, digest: str | None, *, hash_it: bool) -> int:
    """Raise IndexFormatError (one line naming ``path``) unless it is a regular file of ``size`` bytes (and,
    when hashed, of SHA-256 ``digest``). Returns the bytes hashed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise IndexFormatError(f"{path}: missing (the build recorded it); the index is damaged") from None
    except OSError as e:
        raise IndexFormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise IndexFormatError(f"{path}: not a regular file (a link or a folder); the index is damaged")
    if st.st_size != size:
        raise IndexFormatError(f"{path}: {st.st_size} bytes, the build recorded {size} (truncated or replaced); "
                               "the index is damaged")
    if not hash_it or digest is None:
        return 0
    try:
        got = sha256_file(path)
    except OSError as e:
        raise IndexFormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    if got != digest:
        raise IndexFormatError(f"{path}: damaged (its SHA-256 differs from the one recorded at build time); "
                               "rebuild the index or restore it")
    return size


def _recorded_path(folder: Path, gen: Path, rel: Any) -> Path:
    """The file a manifest ``files`` key names: inside the generation folder or ``shards/``, nowhere else."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if len(parts) != 2 or parts[0] not in (gen.name, SHARDS) or parts[1] in ("..", ".") or "\\" in rel:
        raise IndexFormatError(f"{gen / 'manifest.json'}: names a file {str(rel)[:100]!r} outside the index; "
                               "the index is damaged")
    return folder / parts[0] / parts[1]


def sqlite_check(path: Path) -> None:
    """SQLite's ``PRAGMA quick_check`` on a database (read-only); IndexFormatError naming it when it fails."""
    try:
        db = open_db_readonly(path)
        try:
            rows = db.execute("PRAGMA quick_check").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise IndexFormatError(f"{path}: damaged (SQLite: {str(e).splitlines()[0][:120]})") from None
    if rows != [("ok",)]:
        first = str(rows[0][0]).splitlines()[0][:120] if rows else "no answer"
        raise IndexFormatError(f"{path}: damaged (SQLite quick_check: {first})")


def _thumbnails(folder: Path, gen: Path) -> list[tuple[Path, int, str]]:
    """(path, size, sha256) of every thumbnail the generation records."""
    try:
        db = open_db_readonly(gen / META_DB)
        try:
            rows = db.execute("SELECT thumbs FROM files").fetchall()
        finally:
            db.close()
        out = []
        for (js,) in rows:
            for rel, size, _mtime, digest in json.loads(js):
                out.append((_thumb_path(folder, gen, rel), int(size), str(digest)))
        return out
    except (sqlite3.Error, ValueError, TypeError) as e:
        raise IndexFormatError(f"{gen / META_DB}: damaged (thumbnail records: {type(e).__name__})") from None


def _thumb_path(folder: Path, gen: Path, rel: Any) -> Path:
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if len(parts) != 3 or parts[0] != THUMBS or any(p in ("..", ".") for p in parts) or "\\" in rel:
        raise IndexFormatError(f"{gen / META_DB}: records a thumbnail {str(rel)[:100]!r} outside thumbs/")
    return folder.joinpath(*parts)


def verify_generation(folder: str | os.PathLike, gen: Path, manifest: dict[str, Any], *,
                      full: bool | None = None) -> Report:
    """Check a generation against its build's record (see the module doc); IndexFormatError when it differs.

    ``full``: True hashes everything, False only small files, None (the default) hashes everything unless a
    full check of this very manifest already succeeded (the stamp).
    """
    folder = Path(folder)
    gen = Path(gen)
    digest = read_manifest_sum(gen)
    if full is None:
        full = _stamp(gen) != digest or digest is None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise IndexFormatError(f"{gen / 'manifest.json'}: records no file checksums; rebuild the index")
    total = hashed = 0
    for rel, rec in files.items():
        path = _recorded_path(folder, gen, rel)
        try:
            size, sha = int(rec[0]), str(rec[1])
        except (TypeError, ValueError, IndexError):
            raise IndexFormatError(f"{gen / 'manifest.json'}: damaged record for {rel!r}") from None
        hashed += _check_file(path, size, sha, hash_it=full or size <= SMALL_FILE)
        total += size
    sqlite_check(gen / META_DB)
    n_thumbs = 0
    if full:
        for path, size, sha in _thumbnails(folder, gen):
            hashed += _check_file(path, size, sha, hash_it=True)
            n_thumbs += 1
        if digest is not None:
            try:  # best effort: a read-only index is simply checked fully at every open
                fileio.atomic_write_bytes(gen / STAMP, digest.encode())
            except OSError:
                pass
    return Report(gen.name, len(files), total, hashed, n_thumbs, bool(full))


def _stamp(gen: Path) -> str | None:
    try:
        return (gen / STAMP).read_bytes()[:64].decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None


def changed_sources(gen: Path) -> int:
    """How many indexed videos have a recorded file that is gone or changed (size, mtime) since the build."""
    from clip2video.search.files import NotServed, open_recorded

    db = open_db_readonly(gen / META_DB)
    try:
        rows = db.execute("SELECT v.path, f.root, f.entries FROM videos v JOIN files f ON v.row = f.row")
        changed = 0
        for path, root, entries in rows:
            for rel, size, mtime in json.loads(entries):
                try:
                    fd, _ = open_recorded(os.path.join(path, rel) if rel else path, root, size, mtime)
                    os.close(fd)
                except NotServed:
                    changed += 1
                    break
        return changed
    finally:
        db.close()


def verify_index(folder: str | os.PathLike) -> Report:
    """``search.py verify``: the live generation of ``folder`` checked fully, and the indexed videos counted
    that changed since the build (they are not served until the next build)."""
    folder = Path(folder)
    gen, manifest = read_manifest(folder)
    report = verify_generation(folder, gen, manifest, full=True)
    try:
        report.sources_changed = changed_sources(gen)
    except (sqlite3.Error, ValueError, TypeError):
        report.sources_changed = None
    return report


__all__ = ["SMALL_FILE", "Report", "changed_sources", "sqlite_check", "verify_generation", "verify_index"]
