"""A damaged index is refused, never answered from; a build that runs out of disk leaves the previous index.

Damage: each corruption found when probing the index (a shard truncated to 0 bytes, bytes garbled inside the
FAISS index and inside a shard, the manifest's logit scale edited, a garbled SQLite page, ``CURRENT`` naming a
generation outside the index, binary garbage in ``CURRENT``) makes ``query``, ``serve`` and ``verify`` exit
with one line naming the damaged file. Disk full: a deterministic ``ENOSPC`` at the n-th write of a build,
for every n, and (as root) a real full tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from search_utils import build_argv as search_build_argv
from search_utils import one_line_error as search_error

from clip2video import fileio
from clip2video.cli import search
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.search import integrity
from clip2video.search.index import SearchIndex
from clip2video.search.store import CURRENT, MANIFEST, IndexFormatError

ROOT = Path(__file__).resolve().parents[1]
N_VECTORS, DIM = 3000, 96  # a shard and a FAISS index above integrity.SMALL_FILE: hashed in full checks only


def live_gen(ix: Path) -> Path:
    return ix / (ix / CURRENT).read_text().strip()


def garble(path: Path, offset: int, n: int = 256) -> None:
    """Overwrite ``n`` bytes at ``offset`` with different ones (same size, as a bad disk block does)."""
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(offset)
    for i in range(offset, min(offset + n, len(data))):
        data[i] = (data[i] + 1 + int(rng.integers(0, 255))) % 256
    mtime = path.stat().st_mtime_ns
    path.write_bytes(bytes(data))
    os.utime(path, ns=(mtime, mtime))


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    x = np.random.default_rng(0).standard_normal((N_VECTORS, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(root / "video.npy", x)
    (root / "video_ids.json").write_text(json.dumps([f"v{i:04d}" for i in range(N_VECTORS)]))
    return root


@pytest.fixture
def fresh(emb, tmp_path, capsys):
    """A new index from the embeddings, never opened since its build."""
    ix = tmp_path / "ix"
    assert search.main(["build", "--from_embeddings", str(emb), "--index", str(ix)]) == 0
    capsys.readouterr()
    return ix


@pytest.fixture
def keep_threads():
    """``serve`` sets the process's compute threads; put them back after it ran in-process."""
    import faiss

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def _corrupt(kind: str, ix: Path) -> Path:
    """Damage ``ix`` the way ``kind`` says; returns the file the error must name."""
    gen = live_gen(ix)
    shard = next((ix / "shards").glob("*.npy"))
    if kind == "shard truncated to 0 bytes":
        shard.write_bytes(b"")
        return shard
    if kind == "garbled FAISS index":
        garble(gen / "faiss.index", (gen / "faiss.index").stat().st_size // 2)
        return gen / "faiss.index"
    if kind == "garbled shard bytes":
        garble(shard, shard.stat().st_size // 2)
        return shard
    if kind == "manifest logit_scale edited":
        m = json.loads((gen / MANIFEST).read_text())
        m["model"]["logit_scale"] = m["model"]["logit_scale"] / 14
        (gen / MANIFEST).write_text(json.dumps(m, indent=1))
        return gen / MANIFEST
    if kind == "garbled SQLite page":
        garble(gen / "meta.sqlite", 4096, 512)  # page 2's b-tree header and cell pointers
        return gen / "meta.sqlite"
    if kind == "CURRENT names a generation outside":
        other = ix.parent / "other"
        shutil.copytree(ix, other)
        (ix / CURRENT).write_text(f"../other/{gen.name}\n")
        return ix / CURRENT
    if kind == "CURRENT names a link to a generation outside":
        other = ix.parent / "other"
        shutil.copytree(ix, other)
        (ix / "gen-elsewhere").symlink_to(other / gen.name)
        (ix / CURRENT).write_text("gen-elsewhere\n")
        return ix / CURRENT
    if kind == "garbage in CURRENT":
        (ix / CURRENT).write_bytes(b"\x80\xfe\x00garbage\xff" * 3)
        return ix / CURRENT
    raise AssertionError(kind)


def one_line_error(capsys, argv, code=1) -> str:
    return search_error(capsys, argv, code)


def build_argv(frames, ix, ckpt, *extra):
    return search_build_argv(frames, ix, ckpt, *extra, max_frames=4)


CORRUPTIONS = ["shard truncated to 0 bytes", "garbled FAISS index", "garbled shard bytes",
               "manifest logit_scale edited", "garbled SQLite page", "CURRENT names a generation outside",
               "CURRENT names a link to a generation outside", "garbage in CURRENT"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_is_one_line_naming_the_file(fresh, kind, capsys, keep_threads):
    named = _corrupt(kind, fresh)
    for argv in (["query", "--index", str(fresh), "--like", "v0003", "-k", "3"],
                 ["serve", "--index", str(fresh), "--port", "0"],
                 ["verify", "--index", str(fresh)]):
        err = one_line_error(capsys, argv)
        assert str(named) in err, (argv[0], err)
    with pytest.raises(IndexFormatError, match="damaged|truncated"):
        SearchIndex.open(fresh)


def test_first_open_checks_everything_later_opens_the_small_files(fresh, capsys, keep_threads):
    """Damage inside a large file after the first open is not seen by the cheap check of later ``query``s
    (sizes and small files), but ``verify`` and ``serve`` (full checks) refuse it."""
    index = SearchIndex.open(fresh)
    assert integrity.STAMP in os.listdir(index.generation)
    want = index.similar("v0003", 5)
    index.close()
    gen = live_gen(fresh)
    assert (gen / "faiss.index").stat().st_size > integrity.SMALL_FILE
    report = integrity.verify_generation(fresh, gen, json.loads((gen / MANIFEST).read_text()), full=None)
    assert not report.full and report.hashed_bytes < integrity.SMALL_FILE
    shard = next((fresh / "shards").glob("*.npy"))
    garble(shard, shard.stat().st_size // 2)
    capsys.readouterr()
    assert search.main(["verify", "--index", str(fresh)]) == 1
    err = capsys.readouterr().err
    assert str(shard) in err and "SHA-256 differs" in err
    assert str(shard) in one_line_error(capsys, ["serve", "--index", str(fresh), "--port", "0"])
    # and a rebuild repairs it: the damaged shard is not reused, its vectors are written anew
    emb = Path(json.loads((gen / MANIFEST).read_text())["source"])
    assert search.main(["build", "--from_embeddings", str(emb), "--index", str(fresh)]) == 0
    capsys.readouterr()
    assert search.main(["verify", "--index", str(fresh)]) == 0
    got = SearchIndex.open(fresh).similar("v0003", 5)
    assert [h.video_id for h in got] == [h.video_id for h in want]


def test_verify_reports_an_intact_index(fresh, capsys):
    assert search.main(["verify", "--index", str(fresh)]) == 0
    out = capsys.readouterr().out
    assert "intact" in out and "4 files" in out, out  # faiss.index, meta.sqlite, one shard + its item list
    assert search.main(["verify", "--index", str(fresh), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["full"] and report["files"] == 4 and report["hashed_bytes"] == report["bytes"] > 2_000_000
    assert report["sources_changed"] == 0


def test_sqlite_quick_check_finds_a_garbled_page(fresh):
    db = live_gen(fresh) / "meta.sqlite"
    integrity.sqlite_check(db)
    garble(db, 4096, 512)  # page 2's b-tree header and cell pointers
    with pytest.raises(IndexFormatError, match=f"{db}: damaged"):
        integrity.sqlite_check(db)


def test_an_index_of_the_previous_format_says_rebuild(fresh, capsys):
    gen = live_gen(fresh)
    m = json.loads((gen / MANIFEST).read_text())
    m["format_version"] = 1
    del m["files"]
    (gen / MANIFEST).write_text(json.dumps(m))
    (gen / "manifest.sha256").unlink()
    err = one_line_error(capsys, ["query", "--index", str(fresh), "--like", "v0001"])
    assert "format version 1" in err and "rebuild" in err
    (gen / "manifest.sha256").write_text("not a checksum\n")
    assert "format version 1" in one_line_error(capsys, ["verify", "--index", str(fresh)])


def test_a_reader_keeps_its_generation_until_it_closes(fresh, emb, capsys):
    """A build's clean-up leaves a generation a reader still holds (its files, thumbnails included); the next
    build after the reader closed removes it."""
    index = SearchIndex.open(fresh)
    old = index.generation
    assert search.main(["build", "--from_embeddings", str(emb), "--index", str(fresh)]) == 0
    assert live_gen(fresh) != old and old.is_dir()
    assert len(index.similar("v0001", 3)) == 3  # still answers from its generation
    index.close()
    assert search.main(["build", "--from_embeddings", str(emb), "--index", str(fresh)]) == 0
    assert not old.exists()
    assert [p.name for p in fresh.iterdir() if p.name.startswith("gen-")] == [live_gen(fresh).name]


# ----------------------------------------------------------------------------------------------- disk full
@pytest.fixture(scope="module")
def folder_index(tmp_path_factory, tiny_ckpt):
    """An index of 2 frame folders, and 2 more videos waiting to be added (the build that fails)."""
    root = tmp_path_factory.mktemp("diskfull")
    make_synthetic_dataset(root / "synth", n_videos=4, seed=7, size=32, n_frames=4, write="frames",
                           splits=(0.0, 0.0, 1.0))
    frames = root / "synth" / "frames"
    later = sorted(p.name for p in frames.iterdir())[2:]
    for v in later:
        shutil.move(frames / v, root / v)
    base = root / "base"
    assert search.main(build_argv(frames, base, tiny_ckpt)) == 0
    for v in later:
        shutil.move(root / v, frames / v)
    return {"root": root, "frames": frames, "base": base, "ckpt": tiny_ckpt}


def _state(ix: Path):
    index = SearchIndex.open(ix)
    try:
        return index.generation.name, index.video_ids, index.vectors(range(len(index)))
    finally:
        index.close()


def _leftovers(ix: Path) -> list[str]:
    return sorted(str(p.relative_to(ix)) for p in ix.rglob("*")
                  if p.name.startswith(fileio.TMP_PREFIX) or p.name.startswith(".gen-"))


@contextmanager
def failing_write(n: int, calls: list):
    """Every atomic write of the project counted; the n-th fails with ENOSPC after its bytes were written to the
    temporary name (as a full disk fails a flush)."""
    real = fileio.atomic_path

    @contextmanager
    def atomic_path(path):
        calls.append(Path(path))
        with real(path) as tmp:
            yield tmp
            if len(calls) == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    fileio.atomic_path = atomic_path
    try:
        yield
    finally:
        fileio.atomic_path = real


def test_disk_full_at_every_write_of_a_build(folder_index, tmp_path, capsys):
    base, frames, ckpt = folder_index["base"], folder_index["frames"], folder_index["ckpt"]
    before = _state(base)
    calls: list[Path] = []
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    with failing_write(0, calls):
        assert search.main(build_argv(frames, probe, ckpt)) == 0
    writes = list(calls)
    names = {p.name for p in writes}
    assert {"faiss.index", "meta.sqlite", "manifest.json", "manifest.sha256", "CURRENT"} <= names
    assert sum(p.suffix == ".jpg" for p in writes) == 6 and sum(p.suffix == ".npy" for p in writes) == 1
    clean = _state(probe)
    for n in range(1, len(writes) + 1):
        ix = tmp_path / f"ix{n}"
        shutil.copytree(base, ix)
        calls.clear()
        with failing_write(n, calls):
            err = one_line_error(capsys, build_argv(frames, ix, ckpt))
        assert "No space left on device" in err and "previous index is unchanged" in err, err
        assert str(writes[n - 1].name) in err and str(ix) in err, (n, writes[n - 1], err)
        gen, ids, vectors = _state(ix)
        assert gen == before[0] and ids == before[1]
        np.testing.assert_array_equal(vectors, before[2])
        assert _leftovers(ix) == [], (n, _leftovers(ix))
        assert [p.name for p in ix.iterdir() if p.name.startswith("gen-")] == [gen]
    # the next build after a failure gives what a clean build gives
    assert search.main(build_argv(frames, ix, ckpt)) == 0
    _, ids, vectors = _state(ix)
    assert ids == clean[1]
    np.testing.assert_allclose(vectors, clean[2], atol=1e-6)


def test_sqlite_disk_full_is_one_line(folder_index, tmp_path, capsys, monkeypatch):
    ix = tmp_path / "ix"
    shutil.copytree(folder_index["base"], ix)
    before = _state(ix)
    real = sqlite3.connect

    class Full:
        def __init__(self, db):
            self.db = db

        def execute(self, *a):
            return self.db.execute(*a)

        def executemany(self, *a):
            raise sqlite3.OperationalError("database or disk is full")

        def close(self):
            self.db.close()

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **kw: real(*a, **kw) if kw.get("uri") else Full(real(*a, **kw)))
    err = one_line_error(capsys, build_argv(folder_index["frames"], ix, folder_index["ckpt"]))
    monkeypatch.undo()
    assert "writing the metadata database" in err and "meta.sqlite" in err and "No space left" in err, err
    assert _state(ix)[:2] == before[:2] and _leftovers(ix) == []


def test_stale_temps_of_a_killed_build_are_removed(folder_index, tmp_path):
    ix = tmp_path / "ix"
    shutil.copytree(folder_index["base"], ix)
    key = next((ix / "thumbs").iterdir())
    planted = [key / ".tmp-1-99999.0.jpg", ix / "shards" / ".tmp-enc-99999.3.npy", ix / ".tmp-CURRENT-99999.1",
               ix / ".gen-20260101-000000-000000000-99999.tmp" / "faiss.index"]
    for p in planted:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half written")
    assert len(_leftovers(ix)) == 4
    assert search.main(build_argv(folder_index["frames"], ix, folder_index["ckpt"])) == 0
    assert _leftovers(ix) == []


REAL_DISK = """
import sys
from clip2video.cli import search
sys.exit(search.main(sys.argv[1:]))
"""


def test_a_real_full_disk(folder_index, tmp_path):
    """The same on a small tmpfs filled up to a few sizes of free space (root only; skipped elsewhere)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        outcomes = set()
        for free in (0, 16 << 10, 48 << 10, 96 << 10, 160 << 10, 320 << 10):
            ix = disk / "ix"
            shutil.rmtree(ix, ignore_errors=True)
            (disk / "filler").unlink(missing_ok=True)
            shutil.copytree(folder_index["base"], ix)
            before = _state(ix)[:2]
            st = os.statvfs(disk)
            with open(disk / "filler", "wb") as f:
                f.write(b"\0" * max(st.f_bavail * st.f_frsize - free, 0))
            r = subprocess.run([sys.executable, "-c", REAL_DISK, *build_argv(folder_index["frames"], ix,
                                                                               folder_index["ckpt"])],
                               env=env, capture_output=True, text=True, timeout=300)
            (disk / "filler").unlink()
            lines = [ln for ln in r.stderr.splitlines() if ln.startswith("search.py")]
            if r.returncode == 0:
                outcomes.add("built")
                assert len(_state(ix)[1]) == 4
                continue
            assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
            assert "No space left on device" in lines[0] and str(ix) in lines[0], lines
            outcomes.add(lines[0].split(":")[2].strip().split(" /")[0])  # the step
            assert _state(ix)[:2] == before and _leftovers(ix) == []
        assert len(outcomes - {"built"}) >= 1, outcomes
    finally:
        import gc

        gc.collect()  # no mapping of a file on it may outlive the test
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_checksums_recorded_for_every_generation_file(fresh):
    gen = live_gen(fresh)
    m = json.loads((gen / MANIFEST).read_text())
    assert sorted(m["files"]) == sorted([f"{gen.name}/faiss.index", f"{gen.name}/meta.sqlite",
                                         *[f"shards/{p.name}" for p in (fresh / "shards").iterdir()]])
    for rel, (size, digest) in m["files"].items():
        data = (fresh / rel).read_bytes()
        assert len(data) == size and hashlib.sha256(data).hexdigest() == digest
    recorded = (gen / "manifest.sha256").read_text().split()
    assert recorded == [hashlib.sha256((gen / MANIFEST).read_bytes()).hexdigest(), MANIFEST]
