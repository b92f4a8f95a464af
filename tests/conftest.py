"""Shared test helpers: paths to the reference data beside the checkout, tiny model configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CLIP2VIDEO_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference-data"
PARITY = SHARED / "fixtures" / "parity-small"


def need(path: Path) -> Path:
    """Skip the calling test cleanly when an optional data folder beside the checkout is absent."""
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small matrices: faster than two on a busy machine, and those
    tests' results do not depend on it (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reference_dir() -> Path:
    return need(REFERENCE)


@pytest.fixture
def parity_dir() -> Path:
    return need(PARITY)


@pytest.fixture(scope="session")
def parity_weights(tmp_path_factory) -> Path:
    """The parity fixture's random weights, generated once per test session by its own script."""
    need(PARITY)
    from parity_utils import make_weights

    return make_weights(tmp_path_factory.mktemp("parity-weights"))
