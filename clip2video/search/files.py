"""Which files an index may hand out, decided at build time and re-checked at every request.

The trust model: anyone who can send HTTP requests to the server is untrusted, and the indexed folder and the
index folder can change after the build (files replaced, links added). So nothing a request says becomes a
path, and nothing found on disk later widens what was recorded:

- **At build time** (:func:`scan_frame_folder`, :func:`scan_video_file`) each video gets a *root* (the real
  path of the folder given to ``build``) and a record of its files: name, size and modification time, taken
  with ``lstat``. Symbolic links are not followed unless the build says so (``--follow_symlinks``); then each
  link is resolved once, there, and the resolved path is what is recorded. A video id that could be read as a
  path of its own (``..`` segments, a leading ``/``, ``\\``, NUL or other control characters) is refused
  (:func:`id_problem`).
- **At request time** (:func:`open_recorded`) a recorded file is opened only if its real path is still exactly
  the recorded one and lies under the video's root, it is a regular file (opened with ``O_NOFOLLOW`` and
  ``O_NONBLOCK``, then checked with ``fstat``), and its size and modification time are the recorded ones. On
  Linux the opened descriptor's own path (``/proc/self/fd``) is compared too, which closes the gap between the
  check and the open. Anything else is :class:`NotServed` (a 404 and one log line).

The same policy covers thumbnails, whose root is the index's own ``thumbs/`` folder (never the whole index
folder: its ``meta.sqlite`` is no thumbnail). The idea of pinning files by (size, mtime) is rclip's and
restic's change detection; the descriptor-path check is the usual answer to check-then-open races.
"""

from __future__ import annotations

import logging
import os
import stat
import unicodedata
from typing import Any

logger = logging.getLogger("clip2video.search.files")

MAX_ID_CHARS = 4096  # longest video id a build accepts (and the server looks up)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # what makes a folder a frame folder: its frames
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))


class NotServed(OSError):
    """A recorded file that may not be served now (one line saying why; the server answers 404)."""


# ----------------------------------------------------------------------------------------------- ids
def id_problem(video_id: Any) -> str | None:
    """Why ``video_id`` may not be indexed, or None when it is fine.

    An id is shown in URLs and pages and, for a ``--from_embeddings`` index, joined to the recorded folder, so
    it must not be readable as a path of its own or carry invisible characters.
    """
    if not isinstance(video_id, str):
        return f"not a string ({type(video_id).__name__})"
    if not video_id:
        return "empty"
    if len(video_id) > MAX_ID_CHARS:
        return f"{len(video_id)} characters long (at most {MAX_ID_CHARS})"
    if video_id.startswith("/"):
        return "starts with '/' (an absolute path)"
    if "\\" in video_id:
        return "contains a backslash"
    if "\x00" in video_id:
        return "contains a NUL character"
    if any(unicodedata.category(c) == "Cc" for c in video_id):
        return "contains a control character"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in video_id):
        return "is not valid UTF-8 (a file name with undecodable bytes)"
    parts = video_id.split("/")
    if any(p in ("..", ".") for p in parts):
        return "has a '..' or '.' path segment"
    if any(p == "" for p in parts):
        return "has an empty path segment ('//' or a trailing '/')"
    return None


# ----------------------------------------------------------------------------------------------- build time
def _under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


