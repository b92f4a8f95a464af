"""CLIP weights by name (modules/weights/hub.py), with no internet.

OpenAI's releases are served by a loopback HTTP server started in the test (127.0.0.1, a thread, a bounded
number of requests), under a URL path that carries the served file's real SHA-256 exactly as OpenAI's URLs
do; the release table is pointed at that file for the test. open_clip's pretrained tags are read from a
Hugging Face cache laid out as the hub lays it out (``models--ORG--NAME/snapshots/<rev>/…`` + ``refs/main``),
for a tiny architecture and tag registered with open_clip for the test.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from clip2video.modules.weights import hub

from conftest import ROOT, make_colour_clips

pytestmark = pytest.mark.usefixtures("one_thread")

# A tiny OpenAI-layout CLIP: the BPE vocabulary (49408 tokens) is required, so the width is kept at 64 and the
# tensors stored in fp16 as OpenAI's releases are (~6.5 MB).
TINY = dict(embed_dim=64, image_size=32, patch_size=16, vision_width=64, vision_layers=1, context_length=77,
            vocab_size=49408, text_width=64, text_layers=1)
HUB_ARCH, HUB_TAG, HUB_REPO = "c2vtest-hub-tiny", "tinytag", "c2vtest/tiny-clip"
MAX_REQUESTS = 40  # the loopback server answers at most this many requests per test


# ----------------------------------------------------------------------------------------------- fixtures
def tiny_clip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.weights.factory import create_model

    torch.manual_seed(seed)
    return create_model("meanP", clip_config=ClipConfig(**TINY)).clip.state_dict()


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory) -> bytes:
    """The bytes of a tiny OpenAI-style release: fp16 tensors plus OpenAI's three integer buffers."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in tiny_clip_state_dict().items()}
    sd.update(input_resolution=torch.tensor(TINY["image_size"]), context_length=torch.tensor(77),
              vocab_size=torch.tensor(49408))
    path = tmp_path_factory.mktemp("release") / "ViT-B-32.pt"
    torch.save(sd, path)
    return path.read_bytes()


class Server:
    """A loopback file server: ``files`` maps URL paths to bytes. ``cuts`` responses (the next ones) stop
    after half their body and close the connection; ``ranges`` False ignores ``Range`` (always the whole
    file, status 200). ``seen`` lists (path, Range header) of every request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cuts = 0
        self.ranges = True
        self.seen: list[tuple[str, str | None]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10

            def do_GET(self):  # noqa: N802 - http.server's name
                owner.seen.append((self.path, self.headers.get("Range")))
                body = owner.files.get(self.path)
                if body is None or len(owner.seen) > MAX_REQUESTS:
                    self.send_error(404)
                    return
                start, rng = 0, self.headers.get("Range")
                if rng and owner.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if owner.cuts > 0:
                    owner.cuts -= 1
                    self.wfile.write(payload[: len(payload) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def serve(self, data: bytes, sha: str, filename: str = "ViT-B-32.pt") -> str:
        """Serve ``data`` at ``/<sha>/<filename>`` (OpenAI's layout); returns its URL."""
        self.files[f"/{sha}/{filename}"] = data
        return f"{self.base}/{sha}/{filename}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(monkeypatch, tmp_path):
    """The loopback server as OpenAI's base URL, an empty cache folder, quick retries."""
    srv = Server()
    monkeypatch.setenv(hub.OPENAI_URL_ENV, srv.base)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "TIMEOUT_S", 10.0)
    monkeypatch.setattr(hub, "_pause", lambda attempt, why: None)
    yield srv
    srv.close()


def publish(monkeypatch, server: Server, data: bytes, sha: str | None = None) -> str:
    """Make ``data`` OpenAI's ViT-B/32 for this test, served under ``sha`` (its real SHA-256 by default)."""
    real = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(hub.OPENAI_RELEASES, "ViT-B/32", (sha or real, "ViT-B-32.pt"))
    server.serve(data, sha or real)
    return real


