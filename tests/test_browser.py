"""The search page in a real headless browser (Debian's chromium driven by Playwright's Python package).

First against ``search.py serve`` on an index built by ``search.py build``: type a query, the first result is
the one ``search.py query --json`` ranks first, and its thumbnails loaded. Then, over a small in-test index
with real H.264 clips: playback and seeking (Range requests), the frame viewer, "more like this", the
server's error message, and that the page fetched nothing from anywhere but the server.

The screenshot of the real index goes to ``$CLIP2VIDEO_SCREENSHOT`` when set (the README's picture:
``CLIP2VIDEO_SCREENSHOT=docs/search-page.png python -m pytest tests/test_browser.py``), else into the test's
temporary folder.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_utils import BagOfWordsIndex, ServerThread, VideoRecord

from clip2video.search.app import create_app

from conftest import REFERENCE

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary: apt-get install chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package: pip install playwright")

CAPTIONS = {
    "bikes": "people ride bicycles down a road",
    "bunny": "a big rabbit in a green forest",
    "dog": "a dog catches a frisbee in the park",
    "cook": "a man cooks pasta in a kitchen",
    "cat-frames": "a cat sleeps on a sofa",
    "<b>odd id</b>": "fireworks over a river at night",
}


def _picture(path: Path, rng, size=(96, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w]
    base = rng.randint(0, 255, 3)
    img = np.stack([(base[c] + x * (c + 1) + y * (3 - c)) % 256 for c in range(3)], -1).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)
    return path


def launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--mute-audio"])


def wait_js(page, expr: str, timeout: float = 10000):
    """Poll a JavaScript expression until it is truthy. (Playwright's wait_for_function evaluates strings
    inside the page, which the page's Content-Security-Policy rightly forbids; evaluate() does not.)"""
    deadline = time.monotonic() + timeout / 1000
    while True:
        value = page.evaluate(expr)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expr!r} in the page")
        time.sleep(0.05)


def screenshot_path(tmp_path: Path, name: str, env: bool) -> Path:
    path = Path(os.environ.get("CLIP2VIDEO_SCREENSHOT") if env and os.environ.get("CLIP2VIDEO_SCREENSHOT")
                else tmp_path / name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def page_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    rng = np.random.RandomState(1)
    videos = REFERENCE / "videos"
    records = {}
    for n, vid in enumerate(CAPTIONS):
        thumbs = [_picture(root / "index" / "thumbs" / f"{n}_{j}.jpg", rng) for j in range(3)]
        if vid == "cat-frames":
            for j in range(6):
                _picture(root / "frames" / vid / f"{j + 1:08d}.jpg", rng, (320, 240))
            records[vid] = VideoRecord(vid, root / "frames" / vid, "frames", thumbs, 6.0, 6)
        elif vid in ("bikes", "bunny") and (videos / f"{'bigbuckbunny' if vid == 'bunny' else vid}.mp4").is_file():
            records[vid] = VideoRecord(vid, videos / f"{'bigbuckbunny' if vid == 'bunny' else vid}.mp4", "file",
                                       thumbs, None, None)
        else:
            path = root / "videos" / f"{n}.mp4"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"\0" * 100)  # not playable; only the real clips are played
            records[vid] = VideoRecord(vid, path, "file", thumbs, None, None)
    return BagOfWordsIndex(root / "index", CAPTIONS, records)


