"""infer_retrieval.py under two gloo processes gives what one process gives (captions and videos sharded).

The end-to-end case is the parity fixture's MSVD protocol with a released-layout checkpoint (``original`` mask
layout): its evaluation batches hold uneven numbers of videos, and splitting one across ranks would change
vectors by up to 0.09 (see the fixture's README), so agreement with one process and with the original's
matrix shows that head groups stay whole. The share rules themselves are checked without processes.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from clip2video.cli import infer_retrieval
from clip2video.modules.evaluation.engine import video_share
from clip2video.modules.runtime.distributed import DistInfo

from conftest import PARITY, need


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    rc = infer_retrieval.main(argv)
    Path(out, f"rc{rank}").write_text(str(rc))


def _argv(ds: str, weights: Path, out: Path) -> list[str]:
    from test_infer_parity import argv_for

    return argv_for(ds, PARITY, weights, out) + [
        "--save_sim", str(out / "sim.npy"), "--metrics_json", str(out / "metrics.json"),
        "--num_thread_reader", "0", "--device", "cpu", "--qb_norm_split", "train", "--save_sim_qb",
        str(out / "qb.npy")]


def test_two_processes_equal_one_process_original_layout(parity_weights, tmp_path):
    need(PARITY)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert infer_retrieval.main(_argv("msvd", parity_weights, one)) == 0
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(2, _free_port(), _argv("msvd", parity_weights, two), str(two)), nprocs=2, join=True)
    assert (two / "rc0").read_text() == (two / "rc1").read_text() == "0"

    sim1, sim2 = np.load(one / "sim.npy"), np.load(two / "sim.npy")
    assert sim1.shape == sim2.shape
    # each rank batches its share differently, so fp32 products may round differently (a few ulp of ~10)
    assert np.abs(sim1 - sim2).max() <= 5e-5
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert {d: m2[d] for d in ("t2v", "v2t")} == {d: m1[d] for d in ("t2v", "v2t")}
    assert (m1["run"]["processes"], m2["run"]["processes"]) == (1, 2)
    # QB-Norm: each rank scores half of the bank; the merged statistics normalise as one process does
    assert m2["qb_norm"] == m1["qb_norm"] and m2["run"]["post_processing"]["qb_norm"]["bank"]["captions"] == 6
    np.testing.assert_allclose(np.load(two / "qb.npy"), np.load(one / "qb.npy"), rtol=1e-4, atol=0)
    want = np.load(PARITY / "expected" / "msvd.sim.npy")
    assert np.abs(sim2 - want).max() <= 1e-4  # and both are the original's matrix
    assert {d: m2[d] for d in ("t2v", "v2t")} == json.loads((PARITY / "expected" / "msvd.metrics.json").read_text())
    log = (two / "msvd.log").read_text()
    assert log.count("timings:") == 1 and "2 processes: rank 0 encodes" in log  # rank 0 alone writes the log
    assert not [f for f in os.listdir(two) if ".tmp-" in f]


class _Set:
    def __init__(self, groups: list[list[int]]):
        self.groups = groups
        self.video_ids = [f"v{i}" for g in groups for i in g]

    def video_batches(self, batch_size_val: int) -> list[list[int]]:
        return self.groups


def _model(layout: str, encoder: str = "heads"):
    return SimpleNamespace(config=SimpleNamespace(mask_layout=layout, video_encoder=encoder))


def _info(rank: int, world: int) -> DistInfo:
    return DistInfo(rank, rank, world, torch.device("cpu"), "gloo")


@pytest.mark.parametrize("world", [2, 3, 5])
def test_original_layout_shares_whole_groups(world):
    groups = [[0, 1, 2], [3], [4, 5, 6, 7, 8], [9, 10], [11]]
    rset = _Set(groups)
    shares = [video_share(rset, _model("original"), 8, _info(r, world)) for r in range(world)]
    assert [i for videos, _ in shares for i in videos] == list(range(12))  # every video once, in order
    for videos, mine in shares:
        assert all(g in groups for g in mine)  # no group is split
        assert videos == [i for g in mine for i in g]


@pytest.mark.parametrize("layout,encoder", [("per_video", "heads"), ("original", "vip")])
def test_other_layouts_share_single_videos(layout, encoder):
    rset = _Set([[0, 1, 2, 3, 4, 5, 6]])
    shares = [video_share(rset, _model(layout, encoder), 8, _info(r, 2)) for r in range(2)]
    assert shares == [([0, 1, 2, 3], None), ([4, 5, 6], None)]
    assert video_share(rset, _model(layout, encoder), 8, None) == (list(range(7)), None)