def cache_files(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def videos(tmp_path: Path) -> Path:
    return make_colour_clips(tmp_path / "videos", n_videos=2, frames=2, colours=2, size=(32, 32), noise=0)[1]


def build_argv(feats: Path, ix: Path, *source: str) -> list[str]:
    return ["build", "--features_path", str(feats), "--index", str(ix), "--zero_shot", *source, "--max_words", "8",
            "--max_frames", "2", "--batch_size", "2", "--num_thread_reader", "0", "--device", "cpu", "--no_progress"]


def one_error_line(capsys, prog: str = "search.py") -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    return err.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("spelling, official", [
    ("ViT-B/32", "ViT-B/32"), ("ViT-B-32", "ViT-B/32"), ("vit-b-32-quickgelu", "ViT-B/32"), ("ViT-B/16", "ViT-B/16"),
    ("ViT-L-14", "ViT-L/14"), ("ViT-L/14@336px", "ViT-L/14@336px"), ("ViT-L-14-336", "ViT-L/14@336px"),
    ("ViT-H-14", None), ("ViT-B/33", None), ("ViT-B-32.pt", None), ("RN50", None),
])
def test_openai_names_and_open_clip_spellings(spelling, official):
    assert hub.openai_release(spelling) == official


def test_release_urls_carry_their_sha256_and_the_base_is_overridable(monkeypatch):
    monkeypatch.delenv(hub.OPENAI_URL_ENV, raising=False)
    sha, name = hub.OPENAI_RELEASES["ViT-L/14@336px"]
    assert hub.openai_url("ViT-L/14@336px") == f"https://openaipublic.azureedge.net/clip/models/{sha}/{name}"
    assert len(sha) == 64 and int(sha, 16) >= 0 and name == "ViT-L-14-336px.pt"
    monkeypatch.setenv(hub.OPENAI_URL_ENV, "http://127.0.0.1:9/mirror/")
    assert hub.openai_url("ViT-B/32") == f"http://127.0.0.1:9/mirror/{hub.OPENAI_RELEASES['ViT-B/32'][0]}/ViT-B-32.pt"


def test_cache_folder_is_clips_default_unless_the_variable_moves_it(monkeypatch, tmp_path):
    monkeypatch.delenv(hub.CACHE_ENV, raising=False)
    assert hub.cache_dir() == Path.home() / ".cache" / "clip"
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"


def test_an_existing_file_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("ViT-B-32").write_bytes(b"local")
    assert hub.resolve_clip_weights("ViT-B-32") == Path("ViT-B-32")
    assert hub.resolve_clip_weights("no/such.pt") == Path("no/such.pt")  # the reader names it missing


# ----------------------------------------------------------------------------------------------- download
def test_download_verifies_caches_and_then_reads_no_network(server, monkeypatch, tmp_path):
    data = os.urandom(2_500_000)
    publish(monkeypatch, server, data)
    got = hub.fetch_openai("ViT-B-32", progress=False)
    assert got == tmp_path / "cache" / "ViT-B-32.pt" and got.read_bytes() == data
    assert cache_files(tmp_path) == ["ViT-B-32.pt"]
    assert hub.fetch_openai("ViT-B/32", offline=True) == got  # from the cache, checked again
    assert len(server.seen) == 1


def test_interrupted_transfer_is_resumed_with_a_range_request(server, monkeypatch, tmp_path):
    data = os.urandom(2_500_000)
    publish(monkeypatch, server, data)
    server.cuts = 1
    got = hub.fetch_openai("ViT-B/32", progress=False)
    assert got.read_bytes() == data and cache_files(tmp_path) == ["ViT-B-32.pt"]
    assert [r for _, r in server.seen] == [None, f"bytes={len(data) // 2}-"]


def test_server_without_ranges_gets_a_clean_restart(server, monkeypatch, tmp_path):
    data = os.urandom(2_500_000)
    publish(monkeypatch, server, data)
    server.cuts, server.ranges = 1, False
    got = hub.fetch_openai("ViT-B/32", progress=False)
    assert got.read_bytes() == data and cache_files(tmp_path) == ["ViT-B-32.pt"]
    assert len(server.seen) == 2  # the second answer was the whole file again, written from the start


def test_transfer_that_keeps_breaking_leaves_no_final_file_and_resumes_next_run(server, monkeypatch, tmp_path):
    data = os.urandom(2_500_000)
    sha = publish(monkeypatch, server, data)
    server.cuts = hub.RETRIES + 1
    with pytest.raises(hub.DownloadError, match="kept breaking off") as e:
        hub.fetch_openai("ViT-B/32", progress=False)
    assert "\n" not in str(e.value)
    part = hub.partial_path(tmp_path / "cache" / "ViT-B-32.pt", sha)
    assert cache_files(tmp_path) == [part.name] and part.name.startswith(".")  # hidden, never the final name
    assert 0 < part.stat().st_size < len(data)
    kept = part.stat().st_size
    got = hub.fetch_openai("ViT-B/32", progress=False)  # the next run: one request for the rest
    assert got.read_bytes() == data and cache_files(tmp_path) == ["ViT-B-32.pt"]
    assert server.seen[-1][1] == f"bytes={kept}-"


def test_corrupt_resumed_partial_is_fetched_again_whole(server, monkeypatch, tmp_path):
    data = os.urandom(1_000_000)
    sha = publish(monkeypatch, server, data)
    part = hub.partial_path(tmp_path / "cache" / "ViT-B-32.pt", sha)
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # damaged bytes left by an earlier transfer
    got = hub.fetch_openai("ViT-B/32", progress=False)
    assert got.read_bytes() == data and cache_files(tmp_path) == ["ViT-B-32.pt"]
    assert [r for _, r in server.seen] == ["bytes=1000-", None]


def test_cached_file_with_another_hash_is_removed_and_fetched_again(server, monkeypatch, tmp_path):
    data = os.urandom(500_000)
    publish(monkeypatch, server, data)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "ViT-B-32.pt").write_bytes(b"not the release")
    with pytest.raises(hub.ChecksumMismatch, match="removed"):
        hub.fetch_openai("ViT-B/32", offline=True)
    assert cache_files(tmp_path) == [] and server.seen == []
    (tmp_path / "cache" / "ViT-B-32.pt").write_bytes(b"not the release")
    assert hub.fetch_openai("ViT-B/32", progress=False).read_bytes() == data


