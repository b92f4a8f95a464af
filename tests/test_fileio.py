"""clip2video.fileio: atomic writes leave either the complete new output or the old one, never a temp file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from clip2video import fileio
from clip2video.fileio import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text


class Boom(Exception):
    pass


def _listing(folder):
    return sorted(os.listdir(folder))


def test_atomic_path_keeps_suffix_and_renames(tmp_path):
    target = tmp_path / "sub" / "sim.npy"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".npy" and tmp.name.startswith(fileio.TMP_PREFIX)
        assert not target.exists()
        np.save(tmp, np.arange(3))  # np.save adds ".npy" unless the name already ends with it
    assert _listing(target.parent) == ["sim.npy"]
    np.testing.assert_array_equal(np.load(target), np.arange(3))


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_atomic_path_failure_leaves_target_unchanged_and_no_temp(tmp_path, exc):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_path(target) as tmp:
            torch.save({"w": torch.ones(2)}, tmp)
            raise exc()
    assert target.read_bytes() == b"old"
    assert _listing(tmp_path) == ["model.pt"]


def test_atomic_path_body_writing_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "x.txt"):
            pass
    assert _listing(tmp_path) == []


def test_atomic_path_failed_rename_cleans_up(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep").write_text("k")
    with pytest.raises(OSError):  # os.replace of a file onto a non-empty folder fails
        with atomic_path(target) as tmp:
            tmp.write_text("new")
    assert _listing(tmp_path) == ["taken"] and _listing(target) == ["keep"]


def test_text_and_bytes_helpers(tmp_path):
    t = atomic_write_text(tmp_path / "a.json", "héllo")
    assert t.read_bytes() == "héllo".encode()
    atomic_write_text(t, "second")
    assert t.read_text() == "second"
    b = atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert b.read_bytes() == b"\x00\x01"
    assert _listing(tmp_path) == ["a.json", "b.bin"]


def test_text_helper_failure_keeps_old(tmp_path):
    t = tmp_path / "a.txt"
    t.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(t, "\udcff")  # lone surrogate: cannot be encoded, nothing may change
    assert t.read_text() == "old" and _listing(tmp_path) == ["a.txt"]


def test_temp_names_are_distinct_and_bounded():
    a, b = fileio.temp_file_path("/x/f.npy"), fileio.temp_file_path("/x/f.npy")
    assert a != b
    long = "é" * 200  # 400 bytes in UTF-8
    assert len(fileio.temp_dir_name(long).encode()) < 255
    assert len(fileio.temp_file_path(f"/x/{long}.jpg").name.encode()) < 255
    assert fileio.pid_of_temp(fileio.temp_dir_name("a-b", 4242)) == 4242
    assert fileio.pid_of_temp("a-b-12") is None


def test_atomic_dir_publishes_whole_folder(tmp_path):
    out = tmp_path / "vid"
    with atomic_dir(out) as tmp:
        assert not out.exists()
        (tmp / "1.jpg").write_bytes(b"1")
    assert _listing(tmp_path) == ["vid"] and _listing(out) == ["1.jpg"]


@pytest.mark.parametrize("replace", [False, True])
def test_atomic_dir_failure_leaves_previous_state(tmp_path, replace):
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_dir(out, replace=replace) as tmp:
            (tmp / "new.txt").write_text("new")
            raise Boom()
    assert _listing(tmp_path) == ["data"] and _listing(out) == ["old.txt"]


def test_atomic_dir_refuses_existing_unless_replace(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _listing(tmp_path) == ["data"] and _listing(out) == ["old.txt"]
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _listing(tmp_path) == ["data"] and _listing(out) == ["new.txt"]


def test_atomic_dir_replaces_empty_folder_and_own_leftover(tmp_path):
    out = tmp_path / "v"
    out.mkdir()  # an empty folder (e.g. made by hand) is not a finished result
    leftover = tmp_path / fileio.temp_dir_name("v")
    leftover.mkdir()
    (leftover / "junk").write_text("x")  # an earlier failed call of this very process
    with atomic_dir(out) as tmp:
        assert _listing(tmp) == []
        (tmp / "f").write_text("f")
    assert _listing(tmp_path) == ["v"] and _listing(out) == ["f"]


def test_sites_use_the_helper(tmp_path, monkeypatch):
    """A failing write at each site leaves no temp file (the sites share the helper's cleanup)."""
    from clip2video.modules.runtime.logging_utils import MetricLog
    from clip2video.modules.weights.checkpoint import atomic_save

    class Unpicklable:
        def __reduce__(self):
            raise Boom("no")

    target = tmp_path / "ckpt.pt"
    with pytest.raises(Boom):
        atomic_save({"x": Unpicklable()}, target)
    assert _listing(tmp_path) == []
    atomic_save({"x": 1}, target)
    assert torch.load(target) == {"x": 1} and _listing(tmp_path) == ["ckpt.pt"]

    log = MetricLog(tmp_path / "log.jsonl")
    for i in range(3):
        log.write({"step": i})
    log.keep_first(2)
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 2
    assert sorted(_listing(tmp_path)) == ["ckpt.pt", "log.jsonl"]


def test_save_sim_and_video_writer_clean_up_on_failure(tmp_path, monkeypatch):
    from clip2video.dataloaders.video_io import write_video
    from clip2video.modules.evaluation import engine as evaluation

    class FakeModel:
        logit_scale = torch.tensor(0.0)

        def text_vector(self, t):
            return t

        def video_vector(self, v):
            return v

    class FailingAcc(evaluation.RankAccumulator):
        def add(self, start, rows):
            if start > 0:
                raise Boom("second chunk")
            super().add(start, rows)

    tv, vv = torch.randn(6, 4), torch.randn(3, 4)
    cv = np.array([0, 0, 1, 1, 2, 2])
    sim = tmp_path / "sim.npy"
    sim.write_bytes(b"previous")
    monkeypatch.setattr(evaluation, "RankAccumulator", FailingAcc)
    with pytest.raises(Boom):
        evaluation.score(FakeModel(), tv, vv, cv, True, chunk=2, save_sim=sim)
    assert sim.read_bytes() == b"previous" and _listing(tmp_path) == ["sim.npy"]
    monkeypatch.undo()
    evaluation.score(FakeModel(), tv, vv, cv, True, chunk=2, save_sim=sim)
    np.testing.assert_allclose(np.load(sim), (tv @ vv.t()).numpy(), rtol=1e-6)
    assert _listing(tmp_path) == ["sim.npy"]

    frames = [np.zeros((16, 16, 3), np.uint8)] * 2
    with pytest.raises(OSError, match="cannot open"):
        write_video(tmp_path / "v.unknownext", frames, 5.0)
    assert _listing(tmp_path) == ["sim.npy"]
