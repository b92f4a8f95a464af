"""Installs one package, ``clip2video``, with the repository's folders as its subpackages.

The repository keeps the layout researchers know (``modules/``, ``dataloaders/``, ``train.py``... at the
top); installed, they become ``clip2video.modules``, ``clip2video.dataloaders``, ``clip2video.train`` and
so on, plus the YAML configs under ``clip2video/configs``. Nothing else is put into site-packages.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ENTRY_POINTS = ("train", "infer_retrieval", "sample_frame", "search")
# console script → entry module; a script is installed only when its module is in the tree, never a dead command
CONSOLE_SCRIPTS = {"clip2video-train": "train", "clip2video-eval": "infer_retrieval",
                   "clip2video-extract": "sample_frame", "clip2video-search": "search"}
# the short-running commands end through clip2video.cli.exit_process (no second of interpreter teardown)
QUICK_EXIT = {"infer_retrieval": "console", "search": "console"}


class BuildPy(build_py):
    """Also copies the top-level entry scripts and ``configs/`` into the built package."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: clip2video/__init__.py finds them in the checkout
        pkg = Path(self.build_lib) / "clip2video"
        for name in ENTRY_POINTS:
            src = ROOT / f"{name}.py"
            if src.is_file():
                self.copy_file(str(src), str(pkg / f"{name}.py"))
        dst = pkg / "configs"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "configs", dst)


setup(
    name="clip2video",
    version="0.2.0",
    description="CLIP2Video text-video retrieval: exact reimplementation with training, indexing and search",
    packages=["clip2video", "clip2video.modules", "clip2video.dataloaders"],
    package_dir={"clip2video": "clip2video", "clip2video.modules": "modules",
                 "clip2video.dataloaders": "dataloaders"},
    package_data={"clip2video": ["static/*"]},  # the search page served by `search.py serve`
    cmdclass={"build_py": BuildPy},
    entry_points={"console_scripts": [f"{cmd} = clip2video.{mod}:{QUICK_EXIT.get(mod, 'main')}"
                                      for cmd, mod in CONSOLE_SCRIPTS.items() if (ROOT / f"{mod}.py").is_file()]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "open_clip_torch>=2.24",
        "safetensors>=0.4",
        "ftfy",
        "regex",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "av>=18",
        "pillow>=10",
        "numba>=0.59",
        "pandas>=2.0",
        "tqdm",
        "pyyaml>=6",
        "faiss-cpu>=1.8",
    ],
    extras_require={"tensorboard": ["tensorboard"], "test": ["pytest>=7"]},
)
