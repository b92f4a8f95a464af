"""No 500 on odd input, JSON errors with the security headers everywhere, HEAD, bounded memory, and a running
server that follows the index to the generations later builds write. All on loopback.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import shutil
import socket
import string
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from server_utils import BagOfWordsIndex, ServerThread, VideoRecord, get_json, raw_get, write_jpeg

from clip2video.cli import search
from clip2video.modules.network.tokenizer import ByteLRU, ClipTokenizer, _bpe
from clip2video.search.app import create_app
from clip2video.search.index import SearchIndex
from clip2video.search.limits import strict_int
from clip2video.search.store import CURRENT, MANIFEST
from clip2video.search.web import SECURITY_HEADERS

CAPTIONS = {"dog": "a dog catches a frisbee", "cook": "a man cooks pasta", "frames-only": "a cat on a sofa"}


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    records = {}
    for n, vid in enumerate(CAPTIONS):
        thumbs = [write_jpeg(root / "index" / "thumbs" / f"{n}_{j}.jpg", (40 * n, 80, 30 * j)) for j in range(2)]
        if vid == "frames-only":
            for j in range(3):
                write_jpeg(root / "videos" / vid / f"{j + 1:08d}.jpg", (10 * j, 200, 0))
            records[vid] = VideoRecord(vid, root / "videos" / vid, "frames", thumbs)
        else:
            path = root / "videos" / f"{vid}.mp4"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(bytes(range(256)) * 20)
            records[vid] = VideoRecord(vid, path, "file", thumbs)
    return BagOfWordsIndex(root / "index", CAPTIONS, records)


@pytest.fixture(scope="module")
def server(stub):
    with ServerThread(create_app(stub, max_k=50, allowed_hosts=["127.0.0.1", "localhost"])) as srv:
        yield srv
    assert srv.stopped_cleanly


def assert_guarded(headers: dict, json_error: bool = True) -> None:
    for name, value in SECURITY_HEADERS:
        assert headers.get(name.decode()) == value.decode(), (name, headers)
    if json_error:
        assert headers["content-type"].startswith("application/json"), headers


# ----------------------------------------------------------------------------------------------- odd input
ODD_K = ["%C2%B2", "%2b-5", "--5", "+5", "-0", "%205", "5%20", "1_0", "%D9%A3", "0x10", "1e2", "5.0", "%00",
         "9" * 5000, "%EF%BC%90"]  # the last: a fullwidth zero


@pytest.mark.parametrize("route", ["/api/search?q=dog", "/api/similar?video_id=dog"])
@pytest.mark.parametrize("k", ODD_K)
def test_odd_k_is_a_400_not_a_500(server, route, k):
    status, headers, body = raw_get(server.port, f"{route}&k={k}")
    assert status == 400, (k, status, body[:200])
    assert "k must be an integer from 1 to 50" in json.loads(body)["error"]
    assert_guarded(headers)


@pytest.mark.parametrize("q, status", [("9" * 900 + ":dog", 400), ("%C2%B2:dog", 200), ("1e999:dog", 200)])
def test_odd_query_weights_are_not_a_500(server, q, status):
    got, headers, body = raw_get(server.port, f"/api/search?q={q}")
    assert got == status, (q, got, body[:200])
    assert_guarded(headers, json_error=status >= 400)


@pytest.mark.parametrize("path", ["/thumb/dog/" + "9" * 5000, "/frame/frames-only/" + "7" * 5000,
                                  "/thumb/dog/-1", "/thumb/dog/+1", "/thumb/dog/%C2%B2", "/frame/frames-only/1.0",
                                  "/frame/frames-only/%EF%BC%91", "/thumb/dog/", "/thumb/dog/0x1"])
def test_odd_file_numbers_are_a_404(server, path, caplog):
    caplog.set_level(logging.INFO)
    status, headers, body = raw_get(server.port, path)
    assert status == 404 and json.loads(body) == {"error": "not found"}
    assert_guarded(headers)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback, no 5 KB URL logged


def test_strict_int():
    assert [strict_int(s) for s in ("0", "7", "007", "123456789")] == [0, 7, 7, 123456789]
    for s in (None, "", "1234567890", "+1", "-1", " 1", "1 ", "²", "١", "1_0", "0x1", "1.0", "９"):
        assert strict_int(s) is None, s


# ----------------------------------------------------------------------------------------------- headers
def _request(port, method, path, headers=None, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in {"Host": f"127.0.0.1:{port}", **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("method, path, headers, status", [
    ("GET", "/api/health", {}, 200),
    ("GET", "/video/dog", {}, 200),
    ("GET", "/video/dog", {"Range": "bytes=10-19"}, 206),
    ("GET", "/video/dog", {"Range": "bytes=999999-"}, 416),
    ("GET", "/thumb/dog/1", {}, 200),
    ("GET", "/nothing", {}, 404),
    ("GET", "/api/search?q=", {}, 400),
    ("POST", "/api/health", {}, 405),
    ("POST", "/api/search?q=dog", {}, 400),  # an upload route: not multipart
    ("DELETE", "/video/dog", {}, 405),
    ("GET", "/api/health", {"Host": "evil.example"}, 400),
])
def test_security_headers_on_every_answer(server, method, path, headers, status):
    got, hdrs, body = _request(server.port, method, path, headers)
    assert got == status
    assert_guarded(hdrs, json_error=status >= 400)
    if status >= 400:
        assert list(json.loads(body)) == ["error"]


def test_range_errors_are_json(server, stub):
    data = stub.record("dog").path.read_bytes()
    status, headers, body = raw_get(server.port, "/video/dog", headers={"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{len(data)}"
    assert "not satisfiable" in json.loads(body)["error"]
    status, headers, body = raw_get(server.port, "/video/dog", headers={"Range": "bytes=-0"})
    assert status == 416 and headers["content-type"] == "application/json"
    for odd in ("bytes=5-2", "bytes=x-", "items=0-5", "bytes=0-1,4-5", "bytes=%s-" % ("9" * 30)):
        status, _, body = raw_get(server.port, "/video/dog", headers={"Range": odd})
        assert status in (200, 416) and (body == data or list(json.loads(body)) == ["error"]), odd
    status, headers, body = raw_get(server.port, "/video/dog", headers={"Range": "bytes=5100-99999"})
    assert status == 206 and body == data[5100:]
    assert headers["content-range"] == f"bytes 5100-{len(data) - 1}/{len(data)}"


def test_invalid_http_request_gets_json_and_headers(server):
    for raw in (b"GARBAGE\r\n\r\n", b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header Line\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)):  # a TLS hello on the plain port
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 400"), lines[0]
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        assert_guarded(headers)
        assert json.loads(body) == {"error": "invalid HTTP request"}


class Broken(BagOfWordsIndex):
    def similar(self, video_id, k):
        raise ZeroDivisionError("a bug")


def test_a_bug_is_a_json_500_with_headers_and_one_log_record(stub, caplog):
    broken = Broken(stub.folder, CAPTIONS, stub._records)
    caplog.set_level(logging.ERROR)
    with ServerThread(create_app(broken)) as srv:
        caplog.clear()
        status, headers, body = raw_get(srv.port, "/api/similar?video_id=dog&k=2")
        assert status == 500 and json.loads(body) == {"error": "internal error (see the server log)"}
        assert_guarded(headers)
        assert b"Traceback" not in body and b"ZeroDivision" not in body
        time.sleep(0.2)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info and "/api/similar" in errors[0].getMessage()
        assert get_json(srv.port, "/api/health")[0] == 200  # and it goes on serving


@pytest.mark.parametrize("path", ["/api/health", "/video/dog", "/thumb/dog/0", "/frame/frames-only/2", "/",
                                  "/static/app.js", "/nothing", "/api/search?q=dog&k=%C2%B2"])
def test_head_is_get_without_a_body(server, path):
    status, headers, body = _request(server.port, "GET", path)
    h_status, h_headers, h_body = _request(server.port, "HEAD", path)
    assert h_status == status and h_body == b""
    assert h_headers.get("content-length") == headers.get("content-length") == str(len(body))
    assert h_headers["content-type"] == headers["content-type"]
    assert_guarded(h_headers, json_error=status >= 400)


# ----------------------------------------------------------------------------------------------- memory
def test_byte_lru_keeps_its_bound_and_order():
    memo = ByteLRU(10_000)
    for i in range(1000):
        memo.put(f"word{i}", (i, i + 1))
        assert memo.bytes <= 10_000
    assert len(memo) == 10_000 // ByteLRU.cost("word100", (1, 2)) and memo.get("word0") is None
    assert memo.get("word999") == (999, 1000)
    oldest = next(iter(memo._data))
    memo.get(oldest)  # used: now the newest
    memo.put("another", (1,))
    assert memo.get(oldest) is not None
    memo.put("huge", tuple(range(5000)))  # larger than the whole memo: not kept
    assert memo.get("huge") is None and memo.bytes <= 10_000


def test_byte_lru_pickles_for_data_loader_workers():
    import pickle

    memo = ByteLRU(5_000)
    for i in range(100):
        memo.put(f"w{i}", (i,))
    copy = pickle.loads(pickle.dumps(memo))
    assert copy.bytes == memo.bytes and list(copy._data) == list(memo._data) and copy.get("w99") == (99,)
    copy.put("new", (1, 2))
    assert copy.bytes <= 5_000


def test_byte_lru_estimate_is_not_below_the_real_memory():
    import tracemalloc

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    memo = ByteLRU(1 << 30)
    for i in range(5000):
        memo.put(f"{i:06d}" + "x" * 30, tuple(range(i % 20, i % 20 + 12)))
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert used <= memo.bytes * 1.1, (used, memo.bytes)


class TokenizingIndex(BagOfWordsIndex):
    """The stub index, but its text path is the real one up to the model: CLIP's tokeniser with its memos (a
    token's vector is a row of a fixed random table, standing in for the text tower)."""

    def __init__(self, *a, **kw):
        self.tokenizer = ClipTokenizer(32)
        self.table = np.random.default_rng(0).standard_normal((4096, 64)).astype(np.float32)
        super().__init__(*a, **kw)

    def encode_text(self, texts):
        if not hasattr(self, "ids"):  # the captions of the videos, while the stub is being made
            return super().encode_text(texts)
        ids, mask = self.tokenizer.batch(list(texts))
        out = (self.table[ids.numpy() % 4096] * mask.numpy()[..., None]).sum(1)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))


