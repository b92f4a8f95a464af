"""The search server: API answers, error cases, path traversal, Range requests, bounds, clean stop.

The first part runs the app over a small index that implements the index interface with numpy vectors
(fast, no model); the last part starts the real ``search.py serve`` on an index built by ``search.py build``
and compares its answers with ``search.py query --json``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import numpy as np
import pytest
from server_utils import BagOfWordsIndex, ServerThread, VideoRecord, get_json, raw_get, write_jpeg

from clip2video.search.app import create_app

CAPTIONS = {
    "red-car": "a red car drives down a street",
    "dog": "a dog catches a frisbee in the park",
    "cook": "a man cooks pasta in a kitchen",
    "beach": "waves on a sunny beach",
    "frames-only": "a cat sleeps on a sofa",
    "sub/dir clip": "people dance at a party",
}


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    root = tmp_path_factory.mktemp("stub")
    folder = root / "index"
    videos = root / "videos"
    videos.mkdir()
    rng = np.random.RandomState(0)
    records = {}
    for n, vid in enumerate(CAPTIONS):
        thumbs = [write_jpeg(folder / "thumbs" / f"{n}_{j}.jpg", (40 * n, 80, 30 * j)) for j in range(3)]
        if vid == "frames-only":
            frames = videos / "frames-only"
            for j in range(5):
                write_jpeg(frames / f"{j + 1:08d}.jpg", (10 * j, 200, 0))
            (frames / "notes.txt").write_text("not a frame")
            records[vid] = VideoRecord(vid, frames, "frames", thumbs, 5.0, 5)
        else:
            path = videos / f"{n}.mp4"
            path.write_bytes(rng.randint(0, 256, 5000 + n, dtype=np.uint8).tobytes())
            records[vid] = VideoRecord(vid, path, "file", thumbs, 2.0, 50)
    (root / "secret.txt").write_text("root:x:0:0 secret")
    return BagOfWordsIndex(folder, CAPTIONS, records)


@pytest.fixture(scope="module")
def server(stub):
    app = create_app(stub, max_query_chars=200, max_k=50)
    with ServerThread(app) as srv:
        yield srv
    assert srv.stopped_cleanly


def test_health(server, stub):
    status, body = get_json(server.port, "/api/health")
    assert status == 200
    assert body == {"status": "ok", "videos": len(CAPTIONS), "model": stub.fingerprint, "qb_norm": False,
                    "generation": None}


def test_search_returns_what_the_index_ranks(server, stub):
    status, body = get_json(server.port, "/api/search?q=a%20dog%20with%20a%20frisbee&k=4")
    assert status == 200
    assert body["query"] == "a dog with a frisbee" and body["k"] == 4 and body["took_ms"] >= 0
    want = stub.query(["a dog with a frisbee"], 4)[0]
    assert [r["video_id"] for r in body["results"]] == [h.video_id for h in want]
    assert [r["score"] for r in body["results"]] == pytest.approx([h.score for h in want], abs=1e-6)
    assert body["results"][0]["video_id"] == "dog"
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    first = body["results"][0]
    assert first["video"] == "/video/dog" and len(first["thumbnails"]) == 3
    status, headers, data = raw_get(server.port, first["thumbnails"][1])
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert data == stub.record("dog").thumbnails[1].read_bytes()


def test_default_k_and_k_larger_than_the_index(server):
    status, body = get_json(server.port, "/api/search?q=car")
    assert status == 200 and body["k"] == 10 and len(body["results"]) == len(CAPTIONS)
    status, body = get_json(server.port, "/api/search?q=car&k=50")
    assert status == 200 and len(body["results"]) == len(CAPTIONS)


def test_ids_with_slashes_and_spaces_round_trip(server, stub):
    status, body = get_json(server.port, "/api/search?q=people%20dance%20party&k=1")
    r = body["results"][0]
    assert r["video_id"] == "sub/dir clip" and r["video"] == "/video/sub%2Fdir%20clip"
    status, _, data = raw_get(server.port, r["video"])
    assert status == 200 and data == stub.record("sub/dir clip").path.read_bytes()
    status, _, data = raw_get(server.port, r["thumbnails"][0])
    assert status == 200 and data == stub.record("sub/dir clip").thumbnails[0].read_bytes()


def test_similar(server, stub):
    status, body = get_json(server.port, "/api/similar?video_id=cook&k=3")
    assert status == 200 and body["video_id"] == "cook"
    want = stub.similar("cook", 3)
    assert [r["video_id"] for r in body["results"]] == [h.video_id for h in want]
    assert "cook" not in [r["video_id"] for r in body["results"]]
    status, body = get_json(server.port, "/api/similar?video_id=sub%2Fdir%20clip&k=2")
    assert status == 200 and len(body["results"]) == 2


def test_frames_only_video(server, stub):
    status, body = get_json(server.port, "/api/search?q=cat%20sleeps%20sofa&k=1")
    r = body["results"][0]
    assert r["video_id"] == "frames-only" and r["video"] is None and r["kind"] == "frames"
    status, frames = get_json(server.port, r["frames"])
    assert status == 200 and frames["count"] == 5 and len(frames["frames"]) == 5  # notes.txt is no frame
    status, headers, data = raw_get(server.port, frames["frames"][2])
    assert status == 200 and data == (stub.record("frames-only").path / "00000003.jpg").read_bytes()
    assert raw_get(server.port, "/frame/frames-only/5")[0] == 404
    assert raw_get(server.port, "/video/frames-only")[0] == 404
    assert get_json(server.port, "/api/frames?video_id=dog")[0] == 404


@pytest.mark.parametrize("path, status, needle", [
    ("/api/search", 400, "missing query parameter q"),
    ("/api/search?q=", 400, "q is empty"),
    ("/api/search?q=%20%20", 400, "q is empty"),
    ("/api/search?q=dog&k=0", 400, "k must be an integer from 1 to 50"),
    ("/api/search?q=dog&k=-3", 400, "k must be an integer from 1 to 50"),
    ("/api/search?q=dog&k=1000000", 400, "k must be an integer from 1 to 50"),
    ("/api/search?q=dog&k=" + "9" * 5000, 400, "k must be an integer"),
    ("/api/search?q=dog&k=ten", 400, "k must be an integer"),
    ("/api/search?q=dog&k=1.5", 400, "k must be an integer"),
    ("/api/search?q=" + "a" * 10000, 400, "q is 10000 characters long; the limit is 200"),
    ("/api/search?q=dog%00", 400, "NUL"),
    ("/api/similar", 400, "missing query parameter video_id"),
    ("/api/similar?video_id=nope", 404, "unknown video_id 'nope'"),
    ("/api/similar?video_id=dog&k=0", 400, "k must be an integer from 1 to 50"),
    ("/api/frames?video_id=nope", 404, "unknown video_id"),
    ("/api/nothing", 404, "not found"),
    ("/video/nope", 404, "not found"),
    ("/thumb/dog/3", 404, "not found"),
    ("/thumb/nope/0", 404, "not found"),
])
def test_errors_are_one_json_line(server, path, status, needle):
    got, headers, body = raw_get(server.port, path)
    assert got == status, body[:300]
    assert headers["content-type"].startswith("application/json")
    payload = json.loads(body)
    assert list(payload) == ["error"] and needle in payload["error"]
    assert "Traceback" not in payload["error"] and "\n" not in payload["error"]


def test_post_is_refused(server):
    """POST only where an upload is taken (/api/search, multipart: tests/test_rich_queries.py); elsewhere 405."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/api/similar?video_id=video0000")
    r = conn.getresponse()
    assert r.status == 405 and json.loads(r.read()) == {"error": "method not allowed"}
    conn.request("POST", "/api/search?q=dog")  # not a form
    r = conn.getresponse()
    assert r.status == 400 and "multipart/form-data" in json.loads(r.read())["error"]
    conn.close()