def test_search_page_on_a_real_index(tmp_path_factory, tmp_path, parity_weights):
    from server_utils import build_real_index, query_json, start_serve

    from conftest import PARITY, ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    index = build_real_index(tmp_path_factory.getbasetemp(), parity_weights, PARITY / "msrvtt" / "frames", ROOT, env)
    query = "a man is singing on a stage"
    (want,) = query_json(index, ROOT, env, "-k", "20", query)
    proc, url, _ = start_serve(["--index", str(index), "--port", "0"], ROOT, env)
    try:
        with sync_api.sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1200, "height": 640})
            page.goto(url + "/")
            wait_js(page, "document.getElementById('info').textContent.includes('videos')", timeout=30000)
            page.fill("#q", query)
            page.press("#q", "Enter")
            page.wait_for_selector(".result", timeout=60000)
            ids = page.eval_on_selector_all(".result .vid", "els => els.map(e => e.textContent)")
            assert ids[0] == want["results"][0]["video_id"]
            assert ids == [h["video_id"] for h in want["results"]]
            wait_js(page, """() => {
                const imgs = [...document.querySelectorAll('.result:first-child img.thumb')];
                return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
            }""", timeout=15000)
            shot = screenshot_path(tmp_path, "search-page.png", env=True)
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            browser.close()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_search_page(page_index, tmp_path):
    index = page_index
    query = "people riding bicycles on a road"
    want = index.query([query], 20)[0]
    with ServerThread(create_app(index, max_query_chars=300)) as srv, sync_api.sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 720})
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        wait_js(page, "document.getElementById('info').textContent.includes('videos')")
        assert page.inner_text("#info").startswith(f"{len(index)} videos")

        page.fill("#q", query)
        page.press("#q", "Enter")
        page.wait_for_selector(".result")
        ids = page.eval_on_selector_all(".result .vid", "els => els.map(e => e.textContent)")
        assert ids == [h.video_id for h in want]
        assert ids[0] == "bikes"
        scores = page.eval_on_selector_all(".result .score", "els => els.map(e => Number(e.textContent))")
        assert scores == pytest.approx([h.score for h in want], abs=1e-3)
        # the odd id is shown as text, not parsed as HTML
        assert page.locator(".result .vid", has_text="<b>odd id</b>").count() == 1
        wait_js(page, """() => {
            const imgs = [...document.querySelectorAll('.result:first-child img.thumb')];
            return imgs.length === 3 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""", timeout=15000)
        widths = page.eval_on_selector_all(".result:first-child img.thumb", "els => els.map(i => i.naturalWidth)")
        assert widths == [96, 96, 96]
        shot = screenshot_path(tmp_path, "stub-page.png", env=False)
        page.screenshot(path=str(shot))
        assert shot.stat().st_size > 10_000

        # click → the video plays and seeks (the browser sends Range requests; needs the real clip)
        if index.record("bikes").path.suffix == ".mp4" and index.record("bikes").path.stat().st_size > 1000:
            page.click(".result:first-child .strip")
            wait_js(page, "document.getElementById('player').readyState >= 1", timeout=20000)
            duration = page.evaluate("document.getElementById('player').duration")
            assert duration == pytest.approx(10.0, abs=0.1)
            t = page.evaluate("""() => new Promise((ok, bad) => {
                const v = document.getElementById('player');
                v.pause();
                v.addEventListener('seeked', () => ok(v.currentTime), {once: true});
                v.addEventListener('error', () => bad(String(v.error && v.error.message)), {once: true});
                v.currentTime = 7.5;
            })""")
            assert t == pytest.approx(7.5, abs=0.5)
            page.click("#viewer-close")
            assert page.is_hidden("#viewer")

        # "more like this" on the first result
        page.click(".result:first-child button.like")
        wait_js(page, "location.hash.includes('like=')")
        # the final status (the page says "videos like bikes …" while it waits for the answer)
        wait_js(page, "document.getElementById('status').textContent.includes('videos like bikes ·')")
        ids = page.eval_on_selector_all(".result .vid", "els => els.map(e => e.textContent)")
        assert ids == [h.video_id for h in index.similar("bikes", 20)]

        # a frame folder: the viewer shows its frames
        page.fill("#q", "a cat asleep on the sofa")
        page.press("#q", "Enter")
        wait_js(page, "document.querySelector('.result .vid').textContent === 'cat-frames'")
        page.click(".result:first-child .strip")
        wait_js(page, """() => {
            const i = document.getElementById('flip-img');
            return !document.getElementById('flip').hidden && i.complete && i.naturalWidth === 320;
        }""", timeout=15000)
        assert page.inner_text("#flip-count").endswith("/ 6")
        page.keyboard.press("Escape")

        # a query over the bound: the page shows the server's message
        page.fill("#q", "x" * 400)
        page.press("#q", "Enter")
        wait_js(page, "document.getElementById('status').className === 'error'")
        assert "limit is 300" in page.inner_text("#status")
        assert page.locator(".result").count() == 0

        browser.close()
    assert srv.stopped_cleanly
    assert not errors, errors
    outside = [u for u in requested if not u.startswith(srv.url)]
    assert not outside, outside


