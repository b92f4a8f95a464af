"""Helpers for the server tests: a small index implementing the search-index interface over numpy vectors,
a uvicorn server in a thread on a free loopback port, and raw HTTP requests (paths sent byte for byte)."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Hit:
    video_id: str
    score: float
    path: str


@dataclass(frozen=True)
class VideoRecord:
    """A record as ``SearchIndex.record`` gives it; the file policy's part (root, files, thumbnail stats) is
    taken from disk when the record is made, as a build takes it (``clip2video.search.files``)."""

    video_id: str
    path: Path
    kind: str
    thumbnails: list = field(default_factory=list)
    duration: float | None = None
    frames: int | None = None
    root: Path | None = None
    files: list | None = None
    thumb_stats: list | None = None

    def __post_init__(self):
        from clip2video.search.files import scan_frame_folder, scan_video_file, stat_record

        path = Path(os.path.realpath(self.path))
        object.__setattr__(self, "path", path)
        if self.files is None:
            scan = scan_frame_folder if self.kind == "frames" else scan_video_file
            rec, why = scan(str(path), follow_symlinks=False)
            assert rec is not None, why
            object.__setattr__(self, "files", rec["files"])
        if self.root is None:
            object.__setattr__(self, "root", path.parent)
        if self.thumb_stats is None:
            object.__setattr__(self, "thumb_stats", [stat_record(t) for t in self.thumbnails])


class BagOfWordsIndex:
    """The index interface over a few videos described by captions: a text (or a video) is the normalised
    sum of random word vectors, a score is 100 × the inner product. Enough to check that the server returns
    what the index ranks, without a model."""

    fingerprint = "bag-of-words-test"

    def __init__(self, folder: Path, captions: dict[str, str], records: dict[str, VideoRecord], dim: int = 64,
                 encode_delay: float = 0.0):
        self.folder = Path(folder)
        self.dim = dim
        self.encode_delay = encode_delay
        self.gate: threading.Event | None = None  # when set, encode_text waits for it (concurrency tests)
        self.encodes = 0
        self._records = records
        self.ids = list(captions)
        self.vectors = self.encode_text([captions[i] for i in self.ids])
        self.encodes = 0

    def __len__(self):
        return len(self.ids)

    def _word(self, w: str) -> np.ndarray:
        seed = zlib.crc32(w.lower().encode())
        return np.random.RandomState(seed).standard_normal(self.dim).astype(np.float32)

    def encode_text(self, texts):
        self.encodes += 1
        if self.gate is not None:
            self.gate.wait(30)
        if self.encode_delay:
            time.sleep(self.encode_delay)
        out = np.zeros((len(texts), self.dim), np.float32)
        for r, t in enumerate(texts):
            for w in re.findall(r"\w+", t):
                out[r] += self._word(w)
            out[r] /= max(float(np.linalg.norm(out[r])), 1e-6)
        return out

    def search(self, vectors, k):
        scores = 100.0 * (vectors @ self.vectors.T)
        hits = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[:k]
            hits.append([Hit(self.ids[j], float(row[j]), str(self._records[self.ids[j]].path)) for j in order])
        return hits

    def query(self, texts, k):
        return self.search(self.encode_text(texts), k)

    def similar(self, video_id, k):
        if video_id not in self._records:
            raise KeyError(video_id)
        i = self.ids.index(video_id)
        hits = self.search(self.vectors[i:i + 1], k + 1)[0]
        return [h for h in hits if h.video_id != video_id][:k]

    def record(self, video_id):
        return self._records.get(video_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` in a thread on a free loopback port; leaving the block stops it and checks
    that it stopped (thread ended, port closed)."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        from clip2video.search.app import server_config

        self.server = uvicorn.Server(server_config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.stopped_cleanly = None

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        self.stopped_cleanly = not self.thread.is_alive()


def raw_get(port: int, path: str, headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    """GET with the path sent exactly as given (no client-side normalisation of ``..`` or escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        hdrs = {"Host": f"127.0.0.1:{port}", **(headers or {})}
        for k, v in hdrs.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def get_json(port: int, path: str, **kw) -> tuple[int, dict]:
    status, headers, body = raw_get(port, path, **kw)
    assert headers.get("content-type", "").startswith("application/json"), (path, headers, body[:200])
    return status, json.loads(body)


def start_serve(args: list[str], cwd: Path, env: dict, timeout: float = 180) -> tuple[subprocess.Popen, str, list]:
    """Start ``search.py serve`` as a subprocess and wait for the URL it logs. Returns (process, url, lines)."""
    proc = subprocess.Popen([sys.executable, "search.py", "serve", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    found: dict = {}

    def reader():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving \d+ videos at (http://\S+)", line)
            if m and "url" not in found:
                found["url"] = m.group(1).rstrip("/")

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout
    while "url" not in found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("search.py serve did not start:\n" + "".join(lines[-30:]))
        time.sleep(0.05)
    return proc, found["url"], lines


# ----------------------------------------------------------------------------------------------- a real index
PARITY_MODEL_FLAGS = ["--sim_type", "seqTransf", "--temporal_type", "TDB", "--temporal_proj", "sigmoid_selfA",
                      "--center_type", "TAB", "--centerK", "5", "--center_weight", "0.5", "--center_proj", "TAB_TDB"]


def build_real_index(base: Path, weights: Path, frames: Path, root: Path, env: dict) -> Path:
    """``search.py build`` over the parity fixture's frame folders with its TDB + TAB checkpoint (random
    weights, so the ranking means nothing, but every number is the real pipeline's). Built once per session."""
    out = base / "c2v-real-index"
    if (out / "CURRENT").is_file():
        return out
    cmd = [sys.executable, "search.py", "build", "--features_path", str(frames), "--index", str(out),
           "--checkpoint", str(weights / "ckpt"), "--model_num", "2", "--clip_path", str(weights / "clip.pt"),
           *PARITY_MODEL_FLAGS, "--max_frames", "12", "--feature_framerate", "2", "--no_progress",
           "--num_thread_reader", "0"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def query_json(index: Path, root: Path, env: dict, *args: str) -> list:
    r = subprocess.run([sys.executable, "search.py", "query", "--index", str(index), "--json", *args], cwd=root,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def write_jpeg(path: Path, colour) -> Path:
    """A small one-colour JPEG at ``path`` (parents made): a frame of a stub video."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path, quality=90)
    return path