def scan_frame_folder(folder: str, *, follow_symlinks: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The record of a frame folder: ({path, root, files, size, mtime_ns, count}, None), or (None, why not).

    ``files`` = [[name relative to ``path``, size, mtime_ns]] of its image files in name order; ``size``,
    ``mtime_ns`` (newest, the folder's own included) and ``count`` cover every regular file, as the
    incremental build compares them. Without ``follow_symlinks`` a folder holding a link is not indexed (its
    frames would be read through the link); with it, each link is resolved here and its target recorded, and
    a target outside the folder is recorded as not servable (left out of ``files``).
    """
    path = os.path.realpath(folder) if follow_symlinks else folder
    try:
        own = os.stat(path)
        names = sorted(os.listdir(path))
    except OSError as e:
        return None, f"cannot list the frame folder ({e.strerror or e})"
    files: list[list[Any]] = []
    size, newest, count = 0, own.st_mtime_ns, 0
    for name in names:
        full = os.path.join(path, name)
        try:
            st = os.lstat(full)
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            if not follow_symlinks:
                target = os.readlink(full) if hasattr(os, "readlink") else "?"
                return None, (f"holds a symbolic link ({name} -> {target[:120]}); links are not followed "
                              "unless the build is given --follow_symlinks")
            real = os.path.realpath(full)
            try:
                st = os.stat(real)
            except OSError:
                continue  # a dangling link: not a frame
            rel = os.path.relpath(real, path)
            if not _under(real, path):
                logger.warning("%s: link to %s, outside the frame folder; read for the index, never served",
                               full, real)
                rel = None
        else:
            rel = name
        if not stat.S_ISREG(st.st_mode):
            continue
        size += st.st_size
        newest = max(newest, st.st_mtime_ns)
        count += 1
        if rel is not None and name.lower().endswith(IMAGE_EXTS):
            files.append([rel, st.st_size, st.st_mtime_ns])
    return {"path": path, "root": path if follow_symlinks else None, "files": files, "size": size,
            "mtime_ns": newest, "count": count}, None


def scan_video_file(path: str, *, follow_symlinks: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The record of a video file: ({path, root, files, size, mtime_ns}, None), or (None, why not).

    A link is indexed only with ``follow_symlinks``, under its resolved path (its root: the target's folder).
    """
    try:
        st = os.lstat(path)
    except OSError as e:
        return None, f"cannot read ({e.strerror or e})"
    root = None
    if stat.S_ISLNK(st.st_mode):
        if not follow_symlinks:
            target = os.readlink(path)
            return None, (f"a symbolic link (-> {target[:120]}); links are not followed unless the build is "
                          "given --follow_symlinks")
        path = os.path.realpath(path)
        root = os.path.dirname(path)
        try:
            st = os.stat(path)
        except OSError as e:
            return None, f"a link to a missing file ({e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return None, "not a regular file"
    return {"path": path, "root": root, "files": [["", st.st_size, st.st_mtime_ns]], "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}, None


def stat_record(path: str | os.PathLike) -> list[int]:
    """[size, mtime_ns] of a file as the policy records it (``lstat``: a link is recorded as the link)."""
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns]


# ----------------------------------------------------------------------------------------------- request time
def _fd_path(fd: int) -> str | None:
    """The path the kernel has for an open descriptor (Linux), or None where that cannot be asked."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def open_recorded(path: str | os.PathLike, root: str | os.PathLike | None, size: int | None,
                  mtime_ns: int | None) -> tuple[int, os.stat_result]:
    """Open a recorded file for reading if the policy allows it now: (descriptor, its fstat); else NotServed.

    ``path`` and ``root`` are the real paths recorded at build time; ``size`` and ``mtime_ns`` the recorded
    state. The caller closes the descriptor.
    """
    path = os.fspath(path)
    if not root or size is None or mtime_ns is None:
        raise NotServed(f"{path}: no file record (index built without one); rebuild the index")
    root = os.fspath(root)
    if not os.path.isabs(path) or not _under(path, root):
        raise NotServed(f"{path}: not under its recorded root {root}")
    try:
        real = os.path.realpath(path)
    except OSError as e:
        raise NotServed(f"{path}: cannot be resolved ({e.strerror or e})") from None
    if real != path:
        raise NotServed(f"{path}: now reached through a symbolic link (to {real}); not the recorded file")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as e:
        raise NotServed(f"{path}: cannot be opened ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotServed(f"{path}: no longer a regular file")
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            raise NotServed(f"{path}: changed since the build (size {st.st_size}, recorded {size}; or its "
                            "modification time)")
        where = _fd_path(fd)
        if where is not None and where != path:
            raise NotServed(f"{path}: replaced while being opened (now {where})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


__all__ = ["IMAGE_EXTS", "MAX_ID_CHARS", "NotServed", "id_problem", "open_recorded", "scan_frame_folder",
           "scan_video_file", "stat_record"]
