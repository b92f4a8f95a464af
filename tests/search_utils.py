"""Helpers shared by the tests that drive ``search.py`` in-process: a build command line for a tiny
release-format checkpoint, a JSON query, and the one-line-error check every bad input must pass."""

from __future__ import annotations

import json
from pathlib import Path

from clip2video.cli import search


def build_argv(frames: Path, ix: Path, ckpt: Path, *extra: str, max_frames: int = 6) -> list[str]:
    """``search.py build`` of the folder ``frames`` into ``ix`` with the tiny checkpoint ``ckpt``."""
    return ["build", "--features_path", str(frames), "--index", str(ix), "--checkpoint", str(ckpt.parent),
            "--model_num", "1", "--max_words", "16", "--max_frames", str(max_frames), "--num_thread_reader", "0",
            "--device", "cpu", "--no_progress", *extra]


def query_json(capsys, ix: Path, *args: str) -> list[dict]:
    capsys.readouterr()
    assert search.main(["query", "--index", str(ix), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def one_line_error(capsys, argv: list[str], code: int | None = None) -> str:
    """Run ``search.py argv``: it must fail (with ``code`` when given) and say why on one line."""
    capsys.readouterr()
    rc = search.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and (code is None or rc == code), (rc, err)
    assert err.count("\n") == 0 and err.startswith("search.py: error:") and "Traceback" not in err, err
    return err
