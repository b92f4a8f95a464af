"""The installed package claims only its own name and works from any directory.

A wheel is built from a copy of the repository (so no build folder of a previous run can leak into it), its
contents are checked, and it is unpacked into a folder that then serves as site-packages: the entry points,
the library and the shipped configs must work from another directory with that folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_MODULES = ("train", "infer_retrieval", "sample_frame", "search")
# names of the original CLIP2Video / CLIP4Clip trees: none of them may land at the top of site-packages
FOREIGN_TOP_LEVEL = {"modules", "dataloaders", "train", "infer_retrieval", "sample_frame", "search", "configs"}

pytestmark = pytest.mark.slow


def _copy_source(dst: Path) -> Path:
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                  ".ruff_cache", "runs", "demo_out", "tests", "benchmarks", "docs")
    shutil.copytree(ROOT, dst, ignore=skip, symlinks=True)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pkg")
    src = _copy_source(tmp / "src")
    out = tmp / "wheel"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(out), str(src)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named pip" in proc.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = out.glob("clip2video-*.whl")
    return whl


@pytest.fixture(scope="module")
def site(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked: for a pure-Python wheel this is exactly what pip puts into site-packages."""
    d = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(d)
    return d


def _entry_points(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        cp = configparser.ConfigParser()
        cp.read_string(z.read(name).decode())
    return dict(cp["console_scripts"])


def test_wheel_holds_one_package_with_entry_points_and_configs(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"clip2video", wheel.name.split("-py")[0] + ".dist-info"}, top
    assert not top & FOREIGN_TOP_LEVEL
    for sub in ("modules", "dataloaders"):
        want = {f"clip2video/{sub}/{p.relative_to(ROOT / sub).as_posix()}" for p in (ROOT / sub).rglob("*.py")}
        assert want <= set(names), sorted(want - set(names))
    for mod in ENTRY_MODULES:
        assert f"clip2video/cli/{mod}.py" in names, mod  # the command behind the root's thin {mod}.py
        assert f"clip2video/{mod}.py" not in names and f"{mod}.py" not in names  # one copy, under cli/
    configs = {f"clip2video/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert configs and configs <= set(names), sorted(configs - set(names))
    for asset in ("bpe_simple_vocab_16e6.txt.gz", "LICENSE-CLIP-BPE.txt"):  # CLIP's BPE and its licence
        assert f"clip2video/assets/{asset}" in names, asset


def test_console_scripts_point_at_modules_in_the_wheel(wheel):
    scripts = _entry_points(wheel)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"clip2video-train", "clip2video-eval", "clip2video-extract"} <= set(scripts)
    assert ("clip2video-search" in scripts) == (ROOT / "search.py").is_file()
    quick_exit = {"clip2video-eval", "clip2video-search"}  # main, then cli.exit_process
    for cmd, target in scripts.items():
        module, func = target.strip().split(":")
        assert func == ("console" if cmd in quick_exit else "main"), cmd
        assert module.replace(".", "/") + ".py" in names, f"{cmd} -> {module}: not in the wheel"


def test_wheel_requires_numba(wheel):
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        meta = z.read(name).decode()
    requires = [ln.split(":", 1)[1].strip().lower() for ln in meta.splitlines() if ln.startswith("Requires-Dist:")]
    for dep in ("torch", "numba", "open_clip_torch", "pyyaml"):
        assert any(r.startswith(dep) for r in requires), (dep, requires)


def _run(args: list[str], site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)  # the unpacked wheel first; the dependencies come from this interpreter
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_installed_tree_works_from_another_directory(site, tmp_path):
    code = (
        "import clip2video, clip2video.modules.network.model as m, clip2video.dataloaders.frames as f\n"
        "from clip2video.cli.common import resolve_config\n"
        "from clip2video.modules.network import tokenizer as t\n"
        "print(clip2video.__file__); print(m.__file__); print(f.__file__)\n"
        "print(resolve_config('configs/train/msrvtt_9k.yaml'))\n"
        "assert t.ClipTokenizer(8)('a cat')[0][1] == 320; print(t._vocab_path())\n"
    )
    proc = _run(["-c", code], site, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.split()
    assert len(lines) == 5
    for line in lines:  # the installed copy, not the checkout; the shipped config and vocabulary
        assert Path(line).resolve().is_relative_to(site.resolve()), line
    assert lines[3].endswith(os.path.join("clip2video", "configs", "train", "msrvtt_9k.yaml"))
    assert lines[4].endswith(os.path.join("clip2video", "assets", "bpe_simple_vocab_16e6.txt.gz"))


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_entry_points_run_help_from_the_installed_tree(site, tmp_path, module):
    proc = _run(["-m", f"clip2video.cli.{module}", "--help"], site, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "--" in proc.stdout
