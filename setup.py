"""Installs one package, ``clip2video``, with the repository's ``modules/`` and ``dataloaders/`` as its
subpackages ``clip2video.modules`` and ``clip2video.dataloaders``, plus the YAML configs under
``clip2video/configs``. Nothing else is put into site-packages.

The root scripts (``train.py``...) are thin entry points over ``clip2video.cli``; installed, the same commands
are the console scripts below.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# folder in the repository → package name
ROOMS = {"clip2video": "clip2video", "modules": "clip2video.modules", "dataloaders": "clip2video.dataloaders"}
CONSOLE_SCRIPTS = {
    "clip2video-train": "clip2video.cli.train:main",
    "clip2video-eval": "clip2video.cli.infer_retrieval:console",  # console: main, then a quick exit
    "clip2video-extract": "clip2video.cli.sample_frame:main",
    "clip2video-search": "clip2video.cli.search:console",
}


def packages() -> list[str]:
    """Every package under the mapped folders (a folder with ``__init__.py``)."""
    found = []
    for folder, name in ROOMS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.append(".".join((name, *rel)))
    return found


class BuildPy(build_py):
    """Also copies ``configs/`` into the built package (``--config configs/train/x.yaml`` then resolves from an
    installed copy)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable: clip2video.cli.common finds the checkout's configs/
        dst = Path(self.build_lib) / "clip2video" / "configs"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "configs", dst)


BASE = [
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
]
SERVE = ["fastapi>=0.110", "uvicorn>=0.29", "starlette>=0.39"]
# faster text queries (search.py serve --text_encoder auto/onnx/openvino); without them queries run in torch
FAST = ["onnxruntime>=1.17", "openvino>=2024.0", "onnx>=1.15"]

setup(
    name="clip2video",
    version="0.3.0",
    description="CLIP2Video text-video retrieval: exact reimplementation with training, indexing and search",
    packages=packages(),
    package_dir={name: folder for folder, name in ROOMS.items()},
    # the search page served by `search.py serve`; CLIP's BPE vocabulary and its licence
    package_data={"clip2video": ["static/*", "assets/*"]},
    cmdclass={"build_py": BuildPy},
    entry_points={"console_scripts": [f"{cmd} = {target}" for cmd, target in CONSOLE_SCRIPTS.items()]},
    python_requires=">=3.10",
    install_requires=BASE,
    extras_require={"serve": SERVE, "fast": FAST, "tensorboard": ["tensorboard"], "test": ["pytest>=7"]},
)