TRAVERSALS = [
    "/video/..%2f..%2fetc%2fpasswd",
    "/video/..%2F..%2F..%2Fsecret.txt",
    "/video/%2e%2e%2f%2e%2e%2fsecret.txt",
    "/video/..%252f..%252fetc%252fpasswd",  # double encoded
    "/video/%252e%252e%252fsecret.txt",
    "/video/..\\..\\secret.txt",
    "/video/..%5c..%5csecret.txt",
    "/video/%2fetc%2fpasswd",
    "/video//etc/passwd",
    "/video/../../etc/passwd",
    "/video/dog%00.mp4",
    "/video/dog/../../secret.txt",
    "/video/C:%5cWindows%5cwin.ini",
    "/video/%c0%ae%c0%ae%2fsecret.txt",  # overlong UTF-8 dots
    "/thumb/..%2f..%2fsecret.txt/0",
    "/thumb/dog/..%2f..%2fsecret.txt",
    "/frame/..%2fsecret.txt/0",
    "/frame/frames-only/..%2f..%2fsecret.txt",
    "/static/..%2fserver.py",
    "/static/%2e%2e%2fserver.py",
    "/static/../server.py",
    "/static/..%5cserver.py",
]


@pytest.mark.parametrize("path", TRAVERSALS)
def test_path_traversal_spellings_get_404(server, path):
    status, headers, body = raw_get(server.port, path)
    assert status == 404, (path, status)
    assert b"secret" not in body and b"root:" not in body and b"import" not in body
    assert json.loads(body) == {"error": "not found"}


