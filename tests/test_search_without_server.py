"""``search.py build`` and ``query`` work where the serve extra (fastapi, uvicorn) is not installed; ``serve``
then says what to install in one line.

Each command runs in a subprocess whose import system refuses fastapi, uvicorn and starlette, as a plain
``pip install .`` without ``[serve]`` leaves it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, make_colour_clips

BLOCKER = """
import runpy, sys

BLOCKED = {"fastapi", "uvicorn", "starlette"}


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    path = tmp_path_factory.mktemp("blocked") / "without_server.py"
    path.write_text(BLOCKER)
    return path


@pytest.fixture(scope="module")
def blocked(wrapper):
    """``blocked("build", ...)`` runs ``search.py build ...`` without the server's packages."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def run(*args: str, script: str = "search.py", timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(wrapper), script, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)

    return run


def test_the_blocker_blocks(blocked, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import uvicorn\n")
    r = blocked(script=str(probe))
    assert r.returncode != 0 and "No module named 'uvicorn'" in r.stderr


def test_help_of_every_command(blocked):
    for args in (["build", "--help"], ["query", "--help"], ["serve", "--help"], ["--help"]):
        r = blocked(*args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        assert "usage:" in r.stdout and "Traceback" not in r.stderr, args


def test_build_and_query_a_tiny_index(blocked, tiny_ckpt, tmp_path):
    _, frames = make_colour_clips(tmp_path / "data", n_videos=4, frames=4, colours=4, size=(32, 32), noise=4)
    ix = tmp_path / "ix"
    r = blocked("build", "--features_path", str(frames), "--index", str(ix), "--checkpoint", str(tiny_ckpt.parent),
                "--model_num", "1", "--max_words", "16", "--max_frames", "4", "--num_thread_reader", "0",
                "--device", "cpu", "--no_progress")
    assert r.returncode == 0, r.stderr[-2000:]
    r = blocked("query", "--index", str(ix), "--json", "-k", "3", "a video that is red")
    assert r.returncode == 0, r.stderr[-2000:]
    (res,) = json.loads(r.stdout)
    assert res["query"] == "a video that is red" and len(res["results"]) == 3
    assert {h["video_id"] for h in res["results"]} <= {f"video{i}" for i in range(4)}
    # serve: one line naming the extra, exit != 0, and nothing started
    r = blocked("serve", "--index", str(ix), "--port", "0")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("search.py: error: serve needs fastapi and uvicorn"), lines
    assert "pip install 'clip2video[serve]'" in lines[0] and "serving" not in r.stdout