@pytest.fixture(scope="module")
def moments_index(tmp_path_factory, tiny_ckpt):
    """A real index of segments (tiny random model) over a 9.6 s H.264 file joined from synthetic clips."""
    from clip2video.cli import search
    from clip2video.dataloaders.synthetic import make_synthetic_dataset
    from clip2video.dataloaders.video_io import encode_video, read_frames
    from clip2video.search.index import SearchIndex

    root = tmp_path_factory.mktemp("page-moments")
    make_synthetic_dataset(root / "clips", n_videos=6, seed=2, size=64, n_frames=16, fps=10, write="mp4",
                           splits=(0.0, 0.0, 1.0))
    frames = [f[..., ::-1] for p in sorted((root / "clips" / "videos").glob("*.mp4")) for f in read_frames(p)]
    (root / "videos").mkdir()
    encode_video(root / "videos" / "long.mp4", frames, fps=10, gop=10)
    argv = ["build", "--features_path", str(root / "videos"), "--index", str(root / "ix"), "--checkpoint",
            str(tiny_ckpt.parent), "--model_num", "1", "--max_words", "16", "--max_frames", "6", "--num_thread_reader",
            "0", "--device", "cpu", "--no_progress", "--segment_seconds", "2"]
    assert search.main(argv) == 0
    return SearchIndex.open(root / "ix")


def _clock(t: float) -> str:
    m, s = divmod(t, 60.0)
    return f"{int(m)}:{s:04.1f}"


