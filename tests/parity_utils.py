"""Helpers shared by the parity tests: fixture weights (generated once per test session) and expectations."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np

from conftest import PARITY

DATASETS = ("msrvtt", "msrvttfull", "msvd", "vatex")
CENTER_K = {"msrvtt": 5, "msrvttfull": 5, "msvd": 5, "vatex": 7}


def checkpoint_of(weights: Path, ds: str) -> Path:
    return weights / ("ckpt_vatex/pytorch_model.bin.22" if ds == "vatex" else "ckpt/pytorch_model.bin.2")


def make_weights(out: Path) -> Path:
    """Run the fixture's own generator (numpy + torch only, bit-identical everywhere, ~10 s)."""
    if not (out / "ckpt_vatex" / "pytorch_model.bin.22").exists():
        subprocess.run(
            [sys.executable, str(PARITY / "make_weights.py"), str(out), "--check"],
            check=True,
            capture_output=True,
        )
    return out


@cache
def expected(ds: str) -> tuple[dict, dict]:
    e = dict(np.load(PARITY / "expected" / f"{ds}.emb.npz"))
    meta = json.loads((PARITY / "expected" / f"{ds}.meta.json").read_text())
    return e, meta


def commands() -> dict:
    return json.loads((PARITY / "commands.json").read_text())