def test_range_requests(server, stub):
    data = stub.record("red-car").path.read_bytes()
    status, headers, body = raw_get(server.port, "/video/red-car")
    assert status == 200 and body == data and headers["accept-ranges"] == "bytes"
    assert headers["content-type"] == "video/mp4"
    status, headers, body = raw_get(server.port, "/video/red-car", headers={"Range": "bytes=100-1099"})
    assert status == 206 and body == data[100:1100]
    assert headers["content-range"] == f"bytes 100-1099/{len(data)}" and headers["content-length"] == "1000"
    status, headers, body = raw_get(server.port, "/video/red-car", headers={"Range": "bytes=4000-"})
    assert status == 206 and body == data[4000:]
    status, headers, body = raw_get(server.port, "/video/red-car", headers={"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:]
    status, headers, _ = raw_get(server.port, "/video/red-car", headers={"Range": f"bytes={len(data) + 5}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"


def test_page_and_static_files(server):
    status, headers, body = raw_get(server.port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'id="q"' in body and b"/static/app.js" in body
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    html = body.decode()
    assert "http://" not in html and "https://" not in html  # nothing from elsewhere
    for name in ("app.js", "style.css"):
        status, headers, body = raw_get(server.port, f"/static/{name}")
        assert status == 200 and b"http://" not in body and b"https://" not in body
    assert raw_get(server.port, "/static/nothing.js")[0] == 404


def test_foreign_host_header_refused_on_loopback(stub):
    app = create_app(stub, allowed_hosts=["127.0.0.1", "localhost", "::1"])
    with ServerThread(app) as srv:
        assert raw_get(srv.port, "/api/health", headers={"Host": "evil.example:80"})[0] == 400
        assert raw_get(srv.port, "/api/health", headers={"Host": f"localhost:{srv.port}"})[0] == 200
        assert raw_get(srv.port, "/api/health", headers={"Host": f"[::1]:{srv.port}"})[0] == 200
    assert srv.stopped_cleanly


def test_encoding_is_bounded_and_off_the_event_loop(stub):
    """One encoder slot, one waiting place: the third concurrent query gets 503 at once, while the blocked
    encode leaves health checks and files answering."""
    app = create_app(stub, max_concurrent_encodes=1, max_waiting=1)
    stub.gate = threading.Event()
    try:
        with ServerThread(app) as srv, ThreadPoolExecutor(4) as pool:
            stub.encodes = 0
            first = pool.submit(get_json, srv.port, "/api/search?q=dog")
            deadline = time.monotonic() + 10
            while stub.encodes < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            second = pool.submit(get_json, srv.port, "/api/search?q=car")
            time.sleep(0.3)
            t0 = time.perf_counter()
            status, body = get_json(srv.port, "/api/search?q=beach")
            assert status == 503 and "busy" in body["error"]
            assert get_json(srv.port, "/api/health")[0] == 200
            assert raw_get(srv.port, "/video/dog")[0] == 200
            assert time.perf_counter() - t0 < 5  # all answered while the encoder is blocked
            assert not first.done() and not second.done()
            stub.gate.set()
            assert first.result(30)[0] == 200 and second.result(30)[0] == 200
            assert get_json(srv.port, "/api/search?q=beach")[0] == 200
    finally:
        stub.gate = None
    assert srv.stopped_cleanly


def test_waiting_queries_are_batched_with_the_same_answers(stub):
    """While the one encoder is busy, three queries wait; they are then encoded in one batch and each gets
    exactly what it gets alone (including its own k)."""
    app = create_app(stub, max_concurrent_encodes=1, max_waiting=8)
    texts = [("a dog", 2), ("a red car", 3), ("waves on a beach", 2)]
    alone = {q: [(h.video_id, h.score) for h in stub.query([q], k)[0]] for q, k in texts}
    stub.gate = threading.Event()
    try:
        with ServerThread(app) as srv, ThreadPoolExecutor(4) as pool:
            stub.encodes = 0
            first = pool.submit(get_json, srv.port, "/api/search?q=people&k=1")
            deadline = time.monotonic() + 10
            while stub.encodes < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            waiting = [pool.submit(get_json, srv.port, "/api/search?" + urlencode({"q": q, "k": k}))
                       for q, k in texts]
            time.sleep(0.5)
            stub.gate.set()
            assert first.result(30)[0] == 200
            for (q, k), fut in zip(texts, waiting, strict=True):
                status, body = fut.result(30)
                assert status == 200 and body["k"] == k
                assert [r["video_id"] for r in body["results"]] == [v for v, _ in alone[q]]
                assert [r["score"] for r in body["results"]] == pytest.approx([s for _, s in alone[q]], abs=1e-5)
            assert stub.encodes == 2  # the first query alone, then the three waiting ones together
    finally:
        stub.gate = None
    assert srv.stopped_cleanly


def test_server_stops_cleanly(stub):
    with ServerThread(create_app(stub)) as srv:
        assert get_json(srv.port, "/api/health")[0] == 200
    assert srv.stopped_cleanly
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", srv.port), timeout=2):
        pass


def test_bad_bounds_refused(stub):
    with pytest.raises(ValueError, match="max_k must be at least 1"):
        create_app(stub, max_k=0)


# ----------------------------------------------------------------------------------------------- the real thing
REAL_QUERIES = ["a man is singing on a stage", "a cartoon of a dog", "people cooking food in a kitchen"]


@pytest.fixture(scope="module")
def real(tmp_path_factory, parity_weights):
    """``search.py serve`` (a subprocess, as a user runs it) on an index built by ``search.py build``."""
    import os

    from server_utils import build_real_index, start_serve

    from conftest import PARITY, ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    index = build_real_index(tmp_path_factory.getbasetemp(), parity_weights, PARITY / "msrvtt" / "frames", ROOT, env)
    proc, url, lines = start_serve(["--index", str(index), "--port", "0", "--max_k", "50"], ROOT, env)
    port = int(url.rsplit(":", 1)[1])
    yield {"index": index, "proc": proc, "url": url, "port": port, "lines": lines, "env": env, "root": ROOT}
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_real_api_matches_query_json(real):
    from server_utils import query_json

    want = query_json(real["index"], real["root"], real["env"], "-k", "5", *REAL_QUERIES)
    assert [w["query"] for w in want] == REAL_QUERIES
    for w in want:
        status, body = get_json(real["port"], "/api/search?" + urlencode({"q": w["query"], "k": 5}))
        assert status == 200 and body["query"] == w["query"] and body["k"] == 5
        assert [r["video_id"] for r in body["results"]] == [h["video_id"] for h in w["results"]]
        assert [r["score"] for r in body["results"]] == pytest.approx([h["score"] for h in w["results"]], abs=1e-5)
        assert len(body["results"]) == 5
        for r in body["results"]:
            assert r["kind"] == "frames" and r["video"] is None and r["thumbnails"]
    first = body["results"][0]
    status, headers, data = raw_get(real["port"], first["thumbnails"][0])
    assert status == 200 and headers["content-type"] == "image/jpeg" and data[:2] == b"\xff\xd8"
    status, frames = get_json(real["port"], first["frames"])
    assert status == 200 and frames["count"] == len(frames["frames"]) > 0
    status, _, data = raw_get(real["port"], frames["frames"][0])
    assert status == 200 and data[:2] == b"\xff\xd8"


def test_real_similar_matches_query_like(real):
    from server_utils import query_json

    (want,) = query_json(real["index"], real["root"], real["env"], "-k", "4", "--like", "video7020")
    status, body = get_json(real["port"], "/api/similar?video_id=video7020&k=4")
    assert status == 200
    assert [r["video_id"] for r in body["results"]] == [h["video_id"] for h in want["results"]]
    assert [r["score"] for r in body["results"]] == pytest.approx([h["score"] for h in want["results"]], abs=1e-5)


def test_real_health(real):
    from clip2video.search.index import SearchIndex

    index = SearchIndex.open(real["index"])
    status, body = get_json(real["port"], "/api/health")
    assert status == 200 and body == {"status": "ok", "videos": 12, "model": index.fingerprint, "qb_norm": False,
                                      "generation": index.generation.name}
    assert any(f"serving 12 videos at {real['url']}/" in line for line in real["lines"])


@pytest.mark.parametrize("path, status", [
    ("/api/search", 400), ("/api/search?q=dog&k=0", 400), ("/api/search?q=dog&k=1000000", 400),
    ("/api/search?q=" + "a" * 10000, 400), ("/api/similar?video_id=video0000", 404),
    *[(t, 404) for t in TRAVERSALS[:12]],
])
def test_real_errors(real, path, status):
    got, headers, body = raw_get(real["port"], path)
    assert got == status and list(json.loads(body)) == ["error"]
    assert b"Traceback" not in body


def test_real_refuses_foreign_host(real):
    assert raw_get(real["port"], "/api/health", headers={"Host": "attacker.example"})[0] == 400


def test_real_server_stops_cleanly_on_sigterm(real):
    import signal as _signal

    proc = real["proc"]
    assert proc.poll() is None
    proc.send_signal(_signal.SIGTERM)
    assert proc.wait(30) == 0
    time.sleep(0.2)
    assert any("stopped (SIGTERM)" in line for line in real["lines"]), real["lines"][-5:]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", real["port"]), timeout=2):
        pass


def test_serve_bad_arguments_are_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, code, needle in ((["--index", str(tmp_path / "none")], 1, str(tmp_path / "none")),
                               (["--index", str(tmp_path), "--port", "70000"], 2, "--port 70000"),
                               (["--index", str(tmp_path), "--max_k", "0"], 2, "--max_k must be at least 1")):
        r = subprocess.run([sys.executable, "search.py", "serve", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("search.py")]
        assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert r.returncode == code and needle in lines[0], lines