def test_moments_on_the_page(moments_index):
    from clip2video.search.moments import SearchRequest

    index = moments_index
    query = "a red square moves left"
    (want,) = index.search(index.encode_text([query]), SearchRequest(20))
    assert want[0].start is not None and want[0].moments
    with ServerThread(create_app(index)) as srv, sync_api.sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 720})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        page.fill("#q", query)
        page.press("#q", "Enter")
        page.wait_for_selector(".result .range")
        labels = page.eval_on_selector_all(".result .range", "els => els.map(e => e.textContent)")
        assert labels == [f"{_clock(h.start)}–{_clock(h.end)}" for h in want]  # the start–end label
        chips = page.eval_on_selector_all(".result:first-child .moment", "els => els.map(e => e.textContent)")
        assert chips == [f"{_clock(m.start)}–{_clock(m.end)}" for m in want[0].moments]
        href = page.get_attribute(".result:first-child a.clip", "href")
        assert href == f"/api/clip?video_id=long&start={want[0].start:g}&end={want[0].end:g}"

        # the player opens at the moment's start and marks its range on the timeline
        page.click(".result:first-child .strip")
        started = wait_js(page, "document.getElementById('player').dataset.startedAt", timeout=20000)
        assert float(started) == pytest.approx(want[0].start, abs=0.05)
        duration = page.evaluate("document.getElementById('player').duration")
        assert duration == pytest.approx(9.6, abs=0.1)
        left = page.evaluate("parseFloat(document.getElementById('tl-range').style.left)")
        width = page.evaluate("parseFloat(document.getElementById('tl-range').style.width)")
        assert left == pytest.approx(100 * want[0].start / duration, abs=0.5)
        assert width == pytest.approx(100 * (want[0].end - want[0].start) / duration, abs=0.5)
        page.click("#viewer-close")

        # a further moment of the same video opens at its own start
        page.click(".result:first-child .moment >> nth=0")
        started = wait_js(page, "document.getElementById('player').dataset.startedAt", timeout=20000)
        assert float(started) == pytest.approx(want[0].moments[0].start, abs=0.05)
        page.click("#viewer-close")

        # "more like this" from the moment: the moment and those overlapping it are left out
        page.click(".result:first-child button.like")
        wait_js(page, "location.hash.includes('like=long') && location.hash.includes('start=')")
        wait_js(page, "document.getElementById('status').textContent.includes('videos like long at')"
                      " && document.getElementById('status').textContent.includes(' ms')")
        got = page.eval_on_selector_all(".result .range", "els => els.map(e => [Number(e.dataset.start), "
                                                          "Number(e.dataset.end)])")
        assert got and all(not (s < want[0].end and e > want[0].start) for s, e in got)

        # the filter for one video
        page.fill("#q", query)
        page.press("#q", "Enter")
        page.wait_for_selector(".result button.only")
        page.click(".result:first-child button.only")
        wait_js(page, "location.hash.includes('video_id=long')")
        wait_js(page, "!document.getElementById('scope').hidden")
        assert page.inner_text("#scope-label") == "in long"
        wait_js(page, "document.getElementById('status').textContent.includes('results ·')")
        # the one-video answer replaces the grouped list once it arrives (a loaded machine can show the status
        # of the previous render first): wait for the list to change, then check it holds that video's segments
        n_want = min(20, index.n_rows)
        wait_js(page, f"document.querySelectorAll('.result .vid').length === {n_want}")
        ids = page.eval_on_selector_all(".result .vid", "els => els.map(e => e.textContent)")
        assert ids and set(ids) == {"long"} and len(ids) == n_want
        page.click("#scope-clear")
        wait_js(page, "!location.hash.includes('video_id')")
        browser.close()
    assert srv.stopped_cleanly
    assert not errors, errors


# ----------------------------------------------------------------------------------------------- image queries
@pytest.fixture(scope="module")
def image_index(tmp_path_factory):
    """A real index of a tiny random model: synthetic frame folders and two one-frame folders (JPEG, PNG)."""
    import torch

    from clip2video.cli import search
    from clip2video.dataloaders.synthetic import make_synthetic_dataset
    from clip2video.modules.network.backbone import ClipConfig
    from clip2video.modules.weights.factory import create_model
    from clip2video.modules.weights.release import export_original
    from clip2video.search.index import SearchIndex

    root = tmp_path_factory.mktemp("browser-images")
    make_synthetic_dataset(root / "s", n_videos=6, seed=3, size=32, n_frames=8, write="frames", splits=(0, 0, 1))
    videos = root / "s" / "frames"
    jpg, png = root / "frame.jpg", root / "still.png"
    shutil.copy(videos / "syn00000" / "00000004.jpg", jpg)
    Image.open(videos / "syn00003" / "00000002.jpg").convert("RGB").save(png)
    for name, src in (("single", jpg), ("single_png", png)):
        (videos / name).mkdir()
        shutil.copy(src, videos / name / f"00000001{src.suffix}")
    torch.manual_seed(0)
    ckpt = export_original(create_model("tab_tdb", clip_config=ClipConfig.tiny(), center_k=3),
                           root / "ckpt" / "pytorch_model.bin.1")
    argv = ["build", "--features_path", str(videos), "--index", str(root / "ix"), "--checkpoint", str(ckpt.parent),
            "--model_num", "1", "--max_words", "16", "--max_frames", "6", "--num_thread_reader", "0",
            "--device", "cpu", "--no_progress"]
    assert search.main(argv) == 0
    return SearchIndex.open(root / "ix", device="cpu"), jpg, png


