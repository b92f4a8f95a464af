from setuptools import find_packages, setup

setup(
    name="clip2video",
    version="0.1.0",
    description="CLIP2Video text-video retrieval: exact reimplementation with training code",
    packages=find_packages(include=["modules", "modules.*", "dataloaders", "dataloaders.*"]),
    py_modules=["train", "infer_retrieval", "sample_frame"],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<3",
        "torchvision>=0.19",
        "open_clip_torch>=2.24",
        "ftfy",
        "regex",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "pillow>=10",
        "pandas>=2.0",
        "tqdm",
        "pyyaml>=6",
    ],
    extras_require={"tensorboard": ["tensorboard"], "test": ["pytest>=7"]},
)
