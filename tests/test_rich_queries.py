"""Image, clip and arithmetic queries on a real index of a tiny random model, through the library, the real
command line (``search.py query``) and the real app (``POST``/``GET /api/search`` on a loopback server).

The central checks: an image query is the vector the index stores for a frame folder holding only that image
(so it ranks as that one-frame video does), a clip query is the vector the index stores for that clip, and a
weighted sum is the brute-force ranking of the combination ``query_vectors`` documents. Then every bad input:
one line, exit != 0, or HTTP 400 with a one-line JSON error.
"""

from __future__ import annotations

import http.client
import io
import json
import shutil
import uuid
from urllib.parse import quote

import numpy as np
import pytest
import torch
from PIL import Image
from search_utils import one_line_error, query_json
from server_utils import ServerThread, get_json

from clip2video.cli import search
from clip2video.dataloaders.frames import preprocess_image, preprocess_image_bytes
from clip2video.dataloaders.synthetic import make_synthetic_dataset
from clip2video.modules.network.backbone import ClipConfig
from clip2video.modules.weights.factory import create_model
from clip2video.modules.weights.release import export_original
from clip2video.search.build import build_from_embeddings
from clip2video.search.index import SearchIndex
from clip2video.search.query_parse import Part, parse_query
from clip2video.search.query_vectors import QueryEncoder, combine

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- the index
@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """Frame folders, two one-frame folders (a JPEG and a PNG frame) and mp4 clips read at 10 fps, indexed."""
    root = tmp_path_factory.mktemp("rich")
    make_synthetic_dataset(root / "s1", n_videos=6, seed=3, size=32, n_frames=8, write="frames",
                           splits=(0.0, 0.0, 1.0))
    make_synthetic_dataset(root / "s2", n_videos=4, seed=5, size=32, n_frames=12, fps=10, write="mp4",
                           splits=(0.0, 0.0, 1.0))
    videos = root / "videos"
    shutil.copytree(root / "s1" / "frames", videos)
    for n, mp4 in enumerate(sorted((root / "s2" / "videos").glob("*.mp4"))):
        shutil.copy(mp4, videos / f"clip{n}.mp4")
    jpg = root / "query" / "frame.jpg"
    jpg.parent.mkdir()
    shutil.copy(videos / "syn00000" / "00000004.jpg", jpg)
    png = root / "query" / "frame.png"
    Image.open(videos / "syn00003" / "00000002.jpg").convert("RGB").save(png)
    (videos / "single").mkdir()
    shutil.copy(jpg, videos / "single" / "00000001.jpg")
    (videos / "single_png").mkdir()
    shutil.copy(png, videos / "single_png" / "00000001.png")
    torch.manual_seed(0)
    ckpt = export_original(create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3),
                           root / "ckpt" / "pytorch_model.bin.1")
    ix = root / "ix"
    argv = ["build", "--features_path", str(videos), "--index", str(ix), "--checkpoint", str(ckpt.parent),
            "--model_num", "1", "--max_words", "16", "--max_frames", "6", "--video_fps", "10",
            "--num_thread_reader", "0", "--device", "cpu", "--no_progress"]
    assert search.main(argv) == 0
    index = SearchIndex.open(ix, device="cpu")
    return {"root": root, "videos": videos, "ix": ix, "jpg": jpg, "png": png, "index": index,
            "encoder": QueryEncoder(index)}


def caption_weighted(index, video_id: str) -> np.ndarray:
    """A stored video vector weighted as a caption's, ``[w·v_g, (1−w)·v_a]`` (what ``--like`` searches with)."""
    v = index.stored_vector(video_id)
    g, w = index.model_record.global_dim, index.model_record.center_weight
    return np.concatenate([w * v[:g], (1 - w) * v[g:]])


def brute_force(index, vector: np.ndarray, leave_out=()) -> list[tuple[str, float]]:
    scores = index.vectors(np.arange(len(index))) @ vector * index.logit_scale
    order = np.argsort(-scores, kind="stable")
    return [(index.video_ids[i], float(scores[i])) for i in order if index.video_ids[i] not in leave_out]


