"""End to end: infer_retrieval.py with the original's own flags reproduces the fixture's outputs.

Frames are read from the fixture's folders and preprocessed by our loader, the image tower runs, the heads
run grouped as the original's evaluation batches, and the scores and metrics are compared with what the
original code wrote. Similarities within 1e-4 (×100 scale) on every column of all four datasets, metrics exactly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clip2video.cli import infer_retrieval

from parity_utils import DATASETS, commands

pytestmark = pytest.mark.usefixtures("parity_dir")


PATH_FLAGS = ("--val_csv", "--data_path", "--features_path")


def argv_for(ds: str, parity_dir, weights, out) -> list[str]:
    """The original's argv with the fixture's placeholders filled and relative paths made absolute."""
    argv = []
    for a in commands()[ds]["argv"]:
        a = a.replace("{weights}", str(weights)).replace("{out}", str(out))
        if argv and argv[-1] in PATH_FLAGS:
            a = str(parity_dir / a)
        argv.append(a)
    return argv


@pytest.mark.parametrize("ds", DATASETS)
def test_infer_retrieval_reproduces_the_original(ds, parity_dir, parity_weights, tmp_path):
    argv = argv_for(ds, parity_dir, parity_weights, tmp_path)
    assert "--output_dir" in argv and argv[argv.index("--output_dir") + 1].endswith(".log")
    sim_path, metrics_path = tmp_path / "sim.npy", tmp_path / "metrics.json"
    rc = infer_retrieval.main(argv + ["--save_sim", str(sim_path), "--metrics_json", str(metrics_path),
                                      "--num_thread_reader", "0", "--device", "cpu"])
    assert rc == 0
    want_sim = np.load(parity_dir / "expected" / f"{ds}.sim.npy")
    sim = np.load(sim_path)
    assert sim.shape == want_sim.shape
    assert np.abs(sim - want_sim).max() <= 1e-4
    got = json.loads(metrics_path.read_text())
    want = json.loads((parity_dir / "expected" / f"{ds}.metrics.json").read_text())
    assert {d: got[d] for d in ("t2v", "v2t")} == want
    assert got["run"]["mask_layout"] == "original" and got["run"]["counts"]["videos"] == sim.shape[1]
    log = (tmp_path / f"{ds}.log").read_text()
    assert "mask layout original" in log and "R@1" in log
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # no temp files left behind