def test_search_page_with_an_image(image_index):
    """The file picker and a dropped image search with that image (alone, then with the typed text), as the
    library ranks them; "more like this" from an image's results; a non-image shows the server's message."""
    import base64

    from clip2video.search.query_parse import Part, parse_query
    from clip2video.search.query_vectors import QueryEncoder

    index, jpg, png = image_index
    enc = QueryEncoder(index)

    def ranked(parts):
        return [h.video_id for h in enc.search(parts, 20)]

    def shown(page):
        return page.eval_on_selector_all(".result .vid", "els => els.map(e => e.textContent)")

    with ServerThread(create_app(index)) as srv, sync_api.sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1200, "height": 720})
        requested, errors = [], []
        page.on("request", lambda r: requested.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        wait_js(page, "document.getElementById('info').textContent.includes('videos')")

        # the file picker: the image alone
        page.set_input_files("#image-file", str(jpg))
        wait_js(page, "document.getElementById('status').textContent.includes('results for image frame.jpg')")
        assert page.is_visible("#image-chip") and page.inner_text("#image-name") == "frame.jpg"
        wait_js(page, "document.getElementById('image-preview').naturalWidth === 32")
        ids = shown(page)
        assert ids == ranked([Part(1.0, "image", str(jpg))]) and ids[0] == "single"

        # typed text and the image together
        page.fill("#q", "a red circle")
        page.press("#q", "Enter")
        wait_js(page, "document.getElementById('status').textContent.includes('a red circle + image frame.jpg')")
        assert shown(page) == ranked(parse_query(f'a red circle + "image:{jpg}"'))

        # removing the image: a plain text search again
        page.click("#image-clear")
        assert page.is_hidden("#image-chip") and page.locator(".result").count() == 0
        page.press("#q", "Enter")
        wait_js(page, "location.hash.includes('q=')")
        wait_js(page, "document.getElementById('status').textContent.includes('results ·')")
        assert shown(page) == [h.video_id for h in index.query(["a red circle"], 20)[0]]

        # a dropped image (a drag carrying a file, as a file manager's drag does)
        data = base64.b64encode(png.read_bytes()).decode()
        page.evaluate("""([data, name]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/png" }));
            document.body.dispatchEvent(new DragEvent("dragenter", { dataTransfer: dt, bubbles: true }));
            window.__zoneShown = !document.getElementById("dropzone").hidden;
            document.body.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""", [data, "a still (1).png"])
        assert page.evaluate("window.__zoneShown") and page.is_hidden("#dropzone")
        wait_js(page, "document.getElementById('status').textContent.includes('image a still _1_.png')")
        ids = shown(page)
        assert ids == ranked(parse_query(f'a red circle + "image:{png}"'))
        page.fill("#q", "")
        page.press("#q", "Enter")
        wait_js(page, "document.getElementById('status').textContent.includes(' results for image a still _1_.png')")
        ids = shown(page)
        assert ids == ranked([Part(1.0, "image", str(png))]) and ids[0] == "single_png"

        # "more like this" on the image's second result
        second = ids[1]
        page.click(".result:nth-child(2) button.like")
        wait_js(page, f"document.getElementById('status').textContent.includes('videos like {second} ·')")
        assert shown(page) == [h.video_id for h in index.similar(second, 20)]

        # a file that claims to be an image but is not: the server's one-line message
        page.evaluate("""() => {
            const dt = new DataTransfer();
            dt.items.add(new File(["hello, not an image"], "fake.png", { type: "image/png" }));
            document.body.dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""")
        wait_js(page, "document.getElementById('status').className === 'error'")
        assert "fake.png: not an image" in page.inner_text("#status")
        assert page.locator(".result").count() == 0
        browser.close()
    assert srv.stopped_cleanly
    assert not errors, errors
    assert not [u for u in requested if not u.startswith(srv.url)]