RSS_BOUND = 32 << 20  # the memos hold at most 4 + 4 MiB; without a bound this load adds far more (see below)


async def _asgi_get(app, path: str) -> int:
    """One GET through the ASGI app in this process (no socket): its status."""
    route, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": route, "raw_path": route.encode(), "query_string": query.encode(), "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    status = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return status[0]


async def _send_all(app, texts: list[str], clients: int = 8) -> int:
    """Send every query through the app, ``clients`` at a time; returns how many were not answered 200."""
    import asyncio

    async def client(mine: list[str]) -> int:
        return sum([await _asgi_get(app, "/api/search?k=3&q=" + quote(t)) != 200 for t in mine])

    return sum(await asyncio.gather(*(client(texts[i::clients]) for i in range(clients))))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RSS from /proc")
def test_ten_thousand_distinct_long_queries_keep_memory_bounded(stub):
    """10,000 distinct 1,000-character queries through the app (in this process, 8 at a time, so that they are
    batched as under load) after 1,500 to warm up: the resident memory grows by less than RSS_BOUND, while
    unbounded memos would have grown by more than twice that."""
    import asyncio

    rng = random.Random(0)

    def query() -> str:
        words = ("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(200))
        return " ".join(words)[:1000]

    index = TokenizingIndex(stub.folder, CAPTIONS, stub._records)
    warm, measured = [query() for _ in range(1500)], [query() for _ in range(10_000)]
    app = create_app(index, max_concurrent_encodes=2, max_waiting=64)
    assert asyncio.run(_send_all(app, warm)) == 0
    before = _rss()
    t0 = time.perf_counter()
    assert asyncio.run(_send_all(app, measured)) == 0
    took = time.perf_counter() - t0
    growth = _rss() - before
    app.state.batcher.shutdown()
    bpe = _bpe()
    assert bpe._memo.bytes <= bpe._memo.max_bytes and index.tokenizer._cache.bytes <= index.tokenizer._cache.max_bytes
    # what unbounded memos would have held after this load: every distinct word and every query
    words = {w for q in warm + measured for w in q.split()[:30]}
    unbounded = sum(ByteLRU.cost(w, (0,) * 3) for w in words) + sum(ByteLRU.cost(q, (0,) * 30) for q in measured)
    assert unbounded > 2 * RSS_BOUND
    print(f"RSS grew {growth / 2**20:.1f} MiB over 10,000 queries ({took:.0f} s)")
    assert growth < RSS_BOUND, f"RSS grew {growth / 2**20:.1f} MiB over 10,000 queries ({took:.0f} s)"


# ----------------------------------------------------------------------------------------------- new generations
def _emb(root: Path, n: int, seed: int) -> Path:
    d = root / f"emb{n}-{seed}"
    d.mkdir()
    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    np.save(d / "video.npy", x / np.linalg.norm(x, axis=1, keepdims=True))
    (d / "video_ids.json").write_text(json.dumps([f"v{i}" for i in range(n)]))
    return d


def _wait_generation(port: int, name: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = get_json(port, "/api/health")[1]
        if body["generation"] == name or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_a_running_server_switches_to_a_new_generation(tmp_path, capsys):
    ix = tmp_path / "ix"
    assert search.main(["build", "--from_embeddings", str(_emb(tmp_path, 5, 0)), "--index", str(ix)]) == 0
    index = SearchIndex.open(ix)
    first = index.generation.name
    app = create_app(index, reload_interval_ms=0)
    with ServerThread(app) as srv:
        assert get_json(srv.port, "/api/health")[1]["generation"] == first
        # a request in progress holds the first generation (as a long download would)
        lease = app.state.live.use()
        held = lease.__enter__()
        assert search.main(["build", "--from_embeddings", str(_emb(tmp_path, 7, 1)), "--index", str(ix)]) == 0
        second = (ix / CURRENT).read_text().strip()
        body = _wait_generation(srv.port, second)
        assert body["generation"] == second and body["videos"] == 7
        assert get_json(srv.port, "/api/similar?video_id=v6&k=2")[0] == 200  # v6 exists only in the new one
        # the old generation stays on disk while the request uses it, also through another build's clean-up
        assert search.main(["build", "--from_embeddings", str(_emb(tmp_path, 6, 2)), "--index", str(ix)]) == 0
        assert (ix / first / MANIFEST).is_file() and len(held.index.similar("v1", 2)) == 2
        lease.__exit__(None, None, None)  # the request ends: the old generation is closed
        third = (ix / CURRENT).read_text().strip()
        assert _wait_generation(srv.port, third)["videos"] == 6
        assert search.main(["build", "--from_embeddings", str(_emb(tmp_path, 6, 3)), "--index", str(ix)]) == 0
        fourth = (ix / CURRENT).read_text().strip()
        assert _wait_generation(srv.port, fourth)["generation"] == fourth
        assert search.main(["build", "--from_embeddings", str(_emb(tmp_path, 6, 4)), "--index", str(ix)]) == 0
        assert not (ix / first).exists()
        assert app.state.live.switches >= 3
    assert srv.stopped_cleanly


class Lines(logging.Handler):
    """Log lines of one logger (``caplog`` loses them: a build reconfigures the root logger)."""

    def __init__(self, name: str):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.logger = logging.getLogger(name)

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)


def test_a_damaged_new_generation_is_not_served(tmp_path):
    ix = tmp_path / "ix"
    assert search.main(["build", "--from_embeddings", str(_emb(tmp_path, 5, 0)), "--index", str(ix)]) == 0
    index = SearchIndex.open(ix)
    first = index.generation.name
    with ServerThread(create_app(index, reload_interval_ms=0)) as srv, Lines("clip2video.search.app") as log:
        assert search.main(["build", "--from_embeddings", str(_emb(tmp_path, 7, 1)), "--index", str(ix)]) == 0
        new = ix / (ix / CURRENT).read_text().strip()
        shard = ix / "shards" / (json.loads((new / MANIFEST).read_text())["shards"][0] + ".npy")
        shard.write_bytes(shard.read_bytes()[:-64])  # damaged before the server looked
        for _ in range(20):
            assert get_json(srv.port, "/api/health")[1]["generation"] == first
            time.sleep(0.05)
        lines = [m for m in log.lines if "not served" in m]
        assert len(lines) == 1 and new.name in lines[0] and str(shard) in lines[0], lines
        assert get_json(srv.port, "/api/similar?video_id=v1&k=2")[0] == 200
    shutil.rmtree(ix)
    assert os.listdir(tmp_path)