def test_http_404_names_the_url_and_the_hub_copy(server, monkeypatch, tmp_path):
    monkeypatch.setitem(hub.OPENAI_RELEASES, "ViT-B/32", ("ab" * 32, "ViT-B-32.pt"))  # not served
    with pytest.raises(hub.DownloadError) as e:
        hub.fetch_openai("ViT-B/32", progress=False)
    msg = str(e.value)
    assert "HTTP 404" in msg and "--clip_model ViT-B-32:openai" in msg and "\n" not in msg
    assert cache_files(tmp_path) == []


def test_processes_starting_together_download_once(server, monkeypatch, tmp_path):
    data = os.urandom(2_000_000)
    publish(monkeypatch, server, data)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(hub.fetch_openai("ViT-B/32", progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 3 and all(p.read_bytes() == data for p in results)
    assert len(server.seen) == 1


# ----------------------------------------------------------------------------------------------- the CLI
def test_openai_name_builds_an_index_then_works_offline_from_the_cache(server, monkeypatch, tmp_path, capsys,
                                                                       tiny_release):
    """``search.py build --zero_shot --clip_path ViT-B/32``: downloaded, verified, cached, recorded; a second
    build with --offline and no server reads the cache; the index answers a query from the cached file."""
    from clip2video.cli import search
    from clip2video.search.index import read_manifest

    publish(monkeypatch, server, tiny_release)
    feats = videos(tmp_path)
    assert search.main(build_argv(feats, tmp_path / "ix", "--clip_path", "ViT-B/32")) == 0
    cached = tmp_path / "cache" / "ViT-B-32.pt"
    assert cached.read_bytes() == tiny_release and cache_files(tmp_path) == ["ViT-B-32.pt"]
    assert read_manifest(tmp_path / "ix")[1]["model"]["clip_path"] == str(cached.resolve())

    monkeypatch.setenv(hub.OPENAI_URL_ENV, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    seen = len(server.seen)
    assert search.main(build_argv(feats, tmp_path / "ix2", "--clip_path", "ViT-B-32", "--offline")) == 0
    assert len(server.seen) == seen
    capsys.readouterr()
    assert search.main(["query", "--index", str(tmp_path / "ix2"), "--json", "-k", "2", "a red video"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["results"]) == 2


def test_checksum_mismatch_is_one_line_and_leaves_nothing(server, monkeypatch, tmp_path, capsys):
    from clip2video.cli import search

    publish(monkeypatch, server, os.urandom(300_000), sha="cd" * 32)  # the URL's hash is not the body's
    rc = search.main(build_argv(videos(tmp_path), tmp_path / "ix", "--clip_path", "ViT-B/32"))
    err = one_error_line(capsys)
    assert rc == 1 and "SHA-256" in err and "refused and removed" in err, err
    assert cache_files(tmp_path) == [] and not (tmp_path / "ix").exists()


def test_offline_without_the_file_is_one_line_naming_it_and_where_to_put_it(server, monkeypatch, tmp_path,
                                                                            capsys):
    from clip2video.cli import infer_retrieval

    publish(monkeypatch, server, os.urandom(1000))
    csv, feats = make_colour_clips(tmp_path / "v", n_videos=2, frames=2, colours=2, size=(32, 32), noise=0)
    rc = infer_retrieval.main(["--zero_shot", "--clip_path", "ViT-L-14-336", "--offline", "--features_path",
                               str(feats), "--datatype", "generic", "--data_path", str(csv), "--split", "val",
                               "--num_thread_reader", "0", "--device", "cpu"])
    err = one_error_line(capsys, "infer_retrieval.py")
    dest = tmp_path / "cache" / "ViT-L-14-336px.pt"
    assert rc == 1 and "--offline" in err and f"put it at {dest}" in err and hub.openai_url("ViT-L/14@336px") in err
    assert server.seen == [] and cache_files(tmp_path) == []


def test_unreachable_server_is_one_line(monkeypatch, tmp_path, capsys):
    from clip2video.cli import search

    monkeypatch.setenv(hub.OPENAI_URL_ENV, f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    rc = search.main(build_argv(videos(tmp_path), tmp_path / "ix", "--clip_path", "ViT-B/16"))
    err = one_error_line(capsys)
    assert rc == 1 and "cannot reach" in err and str(tmp_path / "cache" / "ViT-B-16.pt") in err, err
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("flags, code, needle", [
    (["--clip_path", "ViT-B/33"], 2, "--clip_path ViT-B/33: no such file, nor a CLIP name (ViT-B/32, ViT-B/16"),
    (["--clip_model", "ViT-B-32:no_such_tag"], 1, "open_clip has no pretrained tag 'no_such_tag' for ViT-B-32"),
    (["--clip_model", "ViT-Q-99:openai"], 1, "open_clip has no architecture 'ViT-Q-99'"),
    (["--clip_model", "ViT-B-32"], 2, "--zero_shot needs --clip_path"),
])
def test_unknown_names_are_one_line(flags, code, needle, monkeypatch, tmp_path, capsys):
    from clip2video.cli import search

    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(hub.OPENAI_URL_ENV, f"http://127.0.0.1:{free_port()}")
    rc = search.main(build_argv(videos(tmp_path), tmp_path / "ix", *flags))
    err = one_error_line(capsys)
    assert rc == code and needle in err, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "ix").exists()


def test_train_accepts_a_name_and_an_open_clip_tag_alone(monkeypatch, tmp_path, capsys):
    """train.py's flag checks let a name (or NAME:TAG alone) through to the download; ``--offline`` then stops
    it with the one line that says where the file goes."""
    from clip2video.cli import train

    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    csv, feats = make_colour_clips(tmp_path / "v", n_videos=2, frames=2, colours=2, size=(32, 32), noise=0)
    argv = ["--datatype", "generic", "--data_path", str(csv), "--features_path", str(feats), "--output_dir",
            str(tmp_path / "out"), "--device", "cpu", "--offline"]
    assert train.main([*argv, "--clip_path", "ViT-B/32"]) == 1
    err = one_error_line(capsys, "train.py")
    assert "ViT-B-32.pt is not in the cache and --offline is set" in err, err


# ----------------------------------------------------------------------------------------------- open_clip tags
def hub_arch_config() -> dict:
    return {"embed_dim": TINY["embed_dim"],
            "vision_cfg": {"image_size": TINY["image_size"], "layers": TINY["vision_layers"],
                           "width": TINY["vision_width"], "patch_size": TINY["patch_size"]},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TINY["text_width"], "heads": 1,
                         "layers": TINY["text_layers"]}}


def populate_hub_cache(root: Path) -> Path:
    """The hub's own layout for ``c2vtest/tiny-clip``: blobs, a snapshot of one revision, ``refs/main``."""
    rev = hashlib.sha1(b"tiny-clip").hexdigest()
    repo = root / ("models--" + HUB_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    torch.save(tiny_clip_state_dict(seed=1), snap / "open_clip_pytorch_model.bin")
    return snap / "open_clip_pytorch_model.bin"


REGISTER = """
import json, sys
from pathlib import Path
import open_clip
from open_clip import pretrained
open_clip.add_model_config(sys.argv[1])
pretrained._PRETRAINED[sys.argv[2]] = {sys.argv[3]: pretrained._pcfg(hf_hub=sys.argv[4] + "/")}
from clip2video.cli.search import main
sys.exit(main(sys.argv[5:]))
"""


def test_open_clip_tag_from_a_prepopulated_hub_cache_under_hf_hub_offline(tmp_path):
    """``--clip_model NAME:TAG`` with no file, in a fresh process with ``HF_HUB_OFFLINE=1`` and the hub cache
    already holding the tag's file: open_clip's registry names the repository, the hub's own download returns
    the cached file, the index is built from it and records it."""
    from clip2video.search.index import read_manifest

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / f"{HUB_ARCH}.json").write_text(json.dumps(hub_arch_config()))
    weights = populate_hub_cache(tmp_path / "hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "hf_home"), hub.CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    argv = build_argv(videos(tmp_path), tmp_path / "ix", "--clip_model", f"{HUB_ARCH}:{HUB_TAG}")
    proc = subprocess.run([sys.executable, "-c", REGISTER, str(configs), HUB_ARCH, HUB_TAG, HUB_REPO, *argv],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = read_manifest(tmp_path / "ix")[1]["model"]
    assert Path(model["clip_path"]) == weights.resolve()
    assert model["config"]["clip"]["activation"] == "gelu" and model["config"]["clip"]["model_name"] == HUB_ARCH
    assert model["variant"] == "meanP" and model["zero_shot"]  # the README's zero-shot index: mean pooling
    assert not (tmp_path / "cache").exists()  # OpenAI's cache is not involved


def test_open_clip_tag_offline_and_not_cached_is_one_line(monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants
    import open_clip
    from open_clip import pretrained

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / f"{HUB_ARCH}.json").write_text(json.dumps(hub_arch_config()))
    open_clip.add_model_config(configs)
    monkeypatch.setitem(pretrained._PRETRAINED, HUB_ARCH, {HUB_TAG: pretrained._pcfg(hf_hub=HUB_REPO + "/")})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from clip2video.cli import search

    rc = search.main(build_argv(videos(tmp_path), tmp_path / "ix", "--clip_model", f"{HUB_ARCH}:{HUB_TAG}",
                                "--offline"))
    err = one_error_line(capsys)
    assert rc == 1 and f"{HUB_REPO}/open_clip_pytorch_model.bin are not in the Hugging Face cache " \
                       f"{tmp_path / 'hub'}" in err, err
    assert not (tmp_path / "hub").exists() and not (tmp_path / "ix").exists()

    weights = populate_hub_cache(tmp_path / "hub")  # now cached: --offline finds it with the hub's lookup
    assert hub.fetch_open_clip(f"{HUB_ARCH}:{HUB_TAG}", offline=True) == weights