def ids_scores(results) -> tuple[list[str], list[float]]:
    return [h["video_id"] for h in results], [h["score"] for h in results]


# ----------------------------------------------------------------------------------------------- equalities
def test_image_bytes_are_the_frame_file(rich, tmp_path):
    """An image held in memory gives the tensor its file gives in a frame folder; EXIF orientation (which
    frame folders never carry) is applied only when asked, and equals the upright picture."""
    for path in (rich["jpg"], rich["png"]):
        assert torch.equal(preprocess_image_bytes(path.read_bytes(), 224), preprocess_image(path, 224))
    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(upright).save(buf, "PNG")
    turned = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # stored turned; tag 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = io.BytesIO()
    turned.save(tagged, "PNG", exif=exif)
    want = preprocess_image_bytes(buf.getvalue(), 32)
    assert torch.equal(preprocess_image_bytes(tagged.getvalue(), 32, upright=True), want)
    assert not torch.equal(preprocess_image_bytes(tagged.getvalue(), 32), want)


def test_image_query_is_the_one_frame_video(rich, capsys):
    index, enc, ix = rich["index"], rich["encoder"], rich["ix"]
    for img, vid in ((rich["jpg"], "single"), (rich["png"], "single_png")):
        v = enc.vector([Part(1.0, "image", str(img))])
        np.testing.assert_allclose(v, caption_weighted(index, vid), atol=2e-6, rtol=0)
        (res,) = query_json(capsys, ix, "-k", "100", "--image", str(img))
        (like,) = query_json(capsys, ix, "-k", "100", "--like", vid)
        assert res["query"] == {"image": str(img)}
        ids, scores = ids_scores(res["results"])
        like_ids, like_scores = ids_scores(like["results"])
        # the one-frame video itself first, with the highest score a query can have; then --like's ranking
        assert ids[0] == vid and scores[0] == pytest.approx(index.logit_scale, rel=1e-5)
        assert ids[1:] == like_ids and len(ids) == len(index)
        np.testing.assert_allclose(scores[1:], like_scores, atol=1e-4)
        # the table output names the image
        capsys.readouterr()
        assert search.main(["query", "--index", str(ix), "-k", "2", "--image", str(img)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"image: {img}" and vid in out[1]


def test_clip_query_is_the_whole_clip_vector(rich, capsys):
    index, enc, ix = rich["index"], rich["encoder"], rich["ix"]
    assert index.manifest["encoding"]["video_fps"] == 10.0  # the build's --video_fps, which the clip reuses
    assert enc.frame_settings().video_fps == 10.0 and enc.frame_settings().max_frames == 6
    for n in range(4):
        clip = rich["videos"] / f"clip{n}.mp4"
        v = enc.vector([Part(1.0, "clip", str(clip))])
        np.testing.assert_allclose(v, caption_weighted(index, f"clip{n}"), atol=2e-6, rtol=0)
    clip = rich["videos"] / "clip2.mp4"
    res = query_json(capsys, ix, "-k", "5", "--clip", str(clip), "--image", str(rich["jpg"]))
    assert [r["query"] for r in res] == [{"image": str(rich["jpg"])}, {"clip": str(clip)}]
    assert res[1]["results"][0]["video_id"] == "clip2"
    assert res[1]["results"][0]["score"] == pytest.approx(index.logit_scale, rel=1e-5)


def test_arithmetic_is_the_weighted_sum(rich, capsys):
    index, enc, ix = rich["index"], rich["encoder"], rich["ix"]
    words = ["2:a red circle", "+", str(rich["jpg"]), "-", "a blue square", "+", "0.5:like:syn00002"]
    by_words = query_json(capsys, ix, "-k", "100", *words)
    typed = f'"2:a red circle" + {rich["jpg"]} - "a blue square" + 0.5:like:syn00002'
    by_string = query_json(capsys, ix, "-k", "100", typed)
    assert len(by_words) == 1 and by_words[0]["results"] == by_string[0]["results"]
    assert by_words[0]["query"]["parts"] == [
        {"weight": 2.0, "kind": "text", "value": "a red circle"},
        {"weight": 1.0, "kind": "image", "value": str(rich["jpg"])},
        {"weight": -1.0, "kind": "text", "value": "a blue square"},
        {"weight": 0.5, "kind": "like", "value": "syn00002"}]
    # by hand: each part's unit halves, summed with the weights, each half back to unit, weighted w / 1−w
    g_dim, w = index.model_record.global_dim, index.model_record.center_weight
    t = enc.text_halves(["a red circle", "a blue square"])
    img = caption_weighted(index, "single")
    img_halves = (img[:g_dim] / w, img[g_dim:] / (1 - w))
    liked = index.stored_vector("syn00002")
    halves = [t[0], img_halves, t[1], (liked[:g_dim], liked[g_dim:])]
    g = sum(k * h[0].astype(np.float64) for k, h in zip([2, 1, -1, 0.5], halves, strict=True))
    a = sum(k * h[1].astype(np.float64) for k, h in zip([2, 1, -1, 0.5], halves, strict=True))
    want = np.concatenate([w * g / np.linalg.norm(g), (1 - w) * a / np.linalg.norm(a)])
    np.testing.assert_allclose(enc.vector(parse_query(typed)), want, atol=1e-5)
    brute = brute_force(index, want.astype(np.float32), leave_out={"syn00002"})  # like: leaves its video out
    got = by_words[0]["results"]
    assert [h["video_id"] for h in got] == [b[0] for b in brute]
    np.testing.assert_allclose([h["score"] for h in got], [b[1] for b in brute], atol=1e-3)
    # one text part with any positive weight is the plain caption query
    plain, weighted = query_json(capsys, ix, "-k", "100", "a red circle", '"3:a red circle"')
    assert plain["query"] == "a red circle" and weighted["query"]["parts"][0]["weight"] == 3.0
    assert ids_scores(plain["results"])[0] == ids_scores(weighted["results"])[0]
    np.testing.assert_allclose(ids_scores(plain["results"])[1], ids_scores(weighted["results"])[1], atol=1e-4)
    # quotes or text: around a caption change nothing
    quoted, forced = query_json(capsys, ix, "-k", "100", '"a red circle"', "text:a red circle")
    assert quoted["query"] == '"a red circle"' and quoted["results"] == plain["results"] == forced["results"]
    # a negated caption ranks the index in reverse
    (neg,) = query_json(capsys, ix, "-k", "100", "- a red circle")
    assert ids_scores(neg["results"])[0] == ids_scores(plain["results"])[0][::-1]
    # unicode text parts
    (uni,) = query_json(capsys, ix, "-k", "3", "猫がボールを追いかける 🐈 + 2:café naïve - über")
    assert [p["value"] for p in uni["query"]["parts"]] == ["猫がボールを追いかける 🐈", "café naïve", "über"]
    assert len(uni["results"]) == 3


def test_command_line_errors(rich, capsys, tmp_path):
    ix = str(rich["ix"])
    q = ["query", "--index", ix]
    err = one_line_error(capsys, [*q, "a + - b"], code=2)
    assert "query 1 'a + - b': two signs in a row at character 5" in err
    assert "unterminated quote" in one_line_error(capsys, [*q, '"2:a dog'], code=2)
    assert "followed by nothing" in one_line_error(capsys, [*q, "a dog", "+"], code=2)
    assert "a weight takes no sign" in one_line_error(capsys, [*q, "-2:x + y"], code=2)
    assert "is a URL" in one_line_error(capsys, [*q, "a + https://x.org/y.jpg"], code=2)
    assert "--image nothere.jpg: no such file" in one_line_error(capsys, [*q, "--image", "nothere.jpg"], code=2)
    assert "--clip nope.mp4: no such file" in one_line_error(capsys, [*q, "--clip", "nope.mp4"], code=2)
    assert "image nothere.png: no such file" in one_line_error(capsys, [*q, "a dog + nothere.png"], code=2)
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image at all")
    assert "fake.jpg: not an image (JPEG, PNG, BMP or WebP" in one_line_error(capsys, [*q, "--image", str(fake)],
                                                                              code=1)
    gif = tmp_path / "anim.png"  # named PNG, is a GIF: judged by content
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    assert "anim.png: not an image" in one_line_error(capsys, [*q, "--image", str(gif)], code=1)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(rich["jpg"].read_bytes()[:300])
    assert "trunc.jpg" in one_line_error(capsys, [*q, "--image", str(trunc)], code=1)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    assert "broken.mp4" in one_line_error(capsys, [*q, "--clip", str(broken)], code=1)
    assert "like:nope: no such video" in one_line_error(capsys, [*q, "a dog + like:nope"], code=1)
    assert "cancel out" in one_line_error(capsys, [*q, "a red circle", "-", "a red circle"], code=1)
    assert "give query texts" in one_line_error(capsys, q, code=2)
    # an index made from exported vectors records no frame settings: no image query there
    emb = tmp_path / "emb"
    emb.mkdir()
    index = rich["index"]
    np.save(emb / "video.npy", index.vectors(np.arange(len(index))))
    (emb / "video_ids.json").write_text(json.dumps(index.video_ids))
    build_from_embeddings(emb, tmp_path / "ix_emb")
    err = one_line_error(capsys, ["query", "--index", str(tmp_path / "ix_emb"), "--image", str(rich["jpg"])], code=1)
    assert "exported vectors" in err
    # indexed videos need no model: arithmetic over likes works there (no TAB split recorded: one half)
    emb_index = SearchIndex.open(tmp_path / "ix_emb")
    (res,) = query_json(capsys, tmp_path / "ix_emb", "-k", "3", "like:clip0 - 0.5:like:clip1")
    v = combine([1.0, -0.5], [(emb_index.stored_vector(i), None) for i in ("clip0", "clip1")], 0.5)
    assert [h["video_id"] for h in res["results"]] == \
        [b[0] for b in brute_force(emb_index, v, leave_out={"clip0", "clip1"})][:3]


# ----------------------------------------------------------------------------------------------- the API
def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/form-data body of (field name, file name or None, data)."""
    boundary = boundary or uuid.uuid4().hex
    out = bytearray()
    for name, filename, data in parts:
        out += f"--{boundary}\r\n".encode()
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"Content-Disposition: {disp}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def post(port: int, body, content_type: str | None, path: str = "/api/search", headers=None,
         chunked: bool = False) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        hdrs = dict(headers or {})
        if content_type:
            hdrs["Content-Type"] = content_type
        conn.request("POST", path, body=body, headers=hdrs, encode_chunked=chunked)
        r = conn.getresponse()
        raw = r.read()
        assert r.getheader("content-type", "").startswith("application/json"), raw[:200]
        return r.status, json.loads(raw)
    finally:
        conn.close()


def _noisy_png(side: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _hits(enc: QueryEncoder, parts, k, uploads=None) -> tuple[list[str], list[float]]:
    hits = enc.search(parts, k, uploads)
    return [h.video_id for h in hits], [h.score for h in hits]


@pytest.fixture(scope="module")
def server(rich):
    from clip2video.search.app import create_app

    app = create_app(rich["index"], max_upload_bytes=6000, max_upload_files=2, max_image_pixels=40 * 40,
                     max_query_chars=300)
    with ServerThread(app) as srv:
        yield srv
    assert srv.stopped_cleanly


def test_api_image_upload_and_arithmetic(rich, server):
    enc, jpg, png = rich["encoder"], rich["jpg"], rich["png"]
    # an uploaded image alone: the CLI's --image ranking
    body, ctype = multipart([("image", "frame.jpg", jpg.read_bytes()), ("k", None, b"100")])
    status, res = post(server.port, body, ctype)
    assert status == 200, res
    want = _hits(enc, [Part(1.0, "image", str(jpg))], 100)
    assert [h["video_id"] for h in res["results"]] == want[0] and res["results"][0]["video_id"] == "single"
    np.testing.assert_allclose([h["score"] for h in res["results"]], want[1], atol=1e-4)
    assert res["parts"] == [{"weight": 1.0, "kind": "image", "value": "frame.jpg"}] and res["k"] == 100
    assert res["results"][0]["thumbnails"] and res["results"][0]["kind"] == "frames"
    # arithmetic naming uploads by file name (unicode, and a folder a client may send is dropped)
    q = '"2:a red circle" + фото.png - "image:my frame.jpg" + 0.5:like:clip1'
    body, ctype = multipart([("q", None, q.encode()), ("image", "фото.png", png.read_bytes()),
                             ("image", "C:\\fakepath\\my frame.jpg", jpg.read_bytes()), ("k", None, b"7")])
    status, res = post(server.port, body, ctype)
    assert status == 200, res
    cli_q = f'"2:a red circle" + {png} - "image:{jpg}" + 0.5:like:clip1'
    want = _hits(enc, parse_query(cli_q), 7)
    assert [h["video_id"] for h in res["results"]] == want[0] and "clip1" not in want[0]
    np.testing.assert_allclose([h["score"] for h in res["results"]], want[1], atol=1e-4)
    assert [p["value"] for p in res["parts"]] == ["a red circle", "фото.png", "my frame.jpg", "clip1"]
    # k and q may also come in the URL
    body, ctype = multipart([("image", "x.png", png.read_bytes())])
    status, res = post(server.port, body, ctype, path="/api/search?k=2&q=" + quote("x.png - 0.5:snow"))
    assert status == 200 and len(res["results"]) == 2, res
    assert [h["video_id"] for h in res["results"]] == _hits(enc, parse_query(f"{png} - 0.5:snow"), 2)[0]
    # GET takes arithmetic of texts and indexed videos
    q = '"2:a red circle" - like:syn00002'
    status, res = get_json(server.port, "/api/search?k=100&q=" + quote(q))
    assert status == 200 and res["parts"][1] == {"weight": -1.0, "kind": "like", "value": "syn00002"}
    want = _hits(enc, parse_query(q), 100)
    assert [h["video_id"] for h in res["results"]] == want[0]
    np.testing.assert_allclose([h["score"] for h in res["results"]], want[1], atol=1e-4)
    # a plain caption is unchanged: no "parts", the text path's answer
    status, res = get_json(server.port, "/api/search?k=5&q=" + quote("a red circle"))
    assert status == 200 and "parts" not in res
    assert [h["video_id"] for h in res["results"]] == [h.video_id for h in rich["index"].query(["a red circle"], 5)[0]]


def _bad_requests(rich):
    jpg, png = rich["jpg"].read_bytes(), rich["png"].read_bytes()
    big = _noisy_png(48)  # over 6000 bytes
    assert len(big) > 6000
    wide = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(wide, "JPEG")  # small file, 4096 pixels > 1600
    gif, svg = io.BytesIO(), b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="9" height="9"/></svg>'
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    form = multipart
    return [
        ("oversized upload", form([("image", "big.png", big)]), "is 7", "limit is 6000"),
        ("over the pixel bound", form([("image", "wide.jpg", wide.getvalue())]), "64x64 pixels", "1600 pixels"),
        ("text named .jpg", form([("image", "a.jpg", b"hello, not an image")]), "a.jpg: not an image", "WebP"),
        ("GIF", form([("image", "g.png", gif.getvalue())]), "g.png: not an image", ""),
        ("SVG", form([("image", "s.svg", svg)]), "s.svg: not an image", ""),
        ("empty file", form([("image", "e.jpg", b"")]), "e.jpg: empty file", ""),
        ("JPEG cut in its header", form([("image", "t.jpg", jpg[:300])]), "t.jpg: not a readable JPEG image", ""),
        ("JPEG cut in its data", form([("image", "d.jpg", jpg[:-100])]), "d.jpg: cannot decode image", "truncated"),
        ("PNG header, JPEG body", form([("image", "m.png", b"\x89PNG\r\n\x1a\n" + jpg[8:])]), "m.png", ""),
        ("three images", form([("image", f"{i}.png", png) for i in range(3)]), "more than 2 images uploaded", ""),
        ("five parts", form([("q", None, b"0.png + 1.png"), ("k", None, b"3")]
                            + [("image", f"{i}.png", png) for i in range(3)]), "too many parts in the form", ""),
        ("unknown field", form([("file", "a.png", png)]), "unknown form field 'file'", ""),
        ("q twice", form([("q", None, b"a"), ("q", None, b"b")]), "form field q given twice", ""),
        ("q as a file", form([("q", "q.txt", b"a dog")]), "form field q must be text", ""),
        ("image as text", form([("image", None, png)]), "image field must be a file", ""),
        ("same name twice", form([("image", "a.png", png), ("image", "dir/a.png", png)]),
         "two uploaded images are named 'a.png'", ""),
        ("upload unused by q", form([("q", None, b"a dog"), ("image", "a.png", png)]),
         "uploaded image 'a.png' is not used by q", ""),
        ("q names no upload", form([("q", None, b"a dog + b.png"), ("image", "a.png", png)]),
         "image:b.png: no uploaded image of that name", ""),
        ("a clip in q", form([("q", None, b"a.png + run.mp4"), ("image", "a.png", png)]),
         "video clips are not accepted here", ""),
        ("malformed q", form([("q", None, b"a + - b"), ("image", "a.png", png)]), "q: two signs in a row", ""),
        ("long q", form([("q", None, b"x" * 301), ("image", "a.png", png)]), "q is 301 characters long", ""),
        ("q not UTF-8", form([("q", None, b"\xff\xfe"), ("image", "a.png", png)]), "not UTF-8", ""),
        ("bad k", form([("k", None, b"ten"), ("image", "a.png", png)]), "k must be an integer", ""),
        ("nothing", form([("k", None, b"3")]), "give q or upload an image", ""),
        ("unknown like", form([("q", None, b"a.png + like:nope"), ("image", "a.png", png)]),
         "like:nope: no such video", ""),
        ("no closing boundary", (form([("image", "a.png", png)], "b9")[0][:-30], "multipart/form-data; boundary=b9"),
         "closing boundary", ""),
        ("data after the end", (form([("q", None, b"a")], "b0")[0] + b"junk", "multipart/form-data; boundary=b0"),
         "after the closing", ""),
        ("no boundary", (b"x", "multipart/form-data"), "without a valid boundary", ""),
        ("JSON body", (b'{"q": "a dog"}', "application/json"), "takes multipart/form-data", ""),
        ("no content type", (b"", None), "takes multipart/form-data", ""),
        ("header without name", (b"--b1\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b1--\r\n",
                                 "multipart/form-data; boundary=b1"), "name=", ""),
    ]


def test_api_upload_bounds(rich, server):
    for what, (body, ctype), needle, needle2 in _bad_requests(rich):
        status, res = post(server.port, body, ctype)
        assert status == 400, (what, res)
        assert list(res) == ["error"] and needle in res["error"] and needle2 in res["error"], (what, res)
        assert "\n" not in res["error"] and "Traceback" not in res["error"], what
    # a declared length over the bound is refused before the body is read; so is a chunked body past it
    body, ctype = multipart([("image", "a.png", _noisy_png(200))])  # over 2 × 6000 + the room for fields
    status, res = post(server.port, body, ctype)
    assert status == 400 and "request body of" in res["error"] and "limit is" in res["error"], res
    status, res = post(server.port, iter([body[i:i + 4096] for i in range(0, len(body), 4096)]), ctype, chunked=True)
    assert status == 400 and "request body over" in res["error"], res
    # GET: arithmetic may not name an image (nothing is read from the server's disk) nor a clip
    for q, needle in ((f"a dog + {rich['jpg']}", "GET takes texts and like: parts; upload images with POST"),
                      (f"a dog + {rich['videos'] / 'clip0.mp4'}", "GET takes texts and like: parts"),
                      ("a + - b", "q: two signs in a row"), ("a dog - a dog", "cancel out")):
        status, res = get_json(server.port, "/api/search?q=" + quote(q))
        assert status == 400 and needle in res["error"], (q, res)
    # the server is fine afterwards
    assert get_json(server.port, "/api/health")[0] == 200
    status, res = post(server.port, *multipart([("image", "ok.png", rich["png"].read_bytes())]))
    assert status == 200 and res["results"][0]["video_id"] == "single_png"
