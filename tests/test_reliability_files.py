"""The server hands out only the files a build recorded, and only while they are what it recorded.

Each attack that was found when probing the server is reproduced on a real index (tiny random model, frame
folders and mp4 files) served on loopback: a link added to a frame folder after the build, a link present at
build time among frames that are not sampled, an indexed ``.mp4`` replaced by a link, a link in ``thumbs/`` to
the index's own ``meta.sqlite``, unsafe ids through ``--from_embeddings`` and through file names; and the
careless cases: a frame replaced or deleted after the listing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from search_utils import build_argv as search_build_argv
from server_utils import ServerThread, get_json, raw_get

from clip2video.cli import search
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.search.app import create_app
from clip2video.search.files import id_problem
from clip2video.search.index import SearchIndex
from clip2video.search.store import CURRENT

SECRET = b"root:x:0:0 SECRET-PASSWORD-LINE"


def build_argv(frames, ix, ckpt, *extra):
    return search_build_argv(frames, ix, ckpt, "--video_fps", "10", *extra, max_frames=4)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """4 frame folders and 2 mp4 files in one folder, plus files that must never be served."""
    root = tmp_path_factory.mktemp("files")
    make_synthetic_dataset(root / "s1", n_videos=4, seed=11, size=32, n_frames=6, write="frames",
                           splits=(0.0, 0.0, 1.0))
    make_synthetic_dataset(root / "s2", n_videos=2, seed=12, size=32, n_frames=8, fps=10, write="mp4",
                           splits=(0.0, 0.0, 1.0))
    videos = root / "videos"
    shutil.copytree(root / "s1" / "frames", videos)
    for p in (root / "s2" / "videos").glob("*.mp4"):
        shutil.copy2(p, videos / f"clip-{p.name}")
    secret = root / "secret"
    secret.mkdir()
    (secret / "passwd").write_bytes(SECRET)
    Image.new("RGB", (32, 32), (250, 10, 200)).save(secret / "private.jpg")
    return root


@pytest.fixture
def world(sources, tiny_ckpt, tmp_path, capsys):
    """A fresh copy of the videos, an index of them, and a function serving it."""
    videos = tmp_path / "videos"
    shutil.copytree(sources / "videos", videos, symlinks=True)
    ix = tmp_path / "ix"
    assert search.main(build_argv(videos, ix, tiny_ckpt)) == 0
    capsys.readouterr()
    index = SearchIndex.open(ix)
    frames_ids = [v for v in index.video_ids if index.record(v).kind == "frames"]
    file_ids = [v for v in index.video_ids if index.record(v).kind == "file"]
    yield {"videos": videos, "ix": ix, "index": index, "frames": frames_ids, "files": file_ids,
           "secret": sources / "secret", "ckpt": tiny_ckpt}
    index.close()


def _never_secret(body: bytes, ix: Path) -> None:
    assert SECRET not in body and b"SQLite format" not in body and b"import " not in body
    assert body != (Path(__file__).read_bytes())


def _refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("not served")]


def test_link_added_to_a_frame_folder_after_the_build(world, caplog):
    vid = world["frames"][0]
    folder = world["videos"] / vid
    gen = world["ix"] / (world["ix"] / CURRENT).read_text().strip()
    originals = sorted(p.name for p in folder.iterdir())
    (folder / "00000000.jpg").symlink_to(world["secret"] / "passwd")  # sorts first: a listing would shift
    (folder / "00000099.jpg").symlink_to(gen / "meta.sqlite")
    (folder / "00000098.jpg").symlink_to(Path(__file__))
    caplog.set_level(logging.WARNING, logger="clip2video.search.app")
    with ServerThread(create_app(world["index"])) as srv:
        status, listing = get_json(srv.port, f"/api/frames?video_id={vid}")
        assert status == 200 and listing["count"] == len(originals)  # the frames recorded at build time
        for i in range(len(originals) + 3):
            status, _, body = raw_get(srv.port, f"/frame/{vid}/{i}")
            _never_secret(body, world["ix"])
            if i < len(originals):
                assert status == 200 and body == (folder / originals[i]).read_bytes()
            else:
                assert status == 404
        # a recorded frame replaced by a link: refused, with one log line
        (folder / originals[1]).unlink()
        (folder / originals[1]).symlink_to(world["secret"] / "passwd")
        caplog.clear()
        status, _, body = raw_get(srv.port, f"/frame/{vid}/1")
        assert status == 404 and json.loads(body) == {"error": "not found"}
        lines = _refusals(caplog)
        assert len(lines) == 1 and originals[1] in lines[0] and "link" in lines[0], lines


def test_link_present_at_build_time_among_frames_not_sampled(world, capsys, tmp_path):
    vid = world["frames"][1]
    folder = world["videos"] / vid
    n = len(list(folder.iterdir()))
    (folder / "00000050.jpg").symlink_to(world["secret"] / "private.jpg")  # beyond what 4 samples pick
    # without --follow_symlinks: the folder is not indexed at all (one line), so nothing of it is served
    ix = tmp_path / "nofollow"
    capsys.readouterr()
    assert search.main(build_argv(world["videos"], ix, world["ckpt"])) == 1
    err = capsys.readouterr().err
    assert f"skipped {vid}: holds a symbolic link (00000050.jpg ->" in err and "--follow_symlinks" in err
    index = SearchIndex.open(ix)
    assert vid not in index.video_ids and len(index) == 5
    with ServerThread(create_app(index)) as srv:
        assert get_json(srv.port, f"/api/frames?video_id={vid}")[0] == 404
        assert raw_get(srv.port, f"/frame/{vid}/{n}")[0] == 404
    index.close()
    # with it: the link is resolved at build time; its target lies outside the folder, so it is not servable,
    # while a link to a frame of the same folder is recorded as that frame
    (folder / "00000051.jpg").symlink_to(folder / "00000001.jpg")
    ix = tmp_path / "follow"
    assert search.main(build_argv(world["videos"], ix, world["ckpt"], "--follow_symlinks")) == 0
    index = SearchIndex.open(ix)
    rec = index.record(vid)
    assert [f[0] for f in rec.files] == sorted(p.name for p in folder.iterdir() if not p.is_symlink()) + \
        ["00000001.jpg"]
    private = (world["secret"] / "private.jpg").read_bytes()
    with ServerThread(create_app(index)) as srv:
        status, listing = get_json(srv.port, f"/api/frames?video_id={vid}")
        assert status == 200 and listing["count"] == n + 1
        bodies = [raw_get(srv.port, u)[2] for u in listing["frames"]]
        assert private not in bodies and bodies[-1] == (folder / "00000001.jpg").read_bytes()
    index.close()


def test_indexed_video_replaced_by_a_link_or_a_changed_file(world, caplog):
    vid = world["files"][0]
    path = world["videos"] / f"{vid}.mp4"
    data = path.read_bytes()
    caplog.set_level(logging.WARNING, logger="clip2video.search.app")
    with ServerThread(create_app(world["index"])) as srv:
        assert raw_get(srv.port, f"/video/{vid}")[2] == data
        path.unlink()
        path.symlink_to(world["secret"] / "passwd")
        caplog.clear()
        for headers in ({}, {"Range": "bytes=0-10"}):
            status, _, body = raw_get(srv.port, f"/video/{vid}", headers=headers)
            assert status == 404 and SECRET not in body
        assert len(_refusals(caplog)) == 2
        # a regular file again, but not the recorded one (other size and mtime)
        path.unlink()
        path.write_bytes(data + b"appended")
        assert raw_get(srv.port, f"/video/{vid}")[0] == 404
        path.write_bytes(data)  # same size, new mtime: still not the recorded file
        assert raw_get(srv.port, f"/video/{vid}")[0] == 404
        # a folder on the way replaced by a link to a copy: the real path is no longer the recorded one
        other = world["videos"].parent / "elsewhere"
        shutil.copytree(world["videos"], other, copy_function=shutil.copy2)
        moved = world["videos"].parent / "moved-away"
        world["videos"].rename(moved)
        world["videos"].symlink_to(other)
        assert raw_get(srv.port, f"/video/{world['files'][1]}")[0] == 404
        assert raw_get(srv.port, f"/frame/{world['frames'][0]}/0")[0] == 404


def test_link_in_thumbs_to_the_index_database(world, caplog):
    vid = world["frames"][0]
    rec = world["index"].record(vid)
    gen = world["ix"] / (world["ix"] / CURRENT).read_text().strip()
    caplog.set_level(logging.WARNING, logger="clip2video.search.app")
    with ServerThread(create_app(world["index"])) as srv:
        status, headers, body = raw_get(srv.port, f"/thumb/{vid}/0")
        assert status == 200 and body == rec.thumbnails[0].read_bytes() and headers["content-type"] == "image/jpeg"
        rec.thumbnails[0].unlink()
        rec.thumbnails[0].symlink_to(gen / "meta.sqlite")
        caplog.clear()
        status, _, body = raw_get(srv.port, f"/thumb/{vid}/0")
        assert status == 404 and b"SQLite" not in body
        assert len(_refusals(caplog)) == 1
        # a thumbnail rewritten in place (same size, other bytes and mtime) is not the recorded one either
        data = bytearray(rec.thumbnails[1].read_bytes())
        data[-3] ^= 0xFF
        rec.thumbnails[1].write_bytes(bytes(data))
        assert raw_get(srv.port, f"/thumb/{vid}/1")[0] == 404
        assert raw_get(srv.port, f"/thumb/{vid}/2")[0] == 200


def test_frame_deleted_after_the_listing(world):
    vid = world["frames"][2]
    with ServerThread(create_app(world["index"])) as srv:
        status, listing = get_json(srv.port, f"/api/frames?video_id={vid}")
        assert status == 200
        for p in (world["videos"] / vid).iterdir():
            p.unlink()
        for url in listing["frames"]:
            status, headers, body = raw_get(srv.port, url)
            assert status == 404 and headers["content-type"] == "application/json"
            assert headers["x-content-type-options"] == "nosniff"


UNSAFE = ["../../../../etc/passwd", "/etc/hostname", "../../ix/CURRENT", "a/../../b", "back\\slash", "nul\x00id",
          "line\nbreak", "bell\x07", "c1\x85control", "", "trailing/", "a//b", "./here", "x" * 5000]


@pytest.mark.parametrize("vid", UNSAFE)
def test_id_problem_refuses(vid):
    assert id_problem(vid) is not None


@pytest.mark.parametrize("vid", ["video7020", "sub/dir clip", "猫 の 動画", "<b>odd id</b>", "a..b", ".hidden/x"])
def test_id_problem_accepts(vid):
    assert id_problem(vid) is None


def test_unsafe_ids_through_from_embeddings_are_refused(tmp_path, capsys, sources):
    emb = tmp_path / "emb"
    emb.mkdir()
    ids = ["ok-1", "../../../../etc/passwd", "/etc/hostname", "../../ix/CURRENT", "ok-2", "a\\b", 7]
    x = np.eye(len(ids), 8, dtype=np.float32)
    np.save(emb / "video.npy", x)
    (emb / "video_ids.json").write_text(json.dumps(ids))
    (emb / "meta.json").write_text(json.dumps({"features_path": str(sources / "videos")}))
    ix = tmp_path / "ix"
    capsys.readouterr()
    assert search.main(["build", "--from_embeddings", str(emb), "--index", str(ix)]) == 1
    got = capsys.readouterr()
    err = [ln for ln in got.err.splitlines() if ln.startswith("search.py")]
    assert len(err) == 1 and err[0].startswith("search.py: error:") and "5 unsafe video id(s)" in err[0], err
    refused = [ln for ln in got.out.splitlines() if "refused" in ln]  # the build's log: one line per unsafe id
    assert len(refused) == 5, got.out
    assert "'../../ix/CURRENT' refused: has a '..'" in refused[2] and "not a string (int)" in refused[4]
    assert not (ix / CURRENT).exists()
    # a clean export of the same folder serves its files, found by id in the recorded folder
    folders = sorted(p.name for p in (sources / "videos").iterdir() if p.is_dir())[:2]
    (emb / "video_ids.json").write_text(json.dumps(folders + ["ok-1", "ok-2", "ok-3"]))
    np.save(emb / "video.npy", np.eye(5, 8, dtype=np.float32))
    assert search.main(["build", "--from_embeddings", str(emb), "--index", str(ix)]) == 0
    index = SearchIndex.open(ix)
    with ServerThread(create_app(index)) as srv:
        vid = folders[0]
        assert get_json(srv.port, f"/api/frames?video_id={vid}")[1]["count"] == 6
        assert raw_get(srv.port, f"/frame/{vid}/0")[0] == 200
        assert raw_get(srv.port, "/video/ok-1")[0] == 404  # no such video under the folder: nothing to serve
        assert raw_get(srv.port, "/video/..%2F..%2F..%2F..%2Fetc%2Fpasswd")[0] == 404
    index.close()


def test_unsafe_names_and_links_in_a_folder(world, tmp_path, capsys):
    videos = world["videos"]
    mp4 = next(videos.glob("*.mp4"))
    shutil.copy2(mp4, videos / "back\\slash.mp4")
    shutil.copy2(mp4, videos / "line\nbreak.mp4")
    shutil.copytree(videos / world["frames"][0], videos / "tab\there")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(videos / world["frames"][3], elsewhere / "linked-folder")
    shutil.copy2(mp4, elsewhere / "linked.mp4")
    (videos / "linked-folder").symlink_to(elsewhere / "linked-folder")
    (videos / "linked.mp4").symlink_to(elsewhere / "linked.mp4")
    ix = tmp_path / "ix"
    capsys.readouterr()
    assert search.main(build_argv(videos, ix, world["ckpt"])) == 1
    err = capsys.readouterr().err
    for needle in ("contains a backslash", "contains a control character", "a symbolic link to a folder",
                   "a symbolic link (->"):
        assert needle in err, (needle, err)
    assert "5 video(s) could not be read or were refused" in err
    assert SearchIndex.open(ix).video_ids == world["index"].video_ids
    # with --follow_symlinks the links are indexed under their resolved paths and served from there
    ix = tmp_path / "follow"
    assert search.main(build_argv(videos, ix, world["ckpt"], "--follow_symlinks")) == 1  # the bad names remain
    index = SearchIndex.open(ix)
    assert {"linked", "linked-folder"} <= set(index.video_ids)
    assert index.record("linked").path == (elsewhere / "linked.mp4").resolve()
    assert index.record("linked-folder").path == (elsewhere / "linked-folder").resolve()
    with ServerThread(create_app(index)) as srv:
        assert raw_get(srv.port, "/video/linked")[2] == (elsewhere / "linked.mp4").read_bytes()
        assert raw_get(srv.port, "/frame/linked-folder/0")[0] == 200
    index.close()
    assert os.path.islink(videos / "linked.mp4")
