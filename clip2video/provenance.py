"""What a result file records about how it was made: files by content hash, and the code's version.

A number in a results table is only comparable with another when both say which annotation files, which
weights and which code produced them; paths alone do not (files get replaced, checkouts move). So result files
carry each input file's SHA-256 and size, and the package version with the git commit of the checkout when
the code runs from one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from clip2video.fileio import sha256_file

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def file_record(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """``{"path", "sha256", "bytes"}`` of a file (absolute path), or None when no file is given."""
    if path is None:
        return None
    p = Path(path).resolve()
    return {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size}


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def code_version() -> dict[str, Any]:
    """Package version, and the git commit (with whether tracked files differ from it) when the package runs
    from a git checkout of this repository; both None otherwise (an installed package, no git), never an error.

    Only a ``.git`` directly in the repository root counts, so an installed package that happens to sit
    inside some other repository (a virtual environment in a project) does not report that project's commit.
    """
    from clip2video import __version__

    commit = dirty = None
    if (PACKAGE_ROOT / ".git").exists():
        commit = _git("rev-parse", "HEAD")
        if commit is not None:
            status = _git("status", "--porcelain", "--untracked-files=no")
            dirty = bool(status) if status is not None else None
    return {"package": "clip2video", "version": __version__, "git_commit": commit, "git_dirty": dirty}
